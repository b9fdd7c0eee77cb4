"""safemerge: cluster."""

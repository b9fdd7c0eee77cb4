"""safemerge: search."""

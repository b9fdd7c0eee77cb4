"""safemerge: merges."""

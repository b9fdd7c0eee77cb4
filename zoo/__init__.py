"""safemerge: zoo."""

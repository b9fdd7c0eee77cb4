"""safemerge: evaluators."""

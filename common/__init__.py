"""safemerge: small pieces every layer shares (user-facing errors, atomic output folders)."""

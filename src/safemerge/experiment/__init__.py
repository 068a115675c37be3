"""`safemerge experiment`: every defence × grid cell on one setup, evaluated, cached and tabulated."""

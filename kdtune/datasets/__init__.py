"""Data shipped inside the package (see README.md here for provenance)."""

"""Building, verifying and publishing layer packages."""

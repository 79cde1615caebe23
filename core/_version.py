"""The package version (one place; the top-level package and the file format both read it)."""

__version__ = "0.1.0"

"""The package version (one place; the factor files record it)."""

__version__ = "0.1.0"

"""The package version, kept apart so that every layer can read it without import cycles."""

__version__ = "0.1.0"

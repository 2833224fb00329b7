"""The package version, single-sourced: pyproject.toml reads it for the metadata."""

__version__ = "0.2.0.dev0"

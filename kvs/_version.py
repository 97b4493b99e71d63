"""The single source of the kvs version (read by pyproject.toml and kvs.__version__)."""

__version__ = "0.1.0"

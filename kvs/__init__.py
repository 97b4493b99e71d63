"""kvs: a persistent key/value store for free-threaded CPython."""

from kvs._version import __version__

__all__ = ["__version__"]

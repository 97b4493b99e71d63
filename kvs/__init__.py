"""kvs: a persistent key/value store for free-threaded CPython."""

from kvs._version import __version__
from kvs.engine.base import KvsEngine
from kvs.engine.kvstore import KvStore
from kvs.errors import KeyNotFoundError, KvsError

__all__ = ["KeyNotFoundError", "KvStore", "KvsEngine", "KvsError", "__version__"]

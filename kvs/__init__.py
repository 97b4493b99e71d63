"""kvs: a persistent key/value store for free-threaded CPython.

The engines (``KvStore``, ours; ``SqliteKvsEngine``, the established one we compare with)
implement ``KvsEngine``; ``KvsServer`` serves one of them over the network through a thread
pool (``kvs.thread_pool``), and ``KvsClient`` talks to it.
"""

from kvs._version import __version__
from kvs.client import KvsClient
from kvs.engine import KvsEngine, KvStore, SqliteKvsEngine, open_engine
from kvs.errors import KeyNotFoundError, KvsError
from kvs.server import KvsServer

__all__ = [
    "KeyNotFoundError",
    "KvStore",
    "KvsClient",
    "KvsEngine",
    "KvsError",
    "KvsServer",
    "SqliteKvsEngine",
    "__version__",
    "open_engine",
]

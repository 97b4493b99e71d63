"""Storage engines: the KvsEngine interface, KvStore (ours) and SqliteKvsEngine."""

from kvs.engine.base import KvsEngine
from kvs.engine.kvstore import KvStore

__all__ = ["KvsEngine", "KvStore"]

"""Storage engines: the KvsEngine interface, KvStore (ours) and SqliteKvsEngine."""

from __future__ import annotations

import os
from typing import Any

from kvs.engine.base import FSYNC_POLICIES, FsyncPolicy, KvsEngine, check_fsync_policy
from kvs.engine.datadir import detect_engine
from kvs.engine.kvstore import KvStore
from kvs.engine.sqlite import SqliteKvsEngine
from kvs.errors import KvsError

ENGINES: dict[str, type[KvStore] | type[SqliteKvsEngine]] = {"kvs": KvStore, "sqlite": SqliteKvsEngine}
"""Engine name (as recorded in a data directory and given to ``--engine``) to class."""


def open_engine(name: str, path: str | os.PathLike[str], **options: Any) -> KvsEngine:
    """Open engine ``name`` on data directory ``path``; ``KvsError`` for an unknown name."""
    try:
        cls = ENGINES[name]
    except KeyError:
        raise KvsError(f"unknown engine {name!r}: choose one of {', '.join(ENGINES)}") from None
    return cls.open(path, **options)


__all__ = ["ENGINES", "FSYNC_POLICIES", "FsyncPolicy", "KvStore", "KvsEngine", "SqliteKvsEngine",
           "check_fsync_policy", "detect_engine", "open_engine"]

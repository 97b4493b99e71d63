"""The engine interface, and the durability policies every engine accepts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

from kvs.errors import KvsError

FsyncPolicy = Literal["never", "always", "interval"]
"""When an engine makes acknowledged writes durable (each engine's docstring says exactly
what each policy guarantees for it): ``"never"`` leaves it to the OS, ``"always"`` before a
write is acknowledged, ``"interval"`` every ``fsync_interval`` seconds in the background."""

FSYNC_POLICIES: tuple[FsyncPolicy, ...] = ("never", "always", "interval")
"""The accepted values of every engine's ``fsync`` option (and of ``kvs-server --fsync``)."""


def check_fsync_policy(fsync: object) -> FsyncPolicy:
    """``fsync`` as an :data:`FsyncPolicy`; ``KvsError`` for anything else. The one check of
    the option, used by every engine."""
    if isinstance(fsync, str):
        for policy in FSYNC_POLICIES:
            if fsync == policy:
                return policy
    raise KvsError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")


@runtime_checkable
class KvsEngine(Protocol):
    """A key/value storage engine, safe to share between threads: what the server and the
    CLI use of an engine, and all of it.

    Every method may be called from any thread at any time. Keys and values are ``str``;
    a non-``str`` argument raises ``TypeError``; a string that cannot be encoded as UTF-8 or
    that exceeds the engine's size limits raises ``KvsError`` and nothing is written. Every
    method of a closed engine raises ``KvsError`` (``close`` itself excepted).
    """

    name: str
    """The engine's name, as recorded in its data directory and given to ``--engine``
    (a class attribute)."""

    @property
    def fsync(self) -> FsyncPolicy:
        """The durability policy the engine was opened with."""
        ...

    def set(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        ...

    def set_many(self, items: Sequence[tuple[str, str]]) -> None:
        """``set`` of each ``(key, value)`` pair in order, sharing one write (``KvStore``:
        one append; ``SqliteKvsEngine``: one transaction). Every pair is checked before
        anything is stored: a bad one raises as ``set`` would and none is stored. The
        server uses it for runs of pipelined SETs."""
        ...

    def get(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None`` when the key is absent."""
        ...

    def remove(self, key: str) -> None:
        """Delete ``key``; ``KeyNotFoundError`` when it is absent."""
        ...

    def __len__(self) -> int:
        """The number of keys (a snapshot when writers are active)."""
        ...

    def close(self) -> None:
        """Flush and release everything; idempotent. Later calls raise ``KvsError``."""
        ...

"""The engine interface and the argument checks every engine shares."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kvs.limits import encode_text  # noqa: F401  (re-exported: the engines' argument check)


@runtime_checkable
class KvsEngine(Protocol):
    """A key/value storage engine, safe to share between threads.

    Every method may be called from any thread at any time. Keys and values are ``str``;
    a non-``str`` argument raises ``TypeError``; a string that cannot be encoded as UTF-8 or
    that exceeds the engine's size limits raises ``KvsError`` and nothing is written.

    An engine may also offer ``set_many(items: Sequence[tuple[str, str]]) -> None``: ``set``
    of each pair in order, sharing one write (``KvStore``: one append; ``SqliteKvsEngine``:
    one transaction), every pair checked before anything is stored. The server uses it for
    runs of pipelined SETs when the engine has it; it is not part of this protocol, so an
    engine without it still is a ``KvsEngine``.
    """

    def set(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        ...

    def get(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None`` when the key is absent."""
        ...

    def remove(self, key: str) -> None:
        """Delete ``key``; ``KeyNotFoundError`` when it is absent."""
        ...

    def close(self) -> None:
        """Flush and release everything; idempotent. Later calls raise ``KvsError``."""
        ...

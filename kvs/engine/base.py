"""The engine interface, and the durability policies every engine accepts."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Literal, Protocol, runtime_checkable

from kvs.engine.transaction import TransactionView
from kvs.engine.values import Key, Value
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
    """A key/value storage engine, safe to share between threads: what the server, the CLI
    and users rely on, and all of it. ``KvStore`` and ``SqliteKvsEngine`` both implement all
    of it, with the same semantics; both are also ``collections.abc.MutableMapping``\\ s
    (``kvs.engine.mapping``).

    Data model (``kvs.engine.values``)
        Keys and values are byte strings up to the engine's size limits, NUL and invalid UTF-8
        included. A ``str`` means its UTF-8 bytes (``"café"`` and ``b"caf\\xc3\\xa9"`` are one
        key); a bytes-like object means its bytes. A value reads back as the type it was
        written with (``str`` or ``bytes``); keys come back from iteration and ``scan`` as the
        type they were last written with. A key or value of another type raises
        ``TypeError``; text that is not valid Unicode, or a key or value over the limits,
        raises ``KvsError``; nothing is stored then.

    Expiry
        Deadlines are absolute Unix times in integer milliseconds; TTLs are seconds (``int``
        or ``float``, millisecond precision). From its deadline on, a key is invisible to
        every read, ``len``, ``in``, iteration and ``scan``; its space comes back through a
        background sweep, compaction and recovery. ``set`` clears a key's expiry; ``update``
        keeps it. Time comes from the engine's ``clock`` (``kvs.engine.clock``).

    Concurrency
        Every method may be called from any thread at any time. A write that returned is
        seen by every read that starts after it. A transaction's writes become visible at
        once: no reader ever sees some of them and not the others. While ``update``'s
        function or a transaction's body runs, its thread may not call the store
        (``KvsError``). Every method of a closed engine raises ``KvsError`` (``close``
        itself excepted).
    """

    name: str
    """The engine's name, as recorded in its data directory and given to ``--engine``
    (a class attribute)."""

    @property
    def fsync(self) -> FsyncPolicy:
        """The durability policy the engine was opened with."""
        ...

    def set(self, key: Key, value: Value, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key``, replacing any previous value and expiry; with
        ``ttl`` (seconds), the key expires that long from now."""
        ...

    def set_many(self, items: Sequence[tuple[Key, Value]]) -> None:
        """``set`` of each ``(key, value)`` pair in order, as one transaction: all pairs are
        checked before anything is stored (a bad one raises as ``set`` would and none is
        stored), become visible at once and survive a crash all or nothing."""
        ...

    def set_batch(self, items: Sequence[tuple[Key, Value]]) -> None:
        """``set`` of each ``(key, value)`` pair in order, as cheaply as the engine can
        store them together (one write, one acknowledgement), checked as ``set_many`` is but
        not necessarily atomic: each pair behaves as its own ``set``. The server uses it for
        runs of pipelined SETs (Redis does not make them atomic either)."""
        ...

    def get(self, key: Key, default: Value | None = None) -> str | bytes | None:
        """The value stored under ``key`` (as the type it was written with), or ``default``
        (None) when the key is absent or expired."""
        ...

    def remove(self, key: Key) -> None:
        """Delete ``key``; ``KeyNotFoundError`` (a ``KeyError`` and a ``KvsError``) when it
        is absent."""
        ...

    def __len__(self) -> int:
        """The number of live, unexpired keys (a snapshot when writers are active), without
        walking the keys."""
        ...

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is present and unexpired."""
        ...

    def __iter__(self) -> Iterator[str | bytes]:
        """Every key, with ``scan``'s guarantee."""
        ...

    def clear(self) -> None:
        """Remove every key, durably, without writing one tombstone per key."""
        ...

    def scan(self, cursor: int = 0, *, match: str | bytes | None = None,
             count: int = 10) -> tuple[int, list[str | bytes]]:
        """One step of a Redis SCAN: ``(next cursor, keys)``; cursor 0 starts and ends a full
        iteration, which returns every key present during the whole iteration at least once
        (keys added or removed meanwhile may or may not appear) and never fails or loops
        under concurrent writes and compactions. ``count`` is a hint of work per call;
        ``match`` a Redis glob over the key's bytes (``kvs.glob``)."""
        ...

    def expire(self, key: Key, ttl: float | None) -> bool:
        """Give ``key`` a TTL of ``ttl`` seconds, or none (``None``: persist); False if the
        key is absent."""
        ...

    def ttl(self, key: Key) -> float | None:
        """Seconds until ``key`` expires, None if it is persistent; ``KeyNotFoundError`` if
        it is absent."""
        ...

    def expire_at(self, key: Key, unix_ms: int | None) -> bool:
        """Set ``key``'s deadline to ``unix_ms`` (a past one expires it at once), or none;
        False if the key is absent."""
        ...

    def expiry(self, key: Key) -> int | None:
        """``key``'s deadline in Unix milliseconds, exactly as set; None if persistent;
        ``KeyNotFoundError`` if absent."""
        ...

    def update(self, key: Key, fn: Callable[[str | bytes | None], object]) -> str | bytes | None:
        """Atomic read-modify-write (``kvs.engine.transaction``): the new value, or None."""
        ...

    def transaction(self, keys: object) -> AbstractContextManager[TransactionView]:
        """A context manager over the declared ``keys`` whose view reads and writes them
        (``kvs.engine.transaction``); its writes commit at once on a normal exit, not at all
        on an exception."""
        ...

    def close(self) -> None:
        """Flush and release everything; idempotent. Later calls raise ``KvsError``."""
        ...

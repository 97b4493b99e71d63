"""What every engine's ``transaction(keys)`` and ``update(key, fn)`` share: the view a
transaction's body works through, and the rules of ``update``'s function.

A transaction is declared over a set of keys. The engine locks those keys for writing
(``KvStore``: their stripe locks, in index order; ``SqliteKvsEngine``: its writer) and hands
the body a :class:`TransactionView`. The view reads the keys' committed state through the
engine (``load``), keeps the body's writes to itself (``staged``, so the body sees its own
writes and nothing is written if it raises) and, on a normal exit, gives them to the engine
in one piece (``commit``). How a commit becomes visible at once and survives a crash all or
nothing is each engine's part (``kvstore.py``, ``sqlite.py``).

``update(key, fn)`` is a transaction over one key: ``fn(old)`` gets the current value or None
and returns the new value, or None to remove the key; returning ``old`` itself writes
nothing; an exception from ``fn`` writes nothing and propagates; the key keeps its expiry.
While ``fn`` or a transaction's body runs, the thread may not call the store itself
(``callbacks.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol

from kvs.engine.clock import Clock
from kvs.engine.values import (
    check_deadline,
    index_key,
    key_bytes,
    remaining_seconds,
    ttl_deadline,
    value_bytes,
)
from kvs.errors import KeyNotFoundError, KvsError

ValueType = str | bytes


class Current(NamedTuple):
    """A key's committed state, as an engine's ``load`` gives it to a view."""

    value: ValueType
    deadline: int | None
    key_is_bytes: bool


class Staged(NamedTuple):
    """One key's write held by a transaction until it commits. ``value`` None: removed."""

    key: bytes
    key_is_bytes: bool
    value: ValueType | None
    value_bytes: bytes
    deadline: int | None


class TransactionHost(Protocol):
    """What a :class:`TransactionView` needs of its engine."""

    def _tx_load(self, ikey: str) -> Current | None:
        """The committed state of the key (expired or not), under the transaction's locks."""
        ...


def declare(keys: Iterable[object], max_key: int) -> dict[str, tuple[bytes, bool]]:
    """The declared keys of a transaction by index key: ``(bytes, given as bytes)``. Every key
    is checked (``TypeError``/``KvsError`` as ``set`` would); a lone ``str`` or bytes is one
    key, not an iterable of characters."""
    if isinstance(keys, str | bytes | bytearray | memoryview):
        keys = [keys]
    try:
        keys = list(keys)
    except TypeError:
        raise TypeError(f"transaction needs a key or an iterable of keys, not {type(keys).__name__}") from None
    declared: dict[str, tuple[bytes, bool]] = {}
    for key in keys:
        kb, is_bytes = key_bytes(key, max_key)
        declared[index_key(kb, is_bytes, key)] = (kb, is_bytes)
    return declared


def pairs(items: object) -> list[tuple[object, object]]:
    """``set_many``'s argument as a list of ``(key, value)`` pairs; ``TypeError`` saying what
    is wrong with it otherwise (before anything is checked or written)."""
    try:
        listed: list[tuple[object, object]] = list(items)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"set_many needs an iterable of (key, value) pairs, not {type(items).__name__}") from None
    for n, item in enumerate(listed):
        if not isinstance(item, tuple | list) or len(item) != 2:
            what = type(item).__name__
            if isinstance(item, tuple | list):
                what = f"a {len(item)}-item {what}"
            raise TypeError(f"set_many needs (key, value) pairs; item {n} is {what}")
    return listed


def apply_update(fn: Callable[[ValueType | None], object], old: ValueType | None) -> object:
    """Run ``update``'s function: its result, checked only by the caller."""
    if not callable(fn):
        raise TypeError(f"update needs a function of the old value, not {type(fn).__name__}")
    return fn(old)


class TransactionView:
    """The body's view of a transaction: ``get``, ``set`` (with ``ttl``), ``remove``,
    ``update``, ``expire``, ``expire_at``, ``ttl``, ``expiry``, ``in`` and ``[]`` over the
    declared keys, seeing its own writes. Any other key raises ``KvsError``. Used by the
    thread that opened the transaction only, and only inside the ``with`` block."""

    def __init__(self, host: TransactionHost, declared: dict[str, tuple[bytes, bool]], clock: Clock,
                 max_key: int, max_value: int) -> None:
        self._host = host
        self._declared = declared
        self._clock = clock
        self._max_key = max_key
        self._max_value = max_value
        self.staged: dict[str, Staged] = {}
        self._open = True

    # ------------------------------------------------------------------ helpers
    def _ikey(self, key: object) -> tuple[str, bytes, bool]:
        if not self._open:
            raise KvsError("the transaction is over")
        kb, is_bytes = key_bytes(key, self._max_key)
        ikey = index_key(kb, is_bytes, key)
        if ikey not in self._declared:
            raise KvsError(f"key {key!r} is not declared in this transaction")
        return ikey, kb, is_bytes

    def _current(self, ikey: str) -> Current | None:
        """The key's state as the body sees it, expired keys being absent."""
        staged = self.staged.get(ikey)
        if staged is not None:
            if staged.value is None:
                return None
            cur = Current(staged.value, staged.deadline, staged.key_is_bytes)
        else:
            found = self._host._tx_load(ikey)
            if found is None:
                return None
            cur = found
        if cur.deadline is not None and cur.deadline <= self._clock():
            return None
        return cur

    def _stage(self, ikey: str, kb: bytes, key_is_bytes: bool, value: ValueType | None, vb: bytes,
               deadline: int | None) -> None:
        self.staged[ikey] = Staged(kb, key_is_bytes, value, vb, deadline)

    def _stage_value(self, ikey: str, kb: bytes, key_is_bytes: bool, value: object, deadline: int | None) -> ValueType:
        vb, value_is_bytes = value_bytes(value, self._max_value)
        typed: ValueType = vb if value_is_bytes else value if type(value) is str else vb.decode()
        self._stage(ikey, kb, key_is_bytes, typed, vb, deadline)
        return typed

    # ------------------------------------------------------------------ the view
    def get(self, key: object) -> ValueType | None:
        ikey, _kb, _b = self._ikey(key)
        cur = self._current(ikey)
        return None if cur is None else cur.value

    def __getitem__(self, key: object) -> ValueType:
        value = self.get(key)
        if value is None:
            raise KeyNotFoundError(key if isinstance(key, str) else None)
        return value

    def __contains__(self, key: object) -> bool:
        return self.get(key) is not None

    def set(self, key: object, value: object, *, ttl: float | None = None) -> None:
        ikey, kb, key_is_bytes = self._ikey(key)
        deadline = ttl_deadline(ttl, self._clock())
        self._stage_value(ikey, kb, key_is_bytes, value, deadline)

    def __setitem__(self, key: object, value: object) -> None:
        self.set(key, value)

    def remove(self, key: object) -> None:
        ikey, kb, key_is_bytes = self._ikey(key)
        if self._current(ikey) is None:
            raise KeyNotFoundError(key if isinstance(key, str) else None)
        self._stage(ikey, kb, key_is_bytes, None, b"", None)

    def __delitem__(self, key: object) -> None:
        self.remove(key)

    def update(self, key: object, fn: Callable[[ValueType | None], object]) -> ValueType | None:
        """As ``store.update`` (module docstring), inside the transaction."""
        ikey, kb, key_is_bytes = self._ikey(key)
        cur = self._current(ikey)
        old = None if cur is None else cur.value
        new = apply_update(fn, old)
        if new is old:
            return old
        if new is None:
            if cur is not None:
                self._stage(ikey, kb, key_is_bytes, None, b"", None)
            return None
        return self._stage_value(ikey, kb, key_is_bytes, new, None if cur is None else cur.deadline)

    def expire_at(self, key: object, unix_ms: int | None) -> bool:
        ikey, kb, _given_as_bytes = self._ikey(key)
        deadline = check_deadline(unix_ms)
        cur = self._current(ikey)
        if cur is None:
            return False
        vb = cur.value if isinstance(cur.value, bytes) else cur.value.encode()
        if deadline is not None and deadline <= self._clock():
            self._stage(ikey, kb, cur.key_is_bytes, None, b"", None)  # Redis: a past deadline deletes
        else:
            self._stage(ikey, kb, cur.key_is_bytes, cur.value, vb, deadline)
        return True

    def expire(self, key: object, ttl: float | None) -> bool:
        return self.expire_at(key, ttl_deadline(ttl, self._clock()))

    def expiry(self, key: object) -> int | None:
        ikey, _kb, _b = self._ikey(key)
        cur = self._current(ikey)
        if cur is None:
            raise KeyNotFoundError(key if isinstance(key, str) else None)
        return cur.deadline

    def ttl(self, key: object) -> float | None:
        return remaining_seconds(self.expiry(key), self._clock())

    def close(self) -> None:
        """The body is over: later calls raise."""
        self._open = False

"""The mapping protocol of every engine: ``collections.abc.MutableMapping`` on top of the
engine's own ``get``, ``set``, ``remove``, ``scan``, ``transaction``, ``__contains__``, ``__len__``
and ``clear``.

``store[k]`` is ``get`` raising ``KeyError`` (a ``KeyNotFoundError``) for an absent key;
``store[k] = v`` is ``set``; ``del store[k]`` is ``remove``. Iteration is a full ``scan``
(from cursor 0 back to 0), so it has SCAN's guarantee and never fails under concurrent
writes: every key present during the whole iteration is yielded at least once; keys added or
removed meanwhile may or may not be. ``items()`` and ``values()`` read each key as they go
and skip a key removed in between instead of raising.

Two things differ from a ``dict`` on purpose:

- ``update(key, fn)`` is the engines' atomic read-modify-write, not ``MutableMapping.update``
  (which would be a loop of ``set``s; ``set_many`` is the engines' batch write);
- equality and hashing are by identity: an engine is a handle on a data directory, and two
  handles are not "equal" because their contents happen to be.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, MutableMapping, ValuesView
from typing import TYPE_CHECKING, Any

from kvs.errors import KeyNotFoundError

_MISSING: Any = object()

ITER_BATCH = 512
"""Keys asked of each ``scan`` call by iteration."""


class EngineMapping(MutableMapping[Any, Any]):
    """The ``MutableMapping`` part of an engine (module docstring). The engine defines
    ``get``, ``set``, ``remove``, ``scan``, ``__contains__``, ``__len__`` and ``clear``."""

    __slots__ = ()

    if TYPE_CHECKING:
        def set(self, key: Any, value: Any, *, ttl: float | None = None) -> None: ...
        def remove(self, key: Any) -> None: ...
        def transaction(self, keys: Any) -> Any: ...
        def scan(self, cursor: int = 0, *, match: str | bytes | None = None,
                 count: int = 10) -> tuple[int, list[Any]]: ...

    def __getitem__(self, key: Any) -> Any:
        value = self.get(key)
        if value is None:
            raise KeyNotFoundError(key if isinstance(key, str) else None)
        return value

    def __setitem__(self, key: Any, value: Any) -> None:
        self.set(key, value)

    def __delitem__(self, key: Any) -> None:
        self.remove(key)

    def __iter__(self) -> Iterator[Any]:
        cursor = 0
        while True:
            cursor, keys = self.scan(cursor, count=ITER_BATCH)
            yield from keys
            if cursor == 0:
                return

    def pop(self, key: Any, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value, atomically (one transaction over the key: a
        concurrent writer or the key's expiry cannot come between the read and the removal,
        as it could in ``MutableMapping.pop``); ``default``, or ``KeyError``, when absent."""
        with self.transaction([key]) as tx:
            value = tx.get(key)
            if value is not None:
                try:
                    tx.remove(key)
                except KeyNotFoundError:  # its deadline passed between the two: it was absent
                    value = None
        if value is None:
            if default is _MISSING:
                raise KeyNotFoundError(key if isinstance(key, str) else None)
            return default
        return value

    def keys(self) -> KeysView[Any]:
        return KeysView(self)

    def items(self) -> ItemsView[Any, Any]:
        return _LiveItems(self)

    def values(self) -> ValuesView[Any]:
        return _LiveValues(self)

    def __eq__(self, other: object) -> bool:
        return self is other

    def __ne__(self, other: object) -> bool:
        return self is not other

    __hash__ = object.__hash__


class _LiveItems(ItemsView[Any, Any]):
    """``items()`` that skips a key removed between the scan and the read."""

    def __init__(self, store: EngineMapping) -> None:
        super().__init__(store)
        self._store = store

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        store = self._store
        for key in store:
            value = store.get(key)
            if value is not None:
                yield key, value


class _LiveValues(ValuesView[Any]):
    """``values()`` that skips a key removed between the scan and the read."""

    def __init__(self, store: EngineMapping) -> None:
        super().__init__(store)
        self._store = store

    def __iter__(self) -> Iterator[Any]:
        store = self._store
        for key in store:
            value = store.get(key)
            if value is not None:
                yield value

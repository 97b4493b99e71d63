"""Expiry of ``KvStore``: deadlines, the sweep that gives expired keys' space back, and the
TTL methods.

Where a deadline is
    In the key's SET record (its ``deadline`` field: what survives a restart and what
    ``get`` checks, reading the record it returns the value of), and, for the other readers
    and the sweep, in ``_expires[i]`` (stripe ``i``'s keys with a deadline -> the deadline)
    and ``_deadlines[i]`` (a heap of ``(deadline, key)``, possibly holding stale entries for
    keys whose deadline changed or that were removed: an entry counts only while
    ``_expires[i][key]`` still equals its deadline). All three change only under stripe
    ``i``'s lock, the index entry last (its ``EXPIRES`` flag, a negative position, says that ``_expires`` holds the
    key), so a reader that sees the flag finds the deadline.

Invisible at once, removed over time
    A read checks the deadline on access, so no reader ever sees an expired value. The key's
    index entry goes when: the background sweep (every ``expire_sweep_interval`` seconds,
    Redis's active expire cycle) or ``len`` pops the due heap entries; a ``remove`` meets it;
    compaction finds its record expired; or the next open replays it (``recovery.py``).
    Removing an expired key writes nothing: its record carries the deadline, so no replay
    can bring it back, and compaction drops the record. ``len`` purges first, so it counts
    live keys while walking only the expired ones.
"""

from __future__ import annotations

import array
import contextlib
import heapq
import logging
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from kvs.engine import positions
from kvs.engine.callbacks import CallbackGuard
from kvs.engine.clock import Clock
from kvs.engine.segment_log import LIVE
from kvs.engine.values import check_deadline, index_key, key_bytes, remaining_seconds, ttl_deadline
from kvs.errors import KeyNotFoundError, KvsError
from kvs.freethreading import mark_shared, share_module_globals

if TYPE_CHECKING:
    from kvs.engine.transaction import TransactionView

log = logging.getLogger("kvs.engine.kvstore")  # the engine's one logger, whatever module logs

SWEEP_BATCH = 256
"""Expired keys one sweep removes from a stripe before it lets writers of that stripe in."""


class Expiry:
    """The expiry part of ``KvStore`` (a mixin: ``kvstore.py`` composes the parts). Owns
    ``_clock``, ``_sweep_interval``, ``_expires`` and ``_deadlines``."""

    # Owned by the other parts of KvStore:
    path: Path
    _mask: int
    _max_key: int
    _stripes: list[dict[str, int]]
    _stripe_locks: list[threading.Lock]
    _append_lock: threading.Lock
    _sizes: array.array[int]
    _stopping: threading.Event
    _stale_mark: float
    _guard: CallbackGuard
    _callers: dict[int, int]

    if TYPE_CHECKING:
        def _check_open(self) -> None: ...
        def _maybe_want_compaction(self) -> None: ...
        def transaction(self, keys: Iterable[object] | object
                        ) -> contextlib.AbstractContextManager[TransactionView]: ...

    def _init_expiry(self, clock: Clock, sweep_interval: float) -> None:
        stripes = self._mask + 1
        self._clock = clock
        self._sweep_interval = sweep_interval
        self._expires: list[dict[str, int]] = [{} for _ in range(stripes)]
        for expires in self._expires:
            mark_shared(expires)
        mark_shared(self._expires)
        self._deadlines: list[list[tuple[int, str]]] = [[] for _ in range(stripes)]

    # ------------------------------------------------------------------ bookkeeping (under stripe i's lock)
    def _note_deadline(self, i: int, ikey: str, deadline: int) -> None:
        """``ikey`` (the index's own key object) has ``deadline`` from now on."""
        mark_shared(deadline)
        self._expires[i][ikey] = deadline
        heap = self._deadlines[i]
        entry = (deadline, ikey)
        heapq.heappush(heap, entry)
        if len(heap) > 64 + 2 * len(self._expires[i]):  # mostly stale entries: rebuild
            heap[:] = [(d, k) for k, d in self._expires[i].items()]
            heapq.heapify(heap)

    def _forget_deadline(self, i: int, ikey: str) -> None:
        """``ikey`` has no deadline any more (its heap entry goes stale)."""
        self._expires[i].pop(ikey, None)

    def _expire_key(self, i: int, ikey: str) -> int:
        """Remove the expired key ``ikey`` from the index; the bytes of its record."""
        pos = self._stripes[i].pop(ikey)
        del self._expires[i][ikey]
        return positions.length(pos)

    def _clear_expiry(self) -> None:
        """Forget every deadline (``clear``, holding every stripe lock)."""
        for expires, heap in zip(self._expires, self._deadlines, strict=True):
            expires.clear()
            heap.clear()

    # ------------------------------------------------------------------ the sweep
    def _purge_stripe(self, i: int, now: int, limit: int) -> tuple[int, int]:
        """Remove up to ``limit`` keys of stripe ``i`` whose deadline is at or before
        ``now``: ``(keys removed, bytes freed)``. Caller holds stripe ``i``'s lock."""
        heap = self._deadlines[i]
        expires = self._expires[i]
        removed = freed = 0
        while heap and heap[0][0] <= now and removed < limit:
            deadline, ikey = heapq.heappop(heap)
            if expires.get(ikey) == deadline:
                freed += self._expire_key(i, ikey)
                removed += 1
        return removed, freed

    def _purge_due(self, limit: int = 1 << 62) -> int:
        """Remove every key whose deadline has passed (at most ``limit`` per stripe); how
        many. Looks at each stripe's heap top without its lock (a hint: the lock is taken
        only for a stripe that has something due)."""
        now = self._clock()
        removed = freed = 0
        for i, heap in enumerate(self._deadlines):
            try:
                due = heap[0][0] <= now
            except IndexError:
                continue
            if due:
                with self._stripe_locks[i]:
                    n, b = self._purge_stripe(i, now, limit)
                removed += n
                freed += b
        if freed:
            with self._append_lock:
                self._sizes[LIVE] -= freed
                if self._sizes[0] - self._sizes[LIVE] >= self._stale_mark:
                    self._maybe_want_compaction()
        return removed

    def purge_expired(self) -> int:
        """Remove every key whose deadline has passed now; how many were removed (what the
        background sweep does; for tests and tools)."""
        self._check_open()
        if self._callers:
            self._guard.check()
        return self._purge_due()

    def _sweeper(self) -> None:
        """The background sweep thread: every ``expire_sweep_interval`` seconds, remove the
        due keys, a bounded batch per stripe at a time."""
        while not self._stopping.wait(self._sweep_interval):
            try:
                while self._purge_due(SWEEP_BATCH) and not self._stopping.is_set():
                    pass
            except KvsError as exc:
                log.error("%s: expiry sweep failed: %s", self.path, exc)
            except Exception:
                log.exception("%s: expiry sweep failed", self.path)

    # ------------------------------------------------------------------ public API
    def _deadline_of(self, key: object, now: int | None = None) -> int | None:
        """The deadline of a present, unexpired ``key`` (None: persistent);
        ``KeyNotFoundError`` when absent or expired at ``now`` (default: the clock). Under the
        key's stripe lock, so never a transaction's pending entry."""
        self._check_open()
        if self._callers:
            self._guard.check()
        kb, is_bytes = key_bytes(key, self._max_key)
        ikey = index_key(kb, is_bytes, key)
        i = hash(ikey) & self._mask
        with self._stripe_locks[i]:
            pos = self._stripes[i].get(ikey)
            if pos is None:
                raise KeyNotFoundError(key)
            if pos >= 0:  # no EXPIRES flag
                return None
            deadline = self._expires[i][ikey]
        if deadline <= (self._clock() if now is None else now):
            raise KeyNotFoundError(key)
        return deadline

    def expiry(self, key: object) -> int | None:
        """``key``'s deadline in Unix milliseconds, exactly as set; None if it is persistent;
        ``KeyNotFoundError`` if it is absent."""
        return self._deadline_of(key)

    def ttl(self, key: object) -> float | None:
        """Seconds until ``key`` expires; None if it is persistent; ``KeyNotFoundError`` if it
        is absent."""
        now = self._clock()  # one reading: a key judged live has a positive ttl
        return remaining_seconds(self._deadline_of(key, now), now)

    def expire_at(self, key: object, unix_ms: int | None) -> bool:
        """Give ``key`` the deadline ``unix_ms`` (a past one removes it at once, as Redis's
        PEXPIREAT), or none; False if the key is absent. Rewrites the key's record with the
        new deadline (a transaction over the key), so the deadline is as durable as a
        ``set``."""
        deadline = check_deadline(unix_ms)
        with self.transaction([key]) as tx:
            return tx.expire_at(key, deadline)

    def expire(self, key: object, ttl: float | None) -> bool:
        """Give ``key`` a TTL of ``ttl`` seconds, or none (``None``: persist); False if the
        key is absent."""
        return self.expire_at(key, ttl_deadline(ttl, self._clock()))


share_module_globals(globals())

"""``scan`` of ``KvStore``: Redis's SCAN over the striped index, and its guarantee.

The order
    Stripe by stripe (stripe ``i`` holds the keys with ``hash(key) & mask == i``), and within
    a stripe by ``v(key) = (hash(key) & (2**63 - 1)) >> b``, ``b`` being the stripe bits. A
    cursor is ``v << b | i``: "stripe ``i``, keys with ``v >= v``"; it is below ``2**63``, so
    Redis clients that keep cursors in 64 bits take it. Cursor 0 starts (and ends) a full
    iteration. A call returns the keys of whole groups of equal ``v`` (so a cursor never falls
    between two keys with the same ``v``), stopping once it has looked at about ``count``
    keys; a stripe that has nothing left moves the cursor to the next stripe.

Snapshots
    Sorting a stripe by ``v`` for every call would cost a sort per call; so each stripe's
    sorted key list is kept (:class:`StripeSnapshot`, a few of them, most recently used) and
    reused while it is *complete*: no key has been added to the stripe since it was taken.
    That is checked in O(1): dicts keep insertion order and a newly added key is always a new
    object (every writer stores its own copy of a new key, ``kvstore.py``), so the stripe's
    last key is the same object as at the snapshot exactly when nothing was added since (a
    removal may change it too, which only costs a new snapshot). Keys removed since are
    skipped by looking them up.

The guarantee (Redis's)
    A key present during the whole iteration is in every complete snapshot of its stripe
    taken or validated during the iteration, and the calls that cover its stripe cover every
    ``v`` from 0 up, in order, without gaps: so it is returned. It is returned once (a
    cursor only moves forward), unless it is removed and added back. Keys added or removed
    meanwhile may or may not appear. Nothing here takes a lock that a reader waits for or
    holds one for longer than copying a stripe's keys; concurrent writes and compactions
    never make a call fail, and every call moves the cursor forward, so an iteration ends.
"""

from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from kvs.engine import positions
from kvs.engine.callbacks import CallbackGuard
from kvs.engine.clock import Clock
from kvs.errors import KvsError
from kvs.freethreading import share_module_globals
from kvs.glob import compile_glob

if TYPE_CHECKING:
    from kvs.engine.transactions import Pending

SNAPSHOTS = 16
"""Stripe snapshots kept (concurrent iterations each need about one)."""
_HASH_MASK = (1 << 63) - 1
_flags = positions.flags
_KEY_BYTES = positions.KEY_BYTES
_MAX_CURSOR = 1 << 64


class StripeSnapshot:
    """One stripe's keys sorted by ``v`` (``vs[j]`` is ``v(keys[j])``), and the stripe's
    last key when it was taken (module docstring)."""

    __slots__ = ("last", "vs", "keys")

    def __init__(self, last: str | None, vs: list[int], keys: list[str]) -> None:
        self.last = last
        self.vs = vs
        self.keys = keys


class Scanning:
    """The scan part of ``KvStore`` (a mixin: ``kvstore.py`` composes the parts). Owns
    ``_snapshots`` (under ``_snapshots_lock``)."""

    # Owned by the other parts of KvStore:
    _mask: int
    _stripes: list[dict[str, int]]
    _stripe_locks: list[threading.Lock]
    _expires: list[dict[str, int]]
    _clock: Clock
    _guard: CallbackGuard
    _callers: dict[int, int]

    if TYPE_CHECKING:
        def _check_open(self) -> None: ...

    def _init_scanning(self) -> None:
        self._snapshots: OrderedDict[int, StripeSnapshot] = OrderedDict()
        self._snapshots_lock = threading.Lock()
        self._stripe_bits = self._mask.bit_length()

    def _clear_scan_snapshots(self) -> None:
        with self._snapshots_lock:
            self._snapshots.clear()

    def _snapshot(self, i: int) -> StripeSnapshot:
        """A complete snapshot of stripe ``i`` (module docstring)."""
        stripe = self._stripes[i]
        with self._stripe_locks[i]:
            last = next(reversed(stripe), None)
            with self._snapshots_lock:
                snap = self._snapshots.get(i)
                if snap is not None and snap.last is last and (last is not None or not stripe):
                    self._snapshots.move_to_end(i)
                    return snap
            keys = list(stripe)
        b = self._stripe_bits
        pairs = sorted(((hash(k) & _HASH_MASK) >> b, k) for k in keys)
        snap = StripeSnapshot(last, [v for v, _k in pairs], [k for _v, k in pairs])
        with self._snapshots_lock:
            self._snapshots[i] = snap
            self._snapshots.move_to_end(i)
            while len(self._snapshots) > SNAPSHOTS:
                self._snapshots.popitem(last=False)
        return snap

    def scan(self, cursor: int = 0, *, match: str | bytes | None = None, count: int = 10) -> tuple[int, list[Any]]:
        """One step of a Redis SCAN (module docstring): ``(next cursor, keys)``, the keys as
        the type they were written with, expired ones left out. ``count``: about how many
        keys to look at; ``match``: a Redis glob over the key's bytes (``kvs.glob``)."""
        if isinstance(cursor, bool) or not isinstance(cursor, int) or not 0 <= cursor < _MAX_CURSOR:
            raise KvsError(f"cursor must be an int from 0 to 2**64 - 1, not {cursor!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise KvsError(f"count must be a positive int, not {count!r}")
        matches = None if match is None else compile_glob(match)
        self._check_open()
        if self._callers:
            self._guard.check()
        b = self._stripe_bits
        mask = self._mask
        stripes = len(self._stripes)
        i = cursor & mask
        v_from = cursor >> b
        if i >= stripes:
            raise KvsError(f"invalid cursor {cursor}")
        now = self._clock()
        out: list[Any] = []
        looked = 0
        while True:
            snap = self._snapshot(i)
            j = bisect.bisect_left(snap.vs, v_from)
            n = len(snap.vs)
            stripe = self._stripes[i]
            expires = self._expires[i]
            while j < n and (looked < count or snap.vs[j] == snap.vs[j - 1]):
                ikey = snap.keys[j]
                j += 1
                looked += 1
                try:
                    pos: int | Pending | None = stripe[ikey]
                except KeyError:
                    continue
                if type(pos) is not int:
                    pos = pos.resolve()  # type: ignore[union-attr]
                    if pos is None:
                        continue
                if pos < 0:  # positions.EXPIRES
                    deadline = expires.get(ikey)
                    if deadline is None:  # being expired or rewritten: ask under the stripe lock
                        with self._stripe_locks[i]:
                            if stripe.get(ikey) is None:
                                continue
                            deadline = expires.get(ikey)
                    if deadline is not None and deadline <= now:
                        continue
                key: str | bytes = ikey.encode("utf-8", "surrogateescape") if _flags(pos) & _KEY_BYTES else ikey
                if matches is not None and not matches(key if type(key) is bytes else ikey.encode()):
                    continue
                out.append(key)
            if j < n:
                return snap.vs[j] << b | i, out
            i += 1
            v_from = 0
            looked += 1  # an empty stripe is work too: a call over many ends
            if i == stripes:
                return 0, out
            if looked >= count:
                return i, out


share_module_globals(globals())

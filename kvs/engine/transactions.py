"""Transactions of ``KvStore``: ``transaction(keys)``, ``update``, ``set_many``, and how a
transaction's writes become visible at once to readers that take no lock.

Locking
    A transaction declares its keys; it takes their stripe locks in index order (so two
    transactions never deadlock) and holds them from its first read to its last index
    store. Every writer of those keys holds the same locks around "append, then store the
    position", so a transaction is serialized with every other write of its keys. The body
    reads and writes through a ``TransactionView`` (``transaction.py``), which stages the
    writes; an exception in the body writes nothing.

All or nothing after a crash
    A commit of more than one record appends them as one TXN record (``record.py``) whose
    checksum covers them all: a torn TXN fails as a whole and recovery cuts it, so after a
    crash a transaction is entirely there or entirely absent. One record needs no frame.

At once for lock-free readers: the happens-before argument
    ``get`` takes no lock, and a transaction stores one index entry per key, so the stores
    cannot be one atomic step. Instead each key's entry first becomes a :class:`Pending`
    that knows the key's old and new position and shares one commit flag (``commit``, a
    one-item list) with the transaction's other entries:

    1. (under the stripe locks) for every key: ``index[key] = Pending(old, new, commit)``;
    2. ``commit[0] = True`` -- the one store that makes the whole transaction visible;
    3. for every key: ``index[key] = new`` (or delete it), replacing the Pending.

    A reader that loads a ``Pending`` resolves it by reading ``commit[0]``: the old position
    while False, the new one once True. Claim: a reader that sees any new value of
    the transaction, then reads another of its keys, sees that key's new value (or a later
    one). Proof: seeing a new value means the reader loaded either a final entry (stored in
    step 3) or a Pending whose flag is True; either way the store of step 2 happened before
    its load (program order in the writer, then the reader's load of what followed it). Every
    Pending store of step 1 precedes step 2 in the writer, so when the reader then loads the
    other key's entry it finds that key's Pending (which resolves to new: the flag is True)
    or the final entry of step 3, or something a later writer stored. The orders used are
    those CPython gives free-threaded code (``docs/free-threading.md``, section 3): a dict
    store and a list item store each run inside the object's critical section, whose release
    is a sequentially consistent compare-and-swap, a full fence; the lock-free dict lookup
    and list item load are atomic loads, so a reader's later load never sees an older state
    than an earlier one showed. A reader that resolves to the old position
    reads a record that the index still owns: compaction looks at a Pending entry again
    under its stripe lock, i.e. after step 3 (``compaction.py``), and the grace period keeps
    the old segment open for any reader that loaded the position before it was retired.

    A ``Pending`` is an ``int`` whose value is -1: negative like a position with the
    ``EXPIRES`` flag (``positions.py``), so ``get`` takes its slow path for it with no extra
    test on the fast path.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from kvs.engine import positions, record
from kvs.engine.callbacks import CallbackGuard
from kvs.engine.clock import Clock
from kvs.engine.segment_log import Segment
from kvs.engine.transaction import Current, Staged, TransactionView, declare, pairs
from kvs.engine.values import index_key, key_bytes, value_bytes
from kvs.errors import KvsError
from kvs.freethreading import mark_shared, mark_shared_str, share_module_globals


class Pending(int):
    """The index entry of a key while its transaction is being published: resolves to
    ``old`` until the transaction's commit flag ``commit[0]`` is True, to ``new`` after
    (either may be None: the key absent). Its ``int`` value is -1 (negative: readers' slow
    path)."""

    old: int | None
    new: int | None
    commit: list[bool]

    def __new__(cls, old: int | None, new: int | None, commit: list[bool]) -> Pending:
        self = super().__new__(cls, -1)
        self.old = old
        self.new = new
        self.commit = commit
        return self

    def resolve(self) -> int | None:
        """The position readers use now."""
        return self.new if self.commit[0] else self.old


class Transactions:
    """The transaction part of ``KvStore`` (a mixin: ``kvstore.py`` composes the parts)."""

    # Owned by the other parts of KvStore:
    _mask: int
    _max_key: int
    _max_value: int
    _stripes: list[dict[str, int]]
    _stripe_locks: list[threading.Lock]
    _clock: Clock
    _guard: CallbackGuard
    _callers: dict[int, int]
    _fsync_always: bool

    if TYPE_CHECKING:
        def _check_open(self) -> None: ...
        def _append(self, rec: bytes, n: int, live_delta: int) -> tuple[Segment, int]: ...
        def _group_commit(self, seg: Segment, end: int) -> None: ...
        def _note_deadline(self, i: int, ikey: str, deadline: int) -> None: ...
        def _forget_deadline(self, i: int, ikey: str) -> None: ...
        def _read_current(self, ikey: str, kb: bytes,
                          stripe: dict[str, int]) -> tuple[str | bytes, int | None] | None: ...

    def _init_transactions(self) -> None:
        pass

    # ------------------------------------------------------------------ the public API
    def transaction(self, keys: Iterable[object] | object) -> contextlib.AbstractContextManager[TransactionView]:
        """Lock ``keys`` for writing and give the body a view of them; on a normal exit the
        staged writes commit at once (module docstring), on an exception nothing is
        written. Keys are checked first (``TypeError``/``KvsError`` as ``set`` would)."""
        return self._transaction(keys)

    @contextlib.contextmanager
    def _transaction(self, keys: Iterable[object] | object) -> Iterator[TransactionView]:
        if self._callers:
            self._guard.check()
        self._check_open()
        declared = declare(keys, self._max_key)  # type: ignore[arg-type]
        mask = self._mask
        locks = [self._stripe_locks[i] for i in sorted({hash(k) & mask for k in declared})]
        for lock in locks:
            lock.acquire()
        try:
            view = TransactionView(self, declared, self._clock, self._max_key, self._max_value)
            with self._guard.calling_back():
                try:
                    yield view
                finally:
                    view.close()
            if view.staged:
                self._commit(view.staged)
        finally:
            for lock in reversed(locks):
                lock.release()

    def update(self, key: object, fn: Callable[[str | bytes | None], object]) -> Any:
        """Atomic read-modify-write of ``key`` (``kvs.engine.transaction``): ``fn(old)`` ->
        the new value (None removes the key; ``old`` itself writes nothing); the key keeps
        its expiry. Concurrent updates of one key run one at a time."""
        with self.transaction([key]) as tx:
            return tx.update(key, fn)

    def set_many(self, items: Sequence[tuple[object, object]]) -> None:
        """``set`` of each ``(key, value)`` pair in order, as one transaction: every pair is
        checked before anything is written, the writes become visible at once and survive a
        crash all or nothing (one TXN record). A key given twice keeps its last value. The
        server uses it for runs of pipelined SETs."""
        if self._callers:
            self._guard.check()
        items = pairs(items)
        if len(items) == 1:
            key, value = items[0]
            self.set(key, value)  # type: ignore[attr-defined]
            return
        max_key, max_value = self._max_key, self._max_value
        staged: dict[str, Staged] = {}
        for key, value in items:
            kb, key_is_bytes = key_bytes(key, max_key)
            vb, value_is_bytes = value_bytes(value, max_value)
            ikey = index_key(kb, key_is_bytes, key)
            staged.pop(ikey, None)  # a repeated key: the last pair wins, in the last place
            staged[ikey] = Staged(kb, key_is_bytes, vb if value_is_bytes else str(value), vb, None)
        if not staged:
            self._check_open()
            return
        mask = self._mask
        locks = [self._stripe_locks[i] for i in sorted({hash(k) & mask for k in staged})]
        for lock in locks:
            lock.acquire()
        try:
            self._commit(staged)
        finally:
            for lock in reversed(locks):
                lock.release()

    # ------------------------------------------------------------------ the view's engine side
    def _tx_load(self, ikey: str) -> Current | None:
        """The committed state of ``ikey`` for a transaction's view (its stripe lock is
        held, so the entry is never a Pending)."""
        stripe = self._stripes[hash(ikey) & self._mask]
        pos = stripe.get(ikey)
        if pos is None:
            return None
        found = self._read_current(ikey, ikey.encode("utf-8", "surrogateescape"), stripe)
        if found is None:
            return None
        value, deadline = found
        return Current(value, deadline, bool(positions.flags(pos) & positions.KEY_BYTES))

    def _commit(self, staged: dict[str, Staged]) -> None:
        """Append the records of ``staged`` (one TXN record when more than one) and publish
        their positions (module docstring). Caller holds the stripe locks of every key."""
        stripes = self._stripes
        mask = self._mask
        writes: list[tuple[str, int, Staged, bytes, int | None]] = []  # ikey, stripe, staged, record, old
        live_delta = 0
        for ikey, st in staged.items():
            i = hash(ikey) & mask
            old = stripes[i].get(ikey)
            if st.value is None:
                if old is None:
                    continue  # removing what is not there (expired meanwhile, or set then removed)
                rec = record.encode_tombstone(st.key)
            else:
                flags = ((record.F_KEY_BYTES if st.key_is_bytes else 0)
                         | (record.F_VALUE_BYTES if type(st.value) is bytes else 0))
                rec = record.encode_set(st.key, st.value_bytes, flags, st.deadline)
                live_delta += len(rec)
            if old is not None:
                live_delta -= positions.length(old)
            writes.append((ikey, i, st, rec, old))
        if not writes:
            self._check_open()
            return
        if len(writes) == 1:
            blob = writes[0][3]
            first = 0
        else:
            blob = record.encode_txn([w[3] for w in writes])
            first = record.TXN_PREFIX
            if len(blob) > positions.MAX_RECORD_LENGTH:
                raise KvsError(f"a transaction of {len(blob)} bytes is over the limit of "
                               f"{positions.MAX_RECORD_LENGTH} bytes")
        seg, base = self._append(blob, len(blob), live_delta)
        fd = seg.fd
        offset = base + first
        final: list[tuple[str, int, int | None, int | None]] = []  # ikey, stripe, new position, old
        for ikey, i, st, rec, old in writes:
            n = len(rec)
            if st.value is None:
                new = None
            else:
                pflags = ((positions.KEY_BYTES if st.key_is_bytes else 0)
                          | (positions.EXPIRES if st.deadline is not None else 0))
                new = positions.pack(fd, offset, n, pflags)
                mark_shared(new)
            offset += n
            if old is None:
                ikey = ikey.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
                mark_shared_str(ikey)
            if old is not None and old < 0:  # positions.EXPIRES
                self._forget_deadline(i, ikey)
            if st.value is not None and st.deadline is not None:
                self._note_deadline(i, ikey, st.deadline)
            final.append((ikey, i, new, old))
        if len(final) == 1:
            ikey, i, new, _old = final[0]
            if new is None:
                del stripes[i][ikey]
            else:
                stripes[i][ikey] = new
        else:
            commit = [False]
            mark_shared(commit)
            for ikey, i, new, old in final:  # step 1
                pending = Pending(old, new, commit)
                mark_shared(pending)
                mark_shared(pending.__dict__)
                stripes[i][ikey] = pending
            commit[0] = True  # step 2
            for ikey, i, new, _old in final:  # step 3
                if new is None:
                    del stripes[i][ikey]
                else:
                    stripes[i][ikey] = new
        if self._fsync_always:
            self._group_commit(seg, base + len(blob))


share_module_globals(globals())

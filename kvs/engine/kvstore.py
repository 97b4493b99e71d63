"""KvStore: the log-structured engine of kvs (Bitcask: log, key directory, merge, hints).

One ``KvStore`` object is shared by every thread of a process; every method is safe from
any thread. ``KvStore`` is this module's facade over its parts, one module each; the
pieces and who touches them:

Log (``segment_log.py``)
    Append-only segment files (``segments.py`` names and orders them; ``record.py`` is the
    record format). Writers append to the *active* segment under ``_append_lock``, the one
    serialization of all writers; the record is encoded and checksummed before the lock,
    and the append itself is a copy into a shared memory map of the segment. Readers
    ``pread`` the same file: Linux has one page cache per file, so the copied bytes are what
    ``pread`` returns as soon as the copy is done, and a reader only learns a record's
    position from the index store that follows the copy (see Index).

Index (key directory; here)
    ``_stripes``: N dicts, a key's stripe chosen by ``hash(key)``. Value: a position
    (``positions.py``: one ``int`` packing the record's descriptor, offset and length),
    immutable and replaced by one dict store. ``_stripe_locks[i]`` is taken by writers of
    stripe i only, around "append the record, then store its position". So writes to one
    key are ordered the same way in the log and in the index (linearizable: a ``set`` that
    returned is visible to every later ``get``, and replay after a restart yields the last
    acknowledged value). Writers of different stripes only meet in the append.

Readers (here and ``readers.py``)
    ``get`` takes no lock: dict lookup, ``os.pread`` of the position, checksum and key check,
    decode. On free-threaded 3.13 a dict lookup takes a locked slow path when the stored key
    and value objects are owned by another live thread (``docs/free-threading.md``, section
    1); every key and position published into the index is therefore marked shared first
    (``kvs.freethreading``). Readers announce their reads in a per-thread slot so that
    retired segments are closed only after a grace period (``readers.py`` has the
    happens-before argument). A value cache per stripe (``_caches``) holds decoded small
    values; an entry counts only while its position object is the one in the index.

Compaction (``compaction.py``)
    A background thread merges sealed segments into new ones holding only live records,
    swapping each index entry with a compare-and-set under its stripe lock. Readers are
    never blocked; a writer waits at most for one record's swap.

Durability (``durability.py``), recovery at ``open`` (``recovery.py``)
    The ``fsync=`` policies with group commit; rebuilding the index from the directory.

Open or closed: one state
    The store is open exactly while ``_closed`` is False. ``_shards`` is the same state in
    the form ``get`` reads without a check: the (stripe, cache) pairs while open,
    :data:`CLOSED_SHARDS` (whose subscript raises) otherwise. Both change together, only in
    ``_publish_open`` and ``_publish_closed``; every other method checks with
    ``_check_open`` (``_append`` inlines it).

The parts are mixins of ``KvStore``: they share its attributes, each part initializing and
owning its own (its class docstring lists them) and declaring, as bare annotations, those of
the others it uses. A mixin and not a separate object per part, because ``set`` and
``_append`` then load what they need from ``self`` directly: no extra attribute load or
call per write on the hot path.
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from kvs.engine import positions, record
from kvs.engine.base import FsyncPolicy, check_fsync_policy
from kvs.engine.compaction import Compaction
from kvs.engine.datadir import DataDir
from kvs.engine.durability import Durability
from kvs.engine.readers import ReaderRegistry
from kvs.engine.record import FORMAT_VERSION
from kvs.engine.recovery import Recovery
from kvs.engine.segment_log import LIVE, TOTAL, SegmentLog
from kvs.errors import KeyNotFoundError, KvsError
from kvs.freethreading import (
    SHARED_COUNT_OFFSET,
    SHARED_COUNTS,
    fresh_shared_int,
    mark_shared,
    mark_shared_str,
    share_module_globals,
)
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES, check_str, encode_text

__all__ = ["KvStore"]

log = logging.getLogger("kvs.engine.kvstore")  # the engine's one logger, whatever module logs

# What the hot paths load as globals (share_module_globals, last line, marks them).
_HEADER_SIZE = record.HEADER_SIZE
_HEADER_UNPACK = record.HEADER.unpack_from
_OP_SET = record.OP_SET
_CRC_RESIDUE = record.CRC_RESIDUE
_encode_set = record.encode_set
_encode_tombstone = record.encode_tombstone
_pack = positions.pack
_length = positions.length
_NARROW_LIMIT = positions.NARROW_LIMIT
_WIDE_FD_SHIFT = positions.WIDE_FD_SHIFT
_WIDE_FD_MASK = positions.WIDE_FD_MASK
_WIDE_OFFSET_SHIFT = positions.WIDE_OFFSET_SHIFT
_WIDE_OFFSET_MASK = positions.WIDE_OFFSET_MASK
_WIDE_LENGTH_MASK = positions.WIDE_LENGTH_MASK
_crc32 = zlib.crc32
_pread = os.pread
"""``os.pread`` as ``get`` calls it (a test replaces it to pause reads between lookup and
read, as a preempted thread would)."""


class _ClosedShards:
    """``KvStore._shards`` while the store is not open: every ``get`` raises."""

    __slots__ = ()

    def __getitem__(self, _index: int) -> tuple[dict[str, int], dict[str, tuple[int, str]]]:
        raise KvsError("the store is closed")


CLOSED_SHARDS = _ClosedShards()
"""``KvStore._shards`` of a store that is not open (module docstring: one state)."""


class KvStore(SegmentLog, Durability, Recovery, Compaction):
    """The log-structured key/value engine. Open with :meth:`KvStore.open`."""

    name = "kvs"

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        fsync: FsyncPolicy = "never",
        fsync_interval: float = 1.0,
        compaction_threshold: int = 64 * 1024 * 1024,
        compaction_ratio: float = 0.5,
        max_segment_bytes: int = 64 * 1024 * 1024,
        stripes: int = 256,
        max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
        max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
        background_compaction: bool = True,
        cache_entries: int = 131072,
        cache_value_bytes: int = 1024,
    ) -> KvStore:
        """Open (creating if needed) the store in directory ``path`` and replay its log.

        ``compaction_threshold``: stale bytes that start a background compaction, provided
        they are also at least ``compaction_ratio`` of the log (defaults: 64 MiB and half,
        like Redis's AOF rewrite policy; a compaction rewrites every live record). ``stripes``: index stripes (a
        power of two). ``background_compaction=False`` leaves compaction to :meth:`compact`.
        ``cache_entries``: how many decoded values of up to ``cache_value_bytes`` bytes ``get``
        keeps in memory (spread over the stripes, oldest evicted first; 0 disables it).
        Raises ``KvsError`` for a bad option, a directory in use or of another engine, and
        for corruption that is not a torn tail."""
        fsync = check_fsync_policy(fsync)
        if not fsync_interval > 0:
            raise KvsError("fsync_interval must be a positive number of seconds")
        if stripes < 1 or stripes & (stripes - 1):
            raise KvsError("stripes must be a power of two")
        if compaction_threshold < 0 or not 0 <= compaction_ratio <= 1:
            raise KvsError("compaction_threshold must be >= 0 and compaction_ratio in [0, 1]")
        if max_key_bytes < 1 or max_value_bytes < 0:
            raise KvsError("size limits must be positive")
        if max_segment_bytes < 1024 or max_segment_bytes >= 1 << 40:
            raise KvsError("max_segment_bytes must be between 1 KiB and 1 TiB")
        if record.OVERHEAD + max_key_bytes + max_value_bytes > positions.MAX_RECORD_LENGTH:
            raise KvsError("max_key_bytes + max_value_bytes must stay under 1 GiB")
        if cache_entries < 0 or cache_value_bytes < 0:
            raise KvsError("cache_entries and cache_value_bytes must be >= 0")
        store = cls.__new__(cls)
        store._init(Path(path), stripes, max_key_bytes, max_value_bytes,
                    -(-cache_entries // stripes), cache_value_bytes)  # ceiling: 0 stays 0
        store._init_log(max_segment_bytes)
        store._init_durability(fsync, fsync_interval)
        store._init_compaction(compaction_threshold, compaction_ratio)
        try:
            store._dir = DataDir(store.path, store.name, FORMAT_VERSION)
            store._recover()
            store._publish_open()
            store._publish_for_readers()
            store._start_background(background_compaction)
        except BaseException:
            store._abort_open()
            raise
        return store

    def _init(self, path: Path, stripes: int, max_key_bytes: int, max_value_bytes: int,
              cache_per_stripe: int, cache_value_bytes: int) -> None:
        """The facade's own state: the index, the value cache, the readers, the lifecycle."""
        self.path = path
        self._max_key = max_key_bytes
        self._max_value = max_value_bytes
        self._closed = True  # until recovery has finished (module docstring: one state)
        self._dir: DataDir | None = None
        self._mask = stripes - 1
        self._stripes: list[dict[str, int]] = [{} for _ in range(stripes)]
        for stripe in self._stripes:
            mark_shared(stripe)
        mark_shared(self._stripes)
        self._stripe_locks = [threading.Lock() for _ in range(stripes)]
        # Value cache: per stripe, key -> (position, value). An entry counts only while its
        # position object is the one in the index (see get); readers fill it lock-free.
        self._cache_per_stripe = cache_per_stripe
        self._cache_value_bytes = cache_value_bytes
        self._caches: list[dict[str, tuple[int, str]]] = [{} for _ in range(stripes)]
        for cache in self._caches:
            mark_shared(cache)
        mark_shared(self._caches)
        # What get reads: (index stripe, cache) pairs, one load from self for both.
        self._shards: list[tuple[dict[str, int], dict[str, tuple[int, str]]]] | _ClosedShards = CLOSED_SHARDS
        self._readers = ReaderRegistry()
        self._reader_local = self._readers.local
        mark_shared(self._reader_local)
        self._stopping = threading.Event()  # the background threads' stop signal
        self._threads: list[threading.Thread] = []
        self._close_lock = threading.Lock()

    def _publish_open(self) -> None:
        """The store is open from here on: ``get`` finds the shards, ``_check_open`` passes."""
        shards = list(zip(self._stripes, self._caches, strict=True))
        for shard in shards:
            mark_shared(shard)
        mark_shared(shards)
        self._shards = shards
        self._closed = False

    def _publish_closed(self) -> None:
        """The store is closed from here on (``close``, under the append lock)."""
        self._closed = True
        self._shards = CLOSED_SHARDS

    def _check_open(self) -> None:
        """``KvsError`` unless the store is open: the one check (``_append`` inlines it)."""
        if self._closed:
            raise KvsError("the store is closed")

    def _publish_for_readers(self) -> None:
        """Mark the objects ``get`` loads from ``self`` as shared. Attribute loads, like
        dict lookups, take CPython's locked slow path for an object owned by another live
        thread (the opening thread) unless it is marked. Runs before any other thread can
        reach the store."""
        self._max_key = fresh_shared_int(self._max_key)
        self._max_value = fresh_shared_int(self._max_value)
        self._mask = fresh_shared_int(self._mask)
        self._cache_per_stripe = fresh_shared_int(self._cache_per_stripe)
        self._cache_value_bytes = fresh_shared_int(self._cache_value_bytes)
        self._prefault_bytes = fresh_shared_int(self._prefault_bytes)
        mark_shared(self._readers)
        mark_shared(self)

    def _start_background(self, compaction: bool) -> None:
        if compaction:
            t = threading.Thread(target=self._compactor, name=f"kvs-compactor[{self.path.name}]", daemon=True)
            self._threads.append(t)
            t.start()
        if self._fsync == "interval":
            t = threading.Thread(target=self._interval_syncer, name=f"kvs-fsync[{self.path.name}]", daemon=True)
            self._threads.append(t)
            t.start()
        self._maybe_want_compaction()

    def _abort_open(self) -> None:
        self._stopping.set()
        self._compaction_wanted.set()
        for t in self._threads:
            t.join()
        self._close_segment_files()
        if self._dir is not None:
            self._dir.close()
            self._dir = None

    # ------------------------------------------------------------------ public API
    def get(self, key: str) -> str | None:
        """The value of ``key``, or ``None``. Takes no lock (see the module docstring).

        The index and the cache are read by subscript, never with ``dict.get``: on 3.13t
        ``dict.get`` runs inside the dict's critical section (it locks the dict's mutex),
        while ``d[key]`` is the lock-free lookup (``docs/free-threading.md``, section 2b)."""
        if type(key) is not str:
            key = check_str(key, "key")
        stripe, cache = self._shards[hash(key) & self._mask]  # raises if the store is closed
        try:
            pos = stripe[key]
        except KeyError:
            # A key that cannot exist may still be a caller's error; an ASCII key (str.isascii
            # is a flag check) is valid whenever it is short enough, the common miss.
            if not key.isascii() or len(key) > self._max_key:
                self._check_key(key)
            return None
        try:
            hit = cache[key]
        except KeyError:
            hit = None
        if hit is not None and hit[0] is pos:
            # The cached value belongs to exactly the record the index points to now: the
            # tuple holds that position object, so it cannot be a recycled identity.
            return hit[1]
        kb = key.encode()  # the key is in the index, so it is valid UTF-8 within limits
        try:
            slot = self._reader_local.slot
        except AttributeError:
            slot = self._readers.register()
        state = slot[0] + 1  # odd: inside a read (readers.py)
        slot[0] = state
        try:
            # Look again after announcing the read: only a position loaded inside the
            # announced section is protected from its segment being closed (readers.py).
            try:
                pos = stripe[key]
            except KeyError:
                return None
            # positions.unpack, inlined (tests/test_kvstore.py checks it against unpack).
            if pos < _NARROW_LIMIT:
                length = pos & 0xFFFF
                data = _pread(pos >> 48, length, (pos >> 16) & 0xFFFFFFFF)
            else:
                length = pos & _WIDE_LENGTH_MASK
                data = _pread((pos >> _WIDE_FD_SHIFT) & _WIDE_FD_MASK, length,
                              (pos >> _WIDE_OFFSET_SHIFT) & _WIDE_OFFSET_MASK)
        except OSError as exc:
            raise KvsError(f"cannot read {self.path}: {exc.strerror}") from None
        finally:
            slot[0] = (state + 1) & 255
        op, klen, vlen = _HEADER_UNPACK(data)
        if (_crc32(data) != _CRC_RESIDUE or len(data) != length or op != _OP_SET
                or klen != len(kb) or not data.startswith(kb, _HEADER_SIZE)):
            raise KvsError(f"data corruption in {self.path}: the record of key {key!r} fails its checks")
        start = _HEADER_SIZE + klen
        value = data[start:start + vlen].decode()
        if vlen <= self._cache_value_bytes:
            self._cache_put(cache, kb, pos, value)
        return value

    def _cache_put(self, cache: dict[str, tuple[int, str]], kb: bytes, pos: int, value: str) -> None:
        """Remember ``value`` as the value of the record at ``pos``. Lock-free: concurrent
        puts and evictions may race; any entry is only ever used when its position is the
        one the index holds, so a lost or stale entry costs a re-read, never a wrong value.
        The key, the value and the tuple are new objects of this thread, marked shared
        before the dict store publishes them (``mark_shared`` and ``str_needs_mark``
        inlined, as in ``set``)."""
        if len(cache) >= self._cache_per_stripe:
            if self._cache_per_stripe == 0:
                return
            try:
                del cache[next(iter(cache))]  # the oldest entry (dicts keep insertion order)
            except (StopIteration, RuntimeError, KeyError):
                pass  # raced with another eviction or insertion: fine
        key = kb.decode()
        entry = (pos, value)
        counts = SHARED_COUNTS
        if counts is not None:
            offset = SHARED_COUNT_OFFSET
            if len(key) > 1 or (len(key) == 1 and ord(key) > 0xFF):
                counts[(id(key) + offset) >> 3] = 1
            if len(value) > 1 or (len(value) == 1 and ord(value) > 0xFF):
                counts[(id(value) + offset) >> 3] = 1
            counts[(id(entry) + offset) >> 3] = 1
        cache[key] = entry

    def _check_key(self, key: str) -> None:
        try:
            n = len(key.encode())
        except UnicodeEncodeError:
            n = -1
        if n < 0 or n > self._max_key:
            encode_text(key, "key", self._max_key)  # raises the proper KvsError

    def set(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``. Returns once the write is acknowledged (``fsync``)."""
        rec = _encode_set(key, value, self._max_key, self._max_value)
        n = len(rec)
        i = hash(key) & self._mask
        stripe = self._stripes[i]
        with self._stripe_locks[i]:
            old = stripe.get(key)  # .get under the stripe lock: no reader ever takes it
            seg, offset = self._append(rec, n, n if old is None else n - _length(old))
            # Publish: the new position (and a new key's own copy) marked shared, then one
            # dict store publishes them. positions.pack and mark_shared inlined (the test of
            # the inlined positions checks this against pack).
            fd = seg.fd
            if fd < 4096 and offset < 1 << 32 and n < 1 << 16:
                pos = fd << 48 | offset << 16 | n
            else:
                pos = _pack(fd, offset, n)
            counts = SHARED_COUNTS
            if counts is not None:
                counts[(id(pos) + SHARED_COUNT_OFFSET) >> 3] = 1
            if old is None:
                key = key.encode().decode()
                mark_shared_str(key)
            stripe[key] = pos
        if self._fsync_always:
            self._group_commit(seg, offset + n)

    def set_many(self, items: Sequence[tuple[str, str]]) -> None:
        """``set`` of each ``(key, value)`` pair in order, sharing one append: the records go
        to the log in one append (a pipelined batch of SETs takes the append lock once, not
        one each). Every pair is checked before anything is written: a bad one raises as
        ``set`` would and none is stored.

        Each key's write is linearizable exactly as with ``set``: the stripe locks of every
        key in the batch are held, in index order (so two batches cannot deadlock), across
        "append, then store the positions". The batch is not atomic across a crash: a torn
        tail keeps a prefix of it, as it would of the same ``set`` calls."""
        if len(items) <= 1:
            for key, value in items:
                self.set(key, value)
            return
        max_key, max_value = self._max_key, self._max_value
        recs = [_encode_set(key, value, max_key, max_value) for key, value in items]
        mask = self._mask
        stripe_ids = [hash(key) & mask for key, _value in items]
        stripe_locks = self._stripe_locks
        locks = [stripe_locks[i] for i in sorted(set(stripe_ids))]
        stripes = self._stripes
        blob = b"".join(recs)
        for lock in locks:
            lock.acquire()
        try:
            # Live bytes: each record replaces the key's current record, or the batch's
            # earlier record of the same key. (.get under the stripe locks, as in set: no
            # other writer can be in these stripes, and readers never lock them.)
            latest: dict[str, int] = {}
            live_delta = 0
            for (key, _value), i, rec in zip(items, stripe_ids, recs, strict=True):
                n = len(rec)
                old = latest.get(key)
                if old is None:
                    pos = stripes[i].get(key)
                    old = 0 if pos is None else _length(pos)
                latest[key] = n
                live_delta += n - old
            seg, offset = self._append(blob, len(blob), live_delta)
            fd = seg.fd
            counts = SHARED_COUNTS
            for (key, _value), i, rec in zip(items, stripe_ids, recs, strict=True):
                # published as in set
                n = len(rec)
                pos = _pack(fd, offset, n)
                if counts is not None:
                    counts[(id(pos) + SHARED_COUNT_OFFSET) >> 3] = 1
                stripe = stripes[i]
                if key not in stripe:
                    key = key.encode().decode()
                    mark_shared_str(key)
                stripe[key] = pos
                offset += n
        finally:
            for lock in reversed(locks):
                lock.release()
        if self._fsync_always:
            self._group_commit(seg, offset)

    def remove(self, key: str) -> None:
        """Delete ``key``; ``KeyNotFoundError`` when it is absent."""
        if type(key) is not str:
            key = check_str(key, "key")
        rec = _encode_tombstone(encode_text(key, "key", self._max_key))
        i = hash(key) & self._mask
        stripe = self._stripes[i]
        with self._stripe_locks[i]:
            old = stripe.get(key)
            if old is None:
                self._check_open()
                raise KeyNotFoundError(key)
            seg, offset = self._append(rec, len(rec), -_length(old))
            del stripe[key]
        if self._fsync_always:
            self._group_commit(seg, offset + len(rec))

    @property
    def fsync(self) -> FsyncPolicy:
        """The durability policy this store was opened with (``durability.py``)."""
        return self._fsync

    def __len__(self) -> int:
        """The number of keys (a snapshot when writers are active)."""
        self._check_open()
        return sum(len(s) for s in self._stripes)

    def keys(self) -> list[str]:
        """A snapshot of the keys (each stripe copied under its lock)."""
        self._check_open()
        out: list[str] = []
        for stripe, lock in zip(self._stripes, self._stripe_locks, strict=True):
            with lock:
                out.extend(stripe)
        return out

    def stats(self) -> dict[str, int]:
        """Sizes for monitoring, benchmarks and tests, one consistent snapshot of the log:

        ``keys``; ``segments`` (segment files, the active one included); ``live_bytes``
        (bytes of the records the index points to) and ``total_bytes`` (of all segments);
        ``compactions`` (finished since open); ``active_segment_bytes`` and
        ``active_durable_bytes`` (the active segment's records, and how much of them is
        known to be fsynced); ``cache_entries`` (values held by the value cache)."""
        self._check_open()
        with self._append_lock:
            active = self._active
            return {"keys": sum(len(s) for s in self._stripes), "segments": len(self._segments),
                    "live_bytes": self._sizes[LIVE], "total_bytes": self._sizes[TOTAL],
                    "compactions": self.compactions,
                    "active_segment_bytes": active.size, "active_durable_bytes": active.durable,
                    "cache_entries": sum(len(c) for c in self._caches)}

    def _position(self, key: str) -> int | None:
        """The position (``positions.py``) the index holds for ``key``, or None. For tests,
        which check the hot paths' inlined packing against ``positions.pack``."""
        return self._stripes[hash(key) & self._mask].get(key)

    def close(self) -> None:
        """Stop the background threads, flush, release the directory. Idempotent; calls
        that race with ``close`` may fail with ``KvsError``, later ones always do."""
        with self._close_lock:
            if self._closed:
                return
            self._stopping.set()
            self._compaction_wanted.set()
            self._notify_committers()
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()
            try:
                with self._compact_lock, self._append_lock:
                    self._publish_closed()
                    try:
                        self._seal(self._active)
                    except OSError as exc:
                        log.error("%s: cannot seal the active segment: %s", self._active.path, exc.strerror)
                self._readers.grace_period()
                self._close_segment_files()
            finally:
                if self._dir is not None:
                    self._dir.close()
                    self._dir = None

    def __enter__(self) -> KvStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<KvStore {str(self.path)!r}{' closed' if self._closed else ''}>"


share_module_globals(globals())

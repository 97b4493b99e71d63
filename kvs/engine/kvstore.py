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
    happens-before argument). A value cache per stripe (``_caches``, ``value_cache.py``)
    holds decoded small values (once it is full, of records read twice); an entry counts
    only while its position object is the one in the index.

Transactions (``transactions.py``), expiry (``expiry.py``), scan (``scanning.py``)
    A transaction's records go to the log in one TXN record (all or nothing after a crash)
    and become visible to lock-free readers at once through ``Pending`` index entries and
    one commit flag (``transactions.py`` has the happens-before argument). Deadlines live in
    the records, in ``_expires`` (per stripe) and in per-stripe heaps that the background
    sweep and ``len`` use; a position with the ``EXPIRES`` flag sends ``get`` down its slow
    path, which reads the deadline from the record itself. ``scan`` walks the stripes in
    hash order (``scanning.py``).

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
from typing import Any

from kvs.engine import positions, record, segments, value_cache
from kvs.engine.base import FsyncPolicy, check_fsync_policy
from kvs.engine.callbacks import CallbackGuard
from kvs.engine.clock import Clock, wall_clock_ms
from kvs.engine.compaction import Compaction
from kvs.engine.datadir import DataDir, fsync_dir
from kvs.engine.durability import Durability
from kvs.engine.expiry import Expiry
from kvs.engine.mapping import EngineMapping
from kvs.engine.readers import ReaderRegistry
from kvs.engine.record import FORMAT_VERSION, READABLE_VERSIONS
from kvs.engine.recovery import Recovery
from kvs.engine.scanning import Scanning
from kvs.engine.segment_log import LIVE, TOTAL, SegmentLog
from kvs.engine.transaction import pairs
from kvs.engine.transactions import Pending, Transactions
from kvs.engine.values import index_key, key_bytes, ttl_deadline, value_bytes
from kvs.errors import KeyNotFoundError, KvsError
from kvs.freethreading import (
    SHARED_COUNT_OFFSET,
    SHARED_COUNTS,
    fresh_shared_int,
    mark_shared,
    mark_shared_str,
    share_module_globals,
)
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES

__all__ = ["KvStore"]

log = logging.getLogger("kvs.engine.kvstore")  # the engine's one logger, whatever module logs

# What the hot paths load as globals (share_module_globals, last line, marks them).
_HEADER_SIZE = record.HEADER_SIZE
_HEADER_UNPACK = record.HEADER.unpack_from
_OP_SET = record.OP_SET
_F_VALUE_BYTES = record.F_VALUE_BYTES
_CRC_RESIDUE = record.CRC_RESIDUE
_encode_text_set = record.encode_text_set
_encode_set = record.encode_set
_encode_tombstone = record.encode_tombstone
_pack = positions.pack
_unpack = positions.unpack
_length = positions.length
_NARROW_LIMIT = positions.NARROW_LIMIT
_GHOST_SHIFT = value_cache.GHOST_SHIFT
_WIDE_FD_SHIFT = positions.WIDE_FD_SHIFT
_WIDE_FD_MASK = positions.WIDE_FD_MASK
_WIDE_OFFSET_SHIFT = positions.WIDE_OFFSET_SHIFT
_WIDE_OFFSET_MASK = positions.WIDE_OFFSET_MASK
_WIDE_LENGTH_MASK = positions.WIDE_LENGTH_MASK
_KEY_BYTES = positions.KEY_BYTES
_flags = positions.flags
_crc32 = zlib.crc32
_pread = os.pread
"""``os.pread`` as ``get`` calls it (a test replaces it to pause reads between lookup and
read, as a preempted thread would)."""


class _ClosedShards:
    """``KvStore._shards`` while the store is not open: every ``get`` raises."""

    __slots__ = ()

    def __getitem__(self, _index: int) -> Shard:
        raise KvsError("the store is closed")


Shard = tuple[dict[str, int], dict[str, tuple[int, str | bytes]], bytearray]
"""What ``get`` loads per stripe: the index stripe, and its cache's entries and ghosts."""

CLOSED_SHARDS = _ClosedShards()
"""``KvStore._shards`` of a store that is not open (module docstring: one state)."""


# The ignore: update(key, fn) is the engines' atomic read-modify-write, not
# MutableMapping.update (kvs.engine.mapping says why).
class KvStore(SegmentLog, Durability, Recovery, Compaction, Expiry, Transactions, Scanning, EngineMapping):  # type: ignore[misc]
    """The log-structured key/value engine. Open with :meth:`KvStore.open`. Implements the
    whole ``KvsEngine`` interface (``kvs.engine.base``), mapping protocol included."""

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
        clock: Clock = wall_clock_ms,
        expire_sweep_interval: float = 0.1,
    ) -> KvStore:
        """Open (creating if needed) the store in directory ``path`` and replay its log.

        ``compaction_threshold``: stale bytes that start a background compaction, provided
        they are also at least ``compaction_ratio`` of the log (defaults: 64 MiB and half,
        like Redis's AOF rewrite policy; a compaction rewrites every live record). ``stripes``: index stripes (a
        power of two). ``background_compaction=False`` leaves compaction to :meth:`compact`.
        ``cache_entries``: how many decoded values of up to ``cache_value_bytes`` bytes ``get``
        keeps in memory (at least; spread over the stripes, oldest evicted first; once full,
        a value is admitted on its second read: ``value_cache.py``; 0 disables it).
        ``clock``: the time of expiry (``kvs.engine.clock``); ``expire_sweep_interval``:
        seconds between the background sweeps of expired keys (0: no sweep thread; expired
        keys are invisible either way). A directory of format 1 (kvs 0.1.0) is read as it
        is, and marked as format 2 before anything is written (``docs/storage-format.md``).
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
        if not callable(clock):
            raise KvsError("clock must be a function returning Unix milliseconds")
        if not expire_sweep_interval >= 0:
            raise KvsError("expire_sweep_interval must be >= 0 seconds")
        store = cls.__new__(cls)
        store._init(Path(path), stripes, max_key_bytes, max_value_bytes,
                    value_cache.limit_per_stripe(cache_entries, stripes), cache_value_bytes)
        store._init_log(max_segment_bytes)
        store._init_durability(fsync, fsync_interval)
        store._init_compaction(compaction_threshold, compaction_ratio)
        store._init_expiry(clock, expire_sweep_interval)
        store._init_transactions()
        store._init_scanning()
        try:
            store._dir = DataDir(store.path, store.name, FORMAT_VERSION, READABLE_VERSIONS)
            # Format 1 is read as it is; marking the directory as 2 first means 0.1.0 refuses
            # it from now on, before any version-2 record exists.
            store._dir.upgraded(FORMAT_VERSION)
            store._recover()
            store._publish_open()
            store._publish_for_readers()
            store._start_background(background_compaction)
        except BaseException:
            store._abort_open()
            raise
        return store

    def _init(self, path: Path, stripes: int, max_key_bytes: int, max_value_bytes: int,
              cache_limit: int, cache_value_bytes: int) -> None:
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
        # Value cache (value_cache.py): per stripe, entries, and the ghosts that admit them
        # once the stripe is full.
        # An entry counts only while its position object is the one in the index (see get);
        # readers fill it lock-free. Values longer than _cache_value_bytes are not admitted
        # (-1: none is, the cache is off).
        self._ghost_mask = value_cache.ghost_mask(cache_limit)
        self._cache_limit = cache_limit
        self._cache_value_bytes = cache_value_bytes if cache_limit else -1
        self._caches = [value_cache.Cache(cache_limit) for _ in range(stripes)]
        for cache in self._caches:
            mark_shared(cache.entries)
            mark_shared(cache.ghosts)
        # What get reads: (index stripe, cache entries, cache ghosts), one load from self.
        self._shards: list[Shard] | _ClosedShards = CLOSED_SHARDS
        self._guard = CallbackGuard()
        self._callers = self._guard.inside  # get tests its emptiness (callbacks.py)
        self._readers = ReaderRegistry()
        self._reader_local = self._readers.local
        mark_shared(self._reader_local)
        self._stopping = threading.Event()  # the background threads' stop signal
        self._threads: list[threading.Thread] = []
        self._close_lock = threading.Lock()

    def _publish_open(self) -> None:
        """The store is open from here on: ``get`` finds the shards, ``_check_open`` passes."""
        shards = [(stripe, cache.entries, cache.ghosts)
                  for stripe, cache in zip(self._stripes, self._caches, strict=True)]
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
        self._ghost_mask = fresh_shared_int(self._ghost_mask)
        self._cache_limit = fresh_shared_int(self._cache_limit)
        self._cache_value_bytes = fresh_shared_int(self._cache_value_bytes)
        self._prefault_bytes = fresh_shared_int(self._prefault_bytes)
        mark_shared(self._readers)
        mark_shared(self._guard)
        mark_shared(self._clock)
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
        if self._sweep_interval > 0:
            t = threading.Thread(target=self._sweeper, name=f"kvs-expire[{self.path.name}]", daemon=True)
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
    def get(self, key: object, default: object = None) -> Any:
        """The value of ``key`` as the type it was written with, or ``default`` (None) when
        the key is absent or expired. Takes no lock (see the module docstring).

        The index and the cache are read by subscript, never with ``dict.get``: on 3.13t
        ``dict.get`` runs inside the dict's critical section (it locks the dict's mutex),
        while ``d[key]`` is the lock-free lookup (``docs/free-threading.md``, section 2b).
        A negative position (the ``EXPIRES`` flag: a deadline, or a transaction's
        ``Pending`` entry) takes :meth:`_get_slow`."""
        if type(key) is str:
            ikey = key
            kb = None
        else:
            if type(key) is bytes and len(key) <= self._max_key:  # the RESP server's keys
                kb = key
            else:
                kb = key_bytes(key, self._max_key)[0]
            ikey = kb.decode("utf-8", "surrogateescape")
        if self._callers:
            self._guard.check()
        h = hash(ikey)
        stripe, entries, ghosts = self._shards[h & self._mask]  # raises if the store is closed
        try:
            pos = stripe[ikey]
        except KeyError:
            # A key that cannot exist may still be a caller's error; an ASCII key (str.isascii
            # is a flag check) is valid whenever it is short enough, the common miss.
            if kb is None and (not ikey.isascii() or len(ikey) > self._max_key):
                key_bytes(key, self._max_key)
            return default
        if pos < 0:  # positions.EXPIRES (or a transaction's Pending)
            return self._get_slow(ikey, kb, stripe, default)
        try:
            hit = entries[ikey]
        except KeyError:
            hit = None
        if hit is not None and hit[0] is pos:
            # The cached value belongs to exactly the record the index points to now
            # (value_cache.py: why identity is enough, and why a str argument with a lone
            # surrogate never gets here).
            return hit[1]
        if kb is None:
            try:
                kb = ikey.encode()
            except UnicodeEncodeError:  # a lone surrogate: the index key of bytes, not text
                kb = key_bytes(key, self._max_key)[0]  # raises the proper KvsError
        maps = self._read_maps
        try:
            reader = self._reader_local.slot
        except AttributeError:
            reader = self._readers.register()
        state = reader[0] + 1  # odd: inside a read (readers.py)
        reader[0] = state
        try:
            # Look again after announcing the read: only a position loaded inside the
            # announced section is protected from its segment being retired (readers.py).
            try:
                pos = stripe[ikey]
            except KeyError:
                return default
            if pos < 0:
                # Became EXPIRES or Pending meanwhile: _get_slow announces its own read, after
                # this one has ended (announcements do not nest: a nested one would mark the
                # slot idle while the outer read still runs, letting a segment close under it).
                data = None
            # positions.unpack, inlined (tests/test_kvstore.py checks it against unpack). A
            # segment with a read map (segment_log.py) is copied out of it, any other read
            # with pread.
            elif pos < _NARROW_LIMIT:
                length = (pos >> 2) & 0xFFFF
                view = maps[pos >> 48]
                if view is None:
                    data = _pread(pos >> 48, length, (pos >> 18) & 0x3FFFFFFF)
                else:
                    offset = (pos >> 18) & 0x3FFFFFFF
                    data = view[offset:offset + length]
            else:
                length = (pos >> 2) & _WIDE_LENGTH_MASK
                data = _pread((pos >> _WIDE_FD_SHIFT) & _WIDE_FD_MASK, length,
                              (pos >> _WIDE_OFFSET_SHIFT) & _WIDE_OFFSET_MASK)
        except OSError as exc:
            raise KvsError(f"cannot read {self.path}: {exc.strerror}") from None
        finally:
            reader[0] = (state + 1) & 255
        if data is None:
            return self._get_slow(ikey, kb, stripe, default)
        op, flags, klen, vlen = _HEADER_UNPACK(data)
        if op != _OP_SET:  # a version-1 record (format 1 directories), or damage
            return self._decode(data, length, kb)[0]
        if (_crc32(data) != _CRC_RESIDUE or len(data) != length
                or klen != len(kb) or not data.startswith(kb, _HEADER_SIZE)):
            raise KvsError(f"data corruption in {self.path}: the record of key {key!r} fails its checks")
        start = _HEADER_SIZE + klen
        if flags & _F_VALUE_BYTES:
            value: str | bytes = data[start:start + vlen]
        else:
            value = data[start:start + vlen].decode()
        if vlen <= self._cache_value_bytes:
            # Admission (value_cache.py): into a stripe with room, any read; into a full one,
            # the second read of the same record in its ghost slot; any other miss only
            # leaves its fingerprint there.
            if len(entries) < self._cache_limit:
                self._cache_admit(entries, kb, pos, value)
            else:
                slot = (h >> _GHOST_SHIFT) & self._ghost_mask
                ghost = (pos >> 18) & 0xFF  # value_cache.fingerprint, inlined
                if ghosts[slot] == ghost:
                    self._cache_admit(entries, kb, pos, value)
                else:
                    ghosts[slot] = ghost
        return value

    def _get_slow(self, ikey: str, kb: bytes | None, stripe: dict[str, int], default: object) -> Any:
        """``get`` of a key whose position has the ``EXPIRES`` flag: resolve a transaction's
        ``Pending`` entry (``transactions.py``), then read the record and check its own
        deadline against the clock. Not cached."""
        if kb is None:
            kb = key_bytes(ikey, self._max_key)[0]  # a str argument: must be valid text
        found = self._read_current(ikey, kb, stripe)
        if found is None:
            return default
        value, deadline = found
        if deadline is not None and deadline <= self._clock():
            return default
        return value

    def _read_current(self, ikey: str, kb: bytes, stripe: dict[str, int]) -> tuple[str | bytes, int | None] | None:
        """``(value, deadline)`` of the record the index holds for ``ikey`` now (a pending
        transaction's entry resolved), expired or not; None when absent. Lock-free, announced
        as a read (readers.py)."""
        try:
            slot = self._reader_local.slot
        except AttributeError:
            slot = self._readers.register()
        state = slot[0] + 1
        slot[0] = state
        try:
            try:
                entry = stripe[ikey]
            except KeyError:
                return None
            pos = entry.resolve() if type(entry) is Pending else entry
            if pos is None:
                return None
            fd, offset, length = _unpack(pos)
            data = _pread(fd, length, offset)
        except OSError as exc:
            raise KvsError(f"cannot read {self.path}: {exc.strerror}") from None
        finally:
            slot[0] = (state + 1) & 255
        return self._decode(data, length, kb)

    def _decode(self, data: bytes, length: int, kb: bytes) -> tuple[str | bytes, int | None]:
        """``(value, deadline)`` of the SET record ``data`` of key ``kb`` (either format
        version), checked; ``KvsError`` for a record that fails any check."""
        try:
            parsed, n = record.parse(data, 0, len(data), positions.MAX_RECORD_LENGTH)
        except record.CorruptRecord as exc:
            raise KvsError(f"data corruption in {self.path}: a record of key {kb!r} fails its checks "
                           f"({exc.reason})") from None
        start = parsed.key_start
        if (parsed.op != record.OP_SET or n != length or len(data) != length
                or data[start:start + parsed.klen] != kb):
            raise KvsError(f"data corruption in {self.path}: the record of key {kb!r} fails its checks")
        raw = data[start + parsed.klen:start + parsed.klen + parsed.vlen]
        return (raw if parsed.flags & _F_VALUE_BYTES else raw.decode()), parsed.deadline

    def _cache_admit(self, entries: dict[str, tuple[int, str | bytes]], kb: bytes, pos: int,
                     value: str | bytes) -> None:
        """Store the entry ``(pos, value)`` of the key ``kb`` (``value_cache.py``), unless the
        key is not valid UTF-8; a new key into a full stripe after evicting its oldest entry.
        Lock-free: concurrent admissions and evictions may race; an entry is only ever used
        when its position is the one the index holds, so a lost or stale entry costs a
        re-read, never a wrong value. The key (a copy: the caller's object may be another
        thread's), the value and the tuple are new objects of this thread, marked shared
        before the dict store publishes them (``mark_shared`` and ``str_needs_mark``
        inlined, as in ``set``)."""
        try:
            key = kb.decode()
        except UnicodeDecodeError:
            return
        if len(entries) >= self._cache_limit and key not in entries:
            try:
                del entries[next(iter(entries))]  # the oldest entry (dicts keep insertion order)
            except (StopIteration, RuntimeError, KeyError):
                pass  # raced with another eviction or admission: fine
        entry = (pos, value)
        counts = SHARED_COUNTS
        if counts is not None:
            offset = SHARED_COUNT_OFFSET
            if len(key) > 1 or (len(key) == 1 and ord(key) > 0xFF):
                counts[(id(key) + offset) >> 3] = 1
            if len(value) > 1 or (type(value) is str and len(value) == 1 and ord(value) > 0xFF):
                counts[(id(value) + offset) >> 3] = 1
            counts[(id(entry) + offset) >> 3] = 1
        entries[key] = entry

    def set(self, key: object, value: object, *, ttl: float | None = None) -> None:
        """Store ``value`` under ``key`` (clearing any expiry; with ``ttl``, the key expires
        that many seconds from now). Returns once the write is acknowledged (``fsync``)."""
        if self._callers:
            self._guard.check()
        if (ttl is None and type(key) is str and type(value) is str
                and (rec := _encode_text_set(key, value, self._max_key, self._max_value)) is not None):
            ikey: str = key
            pflags = 0
            deadline = None
        else:
            rec, ikey, pflags, deadline = self._encode_set(key, value, ttl)
        n = len(rec)
        i = hash(ikey) & self._mask
        stripe = self._stripes[i]
        with self._stripe_locks[i]:
            old = stripe.get(ikey)  # .get under the stripe lock: no reader ever takes it
            seg, offset = self._append(rec, n, n if old is None else n - _length(old))
            # Publish: the new position (and a new key's own copy) marked shared, then one
            # dict store publishes them. positions.pack and mark_shared inlined (the test of
            # the inlined positions checks this against pack).
            fd = seg.fd
            if fd < 4096 and offset < 1 << 30 and n < 1 << 16 and not pflags & 1:
                pos = fd << 48 | offset << 18 | n << 2 | pflags
            else:
                pos = _pack(fd, offset, n, pflags)
            counts = SHARED_COUNTS
            if counts is not None:
                counts[(id(pos) + SHARED_COUNT_OFFSET) >> 3] = 1
            if old is None:
                ikey = ikey.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
                mark_shared_str(ikey)
            elif old < 0:
                self._forget_deadline(i, ikey)
            if deadline is not None:
                self._note_deadline(i, ikey, deadline)
            stripe[ikey] = pos
        if self._fsync_always:
            self._group_commit(seg, offset + n)

    def set_batch(self, items: Sequence[tuple[object, object]]) -> None:
        """``set`` of each ``(key, value)`` pair in order, sharing one append and one
        acknowledgement, but not a transaction (``set_many`` is one): the server's path for a
        run of pipelined SETs, which Redis does not make atomic either. Every pair is checked
        before anything is written: a bad one raises as ``set`` would and none is stored.

        Each write is linearizable exactly as a ``set``: the stripe locks of every key are
        held, in index order (so two batches, or a batch and a transaction, cannot deadlock),
        across "append, then publish the positions"; a reader may see some of the batch's
        writes before others, as it may of the same ``set`` calls. After a crash a torn tail
        keeps a prefix of the batch, as it would of the same ``set`` calls."""
        if self._callers:
            self._guard.check()
        items = pairs(items)
        if len(items) <= 1:
            for key, value in items:
                self.set(key, value)
            return
        encoded: list[tuple[bytes, str, int, int | None]] = []  # every pair checked first
        max_key, max_value = self._max_key, self._max_value
        for key, value in items:
            if (type(key) is str and type(value) is str
                    and (rec := _encode_text_set(key, value, max_key, max_value)) is not None):
                encoded.append((rec, key, 0, None))  # set's text fast path
            else:
                encoded.append(self._encode_set(key, value, None))
        mask = self._mask
        stripe_ids = [hash(ikey) & mask for _rec, ikey, _pflags, _deadline in encoded]
        locks = [self._stripe_locks[i] for i in sorted(set(stripe_ids))]
        stripes = self._stripes
        blob = b"".join([rec for rec, _ikey, _pflags, _deadline in encoded])
        for lock in locks:
            lock.acquire()
        try:
            # Live bytes: each record replaces the key's current record, or the batch's own
            # earlier record of the same key (.get under the stripe locks, as in set).
            latest: dict[str, int] = {}
            live_delta = 0
            for (rec, ikey, _pflags, _deadline), i in zip(encoded, stripe_ids, strict=True):
                old_length = latest.get(ikey)
                if old_length is None:
                    old = stripes[i].get(ikey)
                    old_length = 0 if old is None else _length(old)
                latest[ikey] = len(rec)
                live_delta += len(rec) - old_length
            seg, offset = self._append(blob, len(blob), live_delta)
            fd = seg.fd
            for (rec, ikey, pflags, _deadline), i in zip(encoded, stripe_ids, strict=True):
                # Publish as set does: the position (and a new key's own copy) marked shared
                # before the one dict store publishes them.
                n = len(rec)
                pos = _pack(fd, offset, n, pflags)
                mark_shared(pos)
                stripe = stripes[i]
                old = stripe.get(ikey)
                if old is None:
                    ikey = ikey.encode("utf-8", "surrogateescape").decode("utf-8", "surrogateescape")
                    mark_shared_str(ikey)
                elif old < 0:
                    self._forget_deadline(i, ikey)  # set clears the expiry
                stripe[ikey] = pos
                offset += n
        finally:
            for lock in reversed(locks):
                lock.release()
        if self._fsync_always:
            self._group_commit(seg, offset)

    def _encode_set(self, key: object, value: object, ttl: object) -> tuple[bytes, str, int, int | None]:
        """The general path of ``set``: ``(record, index key, position flags, deadline)``,
        every argument checked (``TypeError`` / ``KvsError``, nothing written)."""
        if (type(key) is bytes and type(value) is bytes  # the RESP server's SET
                and len(key) <= self._max_key and len(value) <= self._max_value):
            kb, key_is_bytes, vb, value_is_bytes = key, True, value, True
        else:
            kb, key_is_bytes = key_bytes(key, self._max_key)
            vb, value_is_bytes = value_bytes(value, self._max_value)
        deadline = None if ttl is None else ttl_deadline(ttl, self._clock())
        flags = (record.F_KEY_BYTES if key_is_bytes else 0) | (record.F_VALUE_BYTES if value_is_bytes else 0)
        pflags = (_KEY_BYTES if key_is_bytes else 0) | (positions.EXPIRES if deadline is not None else 0)
        return _encode_set(kb, vb, flags, deadline), index_key(kb, key_is_bytes, key), pflags, deadline

    def remove(self, key: object) -> None:
        """Delete ``key``; ``KeyNotFoundError`` when it is absent (or expired)."""
        if self._callers:
            self._guard.check()
        kb, is_bytes = key_bytes(key, self._max_key)
        ikey = index_key(kb, is_bytes, key)
        rec = _encode_tombstone(kb)
        i = hash(ikey) & self._mask
        stripe = self._stripes[i]
        with self._stripe_locks[i]:
            old = stripe.get(ikey)
            if old is not None and old < 0 and self._expires[i][ikey] <= self._clock():
                freed = self._expire_key(i, ikey)  # expired: absent, and its space comes back now
                with self._append_lock:
                    self._sizes[LIVE] -= freed
                old = None
            if old is None:
                self._check_open()
                raise KeyNotFoundError(key)
            seg, offset = self._append(rec, len(rec), -_length(old))
            del stripe[ikey]
            if old < 0:
                self._forget_deadline(i, ikey)
        if self._fsync_always:
            self._group_commit(seg, offset + len(rec))

    def __contains__(self, key: object) -> bool:
        """Whether ``key`` is present and unexpired (lock-free, as ``get``)."""
        kb, is_bytes = key_bytes(key, self._max_key)
        ikey = index_key(kb, is_bytes, key)
        if self._callers:
            self._guard.check()
        i = hash(ikey) & self._mask
        stripe = self._shards[i][0]
        try:
            entry = stripe[ikey]
        except KeyError:
            return False
        pos = entry.resolve() if type(entry) is Pending else entry
        if pos is None:
            return False
        if pos < 0:
            # The deadline entry may be gone: the sweep expiring the key, or a writer replacing
            # it. Ask under the stripe lock, where the index and the deadlines agree.
            try:
                deadline = self._expires[i][ikey]
            except KeyError:
                return self._contains_locked(i, ikey)
            return bool(deadline > self._clock())
        return True

    def _contains_locked(self, i: int, ikey: str) -> bool:
        """``__contains__`` for a key found with a deadline that is gone when looked up: the
        sweep expiring it, or a writer replacing it. Under the stripe lock the index and the
        deadlines agree."""
        with self._stripe_locks[i]:
            if ikey not in self._stripes[i]:
                return False
            deadline = self._expires[i].get(ikey)
            return deadline is None or deadline > self._clock()

    @property
    def fsync(self) -> FsyncPolicy:
        """The durability policy this store was opened with (``durability.py``)."""
        return self._fsync

    def __len__(self) -> int:
        """The number of live, unexpired keys (a snapshot when writers are active): the keys
        of the index once the expired ones have been removed, which walks only those
        (``expiry.py``), not the keys."""
        self._check_open()
        if self._callers:
            self._guard.check()
        self._purge_due()
        return sum(len(s) for s in self._stripes)

    def clear(self) -> None:
        """Remove every key: one CLEAR record, durable (fsynced whatever the policy) before
        this returns, then every older segment deleted (``docs/storage-format.md``, section
        2: a ``clear`` killed before the deletions is finished by the next open). Writers wait
        for it (every stripe lock is held while the index is emptied); readers never do."""
        if self._callers:
            self._guard.check()
        with self._compact_lock:
            self._check_open()
            locks = self._stripe_locks
            for lock in locks:
                lock.acquire()
            try:
                with self._append_lock:
                    self._check_open()
                    self._roll_over()
                    active = self._active
                    rec = record.encode_clear()
                    self._append_locked(rec, len(rec), 0)
                    try:
                        os.fsync(active.fd)
                        fsync_dir(self.path)
                    except OSError as exc:
                        raise KvsError(f"clear of {self.path} failed: {exc.strerror}") from None
                    active.durable = max(active.durable, active.size)
                    retired = [seg for g, seg in self._segments.items() if g != active.gen]
                    for stripe in self._stripes:
                        stripe.clear()
                    for cache in self._caches:
                        value_cache.clear(cache)
                    self._clear_expiry()
                    self._clear_scan_snapshots()
                    self._sizes[LIVE] = 0
            finally:
                for lock in reversed(locks):
                    lock.release()
            self._readers.grace_period()
            with self._append_lock:
                for seg in retired:
                    del self._segments[seg.gen]
                    del self._by_fd[seg.fd]
                    self._sizes[TOTAL] -= seg.size
                    self._retire_read_map(seg)
            for seg in retired:
                os.close(seg.fd)
                seg.path.unlink(missing_ok=True)
                (self.path / segments.hint_name(seg.gen)).unlink(missing_ok=True)
            fsync_dir(self.path)
            self._rearm_compaction_trigger()

    def stats(self) -> dict[str, int]:
        """Sizes for monitoring, benchmarks and tests, one consistent snapshot of the log:

        ``keys`` (in the index, expired ones not yet swept included); ``expiring_keys``
        (keys with a deadline); ``segments`` (segment files, the active one included);
        ``live_bytes`` (bytes of the records the index points to) and ``total_bytes`` (of
        all segments); ``compactions`` (finished since open); ``active_segment_bytes`` and
        ``active_durable_bytes`` (the active segment's records, and how much of them is
        known to be fsynced); ``cache_entries`` (values held by the value cache)."""
        self._check_open()
        with self._append_lock:
            active = self._active
            return {"keys": sum(len(s) for s in self._stripes),
                    "expiring_keys": sum(len(e) for e in self._expires),
                    "segments": len(self._segments),
                    "live_bytes": self._sizes[LIVE], "total_bytes": self._sizes[TOTAL],
                    "compactions": self.compactions,
                    "active_segment_bytes": active.size, "active_durable_bytes": active.durable,
                    "cache_entries": sum(value_cache.entries(c) for c in self._caches)}

    def _position(self, key: object) -> int | None:
        """The position (``positions.py``) the index holds for ``key``, or None. For tests,
        which check the hot paths' inlined packing against ``positions.pack``."""
        kb, is_bytes = key_bytes(key, self._max_key)
        ikey = index_key(kb, is_bytes, key)
        return self._stripes[hash(ikey) & self._mask].get(ikey)

    def close(self) -> None:
        """Stop the background threads, flush, release the directory. Idempotent; calls
        that race with ``close`` may fail with ``KvsError``, later ones always do."""
        if self._callers:  # from a callback: closing would wait on the locks it holds
            self._guard.check()
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

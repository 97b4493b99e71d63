"""KvStore: the log-structured engine of kvs (Bitcask: log, key directory, merge, hints).

One ``KvStore`` object is shared by every thread of a process; every method is safe from
any thread. The pieces and who touches them:

Log
    Append-only segment files (``segments.py`` names and orders them; ``record.py`` is the
    record format). Writers append to the *active* segment under ``_append_lock``, the one
    serialization of all writers; the record is encoded and checksummed before the lock,
    and the append itself is a copy into a shared memory map of the segment (``_Segment``).
    Readers ``pread`` the same file: Linux has one page cache per file, so the copied bytes
    are what ``pread`` returns as soon as the copy is done, and a reader only learns a
    record's position from the index store that follows the copy (see Index).

Index (key directory)
    ``_stripes``: N dicts, a key's stripe chosen by ``hash(key)``. Value: an ``int`` packing
    the record's position ``fd << 70 | offset << 30 | length``, immutable and replaced by one
    dict store. ``_stripe_locks[i]`` is taken by writers of stripe i only, around "append the
    record, then store its position". So writes to one key are ordered the same way in the
    log and in the index (linearizable: a ``set`` that returned is visible to every later
    ``get``, and replay after a restart yields the last acknowledged value). Writers of
    different stripes only meet in the append.

Readers
    ``get`` takes no lock: dict lookup, ``os.pread`` of the position, checksum and key check,
    decode. Free-threaded 3.13 makes a dict lookup ~60x slower when the stored key and value
    objects are owned by another live thread; every key and position published into the
    index is therefore marked shareable first (``kvs.freethreading``). Readers announce their
    reads in a per-thread slot so that retired segments are closed only after a grace period
    (``readers.py`` has the happens-before argument).

Compaction
    A background thread (``_compactor``) runs when stale bytes pass ``compaction_threshold``
    and make up ``compaction_ratio`` of the log. It seals the active segment, copies every
    live record of the sealed segments into new output segments (``(M, k)``, ordered between
    their inputs and the next active segment), swaps each index entry with a compare-and-set
    under that entry's stripe lock (one record at a time), makes the outputs and their hint
    files durable, writes a marker, waits for a reader grace period, then closes and deletes
    the inputs. Readers are never blocked; a writer waits at most for one record's swap.

Durability (``fsync=``)
    ``"never"`` (default): every acknowledged write has been handed to the OS: copied into
    the active segment's shared memory map, i.e. the page cache (survives a kill -9 of the
    process, not a power loss; ``_Segment`` says why a map and not ``pwrite``). ``"always"``: fsync
    before acknowledging, with group commit (concurrent writers share one fsync).
    ``"interval"``: a background fsync every ``fsync_interval`` seconds (default 1).
    Compaction outputs, hints and markers are always fsynced before inputs are deleted.
"""

from __future__ import annotations

import array
import contextlib
import logging
import mmap
import os
import struct
import sys
import threading
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

from kvs.engine import hints, record, segments
from kvs.engine.base import encode_text
from kvs.engine.datadir import DataDir, fsync_dir
from kvs.engine.readers import ReaderRegistry
from kvs.errors import KeyNotFoundError, KvsError
from kvs.freethreading import fresh_shared_int, share_fresh, share_fresh_str, shared_count_view
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES

log = logging.getLogger("kvs.engine.kvstore")

FORMAT_VERSION = 1
FsyncPolicy = Literal["never", "always", "interval"]
FSYNC_POLICIES = ("never", "always", "interval")

# Positions: one int packing (fd, offset, length), immutable, replaced by one dict store.
# Narrow form, for fd < 2**12, offset < 2**32, length < 2**16 (nearly every record):
# fd << 48 | offset << 16 | length, below 2**60: two 30-bit digits (48 bytes, 8 less than
# the wide form, which counts at a million keys). Wide form otherwise:
# 2**89 | fd << 70 | offset << 30 | length, three digits, always >= 2**60.
_NARROW_LIMIT = 1 << 60
_WIDE = 1 << 89
_FD_SHIFT = 70
_OFF_SHIFT = 30
_LEN_MASK = (1 << 30) - 1
_OFF_MASK = (1 << 40) - 1
_FD_MASK = (1 << 19) - 1
# Reading (replay, compaction) accepts any record the format can address: the size limits
# of ``open`` apply to new writes only, so reopening with smaller limits keeps old records.
_MAX_STORED_RECORD = _LEN_MASK
_HEADER_SIZE = record.HEADER_SIZE
_HEADER_UNPACK = record.HEADER.unpack_from
share_fresh(_HEADER_UNPACK)  # made just now by this import; read by every reader thread
_OP_SET = record.OP_SET
_HEADER_PACK = record.HEADER.pack
_CRC_PACK = struct.Struct("<I").pack
_CRC_RESIDUE = record.CRC_RESIDUE
_crc32 = zlib.crc32
_pread = os.pread
_FIRST_ALLOCATION = 1 << 20  # the active segment's first extension (then doubling)
# madvise(MADV_POPULATE_WRITE) (Linux 5.14+; Python 3.13's mmap module has no name for it):
# fault in the pages of a range as writes would, without changing their contents.
_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)
_PREFAULT_BYTES = 64 * 1024  # the pages populated ahead of the appends at a time
_PAGE_MASK = ~(mmap.PAGESIZE - 1)
_TOTAL, _LIVE = 0, 1  # indexes of KvStore._sizes
_NEVER = float("inf")  # a _stale_mark no store reaches
_SHARED_COUNTS = shared_count_view()  # see kvs.freethreading.share_fresh; None when not needed


def _pack(fd: int, offset: int, length: int) -> int:
    """The position of the record of ``length`` bytes at ``offset`` in the file ``fd``."""
    if fd < 4096 and offset < 1 << 32 and length < 1 << 16:
        return (fd << 48) | (offset << 16) | length
    if fd > _FD_MASK:
        raise KvsError(f"file descriptor {fd} is beyond what a position can hold ({_FD_MASK})")
    return _WIDE | (fd << _FD_SHIFT) | (offset << _OFF_SHIFT) | length


def _unpack(pos: int) -> tuple[int, int, int]:
    """``(fd, offset, length)`` of a position."""
    if pos < _NARROW_LIMIT:
        return pos >> 48, (pos >> 16) & 0xFFFFFFFF, pos & 0xFFFF
    return (pos >> _FD_SHIFT) & _FD_MASK, (pos >> _OFF_SHIFT) & _OFF_MASK, pos & _LEN_MASK


def _length(pos: int) -> int:
    return pos & 0xFFFF if pos < _NARROW_LIMIT else pos & _LEN_MASK


class _ClosedShards:
    """``KvStore._shards`` while the store is not open: every ``get`` raises."""

    __slots__ = ()

    def __getitem__(self, _index: int) -> tuple[dict[str, int], dict[str, tuple[int, str]]]:
        raise KvsError("the store is closed")


_CLOSED_SHARDS = _ClosedShards()


_SPINS = 64 if (os.cpu_count() or 1) > 1 else 0  # tries (about 13 us here) before _acquire_spinning sleeps


def _acquire_spinning(lock: threading.Lock) -> None:
    """Acquire ``lock``, which was just found held, for a holder that keeps it about a
    microsecond: retry without letting go of the CPU for a while, then wait as usual.

    A plain ``acquire`` spins too, but each of its up to 40 tries first calls
    ``sched_yield``, which gives this CPU to any other thread ready to run on it, such
    as a client on the same machine; the server thread then waits for that thread's whole
    turn, hundreds of microseconds, for a lock that was free again after one (measured on
    the append lock under redis-benchmark: 4% of appends found it held, waiting 29 us at
    the median and 640 us at the 90th percentile, while 99% of holds took at most 6.1 us).
    A holder that was preempted is still waited for without burning the CPU: after the
    retries this thread sleeps in ``acquire``."""
    for _ in range(_SPINS):
        if lock.acquire(False):
            return
    lock.acquire()


class _Segment:
    """A segment file. ``size`` (the end of its records), ``durable``, ``allocated`` and
    ``writer`` change under ``_append_lock`` (active segment) or belong to the compactor
    (outputs); readers never use this object.

    The active segment is written through ``writer``, a shared writable memory map of its
    first ``allocated`` bytes: the file is extended ahead of the records with
    ``posix_fallocate`` (real blocks, zero-filled), so an append is a copy into the page
    cache under the append lock, not a system call. Sealing unmaps it and truncates the file
    to ``size``.

    ``populated``: the pages of ``writer`` below it are (or are being) faulted in ahead of
    the appends (``KvStore._prefault``); ``mark``: an append ending past it takes the slow
    path (``KvStore._past_mark``: grow the map, populate the next pages). ``mark <=
    allocated`` always, so no append can write past the mapped bytes."""

    __slots__ = ("gen", "path", "fd", "size", "durable", "allocated", "writer", "populated", "mark")

    def __init__(self, gen: int, path: Path, fd: int, size: int) -> None:
        self.gen = gen
        self.path = path
        self.fd = fd
        self.size = size
        self.durable = size
        self.allocated = 0  # bytes of the file mapped for writing (active segment only)
        self.writer: mmap.mmap | None = None
        self.populated = 0
        self.mark = 0


class KvStore:
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
        if fsync not in FSYNC_POLICIES:
            raise KvsError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}, not {fsync!r}")
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
        if record.OVERHEAD + max_key_bytes + max_value_bytes > _LEN_MASK:
            raise KvsError("max_key_bytes + max_value_bytes must stay under 1 GiB")
        if cache_entries < 0 or cache_value_bytes < 0:
            raise KvsError("cache_entries and cache_value_bytes must be >= 0")
        store = cls.__new__(cls)
        store._init(Path(path), fsync, fsync_interval, compaction_threshold, compaction_ratio,
                    max_segment_bytes, stripes, max_key_bytes, max_value_bytes)
        store._cache_per_stripe = -(-cache_entries // stripes)  # ceiling: 0 stays 0
        store._cache_value_bytes = cache_value_bytes
        try:
            store._recover()
            store._publish_for_readers()
            store._start_background(background_compaction)
        except BaseException:
            store._abort_open()
            raise
        return store

    def _init(self, path: Path, fsync: str, fsync_interval: float, compaction_threshold: int,
              compaction_ratio: float, max_segment_bytes: int, stripes: int,
              max_key_bytes: int, max_value_bytes: int) -> None:
        self.path = path
        self._fsync = fsync
        self._fsync_always = fsync == "always"
        self._fsync_interval = fsync_interval
        self._compaction_threshold = compaction_threshold
        self._compaction_ratio = compaction_ratio
        self._max_segment = max_segment_bytes
        # The size at which the active segment rolls over: max_segment_bytes, or another
        # max_segment_bytes further after a failed roll-over (_try_roll_over); under _append_lock.
        self._roll_at = max_segment_bytes
        self._roll_failures = 0  # failed roll-overs since the last one that worked
        self._max_key = max_key_bytes
        self._max_value = max_value_bytes
        self._closed = True  # until recovery has finished
        self._dir: DataDir | None = None
        self._mask = stripes - 1
        self._stripes: list[dict[str, int]] = [{} for _ in range(stripes)]
        for stripe in self._stripes:
            share_fresh(stripe)
        share_fresh(self._stripes)
        self._stripe_locks = [threading.Lock() for _ in range(stripes)]
        # Value cache: per stripe, key -> (position, value). An entry counts only while its
        # position object is the one in the index (see get); readers fill it lock-free.
        self._caches: list[dict[str, tuple[int, str]]] = [{} for _ in range(stripes)]
        for cache in self._caches:
            share_fresh(cache)
        share_fresh(self._caches)
        # What get reads: (index stripe, cache) pairs, one load from self for both; a stand-in
        # that raises while the store is not open (before recovery, after close).
        self._shards: list[tuple[dict[str, int], dict[str, tuple[int, str]]]] | _ClosedShards = _CLOSED_SHARDS
        self._append_lock = threading.Lock()
        # Held around every madvise on, and every close of, an active segment's writable map,
        # so _prefault (outside the append lock) never touches a map being closed. Order:
        # _append_lock, then _map_lock.
        self._map_lock = threading.Lock()
        self._prefault_bytes = _PREFAULT_BYTES if _MADV_POPULATE_WRITE is not None else 0
        self._segments: dict[int, _Segment] = {}  # gen -> segment; under _append_lock
        self._by_fd: dict[int, _Segment] = {}     # fd -> segment; under _append_lock
        self._active: _Segment | None = None
        # [_TOTAL]: bytes of all segments; [_LIVE]: bytes of the records the index points to.
        # Under _append_lock. Machine integers in an array, not two int attributes: every
        # write replaces both, and an int object made by one thread and dropped by another
        # goes through CPython's biased-reference-count merge queue, whose mutex the owner
        # thread takes too; inside the append lock, that kept the lock held longer and
        # doubled the other writer's spinning (docs/free-threading.md, section 2c).
        self._sizes = array.array("q", [0, 0])
        self._readers = ReaderRegistry()
        self._reader_local = self._readers.local
        share_fresh(self._reader_local)
        self._compact_lock = threading.Lock()
        self._compaction_wanted = threading.Event()
        # Stale bytes at which _append next asks whether a compaction is due (see
        # _maybe_want_compaction); under _append_lock.
        self._stale_mark: float = compaction_threshold
        self._stopping = threading.Event()
        self._sync_cond = threading.Condition()
        self._syncing = False
        self._threads: list[threading.Thread] = []
        self._close_lock = threading.Lock()
        self.compactions = 0

    def _abort_open(self) -> None:
        self._stopping.set()
        self._compaction_wanted.set()
        for t in self._threads:
            t.join()
        for seg in self._segments.values():
            if seg.writer is not None:
                seg.writer.close()
            os.close(seg.fd)
        self._segments.clear()
        if self._dir is not None:
            self._dir.close()

    # ------------------------------------------------------------------ recovery
    def _recover(self) -> None:
        self._dir = DataDir(self.path, self.name, FORMAT_VERSION)
        directory = self.path
        for entry in directory.iterdir():
            if entry.name.endswith(".tmp"):
                entry.unlink()  # an interrupted compaction's output: its inputs are intact
        for major in segments.list_markers(directory):
            # Compaction `major` finished its outputs but may not have deleted its inputs.
            for g in segments.list_segments(directory):
                if g < segments.gen(major, 1):
                    (directory / segments.log_name(g)).unlink(missing_ok=True)
                    (directory / segments.hint_name(g)).unlink(missing_ok=True)
            (directory / segments.marker_name(major)).unlink()
        gens = segments.list_segments(directory)
        for g in gens:
            newest = g == gens[-1]
            seg = self._open_segment_file(g, writable=newest)
            self._replay(seg, newest)
        for h in directory.glob("*.hint"):
            if h.with_suffix(".log").name not in {segments.log_name(g) for g in self._segments}:
                h.unlink()  # a hint whose segment is gone
        # Empty segments carry nothing; the newest one is reused as the active segment.
        next_major = segments.major_of(gens[-1]) + 1 if gens else 1
        last = self._segments.get(gens[-1]) if gens else None
        if last is not None and last.size == 0 and segments.minor_of(last.gen) == 0:
            self._active = last
        else:
            self._active = self._create_segment(segments.gen(next_major))
        self._sizes[_LIVE] = sum(_length(pos) for s in self._stripes for pos in s.values())
        self._sizes[_TOTAL] = sum(s.size for s in self._segments.values())
        shards = [(stripe, cache) for stripe, cache in zip(self._stripes, self._caches)]
        for shard in shards:
            share_fresh(shard)
        share_fresh(shards)
        self._shards = shards
        self._closed = False
        log.debug("opened %s: %d keys, %d segments, %d live of %d bytes", self.path,
                  sum(len(s) for s in self._stripes), len(self._segments),
                  self._sizes[_LIVE], self._sizes[_TOTAL])

    def _open_segment_file(self, g: int, writable: bool) -> _Segment:
        path = self.path / segments.log_name(g)
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise KvsError(f"cannot open {path}: {exc.strerror}") from None
        seg = _Segment(g, path, fd, os.fstat(fd).st_size)
        self._segments[g] = seg
        self._by_fd[fd] = seg
        return seg

    def _create_segment(self, g: int) -> _Segment:
        path = self.path / segments.log_name(g)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise KvsError(f"cannot create segment {path}: {exc.strerror}") from None
        if self._fsync != "never":
            try:
                fsync_dir(self.path)
            except OSError as exc:
                os.close(fd)
                path.unlink(missing_ok=True)
                raise KvsError(f"cannot create segment {path}: {exc.strerror}") from None
        seg = _Segment(g, path, fd, 0)
        self._segments[g] = seg
        self._by_fd[fd] = seg
        return seg

    def _replay(self, seg: _Segment, newest: bool) -> None:
        """Apply the records of ``seg`` to the index, from its hint file when it has a good
        one. A damaged tail of the newest segment is cut off; other damage is an error."""
        hint_path = self.path / segments.hint_name(seg.gen)
        if hint_path.exists():
            try:
                entries = hints.read_hint_file(str(hint_path), seg.size)  # checked, lazy
            except hints.BadHintFile as exc:
                log.warning("%s: %s; replaying %s from its log instead", hint_path, exc, seg.path.name)
            else:
                self._index_hints(seg, entries)
                return
        with _mapped(seg) as data:
            try:
                with contextlib.closing(record.scan(data, _MAX_STORED_RECORD)) as records:
                    for pos, op, key, length in records:
                        if op == _OP_SET:
                            self._index_put(key, _pack(seg.fd, pos, length))
                        else:
                            self._stripes[hash(k := key.decode()) & self._mask].pop(k, None)
            except record.CorruptRecord as exc:
                unwritten = newest and _is_zeros(data, exc.offset)
                if not (unwritten or newest and _is_torn_tail(data, exc.offset, _MAX_STORED_RECORD)):
                    raise KvsError(f"data corruption in {seg.path} at offset {exc.offset}: {exc.reason}") from None
                torn = exc
            else:
                return
        if unwritten:  # space allocated ahead of the records by a store that was not closed
            log.debug("%s: cutting off %d bytes allocated ahead and never written",
                      seg.path, seg.size - torn.offset)
        else:
            log.warning("%s: cutting off a torn or corrupt record at offset %d (%s), "
                        "%d bytes: the tail of an interrupted write",
                        seg.path, torn.offset, torn.reason, seg.size - torn.offset)
        try:
            os.ftruncate(seg.fd, torn.offset)
            os.fsync(seg.fd)
        except OSError as err:
            raise KvsError(f"cannot truncate the torn tail of {seg.path}: {err.strerror}") from None
        seg.size = seg.durable = torn.offset

    def _index_put(self, key_bytes: bytes, pos: int) -> None:
        """Store the position of ``key_bytes`` while ``open`` replays. The key and the
        position are new objects of this thread: they are marked shareable before the dict
        store publishes them (a key the stripe already holds keeps its stored object)."""
        key = key_bytes.decode()
        stripe = self._stripes[hash(key) & self._mask]
        share_fresh(pos)
        if key not in stripe:
            share_fresh_str(key)
        stripe[key] = pos

    def _index_hints(self, seg: _Segment, entries: Iterator[tuple[bytes, int, int]]) -> None:
        """``_index_put`` of every hint entry of ``seg``, inlined: the loop of ``open`` at a
        million keys. Each key and position is a new object of this thread, marked shareable
        (``kvs.freethreading``) before the dict store publishes it; a key longer than one
        character is never an immortal singleton."""
        stripes = self._stripes
        mask = self._mask
        fd = seg.fd
        words = _SHARED_COUNTS
        narrow = fd << 48 if fd < 4096 and seg.size <= 1 << 32 else -1
        for key_bytes, offset, length in entries:
            key = key_bytes.decode()
            pos = narrow | offset << 16 | length if narrow >= 0 and length < 1 << 16 else _pack(fd, offset, length)
            if words is not None:
                words[(id(pos) + 16) >> 3] = 1
                if len(key) > 1:
                    words[(id(key) + 16) >> 3] = 1
                else:
                    share_fresh_str(key)
            stripes[hash(key) & mask][key] = pos

    def _publish_for_readers(self) -> None:
        """Mark the objects ``get`` loads from ``self`` as shareable. Attribute loads, like
        dict lookups, take CPython's locked slow path for an object owned by another live
        thread (the opening thread) unless it is marked. Runs before any other thread can
        reach the store."""
        self._max_key = fresh_shared_int(self._max_key)
        self._mask = fresh_shared_int(self._mask)
        self._cache_per_stripe = fresh_shared_int(self._cache_per_stripe)
        self._cache_value_bytes = fresh_shared_int(self._cache_value_bytes)
        self._prefault_bytes = fresh_shared_int(self._prefault_bytes)
        share_fresh(self._readers)
        share_fresh(self)

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

    # ------------------------------------------------------------------ public API
    def get(self, key: str) -> str | None:
        """The value of ``key``, or ``None``. Takes no lock (see the module docstring).

        The index and the cache are read by subscript, never with ``dict.get``: on 3.13t
        ``dict.get`` runs inside the dict's critical section (Argument Clinic's
        ``@critical_section``: it locks the dict's mutex), while ``d[key]`` is the lock-free
        lookup. Two threads reading one dict through ``get`` contend on its mutex."""
        if type(key) is not str:
            key = _check_str(key, "key")
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
            if pos < _NARROW_LIMIT:
                length = pos & 0xFFFF
                data = _pread(pos >> 48, length, (pos >> 16) & 0xFFFFFFFF)
            else:
                length = pos & _LEN_MASK
                data = _pread((pos >> _FD_SHIFT) & _FD_MASK, length, (pos >> _OFF_SHIFT) & _OFF_MASK)
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
        The key, the value and the tuple are new objects of this thread, marked shareable
        before the dict store publishes them."""
        if len(cache) >= self._cache_per_stripe:
            if self._cache_per_stripe == 0:
                return
            try:
                del cache[next(iter(cache))]  # the oldest entry (dicts keep insertion order)
            except (StopIteration, RuntimeError, KeyError):
                pass  # raced with another eviction or insertion: fine
        key = kb.decode()
        entry = (pos, value)
        counts = _SHARED_COUNTS
        if counts is not None:  # share_fresh_str and share_fresh, inlined as in set
            if len(key) > 1 or (key and ord(key) > 0xFF):  # not an immortal singleton
                counts[(id(key) + 16) >> 3] = 1
            if len(value) > 1 or (value and ord(value) > 0xFF):
                counts[(id(value) + 16) >> 3] = 1
            counts[(id(entry) + 16) >> 3] = 1
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
        rec = self._encode_set(key, value)
        n = len(rec)
        i = hash(key) & self._mask
        stripe = self._stripes[i]
        with self._stripe_locks[i]:
            old = stripe.get(key)
            seg, offset = self._append(rec, n, n if old is None else n - _length(old))
            # Publish: the new position (and a new key's own copy) marked shareable, then
            # one dict store publishes them.
            fd = seg.fd
            pos = fd << 48 | offset << 16 | n if fd < 4096 and offset < 1 << 32 and n < 1 << 16 else _pack(fd, offset, n)
            if _SHARED_COUNTS is not None:
                _SHARED_COUNTS[(id(pos) + 16) >> 3] = 1
            if old is None:
                key = key.encode().decode()
                share_fresh_str(key)
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
        encode = self._encode_set
        recs = [encode(key, value) for key, value in items]
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
            for (key, _value), i, rec in zip(items, stripe_ids, recs):
                n = len(rec)
                old = latest.get(key)
                if old is None:
                    pos = stripes[i].get(key)
                    old = 0 if pos is None else _length(pos)
                latest[key] = n
                live_delta += n - old
            seg, offset = self._append(blob, len(blob), live_delta)
            fd = seg.fd
            counts = _SHARED_COUNTS
            for (key, _value), i, rec in zip(items, stripe_ids, recs):
                # published as in set
                n = len(rec)
                pos = _pack(fd, offset, n)
                if counts is not None:
                    counts[(id(pos) + 16) >> 3] = 1
                stripe = stripes[i]
                if key not in stripe:
                    key = key.encode().decode()
                    share_fresh_str(key)
                stripe[key] = pos
                offset += n
        finally:
            for lock in reversed(locks):
                lock.release()
        if self._fsync_always:
            self._group_commit(seg, offset)

    def _encode_set(self, key: str, value: str) -> bytes:
        """The checksummed SET record of ``key`` and ``value``, made before any lock; raises
        ``TypeError`` or ``KvsError`` for an argument that may not be stored."""
        if type(key) is not str or type(value) is not str:
            key, value = _check_str(key, "key"), _check_str(value, "value")
        try:
            kb = key.encode()
            vb = value.encode()
        except UnicodeEncodeError:
            kb, vb = b"", b""
        klen, vlen = len(kb), len(vb)
        if klen > self._max_key or vlen > self._max_value or not kb and key or not vb and value:
            encode_text(key, "key", self._max_key)  # raises the precise KvsError
            encode_text(value, "value", self._max_value)
        body = _HEADER_PACK(_OP_SET, klen, vlen) + kb + vb
        return body + _CRC_PACK(_crc32(body))

    def remove(self, key: str) -> None:
        """Delete ``key``; ``KeyNotFoundError`` when it is absent."""
        if type(key) is not str:
            key = _check_str(key, "key")
        kb = encode_text(key, "key", self._max_key)
        rec = record.encode_tombstone(kb)
        i = hash(key) & self._mask
        stripe = self._stripes[i]
        with self._stripe_locks[i]:
            old = stripe.get(key)
            if old is None:
                if self._closed:
                    raise KvsError("the store is closed")
                raise KeyNotFoundError(key)
            seg, offset = self._append(rec, len(rec), -_length(old))
            del stripe[key]
        if self._fsync_always:
            self._group_commit(seg, offset + len(rec))

    @property
    def fsync(self) -> str:
        """The durability policy this store was opened with."""
        return self._fsync

    def __len__(self) -> int:
        """The number of keys (a snapshot when writers are active)."""
        self._check_open()
        return sum(len(s) for s in self._stripes)

    def keys(self) -> list[str]:
        """A snapshot of the keys (each stripe copied under its lock)."""
        self._check_open()
        out: list[str] = []
        for stripe, lock in zip(self._stripes, self._stripe_locks):
            with lock:
                out.extend(stripe)
        return out

    def stats(self) -> dict[str, int]:
        """Sizes for monitoring and benchmarks: keys, segments, live/total bytes, compactions."""
        self._check_open()
        with self._append_lock:
            return {"keys": sum(len(s) for s in self._stripes), "segments": len(self._segments),
                    "live_bytes": self._sizes[_LIVE], "total_bytes": self._sizes[_TOTAL],
                    "compactions": self.compactions}

    def close(self) -> None:
        """Stop the background threads, flush, release the directory. Idempotent; calls
        that race with ``close`` may fail with ``KvsError``, later ones always do."""
        with self._close_lock:
            if self._closed and self._dir is None:
                return
            self._stopping.set()
            self._compaction_wanted.set()
            with self._sync_cond:
                self._sync_cond.notify_all()
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()
            with self._compact_lock, self._append_lock:
                self._closed = True
                self._shards = _CLOSED_SHARDS
                if self._active is not None:
                    try:
                        self._seal(self._active)
                    except OSError as exc:
                        log.error("%s: cannot seal the active segment: %s", self._active.path, exc.strerror)
            self._readers.grace_period()
            for seg in self._segments.values():
                os.close(seg.fd)
            self._segments.clear()
            self._by_fd.clear()
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

    # ------------------------------------------------------------------ writing
    def _check_open(self) -> None:
        if self._closed:
            raise KvsError("the store is closed")

    def _append(self, rec: bytes, n: int, live_delta: int) -> tuple[_Segment, int]:
        """Write ``rec`` (``n`` bytes: one or more records) at the end of the active
        segment; the segment and the offset it was written at.

        The only critical section all writers share: offset, a copy into the segment's
        memory map (the bytes are then in the page cache: a kill -9 cannot lose them, and
        every ``pread`` sees them), bookkeeping. Space is allocated before anything is
        written, so a full disk fails the call with ``KvsError`` and writes nothing.

        The copy must not fault pages in while the lock is held: a first write to a page of
        a shared file map costs about 4 us, sometimes milliseconds, and a writer waiting for
        the lock meanwhile spins, then sleeps. So the pages ahead of the appends are faulted
        in 64 KiB at a time by the writer that passes ``seg.mark``, after it lets go of the
        lock (``_prefault``)."""
        prefault = None
        lock = self._append_lock
        if not lock.acquire(False):
            _acquire_spinning(lock)
        try:
            if self._closed:
                raise KvsError("the store is closed")
            seg = self._active
            offset = seg.size
            end = offset + n
            if end > seg.mark:  # rare: grow the map, or take the next pages to populate
                prefault = self._past_mark(seg, end)
            seg.writer[offset:end] = rec
            seg.size = end
            sizes = self._sizes
            sizes[0] = total = sizes[0] + n  # _TOTAL
            sizes[1] = live = sizes[1] + live_delta  # _LIVE
            if end >= self._roll_at:
                self._try_roll_over(seg, end)
            if total - live >= self._stale_mark:
                self._maybe_want_compaction()  # rare: see there
        finally:
            lock.release()
        if prefault is not None:
            self._prefault(*prefault)
        return seg, offset

    def _past_mark(self, seg: _Segment, end: int) -> tuple[mmap.mmap, int, int] | None:
        """An append to ``end`` passes ``seg.mark``: map more of the file if ``end`` needs it,
        and take the next pages to populate, ``(map, start, length)``, for the caller to
        pass to ``_prefault`` once it has let go of the lock (None: nothing to populate).
        Caller holds ``_append_lock``."""
        if end > seg.allocated:
            self._allocate(seg, end)  # a new map, none of its pages populated
        chunk = self._prefault_bytes
        job = None
        if chunk and seg.populated < seg.allocated:
            start = max(seg.populated, end & _PAGE_MASK)
            stop = min(start + chunk, seg.allocated)
            seg.populated = stop
            job = (seg.writer, start, stop - start)
        if not chunk or seg.populated >= seg.allocated:
            seg.mark = seg.allocated
        else:  # populate the next pages when the appends are halfway through these
            seg.mark = max(end, seg.populated - chunk // 2)
        return job

    def _prefault(self, writer: mmap.mmap, start: int, length: int) -> None:
        """Fault in ``length`` bytes of pages of the active segment's map from ``start``,
        as writes would, without changing them (they are the zeros the file was extended
        with). Not under the append lock: appends below ``start`` go on meanwhile, and one
        that overtakes it faults its pages in itself, as without this. A map closed
        meanwhile (grown, sealed) is skipped; a kernel without ``MADV_POPULATE_WRITE``
        turns this off for the store."""
        with self._map_lock:
            if writer.closed:
                return
            try:
                writer.madvise(_MADV_POPULATE_WRITE, start, length)
            except (OSError, ValueError) as exc:
                self._prefault_bytes = 0
                log.debug("%s: cannot populate pages ahead of the appends (%s); writes fault them in",
                          self.path, exc)

    def _try_roll_over(self, seg: _Segment, end: int) -> None:
        """Roll over after the write that took the active segment ``seg`` to ``end`` bytes.
        That write has succeeded whatever happens here. When the roll-over fails (no file
        descriptor left, a full directory, ...), ``seg`` stays active and the next attempt
        waits until another ``max_segment_bytes`` have been written: a lasting failure costs
        one seal, re-map and failed ``open`` per segment of data, not per write, and logs
        once. Caller holds ``_append_lock``."""
        try:
            self._roll_over()
        except KvsError as exc:
            self._roll_at = end + self._max_segment
            self._roll_failures += 1
            if self._roll_failures == 1:
                log.error("%s; %s stays the active segment and takes the writes "
                          "(roll-over retried every %d bytes)", exc, seg.path.name, self._max_segment)

    def _allocate(self, seg: _Segment, end: int) -> None:
        """Extend the active segment's file and its writable map to hold at least ``end``
        bytes: doubling from 1 MiB up to ``max_segment_bytes`` (the last record of a segment
        may pass it). ``posix_fallocate`` gives the space real blocks, so a store into the
        map never meets a full disk (which would be a SIGBUS, not an error). Caller holds
        ``_append_lock``."""
        grown = max(2 * seg.allocated, _FIRST_ALLOCATION)
        # Past max_segment_bytes (a roll-over failed) the map keeps doubling: O(1) amortized.
        want = max(end, grown if end > self._max_segment else min(self._max_segment, grown))
        try:
            os.posix_fallocate(seg.fd, seg.allocated, want - seg.allocated)
            writer = mmap.mmap(seg.fd, want, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, trackfd=False)
        except (OSError, ValueError) as exc:
            raise KvsError(f"cannot extend {seg.path} to {want} bytes: {getattr(exc, 'strerror', None) or exc}") from None
        if seg.writer is not None:
            with self._map_lock:
                seg.writer.close()
        seg.writer = writer
        seg.allocated = want
        seg.populated = 0
        seg.mark = 0  # _past_mark, which called this, sets it

    def _seal(self, seg: _Segment) -> None:
        """Unmap the active segment and cut its file to its records (then fsync unless the
        policy is ``never``). Caller holds ``_append_lock``."""
        writer, seg.writer = seg.writer, None
        allocated, seg.allocated = seg.allocated, 0  # a failure below: the next append re-maps
        seg.populated = seg.mark = 0
        if writer is not None:
            with self._map_lock:
                writer.close()
        if allocated:
            os.ftruncate(seg.fd, seg.size)
        if self._fsync != "never":
            os.fsync(seg.fd)
            seg.durable = seg.size

    def _roll_over(self) -> None:
        """Seal the active segment, then start the next one. Caller holds ``_append_lock``.

        Sealing first is what makes a kill -9 safe: until the next segment exists, the
        active one is the newest, and only the newest segment's unwritten (zero) tail is
        cut at open; a sealed segment followed by a newer one must end at its last record.
        (Creating first and being killed before the seal left a zero tail in a segment
        that was no longer the newest: open then refused the store as corrupt.) When the
        seal or the creation fails, the sealed segment stays active and its next append
        maps it again."""
        old = self._active
        try:
            self._seal(old)
        except OSError as exc:
            raise KvsError(f"cannot seal {old.path}: {exc.strerror}") from None
        self._active = self._create_segment(segments.gen(segments.major_of(old.gen) + 1))
        self._roll_at = self._max_segment
        if self._roll_failures:
            log.warning("%s: segment roll-over works again after %d failed attempts",
                        self.path, self._roll_failures)
            self._roll_failures = 0
        with self._sync_cond:
            self._sync_cond.notify_all()

    def _group_commit(self, seg: _Segment, end: int) -> None:
        """fsync so that ``seg`` is durable up to ``end``, sharing fsyncs: one writer (the
        leader) fsyncs everything written so far while the others wait for its result."""
        with self._sync_cond:
            while seg.durable < end:
                if self._syncing:
                    self._sync_cond.wait()
                    continue
                self._syncing = True
                target = seg.size  # every byte below it was written before this fsync starts
                self._sync_cond.release()
                try:
                    os.fsync(seg.fd)
                except OSError as exc:
                    raise KvsError(f"fsync of {seg.path} failed: {exc.strerror}") from None
                finally:
                    self._sync_cond.acquire()
                    self._syncing = False
                    self._sync_cond.notify_all()
                if target > seg.durable:
                    seg.durable = target

    def _interval_syncer(self) -> None:
        """Background fsync of the active segment every ``fsync_interval`` seconds."""
        while not self._stopping.wait(self._fsync_interval):
            seg = self._active
            if seg is not None and seg.durable < seg.size:
                target = seg.size
                try:
                    os.fsync(seg.fd)
                    seg.durable = max(seg.durable, target)
                except OSError as exc:
                    log.error("interval fsync of %s failed: %s", seg.path, exc.strerror)

    # ------------------------------------------------------------------ compaction
    def _compaction_due(self) -> bool:
        total = self._sizes[_TOTAL]
        stale = total - self._sizes[_LIVE]
        return stale >= self._compaction_threshold and stale >= self._compaction_ratio * total

    def _maybe_want_compaction(self) -> None:
        """Wake the compactor when a compaction is due, else move ``_stale_mark`` to the
        fewest stale bytes at which one can next be due. Caller holds ``_append_lock`` (or
        is ``open``).

        A compaction is due when stale bytes reach both ``compaction_threshold`` and
        ``compaction_ratio`` of all bytes. All bytes only grow until the next compaction,
        so none can be due before stale bytes reach ``max(threshold, ratio * total now)``:
        ``_append`` compares one number per write and calls this a few times per
        compaction cycle. (Comparing with the threshold alone called it on every write of
        a store holding over twice the threshold in live data, under the append lock.)
        Once it has woken the compactor the mark is out of reach until the compaction ends
        (``compact`` resets it)."""
        if self._compaction_due():
            self._stale_mark = _NEVER
            self._compaction_wanted.set()
        else:
            self._stale_mark = max(self._compaction_threshold, self._compaction_ratio * self._sizes[_TOTAL])

    def _compactor(self) -> None:
        """The background compaction thread: waits for the trigger, compacts, repeats."""
        backoff = 1.0
        while True:
            self._compaction_wanted.wait()
            if self._stopping.is_set():
                return
            self._compaction_wanted.clear()
            if not self._compaction_due():
                # Set on sizes that a compaction has changed since (a manual one, say).
                self._rearm_compaction_trigger()
                continue
            try:
                self.compact()
                backoff = 1.0
                continue
            except KvsError as exc:  # an expected failure: one line says it all
                log.error("%s; retrying in %.0f s", exc, backoff)
            except Exception:
                log.exception("compaction of %s failed; retrying in %.0f s", self.path, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, 60.0)

    def _rearm_compaction_trigger(self) -> None:
        """Let the next write ask again whether a compaction is due, with the sizes of then
        (after a compaction, or a trigger that one made stale)."""
        with self._append_lock:
            self._stale_mark = self._compaction_threshold

    def compact(self) -> None:
        """Merge every sealed segment into new ones holding only live records (runs in the
        calling thread; the background compactor calls this too).

        A failure (no descriptor left, a full disk, ...) raises ``KvsError`` and loses no
        record: each one is still in an input or an output segment, and the next compaction
        merges both."""
        with self._compact_lock:
            self._check_open()
            try:
                self._compact_sealed_segments()
            except OSError as exc:
                where = f" ({exc.filename})" if exc.filename else ""
                raise KvsError(f"compaction of {self.path} failed: {exc.strerror or exc}{where}; "
                               "no record is lost and the next compaction retries") from exc
            finally:
                self._rearm_compaction_trigger()

    def _compact_sealed_segments(self) -> None:
        """The body of ``compact``. Caller holds ``_compact_lock``."""
        with self._append_lock:
            self._roll_over()
            active_gen = self._active.gen
            inputs = [s for g, s in sorted(self._segments.items()) if g != active_gen]
        if not inputs:
            return
        major = segments.major_of(inputs[-1].gen)
        outputs = _CompactionOutput(self, major)
        try:
            for seg in inputs:
                self._copy_live_records(seg, outputs)
            outputs.finish()
        finally:
            # Even after a failure the outputs stay: index entries may point into them
            # (each record was written before its entry was swapped), and the inputs are
            # kept too, so every record still exists on disk; a later compaction merges
            # both. Files still named *.tmp are dropped at the next open, which replays
            # the inputs.
            with self._append_lock:
                for seg in outputs.segments:
                    self._segments[seg.gen] = seg
                    self._by_fd[seg.fd] = seg
                    self._sizes[_TOTAL] += seg.size
        # Outputs and hints are durable; from here on the inputs are redundant.
        marker = self.path / segments.marker_name(major)
        _write_durable(marker, b"")
        self._readers.grace_period()
        with self._append_lock:
            for seg in inputs:
                del self._segments[seg.gen]
                del self._by_fd[seg.fd]
                self._sizes[_TOTAL] -= seg.size
        for seg in inputs:
            os.close(seg.fd)
            seg.path.unlink(missing_ok=True)
            (self.path / segments.hint_name(seg.gen)).unlink(missing_ok=True)
        marker.unlink()
        fsync_dir(self.path)
        self.compactions += 1
        log.debug("compacted %s: %d segments into %d", self.path, len(inputs), len(outputs.segments))

    def _copy_live_records(self, seg: _Segment, out: _CompactionOutput) -> None:
        """Copy the records of ``seg`` that the index still points to, swapping each entry."""
        fd = seg.fd
        mask = self._mask
        stripes = self._stripes
        with _mapped(seg) as data, contextlib.closing(record.scan(data, _MAX_STORED_RECORD)) as records:
            for offset, op, key_bytes, length in records:
                if op != _OP_SET:
                    continue
                key = key_bytes.decode()
                old = _pack(fd, offset, length)
                i = hash(key) & mask
                if stripes[i].get(key) != old:
                    continue  # overwritten or removed since: dead
                new = out.add(data[offset:offset + length], key_bytes)
                share_fresh(new)
                with self._stripe_locks[i]:
                    if stripes[i].get(key) == old:  # compare-and-set: a writer may have won
                        stripes[i][key] = new


class _CompactionOutput:
    """The output segments of one compaction: ``(major, 1)``, ``(major, 2)``, … written as
    ``*.tmp`` files, renamed into place with their hint files once complete and durable."""

    def __init__(self, store: KvStore, major: int) -> None:
        self.store = store
        self.major = major
        self.segments: list[_Segment] = []
        self._hints: list[list[bytes]] = []
        self._current: _Segment | None = None

    def _next_segment(self) -> _Segment:
        g = segments.gen(self.major, len(self.segments) + 1)
        tmp = self.store.path / (segments.log_name(g) + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        seg = _Segment(g, tmp, fd, 0)  # finish renames it; until then its path is the .tmp
        self.segments.append(seg)
        self._hints.append([])
        return seg

    def add(self, rec: bytes, key: bytes) -> int:
        """Append one record; its new packed position (readable at once through the fd)."""
        seg = self._current
        if seg is None or seg.size >= self.store._max_segment:
            seg = self._current = self._next_segment()
        offset = seg.size
        view = memoryview(rec)
        while view:
            view = view[os.pwrite(seg.fd, view, offset + len(rec) - len(view)):]
        seg.size = offset + len(rec)
        self._hints[-1].append(hints.encode_entry(key, offset, len(rec)))
        return _pack(seg.fd, offset, len(rec))

    def finish(self) -> None:
        """Make every output and hint file durable and give them their final names."""
        for seg, entries in zip(self.segments, self._hints):
            os.fsync(seg.fd)
            seg.durable = seg.size
            hint_tmp = self.store.path / (segments.hint_name(seg.gen) + ".tmp")
            hints.write_hint_file(str(hint_tmp), entries, len(entries))
            os.replace(hint_tmp, self.store.path / segments.hint_name(seg.gen))
            final = self.store.path / segments.log_name(seg.gen)
            os.replace(seg.path, final)
            seg.path = final
        fsync_dir(self.store.path)
        self._hints = []


def _check_str(value: object, what: str) -> str:
    if isinstance(value, str):
        return str(value)
    raise TypeError(f"{what} must be str, not {type(value).__name__}")


@contextlib.contextmanager
def _mapped(seg: _Segment) -> Iterator[bytes | mmap.mmap]:
    """The first ``seg.size`` bytes of a segment, memory-mapped read-only for a sequential
    scan (replay, compaction). Mapping instead of reading keeps the scan from holding a
    second copy of the log in the heap: reading a 64 MiB segment into ``bytes`` left most of
    it resident after replay (the allocator does not hand freed memory back at once), which
    showed up as ~10 bytes per key of "index" memory at a million keys. The segment must not
    shrink while mapped: the store owns its directory (flock) and only ``open`` truncates,
    after its scan of the segment is over."""
    if seg.size == 0:
        yield b""
        return
    try:
        view = mmap.mmap(seg.fd, seg.size, access=mmap.ACCESS_READ, trackfd=False)
    except (OSError, ValueError) as exc:
        raise KvsError(f"cannot map {seg.path}: {exc}") from None
    try:
        view.madvise(mmap.MADV_SEQUENTIAL)
        yield view
    finally:
        try:
            view.close()
        except BufferError:
            pass  # an exception left a slice of it alive: it is unmapped when collected


def _is_zeros(data: bytes | mmap.mmap, offset: int) -> bool:
    """True when every byte of ``data`` from ``offset`` on is zero: space the active segment
    had allocated ahead of its records (no record starts with a zero byte)."""
    chunk = 1 << 20
    for start in range(offset, len(data), chunk):
        part = data[start:start + chunk]
        if part.count(0) != len(part):
            return False
    return True


def _is_torn_tail(data: bytes, offset: int, max_record: int) -> bool:
    """True when the damage at ``offset`` can only be an interrupted final write: nothing
    valid follows it. A record whose header still gives a plausible length and after which
    the log continues with valid records means corruption in the middle."""
    if len(data) - offset < record.OVERHEAD:
        return True
    op, klen, vlen = _HEADER_UNPACK(data, offset)
    nxt = offset + record.OVERHEAD + klen + vlen
    if op not in (record.OP_SET, record.OP_TOMBSTONE) or nxt >= len(data) or nxt - offset > max_record:
        return True
    try:
        for _ in record.scan(memoryview(data)[nxt:], max_record):
            pass
    except record.CorruptRecord:
        return True
    return False


def _write_durable(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)


from kvs.freethreading import share_module_globals  # noqa: E402  (last: marks this module's globals)

share_module_globals(globals())

"""The segment log of ``KvStore``: segment files, and the append to the active one.

The log is a sequence of append-only segment files (``segments.py`` names and orders them;
``record.py`` is the record format). Writers append to the *active* segment only, under
``_append_lock``, the one serialization of all writers; the record is encoded and
checksummed before the lock is taken, and the append itself is a copy into a shared memory
map of the segment (:class:`Segment`), not a system call.

Why a map and not ``pwrite``, and why readers see the bytes
    Linux has one page cache per file: the bytes copied into a ``MAP_SHARED`` map are what
    ``pread`` of the same file returns as soon as the copy is done, and they survive a
    kill -9 of the process (not a power loss: that is what ``fsync=`` is for, see
    ``durability.py``). A reader learns a record's position only from the index store that
    follows the copy, under the key's stripe lock (``kvstore.py``), so it never reads bytes
    before they were copied.

Growth and prefaulting
    The file is extended ahead of the records with ``posix_fallocate`` (real, zero-filled
    blocks: a store into the map never meets a full disk, which would be a SIGBUS, not an
    error) and mapped again, doubling from :data:`FIRST_ALLOCATION` up to
    ``max_segment_bytes``. The first write to a page of a shared file map faults, and a fault
    inside the append lock keeps every other writer waiting (``docs/free-threading.md``,
    section 2c): so the writer that passes ``Segment.mark`` takes the next
    :data:`PREFAULT_BYTES` of pages and populates them with ``MADV_POPULATE_WRITE`` after it
    has let go of the lock (:meth:`SegmentLog._prefault`). ``mark <= allocated`` always, so
    no append can write past the mapped bytes.

Roll-over and sealing
    An append that takes the active segment to ``max_segment_bytes`` rolls over: the segment
    is *sealed* (unmapped, cut to its records, fsynced unless the policy is ``never``), then
    the next one is created. Sealing first is what makes a kill -9 safe: until the next
    segment exists the sealed one is the newest, and only the newest segment's unwritten
    (zero) tail is cut at open; a sealed segment followed by a newer one must end at its
    last record. A roll-over that fails leaves the segment active and is retried only after
    another ``max_segment_bytes``.

Read maps
    Readers copy a record out of a read-only shared map of its segment (``_read_maps``,
    indexed by descriptor), which costs no system call, and ``pread`` the segments that
    have none (a compaction output until it is finished, a descriptor beyond the list, a
    map that could not be made). A segment's read map covers every record whose position
    has been published: the active segment's is made again each time its file grows
    (:meth:`SegmentLog._allocate`), before the append that needs the new bytes; a
    compaction's output is mapped once it is complete; recovery maps what it opened. The
    list store publishing a map comes before (program order, then the sequentially
    consistent index store) any position a reader could use it for, so a reader that loaded
    a position finds a map covering it, or ``None``.

    Read maps are never closed: a map that is replaced or retired is only dropped from the
    list, and unmapped when the last reference goes (a reader copying out of it holds one).
    That is what makes them safe without a lock: a reader never meets a closed map. The
    entry is dropped before the segment's descriptor is closed, so a descriptor number
    reused by a newer segment never finds the old map. A map of the active segment outlives
    the cut of the file at sealing (its pages past the new end are never read: no record is
    there). ``docs/architecture.md`` ("The read path") has what this saves.

Locks
    ``_append_lock``: the active segment, its ``Segment`` fields, ``_segments``, ``_by_fd``,
    ``_sizes`` and the roll-over state. ``_map_lock``: held around every ``madvise`` on, and
    every close of, an active segment's writable map, so that ``_prefault`` (outside the
    append lock) never touches a map being closed. Order: ``_append_lock``, then
    ``_map_lock``.
"""

from __future__ import annotations

import array
import contextlib
import logging
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from kvs.engine import positions, segments
from kvs.engine.base import FsyncPolicy
from kvs.engine.datadir import fsync_dir
from kvs.engine.spinlock import acquire_spinning
from kvs.errors import KvsError
from kvs.freethreading import mark_shared, share_module_globals

log = logging.getLogger("kvs.engine.kvstore")  # the engine's one logger, whatever module logs

FIRST_ALLOCATION = 1 << 20
"""The active segment's first extension, in bytes (then doubling)."""
MADV_POPULATE_WRITE: int | None = getattr(mmap, "MADV_POPULATE_WRITE", 23 if sys.platform.startswith("linux") else None)
"""``madvise`` advice (Linux 5.14+; Python 3.13's mmap module has no name for it): fault the
pages of a range in as writes would, without changing their contents. None: not available."""
PREFAULT_BYTES = 64 * 1024
"""The pages populated ahead of the appends at a time."""
_PAGE_MASK = ~(mmap.PAGESIZE - 1)
READ_MAP_SLOTS = positions.NARROW_FD_LIMIT
"""Descriptors below this have a slot in ``_read_maps`` (those of narrow positions)."""
TOTAL, LIVE = 0, 1
"""Indexes of ``KvStore._sizes``: bytes of all segments, bytes of the records the index
points to."""


def _closed_map() -> mmap.mmap:
    closed = mmap.mmap(-1, mmap.PAGESIZE)
    closed.close()
    return closed


UNMAPPED = _closed_map()
"""``Segment.writer`` of a segment that is not mapped for writing: a closed map, so a write
into it raises ``ValueError`` instead of reaching memory (``mark`` is 0 then, so no append
tries: it grows the map first)."""


def map_for_reading(fd: int, length: int) -> mmap.mmap:
    """A read-only shared map of the first ``length`` bytes of ``fd`` (the readers' map of a
    segment; a test replaces it to pause the copies out of it, or to refuse maps)."""
    return mmap.mmap(fd, length, access=mmap.ACCESS_READ, trackfd=False)


class Segment:
    """A segment file. ``size`` (the end of its records), ``durable`` (the end of what was
    fsynced), ``allocated``, ``writer``, ``populated`` and ``mark`` change under
    ``_append_lock`` (the active segment) or belong to the compactor (its outputs); readers
    never use this object, only the ``fd`` inside positions.

    The active segment is written through ``writer``, a shared writable memory map of its
    first ``allocated`` bytes (:data:`UNMAPPED` otherwise). ``populated``: the pages of
    ``writer`` below it are (or are being) faulted in ahead of the appends; ``mark``: an
    append ending past it takes the slow path (grow the map, populate the next pages).
    ``mark <= allocated`` always."""

    __slots__ = ("gen", "path", "fd", "size", "durable", "allocated", "writer", "populated", "mark")

    def __init__(self, gen: int, path: Path, fd: int, size: int) -> None:
        self.gen = gen
        self.path = path
        self.fd = fd
        self.size = size
        self.durable = size
        self.allocated = 0
        self.writer: mmap.mmap = UNMAPPED
        self.populated = 0
        self.mark = 0


class SegmentLog:
    """The segment-log part of ``KvStore`` (a mixin: ``kvstore.py`` composes the parts and
    says who owns which attribute). Owns ``_segments``, ``_by_fd``, ``_active``, ``_sizes``,
    ``_append_lock``, ``_map_lock`` and the roll-over and prefault state."""

    _active: Segment
    """The segment the appends go to: set by recovery (``Recovery._recover``) before the
    store opens, replaced only by a roll-over, under ``_append_lock``."""

    # Owned by the other parts of KvStore:
    path: Path
    _closed: bool
    _fsync: FsyncPolicy
    _stale_mark: float
    _maybe_want_compaction: Callable[[], None]
    _notify_committers: Callable[[], None]

    def _init_log(self, max_segment_bytes: int) -> None:
        self._max_segment = max_segment_bytes
        # The size at which the active segment rolls over: max_segment_bytes, or another
        # max_segment_bytes further after a failed roll-over (_try_roll_over).
        self._roll_at = max_segment_bytes
        self._roll_failures = 0  # failed roll-overs since the last one that worked
        self._append_lock = threading.Lock()
        self._map_lock = threading.Lock()
        self._prefault_bytes = PREFAULT_BYTES if MADV_POPULATE_WRITE is not None else 0
        self._segments: dict[int, Segment] = {}  # gen -> segment
        self._by_fd: dict[int, Segment] = {}     # fd -> segment
        # [TOTAL], [LIVE]. Machine integers in an array, not two int attributes: every write
        # replaces both, and an int object made by one thread and dropped by another goes
        # through CPython's biased-reference-count merge queue, whose mutex the owner thread
        # takes too; inside the append lock, that kept the lock held longer and made the
        # other writers spin (docs/free-threading.md, section 2c).
        self._sizes = array.array("q", [0, 0])
        # The readers' maps by descriptor (module docstring, "Read maps"): changed by list
        # stores under _append_lock, or by the compactor and recovery for their segments.
        self._read_maps: list[mmap.mmap | None] = [None] * READ_MAP_SLOTS
        mark_shared(self._read_maps)  # get loads it from every thread

    # ------------------------------------------------------------------ read maps
    def _publish_read_map(self, seg: Segment, length: int) -> None:
        """Give readers a map of ``seg``'s first ``length`` bytes (every record a position
        published so far or from now until the next call points to is below it). A map
        that cannot be made leaves the segment to ``pread``."""
        fd = seg.fd
        if fd >= READ_MAP_SLOTS or length <= 0:
            return
        try:
            view = map_for_reading(fd, length)
        except (OSError, ValueError) as exc:
            self._read_maps[fd] = None
            log.debug("%s: no read map (%s); reads use pread", seg.path, exc)
            return
        mark_shared(view)
        self._read_maps[fd] = view

    def _retire_read_map(self, seg: Segment) -> None:
        """Drop ``seg``'s read map; before its descriptor is closed (module docstring)."""
        if seg.fd < READ_MAP_SLOTS:
            self._read_maps[seg.fd] = None

    # ------------------------------------------------------------------ segment files
    def _open_segment_file(self, g: int, writable: bool) -> Segment:
        path = self.path / segments.log_name(g)
        try:
            fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
        except OSError as exc:
            raise KvsError(f"cannot open {path}: {exc.strerror}") from None
        seg = Segment(g, path, fd, os.fstat(fd).st_size)
        self._segments[g] = seg
        self._by_fd[fd] = seg
        return seg

    def _create_segment(self, g: int) -> Segment:
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
        seg = Segment(g, path, fd, 0)
        self._segments[g] = seg
        self._by_fd[fd] = seg
        return seg

    def _close_segment_files(self) -> None:
        """Close every segment's map and descriptor (``close``, or an ``open`` that failed)."""
        for seg in self._segments.values():
            seg.writer.close()
            self._retire_read_map(seg)
            os.close(seg.fd)
        self._segments.clear()
        self._by_fd.clear()

    # ------------------------------------------------------------------ the append
    def _append(self, rec: bytes, n: int, live_delta: int) -> tuple[Segment, int]:
        """Write ``rec`` (``n`` bytes: one or more records) at the end of the active
        segment; the segment and the offset it was written at.

        The only critical section all writers share: offset, a copy into the segment's
        memory map (the bytes are then in the page cache: a kill -9 cannot lose them, and
        every ``pread`` sees them), bookkeeping. Space is allocated before anything is
        written, so a full disk fails the call with ``KvsError`` and writes nothing. The
        copy does not fault pages in while the lock is held: ``_prefault`` populates them
        ahead, after the lock (module docstring)."""
        prefault = None
        lock = self._append_lock
        if not lock.acquire(False):
            acquire_spinning(lock)
        try:
            if self._closed:  # _check_open, inlined
                raise KvsError("the store is closed")
            seg = self._active
            offset = seg.size
            end = offset + n
            if end > seg.mark:  # rare: grow the map, or take the next pages to populate
                prefault = self._past_mark(seg, end)
            seg.writer[offset:end] = rec
            seg.size = end
            sizes = self._sizes
            sizes[0] = total = sizes[0] + n  # TOTAL
            sizes[1] = live = sizes[1] + live_delta  # LIVE
            if end >= self._roll_at:
                self._try_roll_over(seg, end)
            if total - live >= self._stale_mark:
                self._maybe_want_compaction()  # rare: see there
        finally:
            lock.release()
        if prefault is not None:
            self._prefault(*prefault)
        return seg, offset

    def _append_locked(self, rec: bytes, n: int, live_delta: int) -> int:
        """``_append`` for a caller that already holds ``_append_lock`` (``clear``): the
        offset ``rec`` was written at in the active segment. No roll-over, no compaction
        trigger and no prefault ahead (pages are faulted in by the copy)."""
        seg = self._active
        offset = seg.size
        end = offset + n
        if end > seg.mark:
            self._past_mark(seg, end)
        seg.writer[offset:end] = rec
        seg.size = end
        self._sizes[TOTAL] += n
        self._sizes[LIVE] += live_delta
        return offset

    def _past_mark(self, seg: Segment, end: int) -> tuple[mmap.mmap, int, int] | None:
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
        advice = MADV_POPULATE_WRITE
        with self._map_lock:
            if writer.closed or advice is None:
                return
            try:
                writer.madvise(advice, start, length)
            except (OSError, ValueError) as exc:
                self._prefault_bytes = 0
                log.debug("%s: cannot populate pages ahead of the appends (%s); writes fault them in",
                          self.path, exc)

    def _allocate(self, seg: Segment, end: int) -> None:
        """Extend the active segment's file and its writable map to hold at least ``end``
        bytes: doubling from ``FIRST_ALLOCATION`` up to ``max_segment_bytes`` (the last
        record of a segment may pass it). Caller holds ``_append_lock``."""
        grown = max(2 * seg.allocated, FIRST_ALLOCATION)
        # Past max_segment_bytes (a roll-over failed) the map keeps doubling: O(1) amortized.
        want = max(end, grown if end > self._max_segment else min(self._max_segment, grown))
        try:
            os.posix_fallocate(seg.fd, seg.allocated, want - seg.allocated)
            writer = mmap.mmap(seg.fd, want, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, trackfd=False)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or exc
            raise KvsError(f"cannot extend {seg.path} to {want} bytes: {reason}") from None
        with self._map_lock:
            seg.writer.close()
        seg.writer = writer
        # Before the append that needs the new bytes: readers of its position find this map.
        self._publish_read_map(seg, want)
        seg.allocated = want
        seg.populated = 0
        seg.mark = 0  # _past_mark, which called this, sets it

    # ------------------------------------------------------------------ roll-over
    def _try_roll_over(self, seg: Segment, end: int) -> None:
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

    def _seal(self, seg: Segment) -> None:
        """Unmap the active segment and cut its file to its records (then fsync unless the
        policy is ``never``). Caller holds ``_append_lock``."""
        writer, seg.writer = seg.writer, UNMAPPED
        allocated, seg.allocated = seg.allocated, 0  # a failure below: the next append re-maps
        seg.populated = seg.mark = 0
        with self._map_lock:
            writer.close()
        if allocated:
            os.ftruncate(seg.fd, seg.size)
        if self._fsync != "never":
            os.fsync(seg.fd)
            seg.durable = seg.size

    def _roll_over(self) -> None:
        """Seal the active segment, then start the next one (module docstring: sealing
        first is what makes a kill -9 safe). When the seal or the creation fails, the sealed
        segment stays active and its next append maps it again. Caller holds
        ``_append_lock``."""
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
        self._notify_committers()  # the sealed segment's durable mark may have moved


@contextlib.contextmanager
def mapped(seg: Segment) -> Iterator[bytes | mmap.mmap]:
    """The first ``seg.size`` bytes of a segment, memory-mapped read-only for a sequential
    scan (replay, compaction). Mapping instead of reading keeps the scan from holding a
    second copy of the log in the heap: a 64 MiB segment read into ``bytes`` stayed mostly
    resident after replay (the allocator does not hand freed memory back at once), which
    showed up as "index" memory (README, Performance: memory per key). The segment must not
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


share_module_globals(globals())

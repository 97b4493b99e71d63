"""Recovery of ``KvStore``: rebuilding the index from the data directory at ``open``.

``docs/storage-format.md``, section 4, is the procedure step by step; in short: delete the
``*.tmp`` files (an interrupted compaction's outputs: their inputs are intact), finish the
deletions that a compaction marker allows, replay every segment in generation order (from
its hint file when it has a good one, else by scanning its records), cut a zero or torn tail
of the newest segment, and pick or create the active segment.

Why replay order is acknowledgement order
    ``segments.py``: a compaction output ``(M, k)`` sorts after its inputs and before
    ``(M + 1, 0)``, and holds only copies of records older than anything there. So applying
    segments in generation order applies every record in the order its write was
    acknowledged, and the index ends up with the last acknowledged value of every key.

What counts as damage
    Only the newest segment can have an interrupted write at its end (segments are sealed,
    i.e. cut to their last record, before the next one exists: ``segment_log.py``). There a
    failed record followed only by zeros is space allocated ahead and never written
    (:func:`is_zeros`), and one after which nothing valid follows is a torn tail
    (:func:`is_torn_tail`): both are cut. Anything else, in any segment, is corruption and
    ``open`` fails with ``KvsError`` without touching the directory.

Expiry and clear
    A SET record's deadline goes into ``_expires`` with the position (flag ``EXPIRES``); a
    CLEAR record empties the index. After the replay, keys whose deadline has passed are
    dropped (their records carry the deadline, so no tombstone is needed: the next open drops
    them again until a compaction has removed them), the deadline heaps are built, and the
    segments older than the newest CLEAR are deleted: a ``clear`` killed before it had
    deleted them is finished here (``docs/storage-format.md``, section 4).

Marking for other threads
    Recovery runs before any other thread can reach the store, so every key and position it
    publishes into the index is a fresh object of the opening thread, marked shared
    (``kvs.freethreading.mark_shared``) before the dict store that publishes it: the opening
    thread may stay alive (a server's main thread), and unmarked objects would send every
    other thread's lookup down CPython's locked slow path (``docs/free-threading.md``,
    section 1).
"""

from __future__ import annotations

import array
import contextlib
import heapq
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from kvs.engine import hints, positions, record, segments
from kvs.engine.clock import Clock
from kvs.engine.datadir import fsync_dir
from kvs.engine.positions import (
    EXPIRES,
    KEY_BYTES,
    MAX_RECORD_LENGTH,
    NARROW_LENGTH_LIMIT,
    NARROW_LENGTH_SHIFT,
    NARROW_OFFSET_LIMIT,
    NARROW_OFFSET_SHIFT,
)
from kvs.engine.segment_log import LIVE, TOTAL, Segment, mapped
from kvs.errors import KvsError
from kvs.freethreading import SHARED_COUNT_OFFSET, SHARED_COUNTS, mark_shared, mark_shared_str

log = logging.getLogger("kvs.engine.kvstore")  # the engine's one logger, whatever module logs

_HEADER_UNPACK = record.HEADER.unpack_from


class Recovery:
    """The recovery part of ``KvStore`` (a mixin: ``kvstore.py`` composes the parts). Runs
    once, in ``open``, before the store is reachable by any other thread."""

    # Owned by the other parts of KvStore:
    path: Path
    _mask: int
    _stripes: list[dict[str, int]]
    _expires: list[dict[str, int]]
    _deadlines: list[list[tuple[int, str]]]
    _clock: Clock
    _by_fd: dict[int, Segment]
    _segments: dict[int, Segment]
    _active: Segment
    _sizes: array.array[int]
    _open_segment_file: Callable[[int, bool], Segment]
    _create_segment: Callable[[int], Segment]
    _publish_read_map: Callable[[Segment, int], None]
    _retire_read_map: Callable[[Segment], None]

    def _recover(self) -> None:
        """Rebuild the index and the byte counts from the directory's files and set the
        active segment (``docs/storage-format.md``, section 4, steps 1 to 6)."""
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
        self._cleared_at: int | None = None  # the generation of the newest CLEAR replayed
        for g in gens:
            newest = g == gens[-1]
            seg = self._open_segment_file(g, newest)
            self._replay(seg, newest)
        if self._cleared_at is not None:
            self._drop_segments_before(self._cleared_at)
            gens = [g for g in gens if g >= self._cleared_at]
        self._drop_expired_and_build_heaps()
        live_logs = {segments.log_name(g) for g in self._segments}
        for h in directory.glob("*.hint"):
            if h.with_suffix(".log").name not in live_logs:
                h.unlink()  # a hint whose segment is gone
        # Empty segments carry nothing; the newest one is reused as the active segment.
        next_major = segments.major_of(gens[-1]) + 1 if gens else 1
        last = self._segments.get(gens[-1]) if gens else None
        if last is not None and last.size == 0 and segments.minor_of(last.gen) == 0:
            self._active = last
        else:
            self._active = self._create_segment(segments.gen(next_major))
        for seg in self._segments.values():
            self._publish_read_map(seg, seg.size)  # the records replayed (segment_log.py)
        length = positions.length
        self._sizes[LIVE] = sum(length(pos) for s in self._stripes for pos in s.values())
        self._sizes[TOTAL] = sum(s.size for s in self._segments.values())
        log.debug("opened %s: %d keys, %d segments, %d live of %d bytes", self.path,
                  sum(len(s) for s in self._stripes), len(self._segments),
                  self._sizes[LIVE], self._sizes[TOTAL])

    def _drop_segments_before(self, gen: int) -> None:
        """Delete the segments older than ``gen`` (every record in them is older than a
        CLEAR) and their hint files: what an interrupted ``clear`` had not done yet."""
        for g in sorted(self._segments):
            if g < gen:
                seg = self._segments.pop(g)
                del self._by_fd[seg.fd]
                self._retire_read_map(seg)
                os.close(seg.fd)
                seg.path.unlink(missing_ok=True)
                (self.path / segments.hint_name(g)).unlink(missing_ok=True)
        fsync_dir(self.path)

    def _drop_expired_and_build_heaps(self) -> None:
        """Drop the keys whose deadline has passed; build each stripe's deadline heap."""
        now = self._clock()
        for stripe, expires, heap in zip(self._stripes, self._expires, self._deadlines, strict=True):
            if not expires:
                continue
            for key, deadline in list(expires.items()):
                if deadline <= now:
                    del stripe[key]
                    del expires[key]
                else:
                    entry = (deadline, key)
                    mark_shared(entry)
                    heap.append(entry)
            heapq.heapify(heap)

    def _replay(self, seg: Segment, newest: bool) -> None:
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
        pack = positions.pack
        with mapped(seg) as data:
            try:
                with contextlib.closing(record.scan(data, MAX_RECORD_LENGTH)) as records:
                    for pos, op, rflags, deadline, key, length in records:
                        if op == record.OP_SET:
                            flags = KEY_BYTES if rflags & record.F_KEY_BYTES else 0
                            if deadline is not None:
                                flags |= EXPIRES
                            self._index_put(key, pack(seg.fd, pos, length, flags), deadline)
                        elif op == record.OP_TOMBSTONE:
                            k = key.decode("utf-8", "surrogateescape")
                            i = hash(k) & self._mask
                            self._stripes[i].pop(k, None)
                            self._expires[i].pop(k, None)
                        else:  # CLEAR
                            for stripe in self._stripes:
                                stripe.clear()
                            for expires in self._expires:
                                expires.clear()
                            self._cleared_at = seg.gen
            except record.CorruptRecord as exc:
                unwritten = newest and is_zeros(data, exc.offset)
                if not (unwritten or newest and is_torn_tail(data, exc.offset, MAX_RECORD_LENGTH)):
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

    def _index_put(self, key_bytes: bytes, pos: int, deadline: int | None) -> None:
        """Store the position (and deadline) of ``key_bytes`` while ``open`` replays a log.
        The key, the position and the deadline are new objects of this thread: they are marked
        shared before the dict store publishes them (a key the stripe already holds keeps its
        stored object)."""
        key = key_bytes.decode("utf-8", "surrogateescape")
        i = hash(key) & self._mask
        stripe = self._stripes[i]
        mark_shared(pos)
        if key not in stripe:
            mark_shared_str(key)
        stripe[key] = pos
        if deadline is not None:
            mark_shared(deadline)
            self._expires[i][key] = deadline
        elif self._expires[i]:  # most stores have no TTLs: skip the pop
            self._expires[i].pop(key, None)

    def _index_hints(self, seg: Segment, entries: Iterator[tuple[bytes, int, int, int, int]]) -> None:
        """``_index_put`` of every hint entry of ``seg``, inlined: the loop of ``open`` at a
        million keys. Inlined with it: ``positions.pack`` for the narrow form (a segment
        below ``NARROW_OFFSET_LIMIT`` bytes with a narrow descriptor; ``tests/test_kvstore.py``
        checks the result equals ``pack``) and ``mark_shared`` / ``str_needs_mark``."""
        stripes = self._stripes
        all_expires = self._expires
        mask = self._mask
        fd = seg.fd
        counts = SHARED_COUNTS
        narrow = (fd << positions.NARROW_FD_SHIFT
                  if fd < positions.NARROW_FD_LIMIT and seg.size <= NARROW_OFFSET_LIMIT else -1)
        pack = positions.pack
        # Locals, not globals: this loop runs once per key of the store.
        length_limit, offset_shift, length_shift, count_offset = (
            NARROW_LENGTH_LIMIT, NARROW_OFFSET_SHIFT, NARROW_LENGTH_SHIFT, SHARED_COUNT_OFFSET)
        any_expires = any(all_expires)  # most stores have no TTLs: then no pop per key
        for key_bytes, offset, length, flags, deadline in entries:
            key = key_bytes.decode("utf-8", "surrogateescape")
            if narrow >= 0 and length < length_limit and not flags & 1:
                pos = narrow | offset << offset_shift | length << length_shift | flags
            else:
                pos = pack(fd, offset, length, flags)
            if counts is not None:
                counts[(id(pos) + count_offset) >> 3] = 1
                if len(key) > 1 or (len(key) == 1 and ord(key) > 0xFF):
                    counts[(id(key) + count_offset) >> 3] = 1
            i = hash(key) & mask
            stripes[i][key] = pos
            if flags & 1:  # EXPIRES
                mark_shared(deadline)
                all_expires[i][key] = deadline
                any_expires = True
            elif any_expires:
                all_expires[i].pop(key, None)


def is_zeros(data: bytes | mmap.mmap, offset: int) -> bool:
    """True when every byte of ``data`` from ``offset`` on is zero: space the active segment
    had allocated ahead of its records (no record starts with a zero byte)."""
    chunk = 1 << 20
    for start in range(offset, len(data), chunk):
        part = data[start:start + chunk]
        if part.count(0) != len(part):
            return False
    return True


def is_torn_tail(data: bytes | mmap.mmap, offset: int, max_record: int) -> bool:
    """True when the damage at ``offset`` can only be an interrupted final write: nothing
    valid follows it. A record whose header still gives a plausible length and after which
    the log continues with valid records means corruption in the middle."""
    if len(data) - offset < record.OVERHEAD:
        return True
    op = data[offset]
    if op in (record.V1_OP_SET, record.V1_OP_TOMBSTONE):
        _op, klen, vlen = record.V1_HEADER.unpack_from(data, offset)
        nxt = offset + record.V1_OVERHEAD + klen + vlen
    elif record.OP_SET <= op <= record.OP_TXN:
        _op, flags, klen, vlen = _HEADER_UNPACK(data, offset)
        nxt = offset + record.OVERHEAD + klen + vlen + (record.DEADLINE_SIZE if flags & record.F_DEADLINE else 0)
    else:
        return True
    if nxt >= len(data) or nxt - offset > max_record:
        return True
    try:
        for _ in record.scan(memoryview(data)[nxt:], max_record):
            pass
    except record.CorruptRecord:
        return True
    return False

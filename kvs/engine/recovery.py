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
import logging
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from kvs.engine import hints, positions, record, segments
from kvs.engine.positions import MAX_RECORD_LENGTH, NARROW_LENGTH_LIMIT, NARROW_OFFSET_SHIFT
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
    _segments: dict[int, Segment]
    _active: Segment
    _sizes: array.array[int]
    _open_segment_file: Callable[[int, bool], Segment]
    _create_segment: Callable[[int], Segment]

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
        for g in gens:
            newest = g == gens[-1]
            seg = self._open_segment_file(g, newest)
            self._replay(seg, newest)
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
        length = positions.length
        self._sizes[LIVE] = sum(length(pos) for s in self._stripes for pos in s.values())
        self._sizes[TOTAL] = sum(s.size for s in self._segments.values())
        log.debug("opened %s: %d keys, %d segments, %d live of %d bytes", self.path,
                  sum(len(s) for s in self._stripes), len(self._segments),
                  self._sizes[LIVE], self._sizes[TOTAL])

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
                    for pos, op, key, length in records:
                        if op == record.OP_SET:
                            self._index_put(key, pack(seg.fd, pos, length))
                        else:
                            self._stripes[hash(k := key.decode()) & self._mask].pop(k, None)
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

    def _index_put(self, key_bytes: bytes, pos: int) -> None:
        """Store the position of ``key_bytes`` while ``open`` replays a log. The key and the
        position are new objects of this thread: they are marked shared before the dict
        store publishes them (a key the stripe already holds keeps its stored object)."""
        key = key_bytes.decode()
        stripe = self._stripes[hash(key) & self._mask]
        mark_shared(pos)
        if key not in stripe:
            mark_shared_str(key)
        stripe[key] = pos

    def _index_hints(self, seg: Segment, entries: Iterator[tuple[bytes, int, int]]) -> None:
        """``_index_put`` of every hint entry of ``seg``, inlined: the loop of ``open`` at a
        million keys. Inlined with it: ``positions.pack`` for the narrow form (a segment
        below ``NARROW_OFFSET_LIMIT`` bytes with a narrow descriptor; ``tests/test_kvstore.py``
        checks the result equals ``pack``) and ``mark_shared`` / ``str_needs_mark``."""
        stripes = self._stripes
        mask = self._mask
        fd = seg.fd
        counts = SHARED_COUNTS
        narrow = (fd << positions.NARROW_FD_SHIFT
                  if fd < positions.NARROW_FD_LIMIT and seg.size <= positions.NARROW_OFFSET_LIMIT else -1)
        pack = positions.pack
        # Locals, not globals: this loop runs once per key of the store.
        length_limit, offset_shift, count_offset = NARROW_LENGTH_LIMIT, NARROW_OFFSET_SHIFT, SHARED_COUNT_OFFSET
        for key_bytes, offset, length in entries:
            key = key_bytes.decode()
            if narrow >= 0 and length < length_limit:
                pos = narrow | offset << offset_shift | length
            else:
                pos = pack(fd, offset, length)
            if counts is not None:
                counts[(id(pos) + count_offset) >> 3] = 1
                if len(key) > 1 or (len(key) == 1 and ord(key) > 0xFF):
                    counts[(id(key) + count_offset) >> 3] = 1
            stripes[hash(key) & mask][key] = pos


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

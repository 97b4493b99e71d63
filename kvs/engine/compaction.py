"""Compaction of ``KvStore``: merging sealed segments into new ones holding only live records.

When and who
    A background thread (:meth:`Compaction._compactor`) runs when stale bytes (all bytes of
    the log minus the bytes of the records the index points to) reach both
    ``compaction_threshold`` and ``compaction_ratio`` of the log; :meth:`Compaction.compact`
    runs one in the calling thread. One compaction at a time (``_compact_lock``). Writers
    ask whether one is due rarely, not on every write (:meth:`_maybe_want_compaction` says
    how), inside the append lock.

Steps (``docs/storage-format.md``, section 5, with the crash-safety table)
    Seal the active segment (a roll-over, under the append lock); copy every live record of
    the sealed segments, oldest first, into new output segments ``(M, k)`` (ordered between
    their inputs and the next active segment: ``segments.py``), swapping each index entry
    with a compare-and-set under that entry's stripe lock, one record at a time; make the
    outputs and their hint files durable and rename them into place; write a marker; wait
    for a reader grace period; then close and delete the inputs.

Happens-before
    A record is written to its output (``pwrite``: readable at once through the output's
    descriptor) before its index entry is swapped, so a reader that loads the new position
    finds the record. The swap is a compare-and-set under the key's stripe lock, the lock
    every writer of that key holds across "append, then store the position": a writer that
    overwrote the key meanwhile wins and the copy is only stale bytes. Readers that loaded
    an old position before the swap are waited for by ``readers.grace_period`` before any
    input descriptor is closed (``readers.py`` has the argument). Readers are never
    blocked; a writer waits at most for one record's swap.

Expired records and transactions
    A record whose deadline has passed is not copied: its index entry is removed instead
    (the same compare-and-set), so the key's space comes back. An index entry that a
    transaction is publishing (a ``Pending``, ``kvstore.py``) is looked at again under its
    stripe lock, which the transaction holds until its entries are final: a record that the
    pending entry's readers may still read is never taken for dead while they can.

Failure
    Any failure raises ``KvsError`` and loses no record: each one is still in an input or
    an output segment (outputs stay in use: index entries may point into them), and the
    next compaction merges both. Files still named ``*.tmp`` are dropped at the next open,
    which replays the inputs.
"""

from __future__ import annotations

import array
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from kvs.engine import hints, positions, record, segments
from kvs.engine.callbacks import CallbackGuard
from kvs.engine.clock import Clock
from kvs.engine.datadir import fsync_dir
from kvs.engine.positions import EXPIRES, KEY_BYTES, MAX_RECORD_LENGTH
from kvs.engine.readers import ReaderRegistry
from kvs.engine.segment_log import LIVE, TOTAL, Segment, mapped
from kvs.errors import KvsError
from kvs.freethreading import mark_shared

log = logging.getLogger("kvs.engine.kvstore")  # the engine's one logger, whatever module logs

NEVER = float("inf")
"""A ``_stale_mark`` no store reaches: a compaction is already wanted."""


class Compaction:
    """The compaction part of ``KvStore`` (a mixin: ``kvstore.py`` composes the parts).
    Owns ``_compaction_threshold``, ``_compaction_ratio``, ``_compact_lock``,
    ``_compaction_wanted``, ``_stale_mark`` (under ``_append_lock``) and ``compactions``."""

    # Owned by the other parts of KvStore:
    path: Path
    _mask: int
    _max_segment: int
    _stripes: list[dict[str, int]]
    _expires: list[dict[str, int]]
    _clock: Clock
    _guard: CallbackGuard
    _callers: dict[int, int]
    _stripe_locks: list[threading.Lock]
    _segments: dict[int, Segment]
    _by_fd: dict[int, Segment]
    _publish_read_map: Callable[[Segment, int], None]
    _retire_read_map: Callable[[Segment], None]
    _active: Segment
    _sizes: array.array[int]
    _append_lock: threading.Lock
    _readers: ReaderRegistry
    _stopping: threading.Event
    _roll_over: Callable[[], None]
    _check_open: Callable[[], None]

    def _init_compaction(self, threshold: int, ratio: float) -> None:
        self._compaction_threshold = threshold
        self._compaction_ratio = ratio
        self._compact_lock = threading.Lock()
        self._compaction_wanted = threading.Event()
        # Stale bytes at which _append next asks whether a compaction is due (see
        # _maybe_want_compaction); under _append_lock.
        self._stale_mark: float = threshold
        self.compactions = 0

    # ------------------------------------------------------------------ the trigger
    def _compaction_due(self) -> bool:
        total = self._sizes[TOTAL]
        stale = total - self._sizes[LIVE]
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
            self._stale_mark = NEVER
            self._compaction_wanted.set()
        else:
            self._stale_mark = max(self._compaction_threshold, self._compaction_ratio * self._sizes[TOTAL])

    def _rearm_compaction_trigger(self) -> None:
        """Let the next write ask again whether a compaction is due, with the sizes of then
        (after a compaction, or a trigger that one made stale)."""
        with self._append_lock:
            self._stale_mark = self._compaction_threshold

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

    # ------------------------------------------------------------------ compacting
    def compact(self) -> None:
        """Merge every sealed segment into new ones holding only live records (runs in the
        calling thread; the background compactor calls this too).

        A failure (no descriptor left, a full disk, ...) raises ``KvsError`` and loses no
        record: each one is still in an input or an output segment, and the next compaction
        merges both."""
        if self._callers:  # from update()'s function: it holds a stripe lock compaction needs
            self._guard.check()
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
        # A writer appends holding its keys' stripe locks and publishes the positions before
        # releasing them. Taking every stripe lock once, after the roll-over, waits for each
        # write that went to an input segment to be published, so the scan below sees every
        # live record's position. Without it a record appended just before the roll-over,
        # not yet published, looked dead to the scan, and its position, published next,
        # pointed into a segment this compaction then deleted.
        for lock in self._stripe_locks:
            with lock:
                pass
        major = segments.major_of(inputs[-1].gen)
        outputs = CompactionOutput(self.path, major, self._max_segment)
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
                    self._sizes[TOTAL] += seg.size
                    self._publish_read_map(seg, seg.size)  # complete: read it through a map
        # Outputs and hints are durable; from here on the inputs are redundant.
        marker = self.path / segments.marker_name(major)
        write_durable(marker, b"")
        self._readers.grace_period()
        with self._append_lock:
            for seg in inputs:
                del self._segments[seg.gen]
                del self._by_fd[seg.fd]
                self._sizes[TOTAL] -= seg.size
                self._retire_read_map(seg)
        for seg in inputs:
            os.close(seg.fd)
            seg.path.unlink(missing_ok=True)
            (self.path / segments.hint_name(seg.gen)).unlink(missing_ok=True)
        marker.unlink()
        fsync_dir(self.path)
        self.compactions += 1
        log.debug("compacted %s: %d segments into %d", self.path, len(inputs), len(outputs.segments))

    def _copy_live_records(self, seg: Segment, out: CompactionOutput) -> None:
        """Copy the records of ``seg`` that the index still points to, swapping each entry
        (compare-and-set under the entry's stripe lock: a writer may have won); drop the
        expired ones from the index instead (module docstring). The new position is a fresh
        object of this thread, marked shared before the swap publishes it. ``dict.get`` is
        fine here: this is not the readers' path."""
        fd = seg.fd
        mask = self._mask
        stripes = self._stripes
        pack = positions.pack
        now = self._clock()
        expired_bytes = 0
        with mapped(seg) as data, contextlib.closing(record.scan(data, MAX_RECORD_LENGTH)) as records:
            for offset, op, rflags, deadline, key_bytes, length in records:
                if op != record.OP_SET:
                    continue
                key = key_bytes.decode("utf-8", "surrogateescape")
                flags = KEY_BYTES if rflags & record.F_KEY_BYTES else 0
                if deadline is not None:
                    flags |= EXPIRES
                old = pack(fd, offset, length, flags)
                i = hash(key) & mask
                current = stripes[i].get(key)
                if current != old:
                    if current is None or type(current) is int:
                        continue  # overwritten or removed since: dead
                    with self._stripe_locks[i]:  # a transaction is publishing it: wait for it
                        if stripes[i].get(key) != old:
                            continue
                if deadline is not None and deadline <= now:
                    with self._stripe_locks[i]:
                        if stripes[i].get(key) == old:
                            del stripes[i][key]
                            self._expires[i].pop(key, None)
                            expired_bytes += length
                    continue
                new = out.add(data[offset:offset + length], key_bytes, flags, deadline)
                mark_shared(new)
                with self._stripe_locks[i]:
                    if stripes[i].get(key) == old:
                        stripes[i][key] = new
        if expired_bytes:
            with self._append_lock:
                self._sizes[LIVE] -= expired_bytes


class CompactionOutput:
    """The output segments of one compaction: ``(major, 1)``, ``(major, 2)``, … written as
    ``*.tmp`` files in ``directory``, a new one once the current one reaches
    ``max_segment_bytes``; renamed into place with their hint files once complete and
    durable (:meth:`finish`). Used by the compacting thread only."""

    def __init__(self, directory: Path, major: int, max_segment_bytes: int) -> None:
        self.directory = directory
        self.major = major
        self.max_segment_bytes = max_segment_bytes
        self.segments: list[Segment] = []
        self._hints: list[list[bytes]] = []
        self._current: Segment | None = None

    def _next_segment(self) -> Segment:
        g = segments.gen(self.major, len(self.segments) + 1)
        tmp = self.directory / (segments.log_name(g) + ".tmp")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        seg = Segment(g, tmp, fd, 0)  # finish renames it; until then its path is the .tmp
        self.segments.append(seg)
        self._hints.append([])
        return seg

    def add(self, rec: bytes, key: bytes, flags: int, deadline: int | None) -> int:
        """Append one record; its new packed position (readable at once through the fd),
        with the position ``flags`` of its key."""
        seg = self._current
        if seg is None or seg.size >= self.max_segment_bytes:
            seg = self._current = self._next_segment()
        offset = seg.size
        view = memoryview(rec)
        while view:
            view = view[os.pwrite(seg.fd, view, offset + len(rec) - len(view)):]
        seg.size = offset + len(rec)
        self._hints[-1].append(hints.encode_entry(key, offset, len(rec), flags, deadline))
        return positions.pack(seg.fd, offset, len(rec), flags)

    def finish(self) -> None:
        """Make every output and hint file durable and give them their final names."""
        for seg, entries in zip(self.segments, self._hints, strict=True):
            os.fsync(seg.fd)
            seg.durable = seg.size
            hint_tmp = self.directory / (segments.hint_name(seg.gen) + ".tmp")
            hints.write_hint_file(str(hint_tmp), entries, len(entries))
            os.replace(hint_tmp, self.directory / segments.hint_name(seg.gen))
            final = self.directory / segments.log_name(seg.gen)
            os.replace(seg.path, final)
            seg.path = final
        fsync_dir(self.directory)
        self._hints = []


def write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file ``path``, fsync it and its directory."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_dir(path.parent)

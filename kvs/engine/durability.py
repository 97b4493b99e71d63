"""Durability of ``KvStore``: the ``fsync=`` policies, group commit and the interval syncer.

Policies (``kvs.engine.base.FSYNC_POLICIES``, checked by ``check_fsync_policy``)
    ``"never"`` (default): every acknowledged write has been handed to the OS: copied into
    the active segment's shared memory map, i.e. the page cache (survives a kill -9 of the
    process, not a power loss; ``segment_log.py`` says why a map and not ``pwrite``).
    ``"always"``: fsync before acknowledging, with group commit (concurrent writers share
    one fsync). ``"interval"``: a background fsync of the active segment every
    ``fsync_interval`` seconds (default 1). Whatever the policy, compaction outputs, their
    hints and markers are fsynced before the inputs are deleted (``compaction.py``), and a
    sealed segment is fsynced unless the policy is ``"never"``.

``Segment.durable``
    The end of the bytes of a segment known to be on disk; it only grows. It is written by
    the group-commit leader (under ``_sync_cond``), by a seal (under ``_append_lock``) and by
    the interval syncer; a writer is acknowledged under ``"always"`` once ``durable`` has
    reached the end of its record.

Happens-before of group commit
    A writer calls :meth:`Durability._group_commit` after its append returned: its bytes
    were copied into the map, and ``Segment.size`` stored after the copy, by the same thread
    under the append lock. The leader reads ``size`` (``target``) before its fsync, so every
    byte below ``target`` was copied before the fsync started, and Linux's fsync writes back
    the dirty pages of the file, those dirtied through a shared map included: after it,
    ``durable = target`` is true. Followers wait on ``_sync_cond`` until ``durable`` covers
    them; a roll-over notifies it too (``_notify_committers``), since sealing fsyncs and
    moves ``durable`` without a leader. One leader at a time (``_syncing``), so fsyncs do
    not pile up: the writers that arrive during one fsync share the next.
"""

from __future__ import annotations

import logging
import os
import threading

from kvs.engine.base import FsyncPolicy
from kvs.engine.segment_log import Segment
from kvs.errors import KvsError
from kvs.freethreading import share_module_globals

log = logging.getLogger("kvs.engine.kvstore")  # the engine's one logger, whatever module logs


class Durability:
    """The durability part of ``KvStore`` (a mixin: ``kvstore.py`` composes the parts).
    Owns ``_fsync``, ``_fsync_always``, ``_fsync_interval``, ``_sync_cond``, ``_syncing``."""

    # Owned by the other parts of KvStore:
    _active: Segment
    _stopping: threading.Event

    def _init_durability(self, fsync: FsyncPolicy, fsync_interval: float) -> None:
        self._fsync: FsyncPolicy = fsync
        self._fsync_always = fsync == "always"
        self._fsync_interval = fsync_interval
        self._sync_cond = threading.Condition()
        self._syncing = False  # a leader is in its fsync; under _sync_cond

    def _group_commit(self, seg: Segment, end: int) -> None:
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

    def _notify_committers(self) -> None:
        """Wake the writers waiting in ``_group_commit`` (a seal has moved a ``durable``;
        ``close`` is stopping)."""
        with self._sync_cond:
            self._sync_cond.notify_all()

    def _interval_syncer(self) -> None:
        """Background fsync of the active segment every ``fsync_interval`` seconds."""
        while not self._stopping.wait(self._fsync_interval):
            seg = self._active
            if seg.durable < seg.size:
                target = seg.size
                try:
                    os.fsync(seg.fd)
                    seg.durable = max(seg.durable, target)
                except OSError as exc:
                    log.error("interval fsync of %s failed: %s", seg.path, exc.strerror)


share_module_globals(globals())

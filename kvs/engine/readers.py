"""Grace periods for lock-free readers: when may a retired segment's descriptor be closed?

Readers of :class:`~kvs.engine.kvstore.KvStore` take no lock. A reader looks a key up in the
index, gets a position ``(fd, offset, length)`` and calls ``os.pread(fd, ...)``. Compaction
moves live records to new segments, swaps the index entries and then *retires* the old
segments. Closing an old descriptor while a reader that loaded a position a moment before the
swap has not yet called ``pread`` would give that reader ``EBADF``, or worse, the bytes of
another file that reused the descriptor number. So retirement waits for a *grace period*
(the user-space RCU idea): every read that could have seen an old position has finished.

Each reader thread owns one :class:`ReaderSlot`, a one-element list, registered here the first
time the thread reads. Its value is a counter modulo 256 (small ints: immortal, so no
reference-count traffic): odd while the thread is inside a read, even outside. A read does::

    slot[0] = odd        # announce: inside
    pos = index lookup   # may see the old or the new position
    os.pread(fd, ...)
    slot[0] = even       # leave

The reclaimer (the compactor) does::

    swap every index entry away from the old segments
    grace_period():      # snapshot every slot; wait until each odd one has changed
    close the old descriptors, delete the old files

Why this is safe (happens-before): a list item store on free-threaded CPython runs inside the
list's critical section, whose release is a sequentially consistent compare-and-swap
(``_PyMutex_Unlock``). So the reader's "inside" store is globally visible before its index
lookup loads anything (the announcement cannot be reordered after the lookup). The reclaimer's
index swaps end in the same kind of CAS (dict critical section), and it takes this registry's
lock before reading the slots. Hence for any reader R and swap S: either R's announcement is
ordered before the reclaimer's slot snapshot, and the reclaimer waits for R's slot to change
(R finished that read), or R's announcement comes after S, and R's lookup sees only the new
positions. A slot that still shows the same odd value after a wrap-around of 128 reads only
makes the reclaimer wait longer: it errs on the safe side.

Costs for a reader: two list stores on a list no other thread writes (uncontended critical
sections) and no shared reference counts. Slots of threads that exited are dropped by weak
reference.
"""

from __future__ import annotations

import threading
import time
import weakref


class ReaderSlot(list[int]):
    """A reader thread's announcement slot: ``[counter]``, odd while inside a read."""

    __slots__ = ("__weakref__",)


class ReaderRegistry:
    """The slots of every thread that has read, and the grace-period wait over them."""

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self._slots: list[weakref.ref[ReaderSlot]] = []

    @property
    def local(self) -> threading.local:
        """Per-thread storage whose ``slot`` attribute, once registered, is the thread's slot."""
        return self._local

    def register(self) -> ReaderSlot:
        """Create, remember and return the calling thread's slot (first read of a thread)."""
        slot = ReaderSlot([0])
        with self._lock:
            self._slots = [r for r in self._slots if r() is not None]
            self._slots.append(weakref.ref(slot))
        self._local.slot = slot
        return slot

    def grace_period(self, poll_max: float = 0.005) -> None:
        """Return once every read that was in progress when this was called has finished."""
        with self._lock:  # also orders our earlier index swaps before the snapshot below
            slots = [s for r in self._slots if (s := r()) is not None]
        busy = [(s, v) for s in slots if (v := s[0]) & 1]
        delay = 0.00005
        while busy:
            time.sleep(delay)
            delay = min(delay * 2, poll_max)
            busy = [(s, v) for s, v in busy if s[0] == v]

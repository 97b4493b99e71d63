"""The value cache of ``KvStore.get``: decoded values of records read again, admitted on a
second read.

What it is for
    A ``get`` that misses reads the record (a copy out of the segment's map or a ``pread``),
    checks its checksum and key, and decodes the value. The cache keeps decoded values of
    records that are read again, so that a hit is one dict lookup and an identity test.
    Where the keys read fit in it, nearly every read must hit; where keys far outnumber it
    (a million uniformly read keys) nearly every read misses, so a miss may cost no
    allocation, no eviction, no exception and, mostly, no dict lookup
    (``docs/architecture.md``, "The read path", has the figures that decided this design).

Layout
    Per index stripe a :class:`Cache`: ``entries``, a dict from key to *entry*, the tuple
    ``(position, value)``, of at most ``limit`` items (the oldest evicted first), and
    ``marks``, a ``bytearray`` of ``2 * G`` bytes (``G``, slots per stripe, a power of two,
    :data:`SLOTS_PER_ENTRY` times ``limit`` or more). A key's slot is
    ``s = (hash(key) >> SLOT_SHIFT) & mask`` with ``mask = 2 * G - 2``: an even index, from
    hash bits the stripe choice (the low bits) does not use. ``marks[s]`` counts the keys of
    that slot in ``entries`` (saturating at 255), and ``marks[s + 1]`` is the slot's *ghost*,
    the fingerprint of the position of the last record that missed there. A position's
    fingerprint (:func:`fingerprint`) is the low byte of the record's offset.

    Why counts: a miss must not look in ``entries`` when it can help it. On a stripe whose
    count for the key's slot is 0 the key is not cached, and ``get`` skips the dict; only a
    slot that some cached key shares costs a lookup. A dict lookup of a missing key walks
    the dict's table (at a million keys, memory the processor's cache rarely holds) and
    raises ``KeyError`` for a subscript, while ``dict.get``, which would not raise, runs in
    the dict's critical section on 3.13t, and readers on every thread share these dicts
    (``docs/free-threading.md``, section 2b). A mark is a byte of a ``bytearray``, loaded as
    an int from 0 to 255, an immortal object: testing and storing one writes no reference
    count and allocates nothing.

When an entry counts
    Only when ``entry[0] is`` the position object the index holds for the key now. Every
    write and every compaction move stores a new position object, and the entry holds a
    reference to its position, so the object cannot be freed and its identity reused while
    the entry lives: identity means the very record the entry was decoded from, of this key.
    Writes therefore never invalidate anything; a stale entry is a miss.

Admission and eviction
    A miss stores its record's fingerprint as its slot's ghost (one byte store). A miss
    whose fingerprint already is the ghost, i.e. (but for one chance in 256) the same record
    read twice without another miss in that slot between, stores its entry (a tuple: the one
    allocation, for a value that has been read twice) and counts it in its slot; into a full
    ``entries``, after evicting the oldest entry and uncounting it. So a key read once costs
    one byte store, and a hot key is admitted on its second read and then hits until it is
    written or evicted: the second-hit filter of TinyLFU's doorkeeper, with the slot's ghost
    as the filter. (A fingerprint that matches by chance admits a record on its first read:
    harmless. Admitting every read while the cache has room, tried too, cached a small
    working set no better and made the zipfian workload at a million keys slower:
    ``docs/architecture.md``.) Only keys that are valid UTF-8 are admitted, so a hit needs no
    check of a ``str`` argument (a ``str`` with a lone surrogate finds the index entry of the
    bytes key it escapes, and must still be refused: ``KvStore.get``).

Concurrency (happens-before)
    Readers fill the cache without a lock of their own. A dict subscript is lock-free on
    3.13t and a store or delete runs in the dict's critical section; a reader sees no entry,
    an older or a newer one, never a torn one, and an entry is a complete tuple before the store publishes it
    (its key, value and tuple are marked shared first, ``kvs.freethreading``). A mark is one
    byte, loaded and stored whole; the bytearrays never change size. Racing admissions,
    evictions and ghosts may overwrite each other, and a count is read, changed and stored
    without a lock: that loses an entry, or leaves a count too low (a later miss) or too
    high (a needless lookup), and never returns a wrong value, because every use of an
    entry is checked against the index as above.

Disabled (``cache_entries=0``)
    Every stripe has one slot whose count stays 0, and ``get`` never stores (``KvStore``
    sets its largest cached value to -1 bytes).
"""

from __future__ import annotations

SLOT_SHIFT = 32
"""A key's slot is taken from its hash shifted right by this much (the stripe uses the low
bits; index stripes are far fewer than 2**32)."""
SLOTS_PER_ENTRY = 4
"""Slots per cache entry: enough that most slots of a full cache count no key."""


class Cache:
    """One stripe's cache: ``entries``, their ``limit`` and ``marks`` (module docstring)."""

    __slots__ = ("entries", "limit", "marks")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: dict[str, tuple[int, str | bytes]] = {}
        self.marks = bytearray(2 * slots(limit))


def limit_per_stripe(cache_entries: int, stripes: int) -> int:
    """Entries per stripe for at least ``cache_entries`` entries in all (0: disabled)."""
    return -(-cache_entries // stripes) if cache_entries > 0 else 0


def slots(limit: int) -> int:
    """Slots of a stripe holding ``limit`` entries: a power of two (1 when disabled)."""
    return 1 << (SLOTS_PER_ENTRY * limit - 1).bit_length() if limit > 0 else 1


def slot_mask(limit: int) -> int:
    """The mask that turns shifted hash bits into a slot's (even) index in ``marks``."""
    return 2 * slots(limit) - 2


def fingerprint(pos: int) -> int:
    """A position's fingerprint: the low byte of its record's offset (``positions.py``;
    ``KvStore.get`` inlines it). Wide and narrow positions alike: it is only a filter."""
    return (pos >> 18) & 0xFF


def entries(cache: Cache) -> int:
    """How many entries ``cache`` holds now."""
    return len(cache.entries)


def clear(cache: Cache) -> None:
    """Drop every entry, count and ghost."""
    cache.entries.clear()
    cache.marks[:] = bytes(len(cache.marks))

"""The value cache of ``KvStore.get``: direct-mapped slots, admission on a second read.

What it is for
    A ``get`` that misses reads the record (a copy out of the segment's map or a ``pread``),
    checks its checksum and key, and decodes the value. The cache keeps decoded values of
    records that are read again, so that a hit is two subscripts and an identity test. It
    must never cost more than it saves: at a million uniformly read keys nearly every read
    misses, so a miss may cost no allocation beyond a few ints, no eviction, no exception,
    and no load of an object that is not in the processor's cache (``docs/architecture.md``,
    "The read path", has the figures that decided this design).

Layout
    Per index stripe a :class:`Cache`: ``entries``, a list of ``S`` items (``S``, slots per
    stripe, a power of two), and ``tags``, a ``bytearray`` of ``2 * S`` bytes. A key's tag
    index is ``t = (hash(key) >> SLOT_SHIFT) & mask`` with ``mask = 2 * S - 2``: an even
    index, from hash bits the stripe choice (the low bits) does not use; its entry is
    ``entries[t >> 1]``, which holds ``None`` or an *entry*, the tuple
    ``(position, value)``. ``tags[t]`` holds the *fingerprint* of that entry's position and
    ``tags[t + 1]`` the *ghost*, the fingerprint of the position of the last record that
    missed in this slot (0 until there is one). A position's fingerprint (:func:`fingerprint`) is the low
    byte of the record's offset: an int from 0 to 255.

    Why fingerprints: on 3.13t loading an object out of a list takes a reference to it,
    which writes to the object's header, and replacing one drops a reference to the old one.
    A miss that loaded the slot's entry tuple (another key's, usually) or replaced a ghost
    position would touch one or two objects that are rarely in the processor's cache, a
    memory round trip each. A byte of a ``bytearray`` is loaded as an int from 0 to 255, an
    immortal object: loading, comparing and storing one writes no reference count and
    allocates nothing, and a byte per tag keeps the tags of the default cache small enough
    to stay in the processor's cache.

When an entry counts
    Only when ``entry[0] is`` the position object the index holds for the key now. Every
    write and every compaction move stores a new position object, and the entry holds a
    reference to its position, so the object cannot be freed and its identity reused while
    the entry lives: identity means the very record the entry was decoded from, of this key
    (no other key's index holds that object). Writes therefore never invalidate anything; a
    stale entry is a miss. The key itself is not stored. A tag is only a filter in front of
    that test: an entry is looked at when ``tags[t]`` equals the position's fingerprint, and
    used only if its own ``entry[0] is position``. So a tag that is stale, left behind by a
    racing admission, or equal by chance (one in 256) costs a miss, never a wrong value.

Admission
    A miss stores its record's fingerprint as the slot's ghost (one byte store). A miss
    whose fingerprint already is the ghost, i.e. (but for one chance in 256) the same record
    read twice without another miss in that slot between, stores the entry (a tuple: the one
    allocation, for a value that has been read twice), then its tag. So a key read once
    costs one store; a hot key is admitted on its second read and then hits until it is
    written or another admitted key takes its slot. This is the second-hit filter of
    TinyLFU's doorkeeper, with the slot itself as the filter. (A fingerprint that matches by
    chance admits a record on its first read: harmless.) Only keys that are valid UTF-8 are
    admitted, so a hit needs no check of a ``str`` argument (a ``str`` with a lone surrogate
    finds the index entry of the bytes key it escapes, and must still be refused:
    ``KvStore.get``).

Concurrency (happens-before)
    Readers fill the cache without a lock. A list item load is lock-free on 3.13t and a
    store runs in the list's critical section; either way a reader sees ``None``, an older
    or a newer entry, never a torn one, and an entry is a complete tuple before the store
    publishes it (its objects are marked shared first, ``kvs.freethreading``). A tag or
    ghost is one byte, loaded and stored whole. Neither the lists nor the bytearrays ever
    change size. Racing admissions and ghosts may overwrite each other, and an entry and its
    tag are two stores: that loses an entry (a later miss) and never returns a wrong value,
    because every use is checked against the index as above.

Disabled (``cache_entries=0``)
    Every stripe's cache has one empty entry and two tags with mask 0 (a matching tag finds
    no entry), and ``get`` never stores (``KvStore`` sets its largest cached value to -1
    bytes)."""

from __future__ import annotations

SLOT_SHIFT = 32
"""A key's slot is taken from its hash shifted right by this much (the stripe uses the low
bits; index stripes are far fewer than 2**32)."""


class Cache:
    """One stripe's cache: ``entries`` and ``tags`` (module docstring)."""

    __slots__ = ("entries", "tags")

    def __init__(self, slots: int) -> None:
        self.entries: list[tuple[int, str | bytes] | None] = [None] * max(slots, 1)
        self.tags = bytearray(2 * max(slots, 1))


def fingerprint(pos: int) -> int:
    """A position's fingerprint: the low byte of its record's offset (``positions.py``;
    ``KvStore.get`` inlines it). Wide and narrow positions alike: only a filter."""
    return (pos >> 18) & 0xFF


def slots_per_stripe(cache_entries: int, stripes: int) -> int:
    """Slots per stripe for at least ``cache_entries`` entries in all: a power of two, or 0
    when the cache is disabled."""
    if cache_entries <= 0:
        return 0
    want = -(-cache_entries // stripes)
    return 1 << (want - 1).bit_length()


def tag_mask(slots: int) -> int:
    """The mask that turns shifted hash bits into a (even) tag index (0 when disabled)."""
    return 2 * slots - 2 if slots else 0


def entries(cache: Cache) -> int:
    """How many entries ``cache`` holds now."""
    return sum(1 for item in cache.entries if item is not None)


def clear(cache: Cache) -> None:
    """Drop every entry, tag and ghost."""
    cache.entries[:] = [None] * len(cache.entries)
    cache.tags[:] = bytes(len(cache.tags))

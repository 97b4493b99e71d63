"""The value cache of ``KvStore.get``: decoded values of records read again, admitted on a
second read.

What it is for
    A ``get`` that misses reads the record (a copy out of the segment's map or a ``pread``),
    checks its checksum and key, and decodes the value. The cache keeps decoded values of
    records that are read again, so that a hit is one dict lookup and an identity test.
    Where the keys read fit in it, nearly every read must hit; where keys far outnumber it
    (a million uniformly read keys) nearly every read misses, so a miss should cost no
    allocation and no eviction (``docs/architecture.md``, "The read path", has the figures
    that decided this design).

Layout
    Per index stripe a :class:`Cache`: ``entries``, a dict from key to *entry*, the tuple
    ``(position, value)``, of at most ``limit`` items (the oldest evicted first), and
    ``ghosts``, a ``bytearray`` of ``G`` bytes (a power of two, :data:`GHOST_SLOTS_PER_ENTRY`
    times ``limit`` or more). A key's ghost slot is ``(hash(key) >> GHOST_SHIFT) & (G - 1)``,
    from hash bits the stripe choice (the low bits) does not use; it holds the *fingerprint*
    of the position of the last record that missed there. A position's fingerprint
    (:func:`fingerprint`) is the low byte of the record's offset.

    Lookups are subscripts (a miss raises ``KeyError``): on 3.13t ``dict.get`` runs in the
    dict's critical section, and readers on every thread share these dicts
    (``docs/free-threading.md``, section 2b). A ghost is a byte of a ``bytearray``, loaded
    as an int from 0 to 255, an immortal object: testing and storing one writes no
    reference count and allocates nothing. The hit path computes nothing but the lookup:
    a filter in front of the dict (a count of cached keys per slot, tried) cost a hit more
    than it saved a miss (``docs/architecture.md``).

When an entry counts
    Only when ``entry[0] is`` the position object the index holds for the key now. Every
    write and every compaction move stores a new position object, and the entry holds a
    reference to its position, so the object cannot be freed and its identity reused while
    the entry lives: identity means the very record the entry was decoded from, of this key.
    Writes therefore never invalidate anything; a stale entry is a miss.

Admission and eviction
    While a stripe's ``entries`` has room, every miss stores its entry (a tuple: the one
    allocation): a working set smaller than the cache is all cached after one read of each
    key. (Admitting only second reads there lost for good the keys whose ghost another key's
    miss overwrote between their reads, about one in six of a working set read in passes:
    ``docs/architecture.md``.) Once it is full, a miss stores its record's fingerprint as
    its ghost slot's (one byte store), and only a miss whose fingerprint already is there,
    i.e. (but for one chance in 256) the same record read twice without another miss in
    that slot between, stores its entry, after evicting the oldest entry. So, with more keys
    than the cache holds, a key read once costs one byte store, and a hot key is admitted on
    its second read and then hits until it is written or evicted: the second-hit filter of
    TinyLFU's doorkeeper, with a ghost slot as the filter. (A fingerprint that matches by
    chance admits a record on its first read: harmless.) Only keys that are valid UTF-8 are
    admitted, so a hit needs no check of a ``str`` argument (a ``str`` with a lone surrogate
    finds the index entry of the bytes key it escapes, and must still be refused:
    ``KvStore.get``).

Concurrency (happens-before)
    Readers fill the cache without a lock of their own. A dict subscript is lock-free on
    3.13t and a store or delete runs in the dict's critical section; a reader sees no entry,
    an older or a newer one, never a torn one, and an entry is a complete tuple before the store publishes it
    (its key, value and tuple are marked shared first, ``kvs.freethreading``). A ghost is
    one byte, loaded and stored whole; the bytearrays never change size. Racing admissions,
    evictions and ghosts may overwrite each other: that loses an entry (a later miss) and
    never returns a wrong value, because every use of an entry is checked against the index
    as above.

Disabled (``cache_entries=0``)
    ``entries`` stays empty and ``get`` never stores (``KvStore`` sets its largest cached
    value to -1 bytes).
"""

from __future__ import annotations

GHOST_SHIFT = 32
"""A key's ghost slot is taken from its hash shifted right by this much (the stripe uses
the low bits; index stripes are far fewer than 2**32)."""
GHOST_SLOTS_PER_ENTRY = 4
"""Ghost slots per cache entry: enough that keys seldom share one."""


class Cache:
    """One stripe's cache: ``entries``, their ``limit`` and ``ghosts`` (module docstring)."""

    __slots__ = ("entries", "ghosts", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.entries: dict[str, tuple[int, str | bytes]] = {}
        self.ghosts = bytearray(ghost_slots(limit))


def limit_per_stripe(cache_entries: int, stripes: int) -> int:
    """Entries per stripe for at least ``cache_entries`` entries in all (0: disabled)."""
    return -(-cache_entries // stripes) if cache_entries > 0 else 0


def ghost_slots(limit: int) -> int:
    """Ghost slots of a stripe holding ``limit`` entries: a power of two (1 when disabled)."""
    return 1 << (GHOST_SLOTS_PER_ENTRY * limit - 1).bit_length() if limit > 0 else 1


def ghost_mask(limit: int) -> int:
    """The mask that turns shifted hash bits into a ghost slot."""
    return ghost_slots(limit) - 1


def fingerprint(pos: int) -> int:
    """A position's fingerprint: the low byte of its record's offset (``positions.py``;
    ``KvStore.get`` inlines it). Wide and narrow positions alike: it is only a filter."""
    return (pos >> 18) & 0xFF


def entries(cache: Cache) -> int:
    """How many entries ``cache`` holds now."""
    return len(cache.entries)


def clear(cache: Cache) -> None:
    """Drop every entry and ghost."""
    cache.entries.clear()
    cache.ghosts[:] = bytes(len(cache.ghosts))

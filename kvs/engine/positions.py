"""Record positions: where the index says a key's record is, packed into one ``int``.

A position names the record of ``length`` bytes at ``offset`` in the segment file whose
descriptor is ``fd``, and carries two flags about the key (:data:`EXPIRES`,
:data:`KEY_BYTES`). The index (``KvStore._stripes``) maps each key to one; a position is
immutable and is replaced by one dict store, so a lock-free reader sees the old or the new
record, never a mix, and needs no per-read segment object (``docs/free-threading.md``,
section 2: few shared objects on the read path).

Two forms of the magnitude ``P``, told apart by size:

- *narrow*, for ``fd < 2**12``, ``offset < 2**30``, ``length < 2**16`` (nearly every record):
  ``fd << 48 | offset << 18 | length << 2 | bits``, below ``2**60``, two 30-bit digits of a
  CPython int: one digit fewer than the wide form, which counts at a million keys;
- *wide* otherwise: ``2**89 | fd << 72 | offset << 32 | length << 2 | bits``, three digits,
  always ``>= 2**60``.

The flags
    :data:`KEY_BYTES` (bit 1 of ``P``): the key was written as ``bytes`` (iteration and
    ``scan`` return it so). :data:`EXPIRES`: the key has a deadline (in ``KvStore._expires``
    and in its record); it is bit 0 of ``P`` *and the sign of the position*: such a position
    is ``-P``. ``get`` takes its slow path for a negative position, which is also how it meets
    an entry being published by a transaction (``transactions.py``: a ``Pending``, an ``int``
    whose value is -1). The sign, because the fast path then tests ``pos < 0``, a comparison
    that allocates nothing, where ``pos & 1`` on a two-digit int makes a new int object.

:func:`pack`, :func:`unpack`, :func:`length` and :func:`flags` are the one definition. The hot
paths (``KvStore.get``, ``KvStore.set``, the hint loop of recovery) inline them; each inlined
copy is checked against these functions by ``tests/test_kvstore.py``
(``test_inlined_positions_equal_the_definition``).
"""

from __future__ import annotations

from kvs.errors import KvsError
from kvs.freethreading import share_module_globals

EXPIRES = 1
"""Flag: the key has a deadline (the position is negative); readers take the slow path."""
KEY_BYTES = 2
"""Flag: the key was written as bytes."""
FLAGS_MASK = 3

NARROW_LIMIT = 1 << 60
"""Every narrow position is below it, every wide one at or above it."""
NARROW_FD_LIMIT = 1 << 12
NARROW_OFFSET_LIMIT = 1 << 30
NARROW_LENGTH_LIMIT = 1 << 16
NARROW_FD_SHIFT = 48
NARROW_OFFSET_SHIFT = 18
NARROW_LENGTH_SHIFT = 2
NARROW_OFFSET_MASK = NARROW_OFFSET_LIMIT - 1
NARROW_LENGTH_MASK = NARROW_LENGTH_LIMIT - 1

WIDE = 1 << 89
WIDE_FD_SHIFT = 72
WIDE_OFFSET_SHIFT = 32
WIDE_LENGTH_SHIFT = 2
WIDE_LENGTH_MASK = (1 << 30) - 1
WIDE_OFFSET_MASK = (1 << 40) - 1
WIDE_FD_MASK = (1 << 17) - 1

MAX_RECORD_LENGTH = WIDE_LENGTH_MASK
"""The longest record a position can address. Reading (replay, compaction) accepts any such
record: the size limits of ``open`` apply to new writes only, so reopening a store with
smaller limits keeps its old records."""


def pack(fd: int, offset: int, length: int, flags: int = 0) -> int:
    """The position of the record of ``length`` bytes at ``offset`` in the file ``fd``, with
    ``flags`` (:data:`EXPIRES` | :data:`KEY_BYTES`); ``KvsError`` for a descriptor beyond what
    a position can hold."""
    # The narrow-form numbers as literals (folded into constants: no global loads on the
    # write path): NARROW_FD_LIMIT, NARROW_OFFSET_LIMIT, NARROW_LENGTH_LIMIT, the shifts.
    if fd < 4096 and offset < 1 << 30 and length < 1 << 16:
        p = (fd << 48) | (offset << 18) | (length << 2) | flags
    elif fd > WIDE_FD_MASK:
        raise KvsError(f"file descriptor {fd} is beyond what a position can hold ({WIDE_FD_MASK})")
    else:
        p = WIDE | (fd << WIDE_FD_SHIFT) | (offset << WIDE_OFFSET_SHIFT) | (length << WIDE_LENGTH_SHIFT) | flags
    return -p if flags & 1 else p  # EXPIRES: the sign


def unpack(pos: int) -> tuple[int, int, int]:
    """``(fd, offset, length)`` of a position."""
    if pos < 0:
        pos = -pos
    if pos < 1 << 60:  # NARROW_LIMIT
        return pos >> 48, (pos >> 18) & 0x3FFFFFFF, (pos >> 2) & 0xFFFF
    return ((pos >> WIDE_FD_SHIFT) & WIDE_FD_MASK, (pos >> WIDE_OFFSET_SHIFT) & WIDE_OFFSET_MASK,
            (pos >> WIDE_LENGTH_SHIFT) & WIDE_LENGTH_MASK)


def length(pos: int) -> int:
    """The length of the record at a position."""
    if pos < 0:
        pos = -pos
    return (pos >> 2) & 0xFFFF if pos < 1 << 60 else (pos >> WIDE_LENGTH_SHIFT) & WIDE_LENGTH_MASK


def flags(pos: int) -> int:
    """The flags of a position."""
    return (-pos if pos < 0 else pos) & FLAGS_MASK


share_module_globals(globals())

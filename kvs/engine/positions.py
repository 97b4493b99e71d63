"""Record positions: where the index says a key's record is, packed into one ``int``.

A position names the record of ``length`` bytes at ``offset`` in the segment file whose
descriptor is ``fd``. The index (``KvStore._stripes``) maps each key to one; a position is
immutable and is replaced by one dict store, so a lock-free reader sees the old or the new
record, never a mix, and needs no per-read segment object (``docs/free-threading.md``,
section 2: few shared objects on the read path).

Two forms, told apart by magnitude:

- *narrow*, for ``fd < 2**12``, ``offset < 2**32``, ``length < 2**16`` (nearly every
  record): ``fd << 48 | offset << 16 | length``, below ``2**60``, two 30-bit digits of a
  CPython int: one digit fewer than the wide form, which counts at a million keys;
- *wide* otherwise: ``2**89 | fd << 70 | offset << 30 | length``, three digits, always
  ``>= 2**60``.

:func:`pack`, :func:`unpack` and :func:`length` are the one definition. The hot paths
(``KvStore.get``, ``KvStore.set``, the hint loop of recovery) inline them; each inlined copy
is checked against these functions by ``tests/test_kvstore.py``
(``test_inlined_positions_equal_the_definition``).
"""

from __future__ import annotations

from kvs.errors import KvsError
from kvs.freethreading import share_module_globals

NARROW_LIMIT = 1 << 60
"""Every narrow position is below it, every wide one at or above it."""
NARROW_FD_LIMIT = 1 << 12
NARROW_OFFSET_LIMIT = 1 << 32
NARROW_LENGTH_LIMIT = 1 << 16
NARROW_FD_SHIFT = 48
NARROW_OFFSET_SHIFT = 16
NARROW_OFFSET_MASK = 0xFFFFFFFF
NARROW_LENGTH_MASK = 0xFFFF

WIDE = 1 << 89
WIDE_FD_SHIFT = 70
WIDE_OFFSET_SHIFT = 30
WIDE_LENGTH_MASK = (1 << 30) - 1
WIDE_OFFSET_MASK = (1 << 40) - 1
WIDE_FD_MASK = (1 << 19) - 1

MAX_RECORD_LENGTH = WIDE_LENGTH_MASK
"""The longest record a position can address. Reading (replay, compaction) accepts any such
record: the size limits of ``open`` apply to new writes only, so reopening a store with
smaller limits keeps its old records."""


def pack(fd: int, offset: int, length: int) -> int:
    """The position of the record of ``length`` bytes at ``offset`` in the file ``fd``;
    ``KvsError`` for a descriptor beyond what a position can hold."""
    # The narrow-form numbers as literals (folded into constants: no global loads on the
    # write path): NARROW_FD_LIMIT, NARROW_OFFSET_LIMIT, NARROW_LENGTH_LIMIT, the shifts.
    if fd < 4096 and offset < 1 << 32 and length < 1 << 16:
        return (fd << 48) | (offset << 16) | length
    if fd > WIDE_FD_MASK:
        raise KvsError(f"file descriptor {fd} is beyond what a position can hold ({WIDE_FD_MASK})")
    return WIDE | (fd << WIDE_FD_SHIFT) | (offset << WIDE_OFFSET_SHIFT) | length


def unpack(pos: int) -> tuple[int, int, int]:
    """``(fd, offset, length)`` of a position."""
    if pos < 1 << 60:  # NARROW_LIMIT
        return pos >> 48, (pos >> 16) & 0xFFFFFFFF, pos & 0xFFFF
    return (pos >> WIDE_FD_SHIFT) & WIDE_FD_MASK, (pos >> WIDE_OFFSET_SHIFT) & WIDE_OFFSET_MASK, pos & WIDE_LENGTH_MASK


def length(pos: int) -> int:
    """The length of the record at a position."""
    return pos & 0xFFFF if pos < 1 << 60 else pos & WIDE_LENGTH_MASK


share_module_globals(globals())

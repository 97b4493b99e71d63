"""Log records: the unit of the segment files (format version 1, see docs/storage-format.md).

A record is::

    op     u8    1 = SET, 2 = TOMBSTONE
    klen   u32   key length in bytes
    vlen   u32   value length in bytes (0 for a tombstone)
    key    klen bytes of UTF-8
    value  vlen bytes of UTF-8
    crc32  u32   CRC-32 (zlib) of every byte before it

all integers little-endian. With the checksum stored little-endian at the end, the CRC-32 of
a whole valid record is the constant :data:`CRC_RESIDUE`, so a reader verifies a record with
one ``zlib.crc32`` call over the bytes ``pread`` returned, without slicing. Records carry no
offsets, so compaction copies them byte for byte. Everything here is pure.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

HEADER = struct.Struct("<BII")
HEADER_SIZE = HEADER.size  # 9
TRAILER_SIZE = 4
OVERHEAD = HEADER_SIZE + TRAILER_SIZE
OP_SET = 1
OP_TOMBSTONE = 2
CRC_RESIDUE = 0x2144DF1C
"""zlib.crc32(body + crc32(body).to_bytes(4, "little")) for every body."""

_pack_header = HEADER.pack
_crc32 = zlib.crc32


def encode_set(key: bytes, value: bytes) -> bytes:
    """A SET record for ``key`` and ``value`` (UTF-8 bytes)."""
    body = b"".join((_pack_header(OP_SET, len(key), len(value)), key, value))
    return body + _crc32(body).to_bytes(4, "little")


def encode_tombstone(key: bytes) -> bytes:
    """A TOMBSTONE record: ``key`` was removed."""
    body = _pack_header(OP_TOMBSTONE, len(key), 0) + key
    return body + _crc32(body).to_bytes(4, "little")


def is_intact(rec: bytes | memoryview) -> bool:
    """True when the checksum of the whole record ``rec`` is right."""
    return _crc32(rec) == CRC_RESIDUE


class CorruptRecord(Exception):
    """A record at ``offset`` failed its checks; ``reason`` says how."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason


def scan(buf: bytes | memoryview, max_record: int) -> Iterator[tuple[int, int, bytes, int]]:
    """Yield ``(offset, op, key_bytes, record_length)`` for each record of ``buf`` in order.

    Raises :class:`CorruptRecord` at the first record that is truncated, has an unknown op,
    lengths over ``max_record`` or a bad checksum. A clean end of ``buf`` ends the iteration.
    """
    view = memoryview(buf)
    end = len(view)
    offset = 0
    unpack = HEADER.unpack_from
    while offset < end:
        if end - offset < OVERHEAD:
            raise CorruptRecord(offset, "truncated record")
        op, klen, vlen = unpack(view, offset)
        length = OVERHEAD + klen + vlen
        if op != OP_SET and op != OP_TOMBSTONE:
            raise CorruptRecord(offset, f"unknown operation {op}")
        if length > max_record or (op == OP_TOMBSTONE and vlen):
            raise CorruptRecord(offset, "implausible lengths")
        if offset + length > end:
            raise CorruptRecord(offset, "truncated record")
        if _crc32(view[offset : offset + length]) != CRC_RESIDUE:
            raise CorruptRecord(offset, "checksum mismatch")
        yield offset, op, bytes(view[offset + HEADER_SIZE : offset + HEADER_SIZE + klen]), length
        offset += length


from kvs.freethreading import share_module_globals  # noqa: E402  (last: marks this module's globals)

share_module_globals(globals())

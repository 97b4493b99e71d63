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
offsets, so compaction copies them byte for byte. Everything here is pure (no I/O, no
state).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Buffer, Generator

from kvs.freethreading import share_module_globals
from kvs.limits import check_str, encode_text

HEADER = struct.Struct("<BII")
HEADER_SIZE = HEADER.size  # 9
TRAILER_SIZE = 4
OVERHEAD = HEADER_SIZE + TRAILER_SIZE
OP_SET = 1
OP_TOMBSTONE = 2
CRC_RESIDUE = 0x2144DF1C
"""zlib.crc32(body + crc32(body).to_bytes(4, "little")) for every body."""
FORMAT_VERSION = 1
"""The version of the whole on-disk format of ``KvStore`` (records, segment and hint files),
recorded in the data directory's ``kvs-meta.json``."""

_pack_header = HEADER.pack
_pack_crc = struct.Struct("<I").pack
_crc32 = zlib.crc32


def encode_set(key: str, value: str, max_key: int, max_value: int) -> bytes:
    """The checksummed SET record of ``key`` and ``value``: the one SET encoder, which
    ``KvStore.set`` calls before it takes any lock. ``TypeError`` for a non-str argument,
    ``KvsError`` for text that is not valid Unicode or longer than ``max_key`` /
    ``max_value`` bytes in UTF-8 (:func:`kvs.limits.encode_text` words the error).

    Written for the write path: one encode of each string, one length check of both, and
    concatenation of the small pieces (no intermediate list)."""
    if type(key) is not str or type(value) is not str:
        key, value = check_str(key, "key"), check_str(value, "value")
    try:
        kb = key.encode()
        vb = value.encode()
    except UnicodeEncodeError:
        kb, vb = b"", b""
    klen, vlen = len(kb), len(vb)
    if klen > max_key or vlen > max_value or not kb and key or not vb and value:
        encode_text(key, "key", max_key)  # raises the precise KvsError
        encode_text(value, "value", max_value)
    body = _pack_header(OP_SET, klen, vlen) + kb + vb
    return body + _pack_crc(_crc32(body))


def encode_tombstone(key: bytes) -> bytes:
    """A TOMBSTONE record: ``key`` (UTF-8 bytes, already checked) was removed."""
    body = _pack_header(OP_TOMBSTONE, len(key), 0) + key
    return body + _pack_crc(_crc32(body))


class CorruptRecord(Exception):
    """A record at ``offset`` failed its checks; ``reason`` says how."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason


def scan(buf: Buffer, max_record: int) -> Generator[tuple[int, int, bytes, int]]:
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


share_module_globals(globals())

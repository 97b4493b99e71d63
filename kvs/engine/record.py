"""Log records: the unit of the segment files (format version 2, ``docs/storage-format.md``,
section 2).

A version-2 record is::

    op        u8    0x81 SET, 0x82 TOMBSTONE, 0x83 CLEAR, 0x84 TXN
    flags     u8    bit 0 DEADLINE, bit 1 KEY_BYTES, bit 2 VALUE_BYTES (SET); 0 otherwise
    klen      u32   key length in bytes (0 for CLEAR and TXN)
    vlen      u32   value length in bytes (0 for TOMBSTONE and CLEAR; TXN: payload length)
    deadline  u64   only when flags has DEADLINE: Unix milliseconds
    key       klen bytes
    value     vlen bytes (TXN: the payload, complete SET and TOMBSTONE records)
    crc32     u32   CRC-32 (zlib) of every byte before it

all integers little-endian. ``KEY_BYTES``/``VALUE_BYTES`` say that the key/value was written
as ``bytes`` (else as text, whose UTF-8 bytes these are). A ``TXN`` record frames the
records of one transaction: its checksum covers them all, so a torn transaction fails as a
whole (recovery cuts it), and each inner record is a complete record with its own
checksum, so the index points straight at it and readers read it as any other.

Version 1 (kvs 0.1.0) records are still read: ``op`` 1 (SET) or 2 (TOMBSTONE), then
``klen`` u32, ``vlen`` u32, key, value (UTF-8 text), crc32; no flags. The op values of the two
versions are disjoint and never 0 (a zero byte is space allocated ahead), so one scan reads
a segment holding both. Everything here is pure (no I/O, no state).

With the checksum stored little-endian at the end, the CRC-32 of a whole valid record is the
constant :data:`CRC_RESIDUE`, so a reader verifies a record with one ``zlib.crc32`` call over
the bytes ``pread`` returned, without slicing. Records carry no offsets, so compaction
copies them byte for byte.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Buffer, Generator

from kvs.freethreading import share_module_globals

HEADER = struct.Struct("<BBII")
HEADER_SIZE = HEADER.size  # 10
DEADLINE = struct.Struct("<Q")
DEADLINE_SIZE = DEADLINE.size
TRAILER_SIZE = 4
OVERHEAD = HEADER_SIZE + TRAILER_SIZE
OP_SET = 0x81
OP_TOMBSTONE = 0x82
OP_CLEAR = 0x83
OP_TXN = 0x84
F_DEADLINE = 1
F_KEY_BYTES = 2
F_VALUE_BYTES = 4

V1_HEADER = struct.Struct("<BII")
V1_HEADER_SIZE = V1_HEADER.size  # 9
V1_OVERHEAD = V1_HEADER_SIZE + TRAILER_SIZE
V1_OP_SET = 1
V1_OP_TOMBSTONE = 2

CRC_RESIDUE = 0x2144DF1C
"""zlib.crc32(body + crc32(body).to_bytes(4, "little")) for every body."""
FORMAT_VERSION = 2
"""The version of the whole on-disk format of ``KvStore`` (records, segment and hint files),
recorded in the data directory's ``kvs-meta.json``."""
READABLE_VERSIONS = (1,)
"""Older formats whose directories this code opens (and marks as version 2 at once)."""

_pack_header = HEADER.pack
_pack_deadline = DEADLINE.pack
_pack_crc = struct.Struct("<I").pack
_crc32 = zlib.crc32


def encode_text_set(key: str, value: str, max_key: int, max_value: int) -> bytes | None:
    """The SET record of a text key and value without deadline: the write path of the
    course's ``set(str, str)``, one encode of each string and one length check of both.
    None when either string cannot be encoded or is over its limit: the caller then takes
    the general path, which words the precise error."""
    try:
        kb = key.encode()
        vb = value.encode()
    except UnicodeEncodeError:
        return None
    klen, vlen = len(kb), len(vb)
    if klen > max_key or vlen > max_value:
        return None
    body = _pack_header(OP_SET, 0, klen, vlen) + kb + vb
    return body + _pack_crc(_crc32(body))


def encode_set(kb: bytes, vb: bytes, flags: int, deadline: int | None) -> bytes:
    """The SET record of checked key and value bytes; ``flags`` of ``F_KEY_BYTES`` and
    ``F_VALUE_BYTES`` (``F_DEADLINE`` is added when ``deadline`` is not None)."""
    if deadline is None:
        body = _pack_header(OP_SET, flags, len(kb), len(vb)) + kb + vb
    else:
        body = _pack_header(OP_SET, flags | F_DEADLINE, len(kb), len(vb)) + _pack_deadline(deadline) + kb + vb
    return body + _pack_crc(_crc32(body))


def encode_tombstone(kb: bytes) -> bytes:
    """A TOMBSTONE record: the key ``kb`` (already checked) was removed."""
    body = _pack_header(OP_TOMBSTONE, 0, len(kb), 0) + kb
    return body + _pack_crc(_crc32(body))


def encode_clear() -> bytes:
    """A CLEAR record: every record before it is dead."""
    body = _pack_header(OP_CLEAR, 0, 0, 0)
    return body + _pack_crc(_crc32(body))


TXN_PREFIX = HEADER_SIZE
"""Bytes of a TXN record before its first inner record."""


def encode_txn(records: list[bytes]) -> bytes:
    """A TXN record framing ``records`` (complete SET/TOMBSTONE records); the inner record
    ``j`` starts at ``TXN_PREFIX + sum(len(r) for r in records[:j])``."""
    payload = b"".join(records)
    body = _pack_header(OP_TXN, 0, 0, len(payload)) + payload
    return body + _pack_crc(_crc32(body))


class CorruptRecord(Exception):
    """A record at ``offset`` failed its checks; ``reason`` says how."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(f"offset {offset}: {reason}")
        self.offset = offset
        self.reason = reason


class Parsed:
    """The fields of one record (:func:`parse`): ``op`` (the version-2 op, version-1 ones
    mapped to ``OP_SET``/``OP_TOMBSTONE``), ``flags``, ``deadline`` (None: none), and where
    its key and value are: ``key_start``, ``klen``, ``vlen``."""

    __slots__ = ("op", "flags", "deadline", "key_start", "klen", "vlen")

    def __init__(self, op: int, flags: int, deadline: int | None, key_start: int, klen: int, vlen: int) -> None:
        self.op = op
        self.flags = flags
        self.deadline = deadline
        self.key_start = key_start
        self.klen = klen
        self.vlen = vlen

    @property
    def value_start(self) -> int:
        return self.key_start + self.klen


def parse(buf: Buffer, offset: int, end: int, max_record: int) -> tuple[Parsed, int]:
    """The record at ``offset`` of ``buf`` (ending at or before ``end``) and its length,
    checked: lengths, op, checksum. Raises :class:`CorruptRecord`. A TXN record is returned
    as itself (its payload is the caller's to walk)."""
    view = memoryview(buf)
    if end - offset < 1:
        raise CorruptRecord(offset, "truncated record")
    op = view[offset]
    if op == V1_OP_SET or op == V1_OP_TOMBSTONE:
        if end - offset < V1_OVERHEAD:
            raise CorruptRecord(offset, "truncated record")
        _op, klen, vlen = V1_HEADER.unpack_from(view, offset)
        length = V1_OVERHEAD + klen + vlen
        if length > max_record or (op == V1_OP_TOMBSTONE and vlen):
            raise CorruptRecord(offset, "implausible lengths")
        parsed = Parsed(OP_SET if op == V1_OP_SET else OP_TOMBSTONE, 0, None, V1_HEADER_SIZE, klen, vlen)
    elif OP_SET <= op <= OP_TXN:
        if end - offset < OVERHEAD:
            raise CorruptRecord(offset, "truncated record")
        _op, flags, klen, vlen = HEADER.unpack_from(view, offset)
        has_deadline = flags & F_DEADLINE
        length = OVERHEAD + klen + vlen + (DEADLINE_SIZE if has_deadline else 0)
        if (length > max_record or flags & ~7 or (op != OP_SET and flags)
                or (op == OP_TOMBSTONE and vlen) or (op >= OP_CLEAR and klen) or (op == OP_CLEAR and vlen)):
            raise CorruptRecord(offset, "implausible lengths")
        deadline = None
        key_start = HEADER_SIZE
        if has_deadline:
            if end - offset < HEADER_SIZE + DEADLINE_SIZE:
                raise CorruptRecord(offset, "truncated record")
            (deadline,) = DEADLINE.unpack_from(view, offset + HEADER_SIZE)
            key_start += DEADLINE_SIZE
        parsed = Parsed(op, flags, deadline, key_start, klen, vlen)
    else:
        raise CorruptRecord(offset, f"unknown operation {op}")
    if offset + length > end:
        raise CorruptRecord(offset, "truncated record")
    if _crc32(view[offset : offset + length]) != CRC_RESIDUE:
        raise CorruptRecord(offset, "checksum mismatch")
    return parsed, length


def scan(buf: Buffer, max_record: int) -> Generator[tuple[int, int, int, int | None, bytes, int]]:
    """Yield ``(offset, op, flags, deadline, key_bytes, record_length)`` for each SET,
    TOMBSTONE and CLEAR record of ``buf`` in order (the fields of :class:`Parsed`: ``op`` the
    version-2 op, ``deadline`` None for none), the records inside a TXN included (a TXN itself
    is not yielded). Raises :class:`CorruptRecord` at the first record that is truncated, has
    an unknown op, implausible lengths or a bad checksum (a TXN is checked whole before any of
    its records is yielded). A clean end of ``buf`` ends the iteration.

    A version-2 SET or TOMBSTONE without a deadline, the bulk of every log, is checked here
    inline with the same checks as :func:`parse`, without a :class:`Parsed` per record: this
    loop is ``open``'s and compaction's, run once per record."""
    view = memoryview(buf)
    end = len(view)
    offset = 0
    unpack = HEADER.unpack_from
    while offset < end:
        if end - offset >= OVERHEAD:
            op, flags, klen, vlen = unpack(view, offset)
            if (op == OP_SET and not flags & ~6) or (op == OP_TOMBSTONE and not flags and not vlen):
                length = OVERHEAD + klen + vlen
                if (length <= max_record and offset + length <= end
                        and _crc32(view[offset : offset + length]) == CRC_RESIDUE):
                    key_start = offset + HEADER_SIZE
                    yield offset, op, flags, None, bytes(view[key_start : key_start + klen]), length
                    offset += length
                    continue
        parsed, length = parse(view, offset, end, max_record)  # the general case, or the error
        if parsed.op == OP_TXN:
            inner = offset + TXN_PREFIX
            stop = offset + length - TRAILER_SIZE
            while inner < stop:
                try:
                    rec, n = parse(view, inner, stop, max_record)
                except CorruptRecord as exc:  # a valid checksum over a bad frame: not a torn tail
                    raise CorruptRecord(offset, f"bad transaction frame ({exc.reason})") from None
                if rec.op != OP_SET and rec.op != OP_TOMBSTONE:
                    raise CorruptRecord(offset, "bad transaction frame (nested record)")
                start = inner + rec.key_start
                yield inner, rec.op, rec.flags, rec.deadline, bytes(view[start : start + rec.klen]), n
                inner += n
        else:
            start = offset + parsed.key_start
            yield offset, parsed.op, parsed.flags, parsed.deadline, bytes(view[start : start + parsed.klen]), length
        offset += length


share_module_globals(globals())

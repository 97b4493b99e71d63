"""Hint files: the key directory of one compaction output, without the values.

Format version 2 (docs/storage-format.md, section 3)::

    magic    8 bytes  b"KVSHINT2"
    entries  repeated: klen u32, offset u64, length u32, flags u8, deadline u64, key (klen bytes)
    trailer  count u64, crc32 u32 of every byte before the crc field

Each entry names a SET record of the segment: its key, its offset, its total length, the
position flags of the key (``positions.EXPIRES``, ``positions.KEY_BYTES``) and, with
``EXPIRES``, its deadline (Unix ms; 0 otherwise). Version 1 files (magic ``b"KVSHINT1"``,
entries without flags and deadline) written by kvs 0.1.0 are still read. A
compaction output holds one record per key and no tombstones, so the entries' order does not
matter. A hint file that fails any check is ignored (with a warning) and the segment is
replayed from its log instead; hints are an accelerator, never the only copy of anything.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib
from collections.abc import Iterator

MAGIC = b"KVSHINT2"
ENTRY = struct.Struct("<IQIBQ")
V1_MAGIC = b"KVSHINT1"
V1_ENTRY = struct.Struct("<IQI")
TRAILER = struct.Struct("<QI")


class BadHintFile(Exception):
    """The hint file is damaged or does not match its segment."""


def encode_entry(key: bytes, offset: int, length: int, flags: int, deadline: int | None) -> bytes:
    return ENTRY.pack(len(key), offset, length, flags, deadline or 0) + key


def write_hint_file(path: str, entries: list[bytes], count: int) -> None:
    """Write ``entries`` (from :func:`encode_entry`) to ``path`` durably: the bytes are fsynced
    before the function returns (the caller renames the file into place and fsyncs the dir)."""
    body = b"".join([MAGIC, *entries, struct.pack("<Q", count)])
    data = body + zlib.crc32(body).to_bytes(4, "little")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_hint_file(path: str, segment_size: int) -> Iterator[tuple[bytes, int, int, int, int]]:
    """An iterator of ``(key, offset, length, flags, deadline)`` over every entry, after
    checking the whole file (version 1 entries: flags and deadline 0).

    Raises :class:`BadHintFile` when the magic, the checksum, the entry count or any entry's
    bounds (against ``segment_size``, the size of the segment's log) are wrong. Every check
    runs before this returns, so a caller never sees a part of a bad file; the entries are
    then decoded lazily from a read-only memory map of the file, unmapped when the iterator
    ends or is closed. Neither a list of every entry nor a heap copy of the file is made:
    opening a store with millions of keys would otherwise keep resident, after the open,
    memory on the order of the index itself."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < len(MAGIC) + TRAILER.size:
                raise BadHintFile("bad magic or too short")
            data = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise BadHintFile(f"cannot read: {exc.strerror}") from None
    try:
        entry = _check(data, segment_size)
    except BaseException:
        data.close()
        raise
    return _entries(data, len(data) - TRAILER.size, entry)


def _check(data: mmap.mmap, segment_size: int) -> struct.Struct:
    """Check the whole file; the entry layout of its version."""
    magic = data[:len(MAGIC)]
    if magic == MAGIC:
        entry = ENTRY
    elif magic == V1_MAGIC:
        entry = V1_ENTRY
    else:
        raise BadHintFile("bad magic or too short")
    body_end = len(data) - 4
    with memoryview(data) as whole, whole[:body_end] as body:
        crc = zlib.crc32(body)
    if crc != int.from_bytes(data[body_end:], "little"):
        raise BadHintFile("checksum mismatch")
    count, _ = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    end = len(data) - TRAILER.size
    pos = len(MAGIC)
    found = 0
    unpack = V1_ENTRY.unpack_from  # both versions' entries start with V1_ENTRY's fields
    esize = entry.size
    while pos < end:
        if end - pos < esize:
            raise BadHintFile("truncated entry")
        klen, offset, length = unpack(data, pos)
        pos += esize
        if pos + klen > end or offset + length > segment_size:
            raise BadHintFile("entry out of bounds")
        pos += klen
        found += 1
    if found != count:
        raise BadHintFile("entry count mismatch")
    return entry


def _entries(data: mmap.mmap, end: int, entry: struct.Struct) -> Iterator[tuple[bytes, int, int, int, int]]:
    """The entries of a checked hint file body ``data[len(MAGIC):end]``; unmaps ``data``
    when done."""
    try:
        pos = len(MAGIC)
        unpack = entry.unpack_from
        esize = entry.size
        if entry is V1_ENTRY:
            while pos < end:
                klen, offset, length = unpack(data, pos)
                pos += esize
                yield data[pos : pos + klen], offset, length, 0, 0
                pos += klen
            return
        while pos < end:
            klen, offset, length, flags, deadline = unpack(data, pos)
            pos += esize
            yield data[pos : pos + klen], offset, length, flags, deadline
            pos += klen
    finally:
        data.close()

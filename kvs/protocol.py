"""The kvs binary protocol (versions 1 and 2): pure encoding and decoding of frames over bytes.

No sockets, no threads, no clocks: every function here maps bytes to values and back, so
the protocol can be tested and fuzzed on its own (the h11 model). The specification is
docs/protocol.md; this module is its executable form and the two must agree.

Request frame (12-byte header, then an 8-byte TTL in version 2 when the TTL flag is set, then
the key bytes, then the value bytes)::

    magic 0xCB | version | op | flags | key length u32 BE | value length u32 BE | [ttl ms u64 BE] | key | value

Response frame (8-byte header, then the payload)::

    magic 0xCC | version | status | flags | payload length u32 BE | payload

Version 2 is version 1 plus flag bits: a request's key and value, and a VALUE response's
payload, are UTF-8 text (read back as ``str``) unless their ``*_BYTES`` flag says they are
arbitrary bytes (read back as ``bytes``); a SET may carry a TTL. Version 1 frames (flags 0,
text only) are the same bytes as before and still decoded.

Invariants the rest of kvs relies on:

* The first byte of every request is ``REQUEST_MAGIC`` (0xCB, >= 0x80), so a server can tell
  this protocol from RESP (``*`` or an ASCII letter) by the first byte of a connection.
* Every frame says its own version; a server answers each request in the version it came in
  (so a version-1 client gets exactly the version-1 replies it always got), and FATAL, which
  answers no request, in version 1, which every client reads.
* A frame's total length is known from its header alone. A header whose magic, version or
  length is unacceptable is *fatal* (``ProtocolError.fatal``): it is rejected as soon as the
  offending header bytes are present, without waiting for or allocating the body.
* Any other malformed frame (unknown op or flag, a key or value over its limit, text that is
  not valid UTF-8, a key, value or TTL on an op that takes none) is *recoverable*: the
  decoder yields a ``FrameError`` (a ``ProtocolError`` that knows the frame's version) in
  place of that request, skips exactly that frame, and the frames after it decode normally.
  Responses therefore stay one per request, in order.
* Decoders only ever raise ``ProtocolError``, whatever bytes they are fed.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Any, NamedTuple

from kvs.engine.values import key_bytes, value_bytes
from kvs.errors import KvsError, ProtocolError
from kvs.freethreading import share_module_globals
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES, encode_text

__all__ = [
    # the wire format
    "FLAG_KEY_BYTES", "FLAG_TTL", "FLAG_VALUE_BYTES", "MAX_MESSAGE_BYTES", "MAX_TTL_MS", "PROTOCOL_VERSION",
    "PROTOCOL_VERSIONS", "REQUEST_HEADER_SIZE", "REQUEST_MAGIC", "RESPONSE_HEADER_SIZE", "RESPONSE_MAGIC",
    "TTL_FIELD_SIZE", "Op", "Status", "max_request_frame_bytes",
    # values and errors
    "FrameError", "ProtocolError", "Request", "Response",
    # requests
    "RequestDecoder", "check_ttl_ms", "encode_get", "encode_ping", "encode_remove", "encode_request", "encode_set",
    "parse_requests",
    # responses
    "NOT_FOUND_RESPONSE", "NOT_FOUND_RESPONSE_V1", "OK_RESPONSE", "OK_RESPONSE_V1", "PONG_RESPONSE",
    "PONG_RESPONSE_V1", "ResponseDecoder", "encode_error", "encode_fatal", "encode_not_found", "encode_ok",
    "encode_pong", "encode_response", "encode_value", "parse_responses",
]

# --------------------------------------------------------------------------------------------
# Constants of the wire format

REQUEST_MAGIC = 0xCB
"""First byte of every request frame. >= 0x80, so never the first byte of a RESP command."""

RESPONSE_MAGIC = 0xCC
"""First byte of every response frame (distinct from requests, to catch crossed wires)."""

PROTOCOL_VERSION = 2
"""The version this side writes by default (the second byte of every frame)."""

PROTOCOL_VERSIONS = (1, 2)
"""The versions this side reads. A frame of another version is fatal."""

REQUEST_HEADER_SIZE = 12
RESPONSE_HEADER_SIZE = 8

TTL_FIELD_SIZE = 8
"""Bytes of a version-2 request's TTL field (u64 BE milliseconds), present iff ``FLAG_TTL``."""

FLAG_KEY_BYTES = 0x01
"""Version 2 request flag: the key is bytes (read back as ``bytes``), not UTF-8 text."""
FLAG_VALUE_BYTES = 0x02
"""Version 2 request flag (SET) and VALUE response flag: the value is bytes, not UTF-8 text."""
FLAG_TTL = 0x04
"""Version 2 request flag (SET): a TTL field follows the header."""
_REQUEST_FLAGS = FLAG_KEY_BYTES | FLAG_VALUE_BYTES | FLAG_TTL

MAX_TTL_MS = (1 << 63) - 1
"""The largest TTL a frame may carry, in milliseconds (the engines' deadline limit)."""

MAX_MESSAGE_BYTES = 4096
"""Longest error message ``encode_error``/``encode_fatal`` put on the wire (longer ones are cut)."""

_U32_MAX = 0xFFFFFFFF

Buffer = bytes | bytearray | memoryview
"""What the parsers read from."""

_REQ_HEADER = struct.Struct(">HHII")  # (magic << 8 | version), (op << 8 | flags), key len, value len
_RESP_HEADER = struct.Struct(">HHI")  # (magic << 8 | version), (status << 8 | flags), payload len
_REQ_HEADER_TTL = struct.Struct(">HHIIQ")  # the same, then the TTL field
_TTL = struct.Struct(">Q")
_unpack_req = _REQ_HEADER.unpack_from
_pack_req = _REQ_HEADER.pack
_pack_req_ttl = _REQ_HEADER_TTL.pack
_unpack_ttl = _TTL.unpack_from
_unpack_resp = _RESP_HEADER.unpack_from
_pack_resp = _RESP_HEADER.pack

_REQ_MV = REQUEST_MAGIC << 8 | 1
_REQ_MV2 = REQUEST_MAGIC << 8 | 2
_RESP_MV = RESPONSE_MAGIC << 8 | 1
_RESP_MV2 = RESPONSE_MAGIC << 8 | 2


class Op(IntEnum):
    """Request operation codes (the third header byte). Compare with ``==`` or ``is``."""

    PING = 1
    GET = 2
    SET = 3
    REMOVE = 4


class Status(IntEnum):
    """Response status codes (the third header byte of a response)."""

    OK = 0
    """SET stored the value / REMOVE deleted the key. No payload."""
    VALUE = 1
    """GET found the key. Payload: the value (UTF-8 text; bytes with ``FLAG_VALUE_BYTES``)."""
    NOT_FOUND = 2
    """GET or REMOVE of a key that is absent. No payload."""
    PONG = 3
    """Answer to PING. No payload."""
    ERROR = 4
    """The request failed; the connection continues. Payload: a UTF-8 message."""
    FATAL = 5
    """Protocol violation; the server closes the connection after this frame. Payload: message."""


# The (op << 8 | flags) header field of each valid request without flags.
_PING_OF = Op.PING << 8
_GET_OF = Op.GET << 8
_SET_OF = Op.SET << 8
_REMOVE_OF = Op.REMOVE << 8
_PING, _GET, _SET, _REMOVE = Op.PING, Op.GET, Op.SET, Op.REMOVE

_NO_PAYLOAD = frozenset({Status.OK, Status.NOT_FOUND, Status.PONG})


# --------------------------------------------------------------------------------------------
# Values


class Request(NamedTuple):
    """One decoded request. ``key`` is None for PING; ``value`` is None except for SET. A key
    or value is ``str`` when the frame carried it as text, ``bytes`` when as bytes (version 2
    flags); ``ttl_ms`` is a SET's TTL in milliseconds (1 to ``MAX_TTL_MS``) or None;
    ``version`` is the frame's version, the version of the response it gets.

    Built with ``tuple.__new__`` on the hot path (the cheapest immutable record measured).
    """

    op: Op
    key: str | bytes | None
    value: str | bytes | None
    ttl_ms: int | None = None
    version: int = PROTOCOL_VERSION


class Response(NamedTuple):
    """One decoded response. ``value`` is the value for VALUE (``str``, or ``bytes`` when the
    frame says so), the message for ERROR and FATAL, and None for the statuses without
    payload."""

    status: Status
    value: str | bytes | None


class FrameError(ProtocolError):
    """A recoverable error of one request frame (never fatal), with the frame's ``version``:
    the version of the ERROR response that answers it."""

    def __init__(self, message: str, version: int = PROTOCOL_VERSION) -> None:
        super().__init__(message)
        self.version = version


_new = tuple.__new__


def max_request_frame_bytes(max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
                            max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> int:
    """The longest request frame a decoder with these limits buffers (header + key + value;
    a version 2 SET with a TTL field is ``TTL_FIELD_SIZE`` longer); a header announcing
    more is fatal."""
    return REQUEST_HEADER_SIZE + max_key_bytes + max_value_bytes


# --------------------------------------------------------------------------------------------
# Decoding requests


def _bad_magic_or_version(buf: Buffer, pos: int, avail: int, magic: int, what: str, hint: str) -> str | None:
    """The message of a fatal error in the first two header bytes present at ``pos``, or None."""
    if avail <= 0:
        return None
    if buf[pos] != magic:
        return (f"bad magic byte 0x{buf[pos]:02x} at the start of {what} (expected 0x{magic:02x}): {hint}")
    if avail >= 2 and buf[pos + 1] not in PROTOCOL_VERSIONS:
        return f"unsupported protocol version {buf[pos + 1]} (this side speaks versions 1 and 2)"
    return None


def _fatal_request_header(buf: Buffer, pos: int, end: int, max_body: int, preceding: list[Any],
                          offset: int) -> ProtocolError | None:
    """The fatal error for the (possibly partial) request header at ``pos``, or None if the
    bytes present are acceptable so far. Called off the hot path only."""
    avail = end - pos
    bad = _bad_magic_or_version(buf, pos, avail, REQUEST_MAGIC, "a frame", "not a kvs protocol frame")
    if bad is not None or avail < 2:
        return None if bad is None else ProtocolError(bad, fatal=True, preceding=preceding, offset=offset)
    if avail < REQUEST_HEADER_SIZE:
        return None
    _, _, klen, vlen = _unpack_req(buf, pos)
    if klen + vlen > max_body:
        return ProtocolError(
            f"frame announces {REQUEST_HEADER_SIZE + klen + vlen} bytes, over the maximum frame size "
            f"of {REQUEST_HEADER_SIZE + max_body} bytes",
            fatal=True, preceding=preceding, offset=offset,
        )
    return None


def _bad_request(buf: Buffer, pos: int, of: int, klen: int, vlen: int, max_key: int, max_value: int,
                 version: int) -> FrameError:
    """The recoverable error for a well-framed request that is not valid. Off the hot path."""
    op, flags = of >> 8, of & 0xFF
    if op not in Op._value2member_map_:
        return FrameError(f"unknown operation 0x{op:02x}", version)
    name = Op(op).name
    if version == 1 and flags:
        return FrameError(f"reserved flags byte must be 0, got 0x{flags:02x}", version)
    if flags & ~_REQUEST_FLAGS:
        return FrameError(f"unknown flags 0x{flags & ~_REQUEST_FLAGS:02x} (version 2 defines 0x01, 0x02 and 0x04)",
                          version)
    if op == _PING and (klen or vlen):
        return FrameError("PING takes no key and no value", version)
    if op == _PING and flags:
        return FrameError("PING takes no flags", version)
    if op != _SET and (vlen or flags & FLAG_VALUE_BYTES):
        return FrameError(f"{name} takes no value", version)
    if op != _SET and flags & FLAG_TTL:
        return FrameError(f"{name} takes no TTL", version)
    if klen > max_key:
        return FrameError(f"key is {klen} bytes, over the limit of {max_key} bytes", version)
    if vlen > max_value:
        return FrameError(f"value is {vlen} bytes, over the limit of {max_value} bytes", version)
    kstart = pos + REQUEST_HEADER_SIZE
    if flags & FLAG_TTL:
        kstart += TTL_FIELD_SIZE
        (ttl,) = _unpack_ttl(buf, pos + REQUEST_HEADER_SIZE)
        if not 0 < ttl <= MAX_TTL_MS:
            return FrameError(f"TTL must be 1 to {MAX_TTL_MS} milliseconds, got {ttl}", version)
    if not flags & FLAG_KEY_BYTES:
        try:
            str(buf[kstart : kstart + klen], "utf-8")
        except UnicodeDecodeError:
            return FrameError("key is not valid UTF-8 (send it with the KEY_BYTES flag)"
                              if version == 2 else "key is not valid UTF-8", version)
    if not flags & FLAG_VALUE_BYTES:
        try:
            str(buf[kstart + klen : kstart + klen + vlen], "utf-8")
        except UnicodeDecodeError:
            return FrameError("value is not valid UTF-8 (send it with the VALUE_BYTES flag)"
                              if version == 2 else "value is not valid UTF-8", version)
    return FrameError("malformed request", version)  # unreachable for frames _request_v2 refused


def _request_v2(buf: Buffer, pos: int, of: int, kstart: int, klen: int, vlen: int, max_key: int,
                max_value: int) -> Request | FrameError:
    """A version 2 request off the parser's inline fast paths (bytes, a TTL, PING, REMOVE),
    or its error. ``kstart`` is past the TTL field when there is one."""
    op, flags = of >> 8, of & 0xFF
    if (flags & ~_REQUEST_FLAGS or klen > max_key or vlen > max_value
            or (op != _SET and (vlen or flags & (FLAG_VALUE_BYTES | FLAG_TTL)))
            or (op == _PING and (klen or flags)) or op not in Op._value2member_map_):
        return _bad_request(buf, pos, of, klen, vlen, max_key, max_value, 2)
    if op == _PING:
        return _R_PING2
    ttl = None
    if flags & FLAG_TTL:
        (ttl,) = _unpack_ttl(buf, pos + REQUEST_HEADER_SIZE)
        if not 0 < ttl <= MAX_TTL_MS:
            return _bad_request(buf, pos, of, klen, vlen, max_key, max_value, 2)
    vstart = kstart + klen
    try:
        key = bytes(buf[kstart:vstart]) if flags & FLAG_KEY_BYTES else str(buf[kstart:vstart], "utf-8")
        if op != _SET:
            return _new(Request, (Op(op), key, None, None, 2))
        nxt = vstart + vlen
        value = bytes(buf[vstart:nxt]) if flags & FLAG_VALUE_BYTES else str(buf[vstart:nxt], "utf-8")
    except UnicodeDecodeError:
        return _bad_request(buf, pos, of, klen, vlen, max_key, max_value, 2)
    return _new(Request, (_SET, key, value, ttl, 2))


_R_PING2 = _new(Request, (_PING, None, None, None, 2))
_R_PING1 = _new(Request, (_PING, None, None, None, 1))


def parse_requests(
    buf: Buffer,
    start: int = 0,
    end: int | None = None,
    *,
    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
) -> tuple[list[Request | ProtocolError], int]:
    """Decode every complete request frame (either version) in ``buf[start:end]``, in one pass.

    Returns ``(items, pos)``: the requests in wire order, a ``FrameError`` (non-fatal) in
    place of each malformed but well-framed one, and the offset just past the last complete
    frame (``pos == end`` when nothing is left over). Raises a fatal ``ProtocolError``
    (with ``preceding`` = the items decoded before it) for a bad magic, an unknown version or
    an over-limit frame length as soon as the offending header bytes are present; its
    ``offset`` is the length of the complete frames before the bad one.
    """
    if end is None:
        end = len(buf)
    max_body = max_key_bytes + max_value_bytes
    items: list[Request | ProtocolError] = []
    append = items.append
    pos = start
    while end - pos >= 12:
        mv, of, klen, vlen = _unpack_req(buf, pos)
        if klen + vlen > max_body:
            break
        kstart = pos + 12
        if mv == _REQ_MV2:
            if of & FLAG_TTL:
                kstart += 8
            vstart = kstart + klen
            nxt = vstart + vlen
            if nxt > end:
                return items, pos
            try:
                # Inline: text GET and SET, the requests of every benchmark and course client.
                if of == _GET_OF and not vlen and klen <= max_key_bytes:
                    append(_new(Request, (_GET, str(buf[kstart:nxt], "utf-8"), None, None, 2)))
                elif of == _SET_OF and klen <= max_key_bytes and vlen <= max_value_bytes:
                    append(_new(Request, (_SET, str(buf[kstart:vstart], "utf-8"), str(buf[vstart:nxt], "utf-8"),
                                          None, 2)))
                else:
                    append(_request_v2(buf, pos, of, kstart, klen, vlen, max_key_bytes, max_value_bytes))
            except UnicodeDecodeError:
                append(_bad_request(buf, pos, of, klen, vlen, max_key_bytes, max_value_bytes, 2))
        elif mv == _REQ_MV:
            vstart = kstart + klen
            nxt = vstart + vlen
            if nxt > end:
                return items, pos
            try:
                if of == _GET_OF and not vlen and klen <= max_key_bytes:
                    append(_new(Request, (_GET, str(buf[kstart:nxt], "utf-8"), None, None, 1)))
                elif of == _SET_OF and klen <= max_key_bytes and vlen <= max_value_bytes:
                    append(_new(Request, (_SET, str(buf[kstart:vstart], "utf-8"), str(buf[vstart:nxt], "utf-8"),
                                          None, 1)))
                elif of == _REMOVE_OF and not vlen and klen <= max_key_bytes:
                    append(_new(Request, (_REMOVE, str(buf[kstart:nxt], "utf-8"), None, None, 1)))
                elif of == _PING_OF and not klen and not vlen:
                    append(_R_PING1)
                else:
                    append(_bad_request(buf, pos, of, klen, vlen, max_key_bytes, max_value_bytes, 1))
            except UnicodeDecodeError:
                append(_bad_request(buf, pos, of, klen, vlen, max_key_bytes, max_value_bytes, 1))
        else:
            break
        pos = nxt
    err = _fatal_request_header(buf, pos, end, max_body, items, pos - start)
    if err is not None:
        raise err
    return items, pos


class _Decoder[T]:
    """Shared buffering of the two incremental decoders (``T``: what they yield). Not
    thread-safe: one per connection."""

    __slots__ = ("_buf", "_error")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: ProtocolError | None = None

    def _parse(self, buf: Buffer, start: int, end: int) -> tuple[list[T], int]:
        raise NotImplementedError

    def feed(self, data: Buffer) -> list[T]:
        """Append ``data`` to the stream; return every item completed by it, in order.

        Holds back an incomplete trailing frame (``pending_bytes``). Raises a fatal
        ``ProtocolError`` (with ``preceding``) when the stream cannot be framed; after that
        every call raises the same error.
        """
        if self._error is not None:
            raise ProtocolError(str(self._error), fatal=True)
        buf = self._buf
        src: Buffer
        if buf:
            buf += data
            src = buf
        else:
            src = data
        end = len(src)
        try:
            items, pos = self._parse(src, 0, end)
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            raise
        if src is buf:
            if pos == end:
                buf.clear()
            elif pos:
                del buf[:pos]
        elif pos < end:
            buf += memoryview(data)[pos:]
        return items

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete frame held back, waiting for the rest of it."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """True while part of a frame has arrived but not all of it (for half-sent-frame
        timeouts: a peer idle with ``in_frame`` true has stalled mid-frame)."""
        return bool(self._buf)

    @property
    def failed(self) -> ProtocolError | None:
        """The fatal error that ended the stream, or None."""
        return self._error


class RequestDecoder(_Decoder[Request | ProtocolError]):
    """Incremental request decoder for one connection (server side), in the style of h11.

    ``feed`` returns ``Request``s, with a non-fatal ``ProtocolError`` in place of each
    malformed frame, in wire order; fatal problems raise. Frames over
    ``max_request_frame_bytes(max_key_bytes, max_value_bytes)`` are fatal; a key or value
    over its own limit inside a frame within that size is recoverable.
    """

    __slots__ = ("max_key_bytes", "max_value_bytes")

    def __init__(self, *, max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
                 max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> None:
        super().__init__()
        self.max_key_bytes = max_key_bytes
        self.max_value_bytes = max_value_bytes

    def _parse(self, buf: Buffer, start: int, end: int) -> tuple[list[Request | ProtocolError], int]:
        return parse_requests(buf, start, end, max_key_bytes=self.max_key_bytes, max_value_bytes=self.max_value_bytes)


# --------------------------------------------------------------------------------------------
# Encoding requests


_PING_FRAME = _pack_req(_REQ_MV2, _PING_OF, 0, 0)
_PING_FRAME_V1 = _pack_req(_REQ_MV, _PING_OF, 0, 0)


def _check_version(version: int) -> None:
    if version != 1 and version != 2:
        raise ValueError(f"unknown protocol version {version!r} (versions 1 and 2 exist)")


def encode_ping(*, version: int = PROTOCOL_VERSION) -> bytes:
    """A PING request frame (a constant)."""
    if version == 2:
        return _PING_FRAME
    _check_version(version)
    return _PING_FRAME_V1


def _key_op(op_field: int, key: object, max_key_bytes: int, version: int) -> bytes:
    """A GET or REMOVE frame: version 2 sends a ``str`` key as text and a bytes-like one with
    ``FLAG_KEY_BYTES``; version 1 takes text only."""
    if version == 2:
        kb, is_bytes = key_bytes(key, max_key_bytes)
        return _pack_req(_REQ_MV2, op_field | is_bytes, len(kb), 0) + kb
    _check_version(version)
    k = encode_text(key, "key", max_key_bytes)  # type: ignore[arg-type]  # checked there
    return _pack_req(_REQ_MV, op_field, len(k), 0) + k


def encode_get(key: str | bytes | bytearray | memoryview, *, version: int = PROTOCOL_VERSION,
               max_key_bytes: int = DEFAULT_MAX_KEY_BYTES) -> bytes:
    """A GET request frame. ``TypeError`` for a key that is neither ``str`` nor bytes-like
    (version 1: not ``str``); ``KvsError`` for text that is not encodable as UTF-8 or a key
    over ``max_key_bytes``."""
    return _key_op(_GET_OF, key, max_key_bytes, version)


def encode_remove(key: str | bytes | bytearray | memoryview, *, version: int = PROTOCOL_VERSION,
                  max_key_bytes: int = DEFAULT_MAX_KEY_BYTES) -> bytes:
    """A REMOVE request frame; same checks as ``encode_get``."""
    return _key_op(_REMOVE_OF, key, max_key_bytes, version)


def check_ttl_ms(ttl_ms: object) -> int:
    """``ttl_ms`` as the TTL field of a frame: ``TypeError`` for a non-int, ``KvsError`` outside
    1 to ``MAX_TTL_MS``."""
    if isinstance(ttl_ms, bool) or not isinstance(ttl_ms, int):
        raise TypeError(f"ttl_ms must be an int, not {type(ttl_ms).__name__}")
    if not 0 < ttl_ms <= MAX_TTL_MS:
        raise KvsError(f"TTL must be 1 to {MAX_TTL_MS} milliseconds, not {ttl_ms}")
    return int(ttl_ms)


def encode_set(
    key: str | bytes | bytearray | memoryview,
    value: str | bytes | bytearray | memoryview,
    *,
    ttl_ms: int | None = None,
    version: int = PROTOCOL_VERSION,
    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
) -> bytes:
    """A SET request frame; key and value checked as in ``encode_get`` (each one text, or
    bytes with its flag). ``ttl_ms`` (version 2 only): the key expires that many milliseconds
    after the server stores it (``check_ttl_ms``)."""
    if version == 2:
        kb, key_is_bytes = key_bytes(key, max_key_bytes)
        vb, value_is_bytes = value_bytes(value, max_value_bytes)
        flags = key_is_bytes | value_is_bytes << 1
        if ttl_ms is None:
            return b"".join((_pack_req(_REQ_MV2, _SET_OF | flags, len(kb), len(vb)), kb, vb))
        header = _pack_req_ttl(_REQ_MV2, _SET_OF | flags | FLAG_TTL, len(kb), len(vb), check_ttl_ms(ttl_ms))
        return b"".join((header, kb, vb))
    _check_version(version)
    if ttl_ms is not None:
        raise KvsError("protocol version 1 has no TTL")
    k = encode_text(key, "key", max_key_bytes)  # type: ignore[arg-type]  # checked there
    v = encode_text(value, "value", max_value_bytes)  # type: ignore[arg-type]
    return b"".join((_pack_req(_REQ_MV, _SET_OF, len(k), len(v)), k, v))


def encode_request(
    op: Op | int,
    key: str | bytes | None = None,
    value: str | bytes | None = None,
    *,
    ttl_ms: int | None = None,
    version: int = PROTOCOL_VERSION,
    max_key_bytes: int = DEFAULT_MAX_KEY_BYTES,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
) -> bytes:
    """The request frame for ``op``: PING takes neither key nor value, GET and REMOVE a key,
    SET a key, a value and optionally ``ttl_ms``. ``ValueError`` for an unknown op or a wrong
    set of arguments."""
    if op != _SET and ttl_ms is not None:
        raise ValueError("only SET takes a TTL")
    if op == _GET or op == _REMOVE:
        if key is None or value is not None:
            raise ValueError(f"{Op(op).name} takes a key and no value")
        return (encode_get if op == _GET else encode_remove)(key, version=version, max_key_bytes=max_key_bytes)
    if op == _SET:
        if key is None or value is None:
            raise ValueError("SET takes a key and a value")
        return encode_set(key, value, ttl_ms=ttl_ms, version=version, max_key_bytes=max_key_bytes,
                          max_value_bytes=max_value_bytes)
    if op == _PING:
        if key is not None or value is not None:
            raise ValueError("PING takes no key and no value")
        return encode_ping(version=version)
    raise ValueError(f"unknown operation {op!r}")


# --------------------------------------------------------------------------------------------
# Encoding responses

OK_RESPONSE = _pack_resp(_RESP_MV2, Status.OK << 8, 0)
NOT_FOUND_RESPONSE = _pack_resp(_RESP_MV2, Status.NOT_FOUND << 8, 0)
PONG_RESPONSE = _pack_resp(_RESP_MV2, Status.PONG << 8, 0)
OK_RESPONSE_V1 = _pack_resp(_RESP_MV, Status.OK << 8, 0)
NOT_FOUND_RESPONSE_V1 = _pack_resp(_RESP_MV, Status.NOT_FOUND << 8, 0)
PONG_RESPONSE_V1 = _pack_resp(_RESP_MV, Status.PONG << 8, 0)
_S_VALUE, _S_ERROR, _S_FATAL = Status.VALUE, Status.ERROR, Status.FATAL
_VALUE_SF = Status.VALUE << 8
_VALUE_BYTES_SF = _VALUE_SF | FLAG_VALUE_BYTES
_ERROR_SF = Status.ERROR << 8
_FATAL_SF = Status.FATAL << 8


def encode_ok(*, version: int = PROTOCOL_VERSION) -> bytes:
    """The OK response (a constant per version)."""
    _check_version(version)
    return OK_RESPONSE if version == 2 else OK_RESPONSE_V1


def encode_not_found(*, version: int = PROTOCOL_VERSION) -> bytes:
    """The NOT_FOUND response (a constant per version)."""
    _check_version(version)
    return NOT_FOUND_RESPONSE if version == 2 else NOT_FOUND_RESPONSE_V1


def encode_pong(*, version: int = PROTOCOL_VERSION) -> bytes:
    """The PONG response (a constant per version)."""
    _check_version(version)
    return PONG_RESPONSE if version == 2 else PONG_RESPONSE_V1


def encode_value(value: str | bytes | bytearray | memoryview, *, version: int = PROTOCOL_VERSION) -> bytes:
    """The VALUE response carrying ``value`` (a GET hit): in version 2 a ``str`` as text and
    bytes with ``FLAG_VALUE_BYTES``. Version 1 carries text only: bytes go as the text they
    encode, and bytes that are not valid UTF-8 raise ``KvsError`` (the server answers ERROR).
    A ``str`` must be encodable as UTF-8 (values read from a kvs engine always are)."""
    if version == 2:
        if type(value) is str:
            v = value.encode()
            return _pack_resp(_RESP_MV2, _VALUE_SF, len(v)) + v
        v = bytes(value)  # type: ignore[arg-type]  # a str subclass is not bytes-like
        return _pack_resp(_RESP_MV2, _VALUE_BYTES_SF, len(v)) + v
    _check_version(version)
    if isinstance(value, str):
        v = value.encode()
    else:
        v = bytes(value)
        try:
            v.decode()
        except UnicodeDecodeError:
            raise KvsError("the value is bytes that are not valid UTF-8: protocol version 1 carries only text "
                           "(read it with version 2)") from None
    return _pack_resp(_RESP_MV, _VALUE_SF, len(v)) + v


def _message_bytes(message: object) -> bytes:
    """``message`` as UTF-8, unencodable characters replaced, cut to MAX_MESSAGE_BYTES at a
    character boundary."""
    m = str(message).encode("utf-8", "replace")
    if len(m) > MAX_MESSAGE_BYTES:
        m = m[:MAX_MESSAGE_BYTES].decode("utf-8", "ignore").encode()
    return m


def encode_error(message: object, *, version: int = PROTOCOL_VERSION) -> bytes:
    """The ERROR response (request failed, connection continues) with ``str(message)``, in
    the version of the request it answers."""
    _check_version(version)
    m = _message_bytes(message)
    return _pack_resp(_RESP_MV2 if version == 2 else _RESP_MV, _ERROR_SF, len(m)) + m


def encode_fatal(message: object) -> bytes:
    """The FATAL response: sent last, just before the server closes the connection. Always
    a version 1 frame: it answers no request, and every client reads version 1."""
    m = _message_bytes(message)
    return _pack_resp(_RESP_MV, _FATAL_SF, len(m)) + m


def encode_response(status: Status | int, value: str | bytes | None = None, *,
                    version: int = PROTOCOL_VERSION) -> bytes:
    """Generic response encoder (the ``encode_*`` helpers are faster): ``value`` is the
    value for VALUE, the message for ERROR/FATAL, and must be None otherwise."""
    if status == Status.VALUE:
        if value is None:
            raise ValueError("VALUE takes a value")
        return encode_value(value, version=version)
    if status == Status.ERROR or status == Status.FATAL:
        if value is None:
            raise ValueError(f"{Status(status).name} takes a message")
        return encode_error(value, version=version) if status == Status.ERROR else encode_fatal(value)
    if status in _NO_PAYLOAD:
        if value is not None:
            raise ValueError(f"{Status(status).name} takes no payload")
        _check_version(version)
        return _pack_resp(_RESP_MV2 if version == 2 else _RESP_MV, status << 8, 0)
    raise ValueError(f"unknown status {status!r}")


# --------------------------------------------------------------------------------------------
# Decoding responses


def _fatal_response_header(buf: Buffer, pos: int, end: int, max_payload: int, preceding: list[Any],
                           offset: int) -> ProtocolError | None:
    avail = end - pos
    bad = _bad_magic_or_version(buf, pos, avail, RESPONSE_MAGIC, "a response", "not a kvs protocol server")
    if bad is not None or avail < 2:
        return None if bad is None else ProtocolError(bad, fatal=True, preceding=preceding, offset=offset)
    if avail < RESPONSE_HEADER_SIZE:
        return None
    _, _, plen = _unpack_resp(buf, pos)
    if plen > max_payload:
        return ProtocolError(
            f"response announces a {plen}-byte payload, over the maximum of {max_payload} bytes",
            fatal=True, preceding=preceding, offset=offset,
        )
    return None


def _bad_response(mv: int, sf: int, plen: int, max_value: int) -> ProtocolError:
    status, flags = sf >> 8, sf & 0xFF
    if status not in Status._value2member_map_:
        return ProtocolError(f"unknown status 0x{status:02x}")
    st = Status(status)
    if flags and not (mv == _RESP_MV2 and st == Status.VALUE and flags == FLAG_VALUE_BYTES):
        if mv == _RESP_MV:
            return ProtocolError(f"reserved flags byte must be 0, got 0x{flags:02x}")
        return ProtocolError(f"flags 0x{flags:02x} are not valid on a {st.name} response")
    if st in _NO_PAYLOAD:
        return ProtocolError(f"{st.name} response carries a {plen}-byte payload")
    if st == Status.VALUE and plen > max_value:
        return ProtocolError(f"value is {plen} bytes, over the limit of {max_value} bytes")
    return ProtocolError(f"{st.name} payload is not valid UTF-8")


_R_OK = _new(Response, (Status.OK, None))
_R_NOT_FOUND = _new(Response, (Status.NOT_FOUND, None))
_R_PONG = _new(Response, (Status.PONG, None))
_NO_PAYLOAD_RESPONSES = {Status.OK << 8: _R_OK, Status.NOT_FOUND << 8: _R_NOT_FOUND, Status.PONG << 8: _R_PONG}


def parse_responses(
    buf: Buffer,
    start: int = 0,
    end: int | None = None,
    *,
    max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
) -> tuple[list[Response | ProtocolError], int]:
    """Decode every complete response frame (either version) in ``buf[start:end]`` (client
    side).

    Same contract as ``parse_requests``. The largest acceptable payload is
    ``max(max_value_bytes, MAX_MESSAGE_BYTES)``; a header announcing more is fatal. Unknown
    statuses, invalid flags, payloads on payload-less statuses, over-limit values and
    invalid UTF-8 text are recoverable.
    """
    if end is None:
        end = len(buf)
    max_payload = max(max_value_bytes, MAX_MESSAGE_BYTES)
    items: list[Response | ProtocolError] = []
    append = items.append
    pos = start
    no_payload = _NO_PAYLOAD_RESPONSES
    while end - pos >= 8:
        mv, sf, plen = _unpack_resp(buf, pos)
        if (mv != _RESP_MV2 and mv != _RESP_MV) or plen > max_payload:
            break
        pstart = pos + 8
        nxt = pstart + plen
        if nxt > end:
            return items, pos
        try:
            if sf == _VALUE_SF and plen <= max_value_bytes:
                append(_new(Response, (_S_VALUE, str(buf[pstart:nxt], "utf-8"))))
            elif sf == _VALUE_BYTES_SF and mv == _RESP_MV2 and plen <= max_value_bytes:
                append(_new(Response, (_S_VALUE, bytes(buf[pstart:nxt]))))
            elif not plen and sf in no_payload:
                append(no_payload[sf])
            elif sf == _ERROR_SF:
                append(_new(Response, (_S_ERROR, str(buf[pstart:nxt], "utf-8"))))
            elif sf == _FATAL_SF:
                append(_new(Response, (_S_FATAL, str(buf[pstart:nxt], "utf-8"))))
            else:
                append(_bad_response(mv, sf, plen, max_value_bytes))
        except UnicodeDecodeError:
            append(_bad_response(mv, sf, plen, max_value_bytes))
        pos = nxt
    err = _fatal_response_header(buf, pos, end, max_payload, items, pos - start)
    if err is not None:
        raise err
    return items, pos


class ResponseDecoder(_Decoder[Response | ProtocolError]):
    """Incremental response decoder for one connection (client side); same rules as
    ``RequestDecoder``: recoverable problems appear as ``ProtocolError`` items in order,
    fatal ones raise. Reads frames of both versions."""

    __slots__ = ("max_value_bytes",)

    def __init__(self, *, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES) -> None:
        super().__init__()
        self.max_value_bytes = max_value_bytes

    def _parse(self, buf: Buffer, start: int, end: int) -> tuple[list[Response | ProtocolError], int]:
        return parse_responses(buf, start, end, max_value_bytes=self.max_value_bytes)


share_module_globals(globals())

"""RESP2, the Redis serialization protocol: pure parsing of client commands and encoding of
replies (plus a reply parser for clients and tests). No sockets, no threads.

Commands arrive either as arrays of bulk strings (``*3\\r\\n$3\\r\\nSET\\r\\n$1\\r\\na\\r\\n$1\\r\\nb\\r\\n``)
or as inline commands (``SET a b\\r\\n``), chosen per command by its first byte (``*`` or
not), as Redis does. Rules mirror Redis 7 (networking.c, sdssplitargs) with three
deliberate differences, all making the outcome independent of how the stream is chunked:

* an inline line longer than ``max_inline_bytes`` is always rejected (Redis rejects it only
  when it has not yet seen the newline);
* a ``*N``/``$N`` count line longer than ``max_inline_bytes`` is always rejected;
* the two bytes after a bulk string's data must be ``\\r\\n`` (Redis skips them unread).

Invariants:

* ``RespDecoder.feed`` returns each complete command as a ``list[bytes]`` in wire order, in
  one pass over the data; empty commands (a blank inline line, ``*0``, ``*-1``) are skipped
  silently, as Redis does.
* Every protocol error is fatal, as in Redis (which replies ``-ERR Protocol error: ...`` and
  closes): ``feed`` raises ``RespProtocolError`` with ``fatal=True`` and ``preceding`` = the
  commands decoded from the same input before the error. Lengths are checked from the
  header line alone, before the body is awaited or any buffer is sized from them.
* The parsers raise nothing but ``RespProtocolError``, whatever they are fed.
"""

from __future__ import annotations

from typing import Any

from kvs.errors import KvsError, ProtocolError
from kvs.freethreading import share_module_globals
from kvs.limits import DEFAULT_MAX_VALUE_BYTES
from kvs.resp_inline import split_inline

__all__ = [
    # parsing commands (server side)
    "DEFAULT_MAX_ARRAY_LEN", "DEFAULT_MAX_BULK_BYTES", "DEFAULT_MAX_INLINE_BYTES", "RespDecoder", "RespProtocolError",
    "split_inline",
    # encoding replies, and commands
    "EMPTY_ARRAY", "NULL_ARRAY", "NULL_BULK", "OK", "PONG", "array", "bulk", "command", "error", "integer",
    "simple_string",
    # parsing replies (client side)
    "RespError", "RespReplyDecoder",
]

DEFAULT_MAX_INLINE_BYTES = 64 * 1024
"""Longest inline command line and longest ``*N``/``$N`` line (Redis PROTO_INLINE_MAX_SIZE)."""

DEFAULT_MAX_ARRAY_LEN = 1024 * 1024
"""Most elements in one command array."""

DEFAULT_MAX_BULK_BYTES = DEFAULT_MAX_VALUE_BYTES + 1024
"""Longest bulk string: a kvs value (16 MiB) with some room; a key or value over the store's
own limits inside a smaller bulk is the server's business, not a protocol error."""

_CRLF = b"\r\n"
_SMALL_INTS: dict[bytes, int] = {str(i).encode(): i for i in range(-1, 4097)}
"""Canonical spellings of the lengths met on the hot path, to skip validation and int()."""


class RespProtocolError(ProtocolError):
    """Bytes that break RESP. Always ``fatal`` (Redis closes the connection). ``str(err)`` is
    Redis's message, e.g. ``"Protocol error: invalid bulk length"``; reply with
    ``error(str(err))`` and close after answering ``err.preceding``."""

    def __init__(self, message: str, *, fatal: bool = True, preceding: list[Any] | None = None,
                 offset: int = 0) -> None:
        super().__init__(message, fatal=fatal, preceding=preceding, offset=offset)

    def __repr__(self) -> str:
        return f"RespProtocolError({str(self)!r}, fatal={self.fatal})"


def _strict_int(s: bytes) -> int | None:
    """Redis's string2ll: optional '-', decimal digits, no leading zero, no '+', no spaces,
    no '-0', within a signed 64-bit integer. None when ``s`` is not such a number."""
    if s in _SMALL_INTS:  # "in" and [], not .get: dict.get locks the dict on 3.13t
        return _SMALL_INTS[s]
    if not s or len(s) > 20:
        return None
    neg = s[0] == 45  # '-'
    digits = s[1:] if neg else s
    if not digits.isdigit() or digits[0] == 48:  # bytes.isdigit is ASCII-only; '0' only alone (cached)
        return None
    v = -int(digits) if neg else int(digits)
    if not -(1 << 63) <= v < (1 << 63):
        return None
    return v


def _show(b: int) -> str:
    return chr(b) if 32 <= b < 127 else f"\\x{b:02x}"


# --------------------------------------------------------------------------------------------
# Command parsing


def _parse_commands(
    buf: bytes, pos: int, end: int, max_bulk: int, max_array: int, max_inline: int
) -> tuple[list[list[bytes]], int, int]:
    """Decode complete commands from ``buf[pos:end]`` (``buf`` is bytes).

    Returns ``(commands, pos, need)``: ``pos`` is just past the last complete command and
    ``need`` the buffer end needed before another call can make progress.
    """
    items: list[list[bytes]] = []
    append = items.append
    find = buf.find
    small = _SMALL_INTS
    while pos < end:
        if buf[pos] == 42:  # '*': multibulk
            nl = find(_CRLF, pos + 1)
            if nl < 0:
                if end - pos - 2 > max_inline:
                    raise RespProtocolError("Protocol error: too big mbulk count string", preceding=items)
                return items, pos, end + 1
            if nl - pos - 1 > max_inline:
                raise RespProtocolError("Protocol error: too big mbulk count string", preceding=items)
            s = buf[pos + 1 : nl]
            n = small[s] if s in small else None  # not small.get: it locks the dict on 3.13t
            if n is None:
                n = _strict_int(s)
                if n is None:
                    raise RespProtocolError("Protocol error: invalid multibulk length", preceding=items)
            if n > max_array:
                raise RespProtocolError("Protocol error: invalid multibulk length", preceding=items)
            p = nl + 2
            if n <= 0:
                pos = p
                continue
            args: list[bytes] = []
            add = args.append
            while n:
                if p >= end:
                    return items, pos, end + 1
                if buf[p] != 36:  # '$'
                    raise RespProtocolError(f"Protocol error: expected '$', got '{_show(buf[p])}'", preceding=items)
                nl = find(_CRLF, p + 1)
                if nl < 0:
                    if end - p - 2 > max_inline:
                        raise RespProtocolError("Protocol error: too big bulk count string", preceding=items)
                    return items, pos, end + 1
                if nl - p - 1 > max_inline:
                    raise RespProtocolError("Protocol error: too big bulk count string", preceding=items)
                s = buf[p + 1 : nl]
                m = small[s] if s in small else None
                if m is None or m < 0:
                    m = _strict_int(s)
                    if m is None or m < 0 or m > max_bulk:
                        raise RespProtocolError("Protocol error: invalid bulk length", preceding=items)
                elif m > max_bulk:
                    raise RespProtocolError("Protocol error: invalid bulk length", preceding=items)
                start = nl + 2
                e = start + m
                if e + 2 > end:
                    return items, pos, e + 2
                if buf[e] != 13 or buf[e + 1] != 10:
                    raise RespProtocolError("Protocol error: bulk string not terminated by CRLF", preceding=items)
                add(buf[start:e])
                p = e + 2
                n -= 1
            append(args)
            pos = p
        else:  # inline
            nl = find(b"\n", pos)
            if nl < 0:  # the line (without its CR LF) is at least end - pos - 1 bytes long
                if end - pos - 1 > max_inline:
                    raise RespProtocolError("Protocol error: too big inline request", preceding=items)
                return items, pos, end + 1
            e = nl - 1 if nl > pos and buf[nl - 1] == 13 else nl
            if e - pos > max_inline:
                raise RespProtocolError("Protocol error: too big inline request", preceding=items)
            inline = split_inline(buf[pos:e])
            if inline is None:
                raise RespProtocolError("Protocol error: unbalanced quotes in request", preceding=items)
            if inline:
                append(inline)
            pos = nl + 1
    return items, pos, end + 1


_ARRAY_LINES: dict[bytes, int] = {b"*%d" % i: i for i in range(1, 65)}
_BULK_LINES: dict[bytes, int] = {b"$%d" % i: i for i in range(4097)}
"""Canonical ``*N`` and ``$N`` lines of the commands clients send, for :func:`_split_commands`."""


def _split_commands(buf: bytes, max_bulk: int, max_array: int) -> tuple[list[list[bytes]], int]:
    """The fast path of command parsing: ``(commands, pos)`` for the leading run of ``buf``
    made of complete arrays of at most 64 bulk strings of at most 4096 bytes, none holding
    CR LF, which is what clients and pipelines send; ``pos`` is just past the run. It stops,
    without error, at the first thing it does not take (an inline command, a bulk string
    holding CR LF, a longer string, a limit, an incomplete command, damage), which
    :func:`_parse_commands` then parses from ``pos``, with every check and error.

    Why this is exact: ``buf.split(b"\r\n")`` cuts at every CR LF. A command is taken only
    when its ``*N`` line and each ``$M`` line are whole parts (hence each followed by CR LF)
    and each argument is a part of exactly ``M`` bytes that is not the last part (hence
    followed by CR LF): exactly the bytes the general parser would have read. One ``split``
    in C replaces two ``find`` calls, two slices and a dict lookup per argument."""
    parts = buf.split(b"\r\n")
    last = len(parts) - 1  # parts[last] follows the final CR LF: never a whole line
    arrays = _ARRAY_LINES
    bulks = _BULK_LINES
    items: list[list[bytes]] = []
    long_ok = max_bulk >= 4096  # every length in _BULK_LINES is within the limit
    i = 0
    while i < last:
        # Subscripts, not .get: every connection's thread reads these two dicts, and on 3.13t
        # dict.get locks the dict (a subscript is the lock-free lookup). A miss ends the run.
        try:
            n = arrays[parts[i]]
        except KeyError:
            break
        if n > max_array or i + 2 * n >= last:
            break
        if n == 3:  # SET key value, unrolled: half the loop's cost
            h1, a1, h2, a2, h3, a3 = parts[i + 1 : i + 7]
            try:
                if bulks[h1] != len(a1) or bulks[h2] != len(a2) or bulks[h3] != len(a3):
                    break
            except KeyError:
                break
            if not long_ok and (len(a1) > max_bulk or len(a2) > max_bulk or len(a3) > max_bulk):
                break
            items.append([a1, a2, a3])
            i += 7
            continue
        if n == 2:  # GET key
            h1, a1, h2, a2 = parts[i + 1 : i + 5]
            try:
                if bulks[h1] != len(a1) or bulks[h2] != len(a2):
                    break
            except KeyError:
                break
            if not long_ok and (len(a1) > max_bulk or len(a2) > max_bulk):
                break
            items.append([a1, a2])
            i += 5
            continue
        args = []
        for j in range(i + 1, i + 2 * n, 2):
            arg = parts[j + 1]
            try:
                m = bulks[parts[j]]
            except KeyError:
                break
            if m > max_bulk or len(arg) != m:
                break
            args.append(arg)
        else:
            items.append(args)
            i += 2 * n + 1
            continue
        break
    if i == last:  # everything up to the final CR LF
        return items, len(buf) - len(parts[last])
    return items, sum(map(len, parts[:i])) + 2 * i


class RespDecoder:
    """Incremental RESP2 command decoder for one connection (server side). Not thread-safe.

    Limits: ``max_bulk_bytes`` (longest bulk string), ``max_array_len`` (most arguments),
    ``max_inline_bytes`` (longest inline line and count line). Exceeding one is fatal, decided
    from the header line alone.
    """

    __slots__ = ("max_bulk_bytes", "max_array_len", "max_inline_bytes", "_buf", "_need", "_error")

    def __init__(
        self,
        *,
        max_bulk_bytes: int = DEFAULT_MAX_BULK_BYTES,
        max_array_len: int = DEFAULT_MAX_ARRAY_LEN,
        max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES,
    ) -> None:
        self.max_bulk_bytes = max_bulk_bytes
        self.max_array_len = max_array_len
        self.max_inline_bytes = max_inline_bytes
        self._buf = bytearray()
        self._need = 0
        self._error: RespProtocolError | None = None

    def parse_single(self, data: bytes) -> list[bytes] | None:
        """The fast path of :meth:`feed` for a client that waits for each reply: when nothing
        is held back and ``data`` is exactly one whole array of two or three bulk strings of
        at most 4096 bytes (the bulk limit permitting), none holding CR LF, its arguments,
        exactly what ``feed(data)`` would return as its one command, and the decoder is left
        as ``feed`` would leave it (empty). Otherwise None, nothing consumed: use ``feed``.

        Exact for the same reason as :func:`_split_commands`: with the parts of
        ``data.split(b"\\r\\n")`` numbering exactly ``2 + 2 * argc``, each ``$M`` line a whole
        canonical part and each argument a part of exactly ``M`` bytes, the last part empty,
        these are the bytes the general parser reads, up to the end of ``data``. One
        ``split`` and a few comparisons replace ``feed``'s general machinery: the request of
        every redis-benchmark round trip that is not pipelined."""
        if self._buf or self._error is not None or type(data) is not bytes:
            return None
        # At most 8 cuts: a pipelined batch is not split whole only to be declined (9 parts,
        # the 9th the rest of the batch), and feed splits it once.
        parts = data.split(b"\r\n", 8)
        count = len(parts)
        if count != 6 and count != 8 or parts[-1]:
            return None
        bulks = _BULK_LINES
        max_bulk = self.max_bulk_bytes
        try:  # a subscript, not .get (see _split_commands); a miss is not canonical
            if count == 6:
                a, b = parts[2], parts[4]
                if (parts[0] != b"*2" or bulks[parts[1]] != len(a) or bulks[parts[3]] != len(b)
                        or len(b) > max_bulk or len(a) > max_bulk or self.max_array_len < 2):
                    return None
                return [a, b]
            a, b, c = parts[2], parts[4], parts[6]
            if (parts[0] != b"*3" or bulks[parts[1]] != len(a) or bulks[parts[3]] != len(b)
                    or bulks[parts[5]] != len(c) or len(c) > max_bulk or len(b) > max_bulk
                    or len(a) > max_bulk or self.max_array_len < 3):
                return None
            return [a, b, c]
        except KeyError:
            return None

    def feed(self, data: bytes | bytearray | memoryview) -> list[list[bytes]]:
        """Append ``data``; return every command it completes, in order, each a list of
        ``bytes`` (the command name as sent, not case-folded). Raises a fatal
        ``RespProtocolError`` (then every later call raises too); RESP2 has no recoverable
        errors, so unlike ``kvs.protocol``'s decoders none is ever returned.
        """
        if self._error is not None:
            raise RespProtocolError(str(self._error))
        buf = self._buf
        if buf:
            if len(buf) + len(data) < self._need:  # still inside a bulk string: just collect
                buf += data
                return []
            src = b"".join((buf, data))
        else:
            src = data if type(data) is bytes else bytes(data)
        end = len(src)
        pos = 0
        items: list[list[bytes]] = []
        if end and src[0] == 42:  # "*": an array, what clients send
            items, pos = _split_commands(src, self.max_bulk_bytes, self.max_array_len)
        need = end + 1
        if pos < end:
            try:
                more, pos, need = _parse_commands(
                    src, pos, end, self.max_bulk_bytes, self.max_array_len, self.max_inline_bytes
                )
            except RespProtocolError as exc:
                exc.preceding = items + exc.preceding
                self._error = exc
                self._buf = bytearray()
                raise
            items += more
        if pos == end:
            if buf:
                self._buf = bytearray()
        else:
            self._buf = bytearray(memoryview(src)[pos:])
            self._need = need - pos
        return items

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete command held back."""
        return len(self._buf)

    @property
    def in_frame(self) -> bool:
        """True while part of a command has arrived but not all of it."""
        return bool(self._buf)

    @property
    def failed(self) -> RespProtocolError | None:
        """The fatal error that ended the stream, or None."""
        return self._error


# --------------------------------------------------------------------------------------------
# Reply encoding

OK = b"+OK\r\n"
PONG = b"+PONG\r\n"
NULL_BULK = b"$-1\r\n"
NULL_ARRAY = b"*-1\r\n"
EMPTY_ARRAY = b"*0\r\n"

_NO_NEWLINES = bytes.maketrans(b"\r\n", b"  ")


def _line(text: str | bytes) -> bytes:
    b = text.encode("utf-8", "replace") if isinstance(text, str) else bytes(text)
    return b.translate(_NO_NEWLINES)


def simple_string(s: str | bytes) -> bytes:
    """``+s\\r\\n``; CR and LF in ``s`` become spaces (a simple string is one line)."""
    return b"+" + _line(s) + b"\r\n"


def error(message: str | bytes, code: str = "ERR") -> bytes:
    """``-ERR message\\r\\n``. As in Redis, a message starting with ``-`` is sent verbatim
    (it carries its own code, e.g. ``"-WRONGTYPE ..."``). CR/LF become spaces."""
    m = _line(message)
    if m.startswith(b"-"):
        return m + b"\r\n"
    return b"-" + code.encode() + b" " + m + b"\r\n"


def integer(n: int) -> bytes:
    """``:n\\r\\n``."""
    return b":%d\r\n" % n


def bulk(b: bytes | str | None) -> bytes:
    """``$len\\r\\nb\\r\\n``; a str is sent as UTF-8; None is the null bulk ``$-1\\r\\n``."""
    if b is None:
        return NULL_BULK
    if isinstance(b, str):
        b = b.encode()
    return b"$%d\r\n%b\r\n" % (len(b), b)


def array(items: list[bytes] | None) -> bytes:
    """``*n\\r\\n`` followed by ``items``, each already an encoded reply; None is ``*-1\\r\\n``."""
    if items is None:
        return NULL_ARRAY
    return b"*%d\r\n" % len(items) + b"".join(items)


def command(*args: bytes | str | int) -> bytes:
    """A client command as an array of bulk strings (what redis-cli sends)."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        elif isinstance(a, int):
            a = b"%d" % a
        parts.append(b"$%d\r\n%b\r\n" % (len(a), a))
    return b"".join(parts)


# --------------------------------------------------------------------------------------------
# Reply parsing (clients, tests)


class RespError(KvsError):
    """An error reply (``-ERR ...``), returned by ``RespReplyDecoder`` as a value, not raised.
    ``str(err)`` is the line without the ``-``; ``code`` its first word."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = message.split(" ", 1)[0] if message else ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RespError) and other.message == self.message

    __hash__ = KvsError.__hash__

    def __repr__(self) -> str:
        return f"RespError({self.message!r})"


_INCOMPLETE = object()


class RespReplyDecoder:
    """Incremental RESP2 reply decoder (client side). ``feed`` returns complete replies:
    ``+`` → str, ``-`` → ``RespError``, ``:`` → int, ``$`` → bytes (``$-1`` → None),
    ``*`` → list (``*-1`` → None), nested up to ``max_depth``. Every malformed reply is a
    fatal ``RespProtocolError``."""

    __slots__ = ("max_bulk_bytes", "max_array_len", "max_line_bytes", "max_depth", "_buf", "_want", "_error")

    def __init__(
        self,
        *,
        max_bulk_bytes: int = DEFAULT_MAX_BULK_BYTES,
        max_array_len: int = DEFAULT_MAX_ARRAY_LEN,
        max_line_bytes: int = DEFAULT_MAX_INLINE_BYTES,
        max_depth: int = 32,
    ) -> None:
        self.max_bulk_bytes = max_bulk_bytes
        self.max_array_len = max_array_len
        self.max_line_bytes = max_line_bytes
        self.max_depth = max_depth
        self._buf = bytearray()
        self._want = 0  # buffer length needed before re-parsing can progress (big bulks)
        self._error: RespProtocolError | None = None

    def _line(self, buf: bytes, pos: int, end: int) -> int:
        """Index of the CRLF ending the line at ``pos`` (after the type byte), or -1."""
        nl = buf.find(_CRLF, pos)
        if nl < 0:
            if end - pos - 1 > self.max_line_bytes:
                raise RespProtocolError("Protocol error: too big reply line")
            return -1
        if nl - pos > self.max_line_bytes:
            raise RespProtocolError("Protocol error: too big reply line")
        return nl

    def _one(self, buf: bytes, pos: int, end: int, depth: int) -> tuple[Any, int]:
        if pos >= end:
            return _INCOMPLETE, pos
        t = buf[pos]
        nl = self._line(buf, pos + 1, end)
        if nl < 0:
            return _INCOMPLETE, pos
        s = buf[pos + 1 : nl]
        if t == 43:  # +
            return s.decode("utf-8", "replace"), nl + 2
        if t == 45:  # -
            return RespError(s.decode("utf-8", "replace")), nl + 2
        if t == 58:  # :
            v = _strict_int(s)
            if v is None:
                raise RespProtocolError("Protocol error: invalid integer reply")
            return v, nl + 2
        if t == 36:  # $
            n = _strict_int(s)
            if n is None or n < -1 or n > self.max_bulk_bytes:
                raise RespProtocolError("Protocol error: invalid bulk length")
            if n == -1:
                return None, nl + 2
            e = nl + 2 + n
            if e + 2 > end:
                self._want = e + 2
                return _INCOMPLETE, pos
            if buf[e : e + 2] != _CRLF:
                raise RespProtocolError("Protocol error: bulk string not terminated by CRLF")
            return buf[nl + 2 : e], e + 2
        if t == 42:  # *
            n = _strict_int(s)
            if n is None or n < -1 or n > self.max_array_len:
                raise RespProtocolError("Protocol error: invalid multibulk length")
            if n == -1:
                return None, nl + 2
            if depth >= self.max_depth:
                raise RespProtocolError("Protocol error: replies nested too deep")
            out = []
            p = nl + 2
            for _ in range(n):
                v, p = self._one(buf, p, end, depth + 1)
                if v is _INCOMPLETE:
                    return _INCOMPLETE, pos
                out.append(v)
            return out, p
        raise RespProtocolError(f"Protocol error: unknown reply type '{_show(t)}'")

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        """Append ``data``; return every complete reply, in order. Raises fatal
        ``RespProtocolError`` (with ``preceding``); after that every call raises."""
        if self._error is not None:
            raise RespProtocolError(str(self._error))
        self._buf += data
        if len(self._buf) < self._want:
            return []
        self._want = 0
        src = bytes(self._buf)
        end = len(src)
        items: list[Any] = []
        pos = 0
        try:
            while pos < end:
                v, p = self._one(src, pos, end, 0)
                if v is _INCOMPLETE:
                    break
                items.append(v)
                pos = p
        except RespProtocolError as exc:
            exc.preceding = items
            self._error = exc
            self._buf = bytearray()
            raise
        del self._buf[:pos]
        self._want = max(0, self._want - pos)
        return items

    @property
    def pending_bytes(self) -> int:
        """Bytes of an incomplete reply held back."""
        return len(self._buf)


share_module_globals(globals())

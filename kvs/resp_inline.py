"""Inline RESP commands (``SET a b\\r\\n``): splitting a line into arguments as Redis's
``sdssplitargs`` does. A pure function; ``kvs.resp`` parses the rest of RESP and exports
:func:`split_inline` too."""

from __future__ import annotations

from kvs.freethreading import share_module_globals

__all__ = ["split_inline"]

_SPACE = frozenset(b" \t\n\r\x0b\x0c")  # C isspace()
_TOKEN_END = frozenset(b" \n\r\t")  # what ends an unquoted token in sdssplitargs
_ESCAPES = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("b"): 8, ord("a"): 7}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_PLAIN_SPLIT_BREAKERS = (b'"', b"'", b"\x0b", b"\x0c")


def split_inline(line: bytes) -> list[bytes] | None:
    """The arguments of an inline command line (without its newline), per Redis's
    sdssplitargs: whitespace-separated; ``"..."`` with escapes ``\\n \\r \\t \\b \\a \\\\ \\"
    \\xHH``; ``'...'`` with ``\\'``; a closing quote must be followed by whitespace or the end.
    A NUL byte ends the line (C string semantics). None for unbalanced quotes."""
    nul = line.find(b"\0")
    if nul >= 0:
        line = line[:nul]
    for ch in _PLAIN_SPLIT_BREAKERS:
        if ch in line:
            break
    else:
        return line.split()  # bytes.split() splits on exactly C isspace()
    # Slow path: a character loop, bounded by max_inline_bytes. Quoted lines are rare.
    args: list[bytes] = []
    n = len(line)
    i = 0
    while True:
        while i < n and line[i] in _SPACE:
            i += 1
        if i >= n:
            return args
        cur = bytearray()
        inq = insq = False
        while True:
            c = line[i] if i < n else 0
            if inq:
                if c == 92 and i + 3 < n and line[i + 1] == 120 and line[i + 2] in _HEX and line[i + 3] in _HEX:
                    cur.append(int(line[i + 2 : i + 4], 16))
                    i += 3
                elif c == 92 and i + 1 < n:
                    i += 1
                    e = line[i]
                    cur.append(_ESCAPES.get(e, e))
                elif c == 34:  # closing "
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        return None
                    i += 1
                    break
                elif i >= n:
                    return None  # unterminated quotes
                else:
                    cur.append(c)
            elif insq:
                if c == 92 and i + 1 < n and line[i + 1] == 39:
                    i += 1
                    cur.append(39)
                elif c == 39:  # closing '
                    if i + 1 < n and line[i + 1] not in _SPACE:
                        return None
                    i += 1
                    break
                elif i >= n:
                    return None
                else:
                    cur.append(c)
            else:
                if i >= n or c in _TOKEN_END:
                    break
                if c == 34:
                    inq = True
                elif c == 39:
                    insq = True
                else:
                    cur.append(c)
            i += 1
        args.append(bytes(cur))


share_module_globals(globals())

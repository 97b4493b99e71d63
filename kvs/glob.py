"""Redis glob patterns over byte strings (``SCAN ... MATCH``, ``KEYS``; the engines' ``scan``).

The syntax is Redis's ``stringmatchlen`` (``src/util.c``), byte by byte:

- ``*`` any run of bytes, ``?`` any one byte;
- ``[abc]`` one of the bytes listed, ``[^abc]`` one byte not listed, ``[a-z]`` a range (a
  reversed range ``[z-a]`` means the same), ``[]`` nothing;
- ``\\x`` the byte ``x`` itself, inside or outside brackets; a trailing ``\\`` is a literal
  backslash.

Redis reads an unclosed ``[`` as ending the class at the end of the pattern; here it is an
error (:class:`~kvs.errors.KvsError`), as the engines' ``scan`` promises, unless ``strict`` is
False (the RESP commands, which must answer as Redis does). A pattern is compiled once into a
regular expression; :func:`compile_glob` caches the last patterns used.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

from kvs.errors import KvsError


def _byte(b: int) -> bytes:
    return re.escape(bytes([b]))


def translate(pattern: bytes, *, strict: bool = True) -> bytes:
    """The regular expression (bytes, for ``re.fullmatch`` with ``re.DOTALL``) of a glob."""
    out: list[bytes] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == 0x2A:  # *
            while i + 1 < n and pattern[i + 1] == 0x2A:
                i += 1
            out.append(b".*")
        elif c == 0x3F:  # ?
            out.append(b".")
        elif c == 0x5B:  # [
            i += 1
            negate = i < n and pattern[i] == 0x5E
            if negate:
                i += 1
            members: list[bytes] = []
            while True:
                if i >= n:
                    if strict:
                        raise KvsError(f"unbalanced '[' in pattern {pattern!r}")
                    i -= 1  # Redis: the class ends with the pattern
                    break
                c = pattern[i]
                if c == 0x5C and i + 1 < n:  # \x inside a class
                    i += 1
                    members.append(_byte(pattern[i]))
                elif c == 0x5D:  # ]
                    break
                elif i + 2 < n and pattern[i + 1] == 0x2D:  # x-y (Redis: needs 3 bytes left)
                    lo, hi = c, pattern[i + 2]
                    if lo > hi:
                        lo, hi = hi, lo
                    members.append(_byte(lo) + b"-" + _byte(hi))
                    i += 2
                else:
                    members.append(_byte(c))
                i += 1
            if members:
                out.append(b"[" + (b"^" if negate else b"") + b"".join(members) + b"]")
            else:
                out.append(b"." if negate else b"(?!)")
        elif c == 0x5C and i + 1 < n:  # \x
            i += 1
            out.append(_byte(pattern[i]))
        else:
            out.append(_byte(c))
        i += 1
    return b"".join(out)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: bytes, strict: bool) -> Callable[[bytes], re.Match[bytes] | None]:
    return re.compile(translate(pattern, strict=strict), re.DOTALL).fullmatch


def compile_glob(pattern: str | bytes, *, strict: bool = True) -> Callable[[bytes], bool]:
    """A function telling whether a byte string matches ``pattern`` (a ``str`` pattern means
    its UTF-8 bytes). ``KvsError`` for an unbalanced ``[`` when ``strict``, ``TypeError`` for a
    pattern that is neither text nor bytes."""
    if isinstance(pattern, str):
        try:
            pattern = pattern.encode()
        except UnicodeEncodeError:
            raise KvsError("match pattern is not valid Unicode text") from None
    elif isinstance(pattern, bytearray | memoryview):
        pattern = bytes(pattern)
    elif not isinstance(pattern, bytes):
        raise TypeError(f"match must be str or bytes, not {type(pattern).__name__}")
    fullmatch = _compiled(pattern, strict)
    if pattern == b"*":
        return lambda _data: True
    return lambda data: fullmatch(data) is not None


def glob_match(pattern: str | bytes, data: bytes, *, strict: bool = True) -> bool:
    """Whether ``data`` matches ``pattern`` (:func:`compile_glob`)."""
    return compile_glob(pattern, strict=strict)(data)

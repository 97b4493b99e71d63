"""Keys, values and deadlines as every engine takes them: the one definition of the v2 data
model's input checks (``docs/storage-format.md``, section 1).

Keys and values are byte strings. A ``str`` means its UTF-8 bytes, so ``"café"`` and
``b"caf\\xc3\\xa9"`` are one key (as in Redis, whose keys are bytes); a bytes-like object
(``bytes``, ``bytearray``, ``memoryview``, anything with the buffer protocol) means its bytes.
An engine remembers which of the two a value was written as, and reads it back as that type;
keys come back from iteration and scan as the type they were last written with.

Index keys
    ``KvStore``'s index is keyed by ``str``, so that the course's ``str`` keys are looked up
    exactly as before (a ``str`` caches its hash; a ``bytes`` made per call would hash on
    every lookup). A key's *index key* is the key itself when it is a ``str``, and
    ``bytes.decode("utf-8", "surrogateescape")`` of it when it is bytes: valid UTF-8 decodes to
    the same ``str`` its text would be, and each byte of invalid UTF-8 to a lone surrogate
    U+DC80..U+DCFF. ``surrogateescape`` decoding is injective and :func:`key_from_index`
    inverts it, so distinct byte strings never share an index key. A ``str`` *argument* with a
    lone surrogate is refused (it has no UTF-8 bytes), so a surrogate in an index key can only
    come from bytes.

Deadlines
    Absolute Unix times in integer milliseconds (Redis's PEXPIREAT unit), between 0 and
    :data:`MAX_DEADLINE_MS`. A TTL in seconds (``int`` or ``float``) becomes ``now + round(ttl *
    1000)`` milliseconds on the engine's clock (:mod:`kvs.engine.clock`), at least one
    millisecond ahead.
"""

from __future__ import annotations

import math
from collections.abc import Buffer

from kvs.errors import KvsError
from kvs.freethreading import share_module_globals

Key = str | bytes | bytearray | memoryview
"""What the engines accept as a key (any other buffer too)."""
Value = str | bytes | bytearray | memoryview
"""What the engines accept as a value (any other buffer too)."""

MAX_DEADLINE_MS = (1 << 63) - 1
"""The latest deadline, in Unix milliseconds (Redis's limit: a signed 64-bit count)."""


def key_bytes(key: object, limit: int) -> tuple[bytes, bool]:
    """``(the key's bytes, whether it was given as bytes)``. ``TypeError`` for a key that is
    neither text nor bytes-like; ``KvsError`` for text with lone surrogates or a key longer
    than ``limit`` bytes."""
    if type(key) is str:
        try:
            kb = key.encode()
        except UnicodeEncodeError as exc:
            raise KvsError(f"key is not valid Unicode text (cannot be encoded as UTF-8: {exc.reason})") from None
        is_bytes = False
    elif type(key) is bytes:
        kb, is_bytes = key, True
    elif isinstance(key, str):
        return key_bytes(str(key), limit)
    elif isinstance(key, Buffer):
        kb, is_bytes = bytes(key), True
    else:
        raise TypeError(f"key must be str or bytes, not {type(key).__name__}")
    if len(kb) > limit:
        raise KvsError(f"key is {len(kb)} bytes, over the limit of {limit} bytes")
    return kb, is_bytes


def value_bytes(value: object, limit: int) -> tuple[bytes, bool]:
    """``(the value's bytes, whether it was given as bytes)``; errors as :func:`key_bytes`
    (``TypeError`` for ``None``, ``int``, ...: nothing is stored)."""
    if type(value) is str:
        try:
            vb = value.encode()
        except UnicodeEncodeError as exc:
            raise KvsError(f"value is not valid Unicode text (cannot be encoded as UTF-8: {exc.reason})") from None
        is_bytes = False
    elif type(value) is bytes:
        vb, is_bytes = value, True
    elif isinstance(value, str):
        return value_bytes(str(value), limit)
    elif isinstance(value, Buffer):
        vb, is_bytes = bytes(value), True
    else:
        raise TypeError(f"value must be str or bytes, not {type(value).__name__}")
    if len(vb) > limit:
        raise KvsError(f"value is {len(vb)} bytes, over the limit of {limit} bytes")
    return vb, is_bytes


def index_key(kb: bytes, is_bytes: bool, key: object = None) -> str:
    """The index key of a key (module docstring); ``key`` is the ``str`` argument itself when
    there is one (no decode then)."""
    if not is_bytes and type(key) is str:
        return key
    return kb.decode("utf-8", "surrogateescape")


def key_from_index(ikey: str, is_bytes: bool) -> str | bytes:
    """The key as it was written (``bytes`` or ``str``), from its index key."""
    return ikey.encode("utf-8", "surrogateescape") if is_bytes else ikey


def ttl_deadline(ttl: object, now_ms: int) -> int | None:
    """The deadline of a TTL of ``ttl`` seconds from ``now_ms``; None for ``ttl=None``.
    ``TypeError`` for a non-number, ``KvsError`` for a TTL that is not positive and finite or
    that puts the deadline past :data:`MAX_DEADLINE_MS`."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, int | float):
        raise TypeError(f"ttl must be a number of seconds or None, not {type(ttl).__name__}")
    if not math.isfinite(ttl) or ttl <= 0:
        raise KvsError(f"ttl must be a positive number of seconds, not {ttl!r}")
    ms = max(1, round(ttl * 1000)) if isinstance(ttl, float) else ttl * 1000
    if ms > MAX_DEADLINE_MS - now_ms:
        raise KvsError(f"ttl {ttl!r} is too large (the deadline would pass {MAX_DEADLINE_MS} ms)")
    return now_ms + ms


def check_deadline(unix_ms: object) -> int | None:
    """``unix_ms`` checked as a deadline (``expire_at``): None (no expiry) or an ``int`` in
    ``[0, MAX_DEADLINE_MS]``. A deadline in the past is valid: the key expires at once."""
    if unix_ms is None:
        return None
    if isinstance(unix_ms, bool) or not isinstance(unix_ms, int):
        raise TypeError(f"a deadline must be an int of Unix milliseconds or None, not {type(unix_ms).__name__}")
    if not 0 <= unix_ms <= MAX_DEADLINE_MS:
        raise KvsError(f"deadline {unix_ms} is out of range (0 to {MAX_DEADLINE_MS} Unix ms)")
    return unix_ms


def remaining_seconds(deadline: int | None, now_ms: int) -> float | None:
    """``ttl``'s answer: seconds from ``now_ms`` to ``deadline`` (None: persistent)."""
    return None if deadline is None else (deadline - now_ms) / 1000


share_module_globals(globals())

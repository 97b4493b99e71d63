"""Size limits shared by the engines, the protocols and the server.

Keys and values are UTF-8 text; the limits are on their encoded length in bytes. They are
defaults: `KvStore.open`, `SqliteKvsEngine.open` and `KvsServer` take overrides.
:func:`encode_text` is the one check of a key or value that engines and encoders share
(:func:`check_str` its type check).
"""

from kvs.errors import KvsError

DEFAULT_MAX_KEY_BYTES = 64 * 1024
"""Longest key, in UTF-8 bytes (64 KiB)."""

DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024
"""Longest value, in UTF-8 bytes (16 MiB)."""


def check_str(value: object, what: str) -> str:
    """``value`` as an exact ``str`` (a ``str`` subclass is copied into one); ``TypeError``
    for anything else. ``what`` names it ("key")."""
    if isinstance(value, str):
        return str(value)
    raise TypeError(f"{what} must be str, not {type(value).__name__}")


def encode_text(text: str, what: str, limit: int) -> bytes:
    """``text`` as UTF-8 bytes, checked: ``TypeError`` for a non-str, ``KvsError`` for a
    string with lone surrogates or longer than ``limit`` bytes. ``what`` names it ("key")."""
    if type(text) is not str:
        text = check_str(text, what)
    try:
        data = text.encode()
    except UnicodeEncodeError as exc:
        raise KvsError(f"{what} is not valid Unicode text (cannot be encoded as UTF-8: {exc.reason})") from None
    if len(data) > limit:
        raise KvsError(f"{what} is {len(data)} bytes, over the limit of {limit} bytes")
    return data

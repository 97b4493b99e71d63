"""The engine interface and the argument checks every engine shares."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kvs.errors import KvsError


@runtime_checkable
class KvsEngine(Protocol):
    """A key/value storage engine, safe to share between threads.

    Every method may be called from any thread at any time. Keys and values are ``str``;
    a non-``str`` argument raises ``TypeError``; a string that cannot be encoded as UTF-8 or
    that exceeds the engine's size limits raises ``KvsError`` and nothing is written.
    """

    def set(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""
        ...

    def get(self, key: str) -> str | None:
        """The value stored under ``key``, or ``None`` when the key is absent."""
        ...

    def remove(self, key: str) -> None:
        """Delete ``key``; ``KeyNotFoundError`` when it is absent."""
        ...

    def close(self) -> None:
        """Flush and release everything; idempotent. Later calls raise ``KvsError``."""
        ...


def encode_text(text: str, what: str, limit: int) -> bytes:
    """``text`` as UTF-8 bytes, checked: ``TypeError`` for a non-str, ``KvsError`` for a
    string with lone surrogates or longer than ``limit`` bytes. ``what`` names it ("key")."""
    if type(text) is not str:
        if not isinstance(text, str):
            raise TypeError(f"{what} must be str, not {type(text).__name__}")
        text = str(text)
    try:
        data = text.encode()
    except UnicodeEncodeError as exc:
        raise KvsError(f"{what} is not valid Unicode text (cannot be encoded as UTF-8: {exc.reason})") from None
    if len(data) > limit:
        raise KvsError(f"{what} is {len(data)} bytes, over the limit of {limit} bytes")
    return data

"""The exceptions of kvs. Every error kvs raises on purpose is a KvsError."""

from __future__ import annotations

from typing import Any


class KvsError(Exception):
    """An operation of kvs failed: bad input, a closed store, corruption, a network error."""


class KeyNotFoundError(KvsError, KeyError):
    """An absent key: ``remove``, ``ttl``, ``expiry``, ``store[key]``, ``del store[key]``.
    Both a ``KvsError`` and a ``KeyError`` (what the mapping protocol raises); its text is the
    message, not ``KeyError``'s quoted repr."""

    def __init__(self, key: object = None, message: str = "Key not found") -> None:
        super().__init__(message)
        self.key = key

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "Key not found"


class ProtocolError(KvsError):
    """Bytes that break the protocol.

    ``fatal`` False: one frame was malformed but its extent was known; it has been skipped and
    the stream continues (the server answers it with an ERROR response, in order).
    ``fatal`` True: the stream cannot be framed any more; the server sends a FATAL response
    and closes the connection; a decoder that raised it stays failed.

    When a decoder raises a fatal error, ``preceding`` holds the items it decoded from the
    same input before the offending frame (to be answered before closing), and ``offset`` is
    the number of bytes of complete frames before it (relative to where decoding started).
    The items are whatever that decoder yields (requests or responses), hence ``Any``.
    """

    def __init__(self, message: str, *, fatal: bool = False, preceding: list[Any] | None = None,
                 offset: int = 0) -> None:
        super().__init__(message)
        self.fatal = fatal
        self.preceding: list[Any] = preceding if preceding is not None else []
        self.offset = offset

    def __repr__(self) -> str:
        return f"ProtocolError({str(self)!r}, fatal={self.fatal})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProtocolError):
            return NotImplemented
        return str(self) == str(other) and self.fatal == other.fatal

    __hash__ = KvsError.__hash__

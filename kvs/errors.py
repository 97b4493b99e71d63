"""The exceptions of kvs. Every error kvs raises on purpose is a KvsError."""


class KvsError(Exception):
    """An operation of kvs failed: bad input, a closed store, corruption, a network error."""


class KeyNotFoundError(KvsError):
    """``remove`` of a key that is not in the store."""

    def __init__(self, key: str | None = None, message: str = "Key not found") -> None:
        super().__init__(message)
        self.key = key

"""Size limits shared by the engines, the protocols and the server.

Keys and values are UTF-8 text; the limits are on their encoded length in bytes. They are
defaults: `KvStore.open`, `SqliteKvsEngine.open` and `KvsServer` take overrides.
"""

DEFAULT_MAX_KEY_BYTES = 64 * 1024
"""Longest key, in UTF-8 bytes (64 KiB)."""

DEFAULT_MAX_VALUE_BYTES = 16 * 1024 * 1024
"""Longest value, in UTF-8 bytes (16 MiB)."""

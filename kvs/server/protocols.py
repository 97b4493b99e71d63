"""Which protocol a connection speaks, chosen from its first byte.

Our frames start with ``kvs.protocol.REQUEST_MAGIC`` (0xCB), RESP2 with ``*`` or an inline
command's letter; a server's ``protocols`` turns either off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from kvs.engine.base import KvsEngine
from kvs.errors import KvsError
from kvs.freethreading import share_attributes, share_module_globals
from kvs.protocol import REQUEST_MAGIC
from kvs.server.kvs_session import KvsSession
from kvs.server.resp_session import RespSession
from kvs.server.sessions import ServerFacts, Session

log = logging.getLogger("kvs.server")

PROTOCOLS: tuple[str, ...] = ("kvs", "resp")
"""Protocols a server can speak on its one port: our binary frames and RESP2 (Redis)."""


def check_protocols(protocols: Iterable[str]) -> tuple[str, ...]:
    """``protocols`` as a tuple; ``KvsError`` when it is empty or names an unknown one."""
    names = tuple(protocols)
    unknown = set(names) - set(PROTOCOLS)
    if unknown or not names:
        raise KvsError(f"unknown protocol(s) {', '.join(sorted(unknown)) or '(none given)'}")
    return names


class SessionFactory:
    """Makes the session of a new connection from its first byte (``make_session``)."""

    def __init__(self, engine: KvsEngine, facts: ServerFacts, protocols: tuple[str, ...]) -> None:
        self.engine = engine
        self.facts = facts
        self.kvs = "kvs" in protocols
        self.resp = "resp" in protocols
        share_attributes(self)  # called on pool threads

    def make_session(self, first_byte: int, peer: str) -> Session | None:
        """The session for a connection whose first byte is ``first_byte``; None (logged)
        when no enabled protocol starts so."""
        if first_byte == REQUEST_MAGIC and self.kvs:
            return KvsSession(self.engine, peer, max_key_bytes=self.facts.max_key_bytes,
                              max_value_bytes=self.facts.max_value_bytes)
        if self.resp and (first_byte == 0x2A or 0x41 <= first_byte <= 0x7A):
            # RESP: a "*" array, or an inline command starting with a letter
            return RespSession(self.engine, peer, self.facts)
        log.warning("closing connection from %s: unknown protocol (first byte 0x%02x)", peer, first_byte)
        return None


share_module_globals(globals())

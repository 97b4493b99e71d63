"""The shape every protocol session has: the bytes of one connection in, response bytes out.

A session owns the incremental decoder of one connection and executes each decoded request
on the engine, in order, returning the encoded responses of a whole batch as one ``bytes``
(one ``send`` per batch: pipelined requests cost one syscall, not one each). Sessions know
nothing of sockets; a connection is served by at most one thread at a time, so a session
needs no lock (see ``connection.py``). ``handle`` never raises for anything a client sends.

The sessions: ``kvs_session.KvsSession`` (our binary protocol) and
``resp_session.RespSession`` (RESP2, its commands in ``resp_commands``); ``protocols``
chooses one from a connection's first byte. What a session may know of its server is
:class:`ServerFacts`, a read-only view.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kvs.engine.base import KvsEngine
from kvs.engine.values import Key, Value
from kvs.errors import KvsError, ProtocolError
from kvs.freethreading import share_module_globals

log = logging.getLogger("kvs.server")


class Session(Protocol):
    """What a connection needs of a protocol implementation."""

    closing: bool
    """True once the connection must be closed after sending the last response."""

    commands: int
    """Requests executed so far on this connection."""

    def handle(self, data: bytes) -> bytes:
        """Consume received bytes; the responses to every request they completed."""
        ...

    @property
    def in_frame(self) -> bool:
        """True while part of a request has arrived but not all of it."""
        ...


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What a session may know of its server (INFO, CONFIG GET): its configuration, and
    two live counts. Read-only; one per server, shared by its sessions."""

    address: tuple[str, int]
    max_connections: int
    max_key_bytes: int
    max_value_bytes: int
    io_model: str
    pool_name: str
    pool_threads: int
    engine_name: str
    engine_fsync: str
    started_at: float
    """``time.time()`` when the server was made."""
    connection_count: Callable[[], int]
    """Connections open now."""
    total_commands: Callable[[], int]
    """Requests executed so far (closed connections included)."""


class DecodingSession:
    """What every session shares: feed the connection's decoder, execute what it completed;
    on a fatal protocol error, answer the requests before it, then the error, and close.
    Subclasses set ``engine``, ``decoder``, ``peer``, ``closing`` and ``commands`` (slots
    of this class) in their ``__init__`` and define ``execute`` and ``fatal_reply``."""

    __slots__ = ("engine", "peer", "decoder", "closing", "commands")
    engine: KvsEngine
    decoder: Any  # a RequestDecoder or a RespDecoder: feed(data) -> list, in_frame
    peer: str
    closing: bool
    commands: int

    @property
    def in_frame(self) -> bool:
        return bool(self.decoder.in_frame)

    def handle(self, data: bytes) -> bytes:
        try:
            items = self.decoder.feed(data)
        except ProtocolError as exc:  # fatal: the stream cannot be framed any more
            log.warning("closing connection from %s: %s", self.peer, exc)
            out = self.execute(exc.preceding)
            self.closing = True
            return out + self.fatal_reply(exc)
        return self.execute(items)

    def execute(self, items: list[Any]) -> bytes:
        """Run decoded requests in order; their encoded responses, concatenated."""
        raise NotImplementedError

    def fatal_reply(self, exc: ProtocolError) -> bytes:
        """The last response on a stream that ``exc`` ended."""
        raise NotImplementedError

    def store_run(self, pairs: Sequence[tuple[Key, Value]]) -> bool:
        """Store a run of consecutive pipelined SETs with the engine's ``set_batch`` (one
        write for the run; not a transaction, as in Redis). False, with nothing stored, when
        the engine refuses a pair: the caller then executes the run one command at a time,
        so each command gets exactly the reply it would have got alone."""
        try:
            self.engine.set_batch(pairs)
        except (KvsError, TypeError):
            return False
        return True


def run_end(items: list[Any], start: int, is_set: Callable[[Any], bool]) -> int:
    """The index just past the consecutive items from ``start`` on that ``is_set`` accepts:
    the end of a pipelined run of SETs."""
    count = len(items)
    while start < count and is_set(items[start]):
        start += 1
    return start


share_module_globals(globals())

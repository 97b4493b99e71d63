"""Protocol sessions: the bytes of one connection in, the response bytes out.

A session owns the incremental decoder of one connection and executes each decoded request
on the engine, in order, returning the encoded responses of a whole batch as one ``bytes``
(one ``sendall`` per batch: pipelined requests cost one syscall, not one each). Sessions know
nothing of sockets; a connection is served by at most one thread at a time, so a session
needs no lock (see ``connection.py``).

``KvsSession`` speaks our binary protocol (``kvs.protocol``). ``handle`` never raises for
anything a client sends: malformed frames become ERROR responses (stream continues) or a FATAL
response after which ``closing`` is True and the server closes the connection. Each problem
is logged as one warning line naming the peer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from kvs.engine.base import KvsEngine
from kvs.freethreading import share_attributes
from kvs.errors import KeyNotFoundError, KvsError
from kvs.protocol import (
    NOT_FOUND_RESPONSE,
    OK_RESPONSE,
    PONG_RESPONSE,
    Op,
    ProtocolError,
    Request,
    RequestDecoder,
    encode_error,
    encode_fatal,
    encode_value,
)

log = logging.getLogger("kvs.server")

_GET, _SET, _REMOVE, _PING = Op.GET, Op.SET, Op.REMOVE, Op.PING


class Session(Protocol):
    """What a connection needs of a protocol implementation."""

    closing: bool
    """True once the connection must be closed after sending the last response."""

    def handle(self, data: bytes) -> bytes:
        """Consume received bytes; the responses to every request they completed."""
        ...

    @property
    def in_frame(self) -> bool:
        """True while part of a request has arrived but not all of it."""
        ...


class DecodingSession:
    """What every session shares: feed the connection's decoder, execute what it completed;
    on a fatal protocol error, answer the requests before it, then the error, and close.
    Subclasses set ``decoder``, ``peer`` and ``closing`` and define ``execute`` and
    ``fatal_reply``."""

    __slots__ = ()
    engine: KvsEngine
    decoder: RequestDecoder
    peer: str
    closing: bool

    @property
    def in_frame(self) -> bool:
        return self.decoder.in_frame

    def handle(self, data: bytes) -> bytes:
        try:
            items = self.decoder.feed(data)
        except ProtocolError as exc:  # fatal: the stream cannot be framed any more
            log.warning("closing connection from %s: %s", self.peer, exc)
            out = self.execute(exc.preceding)
            self.closing = True
            return out + self.fatal_reply(exc)
        return self.execute(items)

    def execute(self, items: list) -> bytes:
        raise NotImplementedError

    def store_run(self, pairs: list[tuple[str, str]]) -> bool:
        """Store a run of consecutive pipelined SETs with the engine's ``set_many`` (one
        write for the run). False, with nothing stored, when the engine has no ``set_many``
        or refuses a pair: the caller then executes the run one command at a time, so each
        command gets exactly the reply it would have got alone."""
        set_many = getattr(self.engine, "set_many", None)
        if set_many is None:
            return False
        try:
            set_many(pairs)
        except (KvsError, TypeError):
            return False
        return True

    def fatal_reply(self, exc: ProtocolError) -> bytes:
        raise NotImplementedError


def run_end(items: list, start: int, is_set: Callable[[Any], bool]) -> int:
    """The index just past the consecutive items from ``start`` on that ``is_set`` accepts:
    the end of a pipelined run of SETs."""
    count = len(items)
    while start < count and is_set(items[start]):
        start += 1
    return start


def _is_set(item: object) -> bool:
    return type(item) is Request and item[0] is _SET  # type: ignore[index]


class KvsSession(DecodingSession):
    """Our binary protocol on one connection."""

    __slots__ = ("engine", "peer", "decoder", "closing", "commands", "__weakref__")

    def __init__(self, engine: KvsEngine, peer: str, *, max_key_bytes: int, max_value_bytes: int) -> None:
        self.engine = engine
        self.peer = peer
        self.decoder = RequestDecoder(max_key_bytes=max_key_bytes, max_value_bytes=max_value_bytes)
        self.closing = False
        self.commands = 0
        share_attributes(self.decoder)  # later batches may run on other pool threads
        share_attributes(self)

    def fatal_reply(self, exc: ProtocolError) -> bytes:
        return encode_fatal(str(exc))

    def execute(self, items: list) -> bytes:
        """Run decoded requests in order; their encoded responses, concatenated."""
        engine = self.engine
        out = []
        append = out.append
        self.commands += len(items)
        count = len(items)
        i = 0
        while i < count:
            req = items[i]
            i += 1
            if i < count and _is_set(req) and _is_set(items[i]):
                end = run_end(items, i + 1, _is_set)
                run = items[i - 1:end]
                if self.store_run([(r[1], r[2]) for r in run]):
                    out += [OK_RESPONSE] * len(run)
                    i = end
                    continue
            if type(req) is ProtocolError:  # a malformed frame, skipped by the decoder
                log.warning("malformed request from %s: %s", self.peer, req)
                append(encode_error(str(req)))
                continue
            try:
                op = req[0]
                if op is _GET:
                    value = engine.get(req[1])
                    append(NOT_FOUND_RESPONSE if value is None else encode_value(value))
                elif op is _SET:
                    engine.set(req[1], req[2])
                    append(OK_RESPONSE)
                elif op is _REMOVE:
                    try:
                        engine.remove(req[1])
                        append(OK_RESPONSE)
                    except KeyNotFoundError:
                        append(NOT_FOUND_RESPONSE)
                elif op is _PING:
                    append(PONG_RESPONSE)
                else:
                    append(encode_error(f"unsupported operation {op}"))
            except KvsError as exc:
                append(encode_error(str(exc)))
            except Exception:  # a bug must cost one request, never the server
                log.exception("internal error serving %s", self.peer)
                append(encode_error("internal server error"))
        return b"".join(out)


from kvs.freethreading import share_module_globals  # noqa: E402  (last: marks this module's globals)

share_module_globals(globals())

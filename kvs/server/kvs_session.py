"""Our binary protocol (``kvs.protocol``, versions 1 and 2) on one connection.

``handle`` never raises for anything a client sends: malformed frames become ERROR responses
(the stream continues) or a FATAL response after which ``closing`` is True and the server
closes the connection. Each problem is logged as one warning line naming the peer.

Each request is answered in its own frame's version, so a version-1 client gets exactly the
replies it always got. Keys and values reach the engine as the type the frame carried
(``str`` for text, ``bytes`` for bytes), and the engine returns a value as the type it was
written with; a version-1 GET of a bytes value gets the text those bytes encode, or ERROR
when they are not UTF-8 (version 1 carries only text).
"""

from __future__ import annotations

import logging
from typing import Any

from kvs.engine.base import KvsEngine
from kvs.errors import KeyNotFoundError, KvsError, ProtocolError
from kvs.freethreading import share_attributes, share_module_globals
from kvs.protocol import (
    NOT_FOUND_RESPONSE,
    NOT_FOUND_RESPONSE_V1,
    OK_RESPONSE,
    OK_RESPONSE_V1,
    PONG_RESPONSE,
    PONG_RESPONSE_V1,
    FrameError,
    Op,
    Request,
    RequestDecoder,
    encode_error,
    encode_fatal,
    encode_value,
)
from kvs.server.sessions import DecodingSession, run_end

log = logging.getLogger("kvs.server")

_GET, _SET, _REMOVE, _PING = Op.GET, Op.SET, Op.REMOVE, Op.PING


def _is_set(item: object) -> bool:
    """A SET that a pipelined run may store with ``set_batch``: one without a TTL."""
    return type(item) is Request and item[0] is _SET and item[3] is None


_OK = {1: OK_RESPONSE_V1, 2: OK_RESPONSE}


class KvsSession(DecodingSession):
    """Our binary protocol on one connection."""

    __slots__ = ("__weakref__",)
    decoder: RequestDecoder

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

    def execute(self, items: list[Any]) -> bytes:
        """Run decoded requests in order; their encoded responses, concatenated."""
        engine = self.engine
        out: list[bytes] = []
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
                    out += [_OK[r[4]] for r in run]
                    i = end
                    continue
            if type(req) is FrameError:  # a malformed frame, skipped by the decoder
                log.warning("malformed request from %s: %s", self.peer, req)
                append(encode_error(str(req), version=req.version))
                continue
            v2 = req[4] == 2
            try:
                op = req[0]
                if op is _GET:
                    value = engine.get(req[1])
                    if value is None:
                        append(NOT_FOUND_RESPONSE if v2 else NOT_FOUND_RESPONSE_V1)
                    else:
                        append(encode_value(value) if v2 else encode_value(value, version=1))
                elif op is _SET:
                    ttl_ms = req[3]
                    if ttl_ms is None:
                        engine.set(req[1], req[2])
                    else:
                        engine.set(req[1], req[2], ttl=ttl_ms / 1000)
                    append(OK_RESPONSE if v2 else OK_RESPONSE_V1)
                elif op is _REMOVE:
                    try:
                        engine.remove(req[1])
                        append(OK_RESPONSE if v2 else OK_RESPONSE_V1)
                    except KeyNotFoundError:
                        append(NOT_FOUND_RESPONSE if v2 else NOT_FOUND_RESPONSE_V1)
                elif op is _PING:
                    append(PONG_RESPONSE if v2 else PONG_RESPONSE_V1)
                else:
                    append(encode_error(f"unsupported operation {op}", version=req[4]))
            except KvsError as exc:
                append(encode_error(str(exc), version=req[4]))
            except Exception:  # a bug must cost one request, never the server
                log.exception("internal error serving %s", self.peer)
                append(encode_error("internal server error", version=req[4]))
        return b"".join(out)


share_module_globals(globals())

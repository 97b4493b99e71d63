"""RESP2 (the Redis protocol) on a kvs connection, so redis-cli, redis-py and
redis-benchmark work against kvs-server unchanged.

The session decodes commands (``kvs.resp.RespDecoder``) and runs each one: GET and SET
directly (:func:`~kvs.server.resp_commands.get_value` and
:func:`~kvs.server.resp_commands.set_value`, their one definition), a pipelined run of plain
SETs with one ``set_batch``, everything else through the command table
(:func:`~kvs.server.resp_commands.run_command`); ``resp_commands`` documents the commands.

Keys and values are stored as the bytes the client sent (``resp_commands``: no decoding,
so any bytes are accepted and the fast paths do no work on them). Protocol errors are fatal as in
Redis: ``-ERR Protocol error: ...`` then the connection is closed. Like ``KvsSession``, a
session is used by one thread at a time and never raises for what a client sends.
"""

from __future__ import annotations

import logging
from typing import Any

from kvs.engine.base import KvsEngine
from kvs.errors import KvsError, ProtocolError
from kvs.freethreading import share_attributes, share_module_globals
from kvs.resp import NULL_BULK, OK, RespDecoder, error
from kvs.server.resp_commands import get_value, is_plain_set, run_command, set_value
from kvs.server.sessions import DecodingSession, ServerFacts, run_end

log = logging.getLogger("kvs.server")


class RespSession(DecodingSession):
    """One RESP2 connection: bytes in, reply bytes out. ``null`` is the null reply of this
    connection (RESP3's ``_`` after ``HELLO 3``)."""

    __slots__ = ("facts", "null", "parse_single", "__weakref__")
    decoder: RespDecoder

    def __init__(self, engine: KvsEngine, peer: str, facts: ServerFacts) -> None:
        self.engine = engine
        self.facts = facts
        self.peer = peer
        self.decoder = RespDecoder(max_bulk_bytes=max(facts.max_key_bytes, facts.max_value_bytes) + 1024)
        self.closing = False
        self.commands = 0
        self.null = NULL_BULK
        self.parse_single = self.decoder.parse_single  # one attribute load per request, not two
        share_attributes(self.decoder)  # later batches may run on other pool threads
        share_attributes(self)

    def fatal_reply(self, exc: ProtocolError) -> bytes:
        return error(f"Protocol error: {exc}")

    def handle(self, data: bytes) -> bytes:
        """``DecodingSession.handle`` with a fast path for exactly one whole GET or SET, what
        each round trip of a client that waits for its replies carries: no decoder state,
        no batch, no loop (docs/protocol.md, "Server hot paths")."""
        args = self.parse_single(data)
        if args is None:
            return DecodingSession.handle(self, data)
        name = args[0]
        argc = len(args)
        if argc == 2 and (name == b"GET" or name == b"get"):
            self.commands += 1
            try:
                return get_value(self, args)
            except Exception as exc:
                return self._failure(exc)
        if argc == 3 and (name == b"SET" or name == b"set"):
            self.commands += 1
            try:
                return set_value(self, args)
            except Exception as exc:
                return self._failure(exc)
        return self.execute([args])

    def execute(self, items: list[Any]) -> bytes:
        """Run decoded commands in order (none after QUIT); their replies, concatenated.

        ``executed`` counts the commands run so far, every one (failed ones too); it is
        stored into ``commands`` before a command of the table runs (INFO reports it) and at
        the end, not after every GET or SET. Only a command of the table can set
        ``closing`` (QUIT), so that is where it is checked."""
        if self.closing:
            return b""
        commands: list[list[bytes]] = items
        out: list[bytes] = []
        append = out.append
        executed = self.commands
        count = len(commands)
        i = 0
        while i < count:
            args = commands[i]
            i += 1
            executed += 1
            try:
                name = args[0].lower()
                argc = len(args)
                if name == b"set" and argc == 3 and i < count and is_plain_set(commands[i]):
                    # A pipelined run of SETs: one engine write for all of them.
                    end = run_end(commands, i + 1, is_plain_set)
                    run = commands[i - 1:end]
                    if self.store_run([(a[1], a[2]) for a in run]):
                        executed += len(run) - 1
                        out += [OK] * len(run)
                        i = end
                        continue
                # GET and SET before the table: the commands of every benchmark.
                if name == b"get" and argc == 2:
                    append(get_value(self, args))
                elif name == b"set" and argc == 3:
                    append(set_value(self, args))
                else:
                    self.commands = executed
                    append(run_command(self, name, args))
                    if self.closing:  # after QUIT nothing more is executed
                        break
            except Exception as exc:
                append(self._failure(exc))
        self.commands = executed
        return b"".join(out)

    def _failure(self, exc: Exception) -> bytes:
        """The error reply of a command that raised ``exc``: a ``KvsError``'s message (a key
        or value over the size limits); a bug costs one command, never the connection or
        the server."""
        if isinstance(exc, KvsError):
            return error(str(exc))
        log.error("internal error serving RESP client %s", self.peer, exc_info=exc)
        return error("internal server error")


share_module_globals(globals())

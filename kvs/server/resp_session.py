"""RESP2 (the Redis protocol) on a kvs connection, so redis-cli, redis-py and
redis-benchmark work against kvs-server unchanged.

Commands follow Redis's documented semantics for what is supported:

- ``GET key`` (bulk, or null), ``SET key value`` (``+OK``; options such as ``EX``/``NX`` get
  ``-ERR unsupported option`` rather than being ignored), ``DEL key [key ...]`` and
  ``EXISTS key [key ...]`` (integer counts; EXISTS counts a repeated key each time),
  ``PING [message]``, ``ECHO message``, ``QUIT``;
- for clients' and tools' start-up: ``HELLO [2|3]`` (redis-py 5+ opens with ``HELLO 3``: a
  connection that asks for RESP3 gets RESP3's null and map replies, the only RESP3 types
  these commands produce), ``COMMAND`` / ``COMMAND COUNT`` / ``COMMAND DOCS``, ``CONFIG GET``,
  ``CLIENT SETNAME|SETINFO``, ``SELECT 0``, and ``INFO`` (a ``server`` section with kvs's
  version, engine, pool, threads, uptime, connected clients, total commands and keys);
- anything else: ``-ERR unknown command``.

Keys and values are UTF-8 text in kvs while Redis bulk strings are binary: a key or value
that is not valid UTF-8 gets ``-ERR`` and nothing is stored. Protocol errors are fatal as in
Redis: ``-ERR Protocol error: ...`` then the connection is closed. Like ``KvsSession``, a
session is used by one thread at a time and never raises for what a client sends.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from kvs import __version__
from kvs.errors import KeyNotFoundError, KvsError
from kvs.freethreading import share_attributes
from kvs.server.sessions import DecodingSession, run_end
from kvs.resp import (
    EMPTY_ARRAY,
    NULL_BULK,
    OK,
    PONG,
    RespDecoder,
    RespProtocolError,
    array,
    bulk,
    error,
    integer,
)

if TYPE_CHECKING:
    from kvs.server.server import KvsServer

log = logging.getLogger("kvs.server")

REDIS_COMPAT_VERSION = "7.0.0"
"""Reported as ``redis_version`` in INFO: the Redis command level these commands follow."""

_COMMANDS = {  # name: arity as COMMAND reports it (negative: at least that many)
    b"get": 2, b"set": -3, b"del": -2, b"exists": -2, b"ping": -1, b"echo": 2, b"quit": 1,
    b"command": -1, b"config": -2, b"info": -1, b"client": -2, b"select": 2, b"hello": -1,
}
_RESP3_NULL = b"_\r\n"


class RespSession(DecodingSession):
    """One RESP2 connection: bytes in, reply bytes out."""

    __slots__ = ("server", "engine", "peer", "decoder", "closing", "commands", "null", "__weakref__")

    def __init__(self, server: KvsServer, peer: str) -> None:
        self.server = server
        self.engine = server.engine
        self.peer = peer
        self.decoder = RespDecoder(max_bulk_bytes=max(server.max_key_bytes, server.max_value_bytes) + 1024)
        self.closing = False
        self.commands = 0
        self.null = NULL_BULK  # RESP3's "_" after HELLO 3
        share_attributes(self.decoder)  # later batches may run on other pool threads
        share_attributes(self)

    def fatal_reply(self, exc: RespProtocolError) -> bytes:
        return error(f"Protocol error: {exc}")

    def handle(self, data: bytes) -> bytes:
        """``DecodingSession.handle`` with a fast path for exactly one whole GET or SET, what
        each round trip of a client that waits for its replies carries: no decoder state,
        no batch, no loop (about 1.2 us less per GET, measured)."""
        args = self.decoder.parse_single(data)
        if args is None:
            return DecodingSession.handle(self, data)
        name = args[0]
        argc = len(args)
        if argc == 2 and (name == b"GET" or name == b"get"):
            self.commands += 1
            try:
                value = self.engine.get(args[1].decode())
            except Exception as exc:
                return self._failure(args, exc)
            if value is None:
                return self.null
            value = value.encode()
            return b"$%d\r\n%b\r\n" % (len(value), value)  # bulk(value)
        if argc == 3 and (name == b"SET" or name == b"set"):
            self.commands += 1
            try:
                self.engine.set(args[1].decode(), args[2].decode())
            except Exception as exc:
                return self._failure(args, exc)
            return OK
        return self.execute([args])

    def execute(self, commands: list) -> bytes:
        out = []
        append = out.append
        engine = self.engine
        count = len(commands)
        i = 0
        while i < count:
            if self.closing:  # after QUIT nothing more is executed
                break
            args = commands[i]
            i += 1
            try:
                name = args[0].lower()
                argc = len(args)
                if name == b"set" and argc == 3 and i < count and _is_plain_set(commands[i]):
                    # A pipelined run of SETs: one engine write for all of them.
                    end = run_end(commands, i + 1, _is_plain_set)
                    run = commands[i - 1:end]
                    try:
                        pairs = [(a[1].decode(), a[2].decode()) for a in run]
                    except UnicodeDecodeError:
                        pairs = None
                    if pairs is not None and self.store_run(pairs):
                        self.commands += len(run)
                        out += [OK] * len(run)
                        i = end
                        continue
                self.commands += 1
                # GET and SET inline (no helper calls): the hot path of every benchmark.
                if name == b"get" and argc == 2:
                    value = engine.get(args[1].decode())
                    if value is None:
                        append(self.null)
                    else:
                        value = value.encode()
                        append(b"$%d\r\n%b\r\n" % (len(value), value))  # bulk(value)
                elif name == b"set" and argc == 3:
                    engine.set(args[1].decode(), args[2].decode())
                    append(OK)
                else:
                    append(self._other(name, args))
            except Exception as exc:
                append(self._failure(args, exc))
        return b"".join(out)

    def _failure(self, args: list[bytes], exc: Exception) -> bytes:
        """The error reply of a command that raised ``exc``. A ``UnicodeDecodeError`` comes
        from an inline GET or SET decoding its key, else its value; a bug costs one command,
        never the connection or the server."""
        if isinstance(exc, UnicodeDecodeError):
            return error(_not_utf8("value" if _decodes(args[1]) else "key"))
        if isinstance(exc, KvsError):
            return error(str(exc))
        log.error("internal error serving RESP client %s", self.peer, exc_info=exc)
        return error("internal server error")

    def _other(self, name: bytes, args: list[bytes]) -> bytes:
        argc = len(args)
        arity = _COMMANDS.get(name)
        if arity is None:
            shown = " ".join(f"'{a.decode(errors='replace')}'" for a in args[1:4])
            return error(f"unknown command '{args[0].decode(errors='replace')}', with args beginning with: {shown}")
        if (arity > 0 and argc != arity) or (arity < 0 and argc < -arity):
            return error(f"wrong number of arguments for '{name.decode()}' command")
        engine = self.engine
        if name == b"set":  # argc > 3: SET with options
            return error(f"unsupported option '{args[3].decode(errors='replace')}' (kvs supports plain SET key value)")
        if name == b"del":
            removed = 0
            for key in args[1:]:
                try:
                    engine.remove(_text(key, "key"))
                    removed += 1
                except KeyNotFoundError:
                    pass
            return integer(removed)
        if name == b"exists":
            return integer(sum(engine.get(_text(k, "key")) is not None for k in args[1:]))
        if name == b"ping":
            return PONG if argc == 1 else (bulk(args[1]) if argc == 2 else error("wrong number of arguments for 'ping' command"))
        if name == b"echo":
            return bulk(args[1])
        if name == b"quit":
            self.closing = True
            return OK
        if name == b"select":
            return OK if args[1] == b"0" else error("DB index is out of range")
        if name == b"info":
            return bulk(self._info(args[1:]))
        if name == b"config":
            return self._config(args)
        if name == b"hello":
            return self._hello(args)
        if name == b"client":
            sub = args[1].lower()
            if sub in (b"setname", b"setinfo"):
                return OK
            return error(f"unsupported CLIENT subcommand '{args[1].decode(errors='replace')}'")
        return self._command(args)

    def _hello(self, args: list[bytes]) -> bytes:
        version = args[1] if len(args) > 1 else b"2"
        if version not in (b"2", b"3"):
            return error("-NOPROTO unsupported protocol version")
        for option in args[2:]:
            if option.lower() == b"auth":
                return error("AUTH is not supported: kvs has no users")
        resp3 = version == b"3"
        self.null = _RESP3_NULL if resp3 else NULL_BULK
        fields = [bulk("server"), bulk("redis"), bulk("version"), bulk(REDIS_COMPAT_VERSION),
                  bulk("proto"), integer(3 if resp3 else 2), bulk("id"), integer(id(self) & 0xFFFFFFF),
                  bulk("mode"), bulk("standalone"), bulk("role"), bulk("master"), bulk("modules"), EMPTY_ARRAY]
        return self._map(fields)

    def _map(self, flat: list[bytes]) -> bytes:
        """A map reply from alternating key and value replies: RESP3 ``%``, RESP2 array."""
        if self.null == _RESP3_NULL:
            return b"%%%d\r\n" % (len(flat) // 2) + b"".join(flat)
        return array(flat)

    def _command(self, args: list[bytes]) -> bytes:
        sub = args[1].lower() if len(args) > 1 else None
        if sub is None:
            return array([array([bulk(n), integer(a), EMPTY_ARRAY, integer(1 if a not in (1, -1) else 0),
                                 integer(1 if a not in (1, -1) else 0), integer(1)]) for n, a in _COMMANDS.items()])
        if sub == b"count":
            return integer(len(_COMMANDS))
        if sub == b"docs":
            return EMPTY_ARRAY  # no docs: redis-cli then simply shows no hints
        return error(f"unsupported COMMAND subcommand '{args[1].decode(errors='replace')}'")

    def _config(self, args: list[bytes]) -> bytes:
        if args[1].lower() != b"get" or len(args) < 3:
            return error("kvs supports only CONFIG GET parameter [parameter ...]")
        server = self.server
        known = {
            b"save": b"",
            b"appendonly": b"no" if _fsync_policy(server) == "never" else b"yes",
            b"appendfsync": {"never": b"no", "always": b"always", "interval": b"everysec"}.get(_fsync_policy(server), b"no"),
            b"databases": b"1",
            b"maxclients": str(server.max_connections).encode(),
            b"proto-max-bulk-len": str(server.max_value_bytes).encode(),
        }
        out = []
        for pattern in args[2:]:
            for key, value in known.items():
                if pattern.lower() == key or pattern == b"*":
                    out += [bulk(key), bulk(value)]
        return self._map(out)

    def _info(self, sections: list[bytes]) -> bytes:
        server = self.server
        engine = server.engine
        try:
            keys = len(engine)  # type: ignore[arg-type]
        except (TypeError, KvsError):
            keys = None
        lines = [
            "# Server",
            f"redis_version:{REDIS_COMPAT_VERSION}",
            f"kvs_version:{__version__}",
            f"engine:{getattr(engine, 'name', type(engine).__name__)}",
            f"pool:{getattr(server.pool, 'name', type(server.pool).__name__)}",
            f"threads:{getattr(server.pool, 'threads', '')}",
            f"io_model:{getattr(server, 'io_model', '')}",
            f"tcp_port:{server.address[1]}",
            f"uptime_in_seconds:{int(time.time() - server.started_at)}",
            f"connected_clients:{server.connection_count()}",
            f"total_commands_processed:{server.total_commands()}",
        ]
        if keys is not None:
            lines.append(f"keys:{keys}")
            lines += ["", "# Keyspace", f"db0:keys={keys},expires=0,avg_ttl=0"]
        wanted = {s.lower() for s in sections}
        if wanted and not wanted & {b"server", b"all", b"default", b"everything", b"keyspace"}:
            return b""
        return ("\r\n".join(lines) + "\r\n").encode()


def _is_plain_set(args: list[bytes]) -> bool:
    return len(args) == 3 and args[0].lower() == b"set"


def _not_utf8(what: str) -> str:
    return f"{what} is not valid UTF-8 (kvs stores UTF-8 text)"


def _decodes(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise KvsError(_not_utf8(what)) from None


def _fsync_policy(server: KvsServer) -> str:
    return getattr(server.engine, "fsync", "never")


from kvs.freethreading import share_module_globals  # noqa: E402  (last: marks this module's globals)

share_module_globals(globals())

"""The RESP commands kvs-server answers: one table entry each, and their handlers.

A command is a :class:`RespCommand` in :data:`COMMANDS`: its name, its arity as Redis counts
it (the name included; negative: at least that many), its flags and key positions (what
``COMMAND`` and ``COMMAND INFO`` report, generated from this table) and its handler,
``handler(session, args) -> reply bytes``. :func:`run_command` checks the name and the arity
for every handler, so a handler sees only calls with a valid argument count. A handler may
raise: ``RespSession`` turns the exception into the command's error reply (a ``KvsError``
its message, anything else an internal error), so one command's failure never costs the
connection. Adding a command is
adding an entry (and its handler) here; connections and sessions do not change.

GET and SET are defined here too (:func:`get_value`, :func:`set_value`), once:
``RespSession`` calls them directly on its fast paths (a single whole GET or SET, and the
commands of a pipelined batch), without the table lookup, and stores pipelined runs of plain
SETs with one ``set_batch``.

Keys and values are what the client sent: bulk strings go to the engine as ``bytes``, as
they came off the wire (any bytes, NUL and invalid UTF-8 included: no decoding, no refusal),
so SET stores a bytes value under a bytes key. GET answers a value's bytes whatever its
type: a value another client stored as ``str`` (the kvs protocol, the library) is its
UTF-8 bytes, and ``b"k"`` and ``"k"`` are one key in every engine.

Semantics follow Redis's documentation for what is supported:

- ``GET key`` (bulk, or null), ``SET key value`` (``+OK``; options such as ``EX``/``NX`` get
  ``-ERR unsupported option`` rather than being ignored), ``DEL key [key ...]`` and
  ``EXISTS key [key ...]`` (integer counts; EXISTS counts a repeated key each time),
  ``PING [message]``, ``ECHO message``, ``QUIT``;
- for clients' and tools' start-up: ``HELLO [2|3]`` (redis-py 5+ opens with ``HELLO 3``: a
  connection that asks for RESP3 gets RESP3's null and map replies, the only RESP3 types
  these commands produce), ``COMMAND`` / ``COMMAND COUNT`` / ``COMMAND INFO`` /
  ``COMMAND DOCS``, ``CONFIG GET``, ``CLIENT SETNAME|SETINFO``, ``SELECT 0``, and ``INFO``
  (a ``server`` section with kvs's version, engine, pool, threads, uptime, connected
  clients, total commands and keys);
- anything else: ``-ERR unknown command``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from kvs import __version__
from kvs.errors import KeyNotFoundError, KvsError
from kvs.freethreading import share_module_globals
from kvs.resp import EMPTY_ARRAY, NULL_ARRAY, NULL_BULK, OK, PONG, array, bulk, error, integer, simple_string

if TYPE_CHECKING:
    from kvs.server.resp_session import RespSession

REDIS_COMPAT_VERSION = "7.0.0"
"""Reported as ``redis_version`` in INFO and HELLO: the Redis command level followed here."""

RESP3_NULL = b"_\r\n"
"""RESP3's null, what GET answers for a missing key after ``HELLO 3``."""

Handler = Callable[["RespSession", list[bytes]], bytes]
"""A command's implementation: the session and the command's arguments (the name first),
to the reply."""


class RespCommand(NamedTuple):
    """One entry of the command table."""

    name: bytes
    """Lower case, as looked up and as ``COMMAND`` reports it."""
    arity: int
    """Argument count including the name; negative: at least ``-arity``."""
    flags: tuple[str, ...]
    """Redis's command flags (``write``, ``readonly``, ``fast``, ...), reported by COMMAND."""
    first_key: int
    """Position of the first key argument (0: none); with ``last_key`` and ``step`` what
    COMMAND reports as the key specification."""
    last_key: int
    """Position of the last key argument (-1: the last argument)."""
    step: int
    """Distance between key arguments."""
    handler: Handler


# ------------------------------------------------------------------ GET and SET: the one definition
def get_value(session: RespSession, args: list[bytes]) -> bytes:
    """``GET key``: the value's bytes as a bulk string (a ``str`` value's UTF-8), or the
    session's null."""
    value = session.engine.get(args[1])
    if value is None:
        return session.null
    raw = value.encode() if isinstance(value, str) else value
    return b"$%d\r\n%b\r\n" % (len(raw), raw)  # bulk(value), inline


def set_value(session: RespSession, args: list[bytes]) -> bytes:
    """``SET key value``: store the value's bytes under the key's bytes, ``+OK``."""
    session.engine.set(args[1], args[2])
    return OK


def _set(session: RespSession, args: list[bytes]) -> bytes:
    """``SET`` through the table: a plain SET, or the error for options kvs does not have."""
    if len(args) > 3:
        return error(f"unsupported option '{args[3].decode(errors='replace')}' (kvs supports plain SET key value)")
    return set_value(session, args)


def is_plain_set(args: list[bytes]) -> bool:
    """True for ``SET key value`` in any case: what a pipelined run of SETs is made of."""
    return len(args) == 3 and args[0].lower() == b"set"


# ------------------------------------------------------------------ the other commands
def _del(session: RespSession, args: list[bytes]) -> bytes:
    engine = session.engine
    removed = 0
    for key in args[1:]:
        try:
            engine.remove(key)
            removed += 1
        except KeyNotFoundError:
            pass
    return integer(removed)


def _exists(session: RespSession, args: list[bytes]) -> bytes:
    engine = session.engine
    return integer(sum(k in engine for k in args[1:]))


def _ping(_session: RespSession, args: list[bytes]) -> bytes:
    argc = len(args)
    if argc > 2:
        return error("wrong number of arguments for 'ping' command")
    return PONG if argc == 1 else bulk(args[1])


def _echo(_session: RespSession, args: list[bytes]) -> bytes:
    return bulk(args[1])


def _quit(session: RespSession, _args: list[bytes]) -> bytes:
    session.closing = True
    return OK


def _select(_session: RespSession, args: list[bytes]) -> bytes:
    return OK if args[1] == b"0" else error("DB index is out of range")


def _client(_session: RespSession, args: list[bytes]) -> bytes:
    if args[1].lower() in (b"setname", b"setinfo"):
        return OK
    return error(f"unsupported CLIENT subcommand '{args[1].decode(errors='replace')}'")


def _hello(session: RespSession, args: list[bytes]) -> bytes:
    version = args[1] if len(args) > 1 else b"2"
    if version not in (b"2", b"3"):
        return error("-NOPROTO unsupported protocol version")
    for option in args[2:]:
        if option.lower() == b"auth":
            return error("AUTH is not supported: kvs has no users")
    resp3 = version == b"3"
    session.null = RESP3_NULL if resp3 else NULL_BULK
    fields = [bulk("server"), bulk("redis"), bulk("version"), bulk(REDIS_COMPAT_VERSION),
              bulk("proto"), integer(3 if resp3 else 2), bulk("id"), integer(id(session) & 0xFFFFFFF),
              bulk("mode"), bulk("standalone"), bulk("role"), bulk("master"), bulk("modules"), EMPTY_ARRAY]
    return _map(session, fields)


def _map(session: RespSession, flat: list[bytes]) -> bytes:
    """A map reply from alternating key and value replies: RESP3 ``%``, RESP2 array."""
    if session.null == RESP3_NULL:
        return b"%%%d\r\n" % (len(flat) // 2) + b"".join(flat)
    return array(flat)


def command_reply(command: RespCommand) -> bytes:
    """What ``COMMAND`` and ``COMMAND INFO`` say of ``command``: name, arity, flags, first
    key, last key, step."""
    return array([bulk(command.name), integer(command.arity), array([simple_string(f) for f in command.flags]),
                  integer(command.first_key), integer(command.last_key), integer(command.step)])


def _command(_session: RespSession, args: list[bytes]) -> bytes:
    sub = args[1].lower() if len(args) > 1 else None
    if sub is None:
        return array([command_reply(c) for c in COMMANDS.values()])
    if sub == b"count":
        return integer(len(COMMANDS))
    if sub == b"info":
        if len(args) == 2:
            return array([command_reply(c) for c in COMMANDS.values()])
        names = [a.lower() for a in args[2:]]
        return array([command_reply(COMMANDS[n]) if n in COMMANDS else NULL_ARRAY for n in names])
    if sub == b"docs":
        return EMPTY_ARRAY  # no docs: redis-cli then simply shows no hints
    return error(f"unsupported COMMAND subcommand '{args[1].decode(errors='replace')}'")


_APPENDFSYNC = {"never": b"no", "always": b"always", "interval": b"everysec"}


def _config(session: RespSession, args: list[bytes]) -> bytes:
    if args[1].lower() != b"get" or len(args) < 3:
        return error("kvs supports only CONFIG GET parameter [parameter ...]")
    facts = session.facts
    fsync = facts.engine_fsync
    known = {
        b"save": b"",
        b"appendonly": b"no" if fsync == "never" else b"yes",
        b"appendfsync": _APPENDFSYNC[fsync] if fsync in _APPENDFSYNC else b"no",
        b"databases": b"1",
        b"maxclients": str(facts.max_connections).encode(),
        b"proto-max-bulk-len": str(facts.max_value_bytes).encode(),
    }
    out = []
    for pattern in args[2:]:
        for key, value in known.items():
            if pattern.lower() == key or pattern == b"*":
                out += [bulk(key), bulk(value)]
    return _map(session, out)


_INFO_SECTIONS = frozenset({b"server", b"all", b"default", b"everything", b"keyspace"})


def _info(session: RespSession, args: list[bytes]) -> bytes:
    facts = session.facts
    try:
        keys: int | None = len(session.engine)
    except KvsError:  # a closed engine
        keys = None
    lines = [
        "# Server",
        f"redis_version:{REDIS_COMPAT_VERSION}",
        f"kvs_version:{__version__}",
        f"engine:{facts.engine_name}",
        f"pool:{facts.pool_name}",
        f"threads:{facts.pool_threads}",
        f"io_model:{facts.io_model}",
        f"tcp_port:{facts.address[1]}",
        f"uptime_in_seconds:{int(time.time() - facts.started_at)}",
        f"connected_clients:{facts.connection_count()}",
        f"total_commands_processed:{facts.total_commands()}",
    ]
    if keys is not None:
        lines.append(f"keys:{keys}")
        lines += ["", "# Keyspace", f"db0:keys={keys},expires=0,avg_ttl=0"]
    wanted = {s.lower() for s in args[1:]}
    if wanted and not wanted & _INFO_SECTIONS:
        return bulk(b"")
    return bulk(("\r\n".join(lines) + "\r\n").encode())


# ------------------------------------------------------------------ the table
def _table(*commands: RespCommand) -> dict[bytes, RespCommand]:
    return {c.name: c for c in commands}


# Flags and key positions are what COMMAND has always reported for these commands (a change
# is visible to clients); the Redis command-table issue brings them to Redis's values.
COMMANDS: dict[bytes, RespCommand] = _table(
    RespCommand(b"get", 2, (), 1, 1, 1, get_value),
    RespCommand(b"set", -3, (), 1, 1, 1, _set),
    RespCommand(b"del", -2, (), 1, 1, 1, _del),
    RespCommand(b"exists", -2, (), 1, 1, 1, _exists),
    RespCommand(b"ping", -1, (), 0, 0, 1, _ping),
    RespCommand(b"echo", 2, (), 1, 1, 1, _echo),
    RespCommand(b"quit", 1, (), 0, 0, 1, _quit),
    RespCommand(b"command", -1, (), 0, 0, 1, _command),
    RespCommand(b"config", -2, (), 1, 1, 1, _config),
    RespCommand(b"info", -1, (), 0, 0, 1, _info),
    RespCommand(b"client", -2, (), 1, 1, 1, _client),
    RespCommand(b"select", 2, (), 1, 1, 1, _select),
    RespCommand(b"hello", -1, (), 0, 0, 1, _hello),
)
"""Every command kvs-server answers, by lower-case name, in ``COMMAND``'s order."""


def run_command(session: RespSession, name: bytes, args: list[bytes]) -> bytes:
    """Run the command ``args`` (``name``: its lower-cased first argument) through the
    table: unknown command and wrong argument count are answered here."""
    if name not in COMMANDS:  # "in" and [], not .get: dict.get locks the dict on 3.13t
        shown = " ".join(f"'{a.decode(errors='replace')}'" for a in args[1:4])
        return error(f"unknown command '{args[0].decode(errors='replace')}', with args beginning with: {shown}")
    command = COMMANDS[name]
    arity = command.arity
    argc = len(args)
    if (arity > 0 and argc != arity) or (arity < 0 and argc < -arity):
        return error(f"wrong number of arguments for '{name.decode()}' command")
    return command.handler(session, args)


share_module_globals(globals())

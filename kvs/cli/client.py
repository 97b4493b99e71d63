"""kvs-client: set, get and remove keys on a kvs server.

    kvs-client set KEY VALUE [--ttl SECONDS] [--addr IP:PORT]   prints nothing
    kvs-client set KEY - [--ttl SECONDS]        the value is standard input's bytes, to its end
    kvs-client get KEY [--addr IP:PORT]         prints the value, or "Key not found" (exit 0)
    kvs-client rm KEY [--addr IP:PORT]          "Key not found" on stderr and exit 1 if absent
    kvs-client -V                               prints the version

Text and bytes: a VALUE given as an argument is stored as text (``str``), a value read from
standard input as bytes. ``get`` prints a text value followed by a newline, as it always
has, and writes a bytes value to standard output exactly as stored, with nothing added (so
``kvs-client get KEY > file`` gives back the file that ``kvs-client set KEY - < file`` stored;
on a terminal only, a newline follows a bytes value that does not end with one). Values
written over RESP (redis-cli, redis-py) are bytes.
An argument that is not valid UTF-8 (POSIX arguments are bytes) is sent as its bytes.

Usage errors exit 2 with a usage message, except a bad ``--ttl``, which is one line (exit 2);
a failure (server unreachable, a value over the size limit, server error) is one line on
stderr and exit 1. Never a traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from kvs import __version__
from kvs.address import DEFAULT_ADDRESS, parse_address
from kvs.client import KvsClient
from kvs.engine.values import MAX_DEADLINE_MS, ttl_deadline
from kvs.errors import KeyNotFoundError, KvsError
from kvs.limits import DEFAULT_MAX_VALUE_BYTES

STDIN = "-"
"""The VALUE that means "read the value from standard input"."""


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except KvsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvs-client", description="Talk to a kvs server.",
        epilog="A value given as an argument is stored as text; 'set KEY -' stores standard input's bytes. "
               "get prints text with a newline and writes bytes unchanged (a newline is added only on a "
               "terminal).")
    parser.add_argument("-V", "--version", action="version", version=f"kvs-client {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=description or help_text)
        sub.add_argument("--addr", type=_address, default=DEFAULT_ADDRESS, metavar="IP:PORT",
                         help=f"server address (default {DEFAULT_ADDRESS})")
        return sub

    set_command = command("set", "Set the value of a key",
                          "Set the value of a key: VALUE as text, or '-' to store standard input's bytes "
                          "(read to its end).")
    set_command.add_argument("key")
    set_command.add_argument("value", help="the value (text), or '-' to read the value's bytes from standard input")
    set_command.add_argument("--ttl", metavar="SECONDS",
                             help="expire the key SECONDS after it is stored (a positive number; ms precision)")
    command("get", "Print the value of a key",
            "Print the value of a key: text with a newline, bytes exactly as stored.").add_argument("key")
    command("rm", "Remove a key").add_argument("key")
    return parser


def _argument(text: str) -> str | bytes:
    """A command-line argument: the text, or its bytes when it is not valid UTF-8 (Python
    decodes such arguments with lone surrogates, which have no UTF-8)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return os.fsencode(text)
    return text


def _ttl(text: str | None) -> float | None:
    """``--ttl`` as seconds; ``ValueError`` with the one-line message for a bad one."""
    if text is None:
        return None
    try:
        ttl = float(text)
    except ValueError:
        raise ValueError(f"--ttl must be a number of seconds, not {text!r}") from None
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"--ttl must be a positive number of seconds, not {text!r}")
    try:
        ttl_deadline(ttl, 0)  # the client's own check, made here so that it is a usage error too
    except KvsError:
        raise ValueError(f"--ttl {text!r} is too large (at most {MAX_DEADLINE_MS // 1000} seconds)") from None
    return ttl


def _stdin_value(limit: int) -> bytes:
    """Standard input's bytes to its end; ``KvsError`` past ``limit`` bytes (reading stops
    there: an endless stream is refused, not buffered)."""
    if sys.stdin is None:
        raise KvsError("standard input is closed")
    try:
        data = sys.stdin.buffer.read(limit + 1)
    except OSError as exc:
        raise KvsError(f"cannot read standard input: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise KvsError(f"the value on standard input is over the limit of {limit} bytes")
    return data


def _print_value(value: str | bytes | None) -> None:
    if value is None:
        print("Key not found")
    elif isinstance(value, str):
        print(value)
    else:
        sys.stdout.flush()
        out = sys.stdout.buffer
        out.write(value)
        if value[-1:] != b"\n" and sys.stdout.isatty():
            out.write(b"\n")  # only on a terminal, so that the prompt starts on its own line
        out.flush()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    addr = args.addr if isinstance(args.addr, tuple) else parse_address(args.addr)
    try:
        ttl = _ttl(args.ttl) if args.command == "set" else None
    except ValueError as exc:
        print(f"kvs-client: error: {exc}", file=sys.stderr)
        return 2
    try:
        key = _argument(args.key)
        if args.command == "set":
            # Read the value before connecting: a slow producer holds no server connection.
            value = _stdin_value(DEFAULT_MAX_VALUE_BYTES) if args.value == STDIN else _argument(args.value)
        with KvsClient(addr) as client:
            if args.command == "set":
                client.set(key, value, ttl=ttl)
            elif args.command == "get":
                _print_value(client.get(key))
            else:
                try:
                    client.remove(key)
                except KeyNotFoundError:
                    print("Key not found", file=sys.stderr)
                    return 1
    except KvsError as exc:
        print(f"kvs-client: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader of standard output went away (``| head``): nothing more to say. Point
        # stdout at /dev/null so that the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()

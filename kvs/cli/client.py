"""kvs-client: set, get and remove keys on a kvs server.

    kvs-client set KEY VALUE [--addr IP:PORT]   prints nothing
    kvs-client get KEY [--addr IP:PORT]         prints the value, or "Key not found" (exit 0)
    kvs-client rm KEY [--addr IP:PORT]          "Key not found" on stderr and exit 1 if absent
    kvs-client -V                               prints the version

Usage errors exit 2 with a usage message; a failure (server unreachable, server error) is
one line on stderr and exit 1. Never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from kvs import __version__
from kvs.address import DEFAULT_ADDRESS, parse_address
from kvs.client import KvsClient
from kvs.errors import KeyNotFoundError, KvsError


def _address(text: str) -> tuple[str, int]:
    try:
        return parse_address(text)
    except KvsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvs-client", description="Talk to a kvs server.")
    parser.add_argument("-V", "--version", action="version", version=f"kvs-client {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--addr", type=_address, default=DEFAULT_ADDRESS, metavar="IP:PORT",
                         help=f"server address (default {DEFAULT_ADDRESS})")
        return sub

    set_command = command("set", "Set the value of a key")
    set_command.add_argument("key")
    set_command.add_argument("value")
    command("get", "Print the value of a key").add_argument("key")
    command("rm", "Remove a key").add_argument("key")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    addr = args.addr if isinstance(args.addr, tuple) else parse_address(args.addr)
    try:
        with KvsClient(addr) as client:
            if args.command == "set":
                client.set(args.key, args.value)
            elif args.command == "get":
                value = client.get(args.key)
                print("Key not found" if value is None else value)
            else:
                try:
                    client.remove(args.key)
                except KeyNotFoundError:
                    print("Key not found", file=sys.stderr)
                    return 1
    except KvsError as exc:
        print(f"kvs-client: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()

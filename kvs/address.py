"""Parsing ``IP:PORT`` addresses for the server, the client and the CLIs."""

from __future__ import annotations

import socket

from kvs.errors import KvsError

DEFAULT_ADDRESS = "127.0.0.1:4000"


def parse_address(text: str) -> tuple[str, int]:
    """``"IP:PORT"`` (or ``"[IPv6]:PORT"``) as ``(host, port)``; ``KvsError`` otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise KvsError(f"invalid address {text!r}: expected IP:PORT, e.g. {DEFAULT_ADDRESS}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        raise KvsError(f"invalid address {text!r}: {host!r} is not an IP address") from None
    return host, int(port)

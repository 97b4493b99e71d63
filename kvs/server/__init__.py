"""The kvs server: an epoll I/O thread dispatching ready connections to a thread pool."""

from kvs.server.server import KvsServer, parse_address

__all__ = ["KvsServer", "parse_address"]

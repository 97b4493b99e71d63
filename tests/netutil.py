"""Helpers shared by the network tests: in-process servers, raw sockets, bounded waits.

Every wait here is bounded by a deadline (never a fixed sleep), and every server started
here is stopped by the context manager that started it, whatever the test does.
``DEADLINE`` and ``wait_for`` are ``tests.helpers``'s, importable from here too.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvs.client import KvsClient
from kvs.engine import open_engine
from kvs.engine.base import KvsEngine
from kvs.limits import DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_VALUE_BYTES
from kvs.server import KvsServer
from kvs.server.sessions import ServerFacts
from kvs.thread_pool import make_pool
from kvs.thread_pool.base import ThreadPool
from tests.helpers import DEADLINE, wait_for

__all__ = ["DEADLINE", "IO_MODEL", "connect", "is_closed_by_peer", "opened_engine", "read_until_closed",
           "server_answers", "server_stack", "serving", "session_facts", "started_pool", "wait_for"]

IO_MODEL: str | None = None
"""The server I/O model :func:`serving` uses when a test does not name one (None: the
server's default). The ``io_model`` fixture of ``conftest.py`` sets it per test."""


@contextlib.contextmanager
def opened_engine(name: str, path: Path, **options: Any) -> Iterator[KvsEngine]:
    engine = open_engine(name, path, **options)
    try:
        yield engine
    finally:
        engine.close()


@contextlib.contextmanager
def started_pool(name: str, threads: int) -> Iterator[ThreadPool]:
    pool = make_pool(name, threads)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True)


@contextlib.contextmanager
def serving(engine: KvsEngine, pool: ThreadPool, **options: Any) -> Iterator[KvsServer]:
    """A KvsServer on 127.0.0.1 (a free port) running ``serve_forever`` in a thread; shut
    down, joined and closed on exit. Fails the test if ``serve_forever`` raised or did not
    return."""
    if IO_MODEL is not None:
        options.setdefault("io_model", IO_MODEL)
    server = KvsServer(engine, pool, ("127.0.0.1", 0), **options)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.serve_forever()
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    thread = threading.Thread(target=run, name="kvs-test-server", daemon=True)
    thread.start()
    try:
        with KvsClient(server.address, timeout=DEADLINE) as client:
            client.ping()  # the I/O loop is up
        yield server
    finally:
        server.shutdown(timeout=DEADLINE)
        thread.join(DEADLINE)
        alive = thread.is_alive()
        if not alive:
            server.close()
    assert not alive, "serve_forever did not return after shutdown()"
    assert not errors, f"serve_forever raised {errors[0]!r}"


@contextlib.contextmanager
def server_stack(tmp_path: Path, engine: str = "kvs", pool: str = "shared-queue", threads: int = 2,
                 **options: Any) -> Iterator[KvsServer]:
    """Engine + pool + running server, all released on exit (server first)."""
    with opened_engine(engine, tmp_path / f"data-{engine}") as eng, started_pool(pool, threads) as p, \
            serving(eng, p, **options) as server:
        yield server


def connect(addr: tuple[str, int], timeout: float = DEADLINE) -> socket.socket:
    """A raw TCP connection to ``addr`` (blocking, with ``timeout`` on every call)."""
    sock = socket.create_connection(addr, timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_until_closed(sock: socket.socket, timeout: float = DEADLINE, limit: int = 64 << 20) -> bytes:
    """Everything the peer sends until it closes the connection (EOF or reset). Fails the
    test if the connection is still open after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    chunks = []
    total = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"the server did not close the connection within {timeout} s")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(256 * 1024)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            break
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        assert total <= limit, "the server sent far more than expected"
    return b"".join(chunks)


def is_closed_by_peer(sock: socket.socket) -> bool:
    """True when the peer has closed ``sock`` (EOF or reset pending), without blocking.
    Data the peer sent first is consumed and ignored."""
    try:
        while True:
            chunk = sock.recv(65536, socket.MSG_DONTWAIT)
            if not chunk:
                return True
    except (BlockingIOError, InterruptedError):
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True


def server_answers(addr: tuple[str, int], key: str | None = None, value: str | None = None) -> None:
    """Assert that a fresh client gets PONG (and ``value`` for ``key``) from ``addr``."""
    with KvsClient(addr, timeout=DEADLINE) as client:
        client.ping()
        if key is not None:
            assert client.get(key) == value


def session_facts(*, max_key_bytes: int = DEFAULT_MAX_KEY_BYTES, max_value_bytes: int = DEFAULT_MAX_VALUE_BYTES,
                  engine_name: str = "kvs", engine_fsync: str = "never") -> ServerFacts:
    """The facts a session made outside a server sees (for session tests in process): those
    of a server on port 0 with these limits, no connections and no commands."""
    return ServerFacts(address=("127.0.0.1", 0), max_connections=10000, max_key_bytes=max_key_bytes,
                       max_value_bytes=max_value_bytes, io_model="leader-followers", pool_name="none",
                       pool_threads=0, engine_name=engine_name, engine_fsync=engine_fsync, started_at=time.time(),
                       connection_count=lambda: 0, total_commands=lambda: 0)

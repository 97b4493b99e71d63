"""KvsServer and KvsClient over real sockets, in process (serve_forever in a thread).

Behaviour only, never timing: every wait is a condition polled with a deadline, and each
server is stopped by the context manager that started it (tests/netutil.py).
"""

from __future__ import annotations

import os
import random
import socket
import struct
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from kvs.client import KvsClient
from kvs.engine.base import FsyncPolicy, KvsEngine
from kvs.errors import KeyNotFoundError, KvsError
from kvs.protocol import (
    FLAG_TTL,
    REQUEST_MAGIC,
    Op,
    ResponseDecoder,
    Status,
    encode_get,
    encode_ping,
    encode_remove,
    encode_set,
)
from kvs.server import KvsServer
from kvs.server.scheduling import SCHEDULING
from kvs.thread_pool import POOLS
from tests.helpers import run_threads
from tests.netutil import (
    DEADLINE,
    connect,
    opened_engine,
    read_until_closed,
    server_answers,
    server_stack,
    serving,
    started_pool,
    wait_for,
)

ALL_POOLS = list(POOLS)

pytestmark = pytest.mark.usefixtures("io_model")  # every server test runs in both I/O models


# ------------------------------------------------------------------------------ basics


def test_client_commands_round_trip(tmp_path: Path) -> None:
    with server_stack(tmp_path) as server, KvsClient(server.address) as c:
        assert c.get("missing") is None
        c.set("key1", "value1")
        assert c.get("key1") == "value1"
        c.set("key1", "value2")
        assert c.get("key1") == "value2"
        c.set("", "")  # the empty string is a valid key and value
        assert c.get("") == ""
        c.set("ключ ✓", "значение 🎉")
        assert c.get("ключ ✓") == "значение 🎉"
        c.remove("key1")
        assert c.get("key1") is None
        with pytest.raises(KeyNotFoundError):
            c.remove("key1")
        c.ping()
        assert c.get("") == ""  # the connection is still usable after a NOT_FOUND


def test_address_string_and_tuple(tmp_path: Path) -> None:
    with server_stack(tmp_path) as server:
        host, port = server.address
        assert host == "127.0.0.1" and port > 0
        with KvsClient(f"{host}:{port}") as c:
            c.set("a", "1")
        with KvsClient((host, port)) as c:
            assert c.get("a") == "1"


def test_server_error_is_a_kvs_error_and_the_connection_continues(tmp_path: Path) -> None:
    with server_stack(tmp_path, max_key_bytes=16) as server, KvsClient(server.address) as c:
        with pytest.raises(KvsError, match="over the limit"):
            c.set("k" * 100, "v")  # the client allows it; the server's limit refuses it
        c.set("short", "v")
        assert c.get("short") == "v"


def test_port_in_use_is_a_kvs_error(tmp_path: Path) -> None:
    with server_stack(tmp_path) as server, started_pool("shared-queue", 1) as pool, \
            opened_engine("kvs", tmp_path / "other") as engine:
        with pytest.raises(KvsError, match="address already in use"):
            KvsServer(engine, pool, server.address)


def test_client_cannot_connect_is_a_kvs_error() -> None:
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        with pytest.raises(KvsError, match="cannot connect"):
            KvsClient(s.getsockname())


def test_closed_client_raises_kvs_error(tmp_path: Path) -> None:
    with server_stack(tmp_path) as server:
        c = KvsClient(server.address)
        c.close()
        c.close()
        with pytest.raises(KvsError):
            c.ping()


def test_shutdown_before_serve_forever_and_close_twice(tmp_path: Path) -> None:
    with opened_engine("kvs", tmp_path / "d") as engine, started_pool("shared-queue", 1) as pool:
        server = KvsServer(engine, pool, ("127.0.0.1", 0))
        server.shutdown()
        server.serve_forever()  # returns at once: already shut down
        server.close()
        server.close()


# ------------------------------------------------------------------------------ concurrency


@pytest.mark.parametrize(
    "engine,pool",
    [("kvs", p) for p in ALL_POOLS] + [("sqlite", "shared-queue"), ("sqlite", "work-stealing")],
)
def test_64_concurrent_clients_lose_nothing(tmp_path: Path, engine: str, pool: str) -> None:
    # the naive pool starts a thread per request: fewer requests keep the test short
    clients, per_client = 64, (20 if pool == "naive" else 100)
    with server_stack(tmp_path, engine=engine, pool=pool, threads=4) as server:
        addr = server.address
        barrier = threading.Barrier(clients)

        def client(n: int) -> None:
            with KvsClient(addr) as c:
                barrier.wait(DEADLINE)
                for i in range(per_client):
                    c.set(f"c{n}-k{i}", f"value {n} {i}")
                    if i % 10 == 9:  # overwrite an earlier key of ours
                        c.set(f"c{n}-k{i - 5}", f"again {n} {i - 5}")
                for i in range(per_client):
                    expected = f"again {n} {i}" if i % 10 == 4 else f"value {n} {i}"
                    assert c.get(f"c{n}-k{i}") == expected
                    assert c.get(f"c{(n + 1) % clients}-missing-{i}") is None

        run_threads([lambda n=n: client(n) for n in range(clients)])
        assert server.total_commands() >= clients * per_client * 2
        with KvsClient(addr) as c:  # everything is there, seen from another connection
            with c.pipeline() as p:
                for n in range(clients):
                    for i in range(per_client):
                        p.get(f"c{n}-k{i}")
            results = p.results()
        expected = [f"again {n} {i}" if i % 10 == 4 else f"value {n} {i}"
                    for n in range(clients) for i in range(per_client)]
        assert results == expected


def test_concurrent_writers_of_the_same_keys_leave_one_of_the_written_values(tmp_path: Path) -> None:
    with server_stack(tmp_path, threads=4) as server:
        addr = server.address

        def writer(n: int) -> None:
            with KvsClient(addr) as c:
                for i in range(200):
                    c.set(f"shared{i % 10}", f"w{n}")

        run_threads([lambda n=n: writer(n) for n in range(16)])
        with KvsClient(addr) as c:
            for i in range(10):
                assert c.get(f"shared{i}") in {f"w{n}" for n in range(16)}


@pytest.mark.parametrize("pool", ["shared-queue", "work-stealing"])
def test_1000_idle_connections_do_not_block_a_new_client(tmp_path: Path, pool: str) -> None:
    with server_stack(tmp_path, pool=pool, threads=2) as server:
        addr = server.address
        idle: list[socket.socket] = []
        try:
            for i in range(1000):
                s = connect(addr)
                if i % 10 == 0:  # a tenth of them stall in the middle of a frame
                    s.sendall(encode_set("half", "sent")[: 5 + i % 7])
                idle.append(s)
            wait_for(lambda: server.connection_count() >= 1000, what="1000 accepted connections")
            with KvsClient(addr) as c:  # served at once although 1000 peers hold connections
                c.set("new", "client")
                assert c.get("new") == "client"
                with c.pipeline() as p:
                    for i in range(100):
                        p.set(f"k{i}", str(i)).get(f"k{i}")
                assert p.results() == [x for i in range(100) for x in (None, str(i))]
            # the idle ones are still open and still work
            for s in idle[1:50:7]:
                s.sendall(encode_ping(version=1))  # a version 1 client gets the version 1 PONG
                assert s.recv(64) == b"\xcc\x01\x03\x00\x00\x00\x00\x00"
        finally:
            for s in idle:
                s.close()
        wait_for(lambda: server.connection_count() == 0, what="the closed connections to be forgotten")


def test_large_responses_to_a_client_with_a_descriptor_above_1024(tmp_path: Path) -> None:
    """Both sides have more than FD_SETSIZE descriptors open: waits on a socket must not
    depend on select()."""
    value = "v" * (3 << 20)
    with server_stack(tmp_path, threads=2) as server:
        addr = server.address
        idle = [connect(addr) for _ in range(1100)]
        try:
            wait_for(lambda: server.connection_count() >= 1100, what="1100 accepted connections")
            # Every descriptor up to 1024 is taken, so the client's socket gets one above (its
            # number is > probe's, which stays open meanwhile).
            with socket.socket() as probe, KvsClient(addr) as c:
                assert probe.fileno() > 1024
                with c.pipeline() as p:
                    for i in range(4):
                        p.set(f"big{i}", value + str(i))
                    for i in range(4):
                        p.get(f"big{i}")
                assert p.results() == [None] * 4 + [value + str(i) for i in range(4)]
        finally:
            for s in idle:
                s.close()


# ------------------------------------------------------------------------------ pipelining


def test_1000_pipelined_requests_come_back_in_order(tmp_path: Path) -> None:
    rng = random.Random(1234)
    model: dict[str, str] = {}
    expected: list = []
    with server_stack(tmp_path) as server, KvsClient(server.address) as c:
        with c.pipeline() as p:
            for i in range(1000):
                key = f"key{rng.randrange(40)}"
                r = rng.random()
                if r < 0.4:
                    value = f"value {i} " + "x" * rng.randrange(200)
                    p.set(key, value)
                    model[key] = value
                    expected.append(None)
                elif r < 0.75:
                    p.get(key)
                    expected.append(model.get(key))
                elif r < 0.9:
                    p.remove(key)
                    expected.append(None if model.pop(key, None) is not None else KeyNotFoundError)
                else:
                    p.ping()
                    expected.append(None)
            assert len(p) == 1000
        results = p.results()
        assert len(results) == 1000
        for i, (got, want) in enumerate(zip(results, expected, strict=True)):
            if want is KeyNotFoundError:
                assert isinstance(got, KeyNotFoundError), f"request {i}: {got!r}"
            else:
                assert got == want, f"request {i}"
        # the connection is still in sync after the pipeline
        c.set("after", "pipeline")
        assert c.get("after") == "pipeline"
        for key, value in model.items():
            assert c.get(key) == value


def test_pipelined_raw_frames_in_one_send_and_byte_by_byte(tmp_path: Path) -> None:
    frames = [encode_set(f"k{i}", f"v{i}") for i in range(50)] + [encode_get(f"k{i}") for i in range(50)]
    stream = b"".join(frames)
    with server_stack(tmp_path) as server:
        for chunked in (False, True):
            s = connect(server.address)
            try:
                if chunked:
                    for i in range(len(stream)):
                        s.sendall(stream[i : i + 1])
                else:
                    s.sendall(stream)
                s.shutdown(socket.SHUT_WR)
                responses = ResponseDecoder().feed(read_until_closed(s))
            finally:
                s.close()
            assert [r.status for r in responses[:50]] == [Status.OK] * 50
            assert [r.value for r in responses[50:]] == [f"v{i}" for i in range(50)]


def test_requests_trickling_in_while_their_connection_is_served_are_never_lost(
        tmp_path: Path, io_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """16 clients send pipelined frames in random small pieces, so bytes keep arriving while
    a pool thread is serving their connection. Every response must come back, in order.
    In leader-followers (edge-triggered) this exercises the AGAIN hand-over: an event for a
    connection that is being served is recorded for its owner, never lost."""
    from kvs.server.connection import AGAIN, Connection

    again = [0]
    real_claim = Connection.claim

    def counting_claim(self: Connection, events: int = 0) -> bool:
        claimed = real_claim(self, events)
        if not claimed and self.state == AGAIN:
            again[0] += 1
        return claimed

    monkeypatch.setattr(Connection, "claim", counting_claim)

    def client(server: KvsServer, seed: int) -> None:
        rng = random.Random(seed)
        frames, expected = [], []
        for i in range(150):
            key = f"c{seed}-k{rng.randrange(10)}"
            if rng.random() < 0.5:
                value = f"{seed}:{i}:" + "v" * rng.randrange(60)
                frames.append(encode_set(key, value))
                expected.append((Status.OK, None))
                latest[key] = value
            else:
                frames.append(encode_get(key))
                expected.append((Status.VALUE, latest[key]) if key in latest else (Status.NOT_FOUND, None))
        stream = b"".join(frames)
        s = connect(server.address)
        try:
            pos = 0
            while pos < len(stream):
                n = rng.randrange(1, 64)
                s.sendall(stream[pos:pos + n])
                pos += n
            s.shutdown(socket.SHUT_WR)
            responses = ResponseDecoder().feed(read_until_closed(s))
        finally:
            s.close()
        assert [(r.status, r.value) for r in responses] == expected

    with server_stack(tmp_path, threads=2) as server:
        for attempt in range(3):
            latest: dict[str, str] = {}
            base = 100 * attempt
            run_threads([lambda seed=seed, base=base: client(server, base + seed) for seed in range(16)])
            if io_model == "dispatch" or again[0]:
                break
    if io_model == "leader-followers":
        assert again[0] > 0, "no event ever came for a connection being served: AGAIN not exercised"


def test_client_that_does_not_read_is_dropped_after_send_timeout(tmp_path: Path) -> None:
    with server_stack(tmp_path, threads=2, send_timeout=0.5) as server:
        with KvsClient(server.address) as c:
            c.set("big", "b" * (1 << 20))
        s = connect(server.address)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            wait_for(lambda: server.connection_count() == 1, what="the connection to be accepted")
            # 64 MiB of responses requested, none read: the server's sends block, then give up
            s.sendall(encode_get("big") * 64)
            wait_for(lambda: server.connection_count() == 0, what="the non-reading client to be dropped")
            server_answers(server.address, "big", "b" * (1 << 20))
        finally:
            s.close()


# ------------------------------------------------------------------------------ shutdown


def test_shutdown_with_requests_in_flight_answers_them(tmp_path: Path) -> None:
    n_clients = 16
    with opened_engine("kvs", tmp_path / "d") as engine, started_pool("shared-queue", 4) as pool:
        with serving(engine, pool) as server:
            addr = server.address
            acked: list[dict[str, str]] = [{} for _ in range(n_clients)]
            endings: list[BaseException | None] = [None] * n_clients
            progress = threading.Semaphore(0)

            def hammer(n: int) -> None:
                with KvsClient(addr, timeout=DEADLINE) as c:
                    try:
                        for i in range(10**9):
                            key, value = f"t{n}-{i}", f"value {n} {i}"
                            if i % 4 == 3:
                                with c.pipeline() as p:
                                    p.set(key, value).get(key).get(f"t{n}-{i - 1}")
                                got = p.results()
                                for r in got:
                                    if isinstance(r, KvsError):
                                        raise r
                                assert got == [None, value, f"value {n} {i - 1}"]
                            else:
                                c.set(key, value)
                                assert c.get(key) == value
                            acked[n][key] = value
                            progress.release()
                    except KvsError as exc:
                        endings[n] = exc

            threads = [threading.Thread(target=hammer, args=(n,), daemon=True) for n in range(n_clients)]
            for t in threads:
                t.start()
            for _ in range(n_clients * 20):  # let them get going
                assert progress.acquire(timeout=DEADLINE), "the clients made no progress"
            stopper = threading.Thread(target=server.shutdown, daemon=True)
            stopper.start()
            stopper.join(DEADLINE)
            assert not stopper.is_alive(), "shutdown() did not return"
            for t in threads:
                t.join(DEADLINE)
            assert not any(t.is_alive() for t in threads), "a client hung after shutdown"
            for n, exc in enumerate(endings):
                assert isinstance(exc, KvsError), f"client {n} ended with {exc!r}"
                assert "timed out" not in str(exc), f"client {n} waited for its timeout: {exc}"
            # a connection attempted after shutdown is refused or closed, not left pending
            try:
                late = socket.create_connection(addr, timeout=DEADLINE)
            except ConnectionRefusedError:
                pass
            else:
                with late:
                    late.sendall(encode_ping())
                    assert read_until_closed(late) == b""
        # every acknowledged write is in the engine (which shutdown leaves open)
        total = 0
        for n in range(n_clients):
            for key, value in acked[n].items():
                assert engine.get(key) == value
            total += len(acked[n])
        assert total >= n_clients * 20


@pytest.mark.parametrize("pool", ["shared-queue", "work-stealing", "executor"])
def test_repeated_shutdown_under_pipelined_load_always_returns(tmp_path: Path, pool: str) -> None:
    """Shutdown racing with workers that are re-arming their connections: serve_forever
    returns every time and every client ends with a KvsError."""
    with opened_engine("kvs", tmp_path / "d") as engine, started_pool(pool, 2) as p:
        for round_ in range(8):
            with serving(engine, p) as server:
                addr = server.address
                started = threading.Barrier(7)
                endings: list[BaseException | None] = [None] * 6

                def load(n: int, addr: tuple[str, int] = addr, started: threading.Barrier = started,
                         round_: int = round_, endings: list[BaseException | None] = endings) -> None:
                    with KvsClient(addr, timeout=DEADLINE) as c:
                        started.wait(DEADLINE)
                        try:
                            while True:
                                with c.pipeline() as pipe:
                                    for i in range(8):
                                        pipe.set(f"r{n}-{i}", str(round_)).get(f"r{n}-{i}")
                                results = pipe.results()
                                for r in results:
                                    if isinstance(r, KvsError):
                                        raise r
                                assert results == [None, str(round_)] * 8
                        except KvsError as exc:
                            endings[n] = exc

                threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(6)]
                for t in threads:
                    t.start()
                started.wait(DEADLINE)
                server.shutdown(timeout=DEADLINE)
                for t in threads:
                    t.join(DEADLINE)
                assert not any(t.is_alive() for t in threads)
                assert all(isinstance(e, KvsError) and "timed out" not in str(e) for e in endings), endings


def test_shutdown_from_a_pool_worker_thread_does_not_deadlock(tmp_path: Path) -> None:
    """shutdown() may be called from any thread; the I/O loop ends and serve_forever returns.
    (dispatch: in leader-followers the pool runs no other job while the server runs.)"""
    with opened_engine("kvs", tmp_path / "d") as engine, started_pool("shared-queue", 2) as pool:
        server = KvsServer(engine, pool, ("127.0.0.1", 0), io_model="dispatch")
        done = threading.Event()

        def run() -> None:
            server.serve_forever()
            done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            server_answers(server.address)
            pool.spawn(lambda: server.shutdown(timeout=DEADLINE))
            assert done.wait(DEADLINE), "serve_forever did not return"
        finally:
            server.shutdown(timeout=DEADLINE)
            t.join(DEADLINE)
            server.close()


def test_context_manager_closes_the_listener(tmp_path: Path) -> None:
    with opened_engine("kvs", tmp_path / "d") as engine, started_pool("shared-queue", 1) as pool:
        with KvsServer(engine, pool, ("127.0.0.1", 0)) as server:
            addr = server.address
        with pytest.raises(KvsError):
            KvsClient(addr, timeout=DEADLINE).ping()


# ------------------------------------------------------------------------------ limits


def test_max_connections_is_enforced_and_the_others_keep_working(tmp_path: Path) -> None:
    with server_stack(tmp_path, max_connections=3) as server:
        addr = server.address
        wait_for(lambda: server.connection_count() == 0, what="the start-up ping's connection to go")
        clients = [KvsClient(addr) for _ in range(3)]
        try:
            for i, c in enumerate(clients):
                c.set(f"k{i}", str(i))
            extra = connect(addr)
            with extra:
                extra.sendall(encode_ping())
                assert read_until_closed(extra) == b""  # accepted and closed, no response
            with pytest.raises(KvsError):
                with KvsClient(addr) as c4:
                    c4.ping()
            for i, c in enumerate(clients):
                assert c.get(f"k{i}") == str(i)
            clients[0].close()
            wait_for(lambda: server.connection_count() == 2, what="the closed connection to be forgotten")
            server_answers(addr, "k1", "1")  # a free slot again
        finally:
            for c in clients:
                c.close()


def test_half_sent_frame_is_closed_after_frame_timeout(tmp_path: Path) -> None:
    with server_stack(tmp_path, frame_timeout=0.5) as server:
        addr = server.address
        idle = KvsClient(addr)  # connected before, sends nothing: idle, not stalled
        stalled = connect(addr)
        try:
            idle.set("k", "v")
            frame = encode_set("key", "value", version=1)
            stalled.sendall(frame[:7])  # half a header
            assert read_until_closed(stalled) == b""
            # the idle connection has now been idle longer than frame_timeout: still served
            assert idle.get("k") == "v"
            # a frame completed in several pieces is answered
            slow = connect(addr)
            with slow:
                slow.sendall(frame[:3])
                slow.sendall(frame[3:14])
                slow.sendall(frame[14:])
                assert slow.recv(64) == b"\xcc\x01\x00\x00\x00\x00\x00\x00"
            # a half-sent body (header complete) is a stalled frame too
            body_stall = connect(addr)
            with body_stall:
                body_stall.sendall(frame[:13])
                assert read_until_closed(body_stall) == b""
            server_answers(addr, "key", "value")
        finally:
            idle.close()
            stalled.close()


def test_a_client_that_keeps_completing_requests_is_not_a_stall(tmp_path: Path) -> None:
    """A connection that is in mid-frame at every sweep but completes a request each time
    (its writes end halfway through the next one) is making progress: it outlives
    frame_timeout several times over."""
    with server_stack(tmp_path, frame_timeout=0.5) as server:
        frame = encode_set("key", "value", version=1)
        ok = b"\xcc\x01\x00\x00\x00\x00\x00\x00"
        with connect(server.address) as s:
            s.sendall(frame[:10])
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                time.sleep(0.2)
                s.sendall(frame[10:] + frame[:10])  # completes one request, starts the next
                assert s.recv(64) == ok
            s.sendall(frame[10:])
            assert s.recv(64) == ok


@pytest.mark.parametrize("first", [b"\x00", b"\xff", b"\x01\x02\x03", b"\xcc\x01", b"\x80garbage"])
def test_unknown_first_byte_is_closed_and_the_server_keeps_serving(tmp_path: Path, first: bytes) -> None:
    with server_stack(tmp_path) as server:
        s = connect(server.address)
        with s:
            s.sendall(first + b"\x00" * 20)
            assert read_until_closed(s) == b""
        server_answers(server.address)


def test_resp_looking_first_byte_is_closed_when_only_kvs_is_served(tmp_path: Path) -> None:
    with server_stack(tmp_path, protocols=["kvs"]) as server:
        s = connect(server.address)
        with s:
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            assert read_until_closed(s) == b""
        server_answers(server.address)


def test_bad_magic_after_valid_frames_answers_them_then_fatal(tmp_path: Path) -> None:
    with server_stack(tmp_path) as server:
        s = connect(server.address)
        with s:
            s.sendall(encode_set("a", "1") + encode_get("a") + b"\x00" * 12 + encode_ping())
            responses = ResponseDecoder().feed(read_until_closed(s))
        assert [r.status for r in responses] == [Status.OK, Status.VALUE, Status.FATAL]
        assert responses[1].value == "1"
        server_answers(server.address, "a", "1")


def test_huge_length_prefix_gets_fatal_without_the_body(tmp_path: Path) -> None:
    with server_stack(tmp_path) as server:
        s = connect(server.address)
        with s:
            s.sendall(struct.pack(">BBBBII", REQUEST_MAGIC, 1, 3, 0, 0xFFFFFFFF, 0xFFFFFFFF))
            responses = ResponseDecoder().feed(read_until_closed(s))
        assert [r.status for r in responses] == [Status.FATAL]
        assert "maximum frame size" in responses[0].value
        server_answers(server.address)


def test_stopped_reading_client_does_not_stop_the_others(tmp_path: Path) -> None:
    """A peer that closes without reading its responses costs only its own connection."""
    with server_stack(tmp_path, threads=2) as server:
        for _ in range(20):
            s = connect(server.address)
            s.sendall(encode_set("x", "y") * 100)
            s.close()
        server_answers(server.address, "x", "y")
        wait_for(lambda: server.connection_count() == 0, what="the abandoned connections to close")


class _EngineWrapper:
    """A ``KvsEngine`` passing every call to ``engine``; subclasses change one."""

    def __init__(self, engine: KvsEngine) -> None:
        self.engine = engine
        self.name = engine.name

    @property
    def fsync(self) -> FsyncPolicy:
        return self.engine.fsync

    def get(self, key: str) -> str | None:
        return self.engine.get(key)

    def set(self, key: str, value: str) -> None:
        self.engine.set(key, value)

    def set_many(self, items: Sequence[tuple[str, str]]) -> None:
        self.engine.set_many(items)

    def set_batch(self, items: Sequence[tuple[str, str]]) -> None:
        self.engine.set_batch(items)

    def remove(self, key: str) -> None:
        self.engine.remove(key)

    def __len__(self) -> int:
        return len(self.engine)

    def close(self) -> None:
        self.engine.close()


class _ShutdownOnGet(_EngineWrapper):
    """An engine that shuts the server down from inside a GET of ``"stop"``: on the pool
    thread serving the request (in leader-followers, a thread the server waits for)."""

    def __init__(self, engine: KvsEngine) -> None:
        super().__init__(engine)
        self.server: KvsServer | None = None

    def get(self, key: str) -> str | None:
        if key == "stop" and self.server is not None:
            self.server.shutdown(timeout=DEADLINE)
            return "stopping"
        return self.engine.get(key)


def test_shutdown_from_inside_a_request_returns(tmp_path: Path, io_model: str) -> None:
    with opened_engine("kvs", tmp_path / "d") as engine, started_pool("shared-queue", 2) as pool:
        wrapper = _ShutdownOnGet(engine)
        server = KvsServer(wrapper, pool, ("127.0.0.1", 0), io_model=io_model)
        wrapper.server = server
        done = threading.Event()
        t = threading.Thread(target=lambda: (server.serve_forever(), done.set()), daemon=True)
        t.start()
        try:
            with KvsClient(server.address, timeout=DEADLINE) as c:
                c.set("a", "1")
                assert c.get("stop") == "stopping"
            assert done.wait(DEADLINE), "serve_forever did not return"
        finally:
            server.shutdown(timeout=DEADLINE)
            t.join(DEADLINE)
            server.close()


# ------------------------------------------------------------------------------ scheduling


class _PolicyRecorder(_EngineWrapper):
    """An engine that records the scheduling policy of the thread running each GET."""

    def __init__(self, engine: KvsEngine) -> None:
        super().__init__(engine)
        self.policies: list[int] = []

    def get(self, key: str) -> str | None:
        self.policies.append(os.sched_getscheduler(0))
        return self.engine.get(key)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux-only")
@pytest.mark.parametrize("scheduling", SCHEDULING)
def test_connection_threads_serve_under_the_scheduling_mode_and_get_their_policy_back(
        tmp_path: Path, io_model: str, scheduling: str) -> None:
    expected = os.SCHED_BATCH if scheduling == "batch" and io_model == "leader-followers" else os.SCHED_OTHER
    with opened_engine("kvs", tmp_path / "d") as engine, started_pool("shared-queue", 2) as pool:
        recorder = _PolicyRecorder(engine)
        with serving(recorder, pool, scheduling=scheduling) as server:
            clients = [KvsClient(server.address, timeout=DEADLINE) for _ in range(4)]
            try:
                for i in range(50):
                    clients[i % 4].get(f"k{i}")
            finally:
                for c in clients:
                    c.close()
        assert len(recorder.policies) == 50
        assert set(recorder.policies) == {expected}
        # The server is gone: each pool thread runs a job under its own policy again.
        barrier = threading.Barrier(2, timeout=DEADLINE)
        seen: list[tuple[int, int]] = []

        def record_policy_of_this_pool_thread() -> None:
            barrier.wait()  # both jobs at once: one on each of the 2 pool threads
            seen.append((threading.get_ident(), os.sched_getscheduler(0)))

        for _ in range(2):
            pool.spawn(record_policy_of_this_pool_thread)
        wait_for(lambda: len(seen) == 2, what="a job on each pool thread")
        assert len({ident for ident, _policy in seen}) == 2
        assert [policy for _ident, policy in seen] == [os.SCHED_OTHER] * 2


def test_unknown_scheduling_mode_is_a_kvs_error(tmp_path: Path) -> None:
    with opened_engine("kvs", tmp_path / "d") as engine, started_pool("shared-queue", 1) as pool:
        with pytest.raises(KvsError, match="unknown scheduling mode 'fifo'"):
            KvsServer(engine, pool, ("127.0.0.1", 0), scheduling="fifo")


# ------------------------------------------------------------------------------ protocol version 1


def _v1_raw(op: int, key: bytes = b"", value: bytes = b"", flags: int = 0) -> bytes:
    """A version-1 request frame as bytes, malformed ones included."""
    return struct.pack(">BBBBII", REQUEST_MAGIC, 1, op, flags, len(key), len(value)) + key + value


def _exchange(addr: tuple[str, int], stream: bytes) -> bytes:
    """Everything the server answers to ``stream`` sent in one write, the write side then
    shut (the server answers it all and closes)."""
    with connect(addr) as s:
        s.sendall(stream)
        s.shutdown(socket.SHUT_WR)
        return read_until_closed(s)


# What kvs 0.1.0 (version 1 only) answered to _V1_SESSION, byte for byte: captured from the 0.1.0
# server (commit 281a1a9's kvs/) for this very stream.
_V1_SESSION = [
    (encode_set("k", "é", version=1), b"\xcc\x01\x00\x00\x00\x00\x00\x00"),
    (encode_set("", "", version=1), b"\xcc\x01\x00\x00\x00\x00\x00\x00"),  # three SETs: a pipelined run
    (encode_set("ключ", "значение", version=1), b"\xcc\x01\x00\x00\x00\x00\x00\x00"),
    (encode_get("k", version=1), b"\xcc\x01\x01\x00\x00\x00\x00\x02\xc3\xa9"),
    (encode_get("", version=1), b"\xcc\x01\x01\x00\x00\x00\x00\x00"),
    (encode_get("ключ", version=1), b"\xcc\x01\x01\x00\x00\x00\x00\x10" + "значение".encode()),
    (encode_get("missing", version=1), b"\xcc\x01\x02\x00\x00\x00\x00\x00"),
    (encode_remove("k", version=1), b"\xcc\x01\x00\x00\x00\x00\x00\x00"),
    (encode_remove("k", version=1), b"\xcc\x01\x02\x00\x00\x00\x00\x00"),
    (encode_ping(version=1), b"\xcc\x01\x03\x00\x00\x00\x00\x00"),
    (_v1_raw(9, b"k"), b"\xcc\x01\x04\x00\x00\x00\x00\x16unknown operation 0x09"),
    (_v1_raw(2, b"a", flags=1), b"\xcc\x01\x04\x00\x00\x00\x00\x27reserved flags byte must be 0, got 0x01"),
    (_v1_raw(2, b"a", flags=4), b"\xcc\x01\x04\x00\x00\x00\x00\x27reserved flags byte must be 0, got 0x04"),
    (_v1_raw(2, b"a", b"v"), b"\xcc\x01\x04\x00\x00\x00\x00\x12GET takes no value"),
    (_v1_raw(2, b"\xff"), b"\xcc\x01\x04\x00\x00\x00\x00\x16key is not valid UTF-8"),
    (_v1_raw(3, b"k", b"\xff"), b"\xcc\x01\x04\x00\x00\x00\x00\x18value is not valid UTF-8"),
    (encode_get("k", version=1), b"\xcc\x01\x02\x00\x00\x00\x00\x00"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("engine", ["kvs", "sqlite"])
def test_a_version_1_client_gets_the_0_1_0_replies_byte_for_byte(tmp_path: Path, engine: str) -> None:
    """A raw version-1 client (frames as 0.1.0 sent them) gets exactly the bytes 0.1.0 sent
    back: OK/VALUE/NOT_FOUND/PONG and the ERROR texts, all in version 1, whether the stream
    comes in one write (a pipelined SET run included) or one frame at a time."""
    stream = b"".join(frame for frame, _ in _V1_SESSION)
    expected = b"".join(reply for _, reply in _V1_SESSION)
    with server_stack(tmp_path, engine=engine) as server:
        assert _exchange(server.address, stream) == expected
        with connect(server.address) as s:  # request by request: each reply alone
            for frame, reply in _V1_SESSION:
                s.sendall(frame)
                got = b""
                while len(got) < len(reply):
                    chunk = s.recv(len(reply) - len(got))
                    assert chunk, "the server closed the connection"
                    got += chunk
                assert got == reply
        with KvsClient(server.address) as c:  # what version 1 stored, version 2 reads as text
            assert c.get("ключ") == "значение" and c.get("") == "" and c.get("k") is None


def test_version_1_fatal_is_answered_in_version_1_after_the_replies(tmp_path: Path) -> None:
    """A version-1 stream that cannot be framed (an unknown version byte) gets its earlier
    replies, then one version-1 FATAL, then the close."""
    with server_stack(tmp_path) as server:
        got = _exchange(server.address, encode_ping(version=1) + b"\xcb\x03" + b"\x00" * 10)
        fatal = b"unsupported protocol version 3 (this side speaks versions 1 and 2)"
        assert got == b"\xcc\x01\x03\x00\x00\x00\x00\x00" + b"\xcc\x01\x05\x00" + struct.pack(">I", len(fatal)) + fatal
        got = _exchange(server.address, encode_ping() + b"\x00" * 12)  # after a version-2 frame: still version 1
        assert got[:12] == b"\xcc\x02\x03\x00\x00\x00\x00\x00\xcc\x01\x05\x00"
        server_answers(server.address)


@pytest.mark.parametrize("engine", ["kvs", "sqlite"])
def test_version_1_get_of_a_bytes_value_gets_its_text_or_an_error(tmp_path: Path, engine: str) -> None:
    """Values stored as bytes (version 2, RESP): a version-1 GET gets the text that UTF-8
    bytes encode, and for other bytes one ERROR saying why; the connection goes on."""
    with server_stack(tmp_path, engine=engine) as server, KvsClient(server.address) as c:
        c.set("utf8", "café".encode())
        c.set(b"caf\xc3\xa9", b"\xff\x00binary")  # the bytes key of the text key "café"
        c.set("empty", b"")
        with connect(server.address) as s:
            s.sendall(encode_get("utf8", version=1) + encode_get("café", version=1) + encode_get("empty", version=1)
                      + encode_ping(version=1))
            responses = ResponseDecoder().feed(_recv_frames(s, 4))
        assert [r.status for r in responses] == [Status.VALUE, Status.ERROR, Status.VALUE, Status.PONG]
        assert responses[0].value == "café" and responses[2].value == ""
        message = responses[1].value
        assert isinstance(message, str) and "\n" not in message
        assert "not valid UTF-8" in message and "version 2" in message
        got = _exchange(server.address, encode_get("utf8", version=1) + encode_get("café", version=1))
        assert got.startswith(b"\xcc\x01\x01\x00\x00\x00\x00\x05caf\xc3\xa9\xcc\x01\x04\x00")  # version 1, both
        assert c.get("café") == b"\xff\x00binary"  # the value itself is untouched; version 2 reads it
        assert c.get("utf8") == "café".encode()


def _recv_frames(s: socket.socket, count: int) -> bytes:
    """The bytes of the next ``count`` response frames on ``s``."""
    data = b""
    pos = 0
    for _ in range(count):
        while len(data) < pos + 8:
            data += _recv_some(s)
        end = pos + 8 + struct.unpack_from(">I", data, pos + 4)[0]
        while len(data) < end:
            data += _recv_some(s)
        pos = end
    assert len(data) == pos, "more bytes than the frames expected"
    return data


def _recv_some(s: socket.socket) -> bytes:
    chunk = s.recv(65536)
    assert chunk, "the server closed the connection"
    return chunk


def test_version_1_and_2_frames_interleaved_are_each_answered_in_their_version(tmp_path: Path) -> None:
    """On one connection, each request's reply has its frame's version, in request order:
    the set_many run of mixed-version SETs, TTL SETs, bytes, errors and all."""
    v2_bad = struct.pack(">BBBBII", REQUEST_MAGIC, 2, Op.GET, FLAG_TTL, 1, 0) + struct.pack(">Q", 5) + b"k"
    session = [
        (encode_set("a", "1", version=1), b"\xcc\x01\x00\x00\x00\x00\x00\x00"),
        (encode_set("b", b"\x00\xff"), b"\xcc\x02\x00\x00\x00\x00\x00\x00"),
        (encode_set("c", "3", version=1), b"\xcc\x01\x00\x00\x00\x00\x00\x00"),
        (encode_set("t", "ttl", ttl_ms=600_000), b"\xcc\x02\x00\x00\x00\x00\x00\x00"),
        (encode_set("u", "4", version=1), b"\xcc\x01\x00\x00\x00\x00\x00\x00"),
        (encode_get("a"), b"\xcc\x02\x01\x00\x00\x00\x00\x011"),
        (encode_get("a", version=1), b"\xcc\x01\x01\x00\x00\x00\x00\x011"),
        (encode_get("b"), b"\xcc\x02\x01\x02\x00\x00\x00\x02\x00\xff"),
        (encode_get("t", version=1), b"\xcc\x01\x01\x00\x00\x00\x00\x03ttl"),
        (encode_get(b"u"), b"\xcc\x02\x01\x00\x00\x00\x00\x014"),  # a bytes key finds the text key's value
        (encode_ping(version=1), b"\xcc\x01\x03\x00\x00\x00\x00\x00"),
        (encode_ping(), b"\xcc\x02\x03\x00\x00\x00\x00\x00"),
        (_v1_raw(9), b"\xcc\x01\x04\x00\x00\x00\x00\x16unknown operation 0x09"),
        (v2_bad, b"\xcc\x02\x04\x00\x00\x00\x00\x10GET takes no TTL"),
        (encode_remove("missing", version=1), b"\xcc\x01\x02\x00\x00\x00\x00\x00"),
        (encode_remove("missing"), b"\xcc\x02\x02\x00\x00\x00\x00\x00"),
        (encode_remove("a", version=1), b"\xcc\x01\x00\x00\x00\x00\x00\x00"),
        (encode_get("a"), b"\xcc\x02\x02\x00\x00\x00\x00\x00"),
    ]
    stream = b"".join(frame for frame, _ in session)
    with server_stack(tmp_path) as server:
        assert _exchange(server.address, stream) == b"".join(reply for _, reply in session)
        with KvsClient(server.address) as c:  # the TTL SET stored its TTL
            assert c.get("t") == "ttl" and c.get("a") is None


def test_a_version_2_client_against_a_0_1_0_server_gets_a_kvs_error_saying_so(tmp_path: Path) -> None:
    """kvs 0.1.0 answers a version-2 frame with this version-1 FATAL (captured from it) and
    closes: the client raises one KvsError that names the cause."""
    fatal_0_1_0 = b"\xcc\x01\x05\x00\x00\x00\x00\x3bunsupported protocol version 2 (this side speaks version 1)"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        addr = listener.getsockname()

        def old_server() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(DEADLINE)
                conn.recv(1024)
                conn.sendall(fatal_0_1_0)

        t = threading.Thread(target=old_server, daemon=True)
        t.start()
        with KvsClient(addr, timeout=DEADLINE) as c, pytest.raises(KvsError) as info:
            c.get("k")
        t.join(DEADLINE)
    assert str(info.value) == ("the server speaks only protocol version 1 (kvs 0.1.0): "
                               "unsupported protocol version 2 (this side speaks version 1)")

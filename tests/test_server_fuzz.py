"""Fuzzing a live server: random bytes and mutated valid frames (flipped bytes, truncation,
concatenation, absurd lengths, bad UTF-8, ...) on fresh and reused connections, fixed seeds.

Against a server speaking only our protocol the outcome of every case is predicted exactly
by a model (kvs.protocol's RequestDecoder fed the same bytes, plus a dict for the store,
keyed by the keys' bytes, holding each value as the type it was written with; frames of
both protocol versions, each answered in its own version):
the responses must be exactly the model's, byte for byte, and the server must close the
connection exactly when the model says (FATAL, or EOF). After every case a fresh client must
get PONG and the right value for a sentinel key. Against the default server (kvs + RESP) the
cases only have to leave the server healthy.
"""

from __future__ import annotations

import random
import socket
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvs.client import KvsClient
from kvs.errors import KvsError
from kvs.protocol import (
    REQUEST_HEADER_SIZE,
    REQUEST_MAGIC,
    FrameError,
    Op,
    ProtocolError,
    Request,
    RequestDecoder,
    ResponseDecoder,
    Status,
    encode_error,
    encode_fatal,
    encode_get,
    encode_not_found,
    encode_ok,
    encode_ping,
    encode_pong,
    encode_remove,
    encode_set,
    encode_value,
)
from tests.helpers import run_threads
from tests.netutil import DEADLINE, connect, read_until_closed, server_stack

SENTINEL_KEY, SENTINEL_VALUE = "fuzz-sentinel", "still here ✓"
MAX_KEY, MAX_VALUE = 1024, 64 * 1024  # small limits: over-limit frames are cheap to make


# ------------------------------------------------------------------------------ model


class Model:
    """What the server must answer on one connection, given the bytes sent so far."""

    def __init__(self, store: dict[bytes, str | bytes]) -> None:
        self.store = store
        self.decoder = RequestDecoder(max_key_bytes=MAX_KEY, max_value_bytes=MAX_VALUE)
        self.first_byte: int | None = None
        self.closed = False  # the server closes (or has closed) this connection

    def feed(self, data: bytes) -> bytes:
        """The exact response bytes the server sends for ``data``."""
        if self.closed or not data:
            return b""
        if self.first_byte is None:
            self.first_byte = data[0]
            if data[0] != REQUEST_MAGIC:  # not our protocol: closed without a word
                self.closed = True
                return b""
        try:
            items = self.decoder.feed(data)
        except ProtocolError as exc:
            self.closed = True
            return self.execute(exc.preceding) + encode_fatal(str(exc))
        return self.execute(items)

    def execute(self, items: list) -> bytes:
        out = []
        for req in items:
            if type(req) is FrameError:
                out.append(encode_error(str(req), version=req.version))
                continue
            version = req.version
            key = req.key.encode() if isinstance(req.key, str) else req.key
            if req.op == Op.SET:  # a TTL is far in the future (see predictable): a plain SET here
                self.store[key] = req.value
                out.append(encode_ok(version=version))
            elif req.op == Op.GET:
                value = self.store.get(key)
                try:
                    out.append(encode_not_found(version=version) if value is None
                               else encode_value(value, version=version))
                except KvsError as exc:  # bytes that are not text, to a version 1 GET
                    out.append(encode_error(str(exc), version=version))
            elif req.op == Op.REMOVE:
                found = self.store.pop(key, None) is not None
                out.append(encode_ok(version=version) if found else encode_not_found(version=version))
            else:
                out.append(encode_pong(version=version))
        return b"".join(out)

    @property
    def pending(self) -> bool:
        return self.decoder.in_frame


TTL_RANGE = (10**9, 10**12)
"""TTLs (ms) the model treats as "never within the test": a SET with another TTL (a
mutation may make any) expires too soon, or is refused by the engine with a message of its
own, so cases containing one are drawn again."""


def predictable(payload: bytes) -> bool:
    """Whether every SET in ``payload`` has no TTL or one in TTL_RANGE (decoded from a fresh
    decoder: a connection is only reused with no frame half received)."""
    try:
        items = RequestDecoder(max_key_bytes=MAX_KEY, max_value_bytes=MAX_VALUE).feed(payload)
    except ProtocolError as exc:
        items = exc.preceding
    return all(type(r) is not Request or r.ttl_ms is None or TTL_RANGE[0] <= r.ttl_ms <= TTL_RANGE[1]
               for r in items)


# ------------------------------------------------------------------------------ case generation

KEYS: list[str | bytes] = ["a", "key1", "ключ", "", "k" * 300, "emoji 🎉", "x\x00y", b"a", b"\xff\x00", b"bin\x80"]
VALUES: list[str | bytes] = ["v", "", "значение", b"\xff\xfe", b"", b"\x00v", "ok".encode()]



pytestmark = pytest.mark.usefixtures("io_model")  # every server test runs in both I/O models

def valid_frame(rng: random.Random) -> bytes:
    key = rng.choice(KEYS)
    version = 1 if isinstance(key, str) and rng.random() < 0.3 else 2
    r = rng.random()
    if r < 0.35:
        value = rng.choice(VALUES + ["z" * rng.randrange(2000)])
        if version == 1 and not isinstance(value, str):
            value = value.decode(errors="replace")
        ttl = rng.choice([None, None, TTL_RANGE[0], TTL_RANGE[1]]) if version == 2 else None
        return encode_set(key, value, ttl_ms=ttl, version=version)
    if r < 0.7:
        return encode_get(key, version=version)
    if r < 0.85:
        return encode_remove(key, version=version)
    return encode_ping(version=version)


def valid_stream(rng: random.Random) -> bytes:
    return b"".join(valid_frame(rng) for _ in range(rng.randint(1, 8)))


def absurd_length(rng: random.Random) -> int:
    return rng.choice([0xFFFFFFFF, 0x80000000, MAX_KEY + MAX_VALUE + 1, MAX_KEY + 1, MAX_VALUE + 1,
                       rng.randrange(1 << 32), rng.randrange(1, 5000)])


def mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        kind = rng.randrange(10)
        if kind == 0 and buf:  # flip bytes
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(len(buf))
                buf[i] = rng.randrange(256)
        elif kind == 1 and buf:  # truncate
            del buf[rng.randrange(len(buf) + 1):]
        elif kind == 2:  # concatenate another (possibly mutated) stream
            other = valid_stream(rng)
            buf += mutate(rng, other) if rng.random() < 0.3 else other
        elif kind == 3 and len(buf) >= REQUEST_HEADER_SIZE:  # absurd key or value length
            struct.pack_into(">I", buf, rng.choice([4, 8]), absurd_length(rng))
        elif kind == 4 and len(buf) >= 4:  # another op, flags or version
            buf[rng.choice([1, 2, 3])] = rng.choice([0, 2, 5, 0x7F, 0xFF, rng.randrange(256)])
        elif kind == 5:  # insert random bytes
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 20))
        elif kind == 6 and buf:  # delete a range
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 30)]
        elif kind == 7 and len(buf) > REQUEST_HEADER_SIZE:  # invalid UTF-8 in the body
            buf[rng.randrange(REQUEST_HEADER_SIZE, len(buf))] = rng.choice([0xFF, 0xC0, 0x80, 0xED])
        elif kind == 8:  # repeat the whole thing
            buf *= rng.randint(2, 4)
        else:  # a lone header announcing a body that never comes (legal or not)
            buf += struct.pack(">BBBBII", REQUEST_MAGIC, rng.choice([1, 2]), rng.choice([2, 3, 4]), 0,
                               rng.randrange(64), absurd_length(rng))
    return bytes(buf)


def random_bytes(rng: random.Random) -> bytes:
    data = rng.randbytes(rng.choice([1, 2, 11, 12, 13, rng.randrange(1, 3000)]))
    if rng.random() < 0.5:  # a valid start, so the bytes get past the first-byte check
        data = bytes([REQUEST_MAGIC, rng.choice([1, 2])]) + data
    return data


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture
def kvs_only_server(tmp_path: Path) -> Iterator[tuple[str, int]]:
    """A fresh server (and store) per test: the model starts from an empty store."""
    with server_stack(tmp_path, threads=2, protocols=["kvs"], max_key_bytes=MAX_KEY,
                      max_value_bytes=MAX_VALUE, frame_timeout=5.0) as server:
        with KvsClient(server.address) as c:
            c.set(SENTINEL_KEY, SENTINEL_VALUE)
        yield server.address


@pytest.fixture(scope="module")
def default_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    tmp = tmp_path_factory.mktemp("fuzz-default")
    with server_stack(tmp, threads=2, frame_timeout=5.0) as server:
        with KvsClient(server.address) as c:
            c.set(SENTINEL_KEY, SENTINEL_VALUE)
        yield server.address


def assert_healthy(addr: tuple[str, int], store: dict[bytes, str | bytes] | None = None) -> None:
    with KvsClient(addr, timeout=DEADLINE) as c:
        c.ping()
        assert c.get(SENTINEL_KEY) == SENTINEL_VALUE
        if store:
            key = next(iter(store))
            assert c.get(key) == store[key]


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """Send ``data``; False if the server already closed (it may close on a FATAL early)."""
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def read_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    sock.settimeout(DEADLINE)
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        assert chunk, f"connection closed after {len(buf)} of {n} expected response bytes"
        buf += chunk
    return bytes(buf)


def check_responses(got: bytes, expected: bytes, case: str) -> None:
    if got != expected:
        got_r = ResponseDecoder().feed(got) if got else []
        want_r = ResponseDecoder().feed(expected) if expected else []
        pytest.fail(f"{case}: responses differ\n got:  {got_r[:10]}\n want: {want_r[:10]}")


# ------------------------------------------------------------------------------ the fuzzers


def run_modelled_cases(addr: tuple[str, int], seed: int, cases: int, make) -> None:
    rng = random.Random(seed)
    store: dict[bytes, str | bytes] = {SENTINEL_KEY.encode(): SENTINEL_VALUE}
    kept: tuple[socket.socket, Model] | None = None
    try:
        for case in range(cases):
            name = f"seed {seed} case {case}"
            payload = make(rng)
            while not predictable(payload):
                payload = make(rng)
            if kept is not None and rng.random() < 0.6:
                sock, model = kept
                kept = None
            else:
                sock, model = connect(addr), Model(store)
            try:
                expected = model.feed(payload)
                sent = send_quietly(sock, payload)
                if not model.closed and not model.pending and rng.random() < 0.3:
                    # keep the connection for a later case: read exactly what is due
                    check_responses(read_exactly(sock, len(expected)), expected, name)
                    kept, sock = (sock, model), None
                else:
                    if sent:
                        try:
                            sock.shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                    got = read_until_closed(sock)
                    check_responses(got, expected, name)
            finally:
                if sock is not None:
                    sock.close()
            assert_healthy(addr, store if case % 10 == 0 else None)
    finally:
        if kept is not None:
            kept[0].close()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_mutated_frames_are_answered_exactly_as_the_model_says(kvs_only_server, seed: int) -> None:
    run_modelled_cases(kvs_only_server, seed, 150, lambda rng: mutate(rng, valid_stream(rng)))


@pytest.mark.parametrize("seed", [11, 12])
def test_random_bytes_are_answered_exactly_as_the_model_says(kvs_only_server, seed: int) -> None:
    run_modelled_cases(kvs_only_server, seed, 150, random_bytes)


@pytest.mark.parametrize("seed", [21, 22])
def test_random_and_mutated_bytes_leave_the_default_server_healthy(default_server, seed: int) -> None:
    """kvs + RESP: a RESP-looking first byte goes to the RESP session. Only health is
    checked, plus: the server closes the connection once we stop sending (EOF), and what it
    sends on a kvs connection is well-formed responses with FATAL only as the last one."""
    rng = random.Random(seed)
    for case in range(150):
        if rng.random() < 0.5:
            payload = mutate(rng, valid_stream(rng))
        else:
            payload = rng.randbytes(rng.randrange(1, 3000))
            if rng.random() < 0.3:
                payload = rng.choice([b"*", b"$", b"GET ", b"*2\r\n$3\r\nGET\r\n$"]) + payload
        sock = connect(default_server)
        try:
            if send_quietly(sock, payload):
                sock.shutdown(socket.SHUT_WR)
            got = read_until_closed(sock)
        finally:
            sock.close()
        if payload[:1] == bytes([REQUEST_MAGIC]) and got:
            responses = ResponseDecoder(max_value_bytes=MAX_VALUE * 1024).feed(got)
            assert all(type(r) is not ProtocolError for r in responses), f"case {case}: {responses}"
            assert all(r.status != Status.FATAL for r in responses[:-1]), f"case {case}"
        assert_healthy(default_server)


def test_concurrent_fuzzers_leave_the_server_healthy(default_server) -> None:
    def fuzzer(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(40):
            payload = mutate(rng, valid_stream(rng)) if rng.random() < 0.7 else random_bytes(rng)
            sock = connect(default_server)
            try:
                if send_quietly(sock, payload):
                    sock.shutdown(socket.SHUT_WR)
                read_until_closed(sock)
            finally:
                sock.close()

    run_threads([lambda seed=100 + i: fuzzer(seed) for i in range(6)])
    assert_healthy(default_server)


# ------------------------------------------------------------------------------ absurd lengths


@pytest.mark.parametrize("klen,vlen", [(0xFFFFFFFF, 0xFFFFFFFF), (0, 0xFFFFFFFF), (0x7FFFFFFF, 0),
                                       (64 << 10, (16 << 20) + 1)])
def test_absurd_length_prefix_gets_fatal_without_allocating_the_body(tmp_path: Path, klen: int, vlen: int) -> None:
    """The header alone is enough for the verdict: FATAL arrives and the connection closes
    although not one byte of the announced body was sent, and the server allocated nothing
    near the announced size."""
    with server_stack(tmp_path, threads=2) as server:  # default limits: 64 KiB keys, 16 MiB values
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            s = connect(server.address)
            with s:
                s.sendall(struct.pack(">BBBBII", REQUEST_MAGIC, 1, Op.SET, 0, klen, vlen))
                got = read_until_closed(s)  # no body sent: the server must not wait for it
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        responses = ResponseDecoder().feed(got)
        assert [r.status for r in responses] == [Status.FATAL]
        assert "maximum frame size" in responses[0].value
        assert peak < 4 << 20, f"peak traced allocation {peak} bytes"
        with KvsClient(server.address) as c:
            c.ping()


def test_legal_but_large_announced_body_is_not_preallocated(tmp_path: Path) -> None:
    """A header announcing a 16 MiB value followed by a few bytes: the server buffers what
    arrived, not what was announced, and drops the connection after frame_timeout."""
    with server_stack(tmp_path, threads=2, frame_timeout=0.5) as server:
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            s = connect(server.address)
            with s:
                s.sendall(struct.pack(">BBBBII", REQUEST_MAGIC, 1, Op.SET, 0, 3, 16 << 20) + b"key" + b"v" * 100)
                got = read_until_closed(s)  # closed by the half-sent frame timeout
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert got == b""
        assert peak < 4 << 20, f"peak traced allocation {peak} bytes"
        with KvsClient(server.address) as c:
            c.ping()

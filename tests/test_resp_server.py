"""kvs-server speaks RESP2 too: redis-py, redis-cli and redis-benchmark work against it,
on the same port as our own protocol."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvs import KvsClient, KvsError, KvStore
from kvs.resp import RespReplyDecoder, command
from kvs.server import KvsServer
from kvs.server.server import IO_MODELS
from kvs.thread_pool import SharedQueueThreadPool
from tests.netutil import session_facts

BIN = Path(sys.executable).parent
_MISSING = "(Debian redis-tools) is not installed; scripts/test installs it as root"
needs_redis_cli = pytest.mark.skipif(shutil.which("redis-cli") is None, reason=f"redis-cli {_MISSING}")
needs_redis_benchmark = pytest.mark.skipif(shutil.which("redis-benchmark") is None,
                                           reason=f"redis-benchmark {_MISSING}")


class RunningServer:
    def __init__(self, tmp_path: Path, protocols: tuple[str, ...] = ("kvs", "resp"),
                 io_model: str = IO_MODELS[0]) -> None:
        self.engine = KvStore.open(tmp_path / "data")
        self.pool = SharedQueueThreadPool(4)
        self.server = KvsServer(self.engine, self.pool, ("127.0.0.1", 0), protocols=protocols, io_model=io_model)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.host, self.port = self.server.address

    def stop(self) -> None:
        self.server.close()
        self.thread.join(timeout=30)
        self.pool.shutdown()
        self.engine.close()


@pytest.fixture(params=IO_MODELS)
def server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    s = RunningServer(tmp_path, io_model=request.param)
    try:
        yield s
    finally:
        s.stop()


def raw_exchange(port: int, payload: bytes, replies: int) -> list:
    """Send raw RESP bytes, return ``replies`` decoded replies."""
    decoder = RespReplyDecoder()
    out: list = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        while len(out) < replies:
            chunk = sock.recv(65536)
            if not chunk:
                break
            out += decoder.feed(chunk)
    return out


def test_redis_py_set_get_delete_exists(server: RunningServer) -> None:
    r = redis.Redis(host=server.host, port=server.port, socket_timeout=10)
    try:
        assert r.ping() is True
        assert r.set("greeting", "héllo") is True
        assert r.get("greeting") == "héllo".encode()
        assert r.get("missing") is None
        assert r.exists("greeting", "missing", "greeting") == 2
        assert r.delete("greeting", "missing") == 1
        assert r.get("greeting") is None
        assert r.echo("abc") == b"abc"
    finally:
        r.close()


def test_redis_py_pipeline_keeps_order(server: RunningServer) -> None:
    r = redis.Redis(host=server.host, port=server.port, socket_timeout=10)
    try:
        pipe = r.pipeline(transaction=False)
        for i in range(200):
            pipe.set(f"k{i}", f"v{i}")
        for i in range(200):
            pipe.get(f"k{i}")
        results = pipe.execute()
        assert results[:200] == [True] * 200
        assert results[200:] == [f"v{i}".encode() for i in range(200)]
    finally:
        r.close()


def test_set_options_are_refused_not_ignored(server: RunningServer) -> None:
    r = redis.Redis(host=server.host, port=server.port, socket_timeout=10)
    try:
        with pytest.raises(redis.ResponseError, match="unsupported option"):
            r.set("k", "v", ex=10)
        assert r.get("k") is None
        with pytest.raises(redis.ResponseError, match="unknown command"):
            r.execute_command("LPUSH", "list", "x")
        with pytest.raises(redis.ResponseError, match="wrong number of arguments"):
            r.execute_command("GET")
    finally:
        r.close()


def test_binary_keys_and_values_are_stored_as_the_bytes_sent(server: RunningServer) -> None:
    """No UTF-8 refusal: any bytes are a key or a value, read back exactly, and stored as
    bytes (what a library user of the same store then gets)."""
    replies = raw_exchange(server.port, command("SET", b"k\xff", "v") + command("SET", "k", b"\xfe\x00\xfe")
                           + command("GET", b"k\xff") + command("GET", "k") + command("EXISTS", "k", b"k\xff")
                           + command("DEL", b"k\xff") + command("GET", b"k\xff"), 7)
    assert replies == ["OK", "OK", b"v", b"\xfe\x00\xfe", 2, 1, None]
    assert server.engine.get("k") == b"\xfe\x00\xfe"
    assert server.engine.get(b"k\xff") is None


def test_redis_py_pickle_round_trip(server: RunningServer) -> None:
    import pickle

    obj = {"nested": [1, 2.5, None, b"\x00\xff"], "text": "é", "big": list(range(1000))}
    blob = pickle.dumps(obj)
    r = redis.Redis(host=server.host, port=server.port, socket_timeout=10)
    try:
        assert r.set("p", blob) is True
        assert r.get("p") == blob
        assert pickle.loads(r.get("p")) == obj
        pipe = r.pipeline(transaction=False)  # a pipelined run of SETs: one set_many
        for i in range(20):
            pipe.set(f"p{i}", pickle.dumps((i, b"\xff" * i)))
        pipe.execute()
        assert [pickle.loads(r.get(f"p{i}")) for i in range(20)] == [(i, b"\xff" * i) for i in range(20)]
    finally:
        r.close()
    assert server.engine.get("p") == blob


def test_text_and_bytes_written_over_the_kvs_protocol_read_over_resp(server: RunningServer) -> None:
    """A str value is its UTF-8 bytes to RESP; a bytes value its bytes; a str key and its
    UTF-8 bytes are one key."""
    with KvsClient((server.host, server.port)) as c:
        c.set("text", "héllo ✓")
        c.set(b"bin\xff", b"\x00\x01\xff")
        c.set("caf\u00e9", "v")
    replies = raw_exchange(server.port, command("GET", "text") + command("GET", b"bin\xff")
                           + command("GET", "café".encode()), 3)
    assert replies == ["héllo ✓".encode(), b"\x00\x01\xff", b"v"]
    raw_exchange(server.port, command("SET", "from-resp", b"\xff\x00"), 1)
    with KvsClient((server.host, server.port)) as c:
        assert c.get("from-resp") == b"\xff\x00" and c.get(b"from-resp") == b"\xff\x00"


def test_inline_commands_and_quit(server: RunningServer) -> None:
    replies = raw_exchange(server.port, b"SET inline value\r\nGET inline\r\nPING\r\nQUIT\r\nGET inline\r\n", 4)
    assert replies == ["OK", b"value", "PONG", "OK"]


def test_protocol_error_closes_only_that_connection(server: RunningServer) -> None:
    replies = raw_exchange(server.port, b"*1\r\n$99999999999\r\n", 1)
    assert "Protocol error" in str(replies[0])
    with KvsClient((server.host, server.port)) as c:  # our protocol on the same port still works
        c.set("after", "ok")
        assert c.get("after") == "ok"


def test_info_reports_the_server_section(server: RunningServer) -> None:
    server.engine.set("a", "1")
    r = redis.Redis(host=server.host, port=server.port, socket_timeout=10)
    try:
        info = r.info("server")
        assert info["engine"] == "kvs" and info["pool"] == "shared-queue" and info["threads"] == 4
        for field in ("kvs_version", "uptime_in_seconds", "connected_clients", "total_commands_processed", "keys"):
            assert field in info
        assert info["keys"] == 1
        assert r.config_get("appendonly") == {"appendonly": "no"}
    finally:
        r.close()


@needs_redis_cli
def test_redis_cli_round_trip(server: RunningServer) -> None:
    def cli(*args: str) -> str:
        out = subprocess.run(["redis-cli", "-h", server.host, "-p", str(server.port), *args],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    assert cli("PING") == "PONG"
    assert cli("SET", "cli-key", "cli value") == "OK"
    assert cli("GET", "cli-key") == "cli value"
    assert cli("DEL", "cli-key", "nope") == "1"
    assert cli("GET", "cli-key") == ""
    assert "unknown command" in cli("HSET", "h", "f", "v")


@needs_redis_benchmark
def test_redis_benchmark_completes_without_errors(server: RunningServer) -> None:
    out = subprocess.run(["redis-benchmark", "-h", server.host, "-p", str(server.port), "-t", "set,get",
                          "-n", "20000", "-q", "-P", "16"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "SET:" in text and "GET:" in text and "requests per second" in text
    assert "error" not in text.lower()


def test_value_written_over_resp_is_read_with_kvs_client_and_back(server: RunningServer) -> None:
    r = redis.Redis(host=server.host, port=server.port, socket_timeout=10)
    addr = f"{server.host}:{server.port}"
    try:
        r.set("mixed", "from resp")
        out = subprocess.run([str(BIN / "kvs-client"), "get", "mixed", "--addr", addr],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and out.stdout == "from resp"  # stored as bytes: written unchanged
        out = subprocess.run([str(BIN / "kvs-client"), "set", "mixed", "from kvs-client", "--addr", addr],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0
        assert r.get("mixed") == b"from kvs-client"
    finally:
        r.close()


def test_protocols_can_be_turned_off(tmp_path: Path) -> None:
    only_kvs = RunningServer(tmp_path / "a", protocols=("kvs",))
    try:
        r = redis.Redis(host=only_kvs.host, port=only_kvs.port, socket_timeout=10)
        with pytest.raises(redis.ConnectionError):
            r.ping()
        r.close()
        with KvsClient((only_kvs.host, only_kvs.port)) as c:
            c.ping()
    finally:
        only_kvs.stop()
    only_resp = RunningServer(tmp_path / "b", protocols=("resp",))
    try:
        with pytest.raises(KvsError):
            with KvsClient((only_resp.host, only_resp.port)) as c:
                c.ping()
        r = redis.Redis(host=only_resp.host, port=only_resp.port, socket_timeout=10)
        assert r.ping() is True
        r.close()
    finally:
        only_resp.stop()


def test_one_whole_get_or_set_is_answered_exactly_as_by_the_general_path(tmp_path: Path) -> None:
    """RespSession.handle answers one whole GET or SET itself (no feed, no batch, no loop):
    its replies, its command count and what it stores are those of the general path, for
    hits, misses, case variants, binary (non-UTF-8) and over-limit arguments, options and a
    closed store."""
    from kvs.resp import RespDecoder
    from kvs.server.resp_session import RespSession

    engine = KvStore.open(tmp_path / "data", max_key_bytes=16, max_value_bytes=32)
    facts = session_facts(max_key_bytes=16, max_value_bytes=32)
    fast, general = RespSession(engine, "fast", facts), RespSession(engine, "general", facts)
    cases = [command("SET", "k", "v"), command("GET", "k"), command("get", "k"), command("GET", "missing"),
             command("Get", "k"), command("set", "k", "w"), command("GET", "k"), command("SET", b"k\xff", "v"),
             command("SET", "k", b"\xfe"), command("GET", b"\xff"), command("SET", "k" * 17, "v"),
             command("SET", "k", "v" * 33), command("GET", "k" * 17), command("ECHO", "hi"),
             command("SET", "k", "v", "NX"), command("SET", "", ""), command("GET", "")]
    for data in cases:
        assert fast.decoder.parse_single(data) is not None or data.startswith(b"*4")
        want = general.execute(RespDecoder().feed(data))
        assert fast.handle(data) == want, data
    assert fast.commands == general.commands == len(cases)
    assert engine.get("k") == b"\xfe" and engine.get("") == b"" and engine.get(b"k\xff") == b"v"
    engine.close()
    for data in (command("GET", "k"), command("SET", "k", "v")):
        want = general.execute(RespDecoder().feed(data))
        assert want.startswith(b"-ERR") and fast.handle(data) == want


def test_command_replies_come_from_the_table(tmp_path: Path) -> None:
    """COMMAND, COMMAND COUNT and COMMAND INFO are generated from the command table; the
    COMMAND reply is byte for byte what kvs-server has always sent."""
    from kvs.resp import EMPTY_ARRAY, NULL_ARRAY, array, bulk, integer
    from kvs.server.resp_commands import COMMANDS, command_reply
    from kvs.server.resp_session import RespSession

    arities = {b"get": 2, b"set": -3, b"del": -2, b"exists": -2, b"ping": -1, b"echo": 2, b"quit": 1,
               b"command": -1, b"config": -2, b"info": -1, b"client": -2, b"select": 2, b"hello": -1}
    before = array([array([bulk(n), integer(a), EMPTY_ARRAY, integer(1 if a not in (1, -1) else 0),
                           integer(1 if a not in (1, -1) else 0), integer(1)]) for n, a in arities.items()])
    with KvStore.open(tmp_path / "data") as engine:
        session = RespSession(engine, "test", session_facts())
        assert list(COMMANDS) == list(arities)
        assert session.handle(command("COMMAND")) == before
        assert session.handle(command("command", "count")) == integer(len(COMMANDS))
        assert session.handle(command("COMMAND", "INFO", "get", "NOSUCH", "Set")) == array(
            [command_reply(COMMANDS[b"get"]), NULL_ARRAY, command_reply(COMMANDS[b"set"])])
        assert session.handle(command("COMMAND", "INFO")) == session.handle(command("COMMAND"))
        assert session.handle(command("COMMAND", "DOCS")) == EMPTY_ARRAY
        assert session.handle(command("COMMAND", "GETKEYS")).startswith(b"-ERR unsupported COMMAND subcommand")
        assert session.commands == 7


def test_every_table_entry_is_checked_for_arity_before_its_handler(tmp_path: Path) -> None:
    """A command with too few (or, for a fixed arity, too many) arguments gets Redis's arity
    error from the table, never reaching its handler; an unknown one the unknown-command error."""
    from kvs.server.resp_commands import COMMANDS
    from kvs.server.resp_session import RespSession

    with KvStore.open(tmp_path / "data") as engine:
        session = RespSession(engine, "test", session_facts())
        for name, entry in COMMANDS.items():
            wrong = abs(entry.arity) - 1 if entry.arity < 0 else entry.arity + 1
            if wrong < 1:
                continue
            args = [name.upper()] + [b"x"] * (wrong - 1)
            reply = session.handle(command(*args))
            assert reply == f"-ERR wrong number of arguments for '{name.decode()}' command\r\n".encode(), name
        assert session.handle(command("NOSUCH", "a")) == \
            b"-ERR unknown command 'NOSUCH', with args beginning with: 'a'\r\n"

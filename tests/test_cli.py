"""kvs-server and kvs-client as programs: ports of the course's cli.rs tests, plus the
failures a user meets (bad address, unreachable server, port in use, unwritable directory).

The console scripts are run from the interpreter's own bin directory (the venv's), never
through scripts/serve. Servers listen on 127.0.0.1 port 0; the port is read from the
"listening on" log line. Every server process is stopped by the test or killed in teardown.
"""

from __future__ import annotations

import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kvs
from kvs.server.fd_limit import RESERVED_DESCRIPTORS
from tests.netutil import DEADLINE, wait_for

BIN = Path(sys.executable).parent
KVS_SERVER = str(BIN / "kvs-server")
KVS_CLIENT = str(BIN / "kvs-client")
ENGINES = ["kvs", "sqlite"]
_LISTENING = re.compile(r"listening on (\S+):(\d+)")


@pytest.fixture(scope="module", autouse=True)
def _console_scripts() -> None:
    if not (os.access(KVS_SERVER, os.X_OK) and os.access(KVS_CLIENT, os.X_OK)):
        pytest.fail(f"console scripts missing in {BIN}: run scripts/bootstrap")


def run(*args: str, timeout: float = DEADLINE, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          stdin=subprocess.DEVNULL)


def client(*args: str, addr: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--addr", addr] if addr is not None else []
    return run(KVS_CLIENT, *args, *extra)


def assert_one_error_line(proc: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Non-zero exit, no traceback, and exactly one line on stderr containing ``fragments``."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_usage_error(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "usage:" in proc.stderr, proc.stderr
    assert proc.stdout == ""


class ServerProcess:
    """A kvs-server subprocess; its stderr is collected by a thread as it arrives."""

    def __init__(self, data_dir: Path, *args: str, addr: str = "127.0.0.1:0",
                 soft_fd_limit: int | None = None, hard_fd_limit: bool = False) -> None:
        argv = [KVS_SERVER, "--addr", addr, "--data-dir", str(data_dir), "--threads", "2", *args]
        if soft_fd_limit is not None:  # the shell lowers it, then becomes the server (exec)
            which = "-n" if hard_fd_limit else "-Sn"  # -n: the hard limit too
            argv = ["sh", "-c", f'ulimit {which} {soft_fd_limit} && exec "$@"', "sh", *argv]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self.stdout = ""
        self._changed = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._out_reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._out_reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()

    @property
    def stderr(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_listening(self) -> str:
        """``IP:PORT`` from the "listening on" line; fails if the server exits first."""
        with self._changed:
            ok = self._changed.wait_for(lambda: self._eof or any(_LISTENING.search(line) for line in self.lines),
                                        timeout=DEADLINE)
            text = "\n".join(self.lines)
        match = _LISTENING.search(text)
        if not ok or match is None:
            pytest.fail(f"kvs-server did not start listening (exit {self.proc.poll()}): {text}")
        return f"{match.group(1)}:{match.group(2)}"

    def wait(self) -> int:
        code = self.proc.wait(DEADLINE)
        self._reader.join(DEADLINE)
        self._out_reader.join(DEADLINE)
        return code

    def terminate(self) -> int:
        """SIGTERM, then the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(DEADLINE)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Start servers with ``servers.append(ServerProcess(...))``; all killed at teardown."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.kill()


def start_server(servers: list[ServerProcess], data_dir: Path, *args: str) -> tuple[ServerProcess, str]:
    server = ServerProcess(data_dir, *args)
    servers.append(server)
    return server, server.wait_listening()


# ------------------------------------------------------------------------------ client: usage


def test_client_cli_no_args() -> None:
    assert_usage_error(run(KVS_CLIENT))


@pytest.mark.parametrize("args", [
    ["get"],
    ["get", "extra", "field"],
    ["get", "key", "--addr", "invalid-addr"],
    ["get", "key", "--unknown-flag"],
])
def test_client_cli_invalid_get(args: list[str]) -> None:
    assert_usage_error(run(KVS_CLIENT, *args))


@pytest.mark.parametrize("args", [
    ["set"],
    ["set", "missing_field"],
    ["set", "key", "value", "extra_field"],
    ["set", "key", "value", "--addr", "invalid-addr"],
    ["set", "key", "value", "--unknown-flag"],
])
def test_client_cli_invalid_set(args: list[str]) -> None:
    assert_usage_error(run(KVS_CLIENT, *args))


@pytest.mark.parametrize("args", [
    ["rm"],
    ["rm", "extra", "field"],
    ["rm", "key", "--addr", "invalid-addr"],
    ["rm", "key", "--unknown-flag"],
])
def test_client_cli_invalid_rm(args: list[str]) -> None:
    assert_usage_error(run(KVS_CLIENT, *args))


def test_client_cli_invalid_subcommand() -> None:
    assert_usage_error(run(KVS_CLIENT, "unknown", "subcommand"))


@pytest.mark.parametrize("program", [KVS_CLIENT, KVS_SERVER], ids=["kvs-client", "kvs-server"])
def test_cli_version(program: str) -> None:
    proc = run(program, "-V")
    assert proc.returncode == 0, proc
    assert kvs.__version__ in proc.stdout


def test_cli_version_via_python_m() -> None:
    for module in ("kvs.cli.server", "kvs.cli.client"):
        proc = run(sys.executable, "-m", module, "-V")
        assert proc.returncode == 0 and kvs.__version__ in proc.stdout, proc


@pytest.mark.parametrize("program", [KVS_CLIENT, KVS_SERVER], ids=["kvs-client", "kvs-server"])
@pytest.mark.parametrize("addr", ["nonsense", "127.0.0.1", "127.0.0.1:99999", "localhost:4000", ":4000",
                                  "1.2.3.4:port"])
def test_invalid_address_is_a_usage_error(program: str, addr: str, tmp_path: Path) -> None:
    args = ["get", "key", "--addr", addr] if program == KVS_CLIENT else ["--addr", addr, "--data-dir", str(tmp_path)]
    proc = run(program, *args)
    assert_usage_error(proc)
    assert proc.returncode == 2
    assert "invalid address" in proc.stderr
    assert not any(tmp_path.iterdir()), "the server touched its data directory"


def test_unreachable_server_is_one_line() -> None:
    with socket.socket() as s:  # bound, not listening: connections are refused
        s.bind(("127.0.0.1", 0))
        addr = "%s:%d" % s.getsockname()
        for args in (["get", "key"], ["set", "key", "value"], ["rm", "key"]):
            proc = client(*args, addr=addr)
            assert_one_error_line(proc, addr)
            assert proc.stdout == ""


# ------------------------------------------------------------------------------ server: start-up


@pytest.mark.parametrize("engine", ENGINES)
def test_cli_log_configuration(servers: list[ServerProcess], tmp_path: Path, engine: str) -> None:
    server, addr = start_server(servers, tmp_path / "data", "--engine", engine)
    assert server.terminate() == 0
    log = server.stderr
    assert kvs.__version__ in log
    assert f"engine {engine}" in log
    assert addr in log
    assert "Traceback" not in log


def test_cli_log_configuration_explicit_address(servers: list[ServerProcess], tmp_path: Path) -> None:
    with socket.socket() as s:  # find a free port, then let the server take it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ServerProcess(tmp_path / "data", addr=f"127.0.0.1:{port}")
    servers.append(server)
    assert server.wait_listening() == f"127.0.0.1:{port}"
    assert server.terminate() == 0
    assert f"127.0.0.1:{port}" in server.stderr


@pytest.mark.parametrize("first,second", [("kvs", "sqlite"), ("sqlite", "kvs")])
def test_cli_wrong_engine(servers: list[ServerProcess], tmp_path: Path, first: str, second: str) -> None:
    data = tmp_path / "data"
    server, addr = start_server(servers, data, "--engine", first)
    assert client("set", "key", "value", addr=addr).returncode == 0
    assert server.terminate() == 0
    proc = run(KVS_SERVER, "--addr", "127.0.0.1:0", "--data-dir", str(data), "--engine", second)
    assert_one_error_line(proc, f"created by engine '{first}'")
    # without --engine the directory's own engine is used
    server, addr = start_server(servers, data)
    assert f"engine {first}" in server.stderr
    assert client("get", "key", addr=addr).stdout == "value\n"
    assert server.terminate() == 0


def test_port_in_use_is_one_line(servers: list[ServerProcess], tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        addr = "%s:%d" % s.getsockname()
        proc = run(KVS_SERVER, "--addr", addr, "--data-dir", str(tmp_path / "data"))
    assert_one_error_line(proc, "address already in use", addr)


def test_unwritable_data_directory_is_one_line(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    proc = run(KVS_SERVER, "--addr", "127.0.0.1:0", "--data-dir", str(a_file / "data"))
    assert_one_error_line(proc, str(a_file / "data"))
    proc = run(KVS_SERVER, "--addr", "127.0.0.1:0", "--data-dir", str(a_file))
    assert_one_error_line(proc, str(a_file), "not a directory")


def _make_unwritable(directory: Path) -> Callable[[], None]:
    """Make ``directory`` unwritable even for root (the immutable attribute) when we are
    root, else by its mode; returns the undo."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(directory)], check=True)
        return lambda: subprocess.run(["chattr", "-i", str(directory)], check=True)
    directory.chmod(0o555)
    return lambda: directory.chmod(0o755)


def test_read_only_data_directory_is_one_line(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    undo = _make_unwritable(ro)
    try:
        proc = run(KVS_SERVER, "--addr", "127.0.0.1:0", "--data-dir", str(ro))
    finally:
        undo()
    assert_one_error_line(proc, str(ro))


def test_data_directory_in_use_is_one_line(servers: list[ServerProcess], tmp_path: Path) -> None:
    server, _ = start_server(servers, tmp_path / "data")
    proc = run(KVS_SERVER, "--addr", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"))
    assert_one_error_line(proc, "already open")
    assert server.terminate() == 0


# ------------------------------------------------------------------------------ access


def soft_fd_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


def test_server_raises_its_open_file_limit_to_fit_max_connections(servers: list[ServerProcess],
                                                                  tmp_path: Path) -> None:
    """Started with the usual soft limit lowered to 256, a server configured for 1,000
    connections raises it (hard limit permitting) so that they can all be accepted."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"the hard open-file limit here is {hard}")
    server = ServerProcess(tmp_path / "data", "--max-connections", "1000", soft_fd_limit=256)
    servers.append(server)
    addr = server.wait_listening()
    host, port = addr.rsplit(":", 1)
    wait_for(lambda: soft_fd_limit(server.proc.pid) >= 1000 + RESERVED_DESCRIPTORS, what="the raised limit")
    socks = [socket.create_connection((host, int(port)), timeout=DEADLINE) for _ in range(400)]
    try:
        assert client("set", "k", "v", addr=addr).returncode == 0
        assert client("get", "k", addr=addr).stdout == "v\n"
    finally:
        for s in socks:
            s.close()
    assert server.terminate() == 0
    assert "accept failed" not in server.stderr and "Traceback" not in server.stderr


@pytest.mark.parametrize("io", ["leader-followers", "dispatch"])
def test_out_of_descriptors_new_connections_wait_and_the_server_does_not_spin(
        servers: list[ServerProcess], tmp_path: Path, io: str) -> None:
    """With a hard limit of 48 descriptors, 60 clients connect: accept() fails with EMFILE
    while the listener stays readable. The server logs that once (a loop polling the
    listener again at once would log it thousands of times a second), serves the
    connections it has, and accepts the waiting ones as soon as descriptors are free."""
    server = ServerProcess(tmp_path / "data", "--io", io, soft_fd_limit=48, hard_fd_limit=True)
    servers.append(server)
    addr = server.wait_listening()
    host, port = addr.rsplit(":", 1)
    socks = [socket.create_connection((host, int(port)), timeout=DEADLINE) for _ in range(60)]
    try:
        wait_for(lambda: "accept failed: Too many open files" in server.stderr, what="the EMFILE warning")
        # Connections that got in are served while the others wait.
        socks[0].sendall(b"*1\r\n$4\r\nPING\r\n")
        assert socks[0].recv(64) == b"+PONG\r\n"
        cpu = _process_cpu_seconds(server.proc.pid)
        threading.Event().wait(1.0)  # a window in which a spinning accept loop would burn a core
        assert _process_cpu_seconds(server.proc.pid) - cpu < 0.5
    finally:
        for s in socks[:50]:
            s.close()
    # Descriptors are free again: the connections still waiting in the backlog get in.
    for s in socks[50:]:
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert s.recv(64) == b"+PONG\r\n"
        s.close()
    wait_for(lambda: "accepting connections again" in server.stderr, what="the recovery line")
    assert server.stderr.count("accept failed") == 1, server.stderr
    assert server.terminate() == 0
    assert "Traceback" not in server.stderr


def _process_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.parametrize("engine", ENGINES)
def test_cli_access_server(servers: list[ServerProcess], tmp_path: Path, engine: str) -> None:
    data = tmp_path / "data"
    server, addr = start_server(servers, data, "--engine", engine)

    proc = client("set", "key1", "value1", addr=addr)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    proc = client("get", "key1", addr=addr)
    assert (proc.returncode, proc.stdout) == (0, "value1\n")
    proc = client("set", "key1", "value2", addr=addr)
    assert (proc.returncode, proc.stdout) == (0, "")
    proc = client("get", "key1", addr=addr)
    assert (proc.returncode, proc.stdout) == (0, "value2\n")
    proc = client("get", "key2", addr=addr)
    assert (proc.returncode, proc.stdout) == (0, "Key not found\n")
    proc = client("rm", "key2", addr=addr)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == "Key not found"
    proc = client("set", "key2", "value3", addr=addr)
    assert (proc.returncode, proc.stdout) == (0, "")
    proc = client("rm", "key1", addr=addr)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    proc = client("get", "key1", addr=addr)
    assert (proc.returncode, proc.stdout) == (0, "Key not found\n")
    proc = client("set", "unicode ключ", "значение ✓", addr=addr)
    assert proc.returncode == 0

    assert server.terminate() == 0  # SIGTERM: graceful, exit status 0
    assert "Traceback" not in server.stderr

    server, addr = start_server(servers, data, "--engine", engine)
    assert client("get", "key2", addr=addr).stdout == "value3\n"
    assert client("get", "key1", addr=addr).stdout == "Key not found\n"
    assert client("get", "unicode ключ", addr=addr).stdout == "значение ✓\n"
    server.proc.send_signal(signal.SIGINT)  # Ctrl-C stops it gracefully too
    assert server.wait() == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_with_clients_connected_exits_0_and_keeps_the_data(
        servers: list[ServerProcess], tmp_path: Path, engine: str) -> None:
    from kvs.client import KvsClient

    data = tmp_path / "data"
    server, addr = start_server(servers, data, "--engine", engine, "--fsync", "always")
    idle = KvsClient(addr)
    try:
        with KvsClient(addr) as c:
            with c.pipeline() as p:
                for i in range(500):
                    p.set(f"k{i}", f"v{i}")
            assert p.results() == [None] * 500
        idle.ping()
        assert server.terminate() == 0
    finally:
        idle.close()
    server, addr = start_server(servers, data)
    with KvsClient(addr) as c:
        with c.pipeline() as p:
            for i in range(500):
                p.get(f"k{i}")
        assert p.results() == [f"v{i}" for i in range(500)]
    assert server.terminate() == 0


def test_server_with_each_pool(servers: list[ServerProcess], tmp_path: Path) -> None:
    from kvs.thread_pool import POOLS

    for pool in POOLS:
        server, addr = start_server(servers, tmp_path / pool, "--pool", pool)
        assert client("set", "pool", pool, addr=addr).returncode == 0
        assert client("get", "pool", addr=addr).stdout == f"{pool}\n"
        assert server.terminate() == 0


def test_client_against_a_server_that_is_not_kvs() -> None:
    """A peer that closes at once, or answers garbage: one line, exit 1, no traceback."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        addr = "%s:%d" % listener.getsockname()

        def answer_garbage() -> None:
            for _ in range(2):
                conn, _ = listener.accept()
                with conn:
                    conn.recv(1024)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        t = threading.Thread(target=answer_garbage, daemon=True)
        t.start()
        for args in (["get", "k"], ["set", "k", "v"]):
            proc = client(*args, addr=addr)
            assert_one_error_line(proc)
            assert proc.returncode == 1
        t.join(DEADLINE)


# ------------------------------------------------------------------------------ client: TTL and bytes


def client_bytes(*args: str | bytes, addr: str, stdin: bytes | None = None,
                 stdout: int | object = subprocess.PIPE) -> subprocess.CompletedProcess[bytes]:
    """kvs-client with arguments that may be bytes (POSIX argv is bytes), ``stdin``'s bytes
    as standard input (none: /dev/null) and stdout to a pipe or an open file."""
    return subprocess.run([KVS_CLIENT, *args, "--addr", addr], input=stdin,
                          stdin=subprocess.DEVNULL if stdin is None else None, stdout=stdout,
                          stderr=subprocess.PIPE, timeout=DEADLINE)


def _stderr_line(proc: subprocess.CompletedProcess[bytes], code: int, *fragments: str) -> None:
    """Exit ``code``, nothing on stdout, one line on stderr with ``fragments``, no traceback."""
    stderr = proc.stderr.decode(errors="replace")
    assert proc.returncode == code, (proc.returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert stderr.count("\n") == 1 and stderr.endswith("\n"), stderr
    for fragment in fragments:
        assert fragment in stderr, stderr
    assert not proc.stdout


def _host_port(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


@pytest.mark.timeout(60)
def test_client_set_with_ttl_expires_the_key(servers: list[ServerProcess], tmp_path: Path) -> None:
    from kvs.client import KvsClient

    _, addr = start_server(servers, tmp_path / "data")
    with KvsClient(_host_port(addr), timeout=DEADLINE) as c:
        c.set("short", "old")  # a set that failed would leave this value in place
        proc = client("set", "short", "new", "--ttl", "0.3", addr=addr)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
        wait_for(lambda: c.get("short") is None, what="the key to expire")
        assert client("get", "short", addr=addr).stdout == "Key not found\n"
        # seconds, not milliseconds: a 60 s TTL is still running when the next command reads the key
        assert client("set", "long", "kept", "--ttl", "60", addr=addr).returncode == 0
        assert client("get", "long", addr=addr).stdout == "kept\n"
        assert c.get("long") == "kept"


@pytest.mark.timeout(60)
def test_client_bad_ttl_is_one_line_exit_2_and_nothing_stored(servers: list[ServerProcess], tmp_path: Path) -> None:
    from kvs.client import KvsClient

    _, addr = start_server(servers, tmp_path / "data")
    with KvsClient(_host_port(addr), timeout=DEADLINE) as c:
        c.set("k", "old")
        for ttl in ("0", "-1", "nan", "abc", "inf", "1e300"):
            proc = client("set", "k", "new", "--ttl", ttl, addr=addr)
            assert proc.returncode == 2, (ttl, proc)
            line = assert_one_error_line(proc, "--ttl", repr(ttl))
            assert line.startswith("kvs-client: error:"), line
            assert proc.stdout == ""
        proc = client("set", "fresh", "v", "--ttl=-1", addr=addr)  # the other spelling of the option
        assert proc.returncode == 2, proc
        assert_one_error_line(proc, "--ttl", "'-1'")
        assert c.get("k") == "old"
        assert c.get("fresh") is None


@pytest.mark.timeout(60)
def test_client_set_from_stdin_round_trips_a_binary_value_exactly(servers: list[ServerProcess], tmp_path: Path) -> None:
    """``set KEY -`` stores standard input's bytes; ``get KEY > file`` writes them back with
    nothing added (stdout is not a terminal): NUL, invalid UTF-8, CR/LF and all."""
    from kvs.client import KvsClient

    _, addr = start_server(servers, tmp_path / "data")
    data = b"\x00\xff\xfe\r\n" + random.Random(2).randbytes(2 << 20) + b"\xc3"  # ends inside a UTF-8 sequence
    proc = client_bytes("set", "blob", "-", addr=addr, stdin=data)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    out = tmp_path / "out"
    with out.open("wb") as f:
        proc = client_bytes("get", "blob", addr=addr, stdout=f)
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert out.read_bytes() == data
    with KvsClient(_host_port(addr), timeout=DEADLINE) as c:
        assert c.get("blob") == data  # stored as bytes, not text
    # a bytes value ending in a newline keeps exactly its one newline; an empty one is empty
    assert client_bytes("set", "line", "-", addr=addr, stdin=b"line\n").returncode == 0
    assert client_bytes("get", "line", addr=addr).stdout == b"line\n"
    assert client_bytes("set", "empty", "-", addr=addr, stdin=b"").returncode == 0
    proc = client_bytes("get", "empty", addr=addr)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")


@pytest.mark.timeout(60)
def test_client_get_of_a_bytes_value_on_a_terminal_ends_the_line(servers: list[ServerProcess],
                                                                  tmp_path: Path) -> None:
    import pty

    _, addr = start_server(servers, tmp_path / "data")
    assert client_bytes("set", "k", "-", addr=addr, stdin=b"no newline").returncode == 0
    master, slave = pty.openpty()
    try:
        proc = client_bytes("get", "k", addr=addr, stdout=slave)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other side is closed, everything was read
                break
            if not chunk:
                break
            out += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert (proc.returncode, proc.stderr) == (0, b"")
    assert out == b"no newline\r\n"  # the terminal shows "\n" as CR LF


@pytest.mark.timeout(60)
def test_client_value_over_the_limit_on_stdin_is_one_line_and_nothing_stored(servers: list[ServerProcess],
                                                                             tmp_path: Path) -> None:
    from kvs.client import KvsClient
    from kvs.limits import DEFAULT_MAX_VALUE_BYTES

    _, addr = start_server(servers, tmp_path / "data")
    proc = client_bytes("set", "big", "-", addr=addr, stdin=b"\x00" * (DEFAULT_MAX_VALUE_BYTES + 1))
    _stderr_line(proc, 1, "over the limit", str(DEFAULT_MAX_VALUE_BYTES))
    with KvsClient(_host_port(addr), timeout=DEADLINE) as c:
        assert c.get("big") is None


@pytest.mark.timeout(60)
def test_client_non_utf8_arguments_are_sent_as_their_bytes(servers: list[ServerProcess], tmp_path: Path) -> None:
    """POSIX arguments are bytes: a key (or value) that is not UTF-8 is the key of those
    bytes, for set, get and rm alike; a text value still prints with its newline."""
    from kvs.client import KvsClient

    _, addr = start_server(servers, tmp_path / "data")
    key = b"caf\xe9"  # Latin-1, not UTF-8
    proc = client_bytes(b"set", key, b"text value", addr=addr)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    proc = client_bytes(b"get", key, addr=addr)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"text value\n", b"")
    assert client_bytes("set", "raw", b"\xff\xfe", addr=addr).returncode == 0
    assert client_bytes("get", "raw", addr=addr).stdout == b"\xff\xfe"  # bytes: written as stored
    with KvsClient(_host_port(addr), timeout=DEADLINE) as c:
        assert c.get(key) == "text value"  # the raw bytes are the key, a text value stays text
        assert c.get("café") is None  # not the UTF-8 key of "café"
        assert c.get("raw") == b"\xff\xfe"
        c.set(b"stored as bytes", b"bytes")
    assert client_bytes("get", "stored as bytes", addr=addr).stdout == b"bytes"
    proc = client_bytes(b"rm", key, addr=addr)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
    proc = client_bytes(b"rm", key, addr=addr)
    assert (proc.returncode, proc.stdout, proc.stderr) == (1, b"", b"Key not found\n")

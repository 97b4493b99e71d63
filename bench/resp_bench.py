"""kvs-server against Redis, driven by the very same redis-benchmark command lines.

Redis (``redis-server`` from Debian) runs with the append-only file on and
``appendfsync everysec``; kvs-server runs the kvs engine with ``--fsync interval`` (an fsync
every second: the same promise) in its default I/O model (leader-followers). Both start on
free loopback ports in temporary directories and are stopped afterwards. For each command
line (SET and GET with 1 connection, 50 connections, and 50 connections pipelined 16 deep)
the two servers are measured alternately, five rounds, the one that goes first swapping
every round, and the median of each is kept: both see the same machine state.
redis-benchmark (C, one thread) shares the two cores with the server under test.

Records: suite "resp", one per server and command line (``engine`` "redis" or "kvs"), plus
one per command line with ``ratio``: the median over rounds of kvs / Redis throughput within
the round (``round_ratios`` lists them; on a shared VM whose speed drifts, a ratio taken
within a round is steadier than a ratio of medians taken over all of them).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import SMOKE, Progress, no_progress, record
from kvs.server.scheduling import SCHEDULING
from kvs.server.server import IO_MODELS

SUITE = "resp"
KEYSPACE = 100_000
"""redis-benchmark's ``-r``: the keys are drawn at random from this many."""
VALUE_BYTES = 100
"""redis-benchmark's ``-d``: the size of a SET's value."""
LINES = [  # (label, connections, pipeline)
    ("1 connection", 1, 1),
    ("50 connections", 50, 1),
    ("50 connections, pipelined 16", 50, 16),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def ensure_redis_tools() -> None:
    """redis-server and redis-benchmark from Debian; installed when missing and we are root."""
    missing = [tool for tool in ("redis-server", "redis-benchmark") if shutil.which(tool) is None]
    if not missing:
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-q", "redis-server", "redis-tools"], env=env,
                       check=False, capture_output=True)
    missing = [tool for tool in ("redis-server", "redis-benchmark") if shutil.which(tool) is None]
    if missing:
        raise RuntimeError(f"the resp suite needs {' and '.join(missing)} (apt-get install redis-server redis-tools)")


class Servers:
    """A Redis and a kvs-server, each in its own temporary directory."""

    def __init__(self, kvs_threads: int, kvs_pool: str, kvs_scheduling: str) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="kvs-resp-bench-")
        base = Path(self.tmp.name)
        (base / "redis").mkdir()
        (base / "kvs").mkdir()
        self.redis_port, self.kvs_port = free_port(), free_port()
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(base / "redis"),
             "--appendonly", "yes", "--appendfsync", "everysec", "--save", "", "--daemonize", "no",
             "--protected-mode", "no", "--logfile", ""],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.kvs = subprocess.Popen(
            [sys.executable, "-m", "kvs.cli.server", "--addr", f"127.0.0.1:{self.kvs_port}",
             "--data-dir", str(base / "kvs"), "--engine", "kvs", "--fsync", "interval", "--pool", kvs_pool,
             "--threads", str(kvs_threads), "--scheduling", kvs_scheduling, "--log-level", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
        try:
            wait_for_port(self.redis_port, self.redis)
            wait_for_port(self.kvs_port, self.kvs)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for proc in (self.redis, self.kvs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (self.redis, self.kvs):
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.tmp.cleanup()


def redis_version() -> str | None:
    """The version of ``redis-server`` (``7.0.15``), None when it does not say."""
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=30)
    found = [word[2:] for word in out.stdout.split() if word.startswith("v=")]
    return found[0] if found else None


def redis_benchmark(port: int, test: str, requests: int, clients: int, pipeline: int) -> dict[str, float]:
    """One redis-benchmark run; rps and latency percentiles (ms) from its CSV output."""
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", test, "-n", str(requests),
           "-c", str(clients), "-P", str(pipeline), "-r", str(KEYSPACE), "-d", str(VALUE_BYTES), "--csv"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    rows = [r for r in csv.reader(io.StringIO(out.stdout)) if r and r[0] != "test"]
    if out.returncode != 0 or not rows:
        raise RuntimeError(f"redis-benchmark failed ({out.returncode}): {out.stderr.strip()[:300]}")
    row = rows[0]
    rps, p50, p99 = float(row[1]), float(row[4]), float(row[6])
    assert rps > 0, f"redis-benchmark measured nothing: {row}"
    return {"rps": rps, "p50_ms": p50, "p99_ms": p99}


def run(quick: bool, progress: Progress = no_progress, kvs_threads: int | None = None,
        kvs_pool: str = "shared-queue", kvs_scheduling: str = SCHEDULING[0]) -> list[dict]:
    ensure_redis_tools()
    threads = kvs_threads or (os.cpu_count() or 1)
    rounds = 1 if quick else 5
    version = redis_version()
    records: list[dict] = []
    servers = Servers(threads, kvs_pool, kvs_scheduling)
    steps = [(label, c, p, test) for label, c, p in LINES for test in ("set", "get")]
    try:
        for i, (label, clients, pipeline, test) in enumerate(steps):
            progress(i, len(steps), f"redis-benchmark -t {test} ({label})")
            requests = (5000 if clients == 1 else 20000 if pipeline == 1 else 100000) * (1 if quick else 2)
            if SMOKE:
                requests = 200 * pipeline
            results: dict[str, list[dict]] = {"redis": [], "kvs": []}
            ports = {"redis": servers.redis_port, "kvs": servers.kvs_port}
            for r in range(rounds):  # alternate, so that both see the same conditions
                # Who goes first swaps every round (Redis, kvs; kvs, Redis; ...): on a VM whose
                # speed drifts, a fixed order would give one server the earlier moment each time.
                for server in ("redis", "kvs") if r % 2 == 0 else ("kvs", "redis"):
                    results[server].append(redis_benchmark(ports[server], test, requests, clients, pipeline))
            medians = {}
            for server, runs in results.items():
                rps = statistics.median(r["rps"] for r in runs)
                medians[server] = rps
                records.append(record(
                    SUITE, f"{test}", engine=server, pool=kvs_pool if server == "kvs" else None,
                    io_model=IO_MODELS[0] if server == "kvs" else None,
                    threads=threads if server == "kvs" else 1, ops_per_sec=rps,
                    scheduling=kvs_scheduling if server == "kvs" else None,
                    p50_us=statistics.median(r["p50_ms"] for r in runs) * 1000,
                    p99_us=statistics.median(r["p99_ms"] for r in runs) * 1000,
                    connections=clients, pipeline=pipeline, command=label, reps=rounds,
                    redis_benchmark_options=f"-r {KEYSPACE} -d {VALUE_BYTES}",
                    **({"redis_version": version} if server == "redis" else {})))
            round_ratios = [k["rps"] / r["rps"] for k, r in zip(results["kvs"], results["redis"], strict=True)]
            records.append(record(SUITE, f"{test}_ratio", engine="kvs/redis", connections=clients, pipeline=pipeline,
                                  command=label, ratio=statistics.median(round_ratios), round_ratios=round_ratios,
                                  kvs_ops_per_sec=medians["kvs"], redis_ops_per_sec=medians["redis"]))
    finally:
        servers.close()
    progress(len(steps), len(steps), "resp done")
    return records

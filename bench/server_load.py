"""Load on a kvs-server process: throughput and per-request latency of GET and SET.

Scenarios (as redis-benchmark's): 1 connection; 50 connections; 50 connections each
pipelining 16 requests. For each engine (kvs, sqlite) a fresh ``kvs-server`` subprocess is
started::

    python -m kvs.cli.server --addr 127.0.0.1:0 --data-dir TMP --engine E --pool shared-queue --threads N

(the server's default I/O model, leader-followers)
with this process's environment (so ``PYTHON_GIL`` passes through: ``python -m bench`` runs
this suite once with the GIL off and once with it on, and the server runs in the same mode as
the load generator). The bound port is read from the server's "listening on" log line; the
server is stopped with SIGTERM and must exit 0.

The load generator is this process: one thread per connection, each with its own
``KvsClient`` (and ``pipeline()`` of 16 in the pipelined scenario), all connected and warmed
up before the timed region, released together by a barrier (``run_threads_timed``). Each
thread times every call with ``perf_counter``: for a pipeline, the latency of each of its
16 requests is the round trip of the whole batch. Throughput = requests / wall time from
the barrier to the last thread's finish. Every response is checked (SET returns None, GET
returns the value stored by the preload), so a wrong answer fails the benchmark.

Caveat that matters for reading the numbers: the generator and the server share the
machine's cores (two on the reference machine). The generator is Python too, so with 50
connections a large part of the CPU goes to the clients; the figures are the throughput of
this client/server pair on this machine, a lower bound of what the server alone could do.

Records: suite ``server_load``, benchmark ``get``/``set`` + scenario, with ``connections``,
``pipeline``, ``ops_per_sec`` (median over reps), p5/p95 throughput, ``p50_us``/``p99_us``
over all samples of all reps.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.common import (
    SMOKE,
    Progress,
    gil_enabled,
    latency_stats,
    no_progress,
    record,
    run_threads_timed,
    throughput_stats,
)
from kvs.client import KvsClient
from kvs.server.server import IO_MODELS

SUITE = "load"
ENGINES = ["kvs", "sqlite"]
POOL = "shared-queue"
SCENARIOS = [  # (label, connections, pipeline depth)
    ("1 connection", 1, 1),
    ("50 connections", 50, 1),
    ("50 connections, pipelined 16", 50, 16),
]
KEYS = 1000
VALUE_BYTES = 100
ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(rb"listening on (\S+):(\d+)")


def server_threads() -> int:
    return max(2, os.cpu_count() or 1)


def key(i: int) -> str:
    return f"key{i:06d}"


def value(i: int) -> str:
    return f"{i:06d}".ljust(VALUE_BYTES, "v")


class ServerProcess:
    """``python -m kvs.cli.server`` on a free port of 127.0.0.1, in a temporary directory."""

    def __init__(self, engine: str, threads: int) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix=f"kvs-load-{engine}-")
        cmd = [sys.executable, "-m", "kvs.cli.server", "--addr", "127.0.0.1:0", "--data-dir", self.tmp.name,
               "--engine", engine, "--pool", POOL, "--threads", str(threads), "--log-level", "info"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ), stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.log: list[bytes] = []
        self.address = self._wait_listening()
        # keep draining stderr so that warnings can never block the server on a full pipe
        self._drain = threading.Thread(target=self._read_rest, daemon=True)
        self._drain.start()

    def _wait_listening(self) -> tuple[str, int]:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:  # ends at EOF if the server dies
            self.log.append(line)
            match = _LISTENING.search(line)
            if match:
                return match.group(1).decode(), int(match.group(2))
        self.proc.wait()
        self.tmp.cleanup()
        raise RuntimeError(f"kvs-server exited ({self.proc.returncode}) before listening: "
                           + b"".join(self.log).decode(errors="replace"))

    def _read_rest(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def stop(self) -> None:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                status = self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise RuntimeError("kvs-server did not stop within 60 s of SIGTERM") from None
            self._drain.join(10)
            if status != 0:
                raise RuntimeError(f"kvs-server exited with status {status}: "
                                   + b"".join(self.log[-5:]).decode(errors="replace"))
        finally:
            self.tmp.cleanup()


def preload(address: tuple[str, int]) -> None:
    with KvsClient(address) as c:
        with c.pipeline() as p:
            for i in range(KEYS):
                p.set(key(i), value(i))
        assert p.results() == [None] * KEYS


def make_worker(client: KvsClient, op: str, n: int, depth: int, requests: int,
                samples: list[float]) -> Callable[[], None]:
    """A thread body doing ``requests`` requests (in batches of ``depth``), appending one
    latency sample per request to ``samples``."""
    from time import perf_counter

    batches = requests // depth
    start_key = (n * 7919) % KEYS

    def work() -> None:
        append = samples.append
        idx = start_key
        if depth == 1:
            if op == "get":
                get = client.get
                for _ in range(batches):
                    k = idx % KEYS
                    t0 = perf_counter()
                    got = get(key(k))
                    append(perf_counter() - t0)
                    if got != value(k):
                        raise AssertionError(f"GET {key(k)} returned {got!r}")
                    idx += 1
            else:
                set_ = client.set
                for _ in range(batches):
                    k = idx % KEYS
                    t0 = perf_counter()
                    set_(key(k), value(k))
                    append(perf_counter() - t0)
                    idx += 1
            return
        for _ in range(batches):
            ks = [(idx + j) % KEYS for j in range(depth)]
            t0 = perf_counter()
            with client.pipeline() as p:
                if op == "get":
                    for k in ks:
                        p.get(key(k))
                else:
                    for k in ks:
                        p.set(key(k), value(k))
            results = p.results()
            dt = perf_counter() - t0
            expected = [value(k) for k in ks] if op == "get" else [None] * depth
            if results != expected:
                raise AssertionError(f"pipelined {op} returned {results!r}")
            for _ in range(depth):
                append(dt)
            idx += depth

    return work


def measure(address: tuple[str, int], op: str, connections: int, depth: int, requests_per_conn: int,
            reps: int) -> dict:
    """Throughput and latency of one scenario: ``reps`` timed runs after one warm-up."""
    clients = [KvsClient(address) for _ in range(connections)]
    try:
        seconds: list[float] = []
        all_samples: list[float] = []
        for rep in range(reps + 1):  # rep 0 is the warm-up
            per_thread: list[list[float]] = [[] for _ in range(connections)]
            workers = [make_worker(c, op, n, depth, requests_per_conn, per_thread[n])
                       for n, c in enumerate(clients)]
            elapsed = run_threads_timed(workers)
            if rep:
                seconds.append(elapsed)
                for s in per_thread:
                    all_samples.extend(s)
        total = connections * (requests_per_conn // depth) * depth
        return {**throughput_stats(total, seconds), **latency_stats(np.asarray(all_samples)),
                "requests": total, "seconds": float(np.median(seconds))}
    finally:
        for c in clients:
            c.close()


def run(quick: bool, progress: Progress = no_progress) -> list[dict]:
    """Every engine x scenario x {set, get} against a kvs-server subprocess."""
    threads = server_threads()
    reps = 1 if SMOKE else 2 if quick else 5
    requests = {  # per connection, per timed run
        (1, 1): 1500 if quick else 5000,
        (50, 1): 60 if quick else 300,
        (50, 16): 160 if quick else 960,
    }
    if SMOKE:
        requests = {k: 32 for k in requests}
    steps = len(ENGINES) * len(SCENARIOS) * 2
    done = 0
    records: list[dict] = []
    for engine in ENGINES:
        server = ServerProcess(engine, threads)
        try:
            preload(server.address)
            for label, connections, depth in SCENARIOS:
                for op in ("set", "get"):
                    progress(done, steps, f"{engine}: {op.upper()}, {label}")
                    stats = measure(server.address, op, connections, depth, requests[(connections, depth)], reps)
                    records.append(record(
                        SUITE, f"{op} ({label})", engine=engine, pool=POOL, io_model=IO_MODELS[0], threads=threads,
                        workload=op, connections=connections, pipeline=depth,
                        latency="per request; a pipelined request's latency is its batch's round trip",
                        **stats,
                    ))
                    done += 1
        finally:
            server.stop()
    progress(done, steps, "done")
    return records


def print_table(records: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    gil = "on" if gil_enabled() else "off"
    table = Table(title=f"server_load: kvs-server subprocess, {POOL} pool, GIL {gil} (server and load generator)")
    for col in ("engine", "op", "connections", "pipeline", "ops/s", "p5-p95 ops/s", "p50 us", "p99 us"):
        table.add_column(col, justify="left" if col in ("engine", "op") else "right")
    for r in records:
        table.add_row(r["engine"], r["workload"].upper(), str(r["connections"]), str(r["pipeline"]),
                      f"{r['ops_per_sec']:,.0f}", f"{r['ops_per_sec_p5']:,.0f}-{r['ops_per_sec_p95']:,.0f}",
                      f"{r['p50_us']:,.0f}", f"{r['p99_us']:,.0f}")
    Console().print(table)


if __name__ == "__main__":
    import argparse
    import time

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and repetitions (< 60 s)")
    args = parser.parse_args()
    t0 = time.monotonic()
    result = run(args.quick)
    print_table(result)
    print(f"{time.monotonic() - t0:.1f} s")

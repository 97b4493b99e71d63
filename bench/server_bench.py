"""The course's server benchmarks, parameterized by the server pool's thread count.

``write_*``: each iteration sets the same 1000 unique, equal-length keys to the same value;
``read_*``: setup preloads those 1000 keys, each iteration gets all of them. Every response
is asserted. Configurations: shared-queue, work-stealing and executor pools on the kvs
engine, and the work-stealing pool on the sqlite engine, all in the server's ``dispatch`` I/O
model (an I/O thread hands ready connections to the pool: the model in which the pools
differ); and the server's default, ``leader-followers`` (the pool threads wait for ready
connections themselves), with the shared-queue pool on the kvs engine. Thread counts: 1, 2,
4, then every even number up to twice the CPU count.

How the load is generated (and why): the server runs in this process (``serve_forever`` on
its own thread, shut down programmatically after each configuration). The client side is a
persistent pool of ``CLIENT_CONNECTIONS`` threads, each with its own connection, built
before the timed region. An iteration hands each client thread its share of the 1000
requests, which it sends as one pipeline (so all 1000 requests are in flight at once without
1000 client threads: on two cores, a thread per request would measure the client's context
switches rather than the server) and checks every response. Completion costs one wake-up:
the last client thread to finish sets an Event (a lock-protected countdown, not 1000
messages). Setup, connections and threads stay outside the timed region.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections.abc import Callable

from bench.common import SMOKE, Progress, no_progress, record, repeat, throughput_stats
from kvs.client import KvsClient
from kvs.engine import open_engine
from kvs.server import KvsServer
from kvs.thread_pool import make_pool

SUITE = "server"
KEYS = 1000
CLIENT_CONNECTIONS = 16
VALUE = "v" * 100
CONFIGURATIONS = [  # (pool, engine, I/O model): the course's six benchmarks, the executor pool,
    ("shared-queue", "kvs", "dispatch"),  # and the server's default I/O model
    ("work-stealing", "kvs", "dispatch"),
    ("executor", "kvs", "dispatch"),
    ("work-stealing", "sqlite", "dispatch"),
    ("shared-queue", "kvs", "leader-followers"),
]


def thread_counts() -> list[int]:
    """1, 2, 4, then every even number up to twice the CPU count (the course's inputs)."""
    top = 2 * (os.cpu_count() or 1)
    return sorted({1, 2, 4} | set(range(6, top + 1, 2)))


def key(i: int) -> str:
    return f"key{i:06d}"


class ClientSide:
    """``CLIENT_CONNECTIONS`` client threads with a connection each, reused by iterations."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        shares = [list(range(i, KEYS, CLIENT_CONNECTIONS)) for i in range(CLIENT_CONNECTIONS)]
        self.shares = [[key(i) for i in share] for share in shares]
        self.clients = [KvsClient(address) for _ in shares]
        self._go = [threading.Event() for _ in shares]
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._remaining = 0
        self._work: Callable[[KvsClient, list[str]], None] | None = None
        self._errors: list[BaseException] = []
        self._stop = False
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(len(shares))]
        for t in self._threads:
            t.start()

    def _loop(self, i: int) -> None:
        client, keys, go = self.clients[i], self.shares[i], self._go[i]
        while True:
            go.wait()
            go.clear()
            if self._stop:
                return
            try:
                self._work(client, keys)
            except BaseException as exc:  # re-raised by run_iteration
                self._errors.append(exc)
            with self._lock:
                self._remaining -= 1
                last = self._remaining == 0
            if last:
                self._done.set()  # the iteration's only cross-thread signal back

    def run_iteration(self, work: Callable[[KvsClient, list[str]], None]) -> float:
        """Run ``work(client, keys)`` on every client thread at once; the seconds it took."""
        self._work = work
        self._remaining = len(self._threads)
        self._done.clear()
        start = time.perf_counter()
        for go in self._go:
            go.set()
        self._done.wait()
        elapsed = time.perf_counter() - start
        if self._errors:
            raise self._errors[0]
        return elapsed

    def close(self) -> None:
        self._stop = True
        for go in self._go:
            go.set()
        for t in self._threads:
            t.join()
        for c in self.clients:
            c.close()


def write_work(client: KvsClient, keys: list[str]) -> None:
    with client.pipeline() as p:
        for k in keys:
            p.set(k, VALUE)
    results = p.results()
    assert len(results) == len(keys) and all(r is None for r in results), "a SET failed"


def read_work(client: KvsClient, keys: list[str]) -> None:
    with client.pipeline() as p:
        for k in keys:
            p.get(k)
    results = p.results()
    assert results == [VALUE] * len(keys), "a GET returned a wrong value"


def measure(pool_name: str, engine_name: str, io_model: str, threads: int, reps: int) -> list[dict]:
    """Both benchmarks for one configuration and thread count."""
    with tempfile.TemporaryDirectory(prefix="kvs-bench-") as data_dir:
        engine = open_engine(engine_name, data_dir)
        pool = make_pool(pool_name, threads)
        server = KvsServer(engine, pool, ("127.0.0.1", 0), io_model=io_model)
        io_thread = threading.Thread(target=server.serve_forever, daemon=True)
        io_thread.start()
        clients = ClientSide(server.address)
        out = []
        try:
            for bench, work in (("write", write_work), ("read", read_work)):
                if bench == "read":
                    clients.run_iteration(write_work)  # preload the keys
                seconds = repeat(lambda w=work: clients.run_iteration(w), reps, warmup=0 if SMOKE else 2)
                stats = throughput_stats(KEYS, seconds)
                name = f"{bench}_{pool_name.replace('-', '_')}_{engine_name}"
                if io_model != "dispatch":
                    name += "_" + io_model.replace("-", "_")
                out.append(record(SUITE, name, engine=engine_name, pool=pool_name, io_model=io_model, threads=threads,
                                  ops_per_sec=stats["ops_per_sec"], ops_per_sec_p5=stats["ops_per_sec_p5"],
                                  ops_per_sec_p95=stats["ops_per_sec_p95"], reps=stats["reps"],
                                  workload=bench, client_connections=CLIENT_CONNECTIONS,
                                  requests_per_iteration=KEYS))
        finally:
            clients.close()
            server.close()
            io_thread.join()
            pool.shutdown(wait=True)
            engine.close()
    return out


def run(quick: bool, progress: Progress = no_progress) -> list[dict]:
    reps = 1 if SMOKE else 5 if quick else 10
    counts = [1] if SMOKE else [1, 2] if quick else thread_counts()
    steps = [(p, e, io, t) for p, e, io in CONFIGURATIONS for t in counts]
    records: list[dict] = []
    for done, (pool_name, engine_name, io_model, threads) in enumerate(steps):
        progress(done, len(steps), f"server {pool_name}+{engine_name} ({io_model}) {threads} threads")
        records += measure(pool_name, engine_name, io_model, threads, reps)
    progress(len(steps), len(steps), "server done")
    return records

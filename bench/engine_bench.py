"""Engine benchmarks: KvStore against stdlib sqlite3 and diskcache, in one process.

    python -m bench.engine_bench [--quick] [--only NAME ...] [--json FILE]

Peers, all with the same durability as KvStore's default (``fsync="never"``: an acknowledged
write has been handed to the OS, it survives a kill -9 but not a power loss):

- ``kvs``: ``KvStore.open(dir)`` with default options.
- ``sqlite3``: the standard library module used directly (not ``SqliteKvsEngine``): WAL,
  ``synchronous=NORMAL``, one ``kv(key TEXT PRIMARY KEY, value TEXT) WITHOUT ROWID`` table,
  autocommit (one transaction per write), one connection per thread.
- ``diskcache``: ``diskcache.Cache(dir)`` with its defaults (SQLite underneath, WAL,
  ``synchronous=NORMAL``; values this small are stored inline in SQLite).

Benchmarks (100-byte values; 100k keys, quick 10k; every result is checked):

``set_1thread`` / ``get_1thread``
    One thread sets every key of a fresh store, then gets every key (shuffled order). The
    engines' rounds are interleaved; ``ratio_to_best_peer`` (kvs) is the median over rounds of
    kvs's ops/s over the best peer's in the same round.
``get_threads`` (threads = 1, 2, 4)
    The keys were written by two "pool" threads that stay alive (blocked on an Event) until
    the measurement ends: on free-threaded CPython the objects they created are owned by live
    threads, as in a server. Each reader thread builds its own key strings before the timed
    region; the readers start together from a barrier; ops/s = all gets / wall time. Rounds
    of 1, 2 and 4 threads are interleaved; ``ratio_to_1_thread`` is the median over rounds of
    (this round's ops/s / the same round's 1-thread ops/s).
``cpu_control`` (threads = 2)
    In the same rounds as kvs's ``get_threads``: a pure-arithmetic loop on private locals,
    the same total work run by 1 and by 2 threads. Its ``ratio_to_1_thread`` (and the list
    ``ratios``) is what this machine gives two threads that share nothing at all: the ceiling
    that ``get_threads`` at 2 threads is read against.
``get_latency_idle`` / ``get_latency_compacting`` (kvs only)
    Per-get latency (p50/p99) on a store holding 3 versions of every key: idle, and while
    ``compact()`` runs in a background thread.
``index_memory`` (kvs only; 1M keys, quick 100k)
    In a fresh subprocess: resident set size before and after opening the store, minus the
    keys' own UTF-8 bytes, per key (``bytes_per_key``).
``open_from_hints`` / ``open_from_log`` (kvs only; 1M keys, quick 100k)
    Seconds to open the store after a compaction (hint files) and with the hint files deleted.
``index_memory_ttl`` (kvs only; 1M keys, quick 100k)
    ``index_memory`` of the same keys and values, each written with a TTL (one day); its
    ``ttl_bytes_per_key`` is the difference from ``index_memory``: what a TTL costs per key.
``clear`` (kvs only; 1M keys, quick 100k)
    Seconds of one ``clear()`` of that store (with a TTL on every key), and the data
    directory's bytes before and after it (``dir_bytes_before`` / ``dir_bytes_after``).

Warm-up plus 3 repetitions with medians (``bench.common``; set's warm-up is a round of a
tenth of the keys, as every round builds a fresh store); ``get_threads``: a warm-up per thread count, then 4 interleaved
rounds; the opens of the big store run 3 times without warm-up, the memory measurement twice
(each in a fresh process).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from bench.common import (
    SMOKE,
    Progress,
    gil_enabled,
    latency_stats,
    no_progress,
    record,
    repeat,
    run_prepared_threads_timed,
    throughput_stats,
)
from kvs.engine import KvStore

SUITE = "engine"
ENGINES = ("kvs", "sqlite3", "diskcache")
THREAD_COUNTS = (1, 2, 4)
VALUE_BYTES = 100
ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("set_get", "get_threads", "latency", "index_memory", "open", "index_memory_ttl", "clear")


def key_of(i: int) -> str:
    return f"key{i:08d}"


def value_of(i: int) -> str:
    """100 characters that name the key's number, so a wrong record cannot pass the check."""
    head = f"value-{i:08d}-"
    return head + "v" * (VALUE_BYTES - len(head))


# --------------------------------------------------------------------------- engines
Client = tuple[Callable[[str], str | None], Callable[[str, str], object]]
"""An engine's ``(get, set)`` callables for one thread."""


class Engine:
    """One engine under test, opened in a directory. ``client()`` returns the ``(get, set)``
    callables a thread should use (a per-thread connection where the engine needs one);
    call it in the thread that will use them."""

    name = ""

    def client(self) -> Client:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class KvsEngine(Engine):
    name = "kvs"

    def __init__(self, path: str) -> None:
        self.store = KvStore.open(path)

    def client(self) -> Client:
        return self.store.get, self.store.set

    def close(self) -> None:
        self.store.close()


class Sqlite3Engine(Engine):
    name = "sqlite3"

    def __init__(self, path: str) -> None:
        self.file = os.path.join(path, "bench.sqlite3")
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        conn = self._connect()
        conn.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.file, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            self._conns.append(conn)
        return conn

    def client(self) -> Client:
        conn = self._connect()
        execute = conn.execute

        def get(key: str) -> str | None:
            row = execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            return None if row is None else row[0]

        def set_(key: str, value: str) -> None:
            execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", (key, value))

        return get, set_

    def close(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns.clear()


class DiskcacheEngine(Engine):
    name = "diskcache"

    def __init__(self, path: str) -> None:
        import diskcache

        self.cache = diskcache.Cache(path)

    def client(self) -> Client:
        return self.cache.get, self.cache.set

    def close(self) -> None:
        self.cache.close()


ENGINE_CLASSES: dict[str, type[Engine]] = {"kvs": KvsEngine, "sqlite3": Sqlite3Engine, "diskcache": DiskcacheEngine}


def engine_versions() -> dict[str, str]:
    import diskcache

    return {"sqlite": sqlite3.sqlite_version, "diskcache": diskcache.__version__}


# --------------------------------------------------------------------------- helpers
class Workdir:
    """A scratch directory on the same file system as the repository's default temp dir."""

    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="kvs-engine-bench-")
        self._n = 0

    def fresh(self) -> str:
        self._n += 1
        path = os.path.join(self.root, f"d{self._n}")
        os.mkdir(path)
        return path

    def cleanup(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class LiveWriters:
    """Two "pool" threads that write keys ``0..n-1`` (half each) and then stay alive until
    :meth:`release`, so that what they created stays owned by live threads."""

    def __init__(self, engine: Engine, n: int, writers: int = 2) -> None:
        self._release = threading.Event()
        self._written = threading.Barrier(writers + 1)
        self._errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._write, args=(engine, range(w, n, writers)), daemon=True)
                         for w in range(writers)]
        for t in self._threads:
            t.start()
        self._written.wait()
        if self._errors:
            self.release()
            raise self._errors[0]

    def _write(self, engine: Engine, ids: range) -> None:
        try:
            _get, set_ = engine.client()
            for i in ids:
                set_(key_of(i), value_of(i))
        except BaseException as exc:
            self._errors.append(exc)
        self._written.wait()
        self._release.wait()

    def release(self) -> None:
        self._release.set()
        for t in self._threads:
            t.join()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- benchmarks
def bench_set_get(work: Workdir, engine_names: Sequence[str], n: int, reps: int) -> list[dict]:
    """Single-thread set then get, the engines' rounds interleaved (kvs, sqlite3, diskcache,
    kvs, ...): a slow phase of a shared VM then weighs on every engine alike, and each round
    gives kvs's ratio to the best peer of that same round (``ratio_to_best_peer``)."""
    ids = list(range(n))
    keys = [key_of(i) for i in ids]
    values = [value_of(i) for i in ids]
    order = ids[:]
    random.Random(1).shuffle(order)
    get_keys = [keys[i] for i in order]
    get_values = [values[i] for i in order]
    latest: dict[str, tuple[str, Engine]] = {}

    def one_set(name: str, count: int = n) -> float:
        path = work.fresh()
        engine = ENGINE_CLASSES[name](path)
        _get, set_ = engine.client()
        t0 = time.perf_counter()
        for k, v in zip(keys[:count], values[:count], strict=True):
            set_(k, v)
        elapsed = time.perf_counter() - t0
        if name in latest:  # only the newest store of each engine is kept (for the gets)
            old_path, old = latest[name]
            old.close()
            remove_dir(old_path)
        latest[name] = (path, engine)
        return elapsed

    def one_get(name: str) -> float:
        get, _set = latest[name][1].client()
        t0 = time.perf_counter()
        for k, v in zip(get_keys, get_values, strict=True):
            if get(k) != v:
                raise AssertionError(f"{name}: wrong value for {k}")
        return time.perf_counter() - t0

    set_seconds: dict[str, list[float]] = {e: [] for e in engine_names}
    get_seconds: dict[str, list[float]] = {e: [] for e in engine_names}
    try:
        # Each set round builds a fresh store; the warm-up is a round of a tenth of the keys
        # (a full round of diskcache sets is slow, and a tenth warms every code path).
        # Gets warm up on the full store.
        for name in engine_names:
            one_set(name, n // 10)
        for _ in range(reps):
            for name in engine_names:
                set_seconds[name].append(one_set(name))
        for name in engine_names:
            one_get(name)
        for _ in range(reps):
            for name in engine_names:
                get_seconds[name].append(one_get(name))
    finally:
        for path, engine in latest.values():
            engine.close()
            remove_dir(path)
    out = []
    for bench, seconds in (("set_1thread", set_seconds), ("get_1thread", get_seconds)):
        peers = [e for e in engine_names if e != "kvs"]
        for name in engine_names:
            extra: dict[str, float] = {}
            if name == "kvs" and peers:
                extra["ratio_to_best_peer"] = statistics.median(
                    min(seconds[p][r] for p in peers) / seconds["kvs"][r] for r in range(reps))
            out.append(record(SUITE, bench, engine=name, threads=1, keys=n, **extra,
                              **throughput_stats(n, seconds[name])))
    return out


def bench_get_threads(work: Workdir, engine_name: str, n: int, reps: int) -> list[dict]:
    path = work.fresh()
    engine = ENGINE_CLASSES[engine_name](path)
    writers = LiveWriters(engine, n)
    out = []
    try:
        def prep(t: int, threads: int) -> Callable[[], None]:
            # This thread's share of n gets, over keys it builds itself.
            rng = random.Random(t)
            ids = rng.sample(range(n), n // threads)
            keys = [key_of(i) for i in ids]
            values = [value_of(i) for i in ids]
            get, _set = engine.client()
            get(keys[0])  # first use: connection / reader slot set-up

            def work() -> None:
                for k, v in zip(keys, values, strict=True):
                    if get(k) != v:
                        raise AssertionError(f"{engine_name}: wrong value for {k}")

            return work

        def once(threads: int) -> float:
            return run_prepared_threads_timed([lambda t=t: prep(t, threads) for t in range(threads)])

        # The machine's own 2-thread scaling in the same rounds: pure arithmetic on private
        # locals, the same total work split over the threads (kvs only, once is enough).
        control_work = 20 * n

        def control(threads: int) -> float:
            share = control_work // threads
            return run_prepared_threads_timed([lambda: partial(_arithmetic, share)] * threads)

        controls = (1, 2) if engine_name == "kvs" else ()
        control_seconds: dict[int, list[float]] = {t: [] for t in controls}

        # Rounds of 1, 2 and 4 threads, interleaved: a slow phase of the machine (a shared VM
        # is noisy) then weighs on every thread count alike, and each round gives a ratio.
        for threads in THREAD_COUNTS:
            once(threads)  # warm-up (fills the value cache of the kvs engine)
        seconds: dict[int, list[float]] = {t: [] for t in THREAD_COUNTS}
        for _ in range(reps):
            for threads in THREAD_COUNTS:
                seconds[threads].append(once(threads))
            for threads in controls:
                control_seconds[threads].append(control(threads))
        if controls:
            paired = [one / two for one, two in zip(control_seconds[1], control_seconds[2], strict=True)]
            out.append(record(SUITE, "cpu_control", threads=2, ratio_to_1_thread=statistics.median(paired),
                              ratios=paired, **throughput_stats(control_work, control_seconds[2])))
        for threads in THREAD_COUNTS:
            ops = (n // threads) * threads
            paired = [(ops / s) / (n / one) for s, one in zip(seconds[threads], seconds[1], strict=True)]
            out.append(record(SUITE, "get_threads", engine=engine_name, threads=threads, keys=n,
                              ratio_to_1_thread=statistics.median(paired), **throughput_stats(ops, seconds[threads])))
    finally:
        writers.release()
        engine.close()
        remove_dir(path)
    return out


def _arithmetic(iterations: int) -> None:
    """CPU-only work on private locals: what two threads of this machine can scale to."""
    x = 0
    for i in range(iterations):
        x = (x + i * 7) & 0xFFFF


def start_compaction(store: KvStore) -> tuple[threading.Thread, list[BaseException]]:
    """``store.compact()`` started in a thread of its own; the list receives its exception."""
    errors: list[BaseException] = []

    def compact() -> None:
        try:
            store.compact()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=compact)
    thread.start()
    return thread, errors


def bench_latency(work: Workdir, n: int, reps: int) -> list[dict]:
    """Per-get latency on KvStore, idle and while compact() runs in a background thread."""
    path = work.fresh()
    store = KvStore.open(path, background_compaction=False)
    versions = 3
    rng = random.Random(7)
    idle: list[list[float]] = []
    busy: list[list[float]] = []
    clock = time.perf_counter

    def rewrite() -> None:  # leaves (versions - 1) stale records per key
        for _ in range(versions):
            for i in range(n):
                store.set(key_of(i), value_of(i))

    def sample(go_on: Callable[[], bool], limit: int) -> list[float]:
        """Up to ``limit`` get latencies, while ``go_on()``."""
        lat = []
        get = store.get
        keys = [key_of(i) for i in range(n)]
        values = [value_of(i) for i in range(n)]
        while len(lat) < limit and go_on():
            i = rng.randrange(n)
            k = keys[i]
            t0 = clock()
            v = get(k)
            lat.append(clock() - t0)
            if v != values[i]:
                raise AssertionError(f"kvs: wrong value for {k}")
        return lat

    try:
        for rep in range(reps + 1):
            rewrite()
            lat = sample(lambda: True, 4 * n)
            if rep:
                idle.append(lat)
            before = store.stats()["compactions"]
            compactor, errors = start_compaction(store)
            # At most as many samples as idle: with the GIL on, the sampling loop starves the
            # compactor and would otherwise sample for minutes. Every sample is taken while
            # the compaction runs either way.
            lat = sample(compactor.is_alive, 4 * n)
            compactor.join()
            if errors:
                raise errors[0]
            assert store.stats()["compactions"] == before + 1
            stats = store.stats()
            assert stats["total_bytes"] < 2 * stats["live_bytes"], stats
            if rep:
                busy.append(lat)
    finally:
        store.close()
        remove_dir(path)

    def med(samples: list[list[float]]) -> dict[str, float]:
        per = [latency_stats(s) for s in samples]
        return {"p50_us": statistics.median(p["p50_us"] for p in per),
                "p99_us": statistics.median(p["p99_us"] for p in per),
                "samples": int(statistics.median(len(s) for s in samples)), "reps": len(samples)}

    return [record(SUITE, "get_latency_idle", engine="kvs", threads=1, keys=n, **med(idle)),
            record(SUITE, "get_latency_compacting", engine="kvs", threads=1, keys=n, **med(busy))]


TTL_SECONDS = 86_400
"""The TTL of every key of the ``index_memory_ttl`` store."""


def build_big_store(path: str, n: int, ttl: float | None = None) -> None:
    """A KvStore of ``n`` keys written twice (so a compaction has work), compacted: every
    record then sits in compaction outputs with hint files. With ``ttl``, every key has one."""
    with KvStore.open(path, background_compaction=False, expire_sweep_interval=0) as store:
        for _ in range(2):
            for i in range(n):
                store.set(key_of(i), value_of(i), ttl=ttl)
        store.compact()
        assert len(store) == n


_MEMORY_CHILD = r"""
import gc, json, os, sys
from kvs.engine import KvStore
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
gc.collect()
before = rss()
store = KvStore.open(sys.argv[1], background_compaction=False, expire_sweep_interval=0)
gc.collect()
after = rss()
n = len(store)
key_bytes = sum(len(k.encode()) for k in store.keys())
assert store.get(sys.argv[2]) is not None
store.close()
print(json.dumps({"before": before, "after": after, "keys": n, "key_bytes": key_bytes}))
"""


def index_bytes_per_key(path: str, n: int, reps: int) -> list[float]:
    """``reps`` measurements of the index's bytes per key of the store at ``path``, each in a
    fresh process."""
    results = []
    for _ in range(reps):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, path, key_of(n - 1)], capture_output=True,
                             text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True)
        m = json.loads(out.stdout)
        assert m["keys"] == n, m
        results.append((m["after"] - m["before"] - m["key_bytes"]) / n)
    return results


def bench_index_memory(path: str, n: int, reps: int) -> list[dict]:
    results = index_bytes_per_key(path, n, reps)
    return [record(SUITE, "index_memory", engine="kvs", keys=n, bytes_per_key=statistics.median(results),
                   reps=len(results), key_text_bytes_per_key=len(key_of(0)))]


def bench_index_memory_ttl(path: str, plain_path: str, n: int, reps: int) -> list[dict]:
    """``index_memory`` with a TTL on every key, measured in the same rounds as the store
    without TTLs (``plain_path``), so that the difference is paired."""
    with_ttl, plain = [], []
    for _ in range(reps):
        with_ttl += index_bytes_per_key(path, n, 1)
        plain += index_bytes_per_key(plain_path, n, 1)
    diffs = [a - b for a, b in zip(with_ttl, plain, strict=True)]
    return [record(SUITE, "index_memory_ttl", engine="kvs", keys=n, bytes_per_key=statistics.median(with_ttl),
                   ttl_bytes_per_key=statistics.median(diffs), reps=reps, ttl_seconds=TTL_SECONDS,
                   key_text_bytes_per_key=len(key_of(0)))]


def dir_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())


def bench_clear(path: str, n: int) -> list[dict]:
    """One ``clear()`` of the store at ``path`` (destroys its data)."""
    with KvStore.open(path, background_compaction=False, expire_sweep_interval=0) as store:
        assert len(store) == n
        before = dir_bytes(path)
        t0 = time.perf_counter()
        store.clear()
        elapsed = time.perf_counter() - t0
        assert len(store) == 0
        after = dir_bytes(path)
    return [record(SUITE, "clear", engine="kvs", keys=n, seconds=elapsed, dir_bytes_before=before,
                   dir_bytes_after=after, reps=1)]


def bench_open(path: str, n: int, reps: int) -> list[dict]:
    def open_once() -> float:
        gc.collect()
        t0 = time.perf_counter()
        store = KvStore.open(path, background_compaction=False)
        elapsed = time.perf_counter() - t0
        try:
            assert len(store) == n and store.get(key_of(n // 2)) == value_of(n // 2)
        finally:
            store.close()
        return elapsed

    hint_files = list(Path(path).glob("*.hint"))
    assert hint_files, "the compacted store has no hint files"
    # No warm-up run: the files were just written (page cache warm) and an open is long.
    from_hints = repeat(open_once, reps, warmup=0)
    for h in hint_files:
        h.unlink()
    from_log = repeat(open_once, reps, warmup=0)
    return [record(SUITE, "open_from_hints", engine="kvs", keys=n, seconds=statistics.median(from_hints), reps=reps),
            record(SUITE, "open_from_log", engine="kvs", keys=n, seconds=statistics.median(from_log), reps=reps)]


# --------------------------------------------------------------------------- driver
def run(quick: bool, progress: Progress = no_progress, only: Sequence[str] | None = None) -> list[dict]:
    """Run the engine suite; ``only`` restricts it to some of :data:`BENCHMARKS`."""
    selected = [b for b in BENCHMARKS if only is None or b in only]
    n = 10_000 if quick else 100_000
    big = 50_000 if quick else 1_000_000
    reps = 3
    if gil_enabled() and only is None:
        # Index memory, open and clear times are single-threaded properties of the engine: measured
        # once, in the free-threaded run (the A/B is about threads, and these take minutes).
        selected = [b for b in selected if b not in ("index_memory", "open", "index_memory_ttl", "clear")]
    if SMOKE:
        n, big, reps = 300, 2_000, 1
    steps: list[tuple[str, Callable[[], list[dict]]]] = []
    work = Workdir()
    big_path: list[str] = []

    def big_store() -> str:
        if not big_path:
            big_path.append(work.fresh())
            build_big_store(big_path[0], big)
        return big_path[0]

    ttl_path: list[str] = []

    def ttl_store() -> str:
        if not ttl_path:
            ttl_path.append(work.fresh())
            build_big_store(ttl_path[0], big, ttl=TTL_SECONDS)
        return ttl_path[0]

    if "set_get" in selected:
        steps.append((f"set/get 1 thread, interleaved: {', '.join(ENGINES)}",
                      lambda: bench_set_get(work, ENGINES, n, reps)))
    for name in ENGINES:
        if "get_threads" in selected:
            steps.append((f"get 1/2/4 threads: {name}",
                          lambda name=name: bench_get_threads(work, name, n, 1 if SMOKE else 4)))
    if "latency" in selected:
        steps.append(("get latency idle/compacting: kvs", lambda: bench_latency(work, n, reps)))
    if "index_memory" in selected:
        steps.append((f"index memory at {big} keys", lambda: bench_index_memory(big_store(), big, 2)))
    if "index_memory_ttl" in selected:
        steps.append((f"index memory at {big} keys, each with a TTL",
                      lambda: bench_index_memory_ttl(ttl_store(), big_store(), big, 2)))
    if "open" in selected:
        steps.append((f"open {big} keys: hints vs log", lambda: bench_open(big_store(), big, reps)))
    if "clear" in selected:  # last: it destroys the TTL store
        steps.append((f"clear() of {big} keys", lambda: bench_clear(ttl_store(), big)))

    records: list[dict] = []
    versions = engine_versions()
    try:
        for done, (description, step) in enumerate(steps):
            progress(done, len(steps), description)
            for rec in step():
                rec.setdefault("versions", versions)
                if "keys" in rec:
                    rec.setdefault("value_bytes", VALUE_BYTES)
                records.append(rec)
        progress(len(steps), len(steps), "done")
    finally:
        work.cleanup()
    return records


def print_table(records: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 130))
    table = Table(title="kvs engine benchmarks")
    for col in ("benchmark", "engine", "threads", "GIL", "ops/s", "p50 µs", "p99 µs", "other"):
        table.add_column(col, justify="right" if col not in ("benchmark", "engine") else "left")
    fmt = lambda x, spec: "" if x is None else format(x, spec)
    for r in records:
        other = []
        if "bytes_per_key" in r:
            other.append(f"{r['bytes_per_key']:.0f} B/key")
        if "ttl_bytes_per_key" in r:
            other.append(f"TTL +{r['ttl_bytes_per_key']:.0f} B/key")
        if "dir_bytes_after" in r:
            other.append(f"dir {r['dir_bytes_before']:,} -> {r['dir_bytes_after']:,} bytes")
        if "seconds" in r:
            other.append(f"{r['seconds']:.2f} s")
        if "keys" in r:
            other.append(f"{r['keys']} keys")
        table.add_row(r["benchmark"], r["engine"] or "", fmt(r["threads"], "d"), "on" if r["gil"] else "off",
                      fmt(r["ops_per_sec"], ",.0f"), fmt(r["p50_us"], ".2f"), fmt(r["p99_us"], ".2f"),
                      ", ".join(other))
    console.print(table)
    by = {(r["benchmark"], r["engine"], r["threads"]): r for r in records}
    lines = []
    for bench in ("set_1thread", "get_1thread"):
        kvs = by.get((bench, "kvs", 1))
        peers = [by[(bench, e, 1)]["ops_per_sec"] for e in ("sqlite3", "diskcache") if (bench, e, 1) in by]
        if kvs and peers:
            lines.append(f"{bench}: kvs / best peer = {kvs['ops_per_sec'] / max(peers):.2f}x (of medians); "
                         f"median of paired rounds: {kvs.get('ratio_to_best_peer', float('nan')):.2f}x")
    control = by.get(("cpu_control", None, 2))
    if control:
        lines.append(f"cpu_control (pure arithmetic, nothing shared): 2 threads / 1 = median "
                     f"{control['ratio_to_1_thread']:.2f}x, rounds {', '.join(f'{r:.2f}' for r in control['ratios'])}")
    for e in ENGINES:
        one, two = by.get(("get_threads", e, 1)), by.get(("get_threads", e, 2))
        four = by.get(("get_threads", e, 4))
        if one and two and four:
            lines.append(f"get_threads {e}: 2 threads / 1 = {two['ops_per_sec'] / one['ops_per_sec']:.2f}x, "
                         f"4 / 1 = {four['ops_per_sec'] / one['ops_per_sec']:.2f}x (of medians); median of "
                         f"paired rounds: {two['ratio_to_1_thread']:.2f}x, {four['ratio_to_1_thread']:.2f}x")
    for line in lines:
        console.print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS)
    parser.add_argument("--json", type=Path, help="also write the records to this file")
    args = parser.parse_args(argv)

    def progress(done: int, total: int, description: str) -> None:
        print(f"[{done}/{total}] {description}", file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    records = run(args.quick, progress, args.only)
    print(f"GIL {'enabled' if records and records[0]['gil'] else 'disabled'}; {time.perf_counter() - t0:.1f} s; "
          f"load average before/after: {os.getloadavg()[0]:.2f}", file=sys.stderr)
    print_table(records)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

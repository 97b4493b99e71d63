"""YCSB core workloads at a million records: kvs against stdlib sqlite3, diskcache and dbm.sqlite3.

    python -m bench.ycsb_bench [--quick] [--records N] [--ops N] [--rounds N]
                               [--workload A ...] [--engine NAME ...] [--json FILE]

The engine suite measures ``get`` where every key fits the value cache; real stores have more
keys than any cache. This suite loads ``records`` records (default 1M; quick 100k) into every
engine, then runs YCSB's core workloads A, B, C, D, F and a uniform read-only workload U
(``bench/ycsb_workloads.py`` defines them and YCSB's request distributions) with 1 and 2
threads, ``ops`` operations per workload (default 200k; quick 20k) split over the threads.

Engines, all with the durability of KvStore's default (an acknowledged write has been handed
to the OS: it survives a kill -9, not a power loss):

- ``kvs``: ``KvStore.open(dir)`` with its defaults.
- ``kvs-cache-off``: the same with ``cache_entries=0``: what the value cache buys or costs.
- ``sqlite3``: stdlib sqlite3 used directly, WAL, ``synchronous=NORMAL``, a connection per
  thread (``bench.engine_bench.Sqlite3Engine``).
- ``diskcache``: ``diskcache.Cache(dir)`` with its defaults (``bench.engine_bench``).
- ``dbm.sqlite3`` (new in Python 3.13): ``dbm.sqlite3.open(file, "c")``, one per thread
  (its connection may only be used by the thread that opened it), with
  ``PRAGMA synchronous=NORMAL`` on its connection (its default, FULL, would fsync every
  write, which none of the others do). Its keys and values are bytes.

Method. The records are loaded once per engine (bulk, not timed). Every round runs every
workload at 1 and 2 threads on every engine, the engines' order rotating by round; the
operation sequences are generated before timing (each thread materializes its own key and
value objects in an untimed preparation) and every read is checked (the value must exist and
begin with its key). Before the first round every engine runs one untimed pass of workload C
(a running system's caches are warm). ``ratio_to_best_peer`` (kvs and kvs-cache-off) is the
median over rounds of the engine's ops/s over the best of sqlite3, diskcache and dbm.sqlite3
in the same round; ``ratio_to_cache_off`` (kvs) the same against kvs-cache-off. After the
rounds, one more pass of every workload and thread count times each operation
(``time.perf_counter_ns``) for the p50/p99 latency in microseconds; that pass is not in the
throughput. Workload D inserts new records every round (numbered after the earlier rounds').
"""

from __future__ import annotations

import argparse
import dbm.sqlite3
import json
import os
import sqlite3
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench import ycsb_workloads as yw
from bench.common import (
    SMOKE,
    Progress,
    gil_enabled,
    latency_stats,
    no_progress,
    record,
    run_prepared_threads_timed,
    throughput_stats,
)
from bench.engine_bench import DiskcacheEngine, Engine, Sqlite3Engine, Workdir, engine_versions
from kvs.engine import KvStore

SUITE = "ycsb"
KVS_ENGINES = ("kvs", "kvs-cache-off")
PEERS = ("sqlite3", "diskcache", "dbm.sqlite3")
ENGINES = (*KVS_ENGINES, *PEERS)
THREAD_COUNTS = (1, 2)
LOAD_BATCH = 1000
Get = Callable[[Any], Any]
Set = Callable[[Any, Any], object]


class BadRead(AssertionError):
    """A read returned no value, or another key's."""


# --------------------------------------------------------------------------- engines
class KvsEngine(Engine):
    name = "kvs"
    options: dict[str, Any] = {}

    def __init__(self, path: str) -> None:
        self.store = KvStore.open(path, **self.options)

    def client(self) -> tuple[Get, Set]:
        return self.store.get, self.store.set

    def load(self, items: list[tuple[str, str]]) -> None:
        for i in range(0, len(items), LOAD_BATCH):
            self.store.set_batch(items[i:i + LOAD_BATCH])

    def close(self) -> None:
        self.store.close()


class KvsCacheOffEngine(KvsEngine):
    name = "kvs-cache-off"
    options = {"cache_entries": 0}


class YcsbSqlite3Engine(Sqlite3Engine):
    def load(self, items: list[tuple[str, str]]) -> None:
        conn = self._connect()
        conn.execute("BEGIN")
        conn.executemany("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)", items)
        conn.execute("COMMIT")


class YcsbDiskcacheEngine(DiskcacheEngine):
    def load(self, items: list[tuple[str, str]]) -> None:
        set_ = self.cache.set
        for i in range(0, len(items), LOAD_BATCH):
            with self.cache.transact():
                for key, value in items[i:i + LOAD_BATCH]:
                    set_(key, value)


class DbmSqlite3Engine(Engine):
    """``dbm.sqlite3``: one handle per thread, opened by the thread that uses it, and closed
    by that thread's exit (a handle's connection refuses other threads, ``close`` included)."""

    name = "dbm.sqlite3"
    binary = True

    def __init__(self, path: str) -> None:
        self.file = os.path.join(path, "bench.dbm.sqlite3")
        dbm.sqlite3.open(self.file, "c").close()

    def _open(self) -> Any:
        db = dbm.sqlite3.open(self.file, "w")
        connection = getattr(db, "_cx", None)  # the module keeps it private; see the docstring above
        if isinstance(connection, sqlite3.Connection):
            connection.execute("PRAGMA synchronous=NORMAL")
        return db

    def client(self) -> tuple[Get, Set]:
        db = self._open()
        return db.__getitem__, db.__setitem__

    def load(self, items: list[tuple[str, str]]) -> None:
        # The module's own statement, in transactions of LOAD_BATCH writes (its handle
        # commits every write on its own).
        store = dbm.sqlite3.STORE_KV
        conn = sqlite3.connect(self.file, isolation_level=None)
        try:
            for i in range(0, len(items), LOAD_BATCH):
                conn.execute("BEGIN")
                conn.executemany(store, [(k.encode(), v.encode()) for k, v in items[i:i + LOAD_BATCH]])
                conn.execute("COMMIT")
        finally:
            conn.close()

    def close(self) -> None:
        pass


ENGINE_CLASSES: dict[str, type[Engine]] = {
    "kvs": KvsEngine, "kvs-cache-off": KvsCacheOffEngine, "sqlite3": YcsbSqlite3Engine,
    "diskcache": YcsbDiskcacheEngine, "dbm.sqlite3": DbmSqlite3Engine,
}


# --------------------------------------------------------------------------- running a sequence
def run_operations(get: Get, set_: Set, ops: list[tuple[int, Any, Any]]) -> None:
    """Run one thread's operations, checking every read."""
    read, rmw = yw.READ, yw.READ_MODIFY_WRITE
    for op, key, value in ops:
        if op == read:
            got = get(key)
            if got is None or not got.startswith(key):
                raise BadRead(f"read of {key!r} returned {got!r}")
        elif op == rmw:
            got = get(key)
            if got is None or not got.startswith(key):
                raise BadRead(f"read of {key!r} returned {got!r}")
            set_(key, value)
        else:  # UPDATE or INSERT
            set_(key, value)


def run_operations_timed(get: Get, set_: Set, ops: list[tuple[int, Any, Any]], latencies: list[int]) -> None:
    """:func:`run_operations`, appending each operation's nanoseconds to ``latencies``."""
    clock = time.perf_counter_ns
    append = latencies.append
    read, rmw = yw.READ, yw.READ_MODIFY_WRITE
    for op, key, value in ops:
        t0 = clock()
        if op == read or op == rmw:
            got = get(key)
            if got is None or not got.startswith(key):
                raise BadRead(f"read of {key!r} returned {got!r}")
            if op == rmw:
                set_(key, value)
        else:
            set_(key, value)
        append(clock() - t0)


def run_workload(engine: Engine, sequences: list[yw.Sequence], latencies: list[list[int]] | None = None) -> float:
    """Seconds for the threads (one per sequence) to run their sequences on ``engine``."""
    binary = getattr(engine, "binary", False)

    def prep(i: int) -> Callable[[], None]:
        ops = sequences[i].materialize(binary)
        get, set_ = engine.client()
        if latencies is None:
            return lambda: run_operations(get, set_, ops)
        lat: list[int] = []
        latencies.append(lat)
        return lambda: run_operations_timed(get, set_, ops, lat)

    return run_prepared_threads_timed([lambda i=i: prep(i) for i in range(len(sequences))])


# --------------------------------------------------------------------------- the suite
def run(quick: bool, progress: Progress = no_progress, records: int | None = None, ops: int | None = None,
        rounds: int | None = None, workloads: Sequence[str] | None = None,
        engines: Sequence[str] | None = None) -> list[dict]:
    """Run the suite; the keyword arguments override the sizes and restrict what runs."""
    n_records = records or (100_000 if quick else 1_000_000)
    n_ops = ops or (20_000 if quick else 200_000)
    n_rounds = rounds or (2 if quick else 3)
    if SMOKE:
        n_records, n_ops, n_rounds = 2_000, 400, 1
    chosen = [w for w in yw.WORKLOADS if workloads is None or w in workloads]
    names = [e for e in ENGINES if engines is None or e in engines]
    generator = yw.Generator(n_records)
    work = Workdir()
    opened: dict[str, Engine] = {}
    seconds: dict[tuple[str, int, str], list[float]] = {}
    latencies: dict[tuple[str, int, str], list[int]] = {}
    load_seconds: dict[str, float] = {}
    steps = len(names) + n_rounds * len(chosen) + len(chosen)
    done = 0
    try:
        items = [(yw.key_of(i), yw.value_of(i, 0)) for i in range(n_records)]
        for name in names:
            progress(done, steps, f"load {n_records:,} records: {name}")
            t0 = time.perf_counter()
            engine = opened[name] = ENGINE_CLASSES[name](work.fresh())
            engine.load(items)  # type: ignore[attr-defined]
            load_seconds[name] = time.perf_counter() - t0
            run_workload(engine, generator.sequences(yw.WORKLOADS["C"], n_ops, 1, round_=n_rounds + 1))  # warm-up
            done += 1
        del items
        for r in range(n_rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for w in chosen:
                progress(done, steps, f"round {r + 1}/{n_rounds}: workload {w}")
                for threads in THREAD_COUNTS:
                    sequences = generator.sequences(yw.WORKLOADS[w], n_ops, threads, round_=r)
                    for name in order:
                        seconds.setdefault((w, threads, name), []).append(run_workload(opened[name], sequences))
                done += 1
        for w in chosen:
            progress(done, steps, f"latency pass: workload {w}")
            for threads in THREAD_COUNTS:
                sequences = generator.sequences(yw.WORKLOADS[w], n_ops, threads, round_=n_rounds)
                for name in names:
                    per_thread: list[list[int]] = []
                    run_workload(opened[name], sequences, per_thread)
                    latencies[(w, threads, name)] = [x for lat in per_thread for x in lat]
            done += 1
        progress(steps, steps, "done")
    finally:
        for engine in opened.values():
            engine.close()
        work.cleanup()
    return make_records(seconds, latencies, load_seconds, chosen, names, n_records, n_ops)


def make_records(seconds: dict[tuple[str, int, str], list[float]], latencies: dict[tuple[str, int, str], list[int]],
                 load_seconds: dict[str, float], workloads: Sequence[str], names: Sequence[str],
                 n_records: int, n_ops: int) -> list[dict]:
    versions = engine_versions()
    versions["dbm.sqlite3"] = f"Python {sys.version.split()[0]}"
    out = []
    for w in workloads:
        for threads in THREAD_COUNTS:
            ops_done = (n_ops // threads) * threads
            rates = {name: [ops_done / s for s in seconds[(w, threads, name)]] for name in names}
            peers = [p for p in PEERS if p in names]
            best = [max(rates[p][r] for p in peers) for r in range(len(rates[names[0]]))] if peers else []
            for name in names:
                extra: dict[str, Any] = {}
                if name in KVS_ENGINES and best:
                    paired = [mine / b for mine, b in zip(rates[name], best, strict=True)]
                    extra.update(ratio_to_best_peer=statistics.median(paired),
                                 ratio_to_best_peer_range=[min(paired), max(paired)])
                if name == "kvs" and "kvs-cache-off" in names:
                    paired = [a / b for a, b in zip(rates["kvs"], rates["kvs-cache-off"], strict=True)]
                    extra.update(ratio_to_cache_off=statistics.median(paired),
                                 ratio_to_cache_off_range=[min(paired), max(paired)])
                lat = latencies.get((w, threads, name))
                stats = latency_stats(np.asarray(lat, dtype=float) / 1e9) if lat else {}
                out.append(record(
                    SUITE, f"ycsb_{w}", engine=name, threads=threads, workload=w,
                    description=yw.WORKLOADS[w].description, records=n_records, ops=ops_done,
                    value_bytes=yw.VALUE_BYTES, load_seconds=round(load_seconds[name], 2),
                    versions=versions, **stats, **extra, **throughput_stats(ops_done, seconds[(w, threads, name)])))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ycsb_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k records, 20k operations, 2 rounds")
    parser.add_argument("--records", type=int, help="records loaded (default 1M)")
    parser.add_argument("--ops", type=int, help="operations per workload and thread count (default 200k)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3)")
    parser.add_argument("--workload", action="append", choices=list(yw.WORKLOADS), help="a workload (repeatable)")
    parser.add_argument("--engine", action="append", choices=list(ENGINES), help="an engine (repeatable)")
    parser.add_argument("--json", type=Path, help="also write the records to this file")
    args = parser.parse_args(argv)
    for flag in ("records", "ops", "rounds"):
        value = getattr(args, flag)
        if value is not None and value < (2 if flag == "records" else 1):
            parser.error(f"--{flag} must be at least {2 if flag == 'records' else 1}")
    t0 = time.perf_counter()
    records = run(args.quick, records=args.records, ops=args.ops, rounds=args.rounds,
                  workloads=args.workload, engines=args.engine)
    print(f"GIL {'enabled' if gil_enabled() else 'disabled'}; {time.perf_counter() - t0:.1f} s")
    from rich.console import Console

    from bench.report import ycsb_table

    Console().print(ycsb_table(records))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

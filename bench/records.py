"""Reading a results file: the metadata record, finding records, and the comparisons shown.

A results file (``results.json``, schema in ``bench/README.md``) is a JSON list: the metadata
record first, then one record per measurement. The README's tables (``bench/readme.py``) and
the plots (``bench/plots.py``) both pick their records through :func:`one`, and both show
the same comparisons, defined once here: :data:`FREE_THREADING` (the same measurement with
the GIL off and on) and :data:`PEER_ENGINES` (kvs against the engines it is compared with).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def load(path: Path) -> tuple[Record, list[Record]]:
    """The metadata record and the result records of the results file at ``path``."""
    results = json.loads(Path(path).read_text())
    if not results or results[0].get("suite") != "meta":
        raise ValueError(f"{path}: not a results file (its first element is not the metadata record)")
    return results[0], results[1:]


def matches(rec: Record, criteria: dict[str, Any]) -> bool:
    """True when ``rec`` has every field of ``criteria`` with that value."""
    return all(key in rec and rec[key] == value for key, value in criteria.items())


def one(records: list[Record], **criteria: Any) -> Record:
    """The one record with every field of ``criteria``; ``LookupError`` when there is none or
    more than one (the criteria then do not say what was measured: a bug of the caller's)."""
    found = [r for r in records if matches(r, criteria)]
    if len(found) != 1:
        what = ", ".join(f"{k}={v!r}" for k, v in criteria.items())
        raise LookupError(f"{len(found)} records with {what} (expected exactly one; is this a full run?)")
    return found[0]


@dataclass(frozen=True)
class Comparison:
    """One measurement taken twice, with the GIL off and on: ``criteria`` select it (without
    ``gil``). A ``control`` is not kvs: it shows what the machine gave, or how much it
    drifted between the two runs, and is drawn apart from the comparisons of kvs."""


    label: str
    criteria: dict[str, Any]
    control: bool = False
    in_table: bool = True
    """Shown in the README's table too (the plot shows every comparison)."""

    def pair(self, records: list[Record]) -> tuple[Record, Record]:
        """The (GIL off, GIL on) records of this measurement."""
        return one(records, gil=False, **self.criteria), one(records, gil=True, **self.criteria)

    def measured(self, records: list[Record]) -> bool:
        """True when the run measured this (both GIL modes, with a throughput)."""
        try:
            off, on = self.pair(records)
        except LookupError:
            return False
        return bool(off["ops_per_sec"] and on["ops_per_sec"])

    def ratio(self, records: list[Record]) -> float:
        """Throughput with the GIL off over throughput with it on."""
        off, on = self.pair(records)
        return float(off["ops_per_sec"]) / float(on["ops_per_sec"])


@dataclass(frozen=True)
class SuiteComparisons:
    """What free threading buys in one suite: its title and its comparisons."""

    suite: str
    title: str
    comparisons: list[Comparison] = field(default_factory=list)


def _load_suite(op: str, connections: int, pipeline: int) -> dict[str, Any]:
    return {"suite": "load", "engine": "kvs", "workload": op, "connections": connections, "pipeline": pipeline}


def _resp(server: str, op: str, connections: int, pipeline: int) -> dict[str, Any]:
    return {"suite": "resp", "benchmark": op, "engine": server, "connections": connections, "pipeline": pipeline}


def _server(workload: str, threads: int) -> dict[str, Any]:
    return {"suite": "server", "benchmark": f"{workload}_shared_queue_kvs_leader_followers", "threads": threads}


def _pool(pool: str, threads: int) -> dict[str, Any]:
    return {"suite": "pool", "benchmark": "work_50us_jobs", "pool": pool, "threads": threads, "producers": 1}


FREE_THREADING = [
    SuiteComparisons("engine", "kvs engine, in process", [
        Comparison("set, 1 thread", {"suite": "engine", "benchmark": "set_1thread", "engine": "kvs"}),
        *(Comparison(f"get, {n} thread{'s' if n > 1 else ''}",
                     {"suite": "engine", "benchmark": "get_threads", "engine": "kvs", "threads": n})
          for n in (1, 2, 4)),
        Comparison("pure arithmetic, 2 threads", {"suite": "engine", "benchmark": "cpu_control"}, control=True),
    ]),
    SuiteComparisons("resp", "kvs-server, redis-benchmark", [
        *(Comparison(f"{op.upper()}, {label}", _resp("kvs", op, c, p))
          for c, p, label in ((1, 1, "1 connection"), (50, 1, "50 connections"), (50, 16, "50 conns, pipelined 16"))
          for op in ("set", "get")),
        Comparison("Redis GET, 50 connections", _resp("redis", "get", 50, 1), control=True),
        Comparison("Redis SET, 50 connections", _resp("redis", "set", 50, 1), control=True),
    ]),
    SuiteComparisons("load", "kvs-server, Python client", [
        Comparison(f"{op.upper()}, {label}", _load_suite(op, c, p), in_table=c == 50 and p == 1)
        for c, p, label in ((1, 1, "1 connection"), (50, 1, "50 connections"), (50, 16, "50 conns, pipelined 16"))
        for op in ("set", "get")
    ]),
    SuiteComparisons("server", "course benchmark, default configuration", [
        Comparison(f"{workload}, {n} pool thread{'s' if n > 1 else ''}", _server(workload, n), in_table=n == 2)
        for workload in ("write", "read") for n in (1, 2, 4)
    ]),
    SuiteComparisons("pool", "thread pools, jobs of 50 us of CPU work", [
        Comparison(f"{pool}, {n} threads", _pool(pool, n), in_table=n == 2)
        for pool in ("shared-queue", "work-stealing", "executor") for n in (2, 4)
    ]),
]
"""The comparisons of what free threading buys, per suite, in the order they are shown."""

CLEAR_CHANGE = 0.1
"""An off/on ratio within this of 1 is shown as no clear change: the two GIL modes run minutes
apart, and a shared VM's speed drifts in between (the resp suite's Redis control, which runs no
Python, shows by how much in each run)."""


def value_bytes(rec: Record) -> int:
    """The value size of an engine suite record; runs before the field was recorded used 100."""
    return int(rec.get("value_bytes", 100))


def redis_benchmark_options(rec: Record) -> str:
    """The redis-benchmark options of a resp suite record beyond the command line's own
    (connections, pipeline); runs before the field was recorded used ``-r 100000 -d 100``."""
    return str(rec.get("redis_benchmark_options", "-r 100000 -d 100"))


PEER_ENGINES = [("kvs", "kvs"), ("sqlite3", "stdlib sqlite3 (WAL, NORMAL)"), ("diskcache", "diskcache")]
"""The engine suite's engines, as (``engine`` field, label), kvs first."""

YCSB_ENGINES = [("kvs", "kvs"), ("kvs-cache-off", "kvs, cache off"), ("sqlite3", "stdlib sqlite3 (WAL, NORMAL)"),
                ("diskcache", "diskcache"), ("dbm.sqlite3", "dbm.sqlite3")]
"""The ycsb suite's engines, as (``engine`` field, label), kvs first."""
YCSB_WORKLOADS = ("A", "B", "C", "D", "F", "U")
"""The ycsb suite's workloads in the order its tables and plot show them."""

ENGINE_THREADS = (1, 2, 4)
"""The reader thread counts of the engine suite's ``get_threads``."""

"""What every benchmark suite shares: result records, statistics, timed thread groups.

A suite module exposes ``run(quick: bool, progress: Progress) -> list[dict]`` returning
records made by :func:`record`. Statistics are computed with numpy over repetitions that
follow a warm-up; every benchmark asserts its results are correct before its numbers count.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

SMOKE = __import__("os").environ.get("KVS_BENCH_SMOKE") == "1"
"""Set by the test suite's smoke run (``KVS_BENCH_SMOKE=1``): every suite shrinks to the
least work that still exercises all of its code paths and assertions."""


class Progress(Protocol):
    """Where a suite reports progress: ``progress(done_steps, total_steps, description)``."""

    def __call__(self, done: int, total: int, description: str) -> None: ...


def no_progress(done: int, total: int, description: str) -> None:
    """A Progress that shows nothing (tests, scripts)."""


def gil_enabled() -> bool:
    """True when this process runs with the GIL (PYTHON_GIL=1 or a GIL build)."""
    return bool(getattr(sys, "_is_gil_enabled", lambda: True)())


def record(
    suite: str,
    benchmark: str,
    *,
    engine: str | None = None,
    pool: str | None = None,
    threads: int | None = None,
    ops_per_sec: float | None = None,
    p50_us: float | None = None,
    p99_us: float | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """One result record (schema in bench/README.md); ``extra`` adds suite-specific fields."""
    rec: dict[str, Any] = {
        "suite": suite,
        "benchmark": benchmark,
        "engine": engine,
        "pool": pool,
        "threads": threads,
        "gil": gil_enabled(),
        "ops_per_sec": None if ops_per_sec is None else float(ops_per_sec),
        "p50_us": None if p50_us is None else float(p50_us),
        "p99_us": None if p99_us is None else float(p99_us),
    }
    rec.update(extra)
    return rec


def throughput_stats(ops: int, seconds: Sequence[float]) -> dict[str, float]:
    """Median and p5/p95 throughput (ops/s) over repetitions that each did ``ops`` operations
    in ``seconds[i]``. Keys: ops_per_sec, ops_per_sec_p5, ops_per_sec_p95, reps."""
    rates = ops / np.asarray(seconds, dtype=float)
    return {
        "ops_per_sec": float(np.median(rates)),
        "ops_per_sec_p5": float(np.percentile(rates, 5)),
        "ops_per_sec_p95": float(np.percentile(rates, 95)),
        "reps": len(rates),
    }


def latency_stats(latencies_s: Sequence[float] | np.ndarray) -> dict[str, float]:
    """p50 and p99 latency in microseconds of per-operation latencies given in seconds."""
    arr = np.asarray(latencies_s, dtype=float) * 1e6
    return {"p50_us": float(np.percentile(arr, 50)), "p99_us": float(np.percentile(arr, 99))}


def repeat(fn: Callable[[], float], reps: int, warmup: int = 1) -> list[float]:
    """Run ``fn`` (which returns the seconds its timed region took) ``warmup`` times
    untimed, then ``reps`` times; the list of timed seconds."""
    for _ in range(warmup):
        fn()
    return [fn() for _ in range(reps)]


def run_threads_timed(workers: Sequence[Callable[[], None]]) -> float:
    """Start one thread per worker, release them together from a barrier, and return the
    wall time from the first worker's start to the last one's end. Thread start-up is not
    timed. A worker's exception is re-raised here (benchmarks assert correctness)."""
    return run_prepared_threads_timed([lambda w=w: w for w in workers])


def run_prepared_threads_timed(preps: Sequence[Callable[[], Callable[[], None]]]) -> float:
    """Like :func:`run_threads_timed`, but each thread first runs its ``prep`` (not timed:
    build keys, open connections), which returns the timed work. All threads are released
    together from a barrier once every prep is done; each thread reads the clock itself, so
    a late wake-up of the calling thread cannot shorten the measurement."""
    n = len(preps)
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []
    started = [0.0] * n
    done = [0.0] * n

    def body(i: int, prep: Callable[[], Callable[[], None]]) -> None:
        work: Callable[[], None] | None = None
        try:
            work = prep()
        except BaseException as exc:  # collected and re-raised in the caller
            errors.append(exc)
        barrier.wait()
        started[i] = time.perf_counter()
        if work is not None:
            try:
                work()
            except BaseException as exc:
                errors.append(exc)
        done[i] = time.perf_counter()

    threads = [threading.Thread(target=body, args=(i, p), daemon=True) for i, p in enumerate(preps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return max(done) - min(started)


def metadata(**extra: Any) -> dict[str, Any]:
    """The metadata record of a run: interpreter and build, CPUs, git revision, date, load and
    the busiest other processes (what else was running)."""
    import datetime
    import os
    import platform
    import subprocess
    import sysconfig

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                                  cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    try:
        ps = subprocess.run(["ps", "-eo", "pcpu,comm", "--sort=-pcpu", "--no-headers"],
                            capture_output=True, text=True, timeout=10).stdout.splitlines()[:8]
    except (OSError, subprocess.SubprocessError):
        ps = []
    return {
        "suite": "meta",
        "python_version": sys.version,
        "python_implementation": platform.python_implementation(),
        "free_threaded_build": sysconfig.get_config_var("Py_GIL_DISABLED") == 1,
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "git_revision": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average_before": os.getloadavg(),
        "busiest_processes_before": [line.strip() for line in ps],
        **extra,
    }

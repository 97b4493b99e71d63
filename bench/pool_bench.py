"""Thread pool benchmarks: the four pools of ``kvs.thread_pool`` on the same workloads.

Benchmarks (records: suite "pool", ``pool``, ``threads``, ``producers``, ``jobs``):

* ``trivial_jobs``: throughput of jobs that do nothing but count themselves done (100k per
  run): the pools' own per-job cost, spawn to completion.
* ``work_50us_jobs``: throughput of 10k jobs that each run ~50 us of pure-Python CPU work (a
  loop calibrated once per process): how well the pool turns threads into parallel work.
* ``spawn_latency``: spawn-to-start latency, p50/p99. Each producer runs a closed loop: it
  timestamps, spawns a job that timestamps its own start and sets an Event, and waits for
  that Event before the next spawn. So there is no queueing: this is the dispatch path,
  wake-up of an idle worker included (a job arrives at an idle pool, as requests do).
* ``nested_spawn``: jobs that spawn jobs. Producers spawn roots; every job at depth < 3 spawns
  4 children (a root makes 1 + 4 + 16 + 64 = 85 jobs). Where work stealing should shine:
  children go to the spawning worker's own deque.

Every configuration runs for each pool with 1, 2 and 4 threads, from 1 and from 4 producer
threads. ``NaiveThreadPool`` starts a thread per job, so it gets fewer jobs (its rate is still
per job; ``jobs`` says how many) and its ``threads`` is nominal.

Method. All four pools of a configuration exist at once and their runs are interleaved (A,
B, C, D, A, B, ...): one warm-up round, then timed rounds (full: 5 for the short trivial and
nested runs, 3 for the others); the figure is the median over the timed rounds (p5/p95
alongside). Interleaving makes a change of machine load during
the suite hit every pool alike, so the ratios between pools stay meaningful on a shared
2-core machine. Producers are started before the timed region and released together
(``run_threads_timed``); a run ends when the last job has run. The completion signal is a
countdown: ``next()`` on a shared ``itertools.count`` (atomic on 3.13t), the job that takes it
to zero sets one Event. Its capacity (calls/s from 1 and from 2 threads hammering it, no pool)
is measured on its own and reported in the ``note`` of the trivial-job records: it is several
times the best pool's trivial-job rate, so it is not what limits that rate. Every run asserts that
every job ran, exactly once (the countdown must end exactly at zero).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from bench.common import (
    SMOKE,
    Progress,
    latency_stats,
    no_progress,
    record,
    run_threads_timed,
    throughput_stats,
)
from kvs.thread_pool import POOLS, ThreadPool, make_pool

SUITE = "pool"
THREAD_COUNTS = (1, 2, 4)
PRODUCER_COUNTS = (1, 4)
WORK_US = 50.0
NESTED_FANOUT = 4
NESTED_DEPTH = 3  # a root at depth 3: 1 + 4 + 16 + 64 jobs
TIMEOUT = 120.0  # a run that takes this long has lost jobs


@dataclass(frozen=True)
class Sizes:
    """Jobs per run (naive: its own, smaller, counts), repetitions."""

    trivial_jobs: int
    work_jobs: int
    latency_samples: int  # per producer
    nested_roots: int
    naive_trivial_jobs: int
    naive_work_jobs: int
    naive_nested_roots: int
    naive_latency_samples: int
    reps: int  # timed rounds of work_50us_jobs and spawn_latency
    reps_cheap: int  # timed rounds of trivial_jobs and nested_spawn (short, noisier runs)
    warmup: int = 1


FULL = Sizes(
    trivial_jobs=100_000, work_jobs=10_000, latency_samples=1_000, nested_roots=300,
    naive_trivial_jobs=500, naive_work_jobs=500, naive_nested_roots=6, naive_latency_samples=250,
    reps=2, reps_cheap=3,
)  # fmt: skip
SMOKE_SIZES = Sizes(
    trivial_jobs=200, work_jobs=20, latency_samples=10, nested_roots=2,
    naive_trivial_jobs=20, naive_work_jobs=10, naive_nested_roots=1, naive_latency_samples=5,
    reps=1, reps_cheap=1, warmup=0,
)  # fmt: skip
QUICK = Sizes(
    trivial_jobs=5_000, work_jobs=600, latency_samples=150, nested_roots=30,
    naive_trivial_jobs=150, naive_work_jobs=100, naive_nested_roots=2, naive_latency_samples=50,
    reps=2, reps_cheap=3,
)  # fmt: skip


class Countdown:
    """The completion signal: ``done()`` counts a job; the one that reaches zero sets the
    Event. ``finished()`` asserts exactly ``n`` calls happened."""

    def __init__(self, n: int) -> None:
        self._left = itertools.count(n - 1, -1)
        self.event = threading.Event()

    def done(self) -> None:
        if next(self._left) == 0:
            self.event.set()

    def finished(self) -> None:
        assert self.event.wait(TIMEOUT), "jobs were lost: the countdown never reached zero"
        left = next(self._left)
        assert left == -1, f"{-1 - left} jobs ran more than once"


def spin(iterations: int) -> int:
    """Pure-Python CPU work: ``iterations`` loop turns that allocate nothing (small ints
    only, which are immortal), so its speed does not depend on allocator state and threads
    running it share no reference count."""
    value = 0
    for _ in itertools.repeat(None, iterations):
        value = (value + 3) & 127
    return value


def calibrate_spin(target_us: float = WORK_US) -> int:
    """Loop iterations that take about ``target_us`` on one thread of this process. Five
    batches of nine timings, one after another; the lowest batch median wins: another
    process can only stretch a timing, so the least disturbed batch is the truest."""
    probe = 20_000
    spin(probe)
    batch_medians = []
    for _ in range(5):
        timings = []
        for _ in range(9):
            start = time.perf_counter()
            spin(probe)
            timings.append(time.perf_counter() - start)
        batch_medians.append(statistics.median(timings))
        time.sleep(0.005)  # spread the batches out (not timing anything)
    per_iteration = min(batch_medians) / probe
    return max(1, round(target_us * 1e-6 / per_iteration))


def countdown_capacity(threads: int, calls: int = 200_000) -> float:
    """Calls per second that ``threads`` threads calling ``Countdown.done`` at once achieve
    between them: the completion signal alone, no pool. A pool's trivial-job rate well below
    this means the signal is not what limits it."""
    countdown = Countdown(threads * calls)
    done = countdown.done

    def hammer() -> None:
        for _ in range(calls):
            done()

    seconds = run_threads_timed([hammer] * threads)
    countdown.finished()
    return threads * calls / seconds


# -- one run of each benchmark (returns seconds, or latencies) ---------------------------------------


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _throughput_run(pool: ThreadPool, producers: int, jobs: int, job: Callable[[], None],
                    countdown: Countdown) -> float:
    """Seconds from releasing ``producers`` threads, which spawn ``jobs`` copies of ``job``
    between them, until the countdown (called by the jobs) reaches zero."""
    spawn = pool.spawn

    def produce(count: int) -> Callable[[], None]:
        def producer() -> None:
            for _ in range(count):
                spawn(job)
            countdown.event.wait(TIMEOUT)  # so that the timed region ends at completion

        return producer

    seconds = run_threads_timed([produce(n) for n in _split(jobs, producers)])
    countdown.finished()
    return seconds


def trivial_run(pool: ThreadPool, producers: int, jobs: int) -> float:
    countdown = Countdown(jobs)
    return _throughput_run(pool, producers, jobs, countdown.done, countdown)


def work_run(pool: ThreadPool, producers: int, jobs: int, iterations: int) -> float:
    countdown = Countdown(jobs)
    done = countdown.done

    def job() -> None:
        spin(iterations)
        done()

    return _throughput_run(pool, producers, jobs, job, countdown)


def nested_jobs(roots: int) -> int:
    return roots * sum(NESTED_FANOUT**d for d in range(NESTED_DEPTH + 1))


def nested_run(pool: ThreadPool, producers: int, roots: int) -> float:
    countdown = Countdown(nested_jobs(roots))
    done = countdown.done
    spawn = pool.spawn
    node_at_depth: list[Callable[[], None]] = [done]  # [d]: a job with d levels below it
    for _ in range(NESTED_DEPTH):

        def node(child: Callable[[], None] = node_at_depth[-1]) -> None:
            for _ in range(NESTED_FANOUT):
                spawn(child)
            done()

        node_at_depth.append(node)
    return _throughput_run(pool, producers, roots, node_at_depth[-1], countdown)


def latency_run(pool: ThreadPool, producers: int, samples: int) -> list[float]:
    """Spawn-to-start latencies in seconds, ``samples`` per producer (closed loops)."""
    per_producer: list[list[float]] = [[] for _ in range(producers)]

    def produce(latencies: list[float]) -> Callable[[], None]:
        started = threading.Event()
        start_time = [0.0]
        clock = time.perf_counter

        def job() -> None:
            start_time[0] = clock()
            started.set()

        def producer() -> None:
            spawn = pool.spawn
            for _ in range(samples):
                started.clear()
                spawned = clock()
                spawn(job)
                assert started.wait(TIMEOUT), "a job never started"
                latencies.append(start_time[0] - spawned)

        return producer

    run_threads_timed([produce(latencies) for latencies in per_producer])
    all_latencies = [x for latencies in per_producer for x in latencies]
    assert len(all_latencies) == producers * samples
    return all_latencies


# -- the suite ------------------------------------------------------------------------------------------


def _interleaved(
    pools: dict[str, ThreadPool], one_run: Callable[[str, ThreadPool], Any], warmup: int, reps: int
) -> dict[str, list[Any]]:
    """``one_run(name, pool)`` for every pool in turn, ``warmup`` untimed rounds then ``reps``
    rounds; the results of the timed rounds by pool name."""
    results: dict[str, list[Any]] = {name: [] for name in pools}
    for round_ in range(warmup + reps):
        for name, pool in pools.items():
            result = one_run(name, pool)
            if round_ >= warmup:
                results[name].append(result)
    return results


def run(quick: bool, progress: Progress = no_progress) -> list[dict]:
    """Every benchmark for every pool, thread count and producer count; one record each."""
    sizes = SMOKE_SIZES if SMOKE else QUICK if quick else FULL
    names = list(POOLS)
    steps = 4 * len(THREAD_COUNTS) * len(PRODUCER_COUNTS) + 1
    step = itertools.count()
    progress(next(step), steps, "calibrating")
    iterations = calibrate_spin()
    countdown_1 = countdown_capacity(1)
    countdown_2 = countdown_capacity(2)
    countdown_note = (
        f"the completion countdown alone does {countdown_1 / 1e3:,.0f}k calls/s from 1 thread, "
        f"{countdown_2 / 1e3:,.0f}k calls/s from 2 threads at once"
    )
    work_note = f"{iterations} loop iterations = {WORK_US:g} us on one thread"

    def jobs_for(name: str, regular: int, naive: int) -> int:
        return naive if name == "naive" else regular

    def trivial_jobs(name: str) -> int:
        return jobs_for(name, sizes.trivial_jobs, sizes.naive_trivial_jobs)

    def work_jobs(name: str) -> int:
        return jobs_for(name, sizes.work_jobs, sizes.naive_work_jobs)

    def latency_samples(name: str) -> int:
        return jobs_for(name, sizes.latency_samples, sizes.naive_latency_samples)

    def nested_roots(name: str) -> int:
        return jobs_for(name, sizes.nested_roots, sizes.naive_nested_roots)

    benchmarks: list[tuple[str, Callable[[str, ThreadPool, int], Any], Callable[[str], int], str]] = [
        ("trivial_jobs", lambda name, pool, producers: trivial_run(pool, producers, trivial_jobs(name)),
         trivial_jobs, countdown_note),
        ("work_50us_jobs", lambda name, pool, producers: work_run(pool, producers, work_jobs(name), iterations),
         work_jobs, work_note),
        ("spawn_latency", lambda name, pool, producers: latency_run(pool, producers, latency_samples(name)),
         latency_samples, "closed loop per producer: spawn, wait for the job to start, repeat"),
        ("nested_spawn", lambda name, pool, producers: nested_run(pool, producers, nested_roots(name)),
         lambda name: nested_jobs(nested_roots(name)),
         f"roots spawn trees of fan-out {NESTED_FANOUT}, depth {NESTED_DEPTH}"),
    ]

    records: list[dict] = []
    for benchmark, one_run, jobs_of, note in benchmarks:
        for threads in THREAD_COUNTS:
            for producers in PRODUCER_COUNTS:
                progress(next(step), steps, f"{benchmark}, {threads} threads, {producers} producers")
                pools = {name: make_pool(name, threads) for name in names}
                try:
                    reps = sizes.reps_cheap if benchmark in ("trivial_jobs", "nested_spawn") else sizes.reps
                    results = _interleaved(pools, partial(one_run, producers=producers), sizes.warmup, reps)
                finally:
                    for pool in pools.values():
                        pool.shutdown(wait=True)
                for name in names:
                    common = dict(pool=name, threads=threads, producers=producers, note=note)
                    if benchmark == "spawn_latency":
                        per_rep = [latency_stats(latencies) for latencies in results[name]]
                        records.append(
                            record(
                                SUITE, benchmark, **common,
                                samples=producers * jobs_of(name),
                                p50_us=statistics.median(r["p50_us"] for r in per_rep),
                                p99_us=statistics.median(r["p99_us"] for r in per_rep),
                                reps=len(per_rep),
                            )
                        )  # fmt: skip
                    else:
                        jobs = jobs_of(name)
                        records.append(record(SUITE, benchmark, **common, jobs=jobs,
                                              **throughput_stats(jobs, results[name])))
    progress(steps, steps, "done")
    return records


# -- command line ---------------------------------------------------------------------------------------


def _busiest_other_processes(count: int = 4) -> list[str]:
    """``%CPU command`` of the processes busiest right now, this one excluded (what else was
    running), from one ``top`` sample; empty if ``top`` is unavailable."""
    import os
    import subprocess

    try:
        out = subprocess.run(
            ["top", "-b", "-n", "1", "-c", "-w", "200"], capture_output=True, text=True, timeout=10
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return []
    header = next((i for i, line in enumerate(out) if line.split()[:1] == ["PID"]), None)
    if header is None:
        return []
    busiest = []
    for line in out[header + 1 :]:
        fields = line.split(None, 11)
        if len(fields) == 12 and fields[0] != str(os.getpid()) and float(fields[8]) > 0:
            busiest.append(f"{fields[8]}% {fields[11][:80]}")
    return busiest[:count]


def _print_tables(records: list[dict], seconds: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from bench.common import gil_enabled

    console = Console(width=max(Console().width, 110))
    names = list(POOLS)
    gil = "on" if gil_enabled() else "off"
    for benchmark in ("trivial_jobs", "work_50us_jobs", "nested_spawn", "spawn_latency"):
        recs = [r for r in records if r["benchmark"] == benchmark]
        if not recs:
            continue
        latency = benchmark == "spawn_latency"
        unit = "p50 / p99 us" if latency else "thousand jobs/s (median)"
        table = Table(title=f"{benchmark} (GIL {gil}): {unit}")
        table.add_column("threads", justify="right")
        table.add_column("producers", justify="right")
        for name in names:
            table.add_column(name, justify="right")
        if not latency:
            table.add_column("ws / sq", justify="right")
            table.add_column("sq / executor", justify="right")
        for threads in THREAD_COUNTS:
            for producers in PRODUCER_COUNTS:
                row = {r["pool"]: r for r in recs if r["threads"] == threads and r["producers"] == producers}
                if latency:
                    cells = [f"{row[n]['p50_us']:.0f} / {row[n]['p99_us']:.0f}" for n in names]
                else:
                    cells = [f"{row[n]['ops_per_sec'] / 1e3:,.0f}" for n in names]
                    ws, sq, ex = (row[n]["ops_per_sec"] for n in ("work-stealing", "shared-queue", "executor"))
                    cells += [f"{ws / sq:.2f}x", f"{sq / ex:.2f}x"]
                table.add_row(str(threads), str(producers), *cells)
        console.print(table)
    notes = {r["benchmark"]: r["note"] for r in records}
    for benchmark, note in notes.items():
        console.print(f"{benchmark}: {note}")
    console.print(f"suite took {seconds:.1f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pool_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 repetitions (well under 25 s)")
    args = parser.parse_args(argv)
    import os

    from rich.progress import Progress as Bar

    load_before = os.getloadavg()
    started = time.perf_counter()
    with Bar(transient=True) as bar:
        task = bar.add_task("pool benchmarks", total=1)

        def progress(done: int, total: int, description: str) -> None:
            bar.update(task, completed=done, total=total, description=description)

        records = run(args.quick, progress)
    _print_tables(records, time.perf_counter() - started)
    print(f"load average before: {load_before[0]:.2f}, after: {os.getloadavg()[0]:.2f} (1 min)")
    print("busiest other processes at the end:", *_busiest_other_processes(), sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

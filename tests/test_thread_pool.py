"""Behaviour of the thread pools (kvs.thread_pool): the course's pool tests, shutdown in all its
forms, failing jobs, work stealing, many producers, idleness.

Tests wait for conditions (events, barriers, countdowns) with generous timeouts; none of them
asserts a duration, except the idle-CPU check, which bounds CPU time (not wall time) very
generously.
"""

from __future__ import annotations

import functools
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from kvs.thread_pool import (
    POOLS,
    ExecutorThreadPool,
    NaiveThreadPool,
    SharedQueueThreadPool,
    ThreadPool,
    WorkStealingThreadPool,
    make_pool,
)
from kvs.thread_pool.failures import JobFailureLog, describe_job
from tests.helpers import wait_until

TIMEOUT = 30.0  # seconds; only ever reached when something is broken
ALL_POOLS = list(POOLS)
THREADED_POOLS = ["shared-queue", "work-stealing", "executor"]  # fixed sets of threads


class Countdown:
    """An event set once ``n`` jobs have called :meth:`done` (itertools.count's ``next`` is
    atomic on 3.13t: it is the Python counterpart of an AtomicUsize ``fetch_sub``)."""

    def __init__(self, n: int) -> None:
        self._left = itertools.count(n - 1, -1)
        self._event = threading.Event()
        if n == 0:
            self._event.set()

    def done(self) -> None:
        if next(self._left) == 0:
            self._event.set()

    def wait(self, timeout: float = TIMEOUT) -> bool:
        return self._event.wait(timeout)


class AtomicCounter:
    """A counter several threads add to (``next`` on an ``itertools.count`` is atomic)."""

    def __init__(self) -> None:
        self._count = itertools.count()

    def add(self) -> None:
        next(self._count)

    def value(self) -> int:
        """The number of ``add`` calls so far (only meaningful once they have all returned)."""
        return next(self._count)


def new_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads alive now that were not in ``before``."""
    return [t for t in threading.enumerate() if t not in before]


@pytest.fixture
def pool_factory() -> Iterator[Callable[[str, int], ThreadPool]]:
    """Makes pools and shuts every one of them down at the end of the test, also when the
    test fails (a failing test must not leave threads behind for the next one)."""
    made: list[ThreadPool] = []

    def make(name: str, threads: int) -> ThreadPool:
        pool = make_pool(name, threads)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.shutdown(wait=True)


@pytest.fixture
def no_raw_thread_exceptions(monkeypatch: pytest.MonkeyPatch) -> list[threading.ExceptHookArgs]:
    """Records what reaches threading.excepthook (an exception escaping a thread, printed
    raw): a pool must report job exceptions through logging instead."""
    seen: list[threading.ExceptHookArgs] = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    return seen


# -- the interface ----------------------------------------------------------------------------


def test_pools_are_registered_under_their_names() -> None:
    assert POOLS == {
        "naive": NaiveThreadPool,
        "shared-queue": SharedQueueThreadPool,
        "work-stealing": WorkStealingThreadPool,
        "executor": ExecutorThreadPool,
    }
    for name, pool_class in POOLS.items():
        assert pool_class.name == name
        assert issubclass(pool_class, ThreadPool)


@pytest.mark.parametrize("name", ALL_POOLS)
def test_make_pool_builds_the_named_pool_with_its_thread_count(
    name: str, pool_factory: Callable[[str, int], ThreadPool]
) -> None:
    pool = pool_factory(name, 3)
    assert type(pool) is POOLS[name]
    assert pool.threads == 3
    assert isinstance(pool, ThreadPool)


def test_make_pool_rejects_an_unknown_name_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError) as excinfo:
        make_pool("fastest", 2)
    message = str(excinfo.value)
    assert "fastest" in message
    for name in POOLS:
        assert name in message


@pytest.mark.parametrize("name", ALL_POOLS)
@pytest.mark.parametrize("threads", [0, -1])
def test_fewer_than_one_thread_is_a_value_error(name: str, threads: int) -> None:
    before = set(threading.enumerate())
    with pytest.raises(ValueError):
        POOLS[name](threads)
    assert new_threads(before) == []


@pytest.mark.parametrize("name", THREADED_POOLS)
def test_constructor_starts_exactly_threads_threads(
    name: str, pool_factory: Callable[[str, int], ThreadPool]
) -> None:
    before = set(threading.enumerate())
    pool_factory(name, 3)
    assert len(new_threads(before)) == 3  # all started now, before any job


@pytest.mark.parametrize("name", ALL_POOLS)
def test_spawn_rejects_a_non_callable(name: str, pool_factory: Callable[[str, int], ThreadPool]) -> None:
    pool = pool_factory(name, 2)
    with pytest.raises(TypeError):
        pool.spawn(42)  # type: ignore[arg-type]


# -- ports of the course's tests ----------------------------------------------------------------


def spawn_counter(pool: ThreadPool) -> None:
    """The course's ``spawn_counter``: 20 jobs each adding 1000 to a shared counter."""
    task_num, add_count = 20, 1000
    counter = AtomicCounter()
    all_done = Countdown(task_num)

    def job() -> None:
        for _ in range(add_count):
            counter.add()
        all_done.done()

    for _ in range(task_num):
        pool.spawn(job)
    assert all_done.wait()
    assert counter.value() == task_num * add_count


def assert_runs_jobs_on_all_threads_at_once(pool: ThreadPool) -> None:
    """``pool.threads`` jobs that can only finish together (a barrier with that many parties):
    proves the pool still runs that many jobs at once, on as many distinct threads."""
    barrier = threading.Barrier(pool.threads, timeout=TIMEOUT)
    idents: set[int] = set()
    idents_lock = threading.Lock()
    all_done = Countdown(pool.threads)

    def job() -> None:
        with idents_lock:
            idents.add(threading.get_ident())
        barrier.wait()
        all_done.done()

    for _ in range(pool.threads):
        pool.spawn(job)
    assert all_done.wait(), "the pool no longer runs `threads` jobs at once"
    assert len(idents) == pool.threads


@pytest.mark.parametrize("name", ALL_POOLS)
def test_spawn_counter(name: str, pool_factory: Callable[[str, int], ThreadPool]) -> None:
    spawn_counter(pool_factory(name, 4))


@pytest.mark.parametrize("name", ALL_POOLS)
def test_panic_task(
    name: str,
    pool_factory: Callable[[str, int], ThreadPool],
    caplog: pytest.LogCaptureFixture,
    no_raw_thread_exceptions: list[threading.ExceptHookArgs],
) -> None:
    """The course's ``spawn_panic_task`` (1000 raising jobs, then ``spawn_counter`` on the same
    pool), plus: the pool still runs ``threads`` jobs at once and still has exactly ``threads``
    threads."""
    caplog.set_level(logging.ERROR, logger="kvs.thread_pool")
    before = set(threading.enumerate())
    pool = pool_factory(name, 4)
    threads_at_start = set(new_threads(before))
    failed = Countdown(1000)

    def panic() -> None:
        failed.done()
        raise RuntimeError("panic")

    for _ in range(1000):
        pool.spawn(panic)
    assert failed.wait()
    spawn_counter(pool)
    assert_runs_jobs_on_all_threads_at_once(pool)
    if name != "naive":
        assert set(new_threads(before)) == threads_at_start  # none died, none was added
    assert no_raw_thread_exceptions == []


# -- failing jobs are logged, and a flood of them is summarized -----------------------------------


@pytest.mark.parametrize("name", ALL_POOLS)
def test_failing_jobs_are_logged_with_traceback_and_a_flood_is_summarized(
    name: str,
    pool_factory: Callable[[str, int], ThreadPool],
    caplog: pytest.LogCaptureFixture,
    no_raw_thread_exceptions: list[threading.ExceptHookArgs],
) -> None:
    caplog.set_level(logging.ERROR, logger="kvs.thread_pool")
    pool = pool_factory(name, 2)
    failures = 1000
    failed = Countdown(failures)

    def fail_with_value_error() -> None:
        failed.done()
        raise ValueError("bad job")

    for _ in range(failures):
        pool.spawn(fail_with_value_error)
    assert failed.wait()
    pool.shutdown(wait=True)  # flushes the pending summary

    records = [r for r in caplog.records if r.name == "kvs.thread_pool"]
    with_traceback = [r for r in records if r.exc_info is not None]
    summaries = [r for r in records if hasattr(r, "suppressed_failures")]
    assert with_traceback, "no failure was logged with its traceback"
    for record in with_traceback:
        assert record.exc_info[0] is ValueError
        assert "fail_with_value_error" in record.getMessage()
        assert "bad job" in caplog.text  # the formatted traceback
    # Not flooded: a handful of tracebacks, every other failure counted in a summary.
    assert len(records) < failures / 10
    assert len(with_traceback) + sum(r.suppressed_failures for r in summaries) == failures
    assert summaries and "ValueError x" in summaries[-1].getMessage()
    assert no_raw_thread_exceptions == []


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failure_log_rate_limits_per_window(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="kvs.thread_pool")
    clock = FakeClock()
    log = JobFailureLog("test", burst=3, window=10.0, clock=clock)

    def job() -> None: ...

    for i in range(10):  # window 1: 3 tracebacks, 7 counted
        log.report(job, KeyError(i))
    assert [r.exc_info is not None for r in caplog.records] == [True, True, True]
    assert "only counted" in caplog.records[2].getMessage()
    clock.now += 10.0  # window 2 opens with the next failure, which closes window 1
    log.report(job, OSError("x"))
    summary = caplog.records[3]
    assert summary.suppressed_failures == 7
    assert "KeyError x7" in summary.getMessage()
    assert caplog.records[4].exc_info is not None  # the new window's first traceback
    log.report(job, OSError("y"))
    log.report(job, OSError("z"))
    log.report(job, OSError("counted"))
    log.report(job, KeyError("counted"))
    assert len(caplog.records) == 7
    log.flush()
    assert caplog.records[7].suppressed_failures == 2
    assert "OSError x1" in caplog.records[7].getMessage()
    log.flush()  # nothing pending: nothing logged
    assert len(caplog.records) == 8


def test_describe_job_names_functions_methods_and_partials() -> None:
    def local_job() -> None: ...

    assert describe_job(local_job).endswith("local_job")
    assert describe_job(functools.partial(local_job)).endswith("local_job")
    assert describe_job(Countdown(1).done).endswith("Countdown.done")

    class JobObject:
        def __call__(self) -> None: ...

    assert describe_job(JobObject()).endswith("JobObject")


# -- shutdown -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_POOLS)
def test_shutdown_joins_every_thread(name: str) -> None:
    before = set(threading.enumerate())
    pool = make_pool(name, 4)
    used: set[int] = set()
    used_lock = threading.Lock()
    all_done = Countdown(50)

    def job() -> None:
        with used_lock:
            used.add(threading.get_ident())
        all_done.done()

    for _ in range(50):
        pool.spawn(job)
    assert all_done.wait()
    pool.shutdown(wait=True)
    assert new_threads(before) == []
    alive = {t.ident for t in threading.enumerate()}
    assert not used & alive


@pytest.mark.parametrize("name", ALL_POOLS)
def test_shutdown_is_idempotent_and_spawn_after_it_raises(name: str) -> None:
    before = set(threading.enumerate())
    pool = make_pool(name, 2)
    pool.shutdown()
    pool.shutdown()
    pool.shutdown(wait=False)
    with pytest.raises(RuntimeError):
        pool.spawn(lambda: None)
    assert new_threads(before) == []


def spawn_until_refused(pool: ThreadPool) -> None:
    """Spawn no-op jobs until the pool refuses one: returns once its shutdown has begun."""
    while True:
        try:
            pool.spawn(lambda: None)
        except RuntimeError:
            return
        time.sleep(0.001)  # polling a condition (shutdown has begun), not timing anything


@pytest.mark.parametrize("name", ALL_POOLS)
def test_context_manager_runs_queued_jobs_before_returning(name: str) -> None:
    before = set(threading.enumerate())
    gate = threading.Event()
    ran = AtomicCounter()

    def gated_job() -> None:
        assert gate.wait(TIMEOUT)
        ran.add()

    with make_pool(name, 2) as pool:
        for _ in range(100):  # 2 run (and block), 98 wait in the queue
            pool.spawn(gated_job)
        # Open the gate only once the with-block's shutdown has begun, so that shutdown
        # starts with jobs still queued.
        opener = threading.Thread(target=lambda: (spawn_until_refused(pool), gate.set()))
        opener.start()
    opener.join(TIMEOUT)
    assert ran.value() == 100
    assert new_threads(before) == []


@pytest.mark.parametrize("name", ALL_POOLS)
@pytest.mark.parametrize("threads", [1, 3])
def test_shutdown_from_inside_a_job_does_not_deadlock(name: str, threads: int) -> None:
    before = set(threading.enumerate())
    pool = make_pool(name, threads)
    go = threading.Event()
    returned = threading.Event()
    refused_after: list[bool] = []
    ran = AtomicCounter()

    def shutting_down_job() -> None:
        assert go.wait(TIMEOUT)
        pool.shutdown(wait=True)  # treated as wait=False: returns, does not join itself
        try:
            pool.spawn(ran.add)
        except RuntimeError:
            refused_after.append(True)
        returned.set()

    pool.spawn(shutting_down_job)
    for _ in range(50):
        pool.spawn(ran.add)  # queued behind it (with threads=1), still run
    go.set()
    assert returned.wait(TIMEOUT), "shutdown called from a job did not return"
    assert refused_after == [True]
    pool.shutdown(wait=True)  # from outside: joins every thread, the caller's too
    assert ran.value() == 50
    assert new_threads(before) == []


@pytest.mark.parametrize("name", ALL_POOLS)
def test_shutdown_without_wait_returns_and_threads_exit_after_the_queued_jobs(name: str) -> None:
    before = set(threading.enumerate())
    pool = make_pool(name, 2)
    gate = threading.Event()
    ran = AtomicCounter()

    def gated_job() -> None:
        assert gate.wait(TIMEOUT)
        ran.add()

    for _ in range(50):
        pool.spawn(gated_job)
    pool.shutdown(wait=False)  # returns although every job is still blocked or queued
    with pytest.raises(RuntimeError):
        pool.spawn(ran.add)
    pool_threads = new_threads(before)
    gate.set()
    for thread in pool_threads:  # nobody joins them for us: they exit on their own
        thread.join(TIMEOUT)
        assert not thread.is_alive()
    assert ran.value() == 50
    assert new_threads(before) == []


@pytest.mark.parametrize("name", THREADED_POOLS)
def test_threads_that_start_are_stopped_when_one_cannot_start(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = set(threading.enumerate())
    real_start = threading.Thread.start
    starts = itertools.count()

    def failing_third_start(self: threading.Thread) -> None:
        if next(starts) == 2:
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", failing_third_start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        POOLS[name](4)
    monkeypatch.undo()
    for thread in new_threads(before):  # started ones were told to stop, and joined
        thread.join(TIMEOUT)
    assert new_threads(before) == []
    assert next(starts) == 3


def test_naive_spawn_propagates_a_thread_start_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    before = set(threading.enumerate())
    pool = NaiveThreadPool(2)

    def failing_start(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", failing_start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        pool.spawn(lambda: None)
    monkeypatch.undo()
    spawn_counter(pool)  # still usable
    pool.shutdown()
    assert new_threads(before) == []


# -- work stealing --------------------------------------------------------------------------------


def test_work_stealing_children_of_a_blocked_worker_run_on_other_workers(
    pool_factory: Callable[[str, int], ThreadPool],
) -> None:
    pool = pool_factory("work-stealing", 4)
    children = 200
    children_done = Countdown(children)
    parent_ident: list[int] = []
    child_idents: list[int] = []
    idents_lock = threading.Lock()

    def child() -> None:
        with idents_lock:
            child_idents.append(threading.get_ident())
        children_done.done()

    def parent() -> None:
        parent_ident.append(threading.get_ident())
        for _ in range(children):
            pool.spawn(child)  # into this worker's own deque
        # Block this worker until the children are done: only thieves can run them.
        assert children_done.wait(TIMEOUT)

    pool.spawn(parent)
    assert children_done.wait()
    assert len(child_idents) == children
    assert parent_ident[0] not in child_idents


def test_work_stealing_owner_runs_its_own_jobs_newest_first_and_external_ones_in_order(
    pool_factory: Callable[[str, int], ThreadPool],
) -> None:
    pool = pool_factory("work-stealing", 1)  # one worker: no thief, the order is exact
    order: list[str] = []
    done = Countdown(8)
    gate = threading.Event()

    def record(label: str) -> None:
        order.append(label)
        done.done()

    def parent() -> None:
        assert gate.wait(TIMEOUT)
        for i in range(3):
            pool.spawn(functools.partial(record, f"child{i}"))
        record("parent")

    pool.spawn(parent)
    for i in range(4):
        pool.spawn(functools.partial(record, f"external{i}"))
    gate.set()
    assert done.wait()
    assert order == [
        "parent",
        "child2", "child1", "child0",  # LIFO: the owner's newest job first
        "external0", "external1", "external2", "external3",  # FIFO injector
    ]  # fmt: skip


def test_work_stealing_wakes_parked_workers_for_nested_jobs_after_idling(
    pool_factory: Callable[[str, int], ThreadPool],
) -> None:
    """Rounds of idle -> burst of nested work: parked workers must be woken every time (a
    lost wake-up would leave the blocked parent waiting forever)."""
    pool = pool_factory("work-stealing", 3)
    for _ in range(50):
        children_done = Countdown(10)
        finished = threading.Event()

        def parent(children_done: Countdown = children_done, finished: threading.Event = finished) -> None:
            for _ in range(10):
                pool.spawn(children_done.done)
            assert children_done.wait(TIMEOUT)
            finished.set()

        pool.spawn(parent)
        assert finished.wait(TIMEOUT)


def test_work_stealing_retires_the_lane_of_an_exited_producer(
    pool_factory: Callable[[str, int], ThreadPool],
) -> None:
    pool = pool_factory("work-stealing", 2)
    assert isinstance(pool, WorkStealingThreadPool)
    done = Countdown(20)

    def producer() -> None:
        for _ in range(10):
            pool.spawn(done.done)

    for _ in range(2):
        thread = threading.Thread(target=producer)
        thread.start()
        thread.join()
    assert done.wait()
    spawn_counter(pool)  # the workers park again afterwards, dropping empty retired lanes
    # Only the main thread's lane remains: the exited producers' are gone.
    assert wait_until(lambda: len(pool._lanes) == 1), f"{len(pool._lanes)} lanes"


# -- many producers -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_POOLS)
def test_many_producers_every_job_runs_exactly_once(
    name: str, pool_factory: Callable[[str, int], ThreadPool]
) -> None:
    producers = 8
    total = 2_000 if name == "naive" else 100_000  # naive starts a thread per job
    pool = pool_factory(name, 4)
    hits = bytearray(total)  # hits[i]: how many times job i ran (each job writes its own slot)
    runs = AtomicCounter()
    all_ran = Countdown(total)

    def job(i: int) -> None:
        hits[i] += 1
        runs.add()
        all_ran.done()

    jobs = [functools.partial(job, i) for i in range(total)]
    start = threading.Barrier(producers)

    def produce(first: int) -> None:
        start.wait(TIMEOUT)
        for i in range(first, total, producers):
            pool.spawn(jobs[i])

    threads = [threading.Thread(target=produce, args=(p,)) for p in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    assert all_ran.wait()
    pool.shutdown(wait=True)
    assert runs.value() == total  # nothing ran twice (the count) ...
    assert hits.count(1) == total  # ... and each job ran once (its own slot)


@pytest.mark.parametrize("name", ALL_POOLS)
def test_spawns_racing_shutdown_either_run_or_raise(name: str) -> None:
    """Producers keep spawning while another thread shuts the pool down: every spawn that
    returned normally ran its job, every refused one did not."""
    producers = 4
    pool = make_pool(name, 2)
    accepted = AtomicCounter()
    ran = AtomicCounter()
    started = Countdown(producers * 50)

    def produce() -> None:
        while True:
            try:
                pool.spawn(ran.add)
            except RuntimeError:
                return
            accepted.add()
            started.done()

    threads = [threading.Thread(target=produce) for _ in range(producers)]
    for thread in threads:
        thread.start()
    assert started.wait()  # every producer is in full swing
    pool.shutdown(wait=True)
    for thread in threads:
        thread.join(TIMEOUT)
    assert ran.value() == accepted.value()


@pytest.mark.parametrize("name", ALL_POOLS)
def test_random_interleavings_of_nested_spawns_producers_and_shutdown(name: str) -> None:
    """Rounds with random thread and producer counts, random trees of jobs spawning jobs,
    producers pausing at random, and a shutdown (waiting or not) at a random moment while
    all that runs. Invariants: every spawn that returned normally ran its job exactly once,
    every refused one never ran, and no thread is left. The seed is in the failure message."""
    for _ in range(10 if name == "naive" else 50):
        random_round(name, random.randrange(2**32))


def random_round(name: str, seed: int) -> None:
    """One round of the test above, all of it drawn from ``seed``."""
    rng = random.Random(seed)
    before = set(threading.enumerate())
    pool = make_pool(name, rng.randint(1, 4))
    accepted = AtomicCounter()
    ran = AtomicCounter()
    depth_limit = 1 if name == "naive" else 3

    def node(depth: int, fanout: int) -> None:
        ran.add()
        for _ in range(fanout if depth > 0 else 0):
            try:
                pool.spawn(functools.partial(node, depth - 1, fanout))
            except RuntimeError:
                return  # shut down meanwhile: refused, and never runs
            accepted.add()

    def produce(jobs: int, pause_every: int, depth: int, fanout: int) -> None:
        for i in range(jobs):
            try:
                pool.spawn(functools.partial(node, depth, fanout))
            except RuntimeError:
                return
            accepted.add()
            if i % pause_every == 0:
                time.sleep(0.0002)  # let the workers run dry and park now and then

    producers = [
        threading.Thread(
            target=produce,
            args=(
                rng.randint(0, 40 if name == "naive" else 200),
                rng.randint(1, 50),
                rng.randint(0, depth_limit),
                rng.randint(1, 3),
            ),
        )
        for _ in range(rng.randint(1, 4))
    ]
    for producer in producers:
        producer.start()
    if rng.random() < 0.5:
        time.sleep(rng.random() * 0.005)  # shut down at a random moment of the run
    pool.shutdown(wait=rng.random() < 0.5)
    for producer in producers:
        producer.join(TIMEOUT)
    pool.shutdown(wait=True)
    assert ran.value() == accepted.value(), f"seed {seed}"
    assert new_threads(before) == [], f"seed {seed}"


# -- idleness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_POOLS)
def test_an_idle_pool_uses_no_cpu(name: str, pool_factory: Callable[[str, int], ThreadPool]) -> None:
    pool = pool_factory(name, 4)
    spawn_counter(pool)  # the workers have run jobs and gone idle since
    cpu_before = time.process_time()
    threading.Event().wait(1.0)  # the measurement interval itself
    cpu_used = time.process_time() - cpu_before
    assert cpu_used < 0.05, f"an idle {name} pool used {cpu_used:.3f} s of CPU in 1 s"

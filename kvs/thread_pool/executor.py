"""ExecutorThreadPool: the ThreadPool interface over ``concurrent.futures.ThreadPoolExecutor``.

The standard library's pool is the well-tested reference the other pools are measured
against, so the adapter stays thin: ``spawn`` is one ``submit`` of a wrapper that catches and
reports what the job raises (the Future is discarded: nobody would ever look at an exception
stored in it).

Threads start now. ``ThreadPoolExecutor`` starts a thread in ``submit`` only when no thread is
idle, up to ``max_workers``. The constructor therefore primes it: it submits ``threads`` jobs
that all wait at one barrier with the constructor. None of them can finish before all of
them run, so no thread is idle during priming and every submit starts a thread; the
constructor's ``barrier.wait()`` returns only when ``threads`` distinct threads are running.
After that the executor has ``max_workers`` threads and never starts another (it only ever
adds threads below ``max_workers``), so the thread count is exactly ``threads`` from the
constructor's return on. If a thread cannot start, ``submit`` raises: the barrier is aborted
(releasing the priming jobs already running), the executor is shut down and joined, and the
error propagates.

Shutdown. ``ThreadPoolExecutor.shutdown(wait=False)`` lets its workers finish the queued jobs
and exit by themselves (each exiting worker passes the wake-up on to the next), which is the
interface's ``wait=False``. Called from one of its own workers with ``wait=True`` it would
join the calling thread and raise; per the interface the adapter then passes ``wait=False``.
Its threads are not daemon threads: ``concurrent.futures`` joins them at interpreter exit.
Failure summaries (``failures``) are flushed by ``shutdown``; after ``shutdown(wait=False)``,
failures that the rate limit only counted are summarized only if a later failure opens a new
window: the executor's threads give the adapter no hook at their exit (the other pools flush
as their last thread exits).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from kvs.freethreading import share_module_globals
from kvs.thread_pool.base import Job, ThreadPool, check_job, check_thread_count
from kvs.thread_pool.failures import JobFailureLog

#: How long the constructor waits for the primed threads to all be running. Thread start
#: takes well under a millisecond; this only turns a broken environment into an error.
PRIMING_TIMEOUT_SECONDS = 60.0


class ExecutorThreadPool(ThreadPool):
    """``concurrent.futures.ThreadPoolExecutor(max_workers=threads)``, all threads started."""

    name = "executor"

    def __init__(self, threads: int) -> None:
        self.threads = check_thread_count(threads)
        self._failures = JobFailureLog(self.name)
        self._local = threading.local()  # .inside is True on the executor's threads
        self._executor = ThreadPoolExecutor(
            max_workers=self.threads,
            thread_name_prefix=f"kvs-{self.name}",
            initializer=self._mark_worker_thread,
        )
        barrier = threading.Barrier(self.threads + 1, timeout=PRIMING_TIMEOUT_SECONDS)
        try:
            for _ in range(self.threads):
                self._executor.submit(_wait_at, barrier)
            barrier.wait()
        except BaseException:
            barrier.abort()
            self._executor.shutdown(wait=True, cancel_futures=True)
            raise

    def spawn(self, job: Job) -> None:
        check_job(job)
        self._executor.submit(self._run, job)  # RuntimeError after shutdown

    def shutdown(self, wait: bool = True) -> None:
        inside = getattr(self._local, "inside", False)
        self._executor.shutdown(wait=wait and not inside)
        self._failures.flush()

    def _mark_worker_thread(self) -> None:
        self._local.inside = True

    def _run(self, job: Job) -> None:
        try:
            job()
        except BaseException as exc:
            self._failures.report(job, exc)


def _wait_at(barrier: threading.Barrier) -> None:
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        pass  # priming was aborted: the constructor is shutting the executor down


share_module_globals(globals())

"""The thread pool interface, and the rules every pool follows.

A pool runs jobs (``Callable[[], object]``) on its threads. Contract of every pool:

* ``Pool(threads)`` starts all its threads before returning (``threads < 1`` is a
  ``ValueError``). If one cannot start, those already started are stopped and joined and the
  error propagates.
* ``spawn(job)`` queues ``job`` and returns without waiting for it; it raises ``RuntimeError``
  once ``shutdown`` has been called (also when called from a job), ``TypeError`` when ``job``
  is not callable. A spawn racing with ``shutdown`` either raises or its job runs: an accepted
  job is never dropped, and every accepted job runs exactly once.
* ``shutdown(wait=True)`` stops accepting jobs, lets the pool run every job already accepted,
  and, with ``wait=True``, joins every thread the pool started. Idempotent: every later call
  with ``wait=True`` waits too. With ``wait=False`` it returns at once; the threads still exit
  by themselves once the accepted jobs have run.
* ``shutdown`` called *from a job running in the pool* is always treated as ``wait=False``:
  the calling job is itself part of the work being waited for, so waiting could only deadlock
  (``concurrent.futures.ThreadPoolExecutor`` raises "cannot join current thread" there). It
  returns at once; the calling thread finishes its job, the remaining jobs run, and every
  thread exits; a later ``shutdown(wait=True)`` from outside the pool joins them all.
* ``with Pool(n) as pool:`` calls ``shutdown(wait=True)`` on exit.

Exceptions raised by jobs: the worker catches everything the job raises (``BaseException``,
as ``ThreadPoolExecutor`` does), reports it through :class:`~kvs.thread_pool.failures.
JobFailureLog` (logging, with traceback, rate-limited) and goes on with its next job. Why
catch-and-continue instead of letting the thread die and starting a replacement: the pool has
exactly ``threads`` threads at every instant, not ``threads - 1`` until the replacement is up;
a flood of failing jobs costs no thread creation (1000 failures would otherwise be 1000 thread
starts); starting a replacement can itself fail (resource limits), which would shrink the pool
for good; and in the work-stealing pool a worker owns a job deque that a dying thread would
have to hand over. A failing job cannot corrupt the worker: the worker's own state is only
touched outside the ``try`` around the job.

Threads are daemon threads: a pool that is never shut down does not keep the process alive
at exit (its queued jobs are then abandoned). Shut pools down (or use ``with``); the server
does. ``ExecutorThreadPool`` is the exception, its threads being ``ThreadPoolExecutor``'s.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from types import TracebackType
from typing import ClassVar, Self

from kvs.freethreading import share_module_globals

#: What a pool runs: called with no arguments, its result ignored.
Job = Callable[[], object]


class ThreadPool(abc.ABC):
    """A fixed set of threads running jobs; the interface the server is typed against.

    ``name`` (class attribute) is the pool's name on the server command line (``--pool``);
    ``threads`` is the thread count it was configured with.
    """

    name: ClassVar[str]
    threads: int

    @abc.abstractmethod
    def __init__(self, threads: int) -> None:
        """Start ``threads`` threads before returning (see the module docstring)."""

    @abc.abstractmethod
    def spawn(self, job: Job) -> None:
        """Queue ``job`` to run on one of the pool's threads; never waits for it.
        ``RuntimeError`` after :meth:`shutdown`."""

    @abc.abstractmethod
    def shutdown(self, wait: bool = True) -> None:
        """Accept no more jobs, run those already accepted and, with ``wait``, join every
        thread. Idempotent. From inside a job of this pool it never waits (see the module
        docstring)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} threads={self.threads}>"


def check_thread_count(threads: int) -> int:
    """``threads`` if it is a valid thread count (an ``int`` >= 1), else ``TypeError`` or
    ``ValueError``."""
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"threads must be an int, not {type(threads).__name__}")
    if threads < 1:
        raise ValueError(f"a thread pool needs at least 1 thread, not {threads}")
    return threads


def check_job(job: Job) -> None:
    """``TypeError`` unless ``job`` is callable: a bad job fails at the ``spawn`` call that
    made it, not later on a worker thread. (The shared-queue and work-stealing pools inline
    this test: on 3.13t a function call per spawn is a measurable part of their cost.)"""
    if not callable(job):
        raise TypeError(f"job must be callable, not {type(job).__name__}")


def closed_error(pool: ThreadPool) -> RuntimeError:
    """The error ``spawn`` raises once ``pool`` is shut down."""
    return RuntimeError(f"cannot spawn a job on {pool.name} pool: it has been shut down")


share_module_globals(globals())

"""Thread pools behind one interface, so that the server can be run on each and compared.

==================  ==========================  ==============================================
name (``--pool``)   class                       threads and queueing
==================  ==========================  ==============================================
``naive``           :class:`NaiveThreadPool`    a new thread per job (baseline)
``shared-queue``    :class:`SharedQueueThreadPool`  N workers, one shared FIFO queue
``work-stealing``   :class:`WorkStealingThreadPool` N workers, a deque each, stealing, parking
``executor``        :class:`ExecutorThreadPool`  ``concurrent.futures.ThreadPoolExecutor``
==================  ==========================  ==============================================

The contract every pool keeps (start, spawn, shutdown, failing jobs) is in
:mod:`kvs.thread_pool.base`; job failures are reported by :mod:`kvs.thread_pool.failures`
through the ``kvs.thread_pool`` logger.
"""

from __future__ import annotations

from kvs.thread_pool.base import Job, ThreadPool
from kvs.thread_pool.executor import ExecutorThreadPool
from kvs.thread_pool.naive import NaiveThreadPool
from kvs.thread_pool.shared_queue import SharedQueueThreadPool
from kvs.thread_pool.work_stealing import WorkStealingThreadPool

#: Pool classes by their ``name`` (the server's ``--pool`` choices).
POOLS: dict[str, type[ThreadPool]] = {
    pool.name: pool
    for pool in (NaiveThreadPool, SharedQueueThreadPool, WorkStealingThreadPool, ExecutorThreadPool)
}


def make_pool(name: str, threads: int) -> ThreadPool:
    """A new pool of the kind called ``name`` (a key of :data:`POOLS`) with ``threads``
    threads, started. ``ValueError`` for an unknown name (the message lists the valid ones)
    or a thread count below 1."""
    try:
        pool_class = POOLS[name]
    except (KeyError, TypeError):
        valid = ", ".join(repr(n) for n in POOLS)
        raise ValueError(f"unknown thread pool {name!r}; valid names: {valid}") from None
    return pool_class(threads)


__all__ = [
    "POOLS",
    "ExecutorThreadPool",
    "Job",
    "NaiveThreadPool",
    "SharedQueueThreadPool",
    "ThreadPool",
    "WorkStealingThreadPool",
    "make_pool",
]

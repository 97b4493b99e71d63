"""NaiveThreadPool: a new thread for every job (the course's baseline).

``threads`` is validated and kept as an attribute, but not used: the number of threads
running at once is the number of jobs running at once.

Bookkeeping (all under ``_lock``): ``_closed``; ``_starting``, the spawns between their
admission check and the end of their ``Thread.start()``; ``_threads``, the threads started
and not yet known to have finished. ``spawn`` checks ``_closed`` and counts itself in
``_starting`` under the lock, starts the thread outside it (a thread start takes tens of
microseconds; spawns from several threads overlap), then records the thread. ``shutdown``
sets ``_closed``, waits (``_no_spawn_starting``) until ``_starting`` is 0, so every thread
ever started is in ``_threads`` (no spawn can start one later), and joins them all. Threads
are joined, not merely waited for, so that once ``shutdown(wait=True)`` returns none of them
appears in ``threading.enumerate()``. Finished threads are pruned from ``_threads`` when it
has doubled in size since the last pruning, which keeps the set proportional to the threads
alive at a constant amortized cost per spawn.

With ``wait=False`` (and from inside a job) nothing is joined: every thread exits by itself
when its job returns. The failure summary (see ``failures``) is flushed by ``shutdown`` and,
after shutdown, by the last job thread to finish.
"""

from __future__ import annotations

import itertools
import threading

from kvs.freethreading import share_module_globals
from kvs.thread_pool.base import Job, ThreadPool, check_job, check_thread_count, closed_error
from kvs.thread_pool.failures import JobFailureLog

_PRUNE_AT_LEAST = 64
_pool_ids = itertools.count()


class NaiveThreadPool(ThreadPool):
    """Starts one thread per spawned job; ``threads`` is validated and unused."""

    name = "naive"

    def __init__(self, threads: int) -> None:
        self.threads = check_thread_count(threads)
        self._lock = threading.Lock()
        self._no_spawn_starting = threading.Condition(self._lock)
        # Guarded by _lock:
        self._closed = False
        self._starting = 0
        self._running = 0  # job threads admitted and not finished
        self._threads: set[threading.Thread] = set()
        self._prune_at = _PRUNE_AT_LEAST
        self._local = threading.local()  # .inside is True on this pool's job threads
        self._failures = JobFailureLog(self.name)
        self._thread_names = itertools.count()
        self._pool_id = next(_pool_ids)

    def spawn(self, job: Job) -> None:
        check_job(job)
        with self._lock:
            if self._closed:
                raise closed_error(self)
            self._starting += 1
            self._running += 1
        thread = threading.Thread(
            target=self._run,
            args=(job,),
            name=f"kvs-{self.name}-{self._pool_id}-{next(self._thread_names)}",
            daemon=True,
        )
        started = False
        try:
            thread.start()
            started = True
        finally:
            with self._lock:
                self._starting -= 1
                if started:
                    self._threads.add(thread)
                    if len(self._threads) >= self._prune_at:
                        self._threads = {t for t in self._threads if t.is_alive()}
                        self._prune_at = max(_PRUNE_AT_LEAST, 2 * len(self._threads))
                else:
                    self._running -= 1
                if self._starting == 0:
                    self._no_spawn_starting.notify_all()

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            if not wait or getattr(self._local, "inside", False):
                threads = None
            else:
                while self._starting:
                    self._no_spawn_starting.wait()
                threads = list(self._threads)
        if threads is not None:
            for thread in threads:
                thread.join()
        self._failures.flush()

    def _run(self, job: Job) -> None:
        self._local.inside = True
        try:
            job()
        except BaseException as exc:
            self._failures.report(job, exc)
        finally:
            del job  # drop it before the thread ends
            with self._lock:
                self._running -= 1
                last_after_shutdown = self._closed and self._running == 0
            if last_after_shutdown:
                self._failures.flush()


share_module_globals(globals())

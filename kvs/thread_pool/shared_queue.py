"""SharedQueueThreadPool: ``threads`` workers taking jobs from one shared FIFO queue.

Structure. One ``queue.SimpleQueue`` (C-implemented; ``put`` hands an item straight to one
blocked ``get`` and wakes only that thread, so there is no notify storm and no lost wake-up
to reason about: blocking and waking are the queue's job). Workers loop on ``get()``.

Admission and shutdown. ``spawn`` checks ``_closed`` and puts the job while holding
``_admission``; ``shutdown`` sets ``_closed`` and puts one ``_STOP`` per worker while holding
it too. So in the queue's FIFO order every accepted job comes before every ``_STOP`` (a spawn
that takes the lock after shutdown sees ``_closed`` and raises; one that took it before has
already put its job). Each worker exits at the first ``_STOP`` it takes and takes no more,
so each of the N workers takes exactly one of the N ``_STOP``s, after every accepted job has
been taken: all accepted jobs run, and all workers exit, also with ``wait=False``. A job
that spawns while shutdown runs goes through the same lock, so it is either queued before
the ``_STOP``s or refused.

Happens-before: the lock orders each spawn's check-and-put against shutdown's
close-and-stop; ``SimpleQueue`` hands each item (and, through its internal mutex, everything
the spawner wrote before ``put``) to exactly one ``get``. The job therefore sees all writes
its spawner made before ``spawn``.

Cost per job: one uncontended-or-briefly-contended lock, one ``put``, one ``get``. The lock
is what makes "accepted means it runs" hold; ``ThreadPoolExecutor`` takes two (its own and a
module-global one) per ``submit``.
"""

from __future__ import annotations

import itertools
import queue
import threading

from kvs.freethreading import share_module_globals
from kvs.thread_pool.base import Job, ThreadPool, check_thread_count, closed_error
from kvs.thread_pool.failures import JobFailureLog


def _STOP() -> None:
    """Queued once per worker by shutdown: "no job will come after this". Never run."""
_pool_ids = itertools.count()


class SharedQueueThreadPool(ThreadPool):
    """``threads`` worker threads consuming one shared ``queue.SimpleQueue``."""

    name = "shared-queue"

    def __init__(self, threads: int) -> None:
        self.threads = check_thread_count(threads)
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._put = self._jobs.put  # looked up once: 3.13t does not specialize attribute access
        self._admission = threading.Lock()
        self._closed = False  # guarded by _admission
        self._failures = JobFailureLog(self.name)
        self._local = threading.local()  # .inside is True on this pool's workers
        self._workers: list[threading.Thread] = []
        pool_id = next(_pool_ids)
        try:
            for i in range(self.threads):
                worker = threading.Thread(
                    target=self._work, name=f"kvs-{self.name}-{pool_id}-{i}", daemon=True
                )
                worker.start()
                self._workers.append(worker)
        except BaseException:
            self.shutdown(wait=True)  # stops and joins the workers that did start
            raise

    def spawn(self, job: Job) -> None:
        if not callable(job):
            raise TypeError(f"job must be callable, not {type(job).__name__}")
        with self._admission:
            if self._closed:
                raise closed_error(self)
            self._put(job)

    def shutdown(self, wait: bool = True) -> None:
        with self._admission:
            if not self._closed:
                self._closed = True
                for _ in self._workers:
                    self._jobs.put(_STOP)
        if wait and not getattr(self._local, "inside", False):
            for worker in self._workers:
                worker.join()
        self._failures.flush()

    def _work(self) -> None:
        self._local.inside = True
        get = self._jobs.get
        failures = self._failures
        stop = _STOP  # a local: no module-global load per job
        while True:
            job = get()
            if job is stop:
                break
            try:
                job()
            except BaseException as exc:
                failures.report(job, exc)
            del job  # drop the job (and what it holds) before blocking for the next one
        failures.flush()


share_module_globals(globals())

"""WorkStealingThreadPool: per-worker deques, an injector, stealing, parking.

Structure.

* Each worker owns a ``collections.deque`` of jobs. ``spawn`` called from inside a job running
  on worker W appends to W's deque. The owner pops its newest job (``pop``, LIFO: the job it
  just spawned, whose data is still in cache); idle workers steal the oldest (``popleft``).
* ``spawn`` from any other thread goes to the injector. The injector is shared by all
  workers but striped by producer: each external thread gets its own FIFO *lane* (a deque,
  registered in ``_lanes``) on its first spawn, and only that thread appends to it. So
  producers never contend with each other, and a spawn takes no lock at all (see Admission
  below for why none is needed). When the thread ends (a finalizer of a token kept in its
  thread-local storage reports it), its lane is retired, and a worker about to park drops it
  once it is empty: a thread that spawns and exits leaves no lane behind for the workers to
  scan forever, and no accepted job is dropped with it.
* A worker looks for a job in this order: its own deque; the lanes, taking up to
  ``LANE_BURST`` jobs in a row from one lane before moving to the next (starting at a lane
  that depends on the worker, so workers spread over producers and no producer starves
  another); the other workers' deques, stealing one job (starting with its right-hand
  neighbour, so thieves spread over victims). Hence a pool fed only from outside never pays
  for scanning deques, and a pool running nested jobs only scans the lanes when its own deque
  runs dry.
* An idle worker parks: it blocks in ``get()`` on its own ``queue.SimpleQueue`` "mailbox"
  until a waker puts one token there. No spinning: a parked worker uses no CPU.
* Every deque is created by the thread that appends to it (worker or producer), so the
  frequent reference-count updates of its owner stay thread-local on 3.13t.

All deque methods used here (``append``, ``pop``, ``popleft``, ``remove``) are atomic on
3.13t: each runs inside the deque's per-object critical section (a mutex). ``len`` /
truthiness of a deque is a lock-free read, used only as a hint on fast paths.

Every deque has exactly one appender (its owner thread), and everybody else only takes from
its left end. Hence: after its owner appended job J, the deque's rightmost item is J as long
as J has not been taken, and once J has been taken (by ``popleft``) everything to its left
has been taken too, so the deque is empty. The owner can therefore *retract* J with ``pop()``:
it gets J back exactly when no worker took it.

Admission (spawn racing with shutdown). ``spawn`` reads ``_closed`` (fast refusal), appends
J to its deque or lane, then reads ``_closed`` again; if it is now set, it tries to retract
J: if it gets J back, ``spawn`` raises ``RuntimeError`` and J never runs; if a worker already
took J, J runs and ``spawn`` returns normally. Either way "accepted" and "runs" coincide.
Why a spawn that reads ``_closed`` False after its append is safe: see Termination.

Parking without lost wake-ups. ``_sleepers`` lists the workers registered as sleeping (a
worker is in it at most once) and ``_asleep`` is its length; both change only under
``_idle_lock``, and ``_asleep`` (a small int: reading it touches no reference count) is read
without the lock by ``spawn``. A worker about to park

  1. registers: under ``_idle_lock``, counts itself in ``_idle``, appends itself to
     ``_sleepers`` (``_asleep += 1``) and reads the current ``_lanes`` (lanes are registered
     under the same lock);
  2. rescans every lane and every other worker's deque with ``popleft`` (a *locking*
     operation even on an empty deque: it raises IndexError inside the critical section), and
     runs what it finds instead of parking;
  3. otherwise blocks on its mailbox.

``spawn`` appends J (a locking operation on that deque D), *then* reads ``_asleep``; when it
is not 0, it pops one worker from ``_sleepers`` (under the lock) and puts one token in its
mailbox. Why J cannot be left in D while workers sleep for good. First, a lemma: if a worker
W's step-2 scan misses J, then W's step-1 registration happens-before the spawn's read of
``_asleep``. Indeed, if W's step 1 read a ``_lanes`` without D, D was registered under
``_idle_lock`` after it, so W's registration happens-before D's registration, which precedes
the append and the read. Otherwise W scanned D; both D operations take D's mutex, so one came
first; had the append come first W would have seen J; so W's scan came first, and W's
registration (before its scan) happens-before the append (which locked D after W's scan
unlocked it), which precedes the read. Now suppose some workers park for good while J stays
in D. The last registration of each of them missed J, so by the lemma all these
registrations happen-before the read, and none is ever undone (nobody pops these workers,
or they would wake and register again). So the read returns a value of ``_asleep`` that
counts them, not 0, and the spawn then finds ``_sleepers`` non-empty (they are still in it),
pops a worker and wakes it; that worker scans after the wake-up, so after the append, and
takes J: a contradiction. Hence J is taken unless every worker is busy for good (and then
nobody could run it anyway). The
argument needs only mutual exclusion and program order (no fences, no assumption about the
hardware's memory ordering), which is why step 2 must not use the lock-free truthiness test.

Cheap wake-ups. A spawn wakes at most one worker, and only when one is registered asleep:
with all workers busy, a spawn costs an append and a few attribute reads, no lock. A worker
woken for a job that another worker took finds nothing and parks again. A worker that
registered and then found a job in step 2 removes itself from ``_sleepers``; if a waker
popped it meanwhile, the waker's token stays in its mailbox and only makes its next park
return at once (one extra scan), which is harmless.

Shutdown and termination. ``shutdown`` sets ``_closed``, then ``_closing`` under
``_idle_lock``, then puts a token in every mailbox so parked workers re-check. Workers do not
exit one by one: the pool terminates at quiescence, detected by a worker that registers
(step 1) while ``_closing`` and finds all ``_live`` workers registered idle (instant T0), and
whose step-2 rescan then finds nothing. It sets ``_terminated`` and wakes everybody; a worker
exits when it finds no job and sees ``_terminated``. Why no accepted job is lost:

* At T0 no worker runs a job: a worker registered idle holds no job, except one that found
  a job in its step-2 rescan, which leaves the idle count under ``_idle_lock`` before running
  it, hence after T0, hence after ``_closing`` was set, so that job reads ``_closed`` as True
  in any ``spawn`` it makes, and retracts (or sees taken, and so run) whatever it appends.
* An external spawn whose append to lane D came after the terminator's step-2 scan of D (or
  after the lane was missing from the terminator's step 1) reads ``_closed`` as True: the
  ``_closed`` write happens-before ``_closing``'s, before T0, before that scan, before the
  append (D's mutex, or ``_idle_lock`` for a lane registered later). So it retracts J, or J
  was taken by a worker that runs it.
* Every other accepted job was appended before the terminator's scan of its deque and is
  either found by that scan (no termination then) or was taken before by a worker that will
  run it. A job in hand is run before its worker looks for the next one.

So nothing accepted is left when the workers exit. And no worker exits while a job that can
still spawn successfully is running (its worker is not idle, so there is no quiescence): a
job that spawns children and waits for them during shutdown keeps the idle workers as
thieves. ``wait=False`` needs nothing more: the workers terminate by themselves.
``shutdown`` called from inside a job sets the flags and wakes the workers but never joins
(the caller's worker is busy: quiescence cannot come before the caller's job returns).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable

from kvs.freethreading import share_module_globals
from kvs.thread_pool.base import Job, ThreadPool, check_thread_count, closed_error
from kvs.thread_pool.failures import JobFailureLog

logger = logging.getLogger("kvs.thread_pool")
_pool_ids = itertools.count()

#: Jobs a worker takes from one lane in a row before looking at the next lane (fairness
#: between producers, while amortizing the cost of moving from lane to lane).
LANE_BURST = 16


class _Worker:
    """What other threads touch of one worker: its job deque (thieves ``popleft``), its
    mailbox (a waker puts one token to unpark it) and its ``lanes_changed`` flag (set under
    ``_idle_lock`` when the set of lanes changes; the worker then re-reads ``_lanes``)."""

    __slots__ = ("index", "jobs", "mailbox", "lanes_changed")

    def __init__(self, index: int, jobs: deque[Job], mailbox: queue.SimpleQueue[None]) -> None:
        self.index = index
        self.jobs = jobs
        self.mailbox = mailbox
        self.lanes_changed = True


class _LaneOwner:
    """Kept in an external thread's thread-local storage, so freed when the thread ends; a
    ``weakref.finalize`` on it then retires the thread's lane."""

    __slots__ = ("__weakref__",)


class WorkStealingThreadPool(ThreadPool):
    """``threads`` workers, each with its own deque; external jobs go through per-producer
    injector lanes; idle workers steal the oldest job of a busy one, or park."""

    name = "work-stealing"

    def __init__(self, threads: int) -> None:
        self.threads = check_thread_count(threads)
        self._closed = False  # set once by shutdown; read without lock (see Admission)
        self._asleep = 0  # len(_sleepers); written under _idle_lock, read without lock
        self._idle_lock = threading.Lock()
        # Guarded by _idle_lock:
        self._idle = 0  # workers between registering idle and leaving idle
        self._live = 0  # workers that started (and did not die of an internal error)
        self._closing = False
        self._terminated = False
        self._sleepers: list[_Worker] = []  # registered idle and not yet woken
        self._workers: list[_Worker] = []  # appended by each worker as it starts
        self._lanes: tuple[deque[Job], ...] = ()  # replaced, never mutated
        self._retired_lanes: deque[deque[Job]] = deque()  # of exited producers, not dropped yet
        # .jobs: this thread's deque (worker) or lane (producer); .worker: its _Worker
        self._local = threading.local()
        self._failures = JobFailureLog(self.name)
        self._threads: list[threading.Thread] = []
        self._go = threading.Event()  # set once every started worker has published itself
        pool_id = next(_pool_ids)
        try:
            for i in range(self.threads):
                published = threading.Event()
                thread = threading.Thread(
                    target=self._work,
                    args=(published,),
                    name=f"kvs-{self.name}-{pool_id}-{i}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)
                published.wait()
        except BaseException:
            self._go.set()
            self.shutdown(wait=True)  # terminates and joins the workers that did start
            raise
        self._go.set()

    # -- public interface ---------------------------------------------------------------

    def spawn(self, job: Job) -> None:
        if not callable(job):
            raise TypeError(f"job must be callable, not {type(job).__name__}")
        if self._closed:
            raise closed_error(self)
        try:
            jobs = self._local.jobs  # this worker's deque, or this producer's lane
        except AttributeError:
            jobs = self._add_lane()
        jobs.append(job)
        if self._closed:  # shutdown began meanwhile: retract the job if nobody took it
            try:
                jobs.pop()  # ours: only this thread appends here, others take from the left
            except IndexError:
                pass  # a worker took it: it runs, so the spawn succeeded
            else:
                raise closed_error(self)
        if self._asleep:  # read after the append: see "Parking without lost wake-ups"
            self._wake_one()

    def shutdown(self, wait: bool = True) -> None:
        self._closed = True
        with self._idle_lock:
            self._closing = True
        self._wake_all()
        if wait and getattr(self._local, "worker", None) is None:
            for thread in self._threads:
                thread.join()
        self._failures.flush()

    # -- producers' lanes ---------------------------------------------------------------

    def _add_lane(self) -> deque[Job]:
        """Create and register the calling (non-worker) thread's injector lane."""
        lane: deque[Job] = deque()
        owner = _LaneOwner()
        # The finalizer holds the pool weakly: a thread outliving the pool keeps no pool alive.
        finalizer = weakref.finalize(owner, _retire_lane, weakref.ref(self), lane)
        finalizer.atexit = False  # type: ignore[misc]  # documented API; typeshed's __slots__ omit it
        with self._idle_lock:
            self._set_lanes((*self._lanes, lane))
        self._local.lane_owner = owner
        self._local.jobs = lane
        return lane

    def _set_lanes(self, lanes: tuple[deque[Job], ...]) -> None:
        """Replace the lanes and tell every worker. Caller holds ``_idle_lock``."""
        self._lanes = lanes
        for worker in self._workers:
            worker.lanes_changed = True

    def _retire_lane(self, lane: deque[Job]) -> None:
        """The lane's producer thread has ended: a worker drops the lane once it is empty.
        Runs in a finalizer, at an arbitrary point of some thread: takes no lock (a lock-free
        deque append) so that it can never wait for a lock its own thread holds."""
        self._retired_lanes.append(lane)

    def _drop_empty_retired_lanes(self) -> None:
        """Drop the retired lanes that are empty (workers call this before parking)."""
        if not self._retired_lanes:  # lock-free hint; a lane missed now is dropped later
            return
        with self._idle_lock:
            empty: list[deque[Job]] = []
            still_busy: list[deque[Job]] = []
            while self._retired_lanes:
                lane = self._retired_lanes.popleft()
                # Nobody appends to a retired lane any more: empty now means empty for good.
                (still_busy if lane else empty).append(lane)
            self._retired_lanes.extend(still_busy)
            if empty:
                self._set_lanes(tuple(lane for lane in self._lanes if all(lane is not e for e in empty)))

    # -- waking ---------------------------------------------------------------------------

    def _wake_one(self) -> None:
        with self._idle_lock:
            if not self._sleepers:
                return  # another spawn woke the last sleeper
            worker = self._sleepers.pop()  # the most recently parked: the least cold
            self._asleep -= 1
        worker.mailbox.put(None)

    def _wake_all(self) -> None:
        with self._idle_lock:
            workers = list(self._workers)
        for worker in workers:
            worker.mailbox.put(None)

    # -- workers --------------------------------------------------------------------------

    def _work(self, published: threading.Event) -> None:
        jobs: deque[Job] = deque()
        mailbox: queue.SimpleQueue[None] = queue.SimpleQueue()
        with self._idle_lock:
            me = _Worker(len(self._workers), jobs, mailbox)
            self._workers.append(me)
            self._live += 1
        self._local.jobs = jobs
        self._local.worker = me
        published.set()
        self._go.wait()
        try:
            self._run_jobs(me)
        except BaseException:  # a bug in the pool itself, not in a job: jobs are caught
            logger.critical("%s pool: worker %d died", self.name, me.index, exc_info=True)
            with self._idle_lock:
                self._live -= 1
            self._wake_all()  # let the others re-check quiescence without this worker
        finally:
            self._failures.flush()

    def _run_jobs(self, me: _Worker) -> None:
        """The worker loop. Written for the 3.13t interpreter, which does not specialize
        bytecode: bound methods are looked up once, and the loops that run jobs in a row
        (own deque, a lane's burst) do as little else per job as possible."""
        workers = self._workers  # complete: _go is set after every worker published
        count = len(workers)
        victims = tuple(workers[(me.index + k) % count].jobs for k in range(1, count))
        jobs = me.jobs
        pop = jobs.pop
        failures = self._failures
        burst = range(LANE_BURST)
        lanes: tuple[tuple[deque[Job], Callable[[], Job]], ...] = ()
        job: Job | None = None
        while True:
            # 1. Own deque, newest first.
            while jobs:
                try:
                    job = pop()
                except IndexError:  # a thief took it between the test and the pop
                    break
                try:
                    job()
                except BaseException as exc:
                    failures.report(job, exc)
                job = None  # drop the job (and what it holds) before the next one
            # 2. The lanes, oldest job first, at most LANE_BURST jobs per lane and visit, each
            #    worker starting at another lane. Own jobs spawned meanwhile come first.
            if me.lanes_changed:
                me.lanes_changed = False
                current = self._lanes
                start = me.index % len(current) if current else 0
                lanes = tuple((lane, lane.popleft) for lane in current[start:] + current[:start])
            took = False
            for lane, take in lanes:
                if lane:
                    for _ in burst:
                        try:
                            job = take()
                        except IndexError:
                            break
                        took = True
                        try:
                            job()
                        except BaseException as exc:
                            failures.report(job, exc)
                        job = None
                        if jobs:
                            break
                    if jobs:
                        break
            if took:
                continue
            # 3. Steal the oldest job of another worker.
            job = None
            for victim in victims:
                if victim:
                    try:
                        job = victim.popleft()
                        break
                    except IndexError:
                        pass
            # 4. Nothing anywhere: park.
            if job is None:
                job = self._park(me, victims)
                if job is None:
                    return  # terminated
            try:
                job()
            except BaseException as exc:
                failures.report(job, exc)
            job = None

    def _park(self, me: _Worker, victims: tuple[deque[Job], ...]) -> Job | None:
        """Block until there is a job (returned) or the pool has terminated (None)."""
        self._drop_empty_retired_lanes()
        sleepers = self._sleepers
        wait_for_token = me.mailbox.get
        while True:
            with self._idle_lock:  # step 1
                if self._terminated:
                    return None
                self._idle += 1
                quiescent = self._closing and self._idle == self._live
                sleepers.append(me)
                self._asleep += 1
                lanes = self._lanes
            job = _take_oldest(lanes, victims)  # step 2
            if job is None:
                if quiescent:
                    with self._idle_lock:
                        self._terminated = True
                    self._wake_all()
                    return None
                wait_for_token()  # step 3
            with self._idle_lock:
                self._idle -= 1
                if me in sleepers:  # else a waker popped me: its token is on its way
                    sleepers.remove(me)
                    self._asleep -= 1
            if job is None:  # woken: a hinted scan will do, step 2 re-checks before parking
                job = _take_oldest_hinted(self._lanes, victims)
            if job is not None:
                return job


def _take_oldest(lanes: tuple[deque[Job], ...], victims: tuple[deque[Job], ...]) -> Job | None:
    """The oldest job of the first non-empty lane or victim deque, found with locking
    ``popleft`` calls only (the parking argument needs the lock even on empty deques)."""
    for source in (*lanes, *victims):
        try:
            return source.popleft()
        except IndexError:
            pass
    return None


def _take_oldest_hinted(lanes: tuple[deque[Job], ...], victims: tuple[deque[Job], ...]) -> Job | None:
    """Like :func:`_take_oldest`, but skipping the deques that look empty (lock-free test):
    cheaper, and fine where missing a job only costs one more round of parking's step 1-2."""
    for source in (*lanes, *victims):
        if source:
            try:
                return source.popleft()
            except IndexError:
                pass
    return None


def _retire_lane(pool_ref: weakref.ref[WorkStealingThreadPool], lane: deque[Job]) -> None:
    """Finalizer of a producer thread's lane token (runs as the thread ends)."""
    pool = pool_ref()
    if pool is not None:
        pool._retire_lane(lane)


share_module_globals(globals())

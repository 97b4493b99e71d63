"""Acquiring a lock whose holder keeps it for about a microsecond, without ``sched_yield``.

On 3.13t a ``threading.Lock`` that is found held is retried up to 40 times, each try after a
``sched_yield``, before the thread parks. ``sched_yield`` hands this CPU to any other thread
ready to run on it, such as a client on the same machine; the waiting thread then gets the
CPU back only after that thread's whole turn, far longer than the critical section it was
waiting for. :func:`acquire_spinning` retries without yielding for a while, then waits as
usual, so a holder that was preempted is still waited for without burning the CPU.
``docs/free-threading.md``, section 2c, has the measurements behind this (the append lock
under redis-benchmark) and the number of tries.

Correctness does not depend on any of it: after the tries the thread blocks in ``acquire``,
and a lock acquired here is an ordinary acquired lock.
"""

from __future__ import annotations

import os
import threading

from kvs.freethreading import share_module_globals

SPINS = 64 if (os.cpu_count() or 1) > 1 else 0
"""Non-blocking tries before a blocking ``acquire`` (none on one CPU: the holder cannot run
while this thread spins). docs/free-threading.md, section 2c, says how long they take."""


def acquire_spinning(lock: threading.Lock) -> None:
    """Acquire ``lock``, which was just found held, for a holder that keeps it briefly:
    retry without letting go of the CPU for a while, then wait as usual."""
    for _ in range(SPINS):
        if lock.acquire(False):
            return
    lock.acquire()


share_module_globals(globals())

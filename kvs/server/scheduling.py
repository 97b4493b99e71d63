"""How the threads that serve connections ask the OS scheduler to treat them.

``batch`` (the default) runs each leader-followers loop under Linux's ``SCHED_BATCH`` policy
for as long as it serves, and gives the thread its previous policy back when it leaves.
``SCHED_BATCH`` keeps the thread's priority and its share of the CPU; it only changes one
thing (``sched(7)``): a batch thread that wakes up does not preempt the thread running on
that CPU, it waits for that thread to block or for its time slice to end.

Why that is the right default for a server whose clients may share its CPUs: a client
sends a request, and the kernel wakes a pool thread on the client's own CPU (it is the
cache-warm choice). A normal thread preempts the client at once, answers that one request
and blocks again; the client gets the CPU back, sends one more request, and the two
alternate one request per pair of context switches on one CPU, while the other pool thread
runs alone on the other CPU. ``perf sched timehist`` shows exactly that on 2 cores with
redis-benchmark at 50 connections, with the machine partly idle; it does not always settle
in that pattern, so the same benchmark ran at two quite different rates from one run to
the next. A batch thread lets the client go on sending until it blocks, then finds several
requests ready at once: the pattern disappears (the trace, its figures and the A/B rounds
are in ``docs/free-threading.md``, section 2d).

What it costs: on a CPU that is busy with another program, a woken pool thread waits for
that program's time slice to end or for it to block, where a normal one would preempt it.
On an idle CPU (a server with cores to spare) there is nothing to preempt and nothing
changes. ``normal`` leaves the threads as they are. Where ``SCHED_BATCH`` does not exist
(not Linux) or cannot be set, ``batch`` is ``normal``, logged once at debug level.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger("kvs.server")

SCHEDULING = ("batch", "normal")
"""Scheduling modes of the connection-serving threads; the first is the default."""

_SCHED_BATCH: int | None = getattr(os, "SCHED_BATCH", None)
_SCHED_OTHER: int = getattr(os, "SCHED_OTHER", 0)


@contextmanager
def thread_scheduling(mode: str) -> Iterator[bool]:
    """Run the ``with`` block with the calling thread under ``mode``; yields True when the
    thread's policy was changed for it. The policy is changed only from ``SCHED_OTHER``
    (a real-time or idle thread is left alone) and restored on the way out, so a pool thread
    lent to a server goes back to its pool as it came."""
    if mode not in SCHEDULING:
        raise ValueError(f"unknown scheduling mode {mode!r} (choose from {', '.join(SCHEDULING)})")
    changed = False
    if mode == "batch" and _SCHED_BATCH is not None:
        try:
            if os.sched_getscheduler(0) == _SCHED_OTHER:  # 0: the calling thread, on Linux
                os.sched_setscheduler(0, _SCHED_BATCH, os.sched_param(0))
                changed = True
        except OSError as exc:
            log.debug("cannot run a server thread under SCHED_BATCH: %s", exc.strerror)
    try:
        yield changed
    finally:
        if changed:
            try:
                os.sched_setscheduler(0, _SCHED_OTHER, os.sched_param(0))
            except OSError as exc:
                log.warning("cannot restore a pool thread's scheduling policy: %s", exc.strerror)

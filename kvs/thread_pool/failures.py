"""Reporting exceptions raised by jobs: through ``logging``, with tracebacks, rate-limited.

Every pool catches what a job raises and hands it to its :class:`JobFailureLog`; the worker
thread then goes on with the next job (why catch-and-continue: see ``kvs.thread_pool.base``).

Rate limit. Failures are grouped in windows of ``window`` seconds, a window opening at the
first failure after the previous one closed. The first ``burst`` failures of a window are
logged one by one at ERROR level with their traceback; the rest are only counted (per
exception type). The count is logged as one summary line, when the first failure after the
window arrives (that failure opens the next window) or when :meth:`JobFailureLog.flush` is
called (pools call it as they shut down). So a flood of N failing jobs costs at most
``burst`` tracebacks plus one summary line per window, whatever N is, and every failure is
either logged or counted in a summary: summary records carry the count in their
``suppressed_failures`` attribute, so nothing is silently dropped.

Thread safety. :meth:`report` and :meth:`flush` may be called from any thread. The decision
(log it, count it, close the window) is taken under ``self._lock``, so each failure is
counted exactly once and each count is summarized exactly once; the log records themselves
are emitted after the lock is released, so a slow log handler never holds up other failing
workers behind this lock. Consequence: with several threads failing at once, the order of
records in the log may differ slightly from the order of the decisions (a summary may follow
a traceback that was decided after it). Failures are the slow path: nothing here is on the
path of a job that succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable

from kvs.freethreading import share_module_globals

logger = logging.getLogger("kvs.thread_pool")

#: Failures logged with their traceback per window, by default.
DEFAULT_BURST = 5
#: Length of a rate-limit window in seconds, by default.
DEFAULT_WINDOW_SECONDS = 60.0


def describe_job(job: object) -> str:
    """A short, safe description of ``job`` for log lines: its qualified name when it has one
    (functions, methods, classes), else its type's, never its ``repr`` (which can be huge, or
    raise, or expose the data a job closes over)."""
    for candidate in (job, getattr(job, "func", None), type(job)):  # getattr: functools.partial
        qualname = getattr(candidate, "__qualname__", None)
        if isinstance(qualname, str):
            module = getattr(candidate, "__module__", None)
            return f"{module}.{qualname}" if isinstance(module, str) else qualname
    return "<job>"


class JobFailureLog:
    """Logs what jobs of one pool raise: the first ``burst`` failures of every ``window``
    seconds with their traceback, the rest as a counted summary (see the module docstring).

    ``clock`` returns seconds (monotonic); tests inject a fake one.
    """

    def __init__(
        self,
        pool: str,
        *,
        burst: int = DEFAULT_BURST,
        window: float = DEFAULT_WINDOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 0:
            raise ValueError(f"burst must be >= 0, not {burst}")
        if not window > 0:
            raise ValueError(f"window must be > 0 seconds, not {window}")
        self.pool = pool
        self._burst = burst
        self._window = window
        self._clock = clock
        self._lock = threading.Lock()
        # All below: guarded by _lock.
        self._window_end = float("-inf")  # no window open yet
        self._logged_in_window = 0
        self._suppressed: Counter[str] = Counter()  # exception type name -> count, this window
        self._suppressed_since = 0.0  # clock() at the first suppressed failure of the window

    def report(self, job: object, exc: BaseException) -> None:
        """Record that ``job`` raised ``exc``: log it with its traceback, or count it for the
        next summary. Never raises (a failure to log is handled by ``logging`` itself)."""
        now = self._clock()
        with self._lock:
            summary = None
            if now >= self._window_end:
                summary = self._take_summary(now)
                self._window_end = now + self._window
                self._logged_in_window = 0
            if self._logged_in_window < self._burst:
                self._logged_in_window += 1
                last_of_burst = self._logged_in_window == self._burst
                log_traceback = True
            else:
                if not self._suppressed:
                    self._suppressed_since = now
                self._suppressed[type(exc).__qualname__] += 1
                log_traceback = False
        if summary is not None:
            self._log_summary(*summary)
        if log_traceback:
            note = (
                f"; further failures in the next {self._window:g} s are only counted"
                if last_of_burst
                else ""
            )
            logger.error(
                "%s pool: job %s raised %s%s",
                self.pool,
                describe_job(job),
                type(exc).__qualname__,
                note,
                exc_info=exc,
            )

    def flush(self) -> None:
        """Log the summary of failures counted but not yet logged, if any. Idempotent and
        cheap when there is nothing to summarize."""
        with self._lock:
            summary = self._take_summary(self._clock())
        if summary is not None:
            self._log_summary(*summary)

    def _take_summary(self, now: float) -> tuple[Counter[str], float] | None:
        """The pending counts and how long they were collecting, reset; None if there are
        none. Caller holds ``_lock``."""
        if not self._suppressed:
            return None
        counts, self._suppressed = self._suppressed, Counter()
        return counts, now - self._suppressed_since

    def _log_summary(self, counts: Counter[str], seconds: float) -> None:
        total = sum(counts.values())
        by_type = ", ".join(f"{name} x{n}" for name, n in counts.most_common())
        logger.error(
            "%s pool: %d more job failures in the last %.1f s were not logged one by one (%s)",
            self.pool,
            total,
            seconds,
            by_type,
            extra={"suppressed_failures": total},
        )


share_module_globals(globals())

"""The one clock of the engines' expiry: Unix time in integer milliseconds.

Every engine takes ``clock=`` at ``open`` (default :func:`wall_clock_ms`) and asks it, and
nothing else, what time it is: deadlines, ``ttl``, the expiry sweep, compaction and
recovery dropping expired records. Tests pass a :class:`ManualClock` to move time by hand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

Clock = Callable[[], int]
"""A function returning the current Unix time in integer milliseconds."""


def wall_clock_ms() -> int:
    """The system's real-time clock, in Unix milliseconds."""
    return time.time_ns() // 1_000_000


class ManualClock:
    """A clock that moves only when told to: ``clock()`` is the time, ``advance(seconds)``
    moves it. Safe to share between threads."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms
        self._lock = threading.Lock()

    def __call__(self) -> int:
        return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += round(seconds * 1000)

    def set(self, unix_ms: int) -> None:
        with self._lock:
            self._now = unix_ms

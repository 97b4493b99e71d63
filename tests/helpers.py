"""Helpers every test module shares: waiting for a condition, running threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

DEADLINE = 30.0
"""Seconds any single wait may take before the test fails (far above what it needs)."""


def wait_until(condition: Callable[[], object], timeout: float = DEADLINE, interval: float = 0.005) -> bool:
    """Poll ``condition`` until it is true (True) or ``timeout`` seconds pass (its last value,
    as a bool). For tests that assert on the outcome themselves."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return bool(condition())
        time.sleep(interval)


def wait_for(condition: Callable[[], object], timeout: float = DEADLINE, what: str = "condition") -> None:
    """Poll ``condition`` until it is true; fail the test after ``timeout`` seconds."""
    if not wait_until(condition, timeout):
        pytest.fail(f"timed out after {timeout} s waiting for {what}")


def run_threads(targets: list[Callable[[], object]], timeout: float = 90.0) -> None:
    """Run each target in its own thread; re-raise the first exception any of them raised;
    fail when one is still running after ``timeout`` seconds (for all of them together)."""
    errors: list[BaseException] = []

    def body(fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(fn,), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "worker threads did not finish in time"
    if errors:
        raise errors[0]

"""kvs.server.scheduling: the policy of a connection-serving thread, changed and restored."""

from __future__ import annotations

import os
import threading

import pytest

from kvs.server.scheduling import thread_scheduling

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux-only")


def run_in_a_new_thread(fn) -> object:
    """``fn()`` on a fresh thread (whose policy the test may change for good); its result."""
    result: list[object] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=body)
    t.start()
    t.join(30)
    assert not t.is_alive()
    if errors:
        raise errors[0]
    return result[0]


def test_batch_changes_a_normal_thread_for_the_block_only() -> None:
    def body() -> tuple[int, bool, int, int]:
        before = os.sched_getscheduler(0)
        with thread_scheduling("batch") as changed:
            inside = os.sched_getscheduler(0)
        return before, changed, inside, os.sched_getscheduler(0)

    assert run_in_a_new_thread(body) == (os.SCHED_OTHER, True, os.SCHED_BATCH, os.SCHED_OTHER)


def test_the_policy_comes_back_when_the_block_raises() -> None:
    def body() -> int:
        with pytest.raises(RuntimeError):
            with thread_scheduling("batch"):
                raise RuntimeError("boom")
        return os.sched_getscheduler(0)

    assert run_in_a_new_thread(body) == os.SCHED_OTHER


def test_normal_and_a_thread_that_is_not_sched_other_are_left_alone() -> None:
    def body() -> list[tuple[bool, int]]:
        seen = []
        with thread_scheduling("normal") as changed:
            seen.append((changed, os.sched_getscheduler(0)))
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only
        with thread_scheduling("batch") as changed:
            seen.append((changed, os.sched_getscheduler(0)))
        seen.append((False, os.sched_getscheduler(0)))
        return seen

    assert run_in_a_new_thread(body) == [(False, os.SCHED_OTHER), (False, os.SCHED_IDLE),
                                         (False, os.SCHED_IDLE)]


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown scheduling mode 'rt'"):
        with thread_scheduling("rt"):
            pass

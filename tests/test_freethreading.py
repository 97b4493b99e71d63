"""kvs.freethreading: the one marking primitive, the copies that replace racy marks, and the
switch that turns every mark off."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import types
from collections.abc import Callable

import pytest

from kvs import freethreading
from kvs.freethreading import (
    SHARED_COUNT_OFFSET,
    is_shareable,
    mark_shared,
    mark_shared_str,
    share_attributes,
    share_module_globals,
    shared_copy,
    str_needs_mark,
)

needs_marking = pytest.mark.skipif(not freethreading.MARKING_ENABLED,
                                   reason="marking is off (GIL build, unknown layout or KVS_MARK_SHARED=0)")


def fresh_str(n: int) -> str:
    return ("x" * n + "!")[:n]  # built at run time: not interned, owned by this thread


class Plain:
    pass


@needs_marking
def test_a_fresh_object_is_not_shareable_until_marked() -> None:
    obj = Plain()
    text = fresh_str(10)
    number = int("12345678901234567890")
    for o in (obj, text, number):
        assert not is_shareable(o), "the test would be vacuous"
        mark_shared(o)
        assert is_shareable(o)


@needs_marking
def test_the_inlined_store_is_the_primitive() -> None:
    """What the hot paths write, ``SHARED_COUNTS[(id(o) + SHARED_COUNT_OFFSET) >> 3] = 1``, is
    what ``mark_shared`` does: the word it addresses is the one ``is_shareable`` reads."""
    counts = freethreading.SHARED_COUNTS
    a, b = fresh_str(20), fresh_str(21)
    assert counts[(id(a) + SHARED_COUNT_OFFSET) >> 3] == 0
    counts[(id(a) + SHARED_COUNT_OFFSET) >> 3] = 1
    mark_shared(b)
    assert counts[(id(b) + SHARED_COUNT_OFFSET) >> 3] == 1
    assert is_shareable(a) and is_shareable(b)


@pytest.mark.parametrize("text, needs", [("", False), ("a", False), ("\xff", False), ("\u0100", True),
                                         ("ab", True), ("caf\xe9", True)])
def test_str_needs_mark_is_false_exactly_for_the_immortal_singletons(text: str, needs: bool) -> None:
    made = text.encode().decode()  # what bytes.decode hands a write path
    assert str_needs_mark(made) is needs
    # The inlined copy of the hot paths, letter for letter:
    assert (len(made) > 1 or (len(made) == 1 and ord(made) > 0xFF)) is needs
    if not needs and freethreading.LAYOUT_KNOWN:
        assert is_shareable(made), "a singleton that needs no mark is immortal"


@needs_marking
def test_mark_shared_str_skips_singletons_and_marks_the_rest() -> None:
    long = fresh_str(5)
    mark_shared_str(long)
    assert is_shareable(long)
    mark_shared_str("a".encode().decode())  # immortal: must not be written to


@pytest.mark.parametrize("make", [
    lambda: int("1" * 30), lambda: -int("1" * 20), lambda: float("3.25"), lambda: fresh_str(9),
    lambda: fresh_str(10).encode(), lambda: (int("9" * 25), fresh_str(4), (int("7" * 22),)),
    lambda: frozenset({fresh_str(3), int("5" * 40)}),
])
def test_shared_copy_is_equal_and_shareable(make: Callable[[], object]) -> None:
    """(Values made at run time: the constants of a code object are immortal on 3.13t.)"""
    value = make()
    copy = shared_copy(value)
    assert copy == value and type(copy) is type(value)
    if freethreading.MARKING_ENABLED:
        assert copy is not value
        assert is_shareable(copy)
        for item in copy if isinstance(copy, (tuple, frozenset)) else ():
            assert is_shareable(item)
    else:
        assert copy is value


def test_shared_copy_keeps_immortals_and_other_types() -> None:
    for value in (5, "", "a", None, True, ()):
        assert shared_copy(value) is value
    mutable = [1, 2]
    assert shared_copy(mutable) is mutable


@needs_marking
def test_share_attributes_flags_the_object_and_replaces_immutable_values() -> None:
    class Slotted:
        __slots__ = ("big", "name", "items", "__weakref__")

    obj = Slotted()
    obj.big, obj.name, obj.items = 10**30, fresh_str(8), [fresh_str(9)]
    plain = Plain()
    plain.limit = int("70000")
    before = obj.items
    share_attributes(obj)
    share_attributes(plain)
    assert obj.big == 10**30 and is_shareable(obj.big)
    assert is_shareable(obj.name) and is_shareable(obj) and is_shareable(plain.limit)
    assert obj.items is before, "a mutable value is never replaced"


@needs_marking
def test_share_module_globals_copies_constants_and_leaves_dunders() -> None:
    module = types.ModuleType("kvs_test_module")
    ns = module.__dict__
    table = {fresh_str(4): int("123456"), "k": (fresh_str(6),)}
    ns.update(TABLE=table, LIMIT=int("99999"), NAME=fresh_str(7), __builtins__={"x": 1})
    builtins_before = ns["__builtins__"]
    share_module_globals(ns)
    assert ns["TABLE"] == table and ns["TABLE"] is not table
    assert all(is_shareable(k) and is_shareable(v) for k, v in ns["TABLE"].items())
    assert is_shareable(ns["LIMIT"]) and is_shareable(ns["NAME"])
    assert ns["__builtins__"] is builtins_before


@needs_marking
def test_a_marked_key_is_found_from_another_thread_by_an_equal_key() -> None:
    """The point of the marks: a dict whose key object another live thread made is looked up
    with an equal key; marked or not, the lookup is right (only its speed differs)."""
    stored: dict[str, int] = {}
    ready, done = threading.Event(), threading.Event()

    def writer() -> None:
        for i in range(100):
            key = f"key-{i}"
            mark_shared_str(key)
            stored[key] = i
        ready.set()
        done.wait(30)

    t = threading.Thread(target=writer)
    t.start()
    try:
        assert ready.wait(30)
        assert all(stored[f"key-{i}"] == i for i in range(100))
        assert all(is_shareable(k) for k in list(stored))
    finally:
        done.set()
        t.join(30)


def test_kvs_mark_shared_0_turns_every_mark_off() -> None:
    code = ("from kvs import freethreading as f; o = f'{1 + 1}' * 3; f.mark_shared(o); f.mark_shared_str(o); "
            "print(f.MARKING_ENABLED, f.SHARED_COUNTS is None, f.shared_copy(10**30) == 10**30)")
    env = dict(os.environ, KVS_MARK_SHARED="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "True", "True"]

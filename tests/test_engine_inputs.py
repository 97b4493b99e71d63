"""Bad input to either engine is a clear error and stores nothing.

Every test runs against ``KvStore`` ("kvs") and ``SqliteKvsEngine`` ("sqlite"), opened with
small size limits and a ManualClock over a store seeded with text, bytes, non-ASCII and
expiring keys. After each refused call the store's content (``len``, every key, value and
deadline) is unchanged, and at the end of each test a reopen of the directory shows that same
content. Every error is a ``TypeError`` (wrong type) or a ``KvsError`` (wrong value), whose
message is one line naming what was wrong (``kvs.engine.values`` has the limits and texts).
"""

# The calls built in loops below run within their own iteration: late binding of the loop
# variables (B023) is what they mean.
# ruff: noqa: B023
from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvs.engine import open_engine
from kvs.engine.clock import ManualClock
from kvs.engine.values import MAX_DEADLINE_MS
from kvs.errors import KeyNotFoundError, KvsError

MAX_KEY = 32
MAX_VALUE = 64
START_MS = 1_700_000_000_000
SEED: list[tuple[str | bytes, str | bytes]] = [
    ("text", "v1"), (b"bin\xff\x00", b"\x00\x01\xfe"), ("café", "thé ☕"), ("", "empty key"), ("e", ""),
]
EXPIRING = ("exp", "soon", START_MS + 60_000)
REENTRY = "inside update"

Snapshot = tuple[int, list[tuple[str, Any, str, Any, int | None]]]


class Env:
    """One engine over ``path`` with the test's ManualClock; :meth:`reopen` closes and opens
    it again on the same directory."""

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.clock = ManualClock(START_MS)
        self.store: Any = None
        self.open()
        self.store.set_many(SEED)
        key, value, deadline = EXPIRING
        self.store.set(key, value)
        assert self.store.expire_at(key, deadline)
        self.initial = snapshot(self.store)

    def open(self) -> None:
        options: dict[str, Any] = {"max_key_bytes": MAX_KEY, "max_value_bytes": MAX_VALUE, "clock": self.clock,
                                   "expire_sweep_interval": 0}
        if self.name == "kvs":
            options["background_compaction"] = False
        self.store = open_engine(self.name, self.path, **options)

    def reopen(self) -> None:
        self.store.close()
        self.open()

    def assert_reopen_unchanged(self) -> None:
        """The content is still the seed's, and so it is after a reopen (nothing refused
        reached the disk either)."""
        assert snapshot(self.store) == self.initial
        self.reopen()
        assert snapshot(self.store) == self.initial


def snapshot(store: Any) -> Snapshot:
    """``len`` and every key with the type it comes back as, its value and type, and deadline."""
    rows = []
    for key in store:
        value = store.get(key)
        rows.append((type(key).__name__, key, type(value).__name__, value, store.expiry(key)))
    rows.sort(key=repr)
    assert len(rows) == len(store)
    return len(store), rows


@pytest.fixture(params=["kvs", "sqlite"])
def env(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Env]:
    e = Env(request.param, tmp_path / "db")
    yield e
    e.store.close()


def check_message(exc: BaseException, pattern: str | None = None) -> None:
    """A clear message: non-empty, one line, no internals; containing ``pattern`` (a regex)."""
    import re
    msg = str(exc)
    assert msg.strip(), f"{type(exc).__name__} without a message"
    assert "\n" not in msg, f"a message of several lines: {msg!r}"
    for internal in ("struct.error", "sqlite3.", "Traceback", "unpack", "object is not iterable", "has no len"):
        assert internal not in msg, f"an internal message: {msg!r}"
    if pattern is not None:
        assert re.search(pattern, msg), f"{msg!r} does not say {pattern!r}"


def refused(env: Env, exc: type[BaseException] | tuple[type[BaseException], ...], call: Callable[[], Any],
            pattern: str | None = None) -> BaseException:
    """``call()`` raises ``exc`` with a clear message matching ``pattern`` and changes nothing."""
    before = snapshot(env.store)
    with pytest.raises(exc) as info:
        call()
    assert snapshot(env.store) == before, f"{call} changed the store"
    check_message(info.value, pattern)
    return info.value


def in_transaction(store: Any, keys: list[Any], body: Callable[[Any], Any]) -> Callable[[], None]:
    """A call running ``body(view)`` in a transaction over ``keys`` after staging a write of
    the first key, so that a refused body shows it wrote nothing of the transaction."""
    def call() -> None:
        with store.transaction(keys) as tx:
            tx.set(keys[0], "staged")
            body(tx)
    return call


# =========================================================================== types
WRONG_TYPES: list[object] = [1, None, 1.5, [], {}, ("a",), object(), True]


def _key_calls(store: Any, bad: Any) -> list[Callable[[], Any]]:
    return [
        lambda: store.set(bad, "v"), lambda: store.get(bad), lambda: bad in store, lambda: store[bad],
        lambda: store.__setitem__(bad, "v"), lambda: store.__delitem__(bad), lambda: store.remove(bad),
        lambda: store.expire(bad, 5), lambda: store.expire_at(bad, START_MS + 1), lambda: store.ttl(bad),
        lambda: store.expiry(bad), lambda: store.update(bad, lambda v: "v"),
        lambda: store.transaction([bad]).__enter__(), lambda: store.transaction(["text", bad]).__enter__(),
        lambda: store.set_many([("new", "v"), (bad, "v")]),
        in_transaction(store, ["text"], lambda tx: tx.get(bad)),
        in_transaction(store, ["text"], lambda tx: tx.set(bad, "v")),
    ]


def test_keys_of_a_wrong_type_raise_type_error(env: Env) -> None:
    for bad in WRONG_TYPES:
        for call in _key_calls(env.store, bad):
            refused(env, TypeError, call, rf"key must be str or bytes, not {type(bad).__name__}")
    env.assert_reopen_unchanged()


def test_values_of_a_wrong_type_raise_type_error(env: Env) -> None:
    store = env.store
    for bad in WRONG_TYPES:
        calls: list[Callable[[], Any]] = [
            lambda: store.set("text", bad), lambda: store.set("new", bad), lambda: store.__setitem__("new", bad),
            lambda: store.set_many([("new", "v"), ("text", bad)]),
            in_transaction(store, ["new", "text"], lambda tx: tx.set("text", bad)),
            in_transaction(store, ["new", "text"], lambda tx: tx.__setitem__("text", bad)),
        ]
        if bad is not None:  # update's function returning None removes the key
            calls += [lambda: store.update("text", lambda v: bad), lambda: store.update("new", lambda v: bad),
                      in_transaction(store, ["new"], lambda tx: tx.update("new", lambda v: bad))]
        for call in calls:
            refused(env, TypeError, call, rf"value must be str or bytes, not {type(bad).__name__}")
    refused(env, TypeError, lambda: store.update("text", "not a function"), "function")
    env.assert_reopen_unchanged()


def test_bytes_like_keys_and_values_are_bytes(env: Env) -> None:
    """bytearray and memoryview are accepted as bytes (keys: the same key as the equal bytes
    or text) and read back as bytes; the stored value is a copy."""
    store = env.store
    buf = bytearray(b"value")
    store.set(bytearray(b"ba"), buf)
    buf[0:1] = b"X"  # changing the caller's buffer afterwards changes nothing stored
    store.set(memoryview(b"xmvx")[1:3], memoryview(b"__view__")[2:6])
    store.set_many([(bytearray(b"sm1"), bytearray(b"1")), (memoryview(b"sm2"), memoryview(b"2"))])
    with store.transaction([bytearray(b"tx")]) as tx:
        tx.set(memoryview(b"tx"), bytearray(b"t"))
    assert store.update(memoryview(b"up"), lambda v: bytearray(b"u")) == b"u"
    expected = {b"ba": b"value", b"mv": b"view", b"sm1": b"1", b"sm2": b"2", b"tx": b"t", b"up": b"u"}
    for _ in range(2):
        for kb, vb in expected.items():
            for key in (kb, kb.decode(), bytearray(kb), memoryview(kb)):
                got = store.get(key)
                assert type(got) is bytes and got == vb, (key, got)
                assert key in store
        keys = {k for k in store if k not in {k for k, _v in SEED} and k != EXPIRING[0]}
        assert keys == set(expected)  # keys come back as they were written: bytes
        assert all(type(k) is bytes for k in keys)
        env.reopen()
        store = env.store


# =========================================================================== sizes and text
def test_oversize_keys_and_values_are_refused(env: Env) -> None:
    store = env.store
    big_key = "é" * 17  # 17 characters, 34 UTF-8 bytes: the limit counts bytes
    big_bkey = b"k" * (MAX_KEY + 1)
    big_value = "v" * (MAX_VALUE + 1)
    big_bvalue = bytearray(MAX_VALUE + 1)
    key_over = rf"key is (34|{MAX_KEY + 1}) bytes, over the limit of {MAX_KEY} bytes"
    value_over = rf"value is {MAX_VALUE + 1} bytes, over the limit of {MAX_VALUE} bytes"
    for key in (big_key, big_bkey):
        for call in (lambda: store.set(key, "v"), lambda: store.get(key), lambda: key in store,
                     lambda: store.remove(key), lambda: store.__delitem__(key), lambda: store.expire(key, 5),
                     lambda: store.ttl(key), lambda: store.update(key, lambda v: "v"),
                     lambda: store.set_many([("new", "v"), (key, "v")]),
                     lambda: store.transaction(["new", key]).__enter__(),
                     in_transaction(store, ["new"], lambda tx: tx.set(key, "v"))):
            refused(env, KvsError, call, key_over)
    for value in (big_value, big_bvalue):
        for call in (lambda: store.set("text", value), lambda: store.set("new", value, ttl=5),
                     lambda: store.set_many([("new", "v"), ("text", value), ("new2", "v")]),
                     lambda: store.update("text", lambda v: value),
                     in_transaction(store, ["new", "text"], lambda tx: tx.set("text", value)),
                     in_transaction(store, ["new", "text"], lambda tx: tx.update("text", lambda v: value))):
            refused(env, KvsError, call, value_over)
    # Exactly at the limits is fine.
    at_key, at_value = "é" * 16, b"v" * MAX_VALUE
    store.set(at_key, at_value)
    assert store.get(at_key) == at_value
    store.remove(at_key)
    env.assert_reopen_unchanged()


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\udc80"])
def test_text_with_lone_surrogates_is_refused(env: Env, text: str) -> None:
    store = env.store
    for call in (lambda: store.set(text, "v"), lambda: store.get(text), lambda: text in store,
                 lambda: store.remove(text), lambda: store.update(text, lambda v: "v"),
                 lambda: store.set_many([("new", "v"), (text, "v")]),
                 lambda: store.transaction(["new", text]).__enter__()):
        refused(env, KvsError, call, r"key is not valid Unicode text")
    for call in (lambda: store.set("text", text), lambda: store.set("new", text),
                 lambda: store.set_many([("new", "v"), ("text", text)]),
                 lambda: store.update("text", lambda v: text),
                 in_transaction(store, ["new", "text"], lambda tx: tx.set("text", text))):
        refused(env, KvsError, call, r"value is not valid Unicode text")
    # The bytes a surrogate escape stands for are a valid key of their own, as bytes.
    raw = text.encode("utf-8", "surrogateescape") if "\udc80" <= text[-1] <= "\udcff" else None
    if raw is not None:
        store.set(raw, b"raw")
        assert store.get(raw) == b"raw" and raw in list(store)
        store.remove(raw)
    env.assert_reopen_unchanged()


# =========================================================================== transactions and update
def test_undeclared_keys_in_a_transaction_write_nothing(env: Env) -> None:
    store = env.store
    undeclared = r"key 'other' is not declared in this transaction"
    for body in (lambda tx: tx.get("other"), lambda tx: tx.set("other", "v"), lambda tx: tx.remove("other"),
                 lambda tx: tx.update("other", lambda v: "v"), lambda tx: tx["other"],
                 lambda tx: tx.__setitem__("other", "v"), lambda tx: tx.__delitem__("other"),
                 lambda tx: "other" in tx, lambda tx: tx.expire("other", 5),
                 lambda tx: tx.expire_at("other", START_MS + 5), lambda tx: tx.ttl("other"),
                 lambda tx: tx.expiry("other")):
        refused(env, KvsError, in_transaction(store, ["text", "new"], body), undeclared)

    def in_empty_transaction() -> None:
        with store.transaction([]) as tx:
            tx.set("text", "v")
    refused(env, KvsError, in_empty_transaction, "not declared")
    # A key declared as text is the same key given as its UTF-8 bytes, and vice versa.
    with store.transaction(["café", b"bin\xff\x00"]) as tx:
        assert tx.get("caf\u00e9".encode()) == "thé ☕" and tx.get(b"bin\xff\x00") == b"\x00\x01\xfe"
    # A view is dead once its block is over.
    with store.transaction(["text"]) as tx:
        pass
    refused(env, KvsError, lambda: tx.set("text", "late"), "transaction is over")
    env.assert_reopen_unchanged()


def test_calls_back_into_the_store_are_refused(env: Env) -> None:
    store = env.store
    for inner in (lambda: store.get("text"), lambda: store.set("text", "x"), lambda: store.set("new", "x"),
                  lambda: store.update("text", lambda v: "x"), lambda: store.update("new", lambda v: "x"),
                  lambda: store.remove("text"), lambda: len(store), lambda: "text" in store):
        refused(env, KvsError, lambda: store.update("text", lambda v: (inner(), "changed")[1]), REENTRY)
        refused(env, KvsError, in_transaction(store, ["text", "new"], lambda tx: inner()), REENTRY)
    # The store works normally afterwards, from the same thread.
    assert store.update("text", lambda v: v) == "v1"
    store.set("tmp", "1")
    store.remove("tmp")
    env.assert_reopen_unchanged()


# =========================================================================== globs
def _full_scan(store: Any, match: Any) -> list[Any]:
    keys, cursor = [], 0
    while True:
        cursor, page = store.scan(cursor, match=match, count=3)
        keys.extend(page)
        if cursor == 0:
            return sorted(keys, key=repr)


@pytest.mark.parametrize("pattern", ["[a", "a[", "[", "[^", "[a-", "*[x\\]", b"[\xff"])
def test_glob_with_an_unclosed_bracket_is_an_error(env: Env, pattern: str | bytes) -> None:
    """Redis reads an unclosed ``[`` as a class running to the end of the pattern; the
    engines' ``scan`` refuses it (``kvs.glob``: strict)."""
    refused(env, KvsError, lambda: env.store.scan(0, match=pattern), r"unbalanced '\['")
    refused(env, KvsError, lambda: env.store.scan(0, match=pattern, count=1000), r"unbalanced '\['")


def test_glob_edge_cases_that_are_valid(env: Env) -> None:
    """What ``kvs.glob`` documents as valid: a trailing backslash is a literal backslash, a
    lone ``]`` is literal, ``[]`` matches nothing, ``\\x`` escapes; other match types and
    text that is not Unicode are errors."""
    store = env.store
    store.set_many([("back\\", "1"), ("]x", "2"), ("a*b", "3"), ("axb", "4")])
    assert _full_scan(store, "back\\") == ["back\\"]
    assert _full_scan(store, "]*") == ["]x"]
    assert _full_scan(store, "[]*") == [] and _full_scan(store, "*[]") == []
    assert _full_scan(store, "a\\*b") == ["a*b"]
    assert _full_scan(store, "a?b") == ["a*b", "axb"]
    assert _full_scan(store, b"bin\xff*") == [b"bin\xff\x00"]
    assert _full_scan(store, "caf[é]") == []  # é is two bytes: a class of one byte each
    assert _full_scan(store, "caf??") == ["café"]
    for k in ("back\\", "]x", "a*b", "axb"):
        store.remove(k)
    refused(env, TypeError, lambda: store.scan(0, match=5), "match must be str or bytes")
    refused(env, KvsError, lambda: store.scan(0, match="\ud800"), "not valid Unicode")
    env.assert_reopen_unchanged()


# =========================================================================== TTLs and deadlines
BAD_TTLS: list[object] = [0, 0.0, -1, -0.001, -1e300, math.nan, math.inf, -math.inf, 1e300, 10**20,
                          MAX_DEADLINE_MS, MAX_DEADLINE_MS // 1000]
WRONG_TTL_TYPES: list[object] = [True, False, "5", [5], b"5"]


def test_bad_ttls_are_refused(env: Env) -> None:
    store = env.store
    for ttl in BAD_TTLS:
        for call in (lambda: store.set("text", "new", ttl=ttl), lambda: store.set("new", "v", ttl=ttl),
                     lambda: store.expire("text", ttl), lambda: store.expire("exp", ttl),
                     lambda: store.expire("absent", ttl),
                     in_transaction(store, ["new", "text"], lambda tx: tx.set("text", "v", ttl=ttl)),
                     in_transaction(store, ["new", "text"], lambda tx: tx.expire("text", ttl))):
            refused(env, KvsError, call, r"^ttl .*(positive number of seconds|too large)")
    for ttl in WRONG_TTL_TYPES:
        for call in (lambda: store.set("text", "new", ttl=ttl), lambda: store.expire("text", ttl)):
            refused(env, TypeError, call, r"^ttl must be a number of seconds or None")
    # The limits themselves: the latest deadline is fine, one second later is not; a tiny
    # TTL is one millisecond.
    now = env.clock()
    longest = (MAX_DEADLINE_MS - now) // 1000
    assert store.expire("text", longest) and store.expiry("text") == now + longest * 1000
    refused(env, KvsError, lambda: store.expire("text", longest + 1), "too large")
    assert store.expire("text", 1e-9) and store.expiry("text") == now + 1
    assert store.expire("text", None) and store.expiry("text") is None
    env.assert_reopen_unchanged()


def test_bad_deadlines_are_refused(env: Env) -> None:
    store = env.store
    for ms in (-1, -(2**63), MAX_DEADLINE_MS + 1, 2**64, 10**30):
        for call in (lambda: store.expire_at("text", ms), lambda: store.expire_at("exp", ms),
                     lambda: store.expire_at("absent", ms),
                     in_transaction(store, ["new", "text"], lambda tx: tx.expire_at("text", ms))):
            refused(env, KvsError, call, rf"deadline {ms} is out of range")
    for ms in (1.5, float(START_MS + 10_000), math.nan, "5", True, [1]):
        for call in (lambda: store.expire_at("text", ms), lambda: store.expire_at("absent", ms)):
            refused(env, TypeError, call, r"deadline must be an int of Unix milliseconds or None")
    # The bounds: the latest deadline is kept exactly; 0 is in the past: the key goes.
    assert store.expire_at("text", MAX_DEADLINE_MS) and store.expiry("text") == MAX_DEADLINE_MS
    assert store.expire_at("text", None) and store.expiry("text") is None
    store.set("doomed", "x")
    assert store.expire_at("doomed", 0)
    assert store.get("doomed") is None and "doomed" not in store
    with pytest.raises(KeyNotFoundError):
        store.expiry("doomed")
    env.assert_reopen_unchanged()


# =========================================================================== scan arguments
@pytest.mark.parametrize("cursor", [-1, -(2**70), 2**64, 1.5, "0", None, True, b"0"])
def test_bad_scan_cursors_are_refused(env: Env, cursor: object) -> None:
    refused(env, (KvsError, TypeError), lambda: env.store.scan(cursor), r"cursor")
    refused(env, (KvsError, TypeError), lambda: env.store.scan(cursor, match="*", count=5), r"cursor")


@pytest.mark.parametrize("count", [0, -1, -(2**70), 1.5, None, True, "10"])
def test_bad_scan_counts_are_refused(env: Env, count: object) -> None:
    refused(env, (KvsError, TypeError), lambda: env.store.scan(0, count=count), r"count")
    refused(env, (KvsError, TypeError), lambda: env.store.scan(0, match="*", count=count), r"count")


def test_a_full_scan_with_valid_arguments_sees_the_seed(env: Env) -> None:
    """The control of the scan tests above: the extreme valid values work."""
    keys = [k for _t, k, *_rest in env.initial[1]]
    assert _full_scan(env.store, None) == sorted(keys, key=repr)
    cursor, _page = env.store.scan(2**64 - 1, count=2**40)
    assert isinstance(cursor, int) and 0 <= cursor < 2**64
    env.assert_reopen_unchanged()


# =========================================================================== malformed containers
@pytest.mark.parametrize("call", [
    pytest.param(lambda s: s.set_many([("new", "v"), ("a",)]), id="set_many-a-1-tuple"),
    pytest.param(lambda s: s.set_many([("new", "v"), ("a", "1", "2")]), id="set_many-a-3-tuple"),
    pytest.param(lambda s: s.set_many([("new", "v"), 5]), id="set_many-an-int-item"),
    pytest.param(lambda s: s.set_many(None), id="set_many-None"),
    pytest.param(lambda s: s.transaction(5).__enter__(), id="transaction-of-an-int"),
    pytest.param(lambda s: s.transaction(None).__enter__(), id="transaction-of-None"),
])
def test_malformed_batches_are_clear_errors(env: Env, call: Callable[[Any], Any]) -> None:
    """``set_many`` takes ``(key, value)`` pairs and ``transaction`` an iterable of keys:
    anything else stores nothing and says what was wrong (not a bare unpacking error)."""
    refused(env, (TypeError, ValueError, KvsError), lambda: call(env.store), r"pair|keys|set_many|transaction")
    env.assert_reopen_unchanged()

"""Model-based tests of both engines (``KvStore`` and ``SqliteKvsEngine``): a hypothesis state
machine drives an engine and a plain ``dict`` model side by side, on a ``ManualClock``, and
compares every answer.

The model keeps, per key *bytes* (a ``str`` key is its UTF-8 bytes, so ``"café"`` and
``b"caf\\xc3\\xa9"`` are one key), the key as it was last written (iteration and ``scan`` give it
back as that type), the value as written (``str`` or ``bytes``) and the deadline in Unix ms.
What counts as "written" for the key's type, as both engines do it: ``set``, ``[]=``,
``set_many``, ``update`` and ``tx.set``/``tx.update`` that store a new value take the type of
the key passed; ``expire``/``expire_at`` (which rewrite the record with the new deadline) keep
the type the key already had, and an ``update`` whose function returns the old value itself
writes nothing. A key is expired from its deadline on (``deadline <= clock()``).

The expiry sweep is off (``expire_sweep_interval=0``) and ``KvStore`` compacts only when told
to (``background_compaction=False``), so nothing but the rules moves the state; segments are
small so that rollovers and compactions happen within a few steps. Every example gets a fresh
temporary directory, removed in ``teardown``.
"""

from __future__ import annotations

import fnmatch
import shutil
import tempfile
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from kvs.engine import open_engine
from kvs.engine.clock import ManualClock
from kvs.errors import KeyNotFoundError, KvsError

# --------------------------------------------------------------------------- inputs
KEYS: list[Any] = [
    "a", b"a", bytearray(b"a"),
    "b", b"b",
    "café", b"caf\xc3\xa9",  # one key, two spellings
    "", b"",  # the empty key
    "\x00", b"\x00",  # NUL
    "k\x00z", b"k\x00z",
    b"\xff",  # not UTF-8: bytes only
    "caf",
]
"""A small alphabet of keys, so that writes collide; each byte string in both types where it
can be text."""

keys = st.sampled_from(KEYS)
values = st.one_of(
    st.sampled_from(["", "v", "héllo", "7", "41", b"", b"v", b"\x00\xff", b"7", "caf\xe9"]),
    st.binary(max_size=700),  # large enough to roll 4 KiB segments over within a few writes
    st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
    st.binary(max_size=40).map(bytearray),
)
ttls = st.sampled_from([0.0004, 0.001, 0.25, 1, 1.5, 2, 3.0007, 10, 60, 3600])
maybe_ttls = st.none() | ttls | ttls  # mostly with a TTL: deadlines to cross
PATTERNS: list[str | bytes | None] = [
    None, "*", "a*", "caf*", "caf?", "caf??", "?", "", b"\x00*", b"\xff", "k*z", "*a*", "[ab]", "*\x00*",
]
"""``scan`` globs the model evaluates with ``fnmatch`` over bytes (``*``, ``?``, simple
classes: where Redis globs and ``fnmatch`` agree)."""

UPDATES = ["incr", "remove", "identity", "flip", "raise"]
"""The functions the ``update`` rule passes (:func:`update_fn`)."""


class Boom(Exception):
    """Raised by an ``update`` function or a transaction body on purpose."""


def kb_of(key: Any) -> bytes:
    return key.encode() if isinstance(key, str) else bytes(key)


def typed_key(key: Any) -> str | bytes:
    """The key as iteration gives it back once written with ``key``."""
    return key if isinstance(key, str) else bytes(key)


def typed_value(value: Any) -> str | bytes:
    return value if isinstance(value, str) else bytes(value)


def ttl_ms(ttl: float) -> int:
    """A TTL in seconds as the engines turn it into milliseconds (at least 1 ms ahead)."""
    return ttl * 1000 if isinstance(ttl, int) else max(1, round(ttl * 1000))


def incr(old: str | bytes | None) -> str | bytes:
    if old is None:
        return "1"
    if isinstance(old, str):
        return str(int(old) + 1) if old.isascii() and old.isdigit() else old + "+"
    return str(int(old) + 1).encode() if old.isdigit() else old + b"+"


def flip(old: str | bytes | None) -> str | bytes | None:
    """The value in the other type when it has one; otherwise ``old`` itself (writes nothing)."""
    if isinstance(old, str):
        return old.encode()
    if isinstance(old, bytes):
        try:
            return old.decode()
        except UnicodeDecodeError:
            return old
    return None


def update_fn(name: str) -> Callable[[str | bytes | None], object]:
    def boom(_old: object) -> object:
        raise Boom

    return {"incr": incr, "remove": lambda _old: None, "identity": lambda old: old, "flip": flip, "raise": boom}[name]


def same(a: object, b: object) -> bool:
    """Equal and of the same type (``str`` vs ``bytes`` matters)."""
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------- the model
class Entry(NamedTuple):
    key: str | bytes
    value: str | bytes
    deadline: int | None


class Model:
    """What an engine should hold: key bytes -> :class:`Entry`, expired entries included until
    something replaces them (``live`` is the only way in)."""

    def __init__(self, clock: ManualClock, data: dict[bytes, Entry] | None = None) -> None:
        self.clock = clock
        self.data: dict[bytes, Entry] = {} if data is None else dict(data)

    def copy(self) -> Model:
        return Model(self.clock, self.data)

    def live(self, key: Any) -> Entry | None:
        entry = self.data.get(kb_of(key))
        if entry is None or (entry.deadline is not None and entry.deadline <= self.clock()):
            return None
        return entry

    def live_entries(self) -> list[Entry]:
        now = self.clock()
        return [e for e in self.data.values() if e.deadline is None or e.deadline > now]

    def set(self, key: Any, value: Any, ttl: float | None = None) -> None:
        deadline = None if ttl is None else self.clock() + ttl_ms(ttl)
        self.data[kb_of(key)] = Entry(typed_key(key), typed_value(value), deadline)

    def remove(self, key: Any) -> bool:
        """False when absent (the engine raises then)."""
        if self.live(key) is None:
            return False
        del self.data[kb_of(key)]
        return True

    def update(self, key: Any, fn: Callable[[str | bytes | None], object]) -> str | bytes | None:
        cur = self.live(key)
        old = None if cur is None else cur.value
        new = fn(old)  # Boom propagates: nothing written
        if new is old:
            return old
        if new is None:
            self.data.pop(kb_of(key), None)
            return None
        assert isinstance(new, str | bytes)
        self.data[kb_of(key)] = Entry(typed_key(key), new, None if cur is None else cur.deadline)
        return new

    def expire_at(self, key: Any, unix_ms: int | None) -> bool:
        cur = self.live(key)
        if cur is None:
            return False
        if unix_ms is not None and unix_ms <= self.clock():
            del self.data[kb_of(key)]  # a past deadline deletes (Redis PEXPIREAT)
        else:
            self.data[kb_of(key)] = cur._replace(deadline=unix_ms)
        return True

    def expire(self, key: Any, ttl: float | None) -> bool:
        return self.expire_at(key, None if ttl is None else self.clock() + ttl_ms(ttl))


# --------------------------------------------------------------------------- the machine
tx_ops = st.lists(
    st.tuples(
        st.sampled_from(["set", "set_ttl", "setitem", "remove", "update", "expire_at", "persist", "get",
                         "undeclared", "store_call"]),
        st.integers(0, 2),  # which declared key
        st.booleans(),  # use the other spelling of that key when it has one
        values,
        ttls,
        st.integers(-1000, 5000),  # expire_at: ms from now
    ),
    max_size=5,
)


def other_spelling(key: Any) -> Any:
    """The same key in the other type (itself for bytes that are not UTF-8)."""
    if isinstance(key, str):
        return key.encode()
    try:
        return bytes(key).decode()
    except UnicodeDecodeError:
        return key


class EngineMachine(RuleBasedStateMachine):
    """One engine against :class:`Model`; :func:`machine_for` makes one subclass per engine."""

    engine_name = "kvs"

    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="kvs-model-")
        self.clock = ManualClock()
        self.model = Model(self.clock)
        self.store: Any = None

    def _open(self) -> Any:
        options: dict[str, Any] = {"clock": self.clock, "expire_sweep_interval": 0}
        if self.engine_name == "kvs":
            options.update(background_compaction=False, max_segment_bytes=4096)
        return open_engine(self.engine_name, self.tmp + "/data", **options)

    @initialize()
    def open_store(self) -> None:
        self.store = self._open()

    def teardown(self) -> None:
        try:
            if self.store is not None:
                self.store.close()
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ------------------------------------------------------------------ checks
    def check_key(self, key: Any) -> None:
        entry = self.model.live(key)
        got = self.store.get(key)
        if entry is None:
            assert got is None, f"{key!r}: expected absent, got {got!r}"
        else:
            assert same(got, entry.value), f"{key!r}: expected {entry.value!r}, got {got!r}"

    def full_scan(self, match: str | bytes | None = None, count: int = 10) -> list[str | bytes]:
        """Every key of one full ``scan`` iteration, from cursor 0 back to 0."""
        seen: list[str | bytes] = []
        cursor, calls = 0, 0
        while True:
            cursor, batch = self.store.scan(cursor, match=match, count=count)
            seen.extend(batch)
            calls += 1
            assert calls < 10_000, "scan does not come back to cursor 0"
            if cursor == 0:
                return seen

    def live_keys(self) -> set[str | bytes]:
        return {e.key for e in self.model.live_entries()}

    @invariant()
    def len_matches(self) -> None:
        if self.store is not None:
            assert len(self.store) == len(self.model.live_entries())

    # ------------------------------------------------------------------ writes
    @rule(key=keys, value=values, ttl=maybe_ttls)
    def set(self, key: Any, value: Any, ttl: float | None) -> None:
        self.store.set(key, value, ttl=ttl)
        self.model.set(key, value, ttl)
        self.check_key(key)

    @rule(key=keys, value=values)
    def setitem(self, key: Any, value: Any) -> None:
        self.store[key] = value
        self.model.set(key, value)
        assert same(self.store[other_spelling(key)], typed_value(value))

    @rule(pairs=st.lists(st.tuples(keys, values), min_size=1, max_size=4))
    def set_many(self, pairs: list[tuple[Any, Any]]) -> None:
        self.store.set_many(pairs)
        for key, value in pairs:
            self.model.set(key, value)
        for key, _value in pairs:
            self.check_key(key)

    @rule(key=keys)
    def remove(self, key: Any) -> None:
        if self.model.remove(key):
            self.store.remove(key)
        else:
            with pytest.raises(KeyNotFoundError):
                self.store.remove(key)
        assert key not in self.store

    @rule(key=keys)
    def delitem(self, key: Any) -> None:
        if self.model.remove(key):
            del self.store[key]
        else:
            with pytest.raises(KeyError):
                del self.store[key]
        assert self.store.get(key) is None

    @rule(key=keys, fn=st.sampled_from(UPDATES))
    def update(self, key: Any, fn: str) -> None:
        if fn == "raise":
            before = self.model.live(key)
            with pytest.raises(Boom):
                self.store.update(key, update_fn(fn))
            assert self.model.live(key) == before
            self.check_key(key)
            return
        expected = self.model.update(key, update_fn(fn))
        got = self.store.update(key, update_fn(fn))
        assert same(got, expected) or (got is None and expected is None)
        self.check_key(key)
        entry = self.model.live(key)
        if entry is not None:
            assert self.store.expiry(key) == entry.deadline

    @rule(key=keys, ttl=maybe_ttls)
    def expire(self, key: Any, ttl: float | None) -> None:
        expected = self.model.expire(key, ttl)
        assert self.store.expire(key, ttl) is expected
        self.check_key(key)

    @rule(key=keys, delta=st.none() | st.integers(-2000, 8000) | st.sampled_from([0, 1, 60_000]))
    def expire_at(self, key: Any, delta: int | None) -> None:
        unix_ms = None if delta is None else self.clock() + delta
        expected = self.model.expire_at(key, unix_ms)
        assert self.store.expire_at(key, unix_ms) is expected
        entry = self.model.live(key)
        if entry is None:
            assert key not in self.store
            with pytest.raises(KeyNotFoundError):
                self.store.expiry(key)
        else:
            assert self.store.expiry(key) == entry.deadline  # exactly the ms given
            if expected:
                assert entry.deadline == unix_ms

    @precondition(lambda self: len(self.model.live_entries()) >= 3)
    @rule()
    def clear(self) -> None:
        self.store.clear()
        self.model.data.clear()
        assert len(self.store) == 0
        assert self.full_scan() == []

    # ------------------------------------------------------------------ reads
    @rule(key=keys)
    def get(self, key: Any) -> None:
        self.check_key(key)
        entry = self.model.live(key)
        assert same(self.store.get(key, "DEFAULT"), "DEFAULT" if entry is None else entry.value)

    @rule(key=keys)
    def getitem_and_contains(self, key: Any) -> None:
        entry = self.model.live(key)
        assert (key in self.store) is (entry is not None)
        assert (other_spelling(key) in self.store) is (entry is not None)
        if entry is None:
            with pytest.raises(KeyError):
                self.store[key]
        else:
            assert same(self.store[key], entry.value)

    @rule(key=keys)
    def ttl_and_expiry(self, key: Any) -> None:
        entry = self.model.live(key)
        if entry is None:
            with pytest.raises(KeyNotFoundError):
                self.store.ttl(key)
            with pytest.raises(KeyNotFoundError):
                self.store.expiry(key)
            return
        assert self.store.expiry(key) == entry.deadline
        ttl = self.store.ttl(key)
        if entry.deadline is None:
            assert ttl is None
        else:
            assert ttl == (entry.deadline - self.clock()) / 1000
            assert ttl > 0

    @rule(match=st.sampled_from(PATTERNS), count=st.sampled_from([1, 2, 3, 10, 1000]))
    def scan_all(self, match: str | bytes | None, count: int) -> None:
        seen = self.full_scan(match, count)
        expected = self.live_keys()
        if match is not None:
            pattern = match.encode() if isinstance(match, str) else match
            expected = {k for k in expected if fnmatch.fnmatchcase(kb_of(k), pattern)}
        assert set(seen) == expected  # duplicates allowed: compare sets
        for key in seen:
            assert type(key) in (str, bytes)

    @rule()
    def iterate(self) -> None:
        live = {e.key: e.value for e in self.model.live_entries()}
        assert set(self.store) == set(live)
        assert set(self.store.keys()) == set(live)
        items = dict(self.store.items())
        assert items.keys() == live.keys()
        for key, value in items.items():
            assert same(value, live[key])
        assert set(self.store.values()) == set(live.values())
        assert len(self.store) == len(live)

    # ------------------------------------------------------------------ time
    @rule(data=st.data(), ms=st.sampled_from([1, 250, 999, 1000, 1500, 3000, 10_000]),
          to_deadline=st.booleans(), offset=st.sampled_from([-1, 0]))
    def advance(self, data: st.DataObject, ms: int, to_deadline: bool, offset: int) -> None:
        """Move the clock ``ms`` on, or (``to_deadline``, when a live key has a deadline) to
        just before (-1) or exactly onto (0) a live key's deadline."""
        entries = sorted((e for e in self.model.live_entries() if e.deadline is not None), key=repr)
        if not (to_deadline and entries):
            self.clock.set(self.clock() + ms)
            return
        entry = data.draw(st.sampled_from(entries))
        assert entry.deadline is not None
        self.clock.set(entry.deadline + offset)
        if offset == 0:
            assert entry.key not in self.store  # expired from its deadline on
            assert self.store.get(entry.key) is None
        else:
            assert same(self.store.get(entry.key), entry.value)
            assert self.store.ttl(entry.key) == 0.001

    # ------------------------------------------------------------------ transactions
    @rule(declared=st.lists(keys, min_size=1, max_size=3), ops=tx_ops, fail=st.booleans())
    def transaction(self, declared: list[Any], ops: list[tuple[Any, ...]], fail: bool) -> None:
        staged = self.model.copy()
        undeclared = [k for k in KEYS if kb_of(k) not in {kb_of(d) for d in declared}]

        def body() -> None:
            with self.store.transaction(declared) as tx:
                for kind, index, respell, value, ttl, delta in ops:
                    key = declared[index % len(declared)]
                    if respell:
                        key = other_spelling(key)
                    if kind == "set":
                        tx.set(key, value)
                        staged.set(key, value)
                    elif kind == "set_ttl":
                        tx.set(key, value, ttl=ttl)
                        staged.set(key, value, ttl)
                    elif kind == "setitem":
                        tx[key] = value
                        staged.set(key, value)
                    elif kind == "remove":
                        if staged.remove(key):
                            tx.remove(key)
                        else:
                            with pytest.raises(KeyNotFoundError):
                                tx.remove(key)
                    elif kind == "update":
                        assert same(tx.update(key, incr), staged.update(key, incr))
                    elif kind == "expire_at":
                        unix_ms = self.clock() + delta
                        assert tx.expire_at(key, unix_ms) is staged.expire_at(key, unix_ms)
                    elif kind == "persist":
                        assert tx.expire(key, None) is staged.expire(key, None)
                    elif kind == "undeclared":
                        if undeclared:
                            with pytest.raises(KvsError):
                                tx.get(undeclared[index % len(undeclared)])
                    elif kind == "store_call":
                        with pytest.raises(KvsError):  # the body may not call the store itself
                            self.store.get(key)
                    # the body sees its own writes, and the expiry it staged
                    entry = staged.live(key)
                    got = tx.get(key)
                    if entry is None:
                        assert got is None and key not in tx
                    else:
                        assert same(got, entry.value)
                        assert tx.expiry(key) == entry.deadline
                if fail:
                    raise Boom

        if fail:
            with pytest.raises(Boom):
                body()
        else:
            body()
            self.model = staged
        for key in declared:
            self.check_key(key)
            self.check_key(other_spelling(key))

    # ------------------------------------------------------------------ restarts, compaction
    @rule()
    def reopen(self) -> None:
        """Close and open again with the same clock: data, value types, key types and
        deadlines survive."""
        self.store.close()
        with pytest.raises(KvsError):
            self.store.get("a")
        self.store = self._open()
        for key in KEYS:
            self.check_key(key)
        for entry in self.model.live_entries():
            assert self.store.expiry(entry.key) == entry.deadline

    @precondition(lambda self: self.engine_name == "kvs")
    @rule()
    def compact(self) -> None:
        self.store.compact()
        for key in KEYS:
            self.check_key(key)


def machine_for(engine: str) -> type[EngineMachine]:
    return type(f"EngineMachine_{engine}", (EngineMachine,), {"engine_name": engine})


MODEL_SETTINGS = settings(
    max_examples=35,
    stateful_step_count=50,
    deadline=None,
    database=None,  # nothing written into the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("engine", ["kvs", "sqlite"])
def test_engine_matches_dict_model(engine: str) -> None:
    """Random sequences of every operation (writes, reads, expiry, clock moves, transactions,
    scans, restarts, compactions) give the same answers as the ``dict`` model, and ``len``
    matches after every step."""
    run_state_machine_as_test(machine_for(engine), settings=MODEL_SETTINGS)

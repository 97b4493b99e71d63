"""The v2 data model on both engines: a model-based test against a dict, transaction
visibility and update atomicity under threads (and compactions), scan under churn, bad
inputs, and opening the data directories kvs 0.1.0 left behind (tests/fixtures)."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import run_threads
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from kvs.engine.clock import ManualClock
from kvs.engine.kvstore import KvStore
from kvs.engine.sqlite import SqliteKvsEngine
from kvs.errors import KeyNotFoundError, KvsError

FIXTURES = Path(__file__).parent / "fixtures"
ENGINES = ["kvs", "sqlite"]


def open_engine(name: str, path: Path | str, clock: ManualClock | None = None, **options: Any) -> Any:
    if clock is not None:
        options["clock"] = clock
    if name == "kvs":
        options.setdefault("background_compaction", False)
        options.setdefault("max_segment_bytes", 4096)
        return KvStore.open(path, **options)
    return SqliteKvsEngine.open(path, **options)


def scan_all(store: Any, match: str | None = None, count: int = 10) -> list[Any]:
    keys: list[Any] = []
    cursor, rounds = 0, 0
    while True:
        cursor, page = store.scan(cursor, match=match, count=count)
        keys += page
        rounds += 1
        assert rounds < 100_000, "scan does not end"
        if cursor == 0:
            return keys


def as_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


# ------------------------------------------------------------------ the model
KEYS = st.sampled_from(["a", "b", "café", "", "k\x00", b"caf\xc3\xa9", b"\xff", b"a", "user:1", "user:2"])
VALUES = st.one_of(st.text(max_size=8), st.binary(max_size=8))


class EngineModel(RuleBasedStateMachine):
    """The engine against a dict of ``bytes key -> (key as written, value, deadline)``."""

    engine_name = "kvs"

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="kvs-model-")
        self.clock = ManualClock()
        self.store = open_engine(self.engine_name, self.dir, self.clock, expire_sweep_interval=0)
        self.model: dict[bytes, tuple[Any, Any, int | None]] = {}

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def live(self) -> dict[bytes, tuple[Any, Any, int | None]]:
        now = self.clock()
        return {k: e for k, e in self.model.items() if e[2] is None or e[2] > now}

    @initialize()
    def start(self) -> None:
        pass

    @rule(key=KEYS, value=VALUES, ttl=st.one_of(st.none(), st.integers(1, 5000)))
    def set(self, key: Any, value: Any, ttl: int | None) -> None:
        self.store.set(key, value, ttl=None if ttl is None else ttl / 1000)
        self.model[as_bytes(key)] = (key, value, None if ttl is None else self.clock() + ttl)

    @rule(key=KEYS)
    def get(self, key: Any) -> None:
        entry = self.live().get(as_bytes(key))
        got = self.store.get(key)
        assert got == (None if entry is None else entry[1])
        assert type(got) is (type(None) if entry is None else type(entry[1]))
        assert (key in self.store) is (entry is not None)

    @rule(key=KEYS)
    def remove(self, key: Any) -> None:
        if as_bytes(key) in self.live():
            self.store.remove(key)
            del self.model[as_bytes(key)]
        else:
            with pytest.raises(KeyNotFoundError):
                self.store.remove(key)
            with pytest.raises(KeyError):
                del self.store[key]

    @rule(key=KEYS, keep=st.booleans())
    def update(self, key: Any, keep: bool) -> None:
        entry = self.live().get(as_bytes(key))

        def fn(old: Any) -> Any:
            if keep or old is None:
                return old if keep else "1"
            return old + (b"+" if isinstance(old, bytes) else "+")

        new = self.store.update(key, fn)
        if keep:
            assert new == (None if entry is None else entry[1])
        elif entry is None:
            self.model[as_bytes(key)] = (key, "1", None)
        else:  # update keeps the expiry
            self.model[as_bytes(key)] = (entry[0], new, entry[2])

    @rule(key=KEYS, ms=st.one_of(st.none(), st.integers(-100, 5000)))
    def expire_at(self, key: Any, ms: int | None) -> None:
        entry = self.live().get(as_bytes(key))
        deadline = None if ms is None else max(0, self.clock() + ms)
        assert self.store.expire_at(key, deadline) is (entry is not None)
        if entry is not None:
            self.model[as_bytes(key)] = (entry[0], entry[1], deadline)

    @rule(key=KEYS)
    def expiry(self, key: Any) -> None:
        entry = self.live().get(as_bytes(key))
        if entry is None:
            with pytest.raises(KeyNotFoundError):
                self.store.expiry(key)
        else:
            assert self.store.expiry(key) == entry[2]

    @rule(seconds=st.integers(0, 3000))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds / 1000)

    @rule()
    def clear(self) -> None:
        self.store.clear()
        self.model.clear()

    @rule(a=KEYS, b=KEYS, value=VALUES, fail=st.booleans())
    def transaction(self, a: Any, b: Any, value: Any, fail: bool) -> None:
        before = dict(self.model)
        try:
            with self.store.transaction([a, b]) as tx:
                tx.set(a, value)
                if as_bytes(b) != as_bytes(a):
                    if tx.get(b) is not None:
                        tx.remove(b)
                assert tx.get(a) == value
                if fail:
                    raise RuntimeError("abort")
        except RuntimeError:
            assert fail
            assert self.model == before
            return
        self.model[as_bytes(a)] = (a, value, None)
        if as_bytes(b) != as_bytes(a):
            self.model.pop(as_bytes(b), None)

    @rule(match=st.sampled_from([None, "*", "user:*", "caf?", "[ab]", "\\*"]), count=st.integers(1, 20))
    def scan(self, match: str | None, count: int) -> None:
        from kvs.glob import compile_glob

        got = {as_bytes(k) for k in scan_all(self.store, match, count)}
        pattern = None if match is None else compile_glob(match)
        want = {k for k in self.live() if pattern is None or pattern(k)}
        assert got == want

    @rule()
    def iterate(self) -> None:
        live = self.live()
        assert sorted(as_bytes(k) for k in self.store) == sorted(live)
        assert dict((as_bytes(k), v) for k, v in self.store.items()) == {k: e[1] for k, e in live.items()}

    @rule()
    def reopen(self) -> None:
        self.store.close()
        self.store = open_engine(self.engine_name, self.dir, self.clock, expire_sweep_interval=0)

    @precondition(lambda self: self.engine_name == "kvs")
    @rule()
    def compact(self) -> None:
        self.store.compact()

    @invariant()
    def length(self) -> None:
        assert len(self.store) == len(self.live())


class KvStoreModel(EngineModel):
    engine_name = "kvs"


class SqliteModel(EngineModel):
    engine_name = "sqlite"


_SETTINGS = settings(max_examples=60, stateful_step_count=40, deadline=None, database=None)
TestKvStoreModel = pytest.mark.timeout(150)(_SETTINGS(KvStoreModel).TestCase)
TestSqliteModel = pytest.mark.timeout(150)(_SETTINGS(SqliteModel).TestCase)


# ------------------------------------------------------------------ hammers
@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    store = open_engine(request.param, tmp_path / "db", max_segment_bytes=16384) \
        if request.param == "kvs" else open_engine("sqlite", tmp_path / "db")
    yield store
    store.close()


@pytest.mark.timeout(120)
def test_readers_never_see_half_a_transaction(engine: Any) -> None:
    """Writers commit {a: n, b: n}; readers read a then b and must see b >= a, while
    (KvStore) compactions move the records."""
    engine.set("a", "0")
    engine.set("b", "0")
    stop = threading.Event()
    errors: list[str] = []
    rounds = 600

    def compacted_enough() -> bool:
        return engine.name != "kvs" or engine.stats()["compactions"] >= 3

    def writer() -> None:
        n = 0
        while n < rounds or not compacted_enough():
            n += 1
            if n % 2:
                with engine.transaction(["a", "b"]) as tx:
                    tx["a"], tx["b"] = str(n), str(n)
            else:
                engine.set_many([("a", str(n)), ("b", str(n))])
        stop.set()

    def reader() -> None:
        while not stop.is_set():
            a = int(engine.get("a"))
            b = int(engine["b"])
            if b < a:
                errors.append(f"read a={a} then b={b}")

    def compactor() -> None:
        while not stop.is_set():
            if engine.name == "kvs":
                engine.compact()
            else:
                stop.wait(0.01)

    run_threads([writer, reader, reader, compactor])
    assert not errors, errors[:5]
    assert engine.get("a") == engine.get("b") and int(engine.get("a")) >= rounds
    assert compacted_enough()


@pytest.mark.timeout(120)
def test_concurrent_updates_of_one_key_run_one_at_a_time(engine: Any) -> None:
    def bump() -> None:
        for _ in range(500):
            engine.update("n", lambda v: str(int(v or 0) + 1))

    run_threads([bump] * 8)
    assert engine.get("n") == "4000"


@pytest.mark.timeout(120)
def test_scan_under_churn_returns_every_stable_key(engine: Any) -> None:
    stable = {f"stable:{i}" for i in range(300)}
    engine.set_many([(k, "v") for k in stable])
    stop = threading.Event()

    def churn() -> None:
        rng = random.Random(1)
        while not stop.is_set():
            k = f"churn:{rng.randrange(500)}"
            if rng.random() < 0.5:
                engine.set(k, "x" * rng.randrange(50), ttl=rng.choice([None, 0.001]))
            else:
                engine.pop(k, None)
            if engine.name == "kvs" and rng.random() < 0.01:
                engine.compact()

    def scanner() -> None:
        try:
            for count in (1, 7, 100, 10, 3):
                keys = set(scan_all(engine, count=count))
                assert stable <= keys
                assert all(k.startswith(("stable:", "churn:")) for k in keys)
                assert set(scan_all(engine, match="stable:*", count=count)) == stable
                assert stable <= set(engine)
        finally:
            stop.set()

    run_threads([churn, scanner])


@pytest.mark.timeout(60)
def test_reentrant_update_is_refused_not_a_deadlock(engine: Any) -> None:
    engine.set("k", "1")
    for call in (lambda: engine.get("k"), lambda: engine.set("k", "2"), lambda: engine.update("k", str)):
        with pytest.raises(KvsError, match="cannot call the store from inside"):
            engine.update("k", lambda old, call=call: call())
    assert engine.get("k") == "1"
    engine.set("k", "3")  # the store still works afterwards
    assert engine.update("k", lambda old: old + "!") == "3!"


# ------------------------------------------------------------------ bad input
@pytest.mark.timeout(60)
def test_bad_inputs_are_clear_errors_and_store_nothing(engine: Any) -> None:
    engine.set("keep", "v", ttl=100)
    deadline = engine.expiry("keep")

    def unchanged() -> None:
        assert len(engine) == 1 and engine.get("keep") == "v" and engine.expiry("keep") == deadline

    for key, value in ((1, "v"), ("k", 1), (None, "v"), ("k", None), ("k", 1.5), (["k"], "v"), ("k", {"a": 1})):
        with pytest.raises(TypeError):
            engine.set(key, value)
        unchanged()
    for key, value in (("\ud800", "v"), ("k", "\udfff"), ("k" * 300_000, "v"), ("k", b"x" * (2 ** 24 + 1))):
        with pytest.raises(KvsError):
            engine.set(key, value)
        with pytest.raises(KvsError):
            engine.set_many([("fine", "v"), (key, value)])
        with pytest.raises(KvsError):
            with engine.transaction(["fine", key if isinstance(key, str) and len(key) < 10 else "x"]) as tx:
                tx.set("fine", "v")
                tx.set(key, value)
        unchanged()
    for ttl in (0, -1, float("nan"), float("inf"), 1e300):
        with pytest.raises(KvsError, match="ttl|TTL|deadline"):
            engine.set("k", "v", ttl=ttl)
        with pytest.raises(KvsError):
            engine.expire("keep", ttl)
        unchanged()
    for ms in (-1, 2 ** 63, 2 ** 80):
        with pytest.raises(KvsError):
            engine.expire_at("keep", ms)
        unchanged()
    with pytest.raises(KvsError, match="undeclared|declared"):
        with engine.transaction(["a"]) as tx:
            tx.set("a", "1")
            tx.set("b", "2")
    unchanged()
    with pytest.raises(KvsError):
        engine.scan(0, match="[a")
    for cursor, count in ((-1, 10), (0, 0), (0, -5)):
        with pytest.raises((KvsError, ValueError)):
            engine.scan(cursor, count=count)
    unchanged()


@pytest.mark.parametrize("name", ENGINES)
def test_bytes_like_values_read_back_as_bytes_and_str_keys_alias_their_bytes(tmp_path: Path, name: str) -> None:
    with open_engine(name, tmp_path / "db") as store:
        store.set("café", bytearray(b"\x00\xff"))
        assert store.get(b"caf\xc3\xa9") == b"\x00\xff"
        store.set(memoryview(b"m"), "text")
        assert store.get("m") == "text" and type(store.get("m")) is str
        assert set(store) == {"café", b"m"}  # keys come back as the type they were written with


# ------------------------------------------------------------------ format 1 directories
@pytest.mark.timeout(60)
@pytest.mark.parametrize("fixture", ["v1-clean", "v1-killed"])
def test_a_format_1_directory_opens_and_keeps_working(tmp_path: Path, fixture: str) -> None:
    expected = json.loads((FIXTURES / "v1-expected.json").read_text())
    path = tmp_path / fixture
    shutil.copytree(FIXTURES / fixture, path)
    with KvStore.open(path) as store:
        assert json.loads((path / "kvs-meta.json").read_text())["format"] == 2
        assert {k: store.get(k) for k in expected} == expected
        assert len(store) == len(expected) and set(store) == set(expected)
        store.set(b"new\xff", b"\x00", ttl=1000)
        store.remove(next(iter(expected)))
    with KvStore.open(path) as store:
        assert store.get(b"new\xff") == b"\x00" and store.ttl(b"new\xff") is not None
        store.compact()
        assert len(store) == len(expected)
    with KvStore.open(path) as store:
        assert {k: store.get(k) for k in list(expected)[1:]} == dict(list(expected.items())[1:])


def test_an_unknown_format_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "future"
    shutil.copytree(FIXTURES / "v1-clean", path)
    (path / "kvs-meta.json").write_text('{"engine": "kvs", "format": 99}\n')
    before = {p.name: p.read_bytes() for p in path.iterdir() if p.name != "LOCK"}
    with pytest.raises(KvsError, match="format"):
        KvStore.open(path)
    assert {p.name: p.read_bytes() for p in path.iterdir() if p.name != "LOCK"} == before


def test_kvs_0_1_0_refuses_a_format_2_directory(tmp_path: Path) -> None:
    """The 0.1.0 check (its datadir.py, at commit 3b87774) on a directory kvs now wrote."""
    import subprocess
    import sys
    import types

    source = subprocess.run(["git", "show", "3b87774:kvs/engine/datadir.py"], cwd=Path(__file__).parent,
                            capture_output=True, text=True, check=False)
    if source.returncode != 0:
        pytest.fail(f"git cannot show the 0.1.0 datadir.py: {source.stderr.strip()}")
    old = types.ModuleType("datadir_0_1_0")
    exec(compile(source.stdout, "datadir_0_1_0.py", "exec"), old.__dict__)
    path = tmp_path / "v2"
    KvStore.open(path).close()
    with pytest.raises(KvsError, match="format version 2"):
        old.DataDir(path, "kvs", 1)
    assert sys.modules.get("datadir_0_1_0") is None

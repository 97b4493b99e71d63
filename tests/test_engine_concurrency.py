"""Both engines under concurrent use: transactions seen whole, atomic ``update``, refused
calls back into the store, SCAN under churn, and expiry against a moving clock.

Every test runs against ``KvStore`` ("kvs") and ``SqliteKvsEngine`` ("sqlite"); for
``KvStore`` a thread forces compactions meanwhile, with 1 KiB segments so that every
compaction really moves the live records. Tests are bounded by work counts (and a time cap),
never by sleeping, and assert only what the interface (``kvs.engine.base``) promises.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvs.engine import open_engine
from kvs.engine.clock import ManualClock
from kvs.errors import KeyNotFoundError, KvsError
from tests.helpers import run_threads, wait_until

ENGINE_NAMES = ["kvs", "sqlite"]
KVS_ONLY = {"max_segment_bytes", "background_compaction", "compaction_threshold"}
REENTRY = "inside update"  # part of kvs.engine.callbacks.REENTRY_MESSAGE


class Stores:
    """Opens engines under ``tmp_path``; closes them at the end of the test, except those
    :meth:`abandon`\\ ed (a thread of theirs is stuck holding their locks)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.opened: list[Any] = []
        self.abandoned: list[Any] = []

    def open(self, name: str, sub: str = "db", **options: Any) -> Any:
        if name == "kvs":
            options = {"max_segment_bytes": 1024, "background_compaction": False, **options}
        else:
            options = {k: v for k, v in options.items() if k not in KVS_ONLY}
        store = open_engine(name, self.tmp_path / sub, **options)
        self.opened.append(store)
        return store

    def abandon(self, store: Any) -> None:
        self.abandoned.append(store)

    def close_all(self) -> None:
        for store in self.opened:
            if not any(store is a for a in self.abandoned):
                store.close()


@pytest.fixture
def stores(tmp_path: Path) -> Iterator[Stores]:
    s = Stores(tmp_path)
    yield s
    s.close_all()


@pytest.fixture(params=ENGINE_NAMES)
def name(request: pytest.FixtureRequest) -> str:
    return request.param


def compactor(store: Any, stop: threading.Event) -> Callable[[], None]:
    """A thread body forcing compactions of a ``KvStore`` until ``stop`` (nothing for sqlite)."""
    def run() -> None:
        if store.name != "kvs":
            return
        while not stop.is_set():
            store.compact()
            time.sleep(0.001)
    return run


def in_thread(fn: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Run ``fn`` in a daemon thread: its result, its exception re-raised, or ``None`` and
    ``alive=True`` when it has not finished within ``timeout`` (a deadlock)."""
    result: list[Any] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=body, daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        return t
    if errors:
        raise errors[0]
    return None


def as_value(n: int, kind: type) -> str | bytes:
    return str(n) if kind is str else str(n).encode()


# =========================================================================== 1. transactions seen whole
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", [str, bytes], ids=["str", "bytes"])
@pytest.mark.parametrize("how", ["transaction", "set_many"])
def test_readers_never_see_half_a_transaction(stores: Stores, name: str, kind: type, how: str) -> None:
    """Writers commit ``{a: n, b: n}`` for increasing n (read-modify-write transactions from
    two threads, or ``set_many`` from one); readers read ``a`` then ``b`` through ``get``, the
    mapping and ``in``, and always find b >= a; for KvStore compactions run meanwhile."""
    store = stores.open(name)
    store.set_many([("a", as_value(0, kind)), ("b", as_value(0, kind))])
    stop = threading.Event()
    commits = 300
    started = {"get": 0, "mapping": 0, "contains": 0}  # reads, by kind of reader
    reads = dict(started)  # reads that found a transaction's values (a > 0)
    seen_max = [0]

    done: list[int] = []  # commits per writer
    time_cap = time.monotonic() + 15

    def more() -> bool:
        """Write on until ``commits`` and until every reader has read a while meanwhile."""
        return time.monotonic() < time_cap and (min(reads.values()) < 50)

    def tx_writer() -> None:
        n_done = 0
        wait_until(lambda: min(started.values()) > 0, timeout=10)
        while n_done < commits or more():
            with store.transaction(["a", "b"]) as tx:
                n = int(tx.get("a")) + 1
                assert int(tx["b"]) == n - 1
                tx.set("a", as_value(n, kind))
                tx["b"] = as_value(n, kind)
            n_done += 1
        done.append(n_done)

    def set_many_writer() -> None:
        n = 0
        wait_until(lambda: min(started.values()) > 0, timeout=10)
        while n < 2 * commits or more():
            n += 1
            store.set_many([("a", as_value(n, kind)), ("b", as_value(n, kind))])
        done.append(n)

    def writers() -> None:
        try:
            if how == "transaction":
                run_threads([tx_writer, tx_writer], timeout=40)
            else:
                set_many_writer()
            if store.name == "kvs":  # let the compactor finish a few rounds under the readers
                start = store.stats()["compactions"]
                wait_until(lambda: store.stats()["compactions"] >= start + 2, timeout=10)
        finally:
            stop.set()

    def reader_get() -> None:
        while not stop.is_set():
            a = store.get("a")
            b = store.get("b")
            assert type(a) is kind and type(b) is kind
            assert int(b) >= int(a), f"read a={a!r} then b={b!r}: half a transaction"
            seen_max[0] = max(seen_max[0], int(a))
            started["get"] += 1
            reads["get"] += 1 if int(a) else 0

    def reader_mapping() -> None:
        while not stop.is_set():
            a = store["a"]
            b = store["b"]
            assert int(b) >= int(a), f"read a={a!r} then b={b!r}: half a transaction"
            started["mapping"] += 1
            reads["mapping"] += 1 if int(a) else 0

    def reader_contains() -> None:
        while not stop.is_set():
            assert "a" in store and b"b" in store  # never absent, not even while a commit lands
            a = store.get(b"a")  # a bytes key is the same key as the str one
            b = store.get(b"b")
            assert int(b) >= int(a), f"read a={a!r} then b={b!r}: half a transaction"
            started["contains"] += 1
            reads["contains"] += 1 if int(a) else 0

    stop_compactor = threading.Event()
    before = store.stats()["compactions"] if store.name == "kvs" else 0
    run_threads([writers, reader_get, reader_get, reader_mapping, reader_contains,
                 lambda: (stop.wait(), stop_compactor.set()), compactor(store, stop_compactor)], timeout=50)
    assert store.get("a") == store.get("b") == as_value(sum(done), kind)
    assert all(count > 0 for count in reads.values()), reads
    assert seen_max[0] > 0  # the readers saw transactions land, not only the initial state
    if store.name == "kvs":
        stats = store.stats()
        assert stats["compactions"] >= before + 2, stats
        store.compact()
        # The log holds the two live records, not the hundreds of transactions written: the
        # compactions moved the live records and dropped the rest.
        assert store.stats()["total_bytes"] < 1024 * 4, store.stats()


# =========================================================================== 2. update is atomic
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", [str, bytes], ids=["str", "bytes"])
def test_concurrent_updates_lose_no_increment(stores: Stores, name: str, kind: type) -> None:
    store = stores.open(name)

    def work() -> None:
        for _ in range(500):
            store.update("n", lambda v: as_value(int(v or 0) + 1, kind))

    run_threads([work] * 8, timeout=50)
    assert store.get("n") == as_value(4000, kind)


@pytest.mark.timeout(60)
def test_concurrent_updates_lose_no_increment_across_compactions(stores: Stores) -> None:
    store = stores.open("kvs")
    stop = threading.Event()
    before = store.stats()["compactions"]

    def work() -> None:
        for i in range(500):
            store.update("n", lambda v: str(int(v or 0) + 1))
            store.set(f"filler{i % 7}", "x" * 40)  # fill segments so that they roll over

    def workers() -> None:
        try:
            run_threads([work] * 8, timeout=45)
        finally:
            stop.set()

    run_threads([workers, compactor(store, stop)], timeout=50)
    assert store.stats()["compactions"] >= before + 2
    assert store.get("n") == "4000"
    store.compact()
    assert store.get("n") == "4000"


# =========================================================================== 3. calls back into the store
def _calls_into(store: Any) -> dict[str, Callable[[], Any]]:
    """Every public method of the engine interface, as a call back into ``store``."""
    return {
        "get": lambda: store.get("a"), "set": lambda: store.set("x", "1"),
        "set ttl": lambda: store.set("x", "1", ttl=5), "remove": lambda: store.remove("a"),
        "update": lambda: store.update("a", lambda v: "nested"),
        "update other key": lambda: store.update("x", lambda v: "nested"),
        "transaction": lambda: store.transaction(["x"]).__enter__(),
        "set_many": lambda: store.set_many([("x", "1"), ("y", "2")]),
        "set_many one": lambda: store.set_many([("x", "1")]),
        "len": lambda: len(store), "in": lambda: "a" in store, "getitem": lambda: store["a"],
        "setitem": lambda: store.__setitem__("x", "1"), "delitem": lambda: store.__delitem__("a"),
        "iter": lambda: list(store), "items": lambda: list(store.items()), "scan": lambda: store.scan(0),
        "clear": lambda: store.clear(), "expire": lambda: store.expire("a", 5),
        "expire_at": lambda: store.expire_at("a", None), "ttl": lambda: store.ttl("a"),
        "expiry": lambda: store.expiry("a"), "purge_expired": lambda: store.purge_expired(),
    }


@pytest.mark.timeout(60)
def test_calls_back_from_update_are_refused_and_write_nothing(stores: Stores, name: str) -> None:
    """``fn`` calling any method of the store raises ``KvsError`` (not a deadlock); the error
    propagates out of ``update`` and nothing is written; if ``fn`` catches it and returns a
    value, only that value is written. The store works afterwards from that thread and others."""
    store = stores.open(name)
    store.set_many([("a", "0"), ("b", "0")])

    def body() -> None:
        for what, call in _calls_into(store).items():
            def fn(old: Any, call: Callable[[], Any] = call) -> Any:
                call()
                return "written"
            with pytest.raises(KvsError, match=REENTRY):
                store.update("a", fn)
            assert store.get("a") == "0" and store.get("x") is None and len(store) == 2, what

            refused: list[BaseException] = []

            def catching(old: Any, call: Callable[[], Any] = call,
                         refused: list[BaseException] = refused) -> Any:
                try:
                    call()
                except KvsError as exc:
                    refused.append(exc)
                return str(int(old) + 1)
            store.update("b", catching)
            assert len(refused) == 1 and REENTRY in str(refused[0]), what
            assert store.get("x") is None and store.get("a") == "0", what
        # The same thread, and others at the same time, use the store normally afterwards.
        assert store.get("b") == str(len(_calls_into(store)))
        store.set("x", "1")
        store.remove("x")
        assert store.update("a", lambda v: str(int(v) + 1)) == "1"
        run_threads([lambda: [store.update("a", lambda v: str(int(v) + 1)) for _ in range(100)]] * 4, timeout=20)
        assert store.get("a") == "401"

    stuck = in_thread(body)
    if stuck is not None:
        stores.abandon(store)
        pytest.fail("a call back into the store from update() deadlocked")


@pytest.mark.timeout(60)
def test_calls_back_from_a_transaction_body_are_refused(stores: Stores, name: str) -> None:
    """The body of ``with store.transaction(keys)`` may use only its view: a direct call to
    the store raises ``KvsError``; an escaping error writes nothing of the transaction; a
    caught one leaves the view's writes to commit. A thread updating the transaction's key
    meanwhile waits for the commit and then sees it."""
    store = stores.open(name)
    store.set_many([("a", "0"), ("b", "0")])

    def body() -> None:
        for i, (what, call) in enumerate(_calls_into(store).items()):
            with pytest.raises(KvsError, match=REENTRY):
                with store.transaction(["a", "b"]) as tx:
                    tx.set("a", "half")
                    call()
                    tx.set("b", "half")
            assert store.get("a") == "0" and store.get("b") == str(i) and store.get("x") is None, what
            with store.transaction(["b"]) as tx:
                with pytest.raises(KvsError, match=REENTRY):
                    call()
                tx.update("b", lambda v: str(int(v) + 1))
            assert store.get("x") is None and store.get("b") == str(i + 1), what
        assert store.get("a") == "0"

        inside = threading.Event()
        release = threading.Event()

        def holder() -> None:
            with store.transaction(["a"]) as tx:
                inside.set()
                assert release.wait(10)
                tx["a"] = "held"

        def other() -> None:
            assert inside.wait(10)
            store.update("a", lambda v: v + "+")  # serialised after the holder's commit

        def releaser() -> None:
            assert inside.wait(10)
            release.set()

        run_threads([holder, other, releaser], timeout=20)
        assert store.get("a") == "held+"

    stuck = in_thread(body)
    if stuck is not None:
        stores.abandon(store)
        pytest.fail("a call back into the store from a transaction body deadlocked")


@pytest.mark.timeout(60)
def test_close_from_inside_a_callback_is_refused(stores: Stores, name: str) -> None:
    """``close`` is a method of the store like any other: called from ``update``'s function it
    raises ``KvsError`` (callbacks.py: every public method refuses), and the store stays open."""
    store = stores.open(name)
    store.set("a", "0")

    def body() -> Any:
        def fn(old: Any) -> Any:
            store.close()
            return "1"
        with pytest.raises(KvsError, match=REENTRY):
            store.update("a", fn)
        assert store.get("a") == "0"
        store.set("a", "2")

    stuck = in_thread(body)
    if stuck is not None:
        stores.abandon(store)
        pytest.fail("close() from inside update() deadlocked")


@pytest.mark.timeout(60)
def test_kvstore_compact_from_inside_a_callback_is_refused(stores: Stores) -> None:
    """``KvStore.compact`` takes the stripe locks of the keys it moves; from inside ``update``'s
    function (which holds one of them) it must raise ``KvsError``, not deadlock."""
    store = stores.open("kvs")
    for i in range(100):
        store.set(f"k{i}", "x" * 20)
    store.set("a", "0")

    def body() -> Any:
        def fn(old: Any) -> Any:
            store.compact()
            return "1"
        with pytest.raises(KvsError, match=REENTRY):
            store.update("a", fn)
        assert store.get("a") == "0"

    stuck = in_thread(body, timeout=3)
    if stuck is not None:
        stores.abandon(store)
        pytest.fail("KvStore.compact() from inside update()'s function deadlocked "
                    "(it holds a stripe lock that compaction waits for)")


# =========================================================================== 4. scan and iteration under churn
SCANS: list[tuple[int, str | None, Callable[[bytes], bool]]] = [
    (1, None, lambda kb: True),
    (3, "s:1*", lambda kb: kb.startswith(b"s:1")),
    (50, "*7", lambda kb: kb.endswith(b"7")),
    (1000, None, lambda kb: True),
    (10, "c:*", lambda kb: kb.startswith(b"c:")),
    (7, "s:[0-4]?[13579]", lambda kb: len(kb) == 5 and kb.startswith(b"s:") and kb[2] in b"01234"
     and kb[4] in b"13579"),
]


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key


def _full_scan(store: Any, count: int, match: str | None) -> list[Any]:
    keys: list[Any] = []
    cursor, calls = 0, 0
    while True:
        cursor, page = store.scan(cursor, count=count, match=match)
        keys.extend(page)
        calls += 1
        assert calls < 20_000, "a full scan does not terminate"
        if cursor == 0:
            return keys


@pytest.mark.timeout(60)
def test_scan_and_iteration_return_every_stable_key_under_churn(stores: Stores, name: str) -> None:
    """Stable keys (str and bytes, present throughout) plus threads adding, removing and
    expiring other keys (a moving ManualClock), a transaction writer, and compactions
    (KvStore): every full SCAN (various counts and globs) and ``list(store)`` returns each
    stable key that matches at least once, as the type it was written with; never a key that
    never existed or that does not match; and ends."""
    clock = ManualClock()
    store = stores.open(name, clock=clock, expire_sweep_interval=0.005)
    stable: dict[bytes, str | bytes] = {}
    for i in range(120):
        k: str | bytes = f"s:{i:03d}" if i % 3 else f"s:{i:03d}".encode()
        stable[_key_bytes(k)] = k
    store.set_many([(k, "stable") for k in stable.values()])
    stable_bytes_key = b"s:\xff\x00bin"  # invalid UTF-8: must come back as these bytes
    store.set(stable_bytes_key, b"stable")
    stable[stable_bytes_key] = stable_bytes_key
    ever: set[bytes] = set(stable)  # every key ever written (added to before it is written)
    stop = threading.Event()

    def churner(t: int) -> Callable[[], None]:
        def run() -> None:
            rnd = random.Random(t)
            j = 0
            live: list[str] = []
            while not stop.is_set():
                j += 1
                key = f"c:{t}:{j}"
                ever.add(key.encode())
                choice = rnd.random()
                if choice < 0.3:
                    store.set(key, "ttl", ttl=rnd.choice([0.001, 0.005, 0.02]))
                else:
                    store.set(key, "v")
                    live.append(key)
                if len(live) > 40:
                    victim = live.pop(rnd.randrange(len(live)))
                    if rnd.random() < 0.5:
                        store.remove(victim)
                    else:
                        store.expire_at(victim, clock() - 1)  # a past deadline removes it
        return run

    def tx_writer() -> None:
        j = 0
        while not stop.is_set():
            j += 1
            k1, k2 = f"c:tx:{j}:a", f"c:tx:{j}:b"
            ever.update((k1.encode(), k2.encode()))
            with store.transaction([k1, k2, f"c:tx:{j - 1}:a"]) as tx:
                tx.set(k1, "1")
                tx.set(k2, "2", ttl=0.01)
                if f"c:tx:{j - 1}:a" in tx:
                    tx.remove(f"c:tx:{j - 1}:a")

    def ticker() -> None:
        while not stop.is_set():
            clock.advance(0.001)
            time.sleep(0.0005)

    def check(keys: list[Any], predicate: Callable[[bytes], bool], what: str) -> None:
        got = [_key_bytes(k) for k in keys]
        never = [k for k in got if k not in ever]
        assert not never, f"{what}: keys that never existed: {never[:5]}"
        wrong = [k for k in got if not predicate(k)]
        assert not wrong, f"{what}: keys not matching: {wrong[:5]}"
        for k in keys:
            kb = _key_bytes(k)
            if kb in stable:
                assert type(k) is type(stable[kb]), f"{what}: {k!r} comes back as the wrong type"
        missing = [k for k in stable if predicate(k) and k not in set(got)]
        assert not missing, f"{what}: stable keys missing: {missing[:5]}"
        if store.name == "sqlite":  # documented there: each stable key exactly once
            stable_got = [k for k in got if k in stable]
            assert len(stable_got) == len(set(stable_got)), f"{what}: a stable key twice"

    def scanner() -> None:
        try:
            for _round in range(3):
                for count, match, predicate in SCANS:
                    check(_full_scan(store, count, match), predicate, f"scan(count={count}, match={match!r})")
                check(list(store), lambda kb: True, "list(store)")
                check([k for k, _v in store.items()], lambda kb: True, "items()")
        finally:
            stop.set()

    stop_compactor = threading.Event()
    run_threads([scanner, churner(1), churner(2), tx_writer, ticker,
                 lambda: (stop.wait(), stop_compactor.set()), compactor(store, stop_compactor)], timeout=50)
    assert len(ever) > len(stable) + 100  # the churn really ran during the scans
    for k in stable.values():
        assert store.get(k) is not None, k


# =========================================================================== 5. expiry against a moving clock
@pytest.mark.timeout(60)
def test_no_reader_sees_a_key_past_its_deadline(stores: Stores, name: str) -> None:
    """Keys ``e:<deadline>:<n>`` are written with exactly that deadline (set and expire_at in
    one transaction) while one thread moves a ManualClock forward and the sweep (and, for
    KvStore, compaction) removes expired keys. Each reader reads the clock, then the store:
    whatever it finds (``get``, ``in``, ``[]``, ``expiry``, ``ttl``, ``scan``) has a
    deadline after the time it read."""
    clock = ManualClock()
    store = stores.open(name, clock=clock, expire_sweep_interval=0.002)
    stop = threading.Event()
    written: list[tuple[str, int]] = []
    checks = {"get": 0, "in": 0, "expiry": 0, "scan": 0}

    def deadline_of(key: str | bytes) -> int:
        return int(_key_bytes(key).split(b":")[1])

    def writer(t: int) -> Callable[[], None]:
        def run() -> None:
            rnd = random.Random(t)
            n = 0
            until = time.monotonic() + 1.0
            while not stop.is_set() and time.monotonic() < until:
                n += 1
                d = clock() + rnd.randint(1, 15)
                key = f"e:{d}:{t}:{n}"
                with store.transaction([key]) as tx:
                    tx.set(key, str(d))
                    tx.expire_at(key, d)
                if rnd.random() < 0.2:  # update keeps the deadline
                    store.update(key, lambda v: None if v is None else v + "")
                written.append((key, d))
        return run

    def ticker() -> None:
        while not stop.is_set():
            clock.advance(0.001)
            time.sleep(0.0003)

    def recent() -> tuple[str, int] | None:
        return written[-random.randrange(1, min(len(written), 50) + 1)] if written else None

    def get_reader() -> None:
        while not stop.is_set():
            item = recent()
            if item is None:
                continue
            key, d = item
            now = clock()
            value = store.get(key)
            if value is not None:
                assert int(value) == d and d > now, f"get({key!r}) = {value!r} at {now}"
                checks["get"] += 1
            now = clock()
            try:
                value = store[key]
            except KeyError:
                pass
            else:
                assert d > now, f"store[{key!r}] = {value!r} at {now}"

    def contains_reader() -> None:
        while not stop.is_set():
            item = recent()
            if item is None:
                continue
            key, d = item
            now = clock()
            if key in store:
                assert d > now, f"{key!r} in store at {now}"
                checks["in"] += 1

    def expiry_reader() -> None:
        while not stop.is_set():
            item = recent()
            if item is None:
                continue
            key, d = item
            now = clock()
            try:
                got = store.expiry(key)
            except KeyNotFoundError:
                pass
            else:
                assert got == d and got > now, f"expiry({key!r}) = {got} at {now}"
                checks["expiry"] += 1
            now = clock()
            try:
                ttl = store.ttl(key)
            except KeyNotFoundError:
                pass
            else:
                assert ttl is not None and ttl * 1000 <= d - now + 1e-6, f"ttl({key!r}) = {ttl} at {now}"

    def scan_reader() -> None:
        cursor = 0
        while not stop.is_set():
            now = clock()
            cursor, keys = store.scan(cursor, count=25, match="e:*")
            for key in keys:
                assert deadline_of(key) > now, f"scan returned {key!r} at {now}"
                checks["scan"] += 1

    def writers() -> None:
        deadline = time.monotonic() + 5.0
        try:
            run_threads([writer(1), writer(2)], timeout=40)
        finally:
            wait_until(lambda: all(checks.values()) or time.monotonic() > deadline, timeout=10)
            stop.set()

    stop_compactor = threading.Event()
    run_threads([writers, ticker, get_reader, contains_reader, expiry_reader, scan_reader,
                 lambda: (stop.wait(), stop_compactor.set()), compactor(store, stop_compactor)], timeout=50)
    assert all(checks.values()), checks  # every kind of reader found live keys to check
    clock.advance(1)  # past every deadline
    assert len(store) == 0
    assert list(store) == [] and _full_scan(store, 100, None) == []
    assert all(store.get(key) is None for key, _d in written[-100:])


class TickingClock:
    """A clock that moves one millisecond at every reading: time passes between any two
    readings an engine makes, as it does for a thread preempted between them."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            self._now += 1
            return self._now


@pytest.mark.timeout(30)
def test_ttl_of_a_live_key_is_positive_while_the_clock_moves(stores: Stores, name: str) -> None:
    """``ttl`` answers for a key it found unexpired: the seconds it has left, > 0, however the
    clock moved during the call (else a caller sees a live key with a TTL of 0 or less)."""
    clock = TickingClock()
    store = stores.open(name, clock=clock, expire_sweep_interval=0)
    for ahead in range(1, 8):
        key = f"k{ahead}"
        store.set(key, "v")
        assert store.expire_at(key, clock() + ahead)
        answers = []
        while True:
            try:
                answers.append(store.ttl(key))
            except KeyNotFoundError:
                break
        assert all(0 < t <= ahead / 1000 for t in answers), (ahead, answers)

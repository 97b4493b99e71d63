"""``set_many`` (one write for a run of SETs) on both engines, the server's use of it for
pipelined SET runs, and the memory-mapped scans of ``open`` and compaction."""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from kvs.engine import FsyncPolicy
from kvs.engine.kvstore import KvStore
from kvs.engine.sqlite import SqliteKvsEngine
from kvs.errors import KvsError
from kvs.protocol import ResponseDecoder, encode_set
from kvs.server.kvs_session import KvsSession
from kvs.server.resp_session import RespSession
from kvs.server.sessions import ServerFacts


@pytest.fixture(params=["kvstore", "sqlite"])
def engines(request: pytest.FixtureRequest) -> Iterator[Callable[[Path], Any]]:
    """``engines(path)`` opens the engine under test; everything it opened is closed after."""
    opened: list[Any] = []

    def open_(path: Path) -> Any:
        engine = KvStore.open(path) if request.param == "kvstore" else SqliteKvsEngine.open(path)
        opened.append(engine)
        return engine

    yield open_
    for engine in opened:
        engine.close()


BATCH_METHODS = pytest.mark.parametrize("method", ["set_many", "set_batch"])
"""``set_many`` (a transaction) and ``set_batch`` (the server's non-atomic batch) share the
behaviour of a run of ``set`` calls checked up front."""


@BATCH_METHODS
def test_set_many_stores_in_order_and_survives_reopen(engines: Callable[[Path], Any], tmp_path: Path,
                                                      method: str) -> None:
    store = engines(tmp_path / "d")
    store.set("a", "old")
    store.set("ttl", "old", ttl=3600)
    batch = getattr(store, method)
    batch([("a", "1"), ("b", "2"), ("a", "3"), ("ключ", "значение"), ("", ""), (b"\xff", b"\x00"), ("ttl", "new")])
    assert (store.get("a"), store.get("b"), store.get("ключ"), store.get("")) == ("3", "2", "значение", "")
    assert store.get(b"\xff") == b"\x00" and store.expiry("ttl") is None  # set clears the expiry
    batch([])
    batch([("single", "x")])
    store.close()
    store = engines(tmp_path / "d")
    assert (store.get("a"), store.get("b"), store.get("single"), store.get(b"\xff")) == ("3", "2", "x", b"\x00")
    assert list(store.keys()).count(b"\xff") == 1 and store.expiry("ttl") is None


@BATCH_METHODS
@pytest.mark.parametrize("bad", [("ok", "\ud800"), ("k" * 70000, "v"), (1, "v"), ("k", None)])
def test_set_many_with_one_bad_pair_stores_nothing(engines: Callable[[Path], Any], tmp_path: Path,
                                                   bad: tuple[Any, Any], method: str) -> None:
    store = engines(tmp_path / "d")
    with pytest.raises((KvsError, TypeError)):
        getattr(store, method)([("first", "1"), bad, ("last", "2")])
    assert store.get("first") is None and store.get("last") is None


@BATCH_METHODS
def test_set_many_after_close_raises(engines: Callable[[Path], Any], tmp_path: Path, method: str) -> None:
    store = engines(tmp_path / "d")
    store.close()
    with pytest.raises(KvsError):
        getattr(store, method)([("a", "1"), ("b", "2")])


@BATCH_METHODS
def test_set_many_batches_are_linearizable_per_key(tmp_path: Path, method: str) -> None:
    """Writers apply overlapping batches (repeated keys, shuffled order) while readers check,
    on every read, that what a writer wrote never goes back in time: once a reader has seen
    writer w's batch b for a key, it never sees an earlier batch of w for that key."""
    store = KvStore.open(tmp_path / "d", compaction_threshold=64 * 1024)
    keys = [f"k{i}" for i in range(24)]
    writers, batches = 4, 300
    stop = threading.Event()
    errors: list[str] = []

    def write(w: int) -> None:
        rng = random.Random(w)
        batch = getattr(store, method)
        for b in range(batches):
            picked = rng.sample(keys, 12) + rng.sample(keys, 4)  # some keys twice in a batch
            batch([(k, f"{w}:{b}:{'x' * rng.randrange(200)}") for k in picked])

    def read(r: int) -> None:
        rng = random.Random(100 + r)
        seen: dict[tuple[str, int], int] = {}
        while not stop.is_set():
            k = rng.choice(keys)
            v = store.get(k)
            if v is None:
                continue
            w, b, _pad = v.split(":")
            last = seen.get((k, int(w)), -1)
            if int(b) < last:
                errors.append(f"{k}: saw batch {b} of writer {w} after batch {last}")
            seen[(k, int(w))] = int(b)

    try:
        readers = [threading.Thread(target=read, args=(r,)) for r in range(3)]
        ws = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
        for t in readers + ws:
            t.start()
        for t in ws:
            t.join(120)
        stop.set()
        for t in readers:
            t.join(120)
        assert not errors, errors[:5]
        final = {k: store.get(k) for k in keys}
        assert all(v is not None for v in final.values())
        assert store.stats()["compactions"] >= 1, "the batches should have forced a compaction"
    finally:
        store.close()
    with KvStore.open(tmp_path / "d") as again:
        assert {k: again.get(k) for k in keys} == final


# --------------------------------------------------------------------------- sessions
def _facts(engine: Any) -> ServerFacts:
    """What a ``RespSession`` may know of its server, for a session made without one."""
    return ServerFacts(address=("127.0.0.1", 0), max_connections=1, max_key_bytes=1024,
                       max_value_bytes=1 << 20, io_model="test", pool_name="test", pool_threads=1,
                       engine_name=engine.name, engine_fsync=engine.fsync, started_at=0.0,
                       connection_count=lambda: 1, total_commands=lambda: 0)


class _RefusingBatchEngine:
    """An engine whose ``set_batch`` refuses every batch: the sessions must fall back to
    ``set``, one command at a time."""

    name = "refusing"
    fsync: FsyncPolicy = "never"

    def __init__(self) -> None:
        self.data: dict[str, str] = {}
        self.calls = 0
        self.batches = 0

    def set(self, key: str, value: str) -> None:
        self.calls += 1
        self.data[key] = value

    def set_batch(self, items: Sequence[tuple[str, str]]) -> None:
        self.batches += 1
        raise KvsError("no batches here")

    def get(self, key: str) -> str | None:
        return self.data.get(key)

    def remove(self, key: str) -> None:
        del self.data[key]

    def __len__(self) -> int:
        return len(self.data)

    def close(self) -> None:
        pass


def _resp_set(key: bytes, value: bytes) -> bytes:
    return b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(key), key, len(value), value)


def test_pipelined_resp_sets_answer_each_command_as_alone(tmp_path: Path) -> None:
    with KvStore.open(tmp_path / "d", max_value_bytes=100) as store:
        session = RespSession(store, "test", _facts(store))
        run = (_resp_set(b"a", b"1") + _resp_set(b"b", b"\xff\xfe") + _resp_set(b"c", b"3")
               + _resp_set(b"d", b"v" * 101) + _resp_set(b"e", b"5")
               + b"*2\r\n$3\r\nGET\r\n$1\r\na\r\n" + _resp_set(b"a", b"6") + _resp_set(b"f", b"7"))
        out = session.handle(run)
        assert out.count(b"+OK\r\n") == 6 and out.count(b"-ERR") == 1  # binary values are values
        assert out.startswith(b"+OK\r\n+OK\r\n+OK\r\n-ERR value is 101 bytes")
        assert b"$1\r\n1\r\n" in out  # the GET saw the run before it, not the one after
        assert [store.get(k) for k in "abcdef"] == [b"6", b"\xff\xfe", b"3", None, b"5", b"7"]
        assert session.commands == 8


def test_pipelined_sets_fall_back_to_set_when_the_batch_is_refused() -> None:
    engine = _RefusingBatchEngine()
    session = RespSession(engine, "test", _facts(engine))
    assert session.handle(_resp_set(b"a", b"1") + _resp_set(b"b", b"2")) == b"+OK\r\n+OK\r\n"
    assert engine.data == {b"a": b"1", b"b": b"2"} and engine.calls == 2 and engine.batches == 1
    kvs = KvsSession(engine, "test", max_key_bytes=1024, max_value_bytes=1024)
    replies = ResponseDecoder().feed(kvs.handle(encode_set("c", "3") + encode_set("d", "4")))
    assert len(replies) == 2 and engine.data["c"] == "3" and engine.data["d"] == "4"
    assert engine.calls == 4 and engine.batches == 2


def test_pipelined_kvs_sets_use_one_batch(tmp_path: Path) -> None:
    with KvStore.open(tmp_path / "d") as store:
        session = KvsSession(store, "test", max_key_bytes=1024, max_value_bytes=1024)
        before = store.stats()["total_bytes"]
        frames = b"".join(encode_set(f"k{i}", f"v{i}") for i in range(50))
        replies = ResponseDecoder().feed(session.handle(frames))
        assert len(replies) == 50
        assert all(store.get(f"k{i}") == f"v{i}" for i in range(50))
        assert store.stats()["total_bytes"] > before


# --------------------------------------------------------------------------- mappings
def _mapped_files(directory: Path) -> list[str]:
    with open("/proc/self/maps") as f:
        return [line for line in f if str(directory) in line]


def _check_only_read_maps(store: KvStore, directory: Path) -> None:
    """Scans (replay, compaction) unmap what they mapped: the store's files mapped now are
    its live segments, once each for the readers (segment_log.py, "Read maps"), and the
    active segment once more for the appends; nothing of a deleted file."""
    lines = _mapped_files(directory)
    assert not [line for line in lines if "(deleted)" in line]
    per_file = collections.Counter(line.split()[-1] for line in lines)
    live = {str(seg.path) for seg in store._segments.values()}
    assert set(per_file) <= live
    active = str(store._active.path)
    assert all(n == 1 or (n == 2 and name == active) for name, n in per_file.items()), per_file


def test_open_and_compaction_leave_only_the_read_maps_mapped(tmp_path: Path) -> None:
    path = tmp_path / "d"
    with KvStore.open(path, background_compaction=False) as store:
        for round_ in range(3):
            for i in range(2000):
                store.set(f"key{i}", f"value{round_}-{i}")
        store.compact()
        _check_only_read_maps(store, path)
    assert not _mapped_files(path)  # close drops every map
    assert list(path.glob("*.hint")), "compaction should have written hint files"
    with KvStore.open(path, background_compaction=False) as store:  # replays from the hints
        _check_only_read_maps(store, path)
        assert store.get("key1999") == "value2-1999"
    for hint in path.glob("*.hint"):
        hint.unlink()
    with KvStore.open(path, background_compaction=False) as store:  # replays the logs
        _check_only_read_maps(store, path)
        assert store.get("key7") == "value2-7"

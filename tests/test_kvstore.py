"""KvStore (kvs/engine/kvstore.py and its parts): behaviour, concurrency, crashes, corruption,
durability.

The course's engine tests come first, run against both engines (``KvStore`` and
``SqliteKvsEngine``); everything after them is about ``KvStore`` alone. Tests assert behaviour,
never timings; they wait for conditions with bounded loops, and every claim about crashes is
checked by killing a real process with SIGKILL.

Tests use the public API and ``KvStore.stats()`` wherever they can. The few that must reach
an internal name it through the part's module (``segment_log``, ``positions``, ...) and say
why: the marking tests look at the very objects ``get`` loads, the append-path tests force
the page-population paths of ``segment_log``, and the inlined-positions test compares the
hot paths' positions (``KvStore._position``) with ``positions.pack``.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import random
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvs import freethreading
from kvs.engine import (
    ENGINES,
    FSYNC_POLICIES,
    KvsEngine,
    check_fsync_policy,
    hints,
    positions,
    record,
    segment_log,
    segments,
    spinlock,
)
from kvs.engine import kvstore as kvstore_module
from kvs.engine.kvstore import KvStore
from kvs.errors import KeyNotFoundError, KvsError
from tests.helpers import run_threads, wait_until

REPO = Path(__file__).resolve().parent.parent
KVSTORE_LOG = "kvs.engine.kvstore"


# --------------------------------------------------------------------------- helpers
def dir_size(path: Path) -> int:
    """Total size of the files under ``path`` (files vanishing meanwhile count as 0)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def make_value(key: str, version: int) -> str:
    """A self-describing value: key, version, padding of a version-dependent length, checksum."""
    body = f"{key}:{version}:" + "p" * (version * 7 % 61)
    return f"{body}:{zlib.crc32(body.encode()):08x}"


def parse_value(key: str, value: str | None) -> int:
    """The version of a :func:`make_value` value, after checking it is whole and is ``key``'s."""
    assert value is not None, f"{key!r} is missing"
    body, _, crc = value.rpartition(":")
    assert crc == f"{zlib.crc32(body.encode()):08x}", f"torn or mixed value for {key!r}: {value!r}"
    k, version, pad = body.split(":")
    assert k == key, f"value of {k!r} returned for {key!r}"
    assert pad == "p" * (int(version) * 7 % 61)
    return int(version)


def segment_paths(path: Path) -> list[Path]:
    return [path / segments.log_name(g) for g in segments.list_segments(path)]


def record_offsets(seg: Path) -> list[tuple[int, int]]:
    """``(offset, length)`` of every record of the segment file ``seg``."""
    return [(off, n) for off, _op, _flags, _deadline, _key, n in record.scan(seg.read_bytes(), 1 << 30)]


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --------------------------------------------------------------------------- engines
def _open_kvstore(path: Path, **options: Any) -> Any:
    return KvStore.open(path, **options)


def _open_sqlite(path: Path, **options: Any) -> Any:
    # Imported here so that the KvStore tests run even while the sqlite engine is broken.
    from kvs.engine.sqlite import SqliteKvsEngine

    # The options are KvStore tuning knobs (compaction thresholds); SQLite has none of them,
    # except the durability policy, which every engine takes.
    return SqliteKvsEngine.open(path, **{k: v for k, v in options.items() if k == "fsync"})


@pytest.fixture(params=["kvstore", "sqlite"])
def open_engine(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``open_engine(path, **kvstore_options)`` opens the engine under test; every engine it
    opened is closed at the end of the test."""
    opener = _open_kvstore if request.param == "kvstore" else _open_sqlite
    opened: list[Any] = []

    def open_(path: Path, **options: Any) -> Any:
        engine = opener(path, **options)
        opened.append(engine)
        return engine

    yield open_
    for engine in opened:
        engine.close()


def _use_every_member(engine: Any, policy: str) -> None:
    assert isinstance(engine, KvsEngine)
    assert engine.name in ENGINES and ENGINES[engine.name] is type(engine)
    assert type(engine).name == engine.name  # a class attribute
    assert engine.fsync == policy
    assert len(engine) == 0
    engine.set("a", "1")
    engine.set_many([("b", "2"), ("c", "3"), ("a", "4")])
    assert (engine.get("a"), engine.get("b"), engine.get("c"), engine.get("d")) == ("4", "2", "3", None)
    assert len(engine) == 3
    engine.remove("b")
    with pytest.raises(KeyNotFoundError):
        engine.remove("b")
    assert len(engine) == 2
    engine.close()
    engine.close()  # idempotent
    for call in (lambda: engine.get("a"), lambda: engine.set("a", "1"), lambda: engine.remove("a"),
                 lambda: engine.set_many([("a", "1"), ("b", "2")]), lambda: len(engine)):
        with pytest.raises(KvsError):
            call()


def test_both_engines_implement_every_member_of_the_engine_interface(
        open_engine: Callable[..., Any], tmp_path: Path) -> None:
    """What the server and the CLI use of an engine is ``KvsEngine``, all of it: the
    runtime-checkable protocol accepts both engines, and every member works as declared."""
    for policy in FSYNC_POLICIES:
        _use_every_member(open_engine(tmp_path / policy, fsync=policy), policy)


@pytest.mark.parametrize("bad", ["sometimes", "ALWAYS", None, 1])
def test_both_engines_check_the_fsync_policy_the_same_way(
        open_engine: Callable[..., Any], tmp_path: Path, bad: object) -> None:
    with pytest.raises(KvsError, match=r"^fsync must be one of never, always, interval, not "):
        open_engine(tmp_path, fsync=bad)
    with pytest.raises(KvsError, match=r"^fsync must be one of never, always, interval, not "):
        check_fsync_policy(bad)


# =========================================================================== course ports
def test_get_stored_value(open_engine: Callable[..., Any], tmp_path: Path) -> None:
    store = open_engine(tmp_path)
    store.set("key1", "value1")
    store.set("key2", "value2")
    assert store.get("key1") == "value1"
    assert store.get("key2") == "value2"

    store.close()
    store = open_engine(tmp_path)
    assert store.get("key1") == "value1"
    assert store.get("key2") == "value2"


def test_overwrite_value(open_engine: Callable[..., Any], tmp_path: Path) -> None:
    store = open_engine(tmp_path)
    store.set("key1", "value1")
    assert store.get("key1") == "value1"
    store.set("key1", "value2")
    assert store.get("key1") == "value2"

    store.close()
    store = open_engine(tmp_path)
    assert store.get("key1") == "value2"
    store.set("key1", "value3")
    assert store.get("key1") == "value3"


def test_get_non_existent_value(open_engine: Callable[..., Any], tmp_path: Path) -> None:
    store = open_engine(tmp_path)
    store.set("key1", "value1")
    assert store.get("key2") is None

    store.close()
    store = open_engine(tmp_path)
    assert store.get("key2") is None


def test_remove_non_existent_key(open_engine: Callable[..., Any], tmp_path: Path) -> None:
    store = open_engine(tmp_path)
    with pytest.raises(KeyNotFoundError):
        store.remove("key1")


def test_remove_key(open_engine: Callable[..., Any], tmp_path: Path) -> None:
    store = open_engine(tmp_path)
    store.set("key1", "value1")
    store.remove("key1")
    assert store.get("key1") is None
    # Beyond the course: the removal persists and the key can come back.
    store.close()
    store = open_engine(tmp_path)
    assert store.get("key1") is None
    with pytest.raises(KeyNotFoundError):
        store.remove("key1")
    store.set("key1", "value2")
    assert store.get("key1") == "value2"


def test_compaction(open_engine: Callable[..., Any], tmp_path: Path) -> None:
    """Set 1000 keys over and over until the directory stops growing (the course's
    criterion); for KvStore that means the background compactor shrank it."""
    threshold = 64 * 1024
    store = open_engine(tmp_path, compaction_threshold=threshold)
    is_kvstore = isinstance(store, KvStore)
    current_size = dir_size(tmp_path)
    for it in range(1000):
        for key_id in range(1000):
            store.set(f"key{key_id}", f"{it}")
        if is_kvstore:
            stats = store.stats()
            if stats["total_bytes"] - stats["live_bytes"] >= threshold:
                # A compaction is due: wait (bounded) for the background compactor to run.
                before = stats["compactions"]
                assert wait_until(lambda s=store, n=before: s.stats()["compactions"] > n), "compactor did not run"
        new_size = dir_size(tmp_path)
        # KvStore allocates its active segment ahead of the records (in extents), so its
        # directory can keep one size for a while as it fills: only shrinking is compaction.
        if new_size > current_size or (is_kvstore and new_size == current_size):
            current_size = new_size
            continue
        # Compaction triggered.
        if is_kvstore:
            assert new_size < current_size, "a KvStore directory only stops growing by compaction"
            assert store.stats()["compactions"] >= 1
        store.close()
        store = open_engine(tmp_path, compaction_threshold=threshold)
        for key_id in range(1000):
            assert store.get(f"key{key_id}") == f"{it}"
        return
    pytest.fail("no compaction detected")


def test_concurrent_set(open_engine: Callable[..., Any], tmp_path: Path) -> None:
    store = open_engine(tmp_path)
    barrier = threading.Barrier(1001, timeout=60)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            store.set(f"key{i}", f"value{i}")
        except BaseException as exc:
            errors.append(exc)
        barrier.wait()

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(1000)]
    for t in threads:
        t.start()
    barrier.wait()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    for i in range(1000):
        assert store.get(f"key{i}") == f"value{i}"

    store.close()
    store = open_engine(tmp_path)
    for i in range(1000):
        assert store.get(f"key{i}") == f"value{i}"


def test_concurrent_get(open_engine: Callable[..., Any], tmp_path: Path) -> None:
    store = open_engine(tmp_path)
    for i in range(100):
        store.set(f"key{i}", f"value{i}")

    def readers() -> list[Callable[[], None]]:
        def reader(thread_id: int) -> None:
            for i in range(100):
                key_id = (i + thread_id) % 100
                assert store.get(f"key{key_id}") == f"value{key_id}"

        return [lambda t=t: reader(t) for t in range(100)]

    run_threads(readers())
    store.close()
    store = open_engine(tmp_path)
    run_threads(readers())


# =========================================================================== concurrency
def test_stress_readers_see_whole_fresh_values_across_compactions(stores: Callable[..., KvStore],
                                                                   tmp_path: Path) -> None:
    """Writers overwrite keys fast enough to force several background compactions; readers
    check that every value is whole, belongs to its key, and is never older than a write
    acknowledged before the read began. Some keys are never overwritten: they must never
    be missing."""
    store = stores(tmp_path, compaction_threshold=16 * 1024, max_segment_bytes=4096)
    stable = {f"stable{i}": make_value(f"stable{i}", i) for i in range(300)}
    for k, v in stable.items():
        store.set(k, v)
    writers = 2
    churn = [[f"churn{w}-{i}" for i in range(40)] for w in range(writers)]
    acked: dict[str, int] = {k: 0 for keys in churn for k in keys}
    for keys in churn:
        for k in keys:
            store.set(k, make_value(k, 0))
    all_churn = [k for keys in churn for k in keys]
    stable_keys = list(stable)
    stop = threading.Event()
    reads = [0, 0]

    def writer(keys: list[str]) -> None:
        version = 0
        while not stop.is_set():
            version += 1
            for k in keys:
                store.set(k, make_value(k, version))
                acked[k] = version  # after set returned: the write is acknowledged

    def reader(slot: int, seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        while not stop.is_set():
            k = rng.choice(all_churn)
            floor = acked[k]  # snapshot before the read begins
            assert parse_value(k, store.get(k)) >= floor, f"{k}: stale read"
            s = rng.choice(stable_keys)
            assert store.get(s) == stable[s]
            n += 1
        reads[slot] = n

    start = store.stats()["compactions"]
    workers = [lambda keys=keys: writer(keys) for keys in churn]
    workers += [lambda i=i: reader(i, 1000 + i) for i in range(2)]

    def stopper() -> None:
        try:
            wait_until(lambda: store.stats()["compactions"] - start >= 4, timeout=60.0, interval=0.01)
        finally:
            stop.set()

    run_threads([*workers, stopper], timeout=90)
    assert store.stats()["compactions"] - start >= 3
    assert all(reads), "a reader never ran"
    for k in all_churn:
        assert parse_value(k, store.get(k)) == acked[k]
    for k, v in stable.items():
        assert store.get(k) == v
    store.close()
    store = stores(tmp_path)
    for k in all_churn:
        assert parse_value(k, store.get(k)) == acked[k]
    for k, v in stable.items():
        assert store.get(k) == v


class PausingMap:
    """A read map (``segment_log.map_for_reading``) whose copies sometimes pause first, as a
    preempted reader would between its index lookup and the copy."""

    def __init__(self, view: mmap.mmap, pauses: list[int]) -> None:
        self.view = view
        self.pauses = pauses

    def __getitem__(self, where: slice) -> bytes:
        if random.random() < 0.002:
            self.pauses[0] += 1
            time.sleep(random.uniform(0.1, 0.15))  # the segment gets retired meanwhile
        return self.view[where]


@pytest.mark.parametrize("read_path", ["pread", "map"])
def test_readers_never_fail_while_segments_are_retired(stores: Callable[..., KvStore],
                                                        tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        read_path: str) -> None:
    """Back-to-back compactions close and delete segments (their descriptor numbers get
    reused by the next outputs) while readers hammer keys that are never overwritten: no
    read may fail (EBADF, wrong file, a closed map) and none may come back missing.

    Some reads pause between the index lookup and their read (as a preempted thread would),
    so that retirements really happen inside reads. Through ``pread`` (read maps refused),
    only the grace period keeps those reads from a closed or reused descriptor; through a
    read map, the map outlives the retirement of its segment (``segment_log.py``). The value
    cache is off, so that every read reaches the segment."""
    real_pread = os.pread
    pauses = [0]
    real_map = segment_log.map_for_reading

    def pausing_map(fd: int, length: int) -> Any:
        return PausingMap(real_map(fd, length), pauses)

    def no_map(fd: int, length: int) -> Any:
        raise OSError(errno.ENOMEM, "refused by the test")

    monkeypatch.setattr(segment_log, "map_for_reading", no_map if read_path == "pread" else pausing_map)

    def preempted_pread(fd: int, n: int, offset: int) -> bytes:
        if random.random() < 0.002:
            pauses[0] += 1
            inode = os.fstat(fd).st_ino  # the file the read's position belongs to
            # Longer than a compaction (about 45 ms here, mostly fsyncs): the segment of the
            # position this read loaded is then retired during the pause.
            time.sleep(random.uniform(0.1, 0.15))
            # A reused descriptor number can even hold identical bytes (compaction copies
            # records in order): check the file itself, not only the data.
            assert os.fstat(fd).st_ino == inode, "the descriptor was closed and reused during a read"
        return real_pread(fd, n, offset)

    # get's os.pread (kvstore._pread: the read between the lookup and the checks).
    monkeypatch.setattr(kvstore_module, "_pread", preempted_pread)
    store = stores(tmp_path, max_segment_bytes=2048, background_compaction=False, cache_entries=0)
    stable = {f"s{i:04d}": f"stable value {i} " + "s" * (i % 50) for i in range(400)}
    for k, v in stable.items():
        store.set(k, v)
    stable_keys = list(stable)
    stop = threading.Event()
    rounds = 12
    reads = [0, 0, 0]

    def churner() -> None:
        # Bounded: without background compaction every segment it fills stays open until
        # the next compaction, and where fsync is slow (compactions fsync their outputs) an
        # unbounded churner opened thousands of segments per round, past a 1024-descriptor
        # limit. A few dozen segments per round are plenty to retire.
        i = 0
        while not stop.is_set():
            store.set(f"c{i % 64}", f"churn {i}")
            i += 1
            if i % 64 == 0 and store.stats()["segments"] > 64:
                done = store.stats()["compactions"]
                wait_until(lambda n=done: stop.is_set() or store.stats()["compactions"] > n, timeout=60)

    def compactor() -> None:
        try:
            for _ in range(rounds):
                store.compact()
        finally:
            stop.set()

    def reader(slot: int) -> None:
        # Keys decoded in this thread, as a server's pool thread would.
        keys = [k.encode().decode() for k in stable_keys]
        n = 0
        while not stop.is_set() or n == 0:
            for k in keys:
                assert store.get(k) == stable[k]
            n += 1
        reads[slot] = n

    run_threads([churner, compactor, *[lambda i=i: reader(i) for i in range(3)]], timeout=90)
    assert store.stats()["compactions"] == rounds
    assert all(reads) and pauses[0]
    for k, v in stable.items():
        assert store.get(k) == v


# =========================================================================== crashes
CHILD_WRITER = r"""
import sys
from kvs.engine.kvstore import KvStore

path, keyspace, threshold, segment = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
store = KvStore.open(path, compaction_threshold=threshold, max_segment_bytes=segment)
out = sys.stdout
i = 0
while True:
    key = f"k{i % keyspace}"
    store.set(key, f"{key}:{i}:" + "x" * (i % 37))
    out.write(f"{key} {i}\n")
    out.flush()
    i += 1
"""


def _start_writer(path: Path, keyspace: int, threshold: int, segment: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD_WRITER, str(path), str(keyspace), str(threshold), str(segment)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env(), cwd=str(REPO),
    )


def _collect_acks(proc: subprocess.Popen[str], acks: list[tuple[str, int]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.endswith("\n"):  # a line cut by the kill was not acknowledged in full
            key, i = line.split()
            acks.append((key, int(i)))


def _check_acknowledged(path: Path, acks: list[tuple[str, int]], context: str) -> None:
    assert acks, f"{context}: the writer acknowledged nothing"
    last: dict[str, int] = {}
    for key, i in acks:
        last[key] = i
    newest = acks[-1][1]
    with KvStore.open(path, background_compaction=False) as store:
        for key, i in last.items():
            value = store.get(key)
            assert value is not None, f"{context}: acknowledged {key} (write {i}) is missing"
            k, found, pad = value.split(":")
            assert k == key and pad == "x" * (int(found) % 37), f"{context}: bad value {value!r}"
            # The kill may land between a set and its report: one newer write is allowed.
            assert i <= int(found) <= newest + 1, f"{context}: {key} has write {found}, acked {i}"
        assert len(store) <= len(last) + 1


@pytest.mark.parametrize("round_", range(4))
def test_kill_9_loses_no_acknowledged_write(tmp_path: Path, round_: int) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_after = rng.randrange(50, 4000)
    proc = _start_writer(tmp_path, keyspace=1500, threshold=4 * 1024 * 1024, segment=64 * 1024 * 1024)
    acks: list[tuple[str, int]] = []
    try:
        assert proc.stdout is not None
        while len(acks) < kill_after:
            line = proc.stdout.readline()
            if not line:
                pytest.fail(f"writer died: {proc.stderr.read() if proc.stderr else ''}")
            key, i = line.split()
            acks.append((key, int(i)))
        proc.send_signal(signal.SIGKILL)
        _collect_acks(proc, acks)  # lines written before the kill
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    _check_acknowledged(tmp_path, acks, f"seed {seed}, killed after {kill_after} acks")


@pytest.mark.parametrize("round_", range(3))
def test_kill_9_during_background_compaction(tmp_path: Path, round_: int) -> None:
    """Kill the writer while a compaction's outputs (``*.tmp``) or its marker exist."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    min_acks = rng.randrange(200, 3000)
    proc = _start_writer(tmp_path, keyspace=300, threshold=8 * 1024, segment=2048)
    acks: list[tuple[str, int]] = []
    collector = threading.Thread(target=_collect_acks, args=(proc, acks), daemon=True)
    collector.start()
    seen: list[str] = []

    def compaction_in_progress() -> bool:
        if len(acks) < min_acks or proc.poll() is not None:
            return proc.poll() is not None
        try:
            names = os.listdir(tmp_path)
        except FileNotFoundError:
            return False
        seen.extend(n for n in names if n.endswith(".tmp") or n.endswith(".done"))
        return bool(seen)

    try:
        caught = wait_until(compaction_in_progress, timeout=30.0, interval=0)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
        collector.join(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    assert caught and seen, "never saw a compaction in progress"
    _check_acknowledged(tmp_path, acks, f"seed {seed}, killed after {len(acks)} acks seeing {seen}")


# =========================================================================== corruption
def _fill(path: Path, n: int, **options: Any) -> dict[str, str]:
    data = {f"key{i:05d}": f"value {i} " + "v" * (i % 40) for i in range(n)}
    with KvStore.open(path, background_compaction=False, **options) as store:
        for k, v in data.items():
            store.set(k, v)
    return data


def test_truncated_tail_is_cut_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _fill(tmp_path, 50)
    newest = segment_paths(tmp_path)[-1]
    size = newest.stat().st_size
    os.truncate(newest, size - 3)
    with caplog.at_level(logging.WARNING, logger=KVSTORE_LOG):
        store = KvStore.open(tmp_path, background_compaction=False)
    try:
        assert any(r.levelno == logging.WARNING and "torn" in r.getMessage() for r in caplog.records)
        last = list(data)[-1]
        assert store.get(last) is None  # the record that lost its end
        for k in list(data)[:-1]:
            assert store.get(k) == data[k]
        store.set("after", "the cut")  # appends after the last good record
    finally:
        store.close()
    with KvStore.open(tmp_path, background_compaction=False) as store:
        assert store.get("after") == "the cut"
        assert store.get(list(data)[0]) == data[list(data)[0]]


def test_flipped_byte_in_tail_record_is_cut_with_a_warning(tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    data = _fill(tmp_path, 50)
    newest = segment_paths(tmp_path)[-1]
    off, n = record_offsets(newest)[-1]
    flip_byte(newest, off + n - 6)  # inside the last record's value
    with caplog.at_level(logging.WARNING, logger=KVSTORE_LOG):
        store = KvStore.open(tmp_path, background_compaction=False)
    try:
        assert any(r.levelno == logging.WARNING and f"offset {off}" in r.getMessage() for r in caplog.records)
        assert store.get(list(data)[-1]) is None
        for k in list(data)[:-1]:
            assert store.get(k) == data[k]
    finally:
        store.close()


def test_space_allocated_ahead_is_cut_quietly_after_an_unclean_exit(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """The active segment is allocated ahead of its records; a process that exits without
    closing the store leaves that zero-filled space, which the next open cuts without a
    warning (it is not damage), keeping every record."""
    script = (
        "import os, sys\n"
        "from kvs.engine.kvstore import KvStore\n"
        "store = KvStore.open(sys.argv[1], background_compaction=False)\n"
        "for i in range(300):\n"
        "    store.set(f'key{i}', f'value {i}')\n"
        "os._exit(0)  # no close: like a kill, the allocated space stays\n"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=child_env(), check=True, timeout=60)
    newest = segment_paths(tmp_path)[-1]
    records_end = 0
    with pytest.raises(record.CorruptRecord, match="unknown operation 0"):
        for off, _op, _flags, _deadline, _key, n in record.scan(newest.read_bytes(), 1 << 30):
            records_end = off + n
    assert newest.stat().st_size > records_end  # the zero-filled space is there
    with caplog.at_level(logging.DEBUG, logger=KVSTORE_LOG):
        store = KvStore.open(tmp_path, background_compaction=False)
    try:
        assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert any("allocated ahead" in r.getMessage() for r in caplog.records)
        assert newest.stat().st_size == records_end
        for i in range(300):
            assert store.get(f"key{i}") == f"value {i}"
        store.set("after", "reopen")
    finally:
        store.close()
    with KvStore.open(tmp_path, background_compaction=False) as store:
        assert store.get("after") == "reopen" and store.get("key299") == "value 299"
    for seg in segment_paths(tmp_path):  # closed cleanly: every file ends with its last record
        assert sum(n for _off, n in record_offsets(seg)) == seg.stat().st_size


def test_a_full_disk_fails_the_write_and_stores_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Space for the active segment is allocated before anything is copied into it: when
    the disk is full the write raises KvsError, nothing is stored, and the store keeps
    working once there is space again."""
    with KvStore.open(tmp_path, background_compaction=False, max_segment_bytes=4096) as store:
        store.set("before", "the disk filled")
        real = os.posix_fallocate

        def full(fd: int, offset: int, length: int) -> None:
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "posix_fallocate", full)
        with pytest.raises(KvsError, match="No space left"):
            for i in range(1000):  # until the segment needs more space
                store.set(f"key{i}", "v" * 100)
        failed_at = i
        assert store.get(f"key{failed_at}") is None
        monkeypatch.setattr(os, "posix_fallocate", real)
        store.set(f"key{failed_at}", "stored")
    with KvStore.open(tmp_path, background_compaction=False) as store:
        assert store.get("before") == "the disk filled"
        assert store.get(f"key{failed_at}") == "stored"
        assert all(store.get(f"key{i}") == "v" * 100 for i in range(failed_at))


def test_writes_ask_whether_a_compaction_is_due_rarely_and_never_late(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Live data far past twice compaction_threshold: stale bytes pass the threshold long
    before they are compaction_ratio of the log. Writes must not ask whether a compaction
    is due on every write from then on (a method call under the append lock), and the
    compactor must still be woken by the very write that makes the compaction due."""
    store = KvStore.open(tmp_path, background_compaction=False, compaction_threshold=4096,
                         compaction_ratio=0.5)
    for i in range(2000):
        store.set(f"live{i:05d}", "v" * 100)
    real_due = KvStore._compaction_due
    asked = [0]

    def counting_due(self: KvStore) -> bool:
        asked[0] += 1
        return real_due(self)

    monkeypatch.setattr(KvStore, "_compaction_due", counting_due)
    writes = 0
    while not store._compaction_wanted.is_set():  # compaction.py's trigger: what is tested here
        assert not real_due(store), "a compaction was due and nobody woke the compactor"
        store.set(f"live{writes % 100:05d}", f"overwritten {writes} " + "w" * 90)
        writes += 1
        assert writes < 20000
    assert real_due(store)
    assert writes > 1000 and asked[0] <= 30, (writes, asked[0])
    store.compact()  # and after a compaction the writes ask again
    assert not real_due(store)
    store.close()


def test_a_failing_roll_over_keeps_writing_into_the_active_segment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Out of file descriptors, no new segment can be created: writes go on into the active
    segment past max_segment_bytes, the error is logged once, the roll-over is retried once
    per further segment of data (not per write), and it works again once descriptors are
    back. Nothing written meanwhile is lost, before or after a reopen."""
    real_open = os.open
    attempts = [0]
    exhausted = threading.Event()

    def open_without_descriptors(path: Any, flags: int, mode: int = 0o777, **kw: Any) -> int:
        if exhausted.is_set() and str(path).endswith(".log"):
            attempts[0] += 1
            raise OSError(24, "Too many open files", str(path))
        return real_open(path, flags, mode, **kw)

    segment_bytes = 4096
    data: dict[str, str] = {}
    with KvStore.open(tmp_path, background_compaction=False, max_segment_bytes=segment_bytes) as store:
        for i in range(100):
            data[f"before{i}"] = f"v{i} " + "b" * 80
            store.set(f"before{i}", data[f"before{i}"])
        segments_before = store.stats()["segments"]
        monkeypatch.setattr(os, "open", open_without_descriptors)
        exhausted.set()
        with caplog.at_level(logging.ERROR, logger=KVSTORE_LOG):
            for i in range(400):  # about 40 KB: ten segments' worth
                data[f"during{i}"] = f"v{i} " + "d" * 90
                store.set(f"during{i}", data[f"during{i}"])
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert "Too many open files" in errors[0].getMessage()
        assert "stays the active segment" in errors[0].getMessage()
        assert store.stats()["segments"] == segments_before
        written = sum(len(k) + len(v) for k, v in data.items() if k.startswith("during"))
        assert 1 <= attempts[0] <= written // segment_bytes + 1
        assert all(store.get(k) == v for k, v in data.items())
        exhausted.clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=KVSTORE_LOG):
            for i in range(200):
                data[f"after{i}"] = f"v{i} " + "a" * 90
                store.set(f"after{i}", data[f"after{i}"])
        assert any("roll-over works again" in r.getMessage() for r in caplog.records)
        assert store.stats()["segments"] > segments_before + 1
        assert all(store.get(k) == v for k, v in data.items())
    with KvStore.open(tmp_path, background_compaction=False, max_segment_bytes=segment_bytes) as store:
        assert all(store.get(k) == v for k, v in data.items())


def test_a_failed_compaction_raises_kvs_error_and_loses_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compaction that fails half-way (here: no descriptor for a hint file) raises a
    KvsError naming the cause; every record stays readable, the next compaction succeeds,
    leaves no temporary file behind, and a reopen finds everything."""
    store = KvStore.open(tmp_path, background_compaction=False, max_segment_bytes=2048)
    expected: dict[str, str] = {}
    for rnd in range(4):
        for i in range(150):
            expected[f"k{i}"] = f"value {i} round {rnd}"
            store.set(f"k{i}", expected[f"k{i}"])
    real_write = hints.write_hint_file

    def no_descriptor(path: str, *args: Any) -> None:
        raise OSError(24, "Too many open files", path)

    monkeypatch.setattr(hints, "write_hint_file", no_descriptor)
    with pytest.raises(KvsError, match=r"compaction of .* failed: Too many open files .*hint\.tmp"):
        store.compact()
    assert store.stats()["compactions"] == 0
    assert all(store.get(k) == v for k, v in expected.items())
    monkeypatch.setattr(hints, "write_hint_file", real_write)
    for i in range(0, 150, 3):
        expected[f"k{i}"] = f"value {i} after the failure"
        store.set(f"k{i}", expected[f"k{i}"])
    store.compact()
    assert store.stats()["compactions"] == 1
    assert all(store.get(k) == v for k, v in expected.items())
    assert not list(tmp_path.glob("*.tmp"))
    store.close()
    with KvStore.open(tmp_path, background_compaction=False) as store:
        assert all(store.get(k) == v for k, v in expected.items())
        assert len(store) == len(expected)


def test_flipped_byte_in_middle_of_newest_segment_is_an_error(tmp_path: Path) -> None:
    """Damage followed by valid records is not a torn write: refusing beats dropping data."""
    _fill(tmp_path, 50)
    newest = segment_paths(tmp_path)[-1]
    off, n = record_offsets(newest)[10]
    flip_byte(newest, off + n - 6)
    with pytest.raises(KvsError) as info:
        KvStore.open(tmp_path)
    assert str(newest) in str(info.value) and f"offset {off}" in str(info.value)


def test_flipped_byte_in_old_segment_is_an_error(tmp_path: Path) -> None:
    _fill(tmp_path, 200, max_segment_bytes=1024)
    paths = segment_paths(tmp_path)
    assert len(paths) >= 3
    old = paths[1]  # sealed, not the newest
    off, n = record_offsets(old)[2]
    flip_byte(old, off + n - 6)
    with pytest.raises(KvsError) as info:
        KvStore.open(tmp_path)
    message = str(info.value)
    assert str(old) in message and f"offset {off}" in message
    # The failed open released everything: the directory can be opened again (and fails again).
    with pytest.raises(KvsError, match="corruption"):
        KvStore.open(tmp_path)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_hint_file_falls_back_to_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                 damage: str) -> None:
    data: dict[str, str] = {}
    with KvStore.open(tmp_path, background_compaction=False, max_segment_bytes=4096) as store:
        for rnd in range(3):
            for i in range(200):
                data[f"key{i}"] = f"value {i} round {rnd}"
                store.set(f"key{i}", data[f"key{i}"])
        store.remove("key7")
        del data["key7"]
        store.compact()
        store.set("key1", "after compaction")
        data["key1"] = "after compaction"
    hint_files = sorted(tmp_path.glob("*.hint"))
    assert hint_files, "compaction wrote no hint file"
    victim = hint_files[0]
    if damage == "flip":
        flip_byte(victim, victim.stat().st_size // 2)
    else:
        os.truncate(victim, victim.stat().st_size - 5)
    with caplog.at_level(logging.WARNING, logger=KVSTORE_LOG):
        store = KvStore.open(tmp_path, background_compaction=False)
    try:
        assert any(r.levelno == logging.WARNING and victim.name in r.getMessage() for r in caplog.records)
        assert sorted(store.keys()) == sorted(data)
        for k, v in data.items():
            assert store.get(k) == v
        assert store.get("key7") is None
    finally:
        store.close()


def test_hint_files_are_used_after_compaction(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with KvStore.open(tmp_path, background_compaction=False) as store:
        for i in range(300):
            store.set(f"k{i}", f"v{i}")
            store.set(f"k{i}", f"w{i}")
        store.compact()
        assert store.stats()["total_bytes"] < 2 * store.stats()["live_bytes"]
    assert list(tmp_path.glob("*.hint"))
    assert not list(tmp_path.glob("compaction-*")) and not list(tmp_path.glob("*.tmp"))
    with caplog.at_level(logging.WARNING, logger=KVSTORE_LOG):
        with KvStore.open(tmp_path) as store:
            assert [store.get(f"k{i}") for i in range(300)] == [f"w{i}" for i in range(300)]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_interrupted_compaction_leftovers_are_recovered(tmp_path: Path) -> None:
    """A ``*.tmp`` output is dropped; a marker means the inputs it names can go."""
    data = _fill(tmp_path, 100, max_segment_bytes=1024)
    (tmp_path / "0000000099.00001.log.tmp").write_bytes(b"half-written output")
    with KvStore.open(tmp_path, background_compaction=False) as store:
        assert {k: store.get(k) for k in data} == data
    assert not list(tmp_path.glob("*.tmp"))
    # Simulate a crash after the marker of a compaction was written, before its inputs were
    # deleted: compact, then put the (copied) inputs back beside the outputs with the marker.
    before = {p.name: p.read_bytes() for p in segment_paths(tmp_path)}
    with KvStore.open(tmp_path, background_compaction=False) as store:
        store.compact()
        major = max(segments.major_of(g) for g in segments.list_segments(tmp_path) if segments.minor_of(g))
    for name, content in before.items():
        (tmp_path / name).write_bytes(content)
    (tmp_path / segments.marker_name(major)).write_bytes(b"")
    with KvStore.open(tmp_path, background_compaction=False) as store:
        assert {k: store.get(k) for k in data} == data
    assert not list(tmp_path.glob("compaction-*"))
    assert all(g >= segments.gen(major, 1) for g in segments.list_segments(tmp_path))


# =========================================================================== bad input
@pytest.mark.parametrize("bad", [None, 1, 1.5, ["list"], {"dict": 1}])
def test_wrong_types_raise_type_error(stores: Callable[..., KvStore], tmp_path: Path, bad: object) -> None:
    store = stores(tmp_path)
    store.set("k", "v")
    with pytest.raises(TypeError):
        store.get(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.set(bad, "v")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.set("k", bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.remove(bad)  # type: ignore[arg-type]
    assert store.get("k") == "v" and len(store) == 1


def test_str_subclass_is_accepted(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    class S(str):
        pass

    store = stores(tmp_path)
    store.set(S("k"), S("v"))
    assert store.get(S("k")) == "v" and store.get("k") == "v"
    assert all(type(k) is str for k in store.keys())
    store.remove(S("k"))
    assert store.get("k") is None


def test_lone_surrogates_are_rejected_and_nothing_is_written(stores: Callable[..., KvStore],
                                                             tmp_path: Path) -> None:
    store = stores(tmp_path, background_compaction=False)
    store.set("k", "v")
    before = store.stats()
    for call in (lambda: store.set("\ud800", "v"), lambda: store.set("k2", "a\udfffb"),
                 lambda: store.get("\ud800"), lambda: store.remove("\ud800")):
        with pytest.raises(KvsError, match="Unicode"):
            call()
    assert store.stats() == before
    assert store.get("k2") is None and list(store.keys()) == ["k"]
    store.close()
    store = stores(tmp_path)
    assert list(store.keys()) == ["k"]


def test_oversized_keys_and_values_are_rejected_and_nothing_is_written(
        stores: Callable[..., KvStore], tmp_path: Path) -> None:
    store = stores(tmp_path, max_key_bytes=16, max_value_bytes=32, background_compaction=False)
    store.set("k" * 16, "v" * 32)  # exactly at the limits
    store.set("é" * 8, "€" * 10)   # limits are in UTF-8 bytes: 16 and 30
    before = store.stats()
    with pytest.raises(KvsError, match="limit"):
        store.set("k" * 17, "v")
    with pytest.raises(KvsError, match="limit"):
        store.set("é" * 9, "v")  # 9 characters, 18 bytes
    with pytest.raises(KvsError, match="limit"):
        store.set("short", "v" * 33)
    with pytest.raises(KvsError, match="limit"):
        store.get("k" * 17)
    with pytest.raises(KvsError, match="limit"):
        store.remove("k" * 17)
    assert store.stats() == before
    assert store.get("short") is None
    store.close()
    store = stores(tmp_path, max_key_bytes=16, max_value_bytes=32)
    assert sorted(store.keys()) == sorted(["k" * 16, "é" * 8])


def test_use_after_close_raises_and_close_is_idempotent(tmp_path: Path) -> None:
    store = KvStore.open(tmp_path)
    store.set("k", "v")
    store.close()
    store.close()
    for call in (lambda: store.get("k"), lambda: store.get("absent"), lambda: store.set("k", "v"),
                 lambda: store.set("new", "v"), lambda: store.remove("k"), lambda: store.remove("absent"),
                 lambda: len(store), lambda: list(store.keys()), store.stats, store.compact,
                 lambda: "k" in store, lambda: store.scan(0), store.clear, lambda: store.ttl("k"),
                 lambda: store.expire("k", 5), lambda: store.update("k", str.upper),
                 lambda: store.set_many([("a", "1"), ("b", "2")]), store.purge_expired):
        with pytest.raises(KvsError, match="closed"):
            call()
    with KvStore.open(tmp_path) as again:  # close released the directory
        assert again.get("k") == "v"
    assert again._closed


def test_second_open_in_same_process_fails(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    store = stores(tmp_path)
    with pytest.raises(KvsError, match="already open"):
        KvStore.open(tmp_path)
    store.set("k", "v")  # the failed open disturbed nothing
    assert store.get("k") == "v"


def test_second_open_from_another_process_fails(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    stores(tmp_path)
    script = (
        "import sys\n"
        "from kvs.engine.kvstore import KvStore\n"
        "from kvs.errors import KvsError\n"
        "try:\n"
        "    KvStore.open(sys.argv[1])\n"
        "except KvsError as exc:\n"
        "    print('KvsError:', exc)\n"
        "else:\n"
        "    print('opened')\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                         env=child_env(), cwd=str(REPO), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("KvsError:") and "already open" in out.stdout


def test_directory_of_the_sqlite_engine_is_refused(tmp_path: Path) -> None:
    from kvs.engine.sqlite import SqliteKvsEngine

    with SqliteKvsEngine.open(tmp_path / "db") as engine:
        engine.set("k", "v")
    with pytest.raises(KvsError, match="created by engine 'sqlite'"):
        KvStore.open(tmp_path / "db")


def test_directory_marked_sqlite_is_refused(tmp_path: Path) -> None:
    (tmp_path / "kvs-meta.json").write_text(json.dumps({"engine": "sqlite", "format": 1}))
    with pytest.raises(KvsError, match="created by engine 'sqlite'"):
        KvStore.open(tmp_path)
    assert not segment_paths(tmp_path)  # nothing was created


def test_kvstore_directory_has_its_meta_file(tmp_path: Path) -> None:
    with KvStore.open(tmp_path):
        pass
    assert json.loads((tmp_path / "kvs-meta.json").read_text()) == {"engine": "kvs", "format": 2}


@pytest.mark.parametrize("options", [{"fsync": "sometimes"}, {"fsync": "ALWAYS"}, {"stripes": 3},
                                     {"fsync_interval": 0}, {"max_segment_bytes": 10},
                                     {"compaction_ratio": 2.0}, {"max_key_bytes": 0}])
def test_bad_options_raise_kvs_error(tmp_path: Path, options: dict[str, Any]) -> None:
    with pytest.raises(KvsError):
        KvStore.open(tmp_path, **options)
    with KvStore.open(tmp_path):  # the directory was not left locked
        pass


# =========================================================================== durability
def test_fsync_always_with_concurrent_writers(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    """8 writers share fsyncs (group commit); each write is durable when ``set`` returns."""
    store = stores(tmp_path, fsync="always", background_compaction=False)

    def writer(w: int) -> None:
        for i in range(40):
            key = f"w{w}-{i}"
            store.set(key, f"value {w} {i}")
            # Acknowledged => fsynced: the record ends at or below its segment's durable mark
            # (the active segment's: the store never rolls over, checked below).
            pos = store._position(key)
            assert pos is not None
            _fd, offset, length = positions.unpack(pos)
            assert store.stats()["active_durable_bytes"] >= offset + length
        store.remove(f"w{w}-0")

    run_threads([lambda w=w: writer(w) for w in range(8)])
    assert store.stats()["segments"] == 1
    store.close()
    store = stores(tmp_path, fsync="always")
    for w in range(8):
        assert store.get(f"w{w}-0") is None
        for i in range(1, 40):
            assert store.get(f"w{w}-{i}") == f"value {w} {i}"


def test_fsync_interval_syncs_in_the_background(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    store = stores(tmp_path, fsync="interval", fsync_interval=0.02, background_compaction=False)
    for i in range(100):
        store.set(f"k{i}", f"v{i}")
    assert store.stats()["active_segment_bytes"] > 0
    assert wait_until(lambda: (s := store.stats())["active_durable_bytes"] == s["active_segment_bytes"], timeout=20)
    assert store.stats()["segments"] == 1  # the bytes that became durable are those written
    store.close()
    store = stores(tmp_path, fsync="interval")
    assert [store.get(f"k{i}") for i in range(100)] == [f"v{i}" for i in range(100)]


def test_unknown_fsync_policy_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KvsError, match="fsync"):
        KvStore.open(tmp_path, fsync="sometimes")  # type: ignore[arg-type]


# =========================================================================== free threading
def _require_sharing() -> None:
    if sysconfig.get_config_var("Py_GIL_DISABLED") == 1 and sys.version_info[:2] == (3, 13):
        assert freethreading.LAYOUT_KNOWN, "3.13t object layout not recognized"
    if not freethreading.LAYOUT_KNOWN:
        pytest.skip("object sharing flag only exists on free-threaded 3.13")
    if not freethreading.MARKING_ENABLED:
        pytest.skip("marking is turned off (KVS_MARK_SHARED=0): no marks to check")


def _unshareable_in_owner(store: KvStore) -> list[str]:
    """Stored keys and positions, owned by the calling thread, that are not shareable.
    Must run in the owning thread: another thread taking a reference would raise the
    shared count itself and make the check vacuous. (Reaches the index, ``_stripes``: the
    marks are on the very objects stored there.)"""
    bad = []
    for stripe in store._stripes:
        for key, pos in list(stripe.items()):
            if not freethreading.is_shareable(key):
                bad.append(f"key {key!r}")
            if not freethreading.is_shareable(pos):
                bad.append(f"position of {key!r}")
    return bad


def test_value_cache_entries_are_shareable_across_live_threads(stores: Callable[..., KvStore],
                                                               tmp_path: Path) -> None:
    """A reader fills the value cache with objects it made (key copy, value, entry tuple):
    each is marked shareable before the dict store publishes it, so other threads' reads of
    the cache stay on the lock-free path while that reader lives."""
    _require_sharing()
    store = stores(tmp_path, background_compaction=False)
    for i in range(300):
        store.set(f"key{i}", f"value{i}" * 3)
    store.set("one", "v")  # a one-character value: an immortal singleton, left alone
    results: dict[str, Any] = {}
    release = threading.Event()

    def reader() -> None:
        for _ in range(2):  # a value is admitted on its second read (value_cache.py)
            for i in range(300):
                assert store.get(f"key{i}") == f"value{i}" * 3
            assert store.get("one") == "v"
        bad = []
        for cache in store._caches:  # checked here, in the owner (see _unshareable_in_owner)
            for key, entry in list(cache.entries.items()):
                bad += [repr(o) for o in (key, entry, entry[1]) if not freethreading.is_shareable(o)]
        results["cached"] = store.stats()["cache_entries"]
        results["bad"] = bad  # last: the test waits for it
        release.wait(30)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    try:
        assert wait_until(lambda: "bad" in results)
        # A key whose tag slot another key took meanwhile may be missing (value_cache.py).
        assert results["cached"] >= 295 and results["bad"] == []
    finally:
        release.set()
        t.join(10)


def test_index_objects_are_shareable_across_live_threads(stores: Callable[..., KvStore],
                                                         tmp_path: Path) -> None:
    _require_sharing()
    store = stores(tmp_path, background_compaction=False)
    release = threading.Event()
    results: dict[str, Any] = {}

    def writer() -> None:
        for i in range(500):
            store.set(f"key{i}", f"value{i}")
        for i in range(0, 500, 3):
            store.set(f"key{i}", f"again{i}")  # overwrites keep the stored key object
        results["writer"] = _unshareable_in_owner(store)
        control = "".join(["not", "shared", str(len(results))])  # made here, never marked
        results["control"] = freethreading.is_shareable(control)
        results["ready"] = True
        release.wait(30)  # stays alive while the checks below run

    def compactor() -> None:
        store.compact()  # the compactor made the new positions: it owns them
        results["compactor"] = _unshareable_in_owner(store)
        results["compacted"] = True
        release.wait(30)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    assert wait_until(lambda: results.get("ready", False))
    try:
        assert results["writer"] == []
        assert results["control"] is False, "is_shareable cannot tell: the test would be vacuous"
        # What get() loads from the store object (owned by the thread that opened it): the
        # attributes themselves, since the marks are on those objects.
        for obj in (store, store._stripes, *store._stripes, store._reader_local, store._readers,
                    store._mask, store._max_key):
            assert freethreading.is_shareable(obj), obj
        c = threading.Thread(target=compactor, daemon=True)
        c.start()
        assert wait_until(lambda: results.get("compacted", False))
        assert results["compactor"] == []
        # Reads from a third thread, with keys it decoded itself, see the writer's data.
        got: list[str | None] = []
        reader = threading.Thread(target=lambda: got.extend(
            store.get(f"key{i}".encode().decode()) for i in range(500)))
        reader.start()
        reader.join(30)
        assert got == [f"again{i}" if i % 3 == 0 else f"value{i}" for i in range(500)]
    finally:
        release.set()
        t.join(30)


def test_gil_stays_disabled_with_the_engine_loaded() -> None:
    if sysconfig.get_config_var("Py_GIL_DISABLED") != 1:
        pytest.skip("not a free-threaded build")
    if os.environ.get("PYTHON_GIL") == "1":
        pytest.skip("PYTHON_GIL=1: the GIL was enabled on purpose")
    import kvs.engine  # noqa: F401

    assert sys._is_gil_enabled() is False


# =========================================================================== misc behaviour
def test_keys_len_stats_and_remove(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    store = stores(tmp_path, background_compaction=False)
    for i in range(20):
        store.set(f"k{i}", "x" * i)
    store.remove("k3")
    assert len(store) == 19 and sorted(store.keys()) == sorted(f"k{i}" for i in range(20) if i != 3)
    stats = store.stats()
    assert stats["keys"] == 19 and stats["live_bytes"] <= stats["total_bytes"]
    assert stats["live_bytes"] == sum(record.OVERHEAD + len(f"k{i}") + i for i in range(20) if i != 3)


def test_empty_and_unicode_keys_and_values(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    pairs = {"": "empty key", "e": "", "ключ": "значение", "🔑": "🎉" * 100, "nul\x00key": "nul\x00value"}
    store = stores(tmp_path)
    for k, v in pairs.items():
        store.set(k, v)
    store.close()
    store = stores(tmp_path)
    assert {k: store.get(k) for k in pairs} == pairs
    store.compact()
    assert {k: store.get(k) for k in pairs} == pairs


def test_compaction_keeps_every_live_key_and_drops_removed_ones(stores: Callable[..., KvStore],
                                                                tmp_path: Path) -> None:
    store = stores(tmp_path, background_compaction=False, max_segment_bytes=2048)
    for rnd in range(5):
        for i in range(200):
            store.set(f"k{i}", f"v{i}-{rnd}")
    for i in range(0, 200, 2):
        store.remove(f"k{i}")
    before = store.stats()
    store.compact()
    after = store.stats()
    assert after["total_bytes"] == after["live_bytes"] == before["live_bytes"]
    assert after["compactions"] == before["compactions"] + 1
    expected = {f"k{i}": (None if i % 2 == 0 else f"v{i}-4") for i in range(200)}
    assert {k: store.get(k) for k in expected} == expected
    store.close()
    store = stores(tmp_path)
    assert {k: store.get(k) for k in expected} == expected
    assert len(store) == 100


def test_reopening_with_smaller_limits_keeps_existing_records(tmp_path: Path) -> None:
    """Size limits apply to new writes; records already in the log stay readable (a smaller
    limit must not make them look corrupt, let alone get cut off as a torn tail)."""
    big = "b" * 5000
    small = {"max_key_bytes": 20, "max_value_bytes": 100}
    with KvStore.open(tmp_path, background_compaction=False, max_segment_bytes=8192) as store:
        store.set("old", "small")
        store.set("big-sealed", big)
        store.set("filler", "f" * 4000)  # rolls over: the records above are in a sealed segment
        store.set("k", "v")
        store.set("big-newest", big)  # the last record of the newest segment
        assert store.stats()["segments"] == 2
    with KvStore.open(tmp_path, background_compaction=False, **small) as store:
        assert store.get("big-sealed") == big and store.get("big-newest") == big
        assert store.get("old") == "small" and store.get("k") == "v"
        store.compact()  # compaction copies them too
        assert store.get("big-sealed") == big and store.get("big-newest") == big
        with pytest.raises(KvsError, match="limit"):
            store.set("new", big)
    with KvStore.open(tmp_path, background_compaction=False, **small) as store:
        assert store.get("big-sealed") == big and store.get("big-newest") == big


# ----------------------------------------------------------------------------- value cache
def test_cached_values_never_outlive_their_record(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    store = stores(tmp_path, background_compaction=False)
    store.set("k", "one")
    assert store.get("k") == "one"  # now cached
    assert store.get("k") == "one"  # served from the cache
    store.set("k", "two")
    assert store.get("k") == "two"
    store.remove("k")
    assert store.get("k") is None
    store.set("k", "three")
    assert store.get("k") == "three"
    store.compact()  # moves the record: the cached entry's position is stale
    assert store.get("k") == "three"
    store.set("k", "four")
    assert store.get("k") == "four"


def test_cache_can_be_disabled_and_is_bounded(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    off = stores(tmp_path / "off", cache_entries=0)
    off.set("k", "v")
    assert off.get("k") == "v" and off.get("k") == "v"
    assert off.stats()["cache_entries"] == 0
    small = stores(tmp_path / "small", cache_entries=256, stripes=16)
    for i in range(2000):
        small.set(f"key{i}", f"value{i}")
    for i in range(2000):
        assert small.get(f"key{i}") == f"value{i}"
    assert small.stats()["cache_entries"] <= 256 + 16
    big = stores(tmp_path / "big", cache_value_bytes=10)
    big.set("k", "x" * 11)
    assert big.get("k") == "x" * 11 and big.stats()["cache_entries"] == 0


def test_cache_under_concurrent_overwrites_is_never_stale(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    """Readers hit the cache while a writer overwrites: a read never returns a version older
    than one acknowledged before it started."""
    store = stores(tmp_path, cache_entries=64, stripes=4)
    keys = [f"k{i}" for i in range(16)]
    acked = {k: 0 for k in keys}
    for k in keys:
        store.set(k, make_value(k, 0))
    stop = threading.Event()
    errors: list[str] = []

    def writer() -> None:
        version = 0
        # 3000 versions, or 10 s of them: without the free-threading marks (KVS_MARK_SHARED=0)
        # every read takes CPython's locked slow path and the writer crawls.
        deadline = time.monotonic() + 10
        while not stop.is_set() and version < 3000 and time.monotonic() < deadline:
            version += 1
            for k in keys:
                store.set(k, make_value(k, version))
                acked[k] = version

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            k = rng.choice(keys)
            floor = acked[k]
            got = parse_value(k, store.get(k))
            if got < floor:
                errors.append(f"{k}: read version {got} after version {floor} was acknowledged")
                stop.set()

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    threads[0].join(timeout=60)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:3]


def test_positions_round_trip_in_both_forms() -> None:
    for fd, offset, length in [(3, 0, 13), (4095, (1 << 30) - 1, 65535), (4096, 0, 13), (5, 1 << 30, 13),
                               (5, 7, 65536), (70000, (1 << 40) - 1, (1 << 30) - 1)]:
        for flags in (0, positions.EXPIRES, positions.KEY_BYTES, positions.EXPIRES | positions.KEY_BYTES):
            pos = positions.pack(fd, offset, length, flags)
            assert positions.unpack(pos) == (fd, offset, length)
            assert positions.length(pos) == length
            assert positions.flags(pos) == flags
            assert (pos < 0) == bool(flags & positions.EXPIRES)  # the sign is the EXPIRES flag
            assert (abs(pos) < 1 << 60) == (fd < 4096 and offset < 1 << 30 and length < 1 << 16)


def _newest_records(path: Path) -> dict[str, tuple[int, int, int, int]]:
    """``key -> (inode, offset, length, position flags)`` of each live key's newest SET
    record, in replay order (the active segment's zero tail, allocated ahead of the records,
    ends its scan)."""
    out: dict[str, tuple[int, int, int, int]] = {}
    for seg in segment_paths(path):
        data = seg.read_bytes()
        try:
            for off, op, rflags, deadline, key, n in record.scan(data, 1 << 30):
                if op == record.OP_SET:
                    flags = (positions.EXPIRES if deadline is not None else 0) | (
                        positions.KEY_BYTES if rflags & record.F_KEY_BYTES else 0)
                    out[key.decode()] = (seg.stat().st_ino, off, n, flags)
                else:
                    out.pop(key.decode(), None)
        except record.CorruptRecord as exc:
            assert data[exc.offset:].count(0) == len(data) - exc.offset, exc
    return out


def test_inlined_positions_equal_the_definition(tmp_path: Path) -> None:
    """The hot paths inline positions.pack (set; the hint loop of open) and positions.unpack
    (get). Every position they store, narrow and wide (a record of 2**16 bytes or more), must
    equal positions.pack of its record's descriptor, offset and length, and get must read
    it back: after set and set_many, after a compaction, and reopened from the hint files
    and from the log."""
    values = {"narrow": "n" * 10, "wide": "w" * 70_000, "many-narrow": "m" * 20, "many-wide": "W" * 80_000,
              "ttl-narrow": "t", "bytes-wide": b"B" * 70_000}

    def check(store: KvStore) -> None:
        newest = _newest_records(tmp_path)
        assert set(newest) == set(values)
        for key, (inode, offset, length, flags) in newest.items():
            pos = store._position(key.encode() if key.startswith("bytes") else key)
            assert pos is not None
            fd = positions.unpack(pos)[0]
            assert os.fstat(fd).st_ino == inode, key
            assert pos == positions.pack(fd, offset, length, flags), key
            assert (abs(pos) >= positions.NARROW_LIMIT) == ("wide" in key), key
            assert store.get(key) == values[key]

    with KvStore.open(tmp_path, background_compaction=False) as store:
        store.set("narrow", values["narrow"])
        store.set("wide", values["wide"])
        store.set("ttl-narrow", values["ttl-narrow"], ttl=3600)
        store.set(b"bytes-wide", values["bytes-wide"])
        store.set_many([("many-narrow", values["many-narrow"]), ("many-wide", values["many-wide"])])
        check(store)  # written by set and set_many
        store.compact()
        check(store)  # copied by the compaction
    with KvStore.open(tmp_path, background_compaction=False) as store:
        check(store)  # from the compaction output's hint file
        store.set("narrow", values["narrow"])
        store.set("wide", values["wide"])
    (tmp_path / segments.hint_name(segments.list_segments(tmp_path)[0])).unlink()
    with KvStore.open(tmp_path, background_compaction=False) as store:
        check(store)  # from the logs


# =========================================================================== append path
def _check_active_segment(store: KvStore) -> None:
    """The invariants of segment_log.Segment's map fields (``mark <= allocated``, ...): they
    are internal to segment_log, which these tests drive into its page-population paths."""
    seg = store._active
    assert seg is not None
    assert seg.size <= seg.mark <= seg.allocated or seg.allocated == 0
    assert seg.populated <= seg.allocated


def test_pages_ahead_of_the_appends_are_populated_and_marks_stay_inside_the_map(
        stores: Callable[..., KvStore], tmp_path: Path) -> None:
    """Values of random sizes (some larger than a populated chunk) across map growths and
    roll-overs: the mark never passes the mapped bytes, pages ahead of the appends get
    populated, and every value reads back, also after reopening."""
    store = stores(tmp_path / "d", max_segment_bytes=3 << 20, background_compaction=False)
    rnd = random.Random(7)
    expected: dict[str, str] = {}
    populated_ahead = 0
    for _ in range(3000):
        key = f"k{rnd.randrange(500)}"
        value = "v" * rnd.choice([10, 100, 1000, 20_000, 150_000])
        store.set(key, value)
        expected[key] = value
        _check_active_segment(store)
        seg = store._active
        populated_ahead += seg.populated > seg.size
    assert store._prefault_bytes == segment_log.PREFAULT_BYTES  # this kernel takes the advice
    assert populated_ahead > 2500
    assert store.stats()["segments"] > 3  # rolled over several times
    for key, value in expected.items():
        assert store.get(key) == value
    store.close()
    with KvStore.open(tmp_path / "d") as reopened:
        for key, value in expected.items():
            assert reopened.get(key) == value


def test_a_kernel_refusing_to_populate_turns_it_off_and_writes_go_on(
        stores: Callable[..., KvStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(segment_log, "MADV_POPULATE_WRITE", 0x7FFF)  # no such advice: EINVAL
    store = stores(tmp_path / "d", background_compaction=False)
    for i in range(2000):
        store.set(f"k{i}", "x" * 200)
        _check_active_segment(store)
    assert store._prefault_bytes == 0
    seg = store._active
    assert seg.mark == seg.allocated  # no more slow-path appends until the map must grow
    assert all(store.get(f"k{i}") == "x" * 200 for i in range(2000))


def test_populating_a_map_closed_meanwhile_is_skipped(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    store = stores(tmp_path / "d", background_compaction=False)
    store.set("a", "1")
    seg = store._active
    writer = seg.writer
    with store._append_lock:
        store._seal(seg)  # what a roll-over or close does to the map
    assert writer.closed
    store._prefault(writer, 0, 4096)  # no error, nothing done
    assert store._prefault_bytes == segment_log.PREFAULT_BYTES
    store.set("b", "2")  # the sealed segment is mapped again for the next append
    assert store.get("a") == "1" and store.get("b") == "2"


def test_acquire_spinning_waits_for_a_holder_however_long_it_holds() -> None:
    for hold in (0.0, 0.0005, 0.05):  # released during the tries, and long after them
        lock = threading.Lock()
        lock.acquire()
        acquired = threading.Event()

        def waiter(lock: threading.Lock = lock, acquired: threading.Event = acquired) -> None:
            spinlock.acquire_spinning(lock)
            acquired.set()

        t = threading.Thread(target=waiter)
        t.start()
        if hold:
            assert not acquired.wait(hold)  # still held: the waiter must not have it
        lock.release()
        assert acquired.wait(30)
        t.join(30)
        assert lock.locked()  # now held by the waiter
        lock.release()


def test_writers_contending_for_the_append_lock_lose_nothing(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    """Many threads appending at once (each contended acquire goes through
    _acquire_spinning): every write lands once, and the live-byte count matches the log."""
    store = stores(tmp_path / "d", max_segment_bytes=1 << 20, background_compaction=False)
    threads_n, per_thread = 8, 1500
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            rnd = random.Random(t)
            barrier.wait()
            for i in range(per_thread):
                store.set(f"t{t}-{i}", f"{t}:{i}:" + "x" * rnd.randrange(300))
        except BaseException as exc:
            errors.append(exc)

    ts = [threading.Thread(target=writer, args=(t,)) for t in range(threads_n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in ts)
    for t in range(threads_n):
        for i in range(per_thread):
            assert store.get(f"t{t}-{i}").startswith(f"{t}:{i}:")
    stats = store.stats()
    assert stats["live_bytes"] == stats["total_bytes"]  # nothing overwritten: every byte is live

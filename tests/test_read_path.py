"""KvStore's read path: read maps of segments (segment_log.py) and the value cache
(value_cache.py). Behaviour only: whatever is mapped, admitted or evicted, a get returns the
current value, and damage is reported the same way through a map as through pread."""

from __future__ import annotations

import errno
import os
import random
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvs.engine import positions, segment_log
from kvs.engine.kvstore import KvStore
from kvs.errors import KvsError
from tests.helpers import run_threads

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def read_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """"map" (the default) or "pread": read maps refused, so every read is a pread."""
    if request.param == "pread":
        def no_map(fd: int, length: int) -> Any:
            raise OSError(errno.ENOMEM, "refused by the test")

        monkeypatch.setattr(segment_log, "map_for_reading", no_map)
    return str(request.param)


def fill(store: KvStore, n: int, prefix: str = "key") -> dict[str, str]:
    values = {f"{prefix}{i:04d}": f"v{i}:" + "x" * (i % 90) for i in range(n)}
    for k, v in values.items():
        store.set(k, v)
    return values


def record_location(store: KvStore, key: str) -> tuple[int, int, int]:
    pos = store._position(key)
    assert pos is not None
    return positions.unpack(pos)


def test_sealed_active_and_compacted_segments_are_read_through_maps(stores: Callable[..., KvStore],
                                                                     tmp_path: Path) -> None:
    store = stores(tmp_path, max_segment_bytes=4096, background_compaction=False, cache_entries=0)
    values = fill(store, 300)
    fds = {record_location(store, k)[0] for k in values}
    assert len(fds) > 2  # several sealed segments and the active one
    assert all(store._read_maps[fd] is not None for fd in fds)
    assert all(store.get(k) == v for k, v in values.items())
    store.compact()
    fds = {record_location(store, k)[0] for k in values}
    assert all(store._read_maps[fd] is not None for fd in fds)
    assert all(store.get(k) == v for k, v in values.items())
    store.close()
    reopened = stores(tmp_path, max_segment_bytes=4096, cache_entries=0)
    fds = {record_location(reopened, k)[0] for k in values}
    assert all(reopened._read_maps[fd] is not None for fd in fds)
    assert all(reopened.get(k) == v for k, v in values.items())


def test_a_map_held_by_a_reader_outlives_the_retirement_of_its_segment(stores: Callable[..., KvStore],
                                                                        tmp_path: Path) -> None:
    """A reader that loaded a segment's map just before compaction retired the segment (its
    descriptor closed, its file deleted, the number reused) still copies the record it was
    after out of that map."""
    store = stores(tmp_path, max_segment_bytes=4096, background_compaction=False, cache_entries=0)
    values = fill(store, 200)
    key = "key0003"
    fd, offset, length = record_location(store, key)
    held = store._read_maps[fd]
    assert held is not None
    before = held[offset:offset + length]
    path = Path(os.readlink(f"/proc/self/fd/{fd}"))
    for k in values:  # every record is stale: compaction retires every old segment
        store.set(k, values[k] + "!")
    store.compact()
    assert not path.exists()
    assert store._read_maps[fd] is not held
    assert held[offset:offset + length] == before
    assert before.find(values[key].encode()) > 0
    assert all(store.get(k) == v + "!" for k, v in values.items())


@pytest.mark.parametrize("read_path", ["map", "pread"], indirect=True)
@pytest.mark.parametrize("segment", ["sealed", "active"])
@pytest.mark.parametrize("damage", ["flipped byte", "torn (zeroed tail)"])
def test_damage_is_reported_as_corruption(stores: Callable[..., KvStore], tmp_path: Path, read_path: str,
                                          segment: str, damage: str) -> None:
    """A record damaged on disk after it was written (a flipped bit, or a tail that never
    reached the disk and reads as zeros) makes ``get`` of that key raise the same
    ``KvsError`` through a map as through ``pread``; every other key still reads."""
    store = stores(tmp_path, max_segment_bytes=1 << 20 if segment == "active" else 4096,
                   background_compaction=False, cache_entries=0)
    values = fill(store, 100)
    if segment == "sealed":
        values |= fill(store, 100, prefix="more")  # the first keys' segments are sealed by now
    key = "key0001"
    fd, offset, length = record_location(store, key)
    assert (store._read_maps[fd] is not None) == (read_path == "map")
    assert (fd == store._active.fd) == (segment == "active")
    with open(f"/proc/self/fd/{fd}", "r+b", buffering=0) as f:
        if damage == "flipped byte":
            f.seek(offset + length - 3)
            byte = f.read(1)
            f.seek(offset + length - 3)
            f.write(bytes([byte[0] ^ 0x20]))
        else:
            f.seek(offset + length // 2)
            f.write(bytes(length - length // 2))
    with pytest.raises(KvsError) as raised:
        store.get(key)
    assert str(raised.value) == (f"data corruption in {store.path}: the record of key {key!r} "
                                 "fails its checks")
    assert all(store.get(k) == v for k, v in values.items() if k != key)


def test_values_stay_current_whatever_the_cache_admits(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    """A tiny cache (a few slots, so keys collide and evict each other) under random reads,
    overwrites, removes and compactions: every get equals the model."""
    store = stores(tmp_path, cache_entries=8, stripes=2, max_segment_bytes=4096, background_compaction=False)
    rng = random.Random(7)
    model: dict[str, str] = {}
    keys = [f"k{i}" for i in range(40)]
    for step in range(6000):
        k = rng.choice(keys)
        r = rng.random()
        if r < 0.6:
            assert store.get(k) == model.get(k), (step, k)
        elif r < 0.9:
            model[k] = f"{k}:{step}"
            store.set(k, model[k])
        elif r < 0.98:
            if k in model:
                del model[k]
                store.remove(k)
        else:
            store.compact()
    assert store.stats()["cache_entries"] > 0
    assert {k: store.get(k) for k in keys} == {k: model.get(k) for k in keys}


def test_a_cached_bytes_key_never_answers_an_invalid_text_key(stores: Callable[..., KvStore],
                                                             tmp_path: Path) -> None:
    """The index key of b"\\xff" is the text "\\udcff" (surrogateescape); such a key is never
    admitted to the cache, so a str argument with a lone surrogate is still refused after
    the bytes key was read many times."""
    store = stores(tmp_path)
    store.set(b"\xff", b"binary")
    store.set("ok", "text")
    for _ in range(3):
        assert store.get(b"\xff") == b"binary"
        assert store.get("ok") == "text"
    with pytest.raises(KvsError, match="Unicode"):
        store.get("\udcff")
    assert store.stats()["cache_entries"] == 1  # "ok" only


def test_readers_share_cache_slots_without_stale_values(stores: Callable[..., KvStore], tmp_path: Path) -> None:
    """Threads that read and write keys colliding in few cache slots: a reader never sees a
    value older than the last one acknowledged before its read began."""
    store = stores(tmp_path, cache_entries=4, stripes=1)
    keys = [f"c{i}" for i in range(12)]
    acked = dict.fromkeys(keys, 0)
    for k in keys:
        store.set(k, f"{k}:0")
    stop = threading.Event()

    def writer() -> None:
        for version in range(1, 1500):
            for k in keys:
                store.set(k, f"{k}:{version}")
                acked[k] = version
        stop.set()

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            k = rng.choice(keys)
            floor = acked[k]
            got = store.get(k)
            assert got is not None
            name, version = got.split(":")
            assert name == k and int(version) >= floor, (k, got, floor)

    run_threads([writer, *[lambda s=s: reader(s) for s in range(3)]], timeout=100)

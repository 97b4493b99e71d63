"""Crash claims of the v2 data model, proved by SIGKILL of a real process: a transaction is
all there or not at all, TTLs survive, expired keys stay dead, clear is durable."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvs.engine.clock import ManualClock
from kvs.engine.kvstore import KvStore
from kvs.engine.sqlite import SqliteKvsEngine

CHILD = textwrap.dedent("""
    import sys
    from kvs.engine.clock import ManualClock
    from kvs.engine.kvstore import KvStore
    from kvs.engine.sqlite import SqliteKvsEngine

    engine, path = sys.argv[1], sys.argv[2]
    clock = ManualClock(1_700_000_000_000)
    opener = KvStore.open if engine == "kvs" else SqliteKvsEngine.open
    options = {"max_segment_bytes": 8192} if engine == "kvs" else {}
    store = opener(path, fsync="always", clock=clock, expire_sweep_interval=0, **options)
    store.set("long", "before clear", ttl=9)
    for i in range(50):
        store.set(f"old{i}", "gone")
    store.clear()
    print("cleared", flush=True)
    store.set("long", "y", ttl=1000)
    store.set("exact", "z")
    store.expire_at("exact", 1_700_000_123_457)
    for i in range(20):                       # keys whose deadlines pass before the reopen
        store.set(f"short{i}", "x", ttl=5)
    print("ttl", store.expiry("long"), flush=True)
    n = 0
    while True:
        n += 1
        if n % 2:
            with store.transaction([f"t{i}" for i in range(5)]) as tx:
                for i in range(5):
                    tx[f"t{i}"] = str(n)
        else:
            store.set_many([(f"t{i}", str(n)) for i in range(5)])
        print("tx", n, flush=True)
        if engine == "kvs" and n % 50 == 0:
            store.compact()
""")


@pytest.mark.timeout(90)
@pytest.mark.parametrize("engine", ["kvs", "sqlite"])
@pytest.mark.parametrize("round_", range(2))
def test_kill_9_keeps_transactions_whole_ttls_and_clear(tmp_path: Path, engine: str, round_: int) -> None:
    path = tmp_path / "db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    kill_after = random.Random(round_).randrange(20, 400)
    proc = subprocess.Popen([sys.executable, str(script), engine, str(path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parent.parent)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            assert line, f"the child ended early: {lines[-3:]}"
            lines.append(line.split())
            if lines[-1][0] == "tx" and int(lines[-1][1]) >= kill_after:
                break
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    last_ack = int(lines[-1][1])
    ttl_deadline = int(next(line for line in lines if line[0] == "ttl")[1])

    clock = ManualClock(1_700_000_000_000 + 60_000)  # past the short TTLs, before the long one
    opener = KvStore.open if engine == "kvs" else SqliteKvsEngine.open
    for _ in range(2):  # and once more after a clean close (and a compaction)
        with opener(path, clock=clock, expire_sweep_interval=0) as store:
            gens = {store.get(f"t{i}") for i in range(5)}
            assert len(gens) == 1, f"a transaction is torn: {gens}"
            assert int(gens.pop()) >= last_ack
            assert store.expiry("long") == ttl_deadline
            assert store.expiry("exact") == 1_700_000_123_457
            assert not any(f"short{i}" in store for i in range(20)), "an expired key came back"
            assert not any(store.get(f"old{i}") for i in range(50)), "a key from before clear() came back"
            assert store.get("long") == "y"
            assert len(store) == 7 and set(store) == {"long", "exact"} | {f"t{i}" for i in range(5)}
            if engine == "kvs":
                store.compact()

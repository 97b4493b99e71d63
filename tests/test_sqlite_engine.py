"""Behaviour of SqliteKvsEngine: the KvsEngine contract, persistence, errors, threads, crashes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import kvs.engine.sqlite as sqlite_engine
from kvs.engine.base import KvsEngine
from kvs.engine.clock import ManualClock
from kvs.engine.sqlite import DB_FILE, SqliteKvsEngine
from kvs.errors import KeyNotFoundError, KvsError
from tests.helpers import run_threads, wait_for

REPO = Path(__file__).resolve().parent.parent


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def eng(tmp_path: Path) -> Iterator[SqliteKvsEngine]:
    engine = SqliteKvsEngine.open(tmp_path / "db")
    yield engine
    engine.close()


# ------------------------------------------------------------------------------ contract


def test_is_a_kvs_engine_named_sqlite(eng: SqliteKvsEngine) -> None:
    assert isinstance(eng, KvsEngine)
    assert SqliteKvsEngine.name == "sqlite"


def test_get_stored_value(eng: SqliteKvsEngine) -> None:
    eng.set("key1", "value1")
    eng.set("key2", "value2")
    assert eng.get("key1") == "value1"
    assert eng.get("key2") == "value2"


def test_overwrite(eng: SqliteKvsEngine) -> None:
    eng.set("key", "one")
    eng.set("key", "two")
    assert eng.get("key") == "two"


def test_get_missing_is_none(eng: SqliteKvsEngine) -> None:
    assert eng.get("nothing") is None
    eng.set("a", "1")
    assert eng.get("b") is None


def test_remove_missing_raises_key_not_found(eng: SqliteKvsEngine) -> None:
    with pytest.raises(KeyNotFoundError) as info:
        eng.remove("nothing")
    assert isinstance(info.value, KvsError)
    assert info.value.key == "nothing"


def test_remove(eng: SqliteKvsEngine) -> None:
    eng.set("key", "value")
    eng.remove("key")
    assert eng.get("key") is None
    with pytest.raises(KeyNotFoundError):
        eng.remove("key")
    eng.set("key", "again")
    assert eng.get("key") == "again"


def test_text_round_trips(eng: SqliteKvsEngine) -> None:
    pairs = {
        "": "empty key",
        "empty value": "",
        "ключ 🔑 鍵": "значение ✓ 値 \U0001f600",
        "a\x00b": "x\x00y\x00",
        "a": "plain a",
        "a\x00": "a followed by NUL",
        "\x00": "\x00\x00",
        "tab\tnewline\n": "quote ' \" backslash \\",
    }
    for key, value in pairs.items():
        eng.set(key, value)
    for key, value in pairs.items():
        assert eng.get(key) == value
    eng.remove("a\x00")
    assert eng.get("a") == "plain a"
    assert eng.get("a\x00b") == "x\x00y\x00"


def test_nul_round_trip_survives_reopen(tmp_path: Path) -> None:
    with SqliteKvsEngine.open(tmp_path) as eng:
        eng.set("k\x00ey", "va\x00lue")
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert eng.get("k\x00ey") == "va\x00lue"
        assert eng.get("k") is None


def test_reopen_persistence(tmp_path: Path) -> None:
    with SqliteKvsEngine.open(tmp_path) as eng:
        for i in range(200):
            eng.set(f"key{i}", f"value{i}")
        eng.set("key7", "overwritten")
        eng.remove("key8")
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert eng.get("key7") == "overwritten"
        assert eng.get("key8") is None
        for i in set(range(200)) - {7, 8}:
            assert eng.get(f"key{i}") == f"value{i}"
    assert sorted(os.listdir(tmp_path)) == sorted(["LOCK", DB_FILE, "kvs-meta.json"])  # WAL merged, removed
    meta = json.loads((tmp_path / "kvs-meta.json").read_text())
    assert meta == {"engine": "sqlite", "format": 2}


def test_close_is_idempotent_and_later_calls_raise(tmp_path: Path) -> None:
    eng = SqliteKvsEngine.open(tmp_path)
    eng.set("key", "value")
    assert eng.get("key") == "value"
    eng.close()
    eng.close()
    for call in (lambda: eng.set("key", "v"), lambda: eng.get("key"), lambda: eng.remove("key")):
        with pytest.raises(KvsError, match="closed"):
            call()
    with pytest.raises(KvsError, match="closed"):
        eng.get(42)  # type: ignore[arg-type]  # closed is reported first


def test_use_after_close_from_a_thread_that_had_a_reader(tmp_path: Path) -> None:
    eng = SqliteKvsEngine.open(tmp_path)
    eng.set("key", "value")
    read_once, closed = threading.Event(), threading.Event()
    seen: list[object] = []

    def reader() -> None:
        seen.append(eng.get("key"))
        read_once.set()
        closed.wait()
        try:
            eng.get("key")
        except KvsError as exc:
            seen.append(exc)

    t = threading.Thread(target=reader)
    t.start()
    read_once.wait()
    eng.close()
    closed.set()
    t.join()
    assert seen[0] == "value"
    assert isinstance(seen[1], KvsError) and "closed" in str(seen[1])


def test_context_manager_closes(tmp_path: Path) -> None:
    with SqliteKvsEngine.open(tmp_path) as eng:
        eng.set("a", "b")
    with pytest.raises(KvsError, match="closed"):
        eng.get("a")


def test_second_open_of_same_dir_fails_until_closed(tmp_path: Path) -> None:
    eng = SqliteKvsEngine.open(tmp_path)
    try:
        with pytest.raises(KvsError, match="already open"):
            SqliteKvsEngine.open(tmp_path)
        eng.set("still", "works")
    finally:
        eng.close()
    with SqliteKvsEngine.open(tmp_path) as again:
        assert again.get("still") == "works"


def test_wrong_engine_directory(tmp_path: Path) -> None:
    (tmp_path / "kvs-meta.json").write_text(json.dumps({"engine": "kvs", "format": 1}))
    with pytest.raises(KvsError, match="created by engine 'kvs'"):
        SqliteKvsEngine.open(tmp_path)
    assert not (tmp_path / DB_FILE).exists()
    (tmp_path / "kvs-meta.json").unlink()  # and the failed open released the directory lock
    with SqliteKvsEngine.open(tmp_path) as eng:
        eng.set("a", "b")


# ------------------------------------------------------------------------ v2 data model


@pytest.fixture
def clocked(tmp_path: Path) -> Iterator[tuple[SqliteKvsEngine, ManualClock]]:
    clock = ManualClock()
    engine = SqliteKvsEngine.open(tmp_path / "db", clock=clock, expire_sweep_interval=0)
    yield engine, clock
    engine.close()


def test_bytes_and_text_round_trip_as_written(tmp_path: Path) -> None:
    with SqliteKvsEngine.open(tmp_path) as eng:
        eng.set(b"\x00\xff", b"\x00bin\xff")
        eng.set("café", bytearray(b"ba"))
        eng.set(b"t", "text")
        assert eng.get("caf\xe9") == b"ba"
        assert eng.get(b"caf\xc3\xa9") == b"ba"  # one key: a str means its UTF-8 bytes
        assert sorted(eng, key=repr) == sorted([b"\x00\xff", "café", b"t"], key=repr)
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert eng.get(b"\x00\xff") == b"\x00bin\xff"
        assert eng.get("t") == "text" and isinstance(eng.get("t"), str)
        assert dict(eng.items()) == {b"\x00\xff": b"\x00bin\xff", "café": b"ba", b"t": "text"}


def test_missing_key_is_a_key_error(eng: SqliteKvsEngine) -> None:
    with pytest.raises(KeyError):
        eng.remove("nope")
    with pytest.raises(KeyError):
        eng["nope"]
    with pytest.raises(KeyNotFoundError):
        del eng["nope"]
    eng["a"] = "1"
    assert "a" in eng and eng["a"] == "1" and len(eng) == 1
    del eng["a"]
    assert "a" not in eng and len(eng) == 0


def test_expiry_hides_keys_everywhere_and_purge_removes_them(clocked: tuple[SqliteKvsEngine, ManualClock]) -> None:
    eng, clock = clocked
    eng.set("a", "1", ttl=1.5)
    eng.set("b", "2")
    assert eng.expiry("a") == clock() + 1500
    assert eng.ttl("a") == 1.5 and eng.ttl("b") is None
    assert len(eng) == 2
    clock.advance(1.5)
    assert eng.get("a") is None and "a" not in eng and len(eng) == 1
    assert eng.scan(0) == (0, ["b"])
    with pytest.raises(KeyNotFoundError):
        eng.ttl("a")
    with pytest.raises(KeyNotFoundError):
        eng.remove("a")
    assert not eng.expire("a", 5)
    eng.set("c", "3", ttl=1)
    eng.set("d", "4", ttl=1)
    clock.advance(1)
    assert len(eng) == 1
    assert eng.purge_expired() == 2
    assert len(eng) == 1 and eng.purge_expired() == 0
    assert eng.expire_at("b", clock() + 7) and eng.expiry("b") == clock() + 7
    eng.update("b", lambda old: old + "!")  # update keeps the expiry
    assert eng.expiry("b") == clock() + 7 and eng.get("b") == "2!"
    eng.set("b", "x")  # set clears it
    assert eng.expiry("b") is None
    assert eng.expire_at("b", clock() - 1)  # a past deadline deletes
    assert "b" not in eng and len(eng) == 0


def test_expired_key_set_again_counts_once(clocked: tuple[SqliteKvsEngine, ManualClock]) -> None:
    eng, clock = clocked
    eng.set("k", "1", ttl=1)
    clock.advance(2)
    assert len(eng) == 0
    eng.set("k", "2")
    assert len(eng) == 1 and eng.get("k") == "2"
    eng.set_many([("k", "3"), ("n", "4"), ("n", "5")])
    assert len(eng) == 2 and eng.get("n") == "5"


def test_background_sweep_deletes_expired_rows(tmp_path: Path) -> None:
    clock = ManualClock()
    with SqliteKvsEngine.open(tmp_path, clock=clock, expire_sweep_interval=0.01) as eng:
        eng.set_many([(f"k{i}", "v") for i in range(1200)])
        for i in range(1200):
            eng.expire(f"k{i}", 1)
        clock.advance(1)
        with sqlite3.connect(tmp_path / DB_FILE) as peek:
            wait_for(lambda: peek.execute("SELECT count(*) FROM kv").fetchone()[0] == 0, what="the sweep")
        assert len(eng) == 0


def test_scan_pages_match_and_cursor_checks(eng: SqliteKvsEngine) -> None:
    for i in range(25):
        eng.set(f"user:{i}", "v")
    eng.set(b"other\xff", "v")
    seen: list[object] = []
    cursor, calls = 0, 0
    while True:
        cursor, keys = eng.scan(cursor, match="user:*", count=7)
        assert len(keys) <= 7
        seen += keys
        calls += 1
        if cursor == 0:
            break
    assert sorted(seen) == sorted(f"user:{i}" for i in range(25)) and calls >= 4
    assert eng.scan(0, match=b"other\xff", count=100) == (0, [b"other\xff"])
    assert eng.scan(2**64 - 1) == (0, [])
    for bad_cursor in (-1, 2**64, 1.0, "0", True):
        with pytest.raises(KvsError):
            eng.scan(bad_cursor)  # type: ignore[arg-type]
    for bad_count in (0, -3, 2.0):
        with pytest.raises(KvsError):
            eng.scan(0, count=bad_count)  # type: ignore[arg-type]
    with pytest.raises(KvsError):
        eng.scan(0, match="[abc")


def test_scan_returns_every_stable_key_under_churn(eng: SqliteKvsEngine) -> None:
    stable = {f"stable{i}" for i in range(300)}
    eng.set_many([(k, "v") for k in stable])
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            eng.set(f"tmp{i}", "v")
            if i >= 5:
                eng.remove(f"tmp{i - 5}")
            eng.set(f"stable{i % 300}", str(i))  # updates keep the scan position
            i += 1

    thread = threading.Thread(target=churn)
    thread.start()
    try:
        for _ in range(5):
            assert stable <= set(eng)
    finally:
        stop.set()
        thread.join()


def test_clear_is_one_statement_durable_and_shrinks_the_file(tmp_path: Path) -> None:
    with SqliteKvsEngine.open(tmp_path, fsync="always") as eng:
        eng.set_many([(f"key{i}", "x" * 200) for i in range(5000)])
        eng.set("t", "v", ttl=100)
        eng.clear()
        assert len(eng) == 0 and eng.get("key1") is None and list(eng) == []
        eng.set("after", "1")
        assert len(eng) == 1
    size = (tmp_path / DB_FILE).stat().st_size
    assert size < 100_000
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert list(eng) == ["after"]


def test_transaction_commits_all_or_nothing(eng: SqliteKvsEngine) -> None:
    eng.set("a", "1")
    with eng.transaction(["a", b"b"]) as tx:
        tx["a"] = "2"
        tx.set(b"b", b"x", ttl=60)
        assert tx.get("a") == "2"
        with pytest.raises(KvsError):
            tx.get("undeclared")
    assert eng.get("a") == "2" and eng.get("b") == b"x" and len(eng) == 2
    with pytest.raises(RuntimeError):
        with eng.transaction(["a", "c"]) as tx:
            tx.remove("a")
            tx.set("c", "3")
            raise RuntimeError("boom")
    assert eng.get("a") == "2" and eng.get("c") is None and len(eng) == 2
    eng.set("n", "5")  # the next row still gets a fresh scan position
    assert sorted(eng, key=repr) == sorted(["a", b"b", "n"], key=repr)


def test_calls_back_into_the_store_are_refused(eng: SqliteKvsEngine) -> None:
    with pytest.raises(KvsError, match="inside"):
        eng.update("k", lambda old: eng.get("k"))
    with eng.transaction(["k"]) as tx:
        tx.set("k", "v")
        for call in (lambda: eng.get("k"), lambda: eng.set("x", "y"), lambda: len(eng), lambda: eng.scan(0)):
            with pytest.raises(KvsError, match="inside"):
                call()
    assert eng.get("k") == "v" and eng.get("x") is None
    with pytest.raises(ZeroDivisionError):
        eng.update("k", lambda old: 1 / 0)
    with pytest.raises(TypeError):
        eng.update("k", lambda old: 5)
    assert eng.get("k") == "v"


def test_update_increments_are_atomic(eng: SqliteKvsEngine) -> None:
    def work() -> None:
        for _ in range(200):
            eng.update("n", lambda old: str(int(old or "0") + 1))

    run_threads([work] * 8)
    assert eng.get("n") == "1600"


def test_readers_see_a_transaction_whole(eng: SqliteKvsEngine) -> None:
    eng.set_many([("a", "0"), ("b", "0")])
    stop = threading.Event()

    def writer() -> None:
        for n in range(1, 300):
            with eng.transaction(["a", "b"]) as tx:
                tx["a"] = str(n)
                tx["b"] = str(n)
        stop.set()

    def reader() -> None:
        while not stop.is_set():
            a = int(eng["a"])
            b = int(eng["b"])
            assert b >= a

    run_threads([writer, reader, reader])


def test_bad_ttls_and_deadlines_store_nothing(eng: SqliteKvsEngine) -> None:
    for bad in (0, -1, float("nan"), float("inf"), 1e300):
        with pytest.raises(KvsError):
            eng.set("k", "v", ttl=bad)
    with pytest.raises(TypeError):
        eng.set("k", "v", ttl="5")  # type: ignore[arg-type]
    assert "k" not in eng
    eng.set("k", "v")
    with pytest.raises(KvsError):
        eng.expire_at("k", -1)
    with pytest.raises(TypeError):
        eng.expire_at("k", 1.5)  # type: ignore[arg-type]
    with pytest.raises(KvsError):
        eng.expire("k", 0)
    assert eng.expiry("k") is None


# ------------------------------------------------------------------ upgrade from format 1


def make_format1_dir(path: Path, items: dict[str, str]) -> None:
    """A data directory as 0.1.0's SqliteKvsEngine wrote it (format 1)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "kvs-meta.json").write_text(json.dumps({"engine": "sqlite", "format": 1}) + "\n")
    conn = sqlite3.connect(path / DB_FILE, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY NOT NULL, value BLOB NOT NULL) WITHOUT ROWID")
    conn.executemany("INSERT INTO kv (key, value) VALUES (?, ?)", [(k.encode(), v.encode()) for k, v in items.items()])
    conn.close()


FORMAT1_ITEMS = {f"key{i}": f"value{i} é" for i in range(300)} | {"nul\x00key": "nul\x00value"}


def test_format1_directory_is_upgraded_and_keeps_its_data(tmp_path: Path) -> None:
    make_format1_dir(tmp_path, FORMAT1_ITEMS)
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert len(eng) == len(FORMAT1_ITEMS)
        assert {k: eng[k] for k in eng} == FORMAT1_ITEMS
        eng.set("new", b"bytes", ttl=100)
        assert len(eng) == len(FORMAT1_ITEMS) + 1
    assert json.loads((tmp_path / "kvs-meta.json").read_text())["format"] == 2
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert eng.get("key7") == "value7 é" and eng.get("new") == b"bytes"
        assert len(eng) == len(FORMAT1_ITEMS) + 1


def test_format1_upgrade_is_one_transaction(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_format1_dir(tmp_path, FORMAT1_ITEMS)
    statements: list[str] = []
    real_connect = sqlite3.connect

    def traced(*args: object, **kwargs: object) -> sqlite3.Connection:
        conn = real_connect(*args, **kwargs)  # type: ignore[call-overload]
        conn.set_trace_callback(statements.append)
        return conn  # type: ignore[no-any-return]

    # A failure in the middle of the upgrade (after the new table exists) rolls it all back.
    monkeypatch.setattr(sqlite_engine.sqlite3, "connect", traced)
    monkeypatch.setattr(sqlite_engine, "_SQL_SCHEMA_V2", (*sqlite_engine._SQL_SCHEMA_V2, "CREATE TABLE kv (x)"))
    with pytest.raises(KvsError):
        SqliteKvsEngine.open(tmp_path)
    upgrade = statements[statements.index("BEGIN IMMEDIATE"):]
    assert any("RENAME" in s for s in upgrade) and upgrade[-1] == "ROLLBACK"
    assert "COMMIT" not in upgrade
    with real_connect(tmp_path / DB_FILE) as peek:
        assert [r[1] for r in peek.execute("PRAGMA table_info(kv)")] == ["key", "value"]
    assert json.loads((tmp_path / "kvs-meta.json").read_text())["format"] == 1
    monkeypatch.undo()

    statements.clear()
    monkeypatch.setattr(sqlite_engine.sqlite3, "connect", traced)
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert {k: eng[k] for k in eng} == FORMAT1_ITEMS
    begin = statements.index("BEGIN IMMEDIATE")
    commit = statements.index("COMMIT", begin)
    body = statements[begin:commit]
    assert any("RENAME" in s for s in body) and any("DROP TABLE kv_v1" in s for s in body)
    assert any("INSERT INTO kv " in s and "FROM kv_v1" in s for s in body)


def test_upgrade_committed_but_metadata_not_written_still_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_format1_dir(tmp_path, FORMAT1_ITEMS)

    def crash(self: object, version: int) -> None:
        raise KvsError("simulated crash before the metadata write")

    monkeypatch.setattr(sqlite_engine.DataDir, "upgraded", crash)
    with pytest.raises(KvsError, match="simulated"):
        SqliteKvsEngine.open(tmp_path)
    monkeypatch.undo()
    assert json.loads((tmp_path / "kvs-meta.json").read_text())["format"] == 1
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert {k: eng[k] for k in eng} == FORMAT1_ITEMS
    assert json.loads((tmp_path / "kvs-meta.json").read_text())["format"] == 2


def test_close_stops_the_engine_threads(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    eng = SqliteKvsEngine.open(tmp_path, fsync="interval", fsync_interval=0.01, expire_sweep_interval=0.01)
    eng.set("k", "v", ttl=0.001)
    assert len(set(threading.enumerate()) - before) == 3  # keeper, flusher, sweeper
    eng.close()
    assert set(threading.enumerate()) - before == set()
    with pytest.raises(KvsError, match="closed"):
        eng.scan(0)
    with pytest.raises(KvsError, match="closed"):
        len(eng)
    with pytest.raises(KvsError, match="closed"):
        with eng.transaction(["k"]):
            pass


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("bad", [None, 1, 1.5, ["list"]])
def test_non_str_arguments_raise_type_error(eng: SqliteKvsEngine, bad: object) -> None:
    with pytest.raises(TypeError):
        eng.set(bad, "v")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        eng.set("k", bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        eng.get(bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        eng.remove(bad)  # type: ignore[arg-type]
    assert eng.get("k") is None


def test_lone_surrogate_raises_kvs_error_and_writes_nothing(eng: SqliteKvsEngine) -> None:
    eng.set("k", "old")
    with pytest.raises(KvsError):
        eng.set("\ud800", "v")
    with pytest.raises(KvsError):
        eng.set("k", "bad \udfff value")
    with pytest.raises(KvsError):
        eng.get("\ud800")
    with pytest.raises(KvsError):
        eng.remove("\ud800")
    assert eng.get("k") == "old"


def test_oversized_raises_kvs_error_and_writes_nothing(tmp_path: Path) -> None:
    with SqliteKvsEngine.open(tmp_path, max_key_bytes=8, max_value_bytes=16) as eng:
        eng.set("k" * 8, "v" * 16)  # exactly at the limits
        eng.set("é" * 4, "€" * 5)  # limits count UTF-8 bytes: 8 and 15
        with pytest.raises(KvsError, match="key is 9 bytes"):
            eng.set("k" * 9, "v")
        with pytest.raises(KvsError, match="value is 17 bytes"):
            eng.set("k" * 8, "v" * 17)
        with pytest.raises(KvsError):
            eng.set("é" * 5, "v")  # 10 bytes, 5 characters
        with pytest.raises(KvsError):
            eng.get("k" * 9)
        assert eng.get("k" * 8) == "v" * 16
        assert eng.get("é" * 4) == "€" * 5
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert eng.get("k" * 9) is None
        assert eng.get("k" * 8) == "v" * 16


def test_default_limits_accept_large_values(eng: SqliteKvsEngine) -> None:
    big = "x" * (1024 * 1024)
    eng.set("big", big)
    assert eng.get("big") == big


@pytest.mark.parametrize(
    "options",
    [
        {"fsync": "sometimes"},
        {"fsync": None},
        {"fsync": "ALWAYS"},
        {"fsync": "interval", "fsync_interval": 0},
        {"fsync": "interval", "fsync_interval": -1.0},
        {"fsync": "interval", "fsync_interval": float("nan")},
        {"max_key_bytes": 0},
        {"max_value_bytes": -5},
        {"max_value_bytes": 1.5},
    ],
)
def test_bad_options_raise_kvs_error_and_leave_dir_unlocked(tmp_path: Path, options: dict) -> None:
    with pytest.raises(KvsError):
        SqliteKvsEngine.open(tmp_path, **options)
    with SqliteKvsEngine.open(tmp_path) as eng:
        eng.set("a", "b")


# --------------------------------------------------------------------------- durability


@pytest.mark.parametrize("fsync", ["never", "always", "interval"])
def test_each_fsync_mode_stores_and_reopens(tmp_path: Path, fsync: str) -> None:
    with SqliteKvsEngine.open(tmp_path, fsync=fsync, fsync_interval=0.05) as eng:
        assert eng.fsync == fsync
        for i in range(50):
            eng.set(f"k{i}", f"v{i}")
        eng.remove("k0")
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert eng.get("k0") is None
        assert [eng.get(f"k{i}") for i in range(1, 50)] == [f"v{i}" for i in range(1, 50)]


def test_interval_flusher_checkpoints_into_the_database_file(tmp_path: Path) -> None:
    with SqliteKvsEngine.open(tmp_path, fsync="interval", fsync_interval=0.02) as eng:
        before = (tmp_path / DB_FILE).stat().st_size
        eng.set("big", "x" * 200_000)  # lands in the WAL; only a checkpoint copies it over
        wait_for(lambda: (tmp_path / DB_FILE).stat().st_size >= before + 200_000, what="a checkpoint")
        assert any(t.name.startswith("kvs-sqlite-flush") for t in threading.enumerate())
    wait_for(
        lambda: not any(t.name.startswith("kvs-sqlite-") for t in threading.enumerate()),
        what="the engine's threads to end",
    )


def test_interval_is_not_the_default(tmp_path: Path) -> None:
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert eng.fsync == "never"
        assert not any(t.name.startswith("kvs-sqlite-flush") for t in threading.enumerate())


CHILD = textwrap.dedent(
    """
    import sys
    from kvs.engine.sqlite import SqliteKvsEngine
    eng = SqliteKvsEngine.open(sys.argv[1], fsync=sys.argv[2], fsync_interval=0.05)
    i = 0
    while True:
        eng.set(f"key{i}", f"value{i}-" + "x" * (i % 300))
        if i % 7 == 3:
            eng.remove(f"key{i - 1}")
        print(i, flush=True)  # acknowledged
        i += 1
    """
)


@pytest.mark.parametrize("fsync", ["never", "interval", "always"])
def test_acknowledged_writes_survive_kill_9(tmp_path: Path, fsync: str) -> None:
    data = tmp_path / "db"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), fsync],
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    acked = -1
    try:
        assert child.stdout is not None
        for line in child.stdout:
            acked = int(line)
            if acked >= 500:
                break
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    assert acked >= 500, "the child stopped acknowledging early"
    with SqliteKvsEngine.open(data) as eng:  # the dead child's lock is gone
        for i in range(acked + 1):
            removed = i % 7 == 2 and i + 1 <= acked
            expected = None if removed else f"value{i}-" + "x" * (i % 300)
            assert eng.get(f"key{i}") == expected, f"key{i} (acknowledged up to {acked})"


# ------------------------------------------------------------------------------ errors


def test_damaged_database_file(tmp_path: Path) -> None:
    with SqliteKvsEngine.open(tmp_path) as eng:
        eng.set("a", "b")
    (tmp_path / DB_FILE).write_bytes(b"this is not a sqlite database, " * 200)
    with pytest.raises(KvsError, match=r"data directory .*: sqlite database is damaged"):
        SqliteKvsEngine.open(tmp_path)
    with pytest.raises(KvsError, match="damaged"):  # the failed open released the lock
        SqliteKvsEngine.open(tmp_path)


def test_disk_full_is_a_kvs_error_and_the_store_stays_usable(eng: SqliteKvsEngine) -> None:
    eng.set("small", "value")
    # Cap the file at its current size: SQLite then reports SQLITE_FULL as for a full disk.
    with eng._wlock:
        pages = eng._writer.execute("PRAGMA page_count").fetchone()[0]  # type: ignore[union-attr]
        eng._writer.execute(f"PRAGMA max_page_count = {pages}")  # type: ignore[union-attr]
    with pytest.raises(KvsError, match="disk is full"):
        eng.set("big", "x" * 1_000_000)
    assert eng.get("big") is None
    assert eng.get("small") == "value"
    eng.remove("small")
    assert eng.get("small") is None


def test_locked_database_is_a_kvs_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_engine, "_BUSY_TIMEOUT", 0.05)
    with SqliteKvsEngine.open(tmp_path) as eng:
        eng.set("a", "1")
        other = sqlite3.connect(tmp_path / DB_FILE, isolation_level=None)  # bypasses our lock
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(KvsError, match="sqlite database is locked"):
                eng.set("a", "2")
            assert eng.get("a") == "1"  # WAL readers are not blocked by a writer
            other.execute("ROLLBACK")
        finally:
            other.close()
        eng.set("a", "3")
        assert eng.get("a") == "3"


# ------------------------------------------------------------------------- concurrency


def test_parallel_readers_and_writers(eng: SqliteKvsEngine) -> None:
    readers, writers, keys_per_reader, writes_per_writer = 100, 8, 100, 150
    for r in range(readers):
        for k in range(keys_per_reader):
            eng.set(f"r{r}-{k}", f"value of r{r}-{k}")
    for w in range(writers):
        eng.set(f"w{w}", f"w{w}:0")
    start = threading.Barrier(readers + writers)
    errors: list[str] = []

    def reader(r: int) -> None:
        last_seen = [0] * writers
        start.wait()
        for k in range(keys_per_reader):
            got = eng.get(f"r{r}-{k}")
            if got != f"value of r{r}-{k}":
                errors.append(f"r{r}-{k}: {got!r}")
            w = k % writers
            value = eng.get(f"w{w}")
            name, _, version = (value or "").partition(":")
            if name != f"w{w}" or int(version) < last_seen[w]:
                errors.append(f"w{w}: {value!r} after version {last_seen[w]}")
            else:
                last_seen[w] = int(version)  # each get sees a state no older than the last

    def writer(w: int) -> None:
        start.wait()
        for v in range(1, writes_per_writer + 1):
            eng.set(f"w{w}", f"w{w}:{v}")
            if eng.get(f"w{w}") != f"w{w}:{v}":  # read-your-writes from the writing thread
                errors.append(f"w{w} did not read its write {v}")

    threads = [threading.Thread(target=reader, args=(r,)) for r in range(readers)]
    threads += [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for w in range(writers):
        assert eng.get(f"w{w}") == f"w{w}:{writes_per_writer}"


def test_thousand_threads_each_set_one_key(tmp_path: Path) -> None:
    n = 1000
    errors: list[BaseException] = []
    with SqliteKvsEngine.open(tmp_path) as eng:

        def one(i: int) -> None:
            try:
                eng.set(f"thread-{i}", f"value-{i}")
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    with SqliteKvsEngine.open(tmp_path) as eng:
        assert [eng.get(f"thread-{i}") for i in range(n)] == [f"value-{i}" for i in range(n)]


def test_close_while_threads_are_busy(tmp_path: Path) -> None:
    eng = SqliteKvsEngine.open(tmp_path)
    eng.set("k", "v")
    running = threading.Barrier(9)
    unexpected: list[BaseException] = []

    def loop(op: Callable[[int], object]) -> None:
        running.wait()
        i = 0
        while True:
            try:
                op(i)
            except KeyNotFoundError:
                pass
            except KvsError as exc:
                if "closed" not in str(exc):
                    unexpected.append(exc)
                return
            except BaseException as exc:
                unexpected.append(exc)
                return
            i += 1

    ops: list[Callable[[int], object]] = [lambda i: eng.get("k")] * 4
    ops += [lambda i: eng.set(f"k{i % 50}", "x")] * 2 + [lambda i: eng.remove(f"k{i % 50}")] * 2
    threads = [threading.Thread(target=loop, args=(op,)) for op in ops]
    for t in threads:
        t.start()
    running.wait()
    eng.close()
    for t in threads:
        t.join()
    assert unexpected == []
    with SqliteKvsEngine.open(tmp_path) as again:
        assert again.get("k") == "v"


def test_reader_connections_are_released(tmp_path: Path) -> None:
    baseline = open_fds()
    eng = SqliteKvsEngine.open(tmp_path)
    eng.set("k", "v")
    eng.get("k")
    with_engine = open_fds()

    def read_and_exit() -> None:
        assert eng.get("k") == "v"

    # Threads that exited: their readers are closed. SQLite parks a closed connection's
    # database descriptor for reuse while the file is locked, so what may remain is bounded by
    # the most reader threads alive at once (20 here), not by the 100 threads that read.
    for _ in range(5):
        threads = [threading.Thread(target=read_and_exit) for _ in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_for(lambda: len(eng._readers) == 1, what="readers of exited threads to be retired")
        wait_for(lambda: open_fds() <= with_engine + 20, what="reader descriptors to be released")

    # Threads still alive (parked): close() really closes their connections too.
    release = threading.Event()
    parked = threading.Barrier(21)

    def read_and_park() -> None:
        eng.get("k")
        parked.wait()
        release.wait()

    threads = [threading.Thread(target=read_and_park) for _ in range(20)]
    for t in threads:
        t.start()
    parked.wait()
    assert open_fds() > with_engine
    eng.close()
    try:
        assert open_fds() == baseline
        assert sorted(os.listdir(tmp_path)) == sorted(["LOCK", DB_FILE, "kvs-meta.json"])  # final checkpoint ran
    finally:
        release.set()
        for t in threads:
            t.join()


def test_idle_reader_does_not_pin_the_wal(eng: SqliteKvsEngine, tmp_path: Path) -> None:
    for i in range(100):
        eng.set(f"k{i}", "x" * 1000)
    done_reading, finish = threading.Event(), threading.Event()

    def reader() -> None:
        assert eng.get("k5") == "x" * 1000
        done_reading.set()
        finish.wait()

    t = threading.Thread(target=reader)
    t.start()
    done_reading.wait()
    other = sqlite3.connect(tmp_path / "db" / DB_FILE, isolation_level=None)
    try:
        busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0  # no connection holds a read transaction
    finally:
        other.close()
        finish.set()
        t.join()


def test_gil_stays_disabled() -> None:
    assert sys._is_gil_enabled() is False

"""Storage format 1 (kvs 0.1.0) to 2: the directories 0.1.0 left on disk open, are marked as
format 2, read and write on; an upgrade interrupted anywhere leaves a directory that opens;
an unknown format is refused untouched; and 0.1.0 itself refuses a format-2 directory.

``tests/fixtures`` (its README) holds directories written by 0.1.0; each test works on a
copy. The 0.1.0 code itself is taken from git (commit ``3b87774``, read only) where a test
needs it: its ``datadir.py`` imported as a module, or its whole ``kvs`` package run in a
child process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import textwrap
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kvs.engine import hints, segments
from kvs.engine.datadir import META_FILE
from kvs.engine.kvstore import KvStore
from kvs.engine.sqlite import SqliteKvsEngine
from kvs.errors import KvsError

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
V010 = "3b87774"
"""The last commit writing format 1 (kvs 0.1.0)."""

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- helpers
def expected_v1() -> dict[str, str]:
    return dict(json.loads((FIXTURES / "v1-expected.json").read_text(encoding="utf-8")))


def tree_digest(path: Path) -> dict[str, str]:
    """Name -> sha256 of every file of a directory."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


@pytest.fixture
def fixture_copy(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """``copy(name)``: a copy of ``tests/fixtures/<name>`` in tmp_path; checks at the end
    that the fixture itself was left alone."""
    originals: dict[str, dict[str, str]] = {}

    def copy(name: str) -> Path:
        originals[name] = tree_digest(FIXTURES / name)
        dest = tmp_path / name
        shutil.copytree(FIXTURES / name, dest)
        return dest

    yield copy
    for name, digest in originals.items():
        assert tree_digest(FIXTURES / name) == digest, f"the fixture {name} was modified"


def meta(path: Path) -> dict[str, Any]:
    return dict(json.loads((path / META_FILE).read_text()))


def scanned(store: Any) -> list[Any]:
    keys: list[Any] = []
    cursor = 0
    while True:
        cursor, page = store.scan(cursor, count=9)
        keys.extend(page)
        if cursor == 0:
            return keys


def check_v1_content(store: Any, expected: dict[Any, Any]) -> None:
    """``store`` holds exactly ``expected`` (v1 values are text: ``str``), by every read."""
    for key, value in expected.items():
        got = store.get(key)
        assert got == value and type(got) is type(value), f"{key!r}: {got!r}, expected {value!r}"
        assert key in store and store[key] == value
    assert len(store) == len(expected)
    assert Counter(list(store)) == Counter(list(expected))  # keys of both types: no sorting
    assert Counter(scanned(store)) == Counter(list(expected))
    assert "torn" not in store  # the half-written record of v1-killed


def child_env(pythonpath: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(pythonpath))


@pytest.fixture(scope="module")
def kvs_010(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the ``kvs`` package of 0.1.0 (``git archive``, read only): put it
    on a child's PYTHONPATH, and run the child outside the repository (so that the current
    ``kvs`` is not found first)."""
    try:
        tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", V010, "kvs"],
                             capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"kvs 0.1.0 is not available from git ({exc})")
    root = tmp_path_factory.mktemp("kvs-0.1.0")
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(root, filter="data")
    return root


def run_010(kvs_010: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True,
                          env=child_env(kvs_010), cwd=str(kvs_010), timeout=60)


# =========================================================================== the fixtures
@pytest.mark.parametrize("fixture", ["v1-clean", "v1-killed"])
def test_a_format_1_fixture_opens_upgrades_and_works_on(fixture_copy: Any, fixture: str,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Every key of the 0.1.0 directory reads back as the ``str`` it was, ``len``,
    iteration and SCAN list exactly those; the directory now says format 2; new writes
    (bytes, TTLs, removals) work and survive reopening and a compaction, and the format-1
    records are read again after each reopen (hint files of both versions included). For
    v1-killed, the torn tail is cut off (with a warning) and nothing else."""
    path = fixture_copy(fixture)
    expected: dict[Any, Any] = expected_v1()
    assert meta(path) == {"engine": "kvs", "format": 1}
    assert any(p.read_bytes()[:8] == hints.V1_MAGIC for p in path.glob("*.hint"))
    caplog.set_level(logging.WARNING, logger="kvs.engine.kvstore")
    with KvStore.open(path, background_compaction=False, max_segment_bytes=4096) as store:
        assert meta(path) == {"engine": "kvs", "format": 2}
        check_v1_content(store, expected)
        assert all(store.expiry(k) is None for k in expected)
        torn = [r for r in caplog.records if "torn" in r.getMessage()]
        assert len(torn) == (1 if fixture == "v1-killed" else 0), caplog.text
        if fixture == "v1-killed":  # the newest segment is back to what 0.1.0 closed
            newest = segments.log_name(max(segments.list_segments(FIXTURES / "v1-clean")))
            assert (path / newest).read_bytes() == (FIXTURES / "v1-clean" / newest).read_bytes()
        store.set(b"bin\x00\xff", b"\x00bytes\xff")
        store.set("ttl", "expires later", ttl=1000)
        store.set("key0001", b"now bytes")  # over a v1 record
        store.remove("key0002")
        store.expire("key0003", 2000)  # a v1 record rewritten with a deadline
        with store.transaction(["key0004", "txn"]) as tx:
            old = tx["key0004"]
            assert isinstance(old, str)
            tx["key0004"] = old + "+"
            tx["txn"] = "in a transaction"
        deadlines = {k: store.expiry(k) for k in ("ttl", "key0003")}
        expected |= {b"bin\x00\xff": b"\x00bytes\xff", "ttl": "expires later", "key0001": b"now bytes",
                     "key0003": expected["key0003"], "key0004": expected["key0004"] + "+",
                     "txn": "in a transaction"}
        del expected["key0002"]
        check_v1_content(store, expected)
    assert not caplog.records or fixture == "v1-killed"
    caplog.clear()
    for step in ("reopened", "compacted", "reopened after compaction"):
        with KvStore.open(path, background_compaction=False, max_segment_bytes=4096) as store:
            check_v1_content(store, expected)
            assert {k: store.expiry(k) for k in deadlines} == deadlines, step
            assert store.expiry("key0005") is None
            if step == "compacted":
                store.compact()
                check_v1_content(store, expected)
        assert meta(path) == {"engine": "kvs", "format": 2}
    assert not caplog.records, caplog.text  # nothing torn any more
    # The compaction rewrote every hint file in format 2.
    assert {p.read_bytes()[:8] for p in path.glob("*.hint")} == {hints.MAGIC}


# =========================================================================== interrupted upgrade
UPGRADE_CHILD = r"""
import os, signal, sys
from kvs.engine import datadir
from kvs.engine.kvstore import KvStore

path, when = sys.argv[1], sys.argv[2]
real_replace = os.replace

def replace(src, dst):
    if str(dst).endswith(datadir.META_FILE):  # the meta file's rewrite as format 2
        if when == "before the rename":
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)

datadir.os.replace = replace
KvStore.open(path)
print("not killed")
"""


@pytest.mark.parametrize("fixture", ["v1-clean", "v1-killed"])
@pytest.mark.parametrize("when", ["before the rename", "after the rename"])
def test_an_upgrade_killed_at_the_meta_rewrite_still_opens(fixture_copy: Any, fixture: str, when: str) -> None:
    """KvStore killed (SIGKILL) while it rewrites the meta file as format 2: with the new
    file written but not renamed (a leftover temporary file next to the format-1 one), or
    renamed and not yet synced (a format-2 directory of format-1 records, the torn tail of
    v1-killed still there). Either opens with every key, and ends as format 2."""
    path = fixture_copy(fixture)
    child = subprocess.run([sys.executable, "-c", UPGRADE_CHILD, str(path), when], capture_output=True,
                           text=True, env=child_env(REPO), cwd=str(REPO), timeout=60)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr
    if when == "before the rename":
        assert meta(path)["format"] == 1 and (path / (META_FILE + ".tmp")).exists()
    else:
        assert meta(path)["format"] == 2 and not (path / (META_FILE + ".tmp")).exists()
    with KvStore.open(path, background_compaction=False) as store:
        check_v1_content(store, expected_v1())
        store.set("after", b"the upgrade")
    assert meta(path) == {"engine": "kvs", "format": 2}
    assert not list(path.glob("*.tmp"))
    with KvStore.open(path, background_compaction=False) as store:
        check_v1_content(store, expected_v1() | {"after": b"the upgrade"})


@pytest.mark.parametrize("leftover", ["", '{"engine": "kv', '{"engine": "kvs", "format": 2}\n'])
def test_a_leftover_temporary_meta_file_is_ignored(fixture_copy: Any, leftover: str) -> None:
    """A temporary meta file of any content (empty, torn, whole) next to the format-1 one,
    as a crash before the rename leaves it: the meta file decides, the upgrade happens."""
    path = fixture_copy("v1-clean")
    (path / (META_FILE + ".tmp")).write_text(leftover)
    with KvStore.open(path, background_compaction=False) as store:
        check_v1_content(store, expected_v1())
    assert meta(path) == {"engine": "kvs", "format": 2}
    assert not (path / (META_FILE + ".tmp")).exists()


# =========================================================================== unknown format
@pytest.mark.parametrize("engine", ["kvs", "sqlite"])
def test_a_directory_of_an_unknown_format_is_refused_and_left_alone(fixture_copy: Any, tmp_path: Path,
                                                                    engine: str) -> None:
    """Format 99 (a later kvs): ``KvsError`` naming both versions; no file changes (the
    lock file aside: taking the lock comes first), and the lock is released (a second try
    gets the same answer, not "already open")."""
    if engine == "kvs":
        path = fixture_copy("v1-clean")
    else:
        path = tmp_path / "sqlite-99"
        with SqliteKvsEngine.open(path) as eng:
            eng.set("k", "v")
    (path / META_FILE).write_text(json.dumps({"engine": engine, "format": 99}) + "\n")
    (path / "LOCK").unlink(missing_ok=True)
    before = tree_digest(path)
    opener = KvStore.open if engine == "kvs" else SqliteKvsEngine.open
    for _ in range(2):
        with pytest.raises(KvsError, match=f"has {engine} format version 99, this kvs reads version 2"):
            opener(path)
    after = tree_digest(path)
    assert set(after) - set(before) <= {"LOCK"}
    assert {k: v for k, v in after.items() if k != "LOCK"} == before


# =========================================================================== 0.1.0 on format 2
def load_010_datadir(tmp_path: Path) -> ModuleType:
    """0.1.0's ``kvs/engine/datadir.py`` (``git show``), imported as a module of its own
    (it needs only ``kvs.errors.KvsError``, which the current kvs has)."""
    try:
        source = subprocess.run(["git", "-C", str(REPO), "show", f"{V010}:kvs/engine/datadir.py"],
                                capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"kvs 0.1.0 is not available from git ({exc})")
    file = tmp_path / "kvs010_datadir.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location("kvs010_datadir", file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kvs_0_1_0_datadir_refuses_a_format_2_directory(fixture_copy: Any, tmp_path: Path) -> None:
    """0.1.0's own check (its ``DataDir``, format 1) on the directories this kvs wrote or
    upgraded: a clear refusal naming the version, the lock released after it."""
    old = load_010_datadir(tmp_path)
    upgraded = fixture_copy("v1-clean")
    KvStore.open(upgraded).close()
    fresh_sqlite = tmp_path / "sqlite"
    SqliteKvsEngine.open(fresh_sqlite).close()
    for path, engine in ((upgraded, "kvs"), (fresh_sqlite, "sqlite")):
        with pytest.raises(KvsError, match=f"has {engine} format version 2, this kvs reads version 1"):
            old.DataDir(path, engine, 1)
    # Control: 0.1.0's check accepts a format-1 directory (then releases it).
    untouched = tmp_path / "v1-untouched"
    shutil.copytree(FIXTURES / "v1-clean", untouched)
    old.DataDir(untouched, "kvs", 1).close()
    assert meta(untouched)["format"] == 1
    KvStore.open(upgraded).close()  # the refusals left no lock behind


REFUSAL_CHILD = r"""
import sys
from kvs.engine.kvstore import KvStore
from kvs.engine.sqlite import SqliteKvsEngine
from kvs.errors import KvsError
import kvs.engine.kvstore
assert kvs.engine.kvstore.__file__.startswith(sys.argv[3]), kvs.engine.kvstore.__file__
for opener, path in ((KvStore.open, sys.argv[1]), (SqliteKvsEngine.open, sys.argv[2])):
    try:
        opener(path).close()
        print("opened", path)
    except KvsError as exc:
        print("refused:", exc)
"""


def test_kvs_0_1_0_refuses_to_open_format_2_directories(kvs_010: Path, fixture_copy: Any,
                                                        tmp_path: Path) -> None:
    """The whole 0.1.0 package (in a child process) opening a directory this kvs upgraded
    and a sqlite directory it created: both refused with the format message."""
    upgraded = fixture_copy("v1-clean")
    with KvStore.open(upgraded) as store:
        store.set("v2", b"bytes")
    fresh_sqlite = tmp_path / "sqlite"
    with SqliteKvsEngine.open(fresh_sqlite) as eng:
        eng.set("v2", b"bytes", ttl=100)
    out = run_010(kvs_010, REFUSAL_CHILD, str(upgraded), str(fresh_sqlite), str(kvs_010))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout
    assert "refused:" in lines[0] and "has kvs format version 2, this kvs reads version 1" in lines[0]
    assert "refused:" in lines[1] and "has sqlite format version 2, this kvs reads version 1" in lines[1]


# =========================================================================== 0.1.0 writing, killed
WRITER_010 = r"""
import sys
from kvs.engine.kvstore import KvStore
from kvs.engine.sqlite import SqliteKvsEngine
engine, path = sys.argv[1], sys.argv[2]
if engine == "kvs":
    store = KvStore.open(path, fsync="always", max_segment_bytes=4096, compaction_threshold=8192)
else:
    store = SqliteKvsEngine.open(path, fsync="always")
for i in range(200):
    store.set(f"fixed{i}", f"value {i} é " + "x" * (i % 13))
for i in range(0, 200, 5):
    store.remove(f"fixed{i}")
store.set("nul\x00key", "nul\x00value")
store.set("", "empty key")
print("ready", flush=True)
i = 0
while True:
    store.set(f"extra{i % 50}", f"extra {i}")
    print(i, flush=True)
    i += 1
"""


@pytest.mark.parametrize("engine", ["kvs", "sqlite"])
def test_a_directory_kvs_0_1_0_was_killed_writing_is_upgraded(kvs_010: Path, tmp_path: Path, engine: str) -> None:
    """0.1.0's own engine writes a directory and is killed (SIGKILL) mid-writes; this kvs
    opens it (SqliteKvsEngine upgrading its table in place), with every acknowledged write,
    as format 2, and writes on: bytes and TTLs survive reopening."""
    path = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", WRITER_010, engine, str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=child_env(kvs_010), cwd=str(kvs_010))
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if len(lines) >= 60:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == -signal.SIGKILL and lines and lines[0] == "ready\n", stderr
    last = int(lines[-1])
    assert meta(path) == {"engine": engine, "format": 1}
    expected: dict[str, Any] = {f"fixed{i}": f"value {i} é " + "x" * (i % 13) for i in range(200) if i % 5}
    expected |= {"nul\x00key": "nul\x00value", "": "empty key"}
    opener = KvStore.open if engine == "kvs" else SqliteKvsEngine.open
    with opener(path) as store:
        assert meta(path) == {"engine": engine, "format": 2}
        for i in range(min(last + 1, 50)):  # extra{j}: the newest acknowledged write of it, or one newer
            newest = max(n for n in range(last + 1) if n % 50 == i)
            assert store.get(f"extra{i}") in (f"extra {newest}", f"extra {newest + 50}")
        extras = {k: store.get(k) for k in store if k.startswith("extra")}
        assert len(extras) <= 50
        check_v1_content(store, expected | extras)
        store.set("bytes", b"\x00\x01")
        store.set("ttl", "soon", ttl=1000)
        deadline = store.expiry("ttl")
    with opener(path) as store:
        check_v1_content(store, expected | extras | {"bytes": b"\x00\x01", "ttl": "soon"})
        assert store.expiry("ttl") == deadline

"""Crash claims of both engines, proved by SIGKILL of a real child process.

Each test runs a child (``python -c`` with a script of this module) that opens an engine,
works, and reports on stdout each operation that returned (an acknowledgement); the test
kills it with SIGKILL, at a random point or at a point the child itself chose (it kills
itself from inside ``clear`` or a compaction), reopens the directory and checks the claims
of ``docs/storage-format.md`` against what was acknowledged: transactions all or nothing,
deadlines kept exactly, expired keys never coming back, ``clear`` durable, and a ``clear``
or a compaction interrupted anywhere leaving a directory that opens with one of the states
the child could have left.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvs.engine import open_engine, segments
from kvs.engine.clock import ManualClock
from kvs.engine.kvstore import KvStore
from tests.helpers import wait_until

REPO = Path(__file__).resolve().parent.parent
ENGINES = ["kvs", "sqlite"]
START_MS = 1_800_000_000_000
"""Where the ManualClock of a child starts."""

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- the child
PRELUDE = r"""
import json, os, pathlib, signal, sys
from kvs.engine import open_engine
from kvs.engine.clock import ManualClock

engine, path, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
args = sys.argv[4:]

def ack(*parts):
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()

def die(*_args, **_kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
    raise SystemExit("not killed")

def snapshot(store):
    out = {}
    for key in list(store):
        value = store.get(key)
        if value is not None:
            out[key] = ["b", value.hex()] if isinstance(value, bytes) else ["s", value]
            out[key].append(store.expiry(key))
    return out
"""


class Child:
    """A child process running ``PRELUDE + script``; ``lines`` collects the lines it wrote
    in full (each one an acknowledgement), from a reader thread."""

    def __init__(self, tmp_path: Path, script: str, engine: str, options: dict[str, Any], *args: object) -> None:
        self.data = tmp_path / "data"
        self.stderr_path = tmp_path / "child-stderr.txt"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", PRELUDE + script, engine, str(self.data), json.dumps(options),
                 *map(str, args)],
                stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=str(REPO),
            )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.endswith("\n"):  # a line cut by the kill was not acknowledged in full
                self.lines.append(line[:-1])

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_lines(self, n: int, timeout: float = 30.0) -> None:
        """Wait until the child has acknowledged ``n`` lines (fails if it died first)."""
        wait_until(lambda: len(self.lines) >= n or self.proc.poll() is not None, timeout)
        if len(self.lines) < n:
            self.kill(expect_alive=False)
            pytest.fail(f"the child acknowledged {len(self.lines)} of {n} lines "
                        f"(exit {self.proc.returncode}): {self.stderr()}")

    def kill(self, expect_alive: bool = True) -> list[str]:
        """SIGKILL the child; every line it acknowledged."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        if expect_alive:
            assert self.proc.returncode == -signal.SIGKILL, f"the child exited early: {self.stderr()}"
        return self.lines

    def wait_killed_itself(self, timeout: float = 30.0) -> list[str]:
        """Wait for a child that kills itself (``die()``); every line it acknowledged."""
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.proc.kill()
            self.proc.wait(timeout=30)
            self._reader.join(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL, f"the child was not killed: {self.stderr()}"
        return self.lines


def engine_options(engine: str, **kvs_options: Any) -> dict[str, Any]:
    """``fsync="always"``, plus ``kvs_options`` for KvStore (tuning knobs SQLite lacks)."""
    return {"fsync": "always", **(kvs_options if engine == "kvs" else {})}


def reopen(engine: str, path: Path, **options: Any) -> Any:
    if engine == "kvs":
        options.setdefault("background_compaction", False)
    return open_engine(engine, path, **options)


def snapshot(store: Any) -> dict[str, list[Any]]:
    """Every key -> [type, value (hex for bytes), expiry]: the child's ``snapshot``."""
    out: dict[str, list[Any]] = {}
    for key in list(store):
        value = store.get(key)
        if value is not None:
            out[key] = ["b", value.hex()] if isinstance(value, bytes) else ["s", value]
            out[key].append(store.expiry(key))
    return out


def scanned(store: Any) -> list[Any]:
    """Every key a full SCAN returns (a key returned twice appears twice)."""
    keys: list[Any] = []
    cursor = 0
    while True:
        cursor, page = store.scan(cursor, count=7)
        keys.extend(page)
        if cursor == 0:
            return keys


def check_listings(store: Any) -> set[Any]:
    """The keys of the store, after checking that iteration, SCAN, ``len``, ``in`` and
    ``get`` agree about them."""
    keys = list(store)
    assert len(set(keys)) == len(keys)
    assert sorted(set(scanned(store))) == sorted(keys)
    assert len(store) == len(keys)
    for key in keys:
        assert key in store and store.get(key) is not None
    return set(keys)


# =========================================================================== transactions
TXN_CHILD = r"""
store = open_engine(engine, path, **options)
keys = [f"t{j}" for j in range(5)]
n = 0
while True:
    n += 1
    pad = "x" * (n * 379 % 3000)
    if n % 2:
        with store.transaction(keys + ["u"]) as tx:
            for k in keys:
                tx[k] = f"{n}:{k}:{pad}"
            tx.update("u", lambda old: None)  # removed in the same transaction
    else:
        store.set_many([(k, f"{n}:{k}:{pad}") for k in keys] + [("u", f"{n}:u")])
    ack(n)
"""


def u_removed_on_odd(n: int) -> str | None:
    """What u holds after generation n of TXN_CHILD: odd generations (transactions) remove
    it, even ones (set_many) set it."""
    return None if n % 2 else f"{n}:u"


def check_generation(store: Any, last_acked: int, context: str,
                     u_after: Callable[[int], str | None] = u_removed_on_odd) -> int:
    """The generation the keys t0..t4 hold, after checking it is one, whole (u included)
    and not older than ``last_acked`` (the kill may land after a commit, before its report)."""
    found = set()
    for j in range(5):
        value = store.get(f"t{j}")
        assert value is not None, f"{context}: t{j} is missing"
        n, k, pad = value.split(":")
        assert k == f"t{j}" and pad == "x" * (int(n) * 379 % 3000), f"{context}: torn value of t{j}"
        found.add(int(n))
    assert len(found) == 1, f"{context}: a transaction was applied in part: generations {sorted(found)}"
    (n,) = found
    assert last_acked <= n <= last_acked + 1, f"{context}: generation {n}, last acknowledged {last_acked}"
    assert store.get("u") == u_after(n), f"{context}: u does not match generation {n}"
    return n


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("round_", range(2))
def test_transactions_survive_a_kill_all_or_nothing(tmp_path: Path, engine: str, round_: int) -> None:
    """Killed at a random point while committing transactions and ``set_many`` batches, the
    store holds one whole generation, at least the last acknowledged one."""
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randrange(5, 150)
    options = engine_options(engine, max_segment_bytes=64 * 1024, compaction_threshold=32 * 1024)
    child = Child(tmp_path, TXN_CHILD, engine, options)
    child.wait_lines(kill_after)
    acks = child.kill()
    context = f"{engine}, seed {seed}, killed after {len(acks)} acks"
    with reopen(engine, child.data) as store:
        n = check_generation(store, int(acks[-1]), context)
        check_listings(store)
    with reopen(engine, child.data) as store:  # the recovered state is itself durable
        assert check_generation(store, n, context) == n


TORN_TXN_CHILD = r"""
store = open_engine(engine, path, **options)
keys = [f"t{j}" for j in range(5)]
torn_at = int(args[0])
real_append = store._append

def append(rec, n, live_delta):
    # The kill lands in the middle of copying the record of generation torn_at into the log.
    if generation == torn_at:
        seg = store._active
        os.pwrite(seg.fd, rec[: len(rec) // 2], seg.size)
        die()
    return real_append(rec, n, live_delta)

store._append = append
generation = 0
while True:
    generation += 1
    n = generation
    pad = "x" * (n * 379 % 3000)
    if args[1] == "transaction":
        with store.transaction(keys + ["u"]) as tx:
            for k in keys:
                tx[k] = f"{n}:{k}:{pad}"
            if n % 2:
                tx.update("u", lambda old: None)
            else:
                tx["u"] = f"{n}:u"
    else:
        store.set_many([(k, f"{n}:{k}:{pad}") for k in keys] + [("u", f"{n}:u")])
    ack(n)
"""


@pytest.mark.parametrize("how", ["transaction", "set_many"])
def test_a_transaction_torn_in_the_log_is_dropped_whole(tmp_path: Path, how: str) -> None:
    """KvStore: a process killed while copying a transaction's record into the log (half of
    it written) recovers the generation before it, whole."""
    torn_at = random.randrange(2, 40)
    child = Child(tmp_path, TORN_TXN_CHILD, "kvs", engine_options("kvs", max_segment_bytes=256 * 1024),
                  torn_at, how)
    acks = child.wait_killed_itself()
    assert acks and int(acks[-1]) == torn_at - 1, acks[-3:]
    u_after = u_removed_on_odd if how == "transaction" else (lambda n: f"{n}:u")
    with reopen("kvs", child.data) as store:
        assert check_generation(store, torn_at - 1, f"torn at {torn_at}", u_after) == torn_at - 1
        check_listings(store)


# =========================================================================== ttl
TTL_CHILD = r"""
store = open_engine(engine, path, **options)
i = 0
while True:
    names = [f"{c}{i}" for c in "abcdefg"]
    a, b, c, d, e, f, g = names
    store.set(a, f"A{i}", ttl=1000 + (i % 7) + 0.25)
    store.set(b, f"B{i}")
    store.set(c, f"C{i}", ttl=1000)
    store.set(c, f"C{i}!")  # set clears the expiry
    store.set(d, b"D%d" % i)
    store.expire(d, 2000)
    store.set(e, f"E{i}", ttl=1500)
    store.update(e, lambda old: old + "+")  # update keeps the expiry
    with store.transaction([f]) as tx:
        tx.set(f, f"F{i}", ttl=3000)
    store.set(g, f"G{i}", ttl=1000)
    store.expire(g, None)  # persistent again
    if i % 25 == 24 and hasattr(store, "compact"):
        store.compact()
    state = snapshot(store)
    ack(json.dumps({k: state[k] for k in names}))
    i += 1
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_deadlines_survive_a_kill_exactly(tmp_path: Path, engine: str) -> None:
    """Keys written with a TTL (set, expire, a transaction's set, update keeping it) have
    after a kill the very deadline (``expiry()``) the child read before acknowledging;
    persistent ones (never given one, or cleared by ``set`` or ``expire(None)``) have None;
    also once a compaction has rewritten them (KvStore)."""
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randrange(30, 90)
    options = engine_options(engine, max_segment_bytes=16 * 1024)
    child = Child(tmp_path, TTL_CHILD, engine, options)
    child.wait_lines(kill_after)
    acks = child.kill()
    expected: dict[str, list[Any]] = {}
    for line in acks:
        expected.update(json.loads(line))
    assert sum(1 for v in expected.values() if v[2] is None) == 3 * len(acks)
    context = f"{engine}, seed {seed}, killed after {len(acks)} acks"

    def check(store: Any) -> None:
        state = snapshot(store)
        lost = sorted((k, v, state.get(k)) for k, v in expected.items() if state.get(k) != v)
        assert not lost, f"{context}: {len(lost)} keys differ (key, acknowledged, now): {lost[:3]}"
        # Only the keys of the one iteration the kill interrupted may be there besides.
        extra = {k for k in state if k not in expected}
        assert {k[1:] for k in extra} <= {str(len(acks))}, f"{context}: unexpected keys {sorted(extra)[:5]}"
        for k, (_t, _v, deadline) in expected.items():
            assert (store.ttl(k) is None) == (deadline is None)

    with reopen(engine, child.data) as store:
        check(store)
        if engine == "kvs":
            store.compact()
    with reopen(engine, child.data) as store:
        check(store)


# =========================================================================== expired keys
EXPIRING_CHILD = r"""
clock = ManualClock(int(args[0]))
store = open_engine(engine, path, clock=clock, expire_sweep_interval=0.005, **options)
i = 0
while True:
    store.set(f"p{i}", f"P{i}")
    store.set(f"r{i}", "old")
    store.set(f"r{i}", "new", ttl=0.3)  # over a persistent record of the same key
    store.set(f"x{i}", "X")
    store.expire_at(f"x{i}", clock() + 200)
    store.set_many([(f"s{i}", "S"), (f"q{i}", "Q")])
    store.expire_at(f"s{i}", clock() + 100)
    with store.transaction([f"y{i}"]) as tx:
        tx.set(f"y{i}", "Y", ttl=0.5)
    store.set(f"l{i}", "L", ttl=10**6)
    if i % 10 == 9:
        len(store)  # purges the expired keys from the index (no record written)
        if hasattr(store, "compact"):
            store.compact()  # drops the expired records
    clock.advance(0.1)  # the keys of the iterations 3 to 5 back expire now, while running
    ack(i, clock())
    i += 1
"""


def check_expired_stay_gone(store: Any, last: int, context: str) -> None:
    keys = check_listings(store)
    for i in range(last + 1):
        for name in (f"r{i}", f"x{i}", f"s{i}", f"y{i}"):
            assert name not in keys, f"{context}: expired {name} is listed"
            assert name not in store, f"{context}: expired {name} is in the store"
            assert store.get(name) is None, f"{context}: expired {name} came back"
        for name, value in ((f"p{i}", f"P{i}"), (f"q{i}", "Q"), (f"l{i}", "L")):
            assert store.get(name) == value, f"{context}: {name} is lost"
    # Keys of the iteration the kill interrupted may exist (r as "old", persistent), no later.
    assert all(int(k[1:]) <= last + 1 for k in keys), f"{context}: keys from nowhere"
    assert all(k[0] in "pql" for k in keys if int(k[1:]) <= last), f"{context}: an expired key is live"


@pytest.mark.parametrize("engine", ENGINES)
def test_expired_keys_are_not_resurrected_by_a_kill(tmp_path: Path, engine: str) -> None:
    """Keys whose deadline passed, while the child ran or after it died, are absent after a
    reopen with a clock past every deadline (``get``, ``in``, ``len``, iteration, SCAN),
    and stay absent after another reopen and, for KvStore, a compaction."""
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randrange(15, 60)
    options = engine_options(engine, max_segment_bytes=4096)
    child = Child(tmp_path, EXPIRING_CHILD, engine, options, START_MS)
    child.wait_lines(kill_after)
    acks = child.kill()
    last, now = map(int, acks[-1].split())
    context = f"{engine}, seed {seed}, killed after {len(acks)} acks"
    clock = ManualClock(now + 1000)  # past every short deadline of the iteration interrupted too
    with reopen(engine, child.data, clock=clock) as store:
        check_expired_stay_gone(store, last, context)
    with reopen(engine, child.data, clock=clock) as store:
        check_expired_stay_gone(store, last, context + ", second reopen")
        if engine == "kvs":
            store.compact()
            check_expired_stay_gone(store, last, context + ", compacted")
    with reopen(engine, child.data, clock=clock) as store:
        check_expired_stay_gone(store, last, context + ", reopened after compaction")


# =========================================================================== clear
CLEAR_CHILD = r"""
store = open_engine(engine, path, **options)
for b in range(4):
    store.set_many([(f"pre{b}_{j}", f"v{j}" * (j % 30)) for j in range(50)])
for j in range(20):
    store.set(f"pre_ttl{j}", b"t" * j, ttl=1000)
    store.set(f"post{j}", "overwritten by the clear")
if args[0] == "compacted" and hasattr(store, "compact"):
    store.compact()
store.clear()
ack("cleared")
i = 0
while True:
    store.set(f"post{i}", f"P{i}")
    ack(i)
    i += 1
"""


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("before", ["plain", "compacted"])
def test_clear_is_durable(tmp_path: Path, engine: str, before: str) -> None:
    """After an acknowledged ``clear`` and a kill, only the keys written after it exist."""
    seed = random.randrange(1 << 30)
    extra_acks = random.Random(seed).choice([0, 0, 1, 5, 20])
    child = Child(tmp_path, CLEAR_CHILD, engine, engine_options(engine, max_segment_bytes=2048), before)
    child.wait_lines(1 + extra_acks)
    acks = child.kill()
    assert acks[0] == "cleared"
    last = len(acks) - 2  # post0..post{last} acknowledged after the clear
    context = f"{engine}, seed {seed}, killed after {len(acks)} acks"
    for _ in range(2):
        with reopen(engine, child.data) as store:
            keys = check_listings(store)
            assert not [k for k in keys if k.startswith("pre")], f"{context}: keys from before the clear"
            assert {f"post{i}" for i in range(last + 1)} <= keys <= {f"post{i}" for i in range(last + 2)}, context
            for k in keys:
                assert store.get(k) == f"P{k[4:]}", f"{context}: {k} has its value from before the clear"
                assert store.expiry(k) is None


# =========================================================================== clear and compaction killed
LOOP_CHILD = r"""
store = open_engine(engine, path, **options)
k = 0
r = 0
while True:
    store.set_many([(f"r{r}k{j}", f"v{r}.{j}." + "x" * (j * 7 % 90)) for j in range(40)])
    ack(k); k += 1
    with store.transaction([f"r{r}k{j}" for j in range(0, 40, 2)] + [f"r{r}k1"]) as tx:
        for j in range(0, 40, 2):
            tx.remove(f"r{r}k{j}")
        tx.set(f"r{r}k1", b"changed", ttl=1000)
    ack(k); k += 1
    store.compact()
    ack(k); k += 1
    store.set(f"post{r}", "P")
    ack(k); k += 1
    store.clear()
    ack(k); k += 1
    store.set(f"after{r}", "A")
    ack(k); k += 1
    store.compact()
    ack(k); k += 1
    r += 1
"""
LOOP_OPS = 7


def loop_states(upto: int) -> Iterator[dict[str, Any]]:
    """The content (key -> value, as ``str``/``bytes``) before the first operation of
    ``LOOP_CHILD`` and after each of operations 0 ... ``upto``, each a new dict."""
    state: dict[str, Any] = {}
    yield dict(state)
    for k in range(upto + 1):
        r, op = divmod(k, LOOP_OPS)
        if op == 0:
            state.update({f"r{r}k{j}": f"v{r}.{j}." + "x" * (j * 7 % 90) for j in range(40)})
        elif op == 1:
            for j in range(0, 40, 2):
                del state[f"r{r}k{j}"]
            state[f"r{r}k1"] = b"changed"
        elif op == 3:
            state[f"post{r}"] = "P"
        elif op == 4:
            state.clear()
        elif op == 5:
            state[f"after{r}"] = "A"
        yield dict(state)


def content(store: Any) -> dict[Any, Any]:
    check_listings(store)
    return {k: store.get(k) for k in store}


@pytest.mark.parametrize("round_", range(4))
def test_clear_and_compaction_killed_at_random_points(tmp_path: Path, round_: int) -> None:
    """KvStore killed while it loops over writes, ``compact()`` and ``clear()``: it reopens,
    holding the state of the last acknowledged operation, or of the one after it (each
    operation is atomic; a ``clear`` or compaction interrupted anywhere is one of them)."""
    seed = random.randrange(1 << 30)
    kill_after = random.Random(seed).randrange(2, 5 * LOOP_OPS)
    options = engine_options("kvs", max_segment_bytes=1024, background_compaction=False)
    child = Child(tmp_path, LOOP_CHILD, "kvs", options)
    child.wait_lines(kill_after)
    acks = child.kill()
    last = int(acks[-1])
    assert [int(a) for a in acks] == list(range(last + 1))
    states = list(loop_states(last + 1))  # states[k + 1]: after operation k
    context = f"seed {seed}, killed after operation {last} (round {last // LOOP_OPS}, step {last % LOOP_OPS})"
    with reopen("kvs", child.data) as store:
        found = content(store)
        assert found in (states[last + 1], states[last + 2]), context
        assert not list(child.data.glob("*.tmp")), context
        assert not list(child.data.glob("compaction-*")), context
        store.set("later", "L")
        store.compact()
    with reopen("kvs", child.data) as store:
        assert content(store) == found | {"later": "L"}, context


# Faults: where the child kills itself (a patch armed just before the operation), what the
# directory shows at that moment (proof that the point was reached: names of its files ->
# bool), and what the reopened store must hold: "before" (the operation left no trace),
# "after" (it took effect: a clear whose CLEAR record is durable), or "either".
def _segment_count(names: set[str]) -> int:
    return sum(1 for n in names if n.endswith(".log"))


def _has_marker(names: set[str]) -> bool:
    return any(n.startswith("compaction-") for n in names)


FAULTS: dict[str, tuple[str, Callable[[set[str]], bool], str]] = {
    # clear(): kvstore.py
    "clear: before the CLEAR record (at the roll-over)": ("clear", lambda names: True, "before"),
    "clear: CLEAR appended, before its fsync": ("clear", lambda names: True, "either"),
    "clear: CLEAR durable, before any old segment is deleted": (
        "clear", lambda names: _segment_count(names) > 3, "after"),
    "clear: halfway through deleting the old segments": ("clear", lambda names: _segment_count(names) > 2, "after"),
    # compact(): compaction.py
    "compact: halfway through copying the live records": (
        "compact", lambda names: any(n.endswith(".log.tmp") for n in names), "before"),
    "compact: outputs fsynced, before their hint files and renames": (
        "compact", lambda names: any(n.endswith(".log.tmp") for n in names), "before"),
    "compact: outputs in place, before the marker": (
        "compact", lambda names: not _has_marker(names) and not any(n.endswith(".tmp") for n in names), "before"),
    "compact: marker written, before any input is deleted": ("compact", _has_marker, "before"),
    "compact: halfway through deleting the inputs": ("compact", _has_marker, "before"),
    "compact: inputs deleted, before the marker is removed": ("compact", _has_marker, "before"),
}

FAULT_CHILD = r"""
from kvs.engine import compaction, kvstore
store = open_engine(engine, path, **options)
fault = args[0]
for r in range(3):
    store.set_many([(f"k{r}_{j}", f"v{r}_{j}_" + "x" * (j % 50)) for j in range(40)])
    for j in range(0, 40, 4):
        store.remove(f"k{r}_{j}")  # tombstones, whose SETs are in older segments
    for j in range(1, 40, 8):
        store.set(f"k{r}_{j}", b"bytes%d" % j, ttl=1000)
    store.set(f"gone{r}", "x")
    store.remove(f"gone{r}")
    if r == 1:
        store.compact()  # compaction outputs (with hint files) among the segments
ack(json.dumps(snapshot(store)))

calls = [0]
def nth(n, then):
    def patched(*a, **kw):
        calls[0] += 1
        if calls[0] >= n:
            die()
        return then(*a, **kw)
    return patched

real_unlink = pathlib.Path.unlink
real_fsync = os.fsync
if fault == "clear: before the CLEAR record (at the roll-over)":
    store._roll_over = die
elif fault == "clear: CLEAR appended, before its fsync":
    first_active = store._active.gen
    def fsync(fd):  # the CLEAR record's segment is the one clear's roll-over starts
        if store._active.gen != first_active and fd == store._active.fd:
            die()
        return real_fsync(fd)
    kvstore.os.fsync = fsync
elif fault == "clear: CLEAR durable, before any old segment is deleted":
    store._readers.grace_period = die
elif fault == "clear: halfway through deleting the old segments":
    pathlib.Path.unlink = nth(3, real_unlink)
elif fault == "compact: halfway through copying the live records":
    compaction.CompactionOutput.add = nth(30, compaction.CompactionOutput.add)
elif fault == "compact: outputs fsynced, before their hint files and renames":
    compaction.hints.write_hint_file = die
elif fault == "compact: outputs in place, before the marker":
    compaction.write_durable = die
elif fault == "compact: marker written, before any input is deleted":
    store._readers.grace_period = die
elif fault == "compact: halfway through deleting the inputs":
    pathlib.Path.unlink = nth(3, real_unlink)
elif fault == "compact: inputs deleted, before the marker is removed":
    def unlink(self, missing_ok=False):
        if self.name.startswith("compaction-"):
            die()
        return real_unlink(self, missing_ok=missing_ok)
    pathlib.Path.unlink = unlink
elif fault != "none":
    raise SystemExit(f"unknown fault {fault}")
if args[1] == "clear":
    store.clear()
else:
    store.compact()
ack("survived")
"""


@pytest.mark.parametrize("fault", list(FAULTS))
def test_clear_and_compaction_killed_at_chosen_points(tmp_path: Path, fault: str) -> None:
    """KvStore: the child kills itself at a chosen point inside ``clear`` or a compaction;
    the directory opens with the state from before the operation or, for a ``clear`` whose
    CLEAR record is durable, empty; deadlines kept, no leftovers, and it works on."""
    op, reached, outcome = FAULTS[fault]
    options = engine_options("kvs", max_segment_bytes=1024, background_compaction=False)
    child = Child(tmp_path, FAULT_CHILD, "kvs", options, fault, op)
    acks = child.wait_killed_itself()
    assert len(acks) == 1, f"the fault point was not reached: {acks[1:]}"
    names = set(os.listdir(child.data))
    assert reached(names), f"{fault}: the directory does not show it: {sorted(names)}"
    before = json.loads(acks[0])
    assert len(before) == 3 * 30 and sum(v[2] is not None for v in before.values()) == 3 * 5
    allowed = {"before": [before], "after": [{}], "either": [before, {}]}[outcome]
    with reopen("kvs", child.data) as store:
        state = snapshot(store)
        check_listings(store)
        assert state in allowed, f"{fault}: {len(state)} keys, allowed {[len(s) for s in allowed]}"
        assert not list(child.data.glob("*.tmp")) and not list(child.data.glob("compaction-*"))
        if not state:  # the clear was finished: no segment older than the CLEAR record is left
            assert len(segments.list_segments(child.data)) <= 2
        store.set("later", b"L", ttl=1000)
        store.compact()
        expiry = store.expiry("later")
    with reopen("kvs", child.data) as store:
        assert snapshot(store) == state | {"later": ["b", b"L".hex(), expiry]}


@pytest.mark.parametrize("op", ["clear", "compact"])
def test_the_fault_child_without_a_fault_finishes_its_operation(tmp_path: Path, op: str) -> None:
    """Control for the test above: the same child with no fault armed survives its
    ``clear`` or compaction and leaves the state that operation makes."""
    child = Child(tmp_path, FAULT_CHILD, "kvs", engine_options("kvs", max_segment_bytes=1024), "none", op)
    child.wait_lines(2)
    child.proc.wait(timeout=30)  # the script ends after "survived"
    assert child.proc.returncode == 0, child.stderr()
    with KvStore.open(child.data) as store:
        assert snapshot(store) == ({} if op == "clear" else json.loads(child.lines[0]))

"""Before/after: run suites from several checkouts in alternating rounds and pair their figures.

    python -m bench.compare --base REV [--base REV ...] [--suite engine] [--suite resp]
                            [--rounds 3] [--gil off|on] [--quick] [--out DIR]

``scripts/bench`` compares kvs with its peers inside one run; a change to kvs itself needs the
same figures from the code before it and after it, measured on the same machine state. This
checks each ``REV`` out into a temporary git worktree and runs each suite's child process
(``python -m bench --child``) from those worktrees and from this checkout ("head") in turn,
the order rotating every round, so that a drift of the VM's speed falls on all alike. For
every pair of trees, later over earlier in the order given (the bases, then head), and every
figure both produced it prints the median over rounds of the per-round ratio (throughput:
above 1 is faster; latency, seconds and bytes per key: below 1 is better) with the smallest
and largest round ratio, and writes every record and ratio to ``DIR/compare.json``. Two bases
measure two steps in one run: ``--base A --base B`` gives B/A, head/A and head/B.

Each child imports the ``kvs`` and ``bench`` of its own tree (the working directory comes
first on ``sys.path``, ahead of the editable install); that is checked before any round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.__main__ import SUITES

ROOT = Path(__file__).resolve().parent.parent
MEASURES = ("ops_per_sec", "p50_us", "p99_us", "seconds", "bytes_per_key", "ratio", "ratio_to_best_peer",
            "ratio_to_1_thread", "ratio_to_cache_off")
"""Record fields that are measurements, compared head/base."""
IDENTITY = ("suite", "benchmark", "engine", "pool", "io_model", "threads", "workload", "client_connections",
            "producers", "connections", "pipeline", "command")
"""Record fields that say what was measured (bench/README.md); a field one side's records do not
have yet counts as absent, so revisions whose records gained descriptive fields still pair."""


@contextmanager
def worktrees(revs: list[str]) -> Iterator[list[Path]]:
    """A detached git worktree of each of ``revs``, removed afterwards."""
    made: list[Path] = []
    try:
        for rev in revs:
            where = Path(tempfile.mkdtemp(prefix="kvs-base-"))
            subprocess.run(["git", "worktree", "add", "--quiet", "--detach", str(where), rev], cwd=ROOT, check=True)
            made.append(where)
        yield made
    finally:
        for where in made:
            subprocess.run(["git", "worktree", "remove", "--force", str(where)], cwd=ROOT, check=False)


def imported_from(tree: Path) -> Path:
    """Where a child started in ``tree`` imports ``kvs`` from."""
    out = subprocess.run([sys.executable, "-c", "import kvs; print(kvs.__file__)"], cwd=tree,
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip()).resolve()


def run_suite(tree: Path, suite: str, gil: str, quick: bool) -> list[dict[str, Any]]:
    """One child run of ``suite`` from ``tree``; its records."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_file = f.name
    cmd = [sys.executable, "-m", "bench", "--child", "--suite", suite, "--out", out_file]
    cmd += ["--quick"] if quick else []
    env = dict(os.environ, PYTHON_GIL="1" if gil == "on" else "0")
    try:
        subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
        records: list[dict[str, Any]] = json.loads(Path(out_file).read_text())
        return records
    finally:
        os.unlink(out_file)


def identity(record: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    """What a record measured."""
    return tuple((k, record.get(k)) for k in IDENTITY)


def pair_rounds(rounds: list[dict[str, list[dict[str, Any]]]], head: str = "head",
                base: str = "base") -> list[dict[str, Any]]:
    """Per figure: the ratio ``head``/``base`` (tree names) of each round, and their median."""
    rows: dict[tuple[tuple[tuple[str, Any], ...], str], list[float]] = {}
    for one in rounds:
        old_records = {identity(r): r for r in one[base]}
        for rec in one[head]:
            old = old_records.get(identity(rec))
            if old is None:
                continue
            for measure in MEASURES:
                a, b = rec.get(measure), old.get(measure)
                if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b:
                    rows.setdefault((identity(rec), measure), []).append(a / b)
    out = []
    for (ident, measure), ratios in rows.items():
        out.append({**dict(ident), "head": head, "base": base, "measure": measure,
                    "head_over_base": statistics.median(ratios),
                    "min": min(ratios), "max": max(ratios), "round_ratios": ratios})
    return out


def describe(row: dict[str, Any]) -> str:
    skip = {"head", "base", "measure", "head_over_base", "min", "max", "round_ratios", "suite"}
    return " ".join(f"{v}" for k, v in row.items() if k not in skip and v is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, action="append", metavar="REV",
                        help="a git revision to compare against (repeatable: oldest first)")
    parser.add_argument("--suite", action="append", choices=list(SUITES), help="a suite (repeatable; default engine)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every tree (default 3)")
    parser.add_argument("--gil", choices=["off", "on"], default="off")
    parser.add_argument("--quick", action="store_true", help="the suites' smoke sizes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", metavar="DIR")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    suites = args.suite or ["engine"]
    # One base keeps the names "base" and "head" (and compare.json's shape); several are
    # named by their revision.
    names = ["base"] if len(args.base) == 1 else list(args.base)
    if len(set(names)) < len(names):
        parser.error("each --base must be a different revision")

    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    results: dict[str, Any] = {"base": args.base[0] if len(args.base) == 1 else args.base, "suites": suites,
                               "rounds": args.rounds, "gil": args.gil,
                               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "load_average_before": os.getloadavg(), "records": [], "pairs": []}
    with worktrees(args.base) as base_trees:
        trees = {**dict(zip(names, base_trees, strict=True)), "head": ROOT}
        for name, tree in trees.items():
            where = imported_from(tree)
            if not where.is_relative_to(tree.resolve()):
                raise SystemExit(f"bench.compare: the {name} tree imports kvs from {where}, not from {tree}")
        order_of_trees = list(trees)
        for suite in suites:
            rounds = []
            for r in range(args.rounds):
                shift = r % len(order_of_trees)
                order = order_of_trees[shift:] + order_of_trees[:shift]
                one: dict[str, list[dict[str, Any]]] = {}
                for name in order:
                    console.print(f"round {r + 1}/{args.rounds}: {suite} from {name}")
                    one[name] = run_suite(trees[name], suite, args.gil, args.quick)
                    results["records"] += [{**rec, "tree": name, "round": r + 1} for rec in one[name]]
                rounds.append(one)
            for i, older in enumerate(order_of_trees):
                for newer in order_of_trees[i + 1:]:
                    pairs = pair_rounds(rounds, head=newer, base=older)
                    results["pairs"] += pairs
                    table = Table(title=f"{suite}: {newer} / {older}, median of {args.rounds} paired rounds "
                                        f"(GIL {args.gil})")
                    for column in ("figure", "measure", "ratio", "min", "max"):
                        table.add_column(column, justify="left" if column in ("figure", "measure") else "right")
                    for row in pairs:
                        table.add_row(describe(row), row["measure"], f"{row['head_over_base']:.3f}",
                                      f"{row['min']:.3f}", f"{row['max']:.3f}")
                    console.print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(results, indent=1))
    console.print(f"results: {args.out / 'compare.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""scripts/bench: run the benchmark suites, show progress and tables, write JSON and plots.

    python -m bench [--quick] [--suite server|engine|pool|load|resp|ycsb|all] [--gil both|off|on]
                    [--resp-threads N] [--resp-scheduling batch|normal] [--records N] [--out DIR]

Each (suite, GIL mode) runs in a child process of its own, started with ``PYTHON_GIL=0`` or
``PYTHON_GIL=1`` (the same free-threaded binary, with and without the GIL). The child reports
progress as JSON lines on stdout and writes its records to a file; this parent draws the rich
progress bars, merges the records with one metadata record into ``DIR/results.json``, prints
tables (and the GIL off/on ratios when both ran) and draws the plots (``bench/plots.py``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvs.server.scheduling import SCHEDULING

SUITES = {  # name: module with run(quick, progress) -> list[dict]
    "pool": "bench.pool_bench",
    "engine": "bench.engine_bench",
    "server": "bench.server_bench",
    "load": "bench.server_load",
    "resp": "bench.resp_bench",
    "ycsb": "bench.ycsb_bench",
}
ALL = ["pool", "engine", "server", "load", "resp", "ycsb"]
ROOT = Path(__file__).resolve().parent.parent


def resp_options(resp_threads: int | None, resp_scheduling: str | None) -> dict[str, object]:
    """The resp suite's kvs-server options given on the command line, as ``run`` keywords."""
    options: dict[str, object] = {}
    if resp_threads:
        options["kvs_threads"] = resp_threads
    if resp_scheduling:
        options["kvs_scheduling"] = resp_scheduling
    return options


def suite_options(suite: str, args: argparse.Namespace) -> dict[str, object]:
    """The ``run`` keywords of ``suite`` given on the command line."""
    if suite == "resp":
        return resp_options(args.resp_threads, args.resp_scheduling)
    if suite == "ycsb" and args.records:
        return {"records": args.records}
    return {}


def child_flags(suite: str, args: argparse.Namespace) -> list[str]:
    """The command-line flags that pass :func:`suite_options` on to a child process."""
    if suite == "resp":
        return ((["--resp-threads", str(args.resp_threads)] if args.resp_threads else [])
                + (["--resp-scheduling", args.resp_scheduling] if args.resp_scheduling else []))
    if suite == "ycsb" and args.records:
        return ["--records", str(args.records)]
    return []


def run_child(suite: str, quick: bool, out_file: str, options: dict[str, object]) -> int:
    """In the child process: run one suite, progress as JSON lines, records to ``out_file``."""
    module = importlib.import_module(SUITES[suite])

    def progress(done: int, total: int, description: str) -> None:
        print(json.dumps({"progress": [done, total, description]}), flush=True)

    records = module.run(quick, progress, **options)
    Path(out_file).write_text(json.dumps(records))
    return 0


def run_suite(suite: str, gil: str, quick: bool, bar, task, flags: list[str]) -> list[dict]:
    """In the parent: one child process for ``suite`` with the GIL ``gil`` ("off"/"on")."""
    env = dict(os.environ, PYTHON_GIL="1" if gil == "on" else "0")
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_file = f.name
    cmd = [sys.executable, "-m", "bench", "--child", "--suite", suite, "--out", out_file]
    cmd += ["--quick"] if quick else []
    cmd += flags
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        try:
            done, total, description = json.loads(line)["progress"]
        except (ValueError, KeyError, TypeError):
            sys.stdout.write(line)
            continue
        bar.update(task, completed=done, total=max(total, 1), description=f"{suite} (GIL {gil}): {description}")
    status = proc.wait()
    try:
        if status != 0:
            raise SystemExit(f"bench: the {suite} suite failed (GIL {gil}, exit status {status})")
        return json.loads(Path(out_file).read_text())
    finally:
        os.unlink(out_file)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repetitions (under 2 minutes)")
    parser.add_argument("--suite", choices=[*SUITES, "all"], default="all")
    parser.add_argument("--gil", choices=["both", "off", "on"], default="both",
                        help="run with the GIL disabled, enabled, or both (default both)")
    parser.add_argument("--resp-threads", type=int, default=None, metavar="N",
                        help="kvs-server pool threads in the resp suite (default: one per CPU)")
    parser.add_argument("--resp-scheduling", choices=SCHEDULING, default=None,
                        help="kvs-server --scheduling in the resp suite (default: the server's, batch)")
    parser.add_argument("--records", type=int, default=None, metavar="N",
                        help="records loaded by the ycsb suite (default 1M, quick 100k)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", metavar="DIR")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resp_threads is not None and args.resp_threads < 1:
        parser.error("--resp-threads must be at least 1")
    if args.records is not None and args.records < 2:
        parser.error("--records must be at least 2")
    if args.child:
        return run_child(args.suite, args.quick, str(args.out), suite_options(args.suite, args))

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench import plots, report
    from bench.common import metadata

    console = Console(width=None if sys.stdout.isatty() else 200)
    suites = ALL if args.suite == "all" else [args.suite]
    modes = ["off", "on"] if args.gil == "both" else [args.gil]
    records: list[dict] = []
    before = metadata(quick=args.quick, suites=suites, gil_modes=modes)  # what ran before we did
    seconds: dict[str, float] = {}
    started = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        for suite in suites:
            for gil in modes:  # off and on interleaved per suite: both see the same machine state
                task = bar.add_task(f"{suite} (GIL {gil})", total=1)
                t0 = time.monotonic()
                records += run_suite(suite, gil, args.quick, bar, task, child_flags(suite, args))
                seconds[f"{suite} (GIL {gil})"] = round(time.monotonic() - t0, 1)
                bar.update(task, completed=bar.tasks[task].total)
    args.out.mkdir(parents=True, exist_ok=True)
    before.update(seconds_per_suite=seconds, seconds_total=round(time.monotonic() - started, 1))
    results = [before, *records]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    report.print_tables(console, records)
    written = plots.draw_all(records, args.out)
    console.print("wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
                  + f"; total {before['seconds_total']:.0f} s")
    console.print(f"results: {args.out / 'results.json'}")
    for path in written:
        console.print(f"plot: {path}")
    console.print(f"README tables from this run: python -m bench.readme --results {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

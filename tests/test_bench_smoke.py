"""Every benchmark suite runs, tiny, so the benchmarks cannot rot. Correctness only: each
suite asserts its own results; here we check that it produced well-formed records. Also:
the README's Performance tables are what ``bench.readme`` makes of docs/perf/results.json,
and every plot can be redrawn from that file."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench import plots, readme
from bench.records import load

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "perf" / "results.json"
REQUIRED = {"suite", "benchmark", "engine", "pool", "threads", "gil", "ops_per_sec", "p50_us", "p99_us"}
PLOTS = ("free_threading.png", "server_threads.png", "server_configs.png", "engine_peers.png")


def run_suite(name: str, monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    monkeypatch.setenv("KVS_BENCH_SMOKE", "1")
    import bench.common

    importlib.reload(bench.common)
    module = importlib.reload(importlib.import_module(name))
    return module.run(quick=True)


def check_records(records: list[dict], suite: str) -> None:
    assert records, "the suite produced no records"
    for rec in records:
        assert REQUIRED <= rec.keys(), rec
        assert rec["suite"] == suite
        assert rec["gil"] is False
        json.dumps(rec)  # serializable


@pytest.mark.parametrize("module,suite", [
    ("bench.pool_bench", "pool"),
    ("bench.engine_bench", "engine"),
    ("bench.server_bench", "server"),
    ("bench.server_load", "load"),
    ("bench.ycsb_bench", "ycsb"),
])
def test_suite_smoke(module: str, suite: str, monkeypatch: pytest.MonkeyPatch) -> None:
    check_records(run_suite(module, monkeypatch), suite)


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None,
                    reason="redis-server/redis-benchmark (Debian) not installed; scripts/test installs them as root")
def test_resp_suite_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    check_records(run_suite("bench.resp_bench", monkeypatch), "resp")


def test_harness_writes_results_and_plots(tmp_path: Path) -> None:
    env = dict(os.environ, KVS_BENCH_SMOKE="1")
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--suite", "server", "--gil", "both",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results[0]["suite"] == "meta" and results[0]["free_threaded_build"] is True
    assert {r["gil"] for r in results[1:]} == {False, True}
    for plot in ("free_threading.png", "server_threads.png", "server_configs.png"):  # no engine suite ran
        assert (tmp_path / plot).stat().st_size > 10_000
    assert not (tmp_path / "engine_peers.png").exists()
    assert "free threading vs the GIL" in out.stdout


def test_readme_tables_are_generated_from_the_committed_results() -> None:
    """The README's Performance tables are bench.readme's rendering of docs/perf/results.json:
    after a new run, regenerate them (``python -m bench.readme``); never edit them by hand."""
    expected = readme.render(*load(RESULTS))
    assert readme.generated_part((ROOT / "README.md").read_text()) == expected


def test_readme_check_reports_stale_tables(tmp_path: Path) -> None:
    stale = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    stale.write_text(text.replace("| set, 1 thread |", "| set, 1 thread (edited) |", 1))
    assert readme.main(["--results", str(RESULTS), "--readme", str(stale), "--check"]) == 1
    assert readme.main(["--results", str(RESULTS), "--readme", str(stale)]) == 0
    assert stale.read_text() == text
    assert readme.main(["--results", str(RESULTS), "--readme", str(stale), "--check"]) == 0


def test_every_plot_redraws_from_the_committed_results(tmp_path: Path) -> None:
    assert plots.main([str(RESULTS), str(tmp_path)]) == 0
    for plot in PLOTS:
        assert (tmp_path / plot).stat().st_size > 10_000, plot
    committed = {p.name for p in RESULTS.parent.glob("*.png")}
    assert committed == set(PLOTS), "docs/perf/ holds exactly the plots bench.plots draws"

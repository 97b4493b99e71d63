"""Every benchmark suite runs, tiny, so the benchmarks cannot rot. Correctness only: each
suite asserts its own results; here we check that it produced well-formed records."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"suite", "benchmark", "engine", "pool", "threads", "gil", "ops_per_sec", "p50_us", "p99_us"}


def run_suite(name: str) -> list[dict]:
    os.environ["KVS_BENCH_SMOKE"] = "1"
    try:
        import bench.common

        importlib.reload(bench.common)
        module = importlib.reload(importlib.import_module(name))
        return module.run(quick=True)
    finally:
        del os.environ["KVS_BENCH_SMOKE"]


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
])
def test_suite_smoke(module: str, suite: str) -> None:
    check_records(run_suite(module), suite)


@pytest.mark.skipif(shutil.which("redis-server") is None or shutil.which("redis-benchmark") is None,
                    reason="redis-server/redis-benchmark (Debian) not installed; scripts/test installs them as root")
def test_resp_suite_smoke() -> None:
    check_records(run_suite("bench.resp_bench"), "resp")


def test_harness_writes_results_and_plots(tmp_path: Path) -> None:
    env = dict(os.environ, KVS_BENCH_SMOKE="1")
    out = subprocess.run([sys.executable, "-m", "bench", "--quick", "--suite", "server", "--gil", "both",
                          "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results[0]["suite"] == "meta" and results[0]["free_threaded_build"] is True
    assert {r["gil"] for r in results[1:]} == {False, True}
    for plot in ("server_threads.png", "server_configs.png", "gil_ab.png"):
        assert (tmp_path / plot).stat().st_size > 10_000
    assert "free threading vs the GIL" in out.stdout

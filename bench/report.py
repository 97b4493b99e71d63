"""Rich tables of benchmark records, and the GIL off/on comparison."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.console import Console
from rich.table import Table

from bench.records import CLEAR_CHANGE

MEASURES = {"gil", "ops_per_sec", "ops_per_sec_p5", "ops_per_sec_p95", "p50_us", "p99_us", "reps",
            "seconds", "bytes_per_key", "ratio", "redis_ops_per_sec", "kvs_ops_per_sec", "note",
            "ratio_to_best_peer", "ratio_to_best_peer_range", "ratio_to_cache_off", "ratio_to_cache_off_range",
            "ratio_to_1_thread", "ratios", "load_seconds"}
_SHOWN_EXTRAS = ("workload", "producers", "connections", "pipeline", "client_connections", "target", "command")


def identity(rec: dict[str, Any]) -> tuple:
    """What a record measured, without the measurement: pairs GIL-off with GIL-on runs."""
    return tuple(sorted((k, str(v)) for k, v in rec.items() if k not in MEASURES))


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def suite_table(suite: str, records: list[dict]) -> Table:
    extras = [k for k in _SHOWN_EXTRAS if any(k in r for r in records)]
    special = [k for k in ("seconds", "bytes_per_key", "ratio") if any(r.get(k) is not None for r in records)]
    table = Table(title=f"suite: {suite}", show_lines=False)
    for col in ["benchmark", "engine", "pool", "threads", *extras, "GIL", "ops/s (median)", "p5-p95 ops/s",
                "p50 us", "p99 us", *special]:
        table.add_column(col, justify="right" if col not in ("benchmark", "engine", "pool") else "left")
    for r in records:
        spread = "-"
        if r.get("ops_per_sec_p5") is not None:
            spread = f"{r['ops_per_sec_p5']:,.0f}-{r['ops_per_sec_p95']:,.0f}"
        table.add_row(r["benchmark"], _fmt(r.get("engine")), _fmt(r.get("pool")), _fmt(r.get("threads")),
                      *[_fmt(r.get(k)) for k in extras], "on" if r.get("gil") else "off",
                      _fmt(r.get("ops_per_sec")), spread, _fmt(r.get("p50_us"), 1), _fmt(r.get("p99_us"), 1),
                      *[_fmt(r.get(k), 3 if k != "bytes_per_key" else 1) for k in special])
    return table


def ycsb_table(records: list[dict]) -> Table:
    """The ycsb suite's records of one GIL mode as workload rows with an ops/s column per
    engine, kvs's ratios and latency."""
    engines = list(dict.fromkeys(r["engine"] for r in records))
    first = records[0]
    table = Table(title=f"suite: ycsb, {first['records']:,} records, {first['ops']:,} operations per workload, "
                        f"GIL {'on' if first['gil'] else 'off'} (ops/s, median of rounds)")
    for col in ("workload", "threads", *engines, "kvs / best peer", "kvs / cache off", "kvs p50 / p99 us"):
        table.add_column(col, justify="right")
    by = {(r["workload"], r["threads"], r["engine"]): r for r in records}
    for w, threads in sorted({(r["workload"], r["threads"]) for r in records}):
        kvs = by.get((w, threads, "kvs"), {})
        table.add_row(w, str(threads),
                      *[_fmt(by[(w, threads, e)]["ops_per_sec"]) if (w, threads, e) in by else "-" for e in engines],
                      f"{kvs['ratio_to_best_peer']:.2f}x" if "ratio_to_best_peer" in kvs else "-",
                      f"{kvs['ratio_to_cache_off']:.2f}x" if "ratio_to_cache_off" in kvs else "-",
                      f"{kvs['p50_us']:.1f} / {kvs['p99_us']:.1f}" if kvs.get("p50_us") is not None else "-")
    return table


def gil_pairs(records: list[dict]) -> list[tuple[dict, dict]]:
    """(GIL off, GIL on) record pairs that measured the same thing."""
    by_id: dict[tuple, dict[bool, dict]] = defaultdict(dict)
    for r in records:
        by_id[identity(r)][bool(r.get("gil"))] = r
    return [(v[False], v[True]) for v in by_id.values() if False in v and True in v]


def gil_table(records: list[dict]) -> Table | None:
    pairs = [(off, on) for off, on in gil_pairs(records) if off.get("ops_per_sec") and on.get("ops_per_sec")]
    if not pairs:
        return None
    table = Table(title="free threading vs the GIL (same binary, PYTHON_GIL=0 vs 1)")
    extras = [k for k in _SHOWN_EXTRAS if any(k in off for off, _ in pairs)]
    for col in ["suite", "benchmark", "engine", "pool", "threads", *extras, "GIL off ops/s", "GIL on ops/s", "off/on"]:
        table.add_column(col, justify="left" if col in ("suite", "benchmark", "engine", "pool") else "right")
    for off, on in pairs:
        ratio = off["ops_per_sec"] / on["ops_per_sec"]
        style = "green" if ratio >= 1 + CLEAR_CHANGE else ("red" if ratio <= 1 - CLEAR_CHANGE else "")
        table.add_row(off["suite"], off["benchmark"], _fmt(off.get("engine")), _fmt(off.get("pool")),
                      _fmt(off.get("threads")), *[_fmt(off.get(k)) for k in extras],
                      _fmt(off["ops_per_sec"]), _fmt(on["ops_per_sec"]),
                      f"[{style}]{ratio:.2f}x[/{style}]" if style else f"{ratio:.2f}x")
    return table


def print_tables(console: Console, records: list[dict]) -> None:
    by_suite: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_suite[r["suite"]].append(r)
    for suite, recs in by_suite.items():
        if suite == "ycsb":
            for gil in (False, True):
                if any(bool(r["gil"]) is gil for r in recs):
                    console.print(ycsb_table([r for r in recs if bool(r["gil"]) is gil]))
        else:
            console.print(suite_table(suite, recs))
    table = gil_table(records)
    if table is not None:
        console.print(table)

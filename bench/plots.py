"""PNG plots of benchmark records (matplotlib, headless Agg backend); each answers one question.

    python -m bench.plots [RESULTS] [OUT_DIR]

redraws every plot from a results file without running anything (default
``docs/perf/results.json``, into the results file's own directory). ``scripts/bench`` draws
them at the end of a run (:func:`draw_all`). The plots:

- ``free_threading.png``: what free threading buys, per suite: throughput with the GIL off
  over with it on, for the comparisons of :data:`bench.records.FREE_THREADING`.
- ``server_threads.png``: the course's graph, throughput against server pool threads.
- ``server_configs.png``: which server configuration is fastest at each thread count.
- ``engine_peers.png``: the kvs engine against stdlib sqlite3 and diskcache.
- ``ycsb.png``: YCSB's workloads at a million records, kvs against its peers (and against
  itself with the value cache off), one panel per thread count.

A plot whose records the run did not produce (a run of some suites only) is not drawn.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before pyplot is imported: no display
import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from bench.records import (
    CLEAR_CHANGE,
    ENGINE_THREADS,
    FREE_THREADING,
    PEER_ENGINES,
    YCSB_ENGINES,
    YCSB_WORKLOADS,
    Record,
    load,
    one,
    value_bytes,
)

DPI = 100
FASTER, UNCLEAR, SLOWER, CONTROL = "#2e8b57", "#8fb8d8", "#c0392b", "#9e9e9e"
CONFIGURATIONS = [  # (pool, engine, I/O model, label): the server suite's configurations
    ("shared-queue", "kvs", "leader-followers", "shared-queue + kvs, leader-followers (default)"),
    ("shared-queue", "kvs", "dispatch", "shared-queue + kvs, dispatch"),
    ("work-stealing", "kvs", "dispatch", "work-stealing + kvs, dispatch"),
    ("executor", "kvs", "dispatch", "executor + kvs, dispatch"),
    ("work-stealing", "sqlite", "dispatch", "work-stealing + sqlite, dispatch"),
]
WORKLOADS = (("write", "write: SET"), ("read", "read: GET"))

plt.rcParams.update({"font.size": 11, "axes.titlesize": 12, "axes.titleweight": "bold",
                     "axes.spines.top": False, "axes.spines.right": False})


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _has(records: list[Record], suite: str, gil: bool | None = None) -> bool:
    return any(r["suite"] == suite and (gil is None or r["gil"] is gil) for r in records)


def _thousands_with_spread(recs: list[Record]) -> tuple[list[float], list[float], list[float]]:
    """Each record's median throughput in thousands, and how far below and above it its p5
    and p95 lie (matplotlib's ``yerr``; zero where a record has no spread)."""
    values, low, high = [], [], []
    for r in recs:
        median = float(r["ops_per_sec"]) / 1000
        values.append(median)
        low.append(median - float(r.get("ops_per_sec_p5") or r["ops_per_sec"]) / 1000)
        high.append(float(r.get("ops_per_sec_p95") or r["ops_per_sec"]) / 1000 - median)
    return values, low, high


# ----------------------------------------------------------------------------- free threading
def _ratio_panel(ax: Axes, title: str, labels: list[str], ratios: list[float], controls: list[bool],
                 xmax: float) -> None:
    """Horizontal off/on bars, top to bottom, with the 1.0 line and each bar's value."""
    ys = range(len(labels))
    colors = [CONTROL if control else FASTER if r >= 1 + CLEAR_CHANGE else SLOWER if r <= 1 - CLEAR_CHANGE else UNCLEAR
              for r, control in zip(ratios, controls, strict=True)]
    ax.barh(ys, ratios, color=colors, height=0.7)
    for y, ratio in zip(ys, ratios, strict=True):
        ax.text(ratio + xmax * 0.01, y, f"{ratio:.2f}x", va="center", fontsize=10)
    ax.axvline(1.0, color="black", linewidth=1.2)
    ax.set_yticks(list(ys), labels, fontsize=10)
    ax.invert_yaxis()
    ax.set_xlim(0, xmax)
    ax.set_title(title, loc="left")
    ax.grid(axis="x", alpha=0.3)


def free_threading(records: list[Record], out: Path) -> Path | None:
    """What free threading buys, per suite: a panel of GIL off/on ratio bars for each suite
    the run measured in both modes (of a partial run, the comparisons it measured)."""
    panels = []
    for suite in FREE_THREADING:
        measured = [c for c in suite.comparisons if c.measured(records)]
        if measured:
            panels.append((suite.suite, suite.title, measured, [c.ratio(records) for c in measured]))
    if not panels:
        return None
    xmax = max(max(ratios) for *_, ratios in panels) * 1.15
    rows = (len(panels) + 1) // 2
    fig, axes = plt.subplots(rows, 2, figsize=(15, 3.4 * rows + 1.2), squeeze=False)
    for ax, (name, title, comparisons, ratios) in zip(axes.flat, panels, strict=False):
        labels = [c.label + (" (control)" if c.control else "") for c in comparisons]
        _ratio_panel(ax, f"{name}: {title}", labels, ratios, [c.control for c in comparisons], xmax)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
        ax.text(0, 0.5, f"Green: at least {CLEAR_CHANGE:.0%} faster with the GIL off; red: at least\n"
                f"{CLEAR_CHANGE:.0%} slower; blue: within {CLEAR_CHANGE:.0%}, no clear change.\n"
                "Grey: controls, not kvs. Redis does not run Python, so its\n"
                "bars show how far the machine drifted between the two runs;\n"
                "pure arithmetic on 2 threads is what the machine gave them.",
                fontsize=11, va="center", transform=ax.transAxes)
    for ax in axes[-1]:
        ax.set_xlabel("throughput with the GIL off / with the GIL on")
    fig.suptitle("What free threading buys: the same binary with PYTHON_GIL=0 vs 1 (black line: no change)",
                 fontsize=14, fontweight="bold")
    fig.tight_layout()
    return _save(fig, out / "free_threading.png")


# ----------------------------------------------------------------------------- server suite
def _server_record(records: list[Record], workload: str, pool: str, engine: str, io_model: str, threads: int,
                   gil: bool) -> Record | None:
    found = [r for r in records if r["suite"] == "server" and r.get("workload") == workload and r["pool"] == pool
             and r["engine"] == engine and r.get("io_model") == io_model and r["threads"] == threads
             and r["gil"] is gil]
    return found[0] if len(found) == 1 else None


def _thread_counts(records: list[Record]) -> list[int]:
    return sorted({r["threads"] for r in records if r["suite"] == "server"})


def _iteration(records: list[Record]) -> str:
    first = next(r for r in records if r["suite"] == "server")
    connections = first.get("client_connections")
    requests = first.get("requests_per_iteration", 1000)  # runs before the field was recorded sent 1000
    return f"{requests} requests per iteration" + (f" over {connections} connections" if connections else "")


def server_threads(records: list[Record], out: Path) -> Path | None:
    """The course's graph: throughput against server pool threads, a line per configuration,
    GIL off solid, GIL on dashed."""
    if not _has(records, "server"):
        return None
    threads = _thread_counts(records)
    modes = [gil for gil in (False, True) if _has(records, "server", gil)]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    markers = "osD^v"
    for ax, (workload, title) in zip(axes, WORKLOADS, strict=True):
        for i, (pool, engine, io_model, _label) in enumerate(CONFIGURATIONS):
            for gil in modes:
                points = [(t, r["ops_per_sec"] / 1000) for t in threads
                          if (r := _server_record(records, workload, pool, engine, io_model, t, gil)) is not None]
                if points:
                    ax.plot([p[0] for p in points], [p[1] for p in points], color=f"C{i}", marker=markers[i],
                            markersize=7, linewidth=2.2 if not gil else 1.6, linestyle="--" if gil else "-",
                            alpha=1.0 if not gil else 0.75)
        ax.set_title(title, loc="left")
        ax.set_xlabel("server pool threads")
        ax.set_ylabel("thousand requests/s")
        ax.set_xticks(threads)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    config_handles = [Line2D([], [], color=f"C{i}", marker=markers[i], linewidth=2.2, label=label)
                      for i, (*_, label) in enumerate(CONFIGURATIONS)]
    gil_handles = [Line2D([], [], color="black", linewidth=2.2, label="GIL off (free-threaded)"),
                   Line2D([], [], color="black", linewidth=1.6, linestyle="--", label="GIL on")]
    fig.legend(handles=config_handles, loc="lower left", ncol=3, fontsize=10, frameon=False,
               bbox_to_anchor=(0.02, 0.0))
    fig.legend(handles=gil_handles, loc="lower right", ncol=1, fontsize=10, frameon=False,
               bbox_to_anchor=(0.98, 0.0))
    fig.suptitle(f"Course server benchmark: throughput vs pool threads ({_iteration(records)})",
                 fontsize=14, fontweight="bold")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return _save(fig, out / "server_threads.png")


def server_configs(records: list[Record], out: Path) -> Path | None:
    """Which configuration is fastest at each thread count (GIL off), with the p5-p95 spread
    of the repetitions: where the whiskers overlap, the order is noise."""
    if not _has(records, "server", False):
        return None
    threads = _thread_counts(records)
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    width = 0.8 / len(CONFIGURATIONS)
    for ax, (workload, title) in zip(axes, WORKLOADS, strict=True):
        for i, (pool, engine, io_model, label) in enumerate(CONFIGURATIONS):
            found = [_server_record(records, workload, pool, engine, io_model, t, False) for t in threads]
            xs = [x + (i - (len(CONFIGURATIONS) - 1) / 2) * width for x, r in enumerate(found) if r is not None]
            values, low, high = _thousands_with_spread([r for r in found if r is not None])
            ax.bar(xs, values, width, yerr=[low, high], capsize=3, color=f"C{i}", label=label,
                   error_kw={"elinewidth": 1, "ecolor": "#333333"})
        ax.set_xticks(range(len(threads)), [str(t) for t in threads])
        ax.set_xlabel("server pool threads")
        ax.set_ylabel("thousand requests/s")
        ax.set_title(f"{title} (GIL off)", loc="left")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=10, frameon=False)
    fig.suptitle("Course server benchmark: the configurations side by side (whiskers: p5-p95 of the repetitions)",
                 fontsize=14, fontweight="bold")
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return _save(fig, out / "server_configs.png")


# ----------------------------------------------------------------------------- engine suite
def _grouped_bars(ax: Axes, groups: Sequence[str], recs_per_engine: list[list[Record]],
                  engines: Sequence[tuple[str, str]] = PEER_ENGINES, fontsize: int = 9) -> None:
    """Bars of thousand ops/s, one group per entry of ``groups``, one bar per engine of
    ``engines``, p5-p95 whiskers and the value above each bar."""
    width = 0.8 / len(engines)
    top = max(v + h for recs in recs_per_engine for v, _, h in zip(*_thousands_with_spread(recs), strict=True))
    for i, ((_engine, label), recs) in enumerate(zip(engines, recs_per_engine, strict=True)):
        xs = [x + (i - (len(engines) - 1) / 2) * width for x in range(len(groups))]
        values, low, high = _thousands_with_spread(recs)
        ax.bar(xs, values, width, yerr=[low, high], capsize=3, color=f"C{i}", label=label,
               error_kw={"elinewidth": 1, "ecolor": "#333333"})
        for x, v, h in zip(xs, values, high, strict=True):
            ax.text(x, v + h + top * 0.01, f"{v:,.0f}k", ha="center", va="bottom", fontsize=fontsize)
    ax.set_xticks(range(len(groups)), list(groups))
    ax.set_ylim(0, top * 1.12)
    ax.set_ylabel("thousand operations/s")
    ax.grid(axis="y", alpha=0.3)


def engine_peers(records: list[Record], out: Path) -> Path | None:
    """The kvs engine against its peers, GIL off: set and get on one thread, and get with
    1, 2 and 4 reader threads."""
    if not _has(records, "engine", False):
        return None
    try:
        single = [[one(records, suite="engine", benchmark=b, engine=e, gil=False)
                   for b in ("set_1thread", "get_1thread")] for e, _ in PEER_ENGINES]
        threaded = [[one(records, suite="engine", benchmark="get_threads", engine=e, threads=n, gil=False)
                     for n in ENGINE_THREADS] for e, _ in PEER_ENGINES]
    except LookupError:  # an engine run restricted to some benchmarks (--only)
        return None
    first = single[0][0]
    fig, axes = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [2, 3]})
    _grouped_bars(axes[0], ["set", "get"], single)
    axes[0].set_title("one thread", loc="left")
    _grouped_bars(axes[1], [f"{n} thread{'s' if n > 1 else ''}" for n in ENGINE_THREADS], threaded)
    axes[1].set_title("get with several reader threads", loc="left")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=11, frameon=False)
    fig.suptitle(f"Engines in process, GIL off: {value_bytes(first)}-byte values, {first['keys']:,} keys "
                 "(whiskers: p5-p95)", fontsize=14, fontweight="bold")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(fig, out / "engine_peers.png")


# ----------------------------------------------------------------------------- ycsb suite
def ycsb(records: list[Record], out: Path) -> Path | None:
    """YCSB's workloads, GIL off: a group of engine bars per workload, a panel per thread
    count."""
    if not _has(records, "ycsb", False):
        return None
    threads = sorted({r["threads"] for r in records if r["suite"] == "ycsb"})
    try:
        panels = [[[one(records, suite="ycsb", workload=w, engine=e, threads=n, gil=False) for w in YCSB_WORKLOADS]
                   for e, _ in YCSB_ENGINES] for n in threads]
    except LookupError:  # a run restricted to some workloads or engines
        return None
    first = panels[0][0][0]
    fig, axes = plt.subplots(len(threads), 1, figsize=(15, 5.5 * len(threads)), squeeze=False)
    for ax, n, recs in zip(axes[:, 0], threads, panels, strict=True):
        groups = [f"{w}: {r['description']}" for w, r in zip(YCSB_WORKLOADS, recs[0], strict=True)]
        _grouped_bars(ax, groups, recs, YCSB_ENGINES, fontsize=7)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_title(f"{n} thread{'s' if n > 1 else ''}", loc="left")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(YCSB_ENGINES), fontsize=11, frameon=False)
    fig.suptitle(f"YCSB core workloads, GIL off: {first['records']:,} records of {first['value_bytes']} bytes, "
                 f"{first['ops']:,} operations each (whiskers: p5-p95 of rounds)", fontsize=14, fontweight="bold")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return _save(fig, out / "ycsb.png")


def draw_all(records: list[Record], out: Path) -> list[Path]:
    """Every plot the records allow; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [free_threading(records, out), server_threads(records, out), server_configs(records, out),
             engine_peers(records, out), ycsb(records, out)]
    return [p for p in paths if p is not None]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 2 or any(a.startswith("-") for a in args):
        print("usage: python -m bench.plots [RESULTS] [OUT_DIR]", file=sys.stderr)
        return 2
    results = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "docs" / "perf" / "results.json"
    out = Path(args[1]) if len(args) > 1 else results.parent
    _meta, records = load(results)
    for path in draw_all(records, out):
        print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

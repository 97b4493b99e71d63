"""PNG plots of benchmark records (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.report import gil_pairs  # noqa: E402


def _config(r: dict) -> str:
    io = r.get("io_model")
    return f"{r.get('pool')} + {r.get('engine')}" + (f" ({io})" if io and io != "dispatch" else "")


def server_threads(records: list[dict], out: Path) -> Path | None:
    """The course's graph: throughput against server pool threads, a line per configuration."""
    recs = [r for r in records if r["suite"] == "server"]
    if not recs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 6.5), sharey=False)
    for ax, workload in zip(axes, ("write", "read")):
        lines: dict[tuple[str, bool], list[tuple[int, float]]] = defaultdict(list)
        for r in recs:
            if r.get("workload") == workload:
                lines[(_config(r), bool(r["gil"]))].append((r["threads"], r["ops_per_sec"]))
        colors = {}
        for (config, gil), points in sorted(lines.items()):
            points.sort()
            color = colors.setdefault(config, f"C{len(colors)}")
            ax.plot([p[0] for p in points], [p[1] / 1000 for p in points], marker="o", color=color,
                    linestyle="--" if gil else "-", label=f"{config} ({'GIL' if gil else 'free-threaded'})")
        ax.set_title(f"{workload}: 1000 {'SET' if workload == 'write' else 'GET'} requests per iteration")
        ax.set_xlabel("server pool threads")
        ax.set_ylabel("throughput (thousand requests/s)")
        ax.set_xticks(sorted({r["threads"] for r in recs}))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    # One legend for both panels, below them: inside, it hid the lines.
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle("kvs server throughput vs pool threads (solid: GIL off, dashed: GIL on)")
    fig.tight_layout(rect=(0, 0.06 + 0.028 * ((len(labels) + 1) // 2), 1, 1))
    path = out / "server_threads.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def server_configs(records: list[dict], out: Path) -> Path | None:
    """The configurations side by side at each thread count (GIL off)."""
    recs = [r for r in records if r["suite"] == "server" and not r["gil"]]
    if not recs:
        return None
    threads = sorted({r["threads"] for r in recs})
    configs = sorted({_config(r) for r in recs})
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(configs)
    for ax, workload in zip(axes, ("write", "read")):
        for i, config in enumerate(configs):
            values = []
            for t in threads:
                match = [r["ops_per_sec"] for r in recs if r.get("workload") == workload and _config(r) == config and r["threads"] == t]
                values.append(match[0] / 1000 if match else 0)
            ax.bar([x + i * width for x in range(len(threads))], values, width, label=config)
        ax.set_xticks([x + 0.4 - width / 2 for x in range(len(threads))], [str(t) for t in threads])
        ax.set_xlabel("server pool threads")
        ax.set_ylabel("throughput (thousand requests/s)")
        ax.set_title(f"{workload} (GIL off)")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path = out / "server_configs.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def gil_ab(records: list[dict], out: Path) -> Path | None:
    """Free-threaded throughput divided by GIL throughput, for every measured pair."""
    pairs = [(a, b) for a, b in gil_pairs(records) if a.get("ops_per_sec") and b.get("ops_per_sec")]
    if not pairs:
        return None
    pairs.sort(key=lambda p: (p[0]["suite"], p[0]["benchmark"], str(p[0].get("threads"))))
    labels = []
    for off, _on in pairs:
        extra = "".join(f" {k}={off[k]}" for k in ("producers", "connections", "pipeline") if off.get(k) is not None)
        t = f" t={off['threads']}" if off.get("threads") is not None else ""
        labels.append(f"{off['suite']}: {off['benchmark']} {off.get('engine') or ''}{t}{extra}".replace("  ", " "))
    ratios = [off["ops_per_sec"] / on["ops_per_sec"] for off, on in pairs]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.22 * len(pairs) + 1)))
    ax.barh(range(len(pairs)), ratios, color=["C2" if r >= 1 else "C3" for r in ratios])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_yticks(range(len(pairs)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("throughput with GIL off / with GIL on (same binary; >1: free threading wins)")
    ax.set_title("What free threading buys")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = out / "gil_ab.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(records: list[dict], out: Path) -> list[Path]:
    """Every plot the records allow; the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [server_threads(records, out), server_configs(records, out), gil_ab(records, out)]
    return [p for p in paths if p is not None]

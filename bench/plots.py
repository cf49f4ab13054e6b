"""PNG plots: B3 latency CDFs and B1 memory against connections (needs matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import RAW, RESULTS, slug
from scenarios import PEER, THIS, THIS_SDK


def _latencies(target: str, scenario: str) -> list[float]:
    """Every reply's latency of a B3 scenario, over all repetitions (load.js --dump-latencies files)."""
    values: list[float] = []
    for path in sorted(RAW.glob(f"{slug(scenario)}-{slug(target)}-rep*.txt")):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                values.append(float(parts[1]))
    return sorted(values)


def plot_all(rows: list[dict[str, Any]]) -> list[Path]:
    """Write latency_cdf.png and memory_vs_connections.png; returns the paths written (none without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG plots (pip install matplotlib)")
        return []
    written = []

    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {THIS: "tab:blue", THIS_SDK: "tab:green", PEER: "tab:orange"}
    for target, color in styles.items():
        for scenario, dash in [("B3 rate 100", "-"), ("B3 rate 500", "--")]:
            values = _latencies(target, scenario)
            if values:
                n = len(values)
                ax.plot(values, [(i + 1) / n for i in range(n)], dash, color=color, label=f"{target}, {scenario[3:]} msgs/s")
    ax.set_xscale("log")
    ax.set_xlabel("send-message → message-received, ms (log)")
    ax.set_ylabel("fraction of replies")
    written.append(_finish(plt, fig, ax, "B3 latency CDF at fixed offered rates", "latency_cdf.png", grid="both"))

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if r["scenario"] != "B1 idle" or "error" in r or not r.get("levels"):
            continue
        xs = [0] + [lv["open"] for lv in r["levels"]]
        ys = [r["baseRssMB"]] + [lv["rssMB"] for lv in r["levels"]]
        ax.plot(xs, ys, "o-", label=r["target"] + (" (joined)" if r.get("protocol") == "socketio" else " (connected)"))
    ax.set_xlabel("idle connections")
    ax.set_ylabel("server RSS, MB")
    written.append(_finish(plt, fig, ax, "B1 server memory against connections", "memory_vs_connections.png"))
    return written


def _finish(plt: Any, fig: Any, ax: Any, title: str, name: str, grid: str = "major") -> Path:
    """Title, grid and legend, then the PNG under bench/results/."""
    ax.set_title(title)
    ax.grid(True, which=grid, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = RESULTS / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

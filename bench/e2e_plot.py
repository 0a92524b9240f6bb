"""The latency-against-rate plot of `bench.e2e --plot` (matplotlib, Agg backend).

matplotlib is optional (the `bench` extra): `require_matplotlib` fails at start-up, with the
install command, rather than after minutes of benchmarking.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from common.errors import EdgeError

INSTALL_HINT = "pip install -e '.[bench]'"


class PlotUnavailableError(EdgeError, RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise `PlotUnavailableError` (with the install command) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: PLC0415 (optional: the bench extra)
    except ImportError as exc:
        msg = f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}"
        raise PlotUnavailableError(msg) from exc
    matplotlib.use("Agg")


def plot_latency(report: dict[str, Any], path: Path) -> None:
    """p50/p95/p99 publish -> result latency against the offered rate of the sweep."""
    require_matplotlib()
    import matplotlib.pyplot as plt  # noqa: PLC0415 (optional: the bench extra)

    sweep = report["sweep"]
    points = [p for p in sweep["points"] if p["received"]]
    rates = [p["offered_per_s"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for key, style in (("p50", "o-"), ("p95", "s-"), ("p99", "^-")):
        ax.plot(rates, [p["e2e_ms"][key] for p in points], style, label=key, markersize=4)
    node_max = sweep["node_max_per_s"]
    ax.axvline(node_max, color="grey", linestyle=":", linewidth=1)
    ax.annotate(
        f"node max {node_max:,.0f}/s",
        (node_max, 0.98),
        xycoords=("data", "axes fraction"),
        ha="right",
        va="top",
        fontsize=8,
        color="grey",
    )
    values = [p["e2e_ms"][k] for p in points for k in ("p50", "p99")]
    finite = [v for v in values if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("offered rate (windows/s, JSON, QoS 1)")
    ax.set_ylabel("publish -> result (ms)")
    ax.set_title(
        f"bench.e2e: {report['model']['description']}\n"
        f"{report['machine']['cpu_count']} CPUs, load {report['machine']['load_average'][0]:.2f}, "
        f"{report['date']}",
        fontsize=9,
    )
    ax.grid(visible=True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)

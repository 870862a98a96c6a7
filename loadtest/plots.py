"""PNG plots of results: a run over time (latency, rates, errors, releases, actions marked)
and a sweep (latency percentiles against offered rate, with the SLO line and the knee)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FuncFormatter

_PLAIN = FuncFormatter(lambda v, _pos: f"{v:g}")
# Minor ticks: label only 2x and 5x (a crowded axis of 20, 30, ... 90 is unreadable).
_MINOR = FuncFormatter(lambda v, _pos: f"{v:g}" if f"{v:.0e}"[0] in "25" else "")


def _log_ms(ax: Any) -> None:
    """Log scale with plain tick labels (2, 5, 10, 20 ms rather than 2x10^1)."""
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_PLAIN)
    ax.yaxis.set_minor_formatter(_MINOR)
    ax.tick_params(axis="y", which="minor", labelsize=7)


def _legend(ax: Any) -> None:
    # Outside the axes, so it never hides data.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)


def _nan(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def _mark_actions(axes: list[Any], actions: list[dict[str, Any]]) -> None:
    for a in actions:
        t = a.get("started_s")
        if t is None:
            t = a["at_s"]
        for ax in axes:
            ax.axvline(t, color="tab:purple", linestyle="--", linewidth=1)
        top = axes[0]
        top.annotate(
            a["label"],
            xy=(t, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
            color="tab:purple",
            fontsize=8,
        )
        if a.get("ended_s") is not None:
            for ax in axes:
                ax.axvspan(t, a["ended_s"], color="tab:purple", alpha=0.06)


def plot_run(doc: dict[str, Any], path: Path) -> Path:
    """Latency (p50/p99/max per second, log scale) with the SLO; offered, sent-OK and
    error rates; share per release when more than one answered. Warm-up is shaded."""
    ts = doc["timeseries"]
    t = np.array(ts["t"], dtype=float) + 0.5
    releases = ts.get("releases") or {}
    n_panels = 3 if len(releases) > 1 else 2
    fig, axes = plt.subplots(n_panels, 1, figsize=(11.5, 3.0 * n_panels + 0.6), sharex=True)
    ax = axes[0]
    for key, label, style in (
        ("max_ms", "max", ":"),
        ("p99_ms", "p99", "-"),
        ("p50_ms", "p50", "-"),
    ):
        ax.plot(t, _nan(ts[key]), style, label=label, linewidth=1.5)
    ax.axhline(doc["slo"]["p99_ms"], color="tab:red", linewidth=1, label="SLO p99")
    _log_ms(ax)
    ax.set_ylabel("latency (ms, from intended send)")
    _legend(ax)
    ax.grid(True, which="both", alpha=0.3)

    ax = axes[1]
    ax.step(t, ts["target_rate"], where="mid", color="grey", label="target rate")
    ax.plot(t, ts["offered"], label="scheduled/s", linewidth=1)
    ax.plot(t, ts["ok"], label="answered OK/s", linewidth=1.5)
    errs = np.array(ts["errors"]) + np.array(ts["dropped"])
    ax.bar(t, errs, width=0.9, color="tab:red", alpha=0.6, label="errors+dropped/s")
    if any(ts["degraded"]):
        ax.plot(t, ts["degraded"], color="tab:orange", label="degraded/s", linewidth=1)
    ax.set_ylabel("requests / s")
    _legend(ax)
    ax.grid(True, alpha=0.3)

    if n_panels == 3:
        ax = axes[2]
        total = np.maximum(1, sum(np.array(v) for v in releases.values()))
        for name, counts in sorted(releases.items()):
            ax.plot(t, np.array(counts) / total, label=f"release {name}")
        ax.set_ylabel("share of answers")
        ax.set_ylim(-0.05, 1.05)
        _legend(ax)
        ax.grid(True, alpha=0.3)

    for a in axes:
        a.axvspan(0, ts["warmup_s"], color="grey", alpha=0.12)
    _mark_actions(list(axes), doc.get("actions") or [])
    axes[-1].set_xlabel("time since start (s); shaded: warm-up, excluded from the summary")
    lat = doc["latency_ms"]
    fmt = "{:.1f}".format
    p50 = fmt(lat["p50"]) if lat["p50"] is not None else "-"
    p99 = fmt(lat["p99"]) if lat["p99"] is not None else "-"
    fig.suptitle(
        f"{doc['scenario']['name']} -> {doc['target']['kind']} {doc['target']['address']}: "
        f"{doc['offered_rate']:.0f}/s offered, p50 {p50} ms, p99 {p99} ms, "
        f"errors {doc['error_share']:.1%}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(doc: dict[str, Any], path: Path) -> Path:
    """Latency percentiles and achieved rate against offered rate."""
    # One point per rate (the last attempt when a step was repeated), at the target rate
    # so the knee marker and the points share one axis.
    steps = list({s["rate"]: s for s in doc["steps"]}.values())
    x = np.array([s["rate"] for s in steps], dtype=float)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(10.5, 7), sharex=True)
    for key in ("p50", "p90", "p99", "p99.9"):
        ax.plot(x, _nan([s["latency_ms"][key] for s in steps]), "o-", label=key, markersize=4)
    ax.axhline(doc["slo"]["p99_ms"], color="tab:red", linewidth=1, label="SLO p99")
    best = doc.get("max_sustainable_rate")
    if best is not None:
        for a in (ax, ax2):
            a.axvline(best, color="tab:green", linestyle="--", linewidth=1)
        ax.annotate(
            f"max sustainable {best:g}/s",
            xy=(best, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(4, -14),
            textcoords="offset points",
            color="tab:green",
            fontsize=9,
        )
    _log_ms(ax)
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    ax2.plot(x, [s["offered_rate"] for s in steps], color="grey", linewidth=1, label="offered")
    ax2.plot(x, [s["achieved_rate"] for s in steps], "o-", label="answered OK/s")
    ax2b = ax2.twinx()
    ax2b.plot(x, [100 * s["error_share"] for s in steps], "x--", color="tab:red", label="errors %")
    ax2b.set_ylabel("errors (%)", color="tab:red")
    ax2b.set_ylim(0, max(1.0, 110 * max(s["error_share"] for s in steps)))
    ax2.set_xlabel("target rate of the step (requests/s)")
    ax2.set_ylabel("requests / s")
    ax2.grid(True, alpha=0.3)
    lines = ax2.get_legend_handles_labels()
    lines_b = ax2b.get_legend_handles_labels()
    ax2.legend(lines[0] + lines_b[0], lines[1] + lines_b[1], loc="upper left", fontsize=8)
    title = f"sweep {doc['scenario']['name']}: SLO p99 <= {doc['slo']['p99_ms']:g} ms"
    if doc.get("generator_limited"):
        title += " (stopped: generator limited)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""Result files: ``result.json`` (the whole document), ``summary.md`` (what a person reads
first) and a PNG plot, plus ``compare`` (ratios B/A of two results: on a shared, noisy
machine, compare variants as ratios rather than absolute numbers)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.plots import plot_run, plot_sweep
from recstack.errors import UserError

LATENCY_KEYS = ("p50", "p90", "p95", "p99", "p99.9", "max")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _slo_text(slo: dict[str, Any]) -> str:
    s = f"p99 <= {slo['p99_ms']:g} ms"
    if slo.get("p50_ms"):
        s += f", p50 <= {slo['p50_ms']:g} ms"
    s += f", errors <= {slo['max_error_share']:.1%}"
    if slo.get("max_degraded_share") is not None:
        s += f", degraded <= {slo['max_degraded_share']:.1%}"
    return s


def run_markdown(doc: dict[str, Any], plot_name: str | None = "run.png") -> str:
    """The Markdown summary of one run."""
    sc, lat, sc_load = doc["scenario"], doc["latency_ms"], doc["scenario"]["load"]
    chk = doc["self_check"]
    errors = ", ".join(f"{k} {v}" for k, v in sorted(doc["errors"].items())) or "none"
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(doc["degraded_reasons"].items()))
    req = doc["requests"]
    lines = [
        f"# Load test: {sc['name']}",
        "",
        f"{sc.get('description') or ''}".strip(),
        "",
        f"- target: {doc['target']['kind']} `{doc['target']['address']}`"
        + (f" model `{doc['target']['model']}`" if "model" in doc["target"] else ""),
        f"- started {doc['started_at']}; {doc['duration_s']:g} s, of which the first "
        f"{doc['warmup_s']:g} s warm-up (excluded); {sc_load['arrival']} arrivals; "
        f"{chk['workers']} generator process(es) on {chk['event_loop']}",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| offered rate | {doc['offered_rate']:.1f}/s (target {doc['target_rate']:.1f}/s) |",
        f"| sent in window / answered OK | {doc['send_rate']:.1f}/s / "
        f"{doc['achieved_rate']:.1f}/s |",
        f"| requests scheduled / sent / OK / errors | {req['scheduled']} / {req['sent']} / "
        f"{req['ok']} / {req['errors']} |",
        "| latency p50 / p90 / p99 / p99.9 / max (ms) | "
        + " / ".join(_ms(lat[k]) for k in ("p50", "p90", "p99", "p99.9", "max"))
        + " |",
        f"| errors | {doc['error_share']:.2%} ({errors}) |",
        f"| degraded answers | {doc['degraded_share']:.2%}"
        + (f" ({reasons})" if reasons else "")
        + " |",
        f"| cold-start share of Recommend | {doc['cold_start_share']:.1%} |",
        f"| SLO ({_slo_text(doc['slo'])}) | "
        f"{'met' if doc['slo']['passed'] else 'NOT met: ' + doc['slo']['reason']} |",
        "",
        "Latency is measured from each request's intended send time (open loop), so queueing "
        "in the server is included.",
        "",
    ]
    if doc.get("releases"):
        rel = ", ".join(f"`{k}` {v}" for k, v in sorted(doc["releases"].items()))
        lines += [f"Answers by release: {rel}", ""]
    if doc.get("by_kind"):
        lines += [
            "| call | scheduled | errors | p50 | p99 | max |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, k in doc["by_kind"].items():
            kl = k["latency_ms"]
            lines.append(
                f"| {name} | {k['scheduled']} | {k['errors']} | {_ms(kl['p50'])} | "
                f"{_ms(kl['p99'])} | {_ms(kl['max'])} |"
            )
        lines.append("")
    if len(doc.get("by_deadline") or []) > 1:
        lines += _deadlines_markdown("By client deadline", doc["by_deadline"])
    lines += [
        "## Generator self-check",
        "",
        f"- send lag (intended -> actual send) p50 / p99 / max: "
        f"{_ms(chk['send_lag_ms']['p50'])} / {_ms(chk['send_lag_ms']['p99'])} / "
        f"{_ms(chk['send_lag_ms']['max'])} ms",
        f"- event-loop lag p50 / p99 / max: {_ms(chk['loop_lag_ms']['p50'])} / "
        f"{_ms(chk['loop_lag_ms']['p99'])} / {_ms(chk['loop_lag_ms']['max'])} ms",
        f"- CPU of the busiest generator process: {chk['cpu_share']:.0%} of a core; "
        f"most requests in flight: {chk['max_in_flight_seen']}",
        "",
    ]
    if chk["ok"]:
        lines += ["The generator kept its schedule: the numbers above are the server's.", ""]
    else:
        lines += ["**Warning:**", ""] + [f"- {w}" for w in chk["warnings"]] + [""]
    if doc.get("actions"):
        lines += ["## Actions", "", "| label | at | started | ended | exit | command |"]
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for a in doc["actions"]:
            lines.append(
                f"| {a['label']} | {a['at_s']:g} s | {_s(a['started_s'])} | {_s(a['ended_s'])} "
                f"| {a['returncode'] if a['returncode'] is not None else a.get('error') or '-'} "
                f"| `{a['run']}` |"
            )
        lines.append("")
    if doc.get("action_windows"):
        lines += _windows_markdown(doc["action_windows"])
    if plot_name:
        lines += [f"![latency and errors over time]({plot_name})", ""]
    return "\n".join(lines)


def _windows_markdown(windows: list[dict[str, Any]]) -> list[str]:
    """One row per action: what the calls scheduled while it ran got, and how long after
    its end full answers were back."""
    lines = [
        "## While each action ran",
        "",
        "Calls scheduled between the action's start and end; recovery: from its end to the "
        "first full Recommend answer after which the next 2 s were at most 5 % degraded.",
        "",
        "| action | window | Recommend calls | errors | degraded | p50 / p99 / max (ms) | "
        "recovered after |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for w in windows:
        errors = "; ".join(
            f"{kind}: " + ", ".join(f"{c} {n}" for c, n in sorted(codes.items()))
            for kind, codes in w["errors"].items()
        )
        lat = w["latency_ms"]
        share = w["degraded_share"]
        lines.append(
            f"| {w['label']} | {_s(w['start_s'])} - {_s(w['end_s'])} | {w['recommend']} | "
            f"{errors or 'none'} | {'-' if share is None else f'{share:.1%}'} | "
            f"{_ms(lat['p50'])} / {_ms(lat['p99'])} / {_ms(lat['max'])} | "
            f"{_s(w['recovery_s'])} |"
        )
    lines.append("")
    for w in windows:
        if len(w.get("by_deadline") or []) > 1:
            lines += _deadlines_markdown(f"While {w['label']} ran, by deadline", w["by_deadline"])
    return lines


def _deadline_text(seconds: float) -> str:
    return f"{seconds * 1000:g} ms" if seconds < 1 else f"{seconds:g} s"


def _deadlines_markdown(title: str, rows: list[dict[str, Any]]) -> list[str]:
    """One row per client deadline: calls, errors by code, degraded share, latency."""
    lines = [
        f"### {title}",
        "",
        "| deadline | calls | errors | degraded | Recommend p50 / p99 / max (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        errors = ", ".join(f"{c} {n}" for c, n in sorted(r["errors"].items())) or "none"
        share, lat = r["degraded_share"], r["latency_ms"]
        lines.append(
            f"| {_deadline_text(r['deadline_s'])} | {r['calls']} | {errors} | "
            f"{'-' if share is None else f'{share:.1%}'} | "
            f"{_ms(lat['p50'])} / {_ms(lat['p99'])} / {_ms(lat['max'])} |"
        )
    return [*lines, ""]


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} s"


def sweep_markdown(doc: dict[str, Any], plot_name: str | None = "sweep.png") -> str:
    """The Markdown summary of a sweep."""
    best = doc["max_sustainable_rate"]
    lines = [
        f"# SLO sweep: {doc['scenario']['name']}",
        "",
        f"SLO: {_slo_text(doc['slo'])}. Started {doc['started_at']}.",
        "",
        f"**Highest sustainable rate: {best:g}/s**"
        if best is not None
        else "**No step met the SLO.**",
        "",
    ]
    if doc.get("broke_at"):
        lines += [f"Broke at {doc['broke_at']['rate']:g}/s: {doc['broke_at']['reason']}.", ""]
    if doc.get("generator_limited"):
        lines += [
            "**Stopped because the generator fell behind its schedule; the result is a "
            "lower bound. Raise `load.workers`.**",
            "",
        ]
    lines += [
        "| offered/s | OK/s | p50 | p90 | p99 | p99.9 | max | errors | SLO | generator |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in doc["steps"]:
        lat = s["latency_ms"]
        lines.append(
            f"| {s['offered_rate']:.1f} | {s['achieved_rate']:.1f} | {_ms(lat['p50'])} | "
            f"{_ms(lat['p90'])} | {_ms(lat['p99'])} | {_ms(lat['p99.9'])} | {_ms(lat['max'])} | "
            f"{s['error_share']:.1%} | {'met' if s['slo']['passed'] else s['slo']['reason']} | "
            f"{_generator_state(s['self_check'])} |"
        )
    lines.append("")
    if plot_name:
        lines += [f"![latency against offered rate]({plot_name})", ""]
    return "\n".join(lines)


def _generator_state(check: dict[str, Any]) -> str:
    if check.get("saturated"):
        return "BEHIND"
    return "ok" if check["ok"] else "disturbed"


def _write(
    doc: dict[str, Any],
    out_dir: Path,
    names: tuple[str, str],
    plot: Callable[[dict[str, Any], Path], Any],
    markdown: Callable[[dict[str, Any], str], str],
) -> dict[str, Path]:
    """The JSON and PNG named by ``names`` and ``summary.md`` (which embeds the plot)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / names[0],
        "markdown": out_dir / "summary.md",
        "plot": out_dir / names[1],
    }
    paths["json"].write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
    plot(doc, paths["plot"])
    paths["markdown"].write_text(markdown(doc, paths["plot"].name))
    return paths


def write_run(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``result.json``, ``summary.md`` and ``run.png`` into ``out_dir``."""
    return _write(doc, out_dir, ("result.json", "run.png"), plot_run, run_markdown)


def write_sweep(doc: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Write ``sweep.json``, ``summary.md`` and ``sweep.png`` into ``out_dir``."""
    return _write(doc, out_dir, ("sweep.json", "sweep.png"), plot_sweep, sweep_markdown)


def load_result(path: Path) -> dict[str, Any]:
    """A result document from a ``result.json``/``sweep.json`` or the folder holding one."""
    if path.is_dir():
        for name in ("result.json", "sweep.json"):
            if (path / name).exists():
                path = path / name
                break
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read a load-test result from {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("kind") not in ("run", "sweep"):
        raise UserError(f"{path} is not a load-test result (no kind: run|sweep)")
    return doc


Row = tuple[str, float | None, float | None, float | None]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or a == 0 or math.isnan(a) or math.isnan(b):
        return None
    return b / a


def _run_metrics(doc: dict[str, Any]) -> dict[str, float | None]:
    m: dict[str, float | None] = {
        "offered rate (/s)": doc["offered_rate"],
        "answered OK (/s)": doc["achieved_rate"],
    }
    for k in LATENCY_KEYS:
        m[f"latency {k} (ms)"] = doc["latency_ms"][k]
    m["error share"] = doc["error_share"]
    m["degraded share"] = doc["degraded_share"]
    return m


def compare_docs(a: dict[str, Any], b: dict[str, Any]) -> list[Row]:
    """Rows ``(metric, A, B, B/A)`` for two runs or two sweeps."""
    if a["kind"] != b["kind"]:
        raise UserError(f"cannot compare a {a['kind']} with a {b['kind']}")
    if a["kind"] == "run":
        ma, mb = _run_metrics(a), _run_metrics(b)
        return [(k, ma[k], mb[k], _ratio(ma[k], mb[k])) for k in ma]
    rows: list[Row] = [
        (
            "max sustainable rate (/s)",
            a["max_sustainable_rate"],
            b["max_sustainable_rate"],
            _ratio(a["max_sustainable_rate"], b["max_sustainable_rate"]),
        )
    ]
    sb = {s["rate"]: s for s in b["steps"]}
    for s in a["steps"]:
        if s["rate"] in sb:
            pa, pb = s["latency_ms"]["p99"], sb[s["rate"]]["latency_ms"]["p99"]
            rows.append((f"p99 at {s['rate']:g}/s (ms)", pa, pb, _ratio(pa, pb)))
    return rows

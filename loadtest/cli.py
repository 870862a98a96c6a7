"""``recstack loadtest run|sweep|compare|stub-server``: the command-line side (progress
with rich, output folders, printing). The work is in runner, sweep and report."""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from loadtest.report import compare_docs, load_result, write_run, write_sweep
from loadtest.runner import run_scenario
from loadtest.scenario import Scenario, load_scenario
from loadtest.sweep import run_sweep
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)


def _out_dir(settings: Settings, scenario: Scenario, out: str | None, kind: str) -> Path:
    if out:
        return Path(out)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return settings.reports_dir / "loadtest" / f"{scenario.name}-{kind}-{stamp}"


def _scenario(args: argparse.Namespace) -> Scenario:
    sc = load_scenario(args.scenario)
    changes: dict[str, Any] = {
        "rate": getattr(args, "rate", None),
        "duration": getattr(args, "duration", None),
        "workers": getattr(args, "workers", None),
        "seed": getattr(args, "seed", None),
    }
    if any(v is not None for v in changes.values()):
        sc = sc.with_load(**changes)
    address = getattr(args, "address", None)
    slo_p99 = getattr(args, "slo_p99_ms", None)
    if address or slo_p99:
        data = sc.model_dump()
        if address:
            data["target"]["address"] = address
        if slo_p99:
            data["slo"]["p99_ms"] = slo_p99
        from loadtest.scenario import validate_scenario

        sc = validate_scenario(data, source=f"{sc.name} (with command-line overrides)")
    return sc


def _stats_text(p: dict[str, Any]) -> str:
    p99 = f"{p['p99_ms']:.1f} ms" if p.get("p99_ms") is not None else "-"
    return (
        f"sent {p['sent']}  done {p['done']}  errors {p['errors']}  "
        f"in flight {p['in_flight']}  p99(last 0.5 s) {p99}"
    )


@contextmanager
def _progress(console: Console, enabled: bool) -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    prog = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[stats]}"),
        console=console,
        refresh_per_second=4,
    )
    with prog:
        yield prog


def _progress_fn(prog: Progress | None, task: Any) -> Callable[[dict[str, Any]], None] | None:
    if prog is None:
        return None

    def update(p: dict[str, Any]) -> None:
        prog.update(task, completed=p["elapsed"], stats=_stats_text(p))

    return update


def run(args: argparse.Namespace) -> int:
    """Run a scenario once; write result.json, summary.md and run.png."""
    settings = get_settings()
    sc = _scenario(args)
    out = _out_dir(settings, sc, args.out, "run")
    console = Console(stderr=True)
    with _progress(console, not getattr(args, "no_progress", False)) as prog:
        task = None
        if prog is not None:
            task = prog.add_task(
                f"{sc.name} {sc.load.total_duration:g}s", total=sc.load.total_duration, stats=""
            )
        doc = run_scenario(sc, settings, out_dir=out, on_progress=_progress_fn(prog, task))
    paths = write_run(doc, out)
    _print_run(console, doc)
    print(f"results: {paths['json']}\nsummary: {paths['markdown']}\nplot:    {paths['plot']}")
    return 0


def _print_run(console: Console, doc: dict[str, Any]) -> None:
    lat = doc["latency_ms"]

    def f(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    console.print(
        f"[bold]{doc['scenario']['name']}[/]: offered {doc['offered_rate']:.1f}/s, "
        f"OK {doc['achieved_rate']:.1f}/s, p50 {f(lat['p50'])} / p90 {f(lat['p90'])} / "
        f"p99 {f(lat['p99'])} / p99.9 {f(lat['p99.9'])} / max {f(lat['max'])} ms, "
        f"errors {doc['error_share']:.2%} {doc['errors'] or ''}, "
        f"degraded {doc['degraded_share']:.1%}"
    )
    slo = doc["slo"]
    console.print(
        "SLO " + ("[green]met[/]" if slo["passed"] else f"[red]NOT met[/]: {slo['reason']}")
    )
    for w in doc["self_check"]["warnings"]:
        console.print(f"[yellow]generator warning:[/] {w}")


def sweep(args: argparse.Namespace) -> int:
    """Raise the rate step by step until p99 breaks the SLO; write sweep.json/.md/.png."""
    settings = get_settings()
    sc = _scenario(args)
    out = _out_dir(settings, sc, args.out, "sweep")
    console = Console(stderr=True)
    state: dict[str, Any] = {}
    with _progress(console, not getattr(args, "no_progress", False)) as prog:

        def on_start(rate: float) -> None:
            if prog is not None:
                assert sc.sweep is not None
                state["task"] = prog.add_task(f"{rate:g}/s", total=sc.sweep.step_duration, stats="")

        def on_progress(p: dict[str, Any]) -> None:
            if prog is not None:
                prog.update(state["task"], completed=p["elapsed"], stats=_stats_text(p))

        def on_step(s: dict[str, Any]) -> None:
            lat = s["latency_ms"]
            verdict = "[green]met[/]" if s["slo"]["passed"] else f"[red]{s['slo']['reason']}[/]"
            p99 = "-" if lat["p99"] is None else f"{lat['p99']:.2f}"
            p50 = "-" if lat["p50"] is None else f"{lat['p50']:.2f}"
            console.print(
                f"{s['rate']:>8g}/s: OK {s['achieved_rate']:.1f}/s p50 {p50} ms p99 {p99} ms "
                f"errors {s['error_share']:.1%} -> {verdict}"
                + ("" if s["self_check"]["ok"] else " [yellow](generator disturbed)[/]")
                + ("" if s.get("attempt", 1) == 1 else " (repeat)")
            )

        doc = run_sweep(sc, settings, None, on_step, on_progress, on_start)
    paths = write_sweep(doc, out)
    best = doc["max_sustainable_rate"]
    console.print(
        f"[bold]highest sustainable rate: {best:g}/s[/]"
        if best is not None
        else "[bold red]no step met the SLO[/]"
    )
    print(f"results: {paths['json']}\nsummary: {paths['markdown']}\nplot:    {paths['plot']}")
    return 0


def compare(args: argparse.Namespace) -> int:
    """Print B/A ratios of two results (files or result folders)."""
    a, b = load_result(Path(args.a)), load_result(Path(args.b))
    rows = compare_docs(a, b)
    table = Table(title=f"B/A  (A = {args.a}, B = {args.b})")
    for col in ("metric", "A", "B", "B/A"):
        table.add_column(col, justify="left" if col == "metric" else "right")

    def f(v: float | None, digits: int = 3) -> str:
        return "-" if v is None else f"{v:.{digits}g}" if abs(v) < 1 else f"{v:.2f}"

    for name, va, vb, r in rows:
        table.add_row(name, f(va), f(vb), "-" if r is None else f"{r:.3f}")
    Console(file=sys.stdout).print(table)
    return 0


def stub_server(args: argparse.Namespace) -> int:
    """Serve the stand-in Recommender (see loadtest/stub_server.py)."""
    from loadtest.stub_server import cli

    return cli(args)

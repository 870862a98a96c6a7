"""One run of a scenario: its load split over ``load.workers`` generator processes (one
asyncio loop each, started with ``spawn`` so no gRPC state is forked), a common start time,
timed actions, progress callbacks, then the merged result document."""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing as mp
import queue
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.actions import ActionRunner
from loadtest.engine import Engine, WorkerResult, WorkerSpec, run_loop, run_single
from loadtest.scenario import Scenario
from loadtest.stats import summarize
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

RESULT_SCHEMA = "recstack.loadtest.run/1"
WORKER_START_TIMEOUT_S = 60.0

Progress = Callable[[dict[str, Any]], None]


def run_scenario(
    scenario: Scenario,
    settings: Settings,
    out_dir: Path | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Run ``scenario`` once and return its result document (see docs/loadtest.md).
    ``on_progress`` gets totals over all workers about twice a second."""
    started = dt.datetime.now(dt.UTC)
    actions = ActionRunner(scenario.actions, out_dir)
    if scenario.load.workers == 1:
        results = [
            run_loop(
                run_single(
                    WorkerSpec(scenario, settings),
                    on_progress=on_progress,
                    on_start=actions.start,
                ),
                scenario.load.event_loop,
            )
        ]
    else:
        results = _run_processes(scenario, settings, actions, on_progress)
    action_records = actions.finish(wait_s=5.0 if scenario.actions else 0.0)
    doc: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "kind": "run",
        "scenario": scenario.model_dump(mode="json"),
        "started_at": started.isoformat(timespec="seconds"),
        "target": {"kind": scenario.target.kind, "address": results[0].address},
        **summarize(results, scenario, action_records),
        "actions": action_records,
    }
    if scenario.target.kind == "triton":
        doc["target"]["model"] = scenario.target.model
    return doc


def _worker_main(spec: WorkerSpec, q: Any, go: Any, start_at: Any) -> None:
    """Entry point of a generator process: prepare, report ready, wait for go, run."""

    async def main() -> WorkerResult:
        eng = Engine(spec)
        await eng.open()
        q.put(("ready", spec.worker, None))
        # Blocking here is fine: nothing else runs on this loop yet.
        if not go.wait(WORKER_START_TIMEOUT_S):
            raise UserError("no start signal from the parent")
        return await eng.run(start_at.value, lambda p: q.put(("progress", spec.worker, p)))

    try:
        res = run_loop(main(), spec.scenario.load.event_loop)
        q.put(("result", spec.worker, res))
    except UserError as e:
        q.put(("error", spec.worker, str(e)))
    except Exception as e:  # report, so the parent does not wait for a dead worker
        q.put(("error", spec.worker, f"{type(e).__name__}: {e}"))


def _run_processes(
    scenario: Scenario, settings: Settings, actions: ActionRunner, on_progress: Progress | None
) -> list[WorkerResult]:
    n = scenario.load.workers
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    procs = [
        ctx.Process(
            target=_worker_main,
            args=(WorkerSpec(scenario, settings, worker=i, workers=n), q, go, start_at),
            daemon=True,
        )
        for i in range(n)
    ]
    for p in procs:
        p.start()
    try:
        ready = 0
        deadline = time.time() + WORKER_START_TIMEOUT_S
        while ready < n:
            kind, worker, payload = _get(q, deadline, procs)
            if kind == "error":
                raise UserError(f"generator worker {worker}: {payload}")
            ready += kind == "ready"
        start_at.value = time.time() + 0.2
        go.set()
        actions.start(start_at.value)
        latest: dict[int, dict[str, Any]] = {}
        results: dict[int, WorkerResult] = {}
        deadline = (
            start_at.value + scenario.load.total_duration + scenario.target.longest_deadline + 30
        )
        while len(results) < n:
            kind, worker, payload = _get(q, deadline, procs)
            if kind == "error":
                raise UserError(f"generator worker {worker}: {payload}")
            if kind == "result":
                results[worker] = payload
            elif kind == "progress":
                latest[worker] = payload
                if on_progress is not None:
                    on_progress(_total(latest))
        return [results[i] for i in range(n)]
    finally:
        # Results are in (or the run failed): a worker still tearing down its loop and
        # channels holds nothing we need.
        for p in procs:
            p.join(timeout=1)
            if p.is_alive():
                p.terminate()


def _get(q: Any, deadline: float, procs: list[Any]) -> tuple[str, int, Any]:
    while True:
        try:
            return q.get(timeout=0.5)  # type: ignore[no-any-return]
        except queue.Empty:
            if time.time() > deadline:
                raise UserError("generator workers did not finish in time") from None
            dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                raise UserError(f"a generator worker died (exit code {dead[0].exitcode})") from None


def _total(latest: dict[int, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"worker": -1}
    for key in ("sent", "done", "errors", "dropped", "in_flight"):
        out[key] = sum(p[key] for p in latest.values())
    out["elapsed"] = max(p["elapsed"] for p in latest.values())
    p99s = [p["p99_ms"] for p in latest.values() if p.get("p99_ms") is not None]
    out["p99_ms"] = max(p99s) if p99s else None
    return out

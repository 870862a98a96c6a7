"""SLO sweep: run the scenario at rising constant rates until p99 (or the error share)
breaks the SLO; the highest rate that met it is the sustainable rate. A step where the
generator itself fell behind ends the sweep with a warning instead of a verdict."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.runner import Progress, run_scenario
from loadtest.scenario import Scenario, validate_scenario
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

SWEEP_SCHEMA = "recstack.loadtest.sweep/1"
PAUSE_BETWEEN_STEPS_S = 0.2
# What a sweep keeps of each step's run document (time series stay out: one plot per run).
STEP_KEYS = (
    "target_rate",
    "offered_rate",
    "send_rate",
    "achieved_rate",
    "requests",
    "latency_ms",
    "latency_ok_ms",
    "errors",
    "error_share",
    "degraded_share",
    "slo",
    "self_check",
)


def step_scenario(scenario: Scenario, rate: float, index: int = 0) -> Scenario:
    """The scenario as sweep step ``index``: load at ``rate``, no actions. Each step gets
    its own seed so that steps do not all share one (say, low) Poisson realisation."""
    sw = scenario.sweep
    assert sw is not None
    data = scenario.model_dump()
    data["load"].update(
        rate=rate,
        duration=sw.step_duration,
        warmup=sw.warmup,
        stages=None,
        seed=scenario.load.seed + index,
    )
    data["actions"] = []
    return validate_scenario(data, source=f"{scenario.name} at {rate:g}/s")


def run_sweep(
    scenario: Scenario,
    settings: Settings,
    out_dir: Path | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    on_progress: Progress | None = None,
    on_step_start: Callable[[float], None] | None = None,
) -> dict[str, Any]:
    """Step through ``scenario.sweep.rates()``; return the sweep document."""
    sw = scenario.sweep
    if sw is None:
        raise UserError(f"scenario {scenario.name!r} has no sweep section")
    started = dt.datetime.now(dt.UTC)
    steps: list[dict[str, Any]] = []
    best: float | None = None
    broke: dict[str, Any] | None = None
    generator_limited = False
    failures = 0
    for index, rate in enumerate(sw.rates()):
        for attempt in (1, 2):
            if on_step_start is not None:
                on_step_start(rate)
            doc = run_scenario(step_scenario(scenario, rate, index), settings, out_dir, on_progress)
            step = {"rate": rate, "attempt": attempt, **{k: doc[k] for k in STEP_KEYS}}
            steps.append(step)
            if on_step is not None:
                on_step(step)
            # A failing step measured while the generator itself was disturbed (e.g. the
            # shared machine stalled it) is not a verdict on the server: measure it again.
            if doc["slo"]["passed"] or doc["self_check"]["ok"] or doc["self_check"]["saturated"]:
                break
            log.warning(
                "at %g/s the SLO failed while the generator reported: %s; repeating the step",
                rate,
                "; ".join(doc["self_check"]["warnings"]),
            )
            time.sleep(PAUSE_BETWEEN_STEPS_S)
        if doc["self_check"]["saturated"]:
            generator_limited = True
            log.warning("the generator could not keep up at %g/s; stopping the sweep", rate)
            break
        if doc["slo"]["passed"]:
            failures = 0
            if broke is None:
                best = rate
        else:
            failures += 1
            if broke is None:
                broke = {"rate": rate, "reason": doc["slo"]["reason"]}
            if failures >= sw.stop_after_failures:
                break
        time.sleep(PAUSE_BETWEEN_STEPS_S)
    return {
        "schema": SWEEP_SCHEMA,
        "kind": "sweep",
        "scenario": scenario.model_dump(mode="json"),
        "started_at": started.isoformat(timespec="seconds"),
        "target": {"kind": scenario.target.kind, "address": scenario.target.address},
        "slo": scenario.slo.model_dump(),
        "steps": steps,
        "max_sustainable_rate": best,
        "broke_at": broke,
        "generator_limited": generator_limited,
    }

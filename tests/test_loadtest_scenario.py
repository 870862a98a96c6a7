"""Scenario validation, schedules, the traffic mix, statistics and compare: no servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtest.report import compare_docs, load_result
from loadtest.scenario import (
    SCENARIO_DIR,
    Stage,
    load_scenario,
    parse_duration,
    validate_scenario,
)
from loadtest.schedule import arrival_times
from loadtest.stats import hdr_summary
from loadtest.traffic import Catalog, build_plan, zipf_users
from recstack.errors import UserError


def _base(**load: Any) -> dict[str, Any]:
    return {"name": "t", "load": {"rate": 10, "duration": "5s", "warmup": "1s", **load}}


def test_shipped_scenarios_validate() -> None:
    names = {p.stem for p in SCENARIO_DIR.glob("*.yaml")}
    assert {"steady", "spike", "cold_start", "triton_direct"} <= names
    for name in names:
        sc = load_scenario(name)
        assert sc.name == name
        assert sc.load.total_duration > sc.load.warmup


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**_base(), "traget": {}}, "traget: unknown key"),
        (_base(rat=5), "load.rat: unknown key"),
        (_base(rate=-3), "load.rate: Input should be greater than 0"),
        (_base(rate="fast"), "load.rate"),
        (_base(duration="ten seconds"), "not a duration"),
        (_base(warmup="10s"), "warmup (10s) must be shorter than the run (5s)"),
        (_base(stages=[{"duration": "1s", "rate": 5}]), "either rate + duration or stages"),
        (_base(arrival="bursty"), "load.arrival"),
        ({**_base(), "actions": [{"at": "9s", "run": "true"}]}, "after the end of the run"),
        ({**_base(), "actions": [{"at": "1s", "cmd": "true"}]}, "actions.0.cmd: unknown key"),
        ({**_base(), "traffic": {"k": {500: 1.0}}}, "1 <= k <= 200"),
        ({**_base(), "traffic": {"cold_start_share": 1.5}}, "traffic.cold_start_share"),
        ({**_base(), "target": {"kind": "smtp"}}, "target.kind"),
        ({**_base(), "target": {"deadlines": ["50ms", "0s"]}}, "deadlines must be > 0"),
        ({**_base(), "target": {"kind": "triton", "deadlines": ["1s"]}}, "orchestrator's fronts"),
        ({**_base(), "sweep": {"start": 10, "max": 100}}, "exactly one of step or factor"),
    ],
)
def test_validation_errors_name_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError) as e:
        validate_scenario(data, source="bad.yaml")
    assert "bad.yaml" in str(e.value)
    assert message in str(e.value)


def test_load_scenario_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no scenario 'nope'.*steady"):
        load_scenario("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("load: {rate: 10, duration: 5s\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_scenario(bad)
    bad.write_text("load: {rate: 0, duration: 5s}\n")
    with pytest.raises(UserError, match=r"bad.yaml: invalid scenario\n  load.rate"):
        load_scenario(bad)


def test_durations() -> None:
    assert parse_duration("30s") == 30
    assert parse_duration("500ms") == 0.5
    assert parse_duration("2m") == 120
    assert parse_duration(3) == 3
    with pytest.raises(ValueError):
        parse_duration("-1s")


def test_overrides_and_sweep_rates() -> None:
    sc = load_scenario("spike")
    flat = sc.with_load(rate=77)
    assert flat.load.stages is None
    assert flat.load.rate == 77 and flat.load.total_duration == sc.load.total_duration
    steady = load_scenario("steady")
    assert steady.sweep is not None
    assert steady.sweep.rates()[:3] == [50, 100, 150]
    geo = validate_scenario({**_base(), "sweep": {"start": 10, "factor": 2, "max": 100}})
    assert geo.sweep is not None and geo.sweep.rates() == [10, 20, 40, 80]


def test_constant_arrivals_interleave_across_workers() -> None:
    stages = [Stage(duration=2.0, rate=100)]
    rng = np.random.default_rng(0)
    one = arrival_times(stages, "constant", rng)
    assert one.size == 200
    assert np.allclose(np.diff(one), 0.01)
    w0 = arrival_times(stages, "constant", rng, share=0.5, phase=0.0)
    w1 = arrival_times(stages, "constant", rng, share=0.5, phase=0.5)
    both = np.sort(np.concatenate([w0, w1]))
    assert both.size == 200 and np.allclose(np.diff(both), 0.01)


def test_poisson_arrivals_follow_stages() -> None:
    stages = [Stage(duration=10.0, rate=50), Stage(duration=10.0, rate=500)]
    t = arrival_times(stages, "poisson", np.random.default_rng(3))
    assert np.all(np.diff(t) > 0) and t[-1] < 20
    low, high = (t < 10).sum(), (t >= 10).sum()
    assert 400 < low < 600 and 4600 < high < 5400
    gaps = np.diff(t[t >= 10])
    # Exponential gaps: the coefficient of variation is ~1 (constant arrivals: 0).
    assert 0.9 < gaps.std() / gaps.mean() < 1.1


def test_zipf_users_are_skewed() -> None:
    users = np.arange(10_000, dtype=np.int64)
    draws = zipf_users(users, 1.1, 50_000, np.random.default_rng(1))
    _, counts = np.unique(draws, return_counts=True)
    top = np.sort(counts)[::-1]
    # The hottest user gets a large share; most users are rare.
    assert top[0] > 0.05 * draws.size
    assert top[:100].sum() > 0.5 * draws.size


def test_plan_mix() -> None:
    from loadtest.scenario import Traffic

    traffic = Traffic(cold_start_share=0.3, event_share=0.2, filters_share=0.5, k={10: 1, 50: 1})
    cat = Catalog(np.arange(100), np.arange(1000, 1100), np.arange(5))
    plan = build_plan(20_000, traffic, cat, np.random.default_rng(2))
    rec = plan.kind == 0
    assert abs((~rec).mean() - 0.2) < 0.02
    assert abs(plan.cold[rec].mean() - 0.3) < 0.02
    assert np.all(plan.user_id[plan.cold] > 99)  # unknown ids
    assert np.all(plan.user_id[~plan.cold] <= 99)
    assert set(np.unique(plan.k)) == {10, 50}
    assert abs((plan.filters >= 0).mean() - 0.5) < 0.02
    assert np.isin(plan.item_id, cat.item_ids).all()


def test_hdr_summary_percentiles() -> None:
    x = np.arange(1, 1001) / 1000.0  # 1..1000 ms
    s = hdr_summary(np.concatenate([x, [np.nan]]))
    assert s["count"] == 1000
    assert s["p50"] == pytest.approx(500, rel=0.002)
    assert s["p99"] == pytest.approx(990, rel=0.002)
    assert s["max"] == pytest.approx(1000)
    assert hdr_summary(np.array([]))["p99"] is None


def _run_doc(p99: float, rate: float) -> dict[str, Any]:
    lat = {"p50": p99 / 2, "p90": p99 * 0.8, "p95": p99 * 0.9, "p99": p99, "p99.9": p99, "max": p99}
    return {
        "kind": "run",
        "offered_rate": rate,
        "achieved_rate": rate,
        "latency_ms": lat,
        "error_share": 0.0,
        "degraded_share": 0.1,
    }


def test_compare_ratios(tmp_path: Path) -> None:
    rows = {r[0]: r for r in compare_docs(_run_doc(10.0, 100), _run_doc(15.0, 100))}
    assert rows["latency p99 (ms)"][3] == pytest.approx(1.5)
    assert rows["latency p50 (ms)"][3] == pytest.approx(1.5)
    assert rows["offered rate (/s)"][3] == pytest.approx(1.0)
    assert rows["error share"][3] is None  # 0 in A: no ratio
    sweep_a = {"kind": "sweep", "max_sustainable_rate": 200, "steps": []}
    sweep_b = {"kind": "sweep", "max_sustainable_rate": 300, "steps": []}
    assert compare_docs(sweep_a, sweep_b)[0][3] == pytest.approx(1.5)
    with pytest.raises(UserError, match="cannot compare a run with a sweep"):
        compare_docs(_run_doc(1, 1), sweep_b)
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(UserError, match="not a load-test result"):
        load_result(tmp_path / "x.json")


def test_command_line_overrides_rate_duration_and_seed() -> None:
    import argparse

    from loadtest.cli import _scenario

    args = argparse.Namespace(scenario="steady", rate=30.0, duration="20s", seed=7, workers=None)
    sc = _scenario(args)
    assert (sc.load.rate, sc.load.duration, sc.load.seed) == (30.0, 20.0, 7)
    assert _scenario(argparse.Namespace(scenario="steady")).load.seed == 1


def test_slo_verdict_counts_degraded_answers_only_when_asked() -> None:
    """A rate held only by degrading answers is not sustainable when the SLO says so."""
    from loadtest.scenario import Slo
    from loadtest.stats import slo_verdict

    latency = {"p50": 5.0, "p99": 20.0}
    assert slo_verdict(Slo(p99_ms=50), latency, 0.0, degraded_share=0.3) == (True, "met")
    strict = Slo(p99_ms=50, max_degraded_share=0.01)
    passed, reason = slo_verdict(strict, latency, 0.0, degraded_share=0.02)
    assert not passed and reason == "degraded share 2.00% > 1.00%"
    assert slo_verdict(strict, latency, 0.0, degraded_share=0.005) == (True, "met")

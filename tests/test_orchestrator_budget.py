"""Deadline budgets: a stage never gets more than what remains."""

from __future__ import annotations

import time

from orchestrator.budget import BudgetConfig, RequestClock


def test_stage_budget_is_share_capped_by_remaining() -> None:
    clock = RequestClock(0.1, BudgetConfig(shares={"ranking": 0.5}, reserve_ms=0))
    assert 0.045 < clock.budget("ranking") <= 0.05
    time.sleep(0.07)
    assert clock.budget("ranking") < 0.031


def test_default_deadline_and_timings() -> None:
    clock = RequestClock(None, BudgetConfig(default_ms=40))
    assert abs(clock.total_s - 0.04) < 1e-9
    with clock.stage("user_features"):
        time.sleep(0.002)
    assert clock.timings["user_features"] >= 2.0
    expired = RequestClock(0.0, BudgetConfig())
    assert expired.budget("ranking") <= 0


def test_stage_records_wall_and_cpu_time() -> None:
    clock = RequestClock(None, BudgetConfig())
    with clock.stage("busy"):
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.02:
            pass
    with clock.stage("idle"):
        time.sleep(0.02)
    assert clock.cpu_timings["busy"] >= 15 and clock.timings["busy"] >= 15
    assert clock.timings["idle"] >= 15 and clock.cpu_timings["idle"] < 10

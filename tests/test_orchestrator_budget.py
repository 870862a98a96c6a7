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

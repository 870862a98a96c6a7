"""Deadline budgets: a stage never gets more than what remains."""

from __future__ import annotations

import time

from orchestrator.budget import BudgetConfig, RequestClock


def test_stage_budget_is_share_capped_by_remaining() -> None:
    """Exact where no time is involved; elsewhere bracketed by clock readings taken around
    the call, so a slow or busy host cannot break it."""
    cfg = BudgetConfig(shares={"ranking": 0.5}, reserve_ms=0)
    far = RequestClock(10.0, cfg)  # remaining (~10 s) is far above the share
    assert far.budget("ranking") == 0.5 * 10.0
    assert far.budget("unlisted") == 0.1 * 10.0  # the default share

    clock = RequestClock(0.1, cfg)
    t0 = time.perf_counter()
    b = clock.budget("ranking")
    t1 = time.perf_counter()
    assert min(0.05, clock.end - t1) <= b <= min(0.05, clock.end - t0)
    time.sleep(0.07)  # at least 70 ms pass: the remaining time is now below the share
    t0 = time.perf_counter()
    b = clock.budget("ranking")
    t1 = time.perf_counter()
    assert clock.end - t1 <= b <= clock.end - t0
    assert b <= 0.1 - 0.07 < 0.05
    with_reserve = RequestClock(10.0, BudgetConfig(shares={"ranking": 1.0}, reserve_ms=2))
    t0 = time.perf_counter()
    b = with_reserve.budget("ranking")
    assert b <= with_reserve.end - t0 - 0.002


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
    # Sleeping takes wall time, not CPU time: compared with each other, not with a
    # fixed number of milliseconds that a busy host could exceed.
    assert clock.timings["idle"] >= 15
    assert clock.cpu_timings["idle"] < clock.timings["idle"] / 2
    assert clock.cpu_timings["idle"] < clock.cpu_timings["busy"]

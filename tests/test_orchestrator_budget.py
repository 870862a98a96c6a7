"""Deadline budgets: a stage never gets more than what remains."""

from __future__ import annotations

import time

from orchestrator.budget import BudgetConfig, RequestClock, answer_within


def test_stage_budget_is_share_capped_by_remaining() -> None:
    """Exact where no time is involved; elsewhere bracketed by clock readings taken around
    the call, so a slow or busy host cannot break it."""
    cfg = BudgetConfig(
        shares={"ranking": 0.5},
        reserve_ms=0,
        caps_ms={},
        ceiling_ms=60_000,
        margin_share=0,
        margin_min_ms=0,
    )
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
    with_reserve = RequestClock(
        10.0,
        BudgetConfig(
            shares={"ranking": 1.0},
            reserve_ms=2,
            caps_ms={},
            ceiling_ms=60_000,
            margin_share=0,
            margin_min_ms=0,
        ),
    )
    t0 = time.perf_counter()
    b = with_reserve.budget("ranking")
    assert b <= with_reserve.end - t0 - 0.002


def test_the_ceiling_caps_the_deadline_and_caps_the_stages() -> None:
    """A 30 s client deadline is served within the ceiling, and a Triton stage never waits
    longer than its cap, whatever its share of the deadline would allow."""
    cfg = BudgetConfig(
        shares={"ranking": 0.5, "user_tower": 0.25},
        reserve_ms=0,
        caps_ms={"ranking": 100.0, "user_tower": 50.0},
        ceiling_ms=300.0,
    )
    long = RequestClock(30.0, cfg)
    assert long.total_s == 0.3
    assert long.budget("ranking") == 0.1  # share 150 ms, cap 100 ms
    assert long.budget("user_tower") == 0.05  # share 75 ms, cap 50 ms
    assert long.budget("retrieval") == 0.1 * 0.3  # no cap: its share
    short = RequestClock(0.1, cfg)  # a short deadline: the share is below the cap
    assert abs(short.total_s - 0.09) < 1e-12  # less the margin for the way back
    assert short.budget("user_tower") <= 0.25 * 0.09
    assert RequestClock(None, cfg).total_s == cfg.default_ms / 1000  # below the ceiling


def test_the_answer_is_due_a_margin_before_the_client_deadline() -> None:
    cfg = BudgetConfig(margin_share=0.1, margin_min_ms=5.0, ceiling_ms=60_000)
    assert abs(RequestClock(0.1, cfg).total_s - 0.09) < 1e-12  # 10 %
    assert abs(RequestClock(0.03, cfg).total_s - 0.025) < 1e-12  # at least 5 ms
    assert RequestClock(0.004, cfg).total_s == 0.0  # nothing left: answer at once
    assert RequestClock(None, cfg).total_s == cfg.default_ms / 1000  # no client deadline


def test_an_event_is_answered_by_the_same_rule() -> None:
    """RecordEvent's wait on the store: the margin, the ceiling, its own default."""
    cfg = BudgetConfig(margin_share=0.1, margin_min_ms=5.0, ceiling_ms=300)
    assert abs(answer_within(0.1, cfg, 2.0) - 0.09) < 1e-12
    assert answer_within(1.0, cfg, 2.0) == 0.3  # the ceiling
    assert answer_within(None, cfg, 2.0) == 0.3
    assert answer_within(None, BudgetConfig(ceiling_ms=60_000), 2.0) == 2.0


def test_budget_defaults_and_settings_agree() -> None:
    from recstack.settings import Settings

    s = Settings(user_tower_cap_ms=7, ranking_cap_ms=9, latency_ceiling_ms=120)
    cfg = BudgetConfig.from_settings(s)
    assert cfg.caps_ms == {"user_tower": 7.0, "ranking": 9.0} and cfg.ceiling_ms == 120.0
    default = BudgetConfig()
    assert default.caps_ms == BudgetConfig.from_settings(Settings()).caps_ms
    assert default.ceiling_ms == Settings().latency_ceiling_ms


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

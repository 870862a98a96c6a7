"""StoreWatch: which users the release knows, and when the online store looks emptied
(the e2e side, with a real wiped Redis, is in test_orchestrator_redis_e2e.py)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from orchestrator.store_watch import MIN_LOOKUPS, WINDOW, StoreWatch


def test_membership_is_exact() -> None:
    watch = StoreWatch(np.array([40, 3, 7, 2**63 - 1]))
    assert [watch.knows(u) for u in (3, 7, 40, 2**63 - 1)] == [True] * 4
    assert [watch.knows(u) for u in (0, 4, 41, 2**62)] == [False] * 4
    # Only release users count: an unknown user without a row is a plain cold start.
    assert watch.record(5, found=False) is False
    assert watch.detail()["recent_lookups"] == 0


def test_many_missing_release_users_look_like_an_emptied_store(
    caplog: pytest.LogCaptureFixture,
) -> None:
    users = np.arange(1000, dtype=np.int64)
    watch = StoreWatch(users)
    for u in range(WINDOW):
        assert watch.record(u, found=True) is False
    assert watch.missing_ratio() == 0 and not watch.detail()["looks_emptied"]
    with caplog.at_level(logging.INFO, logger="orchestrator.store_watch"):
        flags = [watch.record(u, found=False) for u in range(WINDOW)]
    assert all(flags)
    detail = watch.detail()
    assert detail["looks_emptied"] and detail["recent_missing"] == WINDOW
    assert "had no features" in detail["message"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once, on the change; not once per request
    with caplog.at_level(logging.INFO, logger="orchestrator.store_watch"):
        for u in range(WINDOW):
            watch.record(u, found=True)
    assert not watch.detail()["looks_emptied"] and watch.missing_ratio() == 0
    assert any("again" in r.getMessage() for r in caplog.records)


def test_a_few_lookups_are_not_enough_to_judge() -> None:
    watch = StoreWatch(np.arange(100))
    for u in range(MIN_LOOKUPS - 1):
        watch.record(u, found=False)
    assert watch.missing_ratio() == 1.0 and not watch.detail()["looks_emptied"]
    watch.record(0, found=False)
    assert watch.detail()["looks_emptied"]


def test_a_release_without_its_users_checks_nothing() -> None:
    watch = StoreWatch(None)
    assert not watch.enabled and not watch.knows(1)
    assert watch.record(1, found=False) is False
    assert watch.detail() == {"release_users": None, "checked": False}
    assert len(watch.probe_ids(32)) == 0


def test_probe_ids_spread_over_the_users() -> None:
    watch = StoreWatch(np.arange(0, 10_000, 7))
    probe = watch.probe_ids(32)
    assert len(probe) == 32 and probe[0] == 0 and probe[-1] == watch.users[-1]  # type: ignore[index]
    assert all(watch.knows(int(u)) for u in probe)
    assert len(StoreWatch(np.array([5, 9])).probe_ids(32)) == 2

"""The item snapshot's background refresh in the service: on schedule, stopped by close(),
a failure keeps the old snapshot, and its age and materialisation time are exported.
(The swap itself, over a real release, is in test_orchestrator_degradation.py; the
reload on a real materialisation in test_feast_repo.py.)"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

import numpy as np
import pytest
from prometheus_client import REGISTRY

from orchestrator import metrics
from orchestrator.online_features import ItemSnapshot
from orchestrator.service import RecommendService
from orchestrator.serving_release import ItemState

AS_OF = datetime(2026, 11, 1, tzinfo=UTC)


def item_state() -> ItemState:
    snapshot = ItemSnapshot(
        names=("price", "item_popularity_rank"),
        ids=np.array([1, 2, 3], dtype=np.int64),
        matrix=np.array([[1.0, 3], [2.0, 1], [3.0, 2]], dtype=np.float32),
        category=np.array([0, 1, 0], dtype=np.int64),
        created_at=np.zeros(3),
        as_of={"item_stats": AS_OF, "item_profile": None},
    )
    return ItemState.build(snapshot, snapshot.ids, np.zeros((3, 2), np.float32))


class FakeRelease:
    """What the service's refresh needs of a release: ``items`` and ``refresh_items``."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.release_id = "r-test"
        self.items = item_state()
        self.calls = 0
        self.fail = fail

    def refresh_items(self) -> bool:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        self.items = item_state()
        return True

    def close(self) -> None:
        pass


def refreshes(result: str) -> float:
    return float(metrics.ITEM_SNAPSHOT_REFRESHES.labels(result)._value.get())


def test_item_state_popularity_and_fallbacks_come_from_the_snapshot() -> None:
    state = item_state()
    np.testing.assert_array_equal(state.catalog.popularity, [-3, -1, -2])
    np.testing.assert_array_equal(state.fallbacks.popular_rows, [1, 2, 0])
    assert state.materialized_until == AS_OF.timestamp()


def test_refresh_runs_on_schedule_and_stops_with_close() -> None:
    rel = FakeRelease()
    svc = RecommendService(rel)  # type: ignore[arg-type]

    async def main() -> tuple[int, int]:
        svc.start_refresh(0.02)
        await asyncio.sleep(0.3)
        during = rel.calls
        await svc.close()
        stopped = rel.calls
        await asyncio.sleep(0.1)
        assert rel.calls == stopped  # no refresh after close()
        return during, stopped

    during, _ = asyncio.run(main())
    assert during >= 3


def test_zero_interval_disables_the_refresh() -> None:
    rel = FakeRelease()
    svc = RecommendService(rel)  # type: ignore[arg-type]

    async def main() -> None:
        svc.start_refresh(0)
        await asyncio.sleep(0.05)
        await svc.close()

    asyncio.run(main())
    assert rel.calls == 0


def test_a_failed_refresh_keeps_the_old_snapshot(caplog: pytest.LogCaptureFixture) -> None:
    rel = FakeRelease(fail=OSError("parquet file vanished"))
    svc = RecommendService(rel)  # type: ignore[arg-type]
    state = rel.items
    before = refreshes("failed")
    with caplog.at_level(logging.WARNING):
        assert svc.refresh_features() is False
    assert rel.items is state
    assert refreshes("failed") == before + 1
    assert "parquet file vanished" in caplog.text
    svc.pool.shutdown()


def test_snapshot_age_and_materialisation_are_exported() -> None:
    rel = FakeRelease()
    svc = RecommendService(rel)  # type: ignore[arg-type]
    rel.items = ItemState(
        rel.items.snapshot, rel.items.catalog, rel.items.fallbacks, time.time() - 100
    )
    age = REGISTRY.get_sample_value("recstack_item_snapshot_age_seconds")
    assert age is not None and 100 <= age < 150
    assert svc.refresh_features() is True
    age = REGISTRY.get_sample_value("recstack_item_snapshot_age_seconds")
    assert age is not None and 0 <= age < 50  # restarted by the reload
    when = REGISTRY.get_sample_value("recstack_item_snapshot_materialized_timestamp_seconds")
    assert when == AS_OF.timestamp()
    svc.pool.shutdown()

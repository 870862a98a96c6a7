"""A failure outside every stage's own handler still gets an answer: popular items flagged
``internal_error`` (counted), never an exception out of ``recommend`` (gRPC INTERNAL).
The per-stage failures, over a real release, are in test_orchestrator_degradation.py."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import degraded_count

from orchestrator.online_features import ItemSnapshot
from orchestrator.postprocess import PostprocessConfig
from orchestrator.request import RecommendQuery
from orchestrator.service import RecommendService
from orchestrator.serving_release import ItemState


class BrokenUser:
    """A known user whose recent items cannot be read (a bug below the stages)."""

    known = True
    has_history = True  # served by the model path, not as a cold start
    seen_items = np.zeros(0, np.int64)
    affinity = None

    @property
    def recent_items(self) -> list[int]:
        raise RuntimeError("recent items decoder broke")


def release() -> SimpleNamespace:
    ids = np.arange(1, 21, dtype=np.int64)
    snapshot = ItemSnapshot(
        names=("price", "item_popularity_rank"),
        ids=ids,
        matrix=np.stack([np.ones(20), np.arange(1, 21)], axis=1).astype(np.float32),
        category=ids % 4,
        created_at=np.zeros(20),
    )

    def no_tower(user: object, timeout_s: float) -> np.ndarray:
        raise ConnectionError("Triton is down")

    return SimpleNamespace(
        release_id="r-test",
        items=ItemState.build(snapshot, ids, np.zeros((20, 2), np.float32)),
        features=SimpleNamespace(user=lambda user_id: BrokenUser()),
        user_embedding=no_tower,
        local=None,  # no in-process model fallback: the tower's failure degrades
        post=PostprocessConfig(),
        data_end=float("inf"),
        sources=None,  # no candidate sources, hence no cold-start segments
        close=lambda: None,
        item_key=str,  # integer ids: items are named by their digits
    )


def test_an_unexpected_error_is_a_degraded_answer(caplog: pytest.LogCaptureFixture) -> None:
    svc = RecommendService(release())  # type: ignore[arg-type]
    q = RecommendQuery(user_id=1, k=5, timestamp=datetime(2026, 1, 1, tzinfo=UTC))
    before = degraded_count("internal_error")
    with caplog.at_level(logging.WARNING):
        result = asyncio.run(svc.recommend(q, 2.0))
    svc.pool.shutdown()
    assert result.degraded == ["internal_error"]
    assert len(result.items) == 5
    assert {i.source for i in result.items} <= {"popular", "fresh"}
    assert degraded_count("internal_error") == before + 1
    assert "recent items decoder broke" in caplog.text
    assert all(not r.exc_info for r in caplog.records)  # one line each, no traceback


@pytest.mark.parametrize(
    ("queued", "workers", "service_s", "remaining_s", "shed"),
    [
        (0, 4, 0.010, 0.3, False),  # nothing ahead
        (3, 4, 1.0, 0.3, False),  # less than a round of work ahead: never on an estimate
        (100, 4, 0.010, 0.3, False),  # 100 x 10 ms / 4 workers = 250 ms: fits
        (200, 4, 0.010, 0.3, True),  # 500 ms of queued work: cannot start in time
        (8, 4, 0.010, 0.0, True),  # no time left at all
    ],
)
def test_should_shed(
    queued: int, workers: int, service_s: float, remaining_s: float, shed: bool
) -> None:
    from orchestrator.service import should_shed

    assert should_shed(queued, workers, service_s, remaining_s) is shed

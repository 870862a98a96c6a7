"""RecordEvent in the service: items outside the serving catalog are refused before they
reach the store, and a store that fails, is down or is too slow becomes one retryable
ServiceUnavailable with one log line and a counted metric (no traceback)."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from types import SimpleNamespace

import numpy as np
import pytest

from orchestrator import metrics
from orchestrator.catalog import Catalog
from orchestrator.online_features import FeatureStoreUnavailable
from orchestrator.request import EventQuery
from orchestrator.service import RecommendService, ServiceUnavailable, UnknownItem

ITEMS = np.array([3, 5, 8, 1000])


class FakeFeatures:
    """The release's feature client: records pushes, or raises ``fail``."""

    def __init__(self) -> None:
        self.pushed: list[EventQuery] = []
        self.fail: BaseException | None = None
        self.block = threading.Event()
        self.slow = False

    def push_event(self, e: EventQuery) -> None:
        if self.slow:
            self.block.wait(5)
        if self.fail is not None:
            raise self.fail
        self.pushed.append(e)


@pytest.fixture
def service() -> Iterator[RecommendService]:
    n = len(ITEMS)
    catalog = Catalog.build(
        item_ids=ITEMS,
        category=np.zeros(n),
        price=np.ones(n),
        created_at=np.zeros(n),
        popularity=np.ones(n),
        embeddings=np.zeros((n, 2), np.float32),
    )
    release = SimpleNamespace(
        release_id="r-test", catalog=catalog, features=FakeFeatures(), close=lambda: None
    )
    svc = RecommendService(release)  # type: ignore[arg-type]
    yield svc
    release.features.block.set()
    svc.pool.shutdown(wait=True)
    svc.event_pool.shutdown(wait=True)


def event(item_id: int) -> EventQuery:
    return EventQuery(user_id=1, item_id=item_id, event="click", timestamp=datetime.now(UTC))


def failures(reason: str) -> float:
    return metrics.EVENT_FAILURES.labels(reason)._value.get()


def test_events_for_catalog_items_are_pushed(service: RecommendService) -> None:
    asyncio.run(service.record_event(event(1000), 2.0))
    assert [e.item_id for e in service.release.features.pushed] == [1000]


def test_events_do_not_wait_behind_busy_recommend_workers(service: RecommendService) -> None:
    """Every Recommend worker stuck (as on a hung Triton, each waiting out its stage cap):
    an event is still stored at once, not timed out UNAVAILABLE behind them."""
    gate = threading.Event()
    busy = [service.pool.submit(gate.wait, 10) for _ in range(service.cfg.workers)]
    try:
        asyncio.run(service.record_event(event(1000), 0.1))
    finally:
        gate.set()
    assert [e.item_id for e in service.release.features.pushed] == [1000]
    assert all(f.result(timeout=5) for f in busy)


@pytest.mark.parametrize("item_id", [0, 4, 999, 2**63 - 1])
def test_events_for_unknown_items_are_refused(service: RecommendService, item_id: int) -> None:
    with pytest.raises(UnknownItem, match=str(item_id)):
        asyncio.run(service.record_event(event(item_id), 2.0))
    assert service.release.features.pushed == []  # never enters the user's history


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (FeatureStoreUnavailable("redis", ConnectionError("Connection refused")), "unavailable"),
        (FeatureStoreUnavailable("sqlite", sqlite3.OperationalError("locked")), "unavailable"),
        (RuntimeError("feast broke"), "error"),
    ],
)
def test_store_failures_are_unavailable_with_one_log_line(
    service: RecommendService,
    caplog: pytest.LogCaptureFixture,
    error: BaseException,
    reason: str,
) -> None:
    service.release.features.fail = error
    before = failures(reason)
    with caplog.at_level(logging.INFO), pytest.raises(ServiceUnavailable, match="retry"):
        asyncio.run(service.record_event(event(5), 2.0))
    assert failures(reason) == before + 1
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert not lines[0].exc_info and "\n" not in lines[0].getMessage()
    assert reason in lines[0].getMessage()


def test_slow_store_is_unavailable_in_time(service: RecommendService) -> None:
    service.release.features.slow = True
    before = failures("timeout")
    with pytest.raises(ServiceUnavailable):
        asyncio.run(service.record_event(event(5), 0.05))
    assert failures("timeout") == before + 1

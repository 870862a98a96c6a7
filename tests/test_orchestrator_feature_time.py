"""The serving clock of time-relative features never runs far outside the release's data:
a release trained on old data, asked without a timestamp today, scores as of its data end
(+ the allowed lead); a replayed historical timestamp is used as given."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

from orchestrator.request import RecommendQuery
from orchestrator.service import RecommendService


def _service(data_end: datetime, lead_days: float) -> SimpleNamespace:
    return SimpleNamespace(
        release=SimpleNamespace(data_end=data_end.timestamp()), clock_lead_s=lead_days * 86400
    )


def test_wall_clock_far_after_the_data_is_capped() -> None:
    end = datetime(1998, 4, 22, tzinfo=UTC)
    svc = _service(end, 7)
    q = RecommendQuery(user_id=1, k=10, timestamp=datetime(2026, 11, 30, tzinfo=UTC))
    assert RecommendService.feature_time(svc, q) == end.timestamp() + 7 * 86400  # type: ignore[arg-type]


def test_historical_and_current_timestamps_are_used_as_given() -> None:
    end = datetime(2026, 9, 30, tzinfo=UTC)
    svc = _service(end, 7)
    for when in (datetime(1998, 1, 1, tzinfo=UTC), datetime(2026, 10, 2, tzinfo=UTC)):
        q = RecommendQuery(user_id=1, k=10, timestamp=when)
        assert RecommendService.feature_time(svc, q) == when.timestamp()  # type: ignore[arg-type]

"""Request validation: the same rules for gRPC messages and HTTP query strings."""

from __future__ import annotations

import math

import pytest

from orchestrator import recommender_pb2 as pb
from orchestrator.request import (
    InvalidRequest,
    event_from_grpc,
    event_from_http,
    from_grpc,
    from_http,
)


def _req(**kw: object) -> pb.RecommendRequest:
    base: dict[str, object] = {"user_id": "12", "k": 10}
    base.update(kw)
    return pb.RecommendRequest(**base)  # type: ignore[arg-type]


def test_valid_request_round_trip() -> None:
    q = from_grpc(
        _req(
            filters=pb.Filters(
                include_categories=[1, 2],
                exclude_item_ids=[5],
                price=pb.PriceRange(min=1.0, max=0.0),
            )
        )
    )
    assert q.user_id == 12 and q.k == 10
    assert q.filters.include_categories == {1, 2}
    assert q.filters.exclude_item_ids == {5}
    assert q.filters.price_max == math.inf  # 0 = no upper bound


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"k": 0}, "k must be in 1..200"),
        ({"k": 1_000_000}, "k must be in 1..200"),
        ({"user_id": ""}, "user_id is empty"),
        ({"user_id": "abc"}, "non-negative integer"),
        ({"user_id": "-3"}, "non-negative integer"),
        ({"filters": pb.Filters(include_categories=[1], exclude_categories=[1])}, "both"),
        ({"filters": pb.Filters(include_categories=[-1])}, "non-negative"),
        ({"filters": pb.Filters(price=pb.PriceRange(min=10, max=5))}, "price.max"),
        ({"filters": pb.Filters(price=pb.PriceRange(min=-1))}, ">= 0"),
        ({"filters": pb.Filters(price=pb.PriceRange(min=float("nan")))}, "finite"),
    ],
)
def test_invalid_grpc_requests_name_the_field(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle):
        from_grpc(_req(**kw))


def test_http_params_follow_the_same_rules() -> None:
    q = from_http({"user_id": "7", "k": "5", "exclude_categories": "3,4", "price_max": "20"})
    assert (q.user_id, q.k, q.filters.exclude_categories, q.filters.price_max) == (
        7,
        5,
        {3, 4},
        20.0,
    )
    for params, needle in [
        ({"user_id": "7", "k": "x"}, "k must be an integer"),
        ({"user_id": "7", "k": "0"}, "k must be in"),
        ({"k": "3"}, "user_id is empty"),
        ({"user_id": "7", "exclude_categories": "a,b"}, "list of integers"),
        ({"user_id": "7", "price_min": "cheap"}, "price_min must be a number"),
    ]:
        with pytest.raises(InvalidRequest, match=needle):
            from_http(params)


def test_events_are_validated() -> None:
    e = event_from_grpc(pb.RecordEventRequest(user_id="3", item_id=9, event=pb.PURCHASE))
    assert (e.user_id, e.item_id, e.event) == (3, 9, "purchase")
    with pytest.raises(InvalidRequest, match="event must be"):
        event_from_grpc(pb.RecordEventRequest(user_id="3", item_id=9))
    assert event_from_http({"user_id": "3", "item_id": 9, "event": "CLICK"}).event == "click"
    for body, needle in [
        ([], "JSON object"),
        ({"user_id": "3", "item_id": 9, "event": "like"}, "event must be"),
        ({"user_id": "3", "item_id": "x", "event": "view"}, "item_id must be an integer"),
        ({"user_id": "3", "item_id": 1, "event": "view", "timestamp": "yesterday"}, "ISO"),
    ]:
        with pytest.raises(InvalidRequest, match=needle):
            event_from_http(body)

"""Validated requests: gRPC messages and HTTP/JSON bodies become the same typed objects, or
an :class:`InvalidRequest` naming the offending field. Field names come from the .proto."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from orchestrator import recommender_pb2 as pb

K_MIN, K_MAX = 1, 200
EVENT_NAMES = {pb.VIEW: "view", pb.CLICK: "click", pb.PURCHASE: "purchase"}


class InvalidRequest(ValueError):
    """A request that cannot be served as sent (gRPC INVALID_ARGUMENT, HTTP 400)."""


@dataclass(frozen=True)
class Filters:
    include_categories: frozenset[int] = frozenset()
    exclude_categories: frozenset[int] = frozenset()
    exclude_item_ids: frozenset[int] = frozenset()
    price_min: float = 0.0
    price_max: float = math.inf


@dataclass(frozen=True)
class RecommendQuery:
    user_id: int
    k: int
    surface: str = ""
    device: str = ""
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))
    filters: Filters = Filters()


@dataclass(frozen=True)
class EventQuery:
    user_id: int
    item_id: int
    event: str
    timestamp: datetime


def parse_user_id(raw: str) -> int:
    """User ids travel as decimal strings (the proto's ``user_id``)."""
    raw = raw.strip()
    if not raw:
        raise InvalidRequest("user_id is empty")
    if not raw.isdigit():
        raise InvalidRequest(f"user_id must be a non-negative integer, got {raw!r}")
    value = int(raw)
    if value >= 2**63:
        raise InvalidRequest("user_id is out of range")
    return value


def check_k(k: int) -> int:
    if not K_MIN <= k <= K_MAX:
        raise InvalidRequest(f"k must be in {K_MIN}..{K_MAX}, got {k}")
    return k


def _timestamp(ts: Any, has: bool) -> datetime:
    return ts.ToDatetime(tzinfo=UTC) if has else datetime.now(UTC)


def build_filters(
    include: list[int] | tuple[int, ...],
    exclude: list[int] | tuple[int, ...],
    exclude_items: list[int] | tuple[int, ...],
    price_min: float,
    price_max: float,
) -> Filters:
    """Check and normalise request filters (price_max 0 means no upper bound)."""
    for name, values in (
        ("include_categories", include),
        ("exclude_categories", exclude),
        ("exclude_item_ids", exclude_items),
    ):
        if any(int(v) < 0 for v in values):
            raise InvalidRequest(f"filters.{name} must hold non-negative ids")
    if len(exclude_items) > 10_000:
        raise InvalidRequest("filters.exclude_item_ids holds more than 10000 ids")
    if set(include) & set(exclude):
        raise InvalidRequest("filters: a category is both included and excluded")
    if not (math.isfinite(price_min) and math.isfinite(price_max)):
        raise InvalidRequest("filters.price bounds must be finite numbers")
    if price_min < 0 or price_max < 0:
        raise InvalidRequest("filters.price bounds must be >= 0")
    upper = price_max if price_max > 0 else math.inf
    if upper < price_min:
        raise InvalidRequest(f"filters.price.max {price_max} < filters.price.min {price_min}")
    return Filters(
        frozenset(int(c) for c in include),
        frozenset(int(c) for c in exclude),
        frozenset(int(i) for i in exclude_items),
        float(price_min),
        upper,
    )


def from_grpc(req: pb.RecommendRequest) -> RecommendQuery:
    """Validate a gRPC RecommendRequest."""
    f = req.filters
    return RecommendQuery(
        user_id=parse_user_id(req.user_id),
        k=check_k(req.k),
        surface=req.context.surface,
        device=req.context.device,
        timestamp=_timestamp(req.context.timestamp, req.context.HasField("timestamp")),
        filters=build_filters(
            list(f.include_categories),
            list(f.exclude_categories),
            list(f.exclude_item_ids),
            f.price.min,
            f.price.max,
        ),
    )


def event_from_grpc(req: pb.RecordEventRequest) -> EventQuery:
    """Validate a gRPC RecordEventRequest."""
    if req.event not in EVENT_NAMES:
        raise InvalidRequest("event must be VIEW, CLICK or PURCHASE")
    if req.item_id < 0:
        raise InvalidRequest("item_id must be non-negative")
    return EventQuery(
        user_id=parse_user_id(req.user_id),
        item_id=int(req.item_id),
        event=EVENT_NAMES[req.event],
        timestamp=_timestamp(req.timestamp, req.HasField("timestamp")),
    )


def _int_list(value: Any, name: str) -> list[int]:
    if value in (None, ""):
        return []
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise InvalidRequest(f"{name} must be a list of integers")
    try:
        return [int(v) for v in items]
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} must be a list of integers") from None


def _float(value: Any, name: str, default: float) -> float:
    if value in (None, ""):
        return default
    try:
        return float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{name} must be a number") from None


def from_http(params: dict[str, Any]) -> RecommendQuery:
    """Validate ``GET /v1/recommendations`` query parameters (same rules as gRPC)."""
    try:
        k = int(params.get("k", 10))
    except (TypeError, ValueError):
        raise InvalidRequest("k must be an integer") from None
    ts = params.get("timestamp")
    when = datetime.now(UTC)
    if ts:
        try:
            when = datetime.fromisoformat(str(ts))
        except ValueError:
            raise InvalidRequest("timestamp must be ISO-8601") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    return RecommendQuery(
        user_id=parse_user_id(str(params.get("user_id", ""))),
        k=check_k(k),
        surface=str(params.get("surface", "")),
        device=str(params.get("device", "")),
        timestamp=when,
        filters=build_filters(
            _int_list(params.get("include_categories"), "include_categories"),
            _int_list(params.get("exclude_categories"), "exclude_categories"),
            _int_list(params.get("exclude_item_ids"), "exclude_item_ids"),
            _float(params.get("price_min"), "price_min", 0.0),
            _float(params.get("price_max"), "price_max", 0.0),
        ),
    )


def event_from_http(body: Any) -> EventQuery:
    """Validate a ``POST /v1/events`` JSON body."""
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    event = str(body.get("event", "")).lower()
    if event not in EVENT_NAMES.values():
        raise InvalidRequest("event must be one of view, click, purchase")
    try:
        item_id = int(body["item_id"])
    except (KeyError, TypeError, ValueError):
        raise InvalidRequest("item_id must be an integer") from None
    if item_id < 0:
        raise InvalidRequest("item_id must be non-negative")
    when = datetime.now(UTC)
    if body.get("timestamp"):
        try:
            when = datetime.fromisoformat(str(body["timestamp"]))
        except ValueError:
            raise InvalidRequest("timestamp must be ISO-8601") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
    return EventQuery(parse_user_id(str(body.get("user_id", ""))), item_id, event, when)

"""Validated requests: gRPC messages and HTTP/JSON bodies become the same typed objects, or
an :class:`InvalidRequest` naming the offending field. Field names come from the .proto.

One set of rules for both fronts (documented in docs/architecture.md, "Bad input"):

- ids (user, item, category) are integers in ``[0, 2**63)`` (int64, Feast's join keys);
  a user id travels as a string: 1..19 ASCII digits ``0-9`` (no sign, no whitespace,
  no other Unicode digits) are that integer, any other string is a key (a UUID, a SKU)
  of 1..64 characters of ``A-Z a-z 0-9 . _ : - @ / +`` mapped by recstack/ids.py (the
  same rule as the importer's); items may be named by such keys too (``item_key``,
  ``exclude_item_keys``); over HTTP, query-string integers follow the digits rule and
  JSON ids must be JSON integers (not floats, booleans or strings);
- ``k`` in 1..200; ``surface``/``device`` at most 128 characters;
- at most 1,000 ids in each category list and 10,000 in ``exclude_item_ids``;
- timestamps between 1678-01-01 and 2261-12-31 UTC (what datetime64[ns] holds; imported
  data is held to a narrower range, docs/data.md); HTTP takes ISO-8601, naive times are UTC;
- an event's timestamp at most ``event_max_future_s`` ahead of the server's clock and at
  most ``event_max_age_s`` behind it (settings, see :class:`EventWindow`);
- an event's optional ``request_id`` (the served list it came from): at most 64
  characters of ``A-Z a-z 0-9 . _ : -``;
- HTTP: only the documented query parameters / JSON fields, each at most once.

Sizes are checked before anything is parsed or allocated (string lengths, element
counts), so an oversized request costs microseconds on the event loop.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from orchestrator import recommender_pb2 as pb
from recstack.ids import ID_LIMIT, ID_MAX_DIGITS, KEY_MAX_CHARS, InvalidId, internal_id

if TYPE_CHECKING:
    from recstack.settings import Settings

K_MIN, K_MAX = 1, 200
MAX_CATEGORIES = 1_000  # per include/exclude list
MAX_EXCLUDE_ITEMS = 10_000
MAX_TEXT = 128  # surface, device
# What datetime64[ns] (pandas, Feast) holds, whole years.
TIME_MIN = datetime(1678, 1, 1, tzinfo=UTC)
TIME_MAX = datetime(2262, 1, 1, tzinfo=UTC)  # exclusive
MAX_TIMESTAMP_CHARS = 64
MAX_EVENT_BODY_BYTES = 64 * 1024  # a POST /v1/events body; real ones are < 200 bytes
MAX_PRICE_CHARS = 32
MAX_REQUEST_ID = 64

EVENT_NAMES = {pb.VIEW: "view", pb.CLICK: "click", pb.PURCHASE: "purchase"}
HTTP_PARAMS = (
    "user_id",
    "k",
    "surface",
    "device",
    "timestamp",
    "include_categories",
    "exclude_categories",
    "exclude_item_ids",
    "exclude_item_keys",
    "price_min",
    "price_max",
)
EVENT_FIELDS = ("user_id", "item_id", "item_key", "event", "timestamp", "request_id")

_ID_LIST = re.compile(r"[0-9]{1,19}(?:,[0-9]{1,19})*", re.ASCII)
_PRICE = re.compile(r"[0-9]+(\.[0-9]*)?|\.[0-9]+", re.ASCII)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]*", re.ASCII)


class InvalidRequest(ValueError):
    """A request that cannot be served as sent (gRPC INVALID_ARGUMENT, HTTP 400)."""


class PayloadTooLarge(InvalidRequest):
    """A request body over its size limit (HTTP 413)."""


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
    request_id: str = ""  # the served list it came from (RecommendResponse.request_id)


@dataclass(frozen=True)
class EventWindow:
    """How far an event's timestamp may lie from the server's clock: ahead by at most
    ``max_future_s`` (clock skew), behind by at most ``max_age_s`` (late delivery).
    Outside it the event is refused rather than written with a time the online store
    would mis-order (a future row would hide every later event of the user)."""

    max_future_s: float
    max_age_s: float

    @classmethod
    def from_settings(cls, settings: Settings) -> EventWindow:
        return cls(settings.event_max_future_s, settings.event_max_age_s)

    def check(self, when: datetime, now: datetime | None = None) -> datetime:
        now = now or datetime.now(UTC)
        ahead = (when - now).total_seconds()
        if ahead > self.max_future_s:
            raise InvalidRequest(
                f"timestamp is {ahead:.0f} s in the future; at most {self.max_future_s:g} s "
                "is allowed (RECSTACK_EVENT_MAX_FUTURE_S)"
            )
        if -ahead > self.max_age_s:
            raise InvalidRequest(
                f"timestamp is {-ahead:.0f} s old; at most {self.max_age_s:g} s "
                "is allowed (RECSTACK_EVENT_MAX_AGE_S)"
            )
        return when


def _show(raw: str) -> str:
    """A client's value in an error message, cut short (it may be megabytes)."""
    return repr(raw) if len(raw) <= 32 else repr(raw[:32]) + f"... ({len(raw)} characters)"


def _ascii_digits(raw: str) -> bool:
    # str.isdigit alone accepts '²', '٣' and other Unicode digits.
    return raw.isascii() and raw.isdigit()


def parse_key(raw: object, name: str) -> int:
    """An external id as a string (recstack/ids.py): 1..19 ASCII digits below 2**63 are
    that integer; a key (UUID, SKU) of 1..64 characters of ``A-Z a-z 0-9 . _ : - @ / +``
    is its 63-bit hash."""
    if not isinstance(raw, str):
        raise InvalidRequest(f"{name} must be a string (decimal digits or a key)")
    try:
        return internal_id(raw, name)
    except InvalidId as e:
        raise InvalidRequest(f"{e}, got {_show(raw)}" if raw else str(e)) from None


def parse_user_id(raw: object) -> int:
    """User ids travel as strings (the proto's ``user_id``): see :func:`parse_key`."""
    return parse_key(raw, "user_id")


def _item_keys(raw: Iterable[str], name: str) -> list[int]:
    return [parse_key(k, name) for k in raw]


def _id_text(raw: str, name: str) -> int:
    """An id written in a query string: the same digits rule as user ids."""
    if not raw or len(raw) > ID_MAX_DIGITS or not _ascii_digits(raw) or int(raw) >= ID_LIMIT:
        raise InvalidRequest(
            f"{name} must be a list of integers in [0, 2**63) separated by commas, got {_show(raw)}"
        )
    return int(raw)


class _HugeInt:
    """A JSON integer too long to be any valid value; never converted with int()."""


def _json_id(value: object, name: str) -> int:
    """A JSON integer (not a float, bool or string) in [0, 2**63)."""
    if isinstance(value, _HugeInt):
        raise InvalidRequest(f"{name} must be in [0, 2**63)")
    if type(value) is not int:  # bool is an int subclass; 7.0 and "7" are not ids
        raise InvalidRequest(f"{name} must be an integer")
    if not 0 <= value < ID_LIMIT:
        raise InvalidRequest(f"{name} must be in [0, 2**63)")
    return value


def check_k(k: int) -> int:
    if not K_MIN <= k <= K_MAX:
        raise InvalidRequest(f"k must be in {K_MIN}..{K_MAX}, got {k}")
    return k


def check_request_id(raw: object) -> str:
    """An event's optional ``request_id``: "" or up to 64 characters of A-Z a-z 0-9 . _ : -
    (it is written to the event log and joined on, so no spaces or control characters)."""
    if not isinstance(raw, str):
        raise InvalidRequest("request_id must be a string")
    if len(raw) > MAX_REQUEST_ID or not _REQUEST_ID.fullmatch(raw):
        raise InvalidRequest(
            f"request_id must be at most {MAX_REQUEST_ID} characters of A-Z a-z 0-9 . _ : -,"
            f" got {_show(raw)}"
        )
    return raw


def _text(value: str, name: str) -> str:
    if len(value) > MAX_TEXT:
        raise InvalidRequest(f"{name} is longer than {MAX_TEXT} characters")
    return value


def _check_count(name: str, n: int) -> None:
    limit = MAX_EXCLUDE_ITEMS if name == "exclude_item_ids" else MAX_CATEGORIES
    if n > limit:
        raise InvalidRequest(f"filters.{name} holds {n} ids; at most {limit} are allowed")


def _in_range(when: datetime, name: str) -> datetime:
    if not TIME_MIN <= when < TIME_MAX:
        raise InvalidRequest(f"{name} must be between 1678-01-01 and 2261-12-31 (UTC)")
    return when


def _proto_time(ts: Any, name: str) -> datetime:
    """A google.protobuf.Timestamp within the documented range (ToDatetime raises a bare
    ValueError outside its own, wider one)."""
    if not 0 <= ts.nanos < 1_000_000_000:
        raise InvalidRequest(f"{name}.nanos must be in 0..999999999")
    if not TIME_MIN.timestamp() <= ts.seconds < TIME_MAX.timestamp():
        raise InvalidRequest(f"{name} must be between 1678-01-01 and 2261-12-31 (UTC)")
    return _in_range(ts.ToDatetime(tzinfo=UTC), name)


def _iso_time(raw: object, name: str) -> datetime:
    """An ISO-8601 string (naive = UTC) within the documented range."""
    if not isinstance(raw, str) or len(raw) > MAX_TIMESTAMP_CHARS or not raw.isascii():
        raise InvalidRequest(f"{name} must be an ISO-8601 string")
    try:
        when = datetime.fromisoformat(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be ISO-8601, got {_show(raw)}") from None
    # Check the year before converting: shifting year 1 or 9999 by an offset overflows.
    if not TIME_MIN.year <= when.year < TIME_MAX.year:
        raise InvalidRequest(f"{name} must be between 1678-01-01 and 2261-12-31 (UTC)")
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return _in_range(when, name)


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
        _check_count(name, len(values))
        if values and not (min(values) >= 0 and max(values) < ID_LIMIT):
            raise InvalidRequest(f"filters.{name} must hold non-negative ids below 2**63")
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
        frozenset(include),
        frozenset(exclude),
        frozenset(exclude_items),
        float(price_min),
        upper,
    )


# ---------------------------------------------------------------------------------- gRPC
def from_grpc(req: pb.RecommendRequest) -> RecommendQuery:
    """Validate a gRPC RecommendRequest."""
    f = req.filters
    # len() of a repeated field is O(1): refuse oversized lists before copying them.
    _check_count("include_categories", len(f.include_categories))
    _check_count("exclude_categories", len(f.exclude_categories))
    _check_count("exclude_item_ids", len(f.exclude_item_ids) + len(f.exclude_item_keys))
    ctx = req.context
    return RecommendQuery(
        user_id=parse_user_id(req.user_id),
        k=check_k(req.k),
        surface=_text(ctx.surface, "context.surface"),
        device=_text(ctx.device, "context.device"),
        timestamp=(
            _proto_time(ctx.timestamp, "context.timestamp")
            if ctx.HasField("timestamp")
            else datetime.now(UTC)
        ),
        filters=build_filters(
            list(f.include_categories),
            list(f.exclude_categories),
            [*f.exclude_item_ids, *_item_keys(f.exclude_item_keys, "filters.exclude_item_keys")],
            f.price.min,
            f.price.max,
        ),
    )


def event_from_grpc(
    req: pb.RecordEventRequest, window: EventWindow, now: datetime | None = None
) -> EventQuery:
    """Validate a gRPC RecordEventRequest."""
    if req.event not in EVENT_NAMES:
        raise InvalidRequest("event must be VIEW, CLICK or PURCHASE")
    if req.item_id < 0:
        raise InvalidRequest("item_id must be non-negative")
    item_id = int(req.item_id)
    if req.item_key:
        if item_id:
            raise InvalidRequest("give item_id or item_key, not both")
        item_id = parse_key(req.item_key, "item_key")
    user_id = parse_user_id(req.user_id)
    now = now or datetime.now(UTC)
    when = now
    if req.HasField("timestamp"):
        when = window.check(_proto_time(req.timestamp, "timestamp"), now)
    request_id = check_request_id(req.request_id)
    return EventQuery(user_id, item_id, EVENT_NAMES[req.event], when, request_id)


# ---------------------------------------------------------------------------------- HTTP
def _single_params(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> dict[str, str]:
    """Known names only, each once (a misspelt filter must not be silently ignored)."""
    pairs = params.items() if isinstance(params, Mapping) else params
    out: dict[str, str] = {}
    for name, value in pairs:
        if name not in HTTP_PARAMS:
            raise InvalidRequest(
                f"unknown query parameter {_show(name)}; known: {', '.join(HTTP_PARAMS)}"
            )
        if name in out:
            raise InvalidRequest(f"query parameter {name!r} is given more than once")
        out[name] = value
    return out


def _id_list(raw: str, name: str) -> list[int]:
    """Comma-separated ids; the count is checked on the raw string before splitting."""
    if raw == "":
        return []
    limit = MAX_EXCLUDE_ITEMS if name == "exclude_item_ids" else MAX_CATEGORIES
    if len(raw) > limit * (ID_MAX_DIGITS + 1):
        raise InvalidRequest(f"filters.{name} holds more than {limit} ids")
    _check_count(name, raw.count(",") + 1)
    if not _ID_LIST.fullmatch(raw):  # one C-speed pass; find the culprit only on failure
        for part in raw.split(","):
            _id_text(part, name)
    values = list(map(int, raw.split(",")))
    if max(values) >= ID_LIMIT:
        _id_text(str(max(values)), name)
    return values


def _key_list(raw: str) -> list[int]:
    """Comma-separated item keys (keys hold no commas); the count is checked first."""
    if raw == "":
        return []
    if len(raw) > MAX_EXCLUDE_ITEMS * (KEY_MAX_CHARS + 1):
        raise InvalidRequest(f"filters.exclude_item_keys holds more than {MAX_EXCLUDE_ITEMS} ids")
    _check_count("exclude_item_ids", raw.count(",") + 1)
    return _item_keys(raw.split(","), "exclude_item_keys")


def _price(raw: str, name: str, default: float) -> float:
    if raw == "":
        return default
    if len(raw) > MAX_PRICE_CHARS or not _PRICE.fullmatch(raw):
        raise InvalidRequest(f"{name} must be a number (non-negative, decimal), got {_show(raw)}")
    return float(raw)


def _k_text(raw: str) -> int:
    if not raw or not _ascii_digits(raw):
        raise InvalidRequest(f"k must be an integer, got {_show(raw)}")
    return check_k(int(raw) if len(raw) <= 4 else K_MAX + 1)


# HTTP has no deadline of its own. A client (or a proxy in front: Envoy sets the second
# header to the route's timeout) says how long it waits, in whole milliseconds, and the
# answer is then due by it as a gRPC answer is by the call's deadline.
DEADLINE_HEADERS = ("X-Request-Timeout-Ms", "X-Envoy-Expected-Rq-Timeout-Ms")
DEADLINE_MAX_MS = 3_600_000


def deadline_from_headers(headers: Any) -> float | None:
    """Seconds the HTTP client waits (the shortest of DEADLINE_HEADERS), None without one.
    ``headers``: a case-insensitive multi-dict (aiohttp's ``request.headers``)."""
    shortest: int | None = None
    for name in DEADLINE_HEADERS:
        values = headers.getall(name, [])
        if not values:
            continue
        raw = values[0]
        ok = len(values) == 1 and len(raw) <= 7 and _ascii_digits(raw)
        if not ok or not 1 <= int(raw) <= DEADLINE_MAX_MS:
            raise InvalidRequest(
                f"header {name} must be given once, as whole milliseconds in "
                f"1..{DEADLINE_MAX_MS}, got {_show(', '.join(values))}"
            )
        ms = int(raw)
        shortest = ms if shortest is None else min(shortest, ms)
    return None if shortest is None else shortest / 1000


def from_http(params: Mapping[str, str] | Iterable[tuple[str, str]]) -> RecommendQuery:
    """Validate ``GET /v1/recommendations`` query parameters (same rules as gRPC); takes
    a mapping or the (name, value) pairs of the query string (duplicates are refused)."""
    p = _single_params(params)
    ts = p.get("timestamp", "")
    return RecommendQuery(
        user_id=parse_user_id(p.get("user_id", "")),
        k=_k_text(p.get("k", "10")),
        surface=_text(p.get("surface", ""), "surface"),
        device=_text(p.get("device", ""), "device"),
        timestamp=_iso_time(ts, "timestamp") if ts else datetime.now(UTC),
        filters=build_filters(
            _id_list(p.get("include_categories", ""), "include_categories"),
            _id_list(p.get("exclude_categories", ""), "exclude_categories"),
            _id_list(p.get("exclude_item_ids", ""), "exclude_item_ids")
            + _key_list(p.get("exclude_item_keys", "")),
            _price(p.get("price_min", ""), "price_min", 0.0),
            _price(p.get("price_max", ""), "price_max", 0.0),
        ),
    )


def _json_int(text: str) -> int | _HugeInt:
    # Called by the decoder for every JSON integer: int() of a huge one does quadratic
    # work (and raises a bare ValueError past 4,300 digits); the field's rule refuses it.
    return _HugeInt() if len(text) > ID_MAX_DIGITS + 1 else int(text)


def _json_constant(name: str) -> float:
    raise InvalidRequest(f"{name} is not valid JSON")


def parse_json_body(raw: bytes, limit: int = MAX_EVENT_BODY_BYTES) -> Any:
    """Decode a JSON request body: size first, then strict UTF-8, bounded integers,
    no NaN/Infinity; nesting too deep for the decoder is an InvalidRequest too."""
    if len(raw) > limit:
        raise PayloadTooLarge(f"body is larger than {limit} bytes")
    try:
        text = raw.decode("utf-8")
        return json.loads(text, parse_int=_json_int, parse_constant=_json_constant)
    except UnicodeDecodeError:
        raise InvalidRequest("body must be UTF-8 JSON") from None
    except RecursionError:
        raise InvalidRequest("body is nested too deeply") from None
    except ValueError as e:
        if isinstance(e, InvalidRequest):
            raise
        raise InvalidRequest("body must be JSON") from None


def event_from_http(body: Any, window: EventWindow, now: datetime | None = None) -> EventQuery:
    """Validate a ``POST /v1/events`` JSON body (already decoded by
    :func:`parse_json_body`): ``user_id`` a digit string or key, ``item_id`` a JSON
    integer or ``item_key`` a string (digits or a key),
    ``event`` view/click/purchase (any case), optional ISO-8601 ``timestamp`` and
    ``request_id``."""
    if not isinstance(body, dict):
        raise InvalidRequest("body must be a JSON object")
    unknown = [k for k in body if k not in EVENT_FIELDS]
    if unknown:
        raise InvalidRequest(
            f"unknown field {_show(str(unknown[0]))}; known: {', '.join(EVENT_FIELDS)}"
        )
    event = body.get("event", "")
    if not isinstance(event, str) or event.lower() not in EVENT_NAMES.values():
        raise InvalidRequest("event must be one of view, click, purchase")
    if "item_key" in body:
        if "item_id" in body:
            raise InvalidRequest("give item_id or item_key, not both")
        item_id = parse_key(body["item_key"], "item_key")
    elif "item_id" not in body:
        raise InvalidRequest("item_id must be an integer (or give item_key)")
    else:
        item_id = _json_id(body["item_id"], "item_id")
    user_id = parse_user_id(body.get("user_id", ""))
    now = now or datetime.now(UTC)
    when = now
    if body.get("timestamp") is not None:
        when = window.check(_iso_time(body["timestamp"], "timestamp"), now)
    raw_id = body.get("request_id")
    request_id = check_request_id("" if raw_id is None else raw_id)
    return EventQuery(user_id, item_id, event.lower(), when, request_id)

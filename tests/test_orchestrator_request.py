"""Request validation: the same rules for gRPC messages and HTTP query strings."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from conftest import cpu_cost
from google.protobuf.timestamp_pb2 import Timestamp

from orchestrator import recommender_pb2 as pb
from orchestrator.request import (
    MAX_CATEGORIES,
    MAX_EVENT_BODY_BYTES,
    MAX_EXCLUDE_ITEMS,
    EventWindow,
    InvalidRequest,
    PayloadTooLarge,
    event_from_grpc,
    event_from_http,
    from_grpc,
    from_http,
    parse_json_body,
    parse_user_id,
)
from recstack.ids import key_hash
from recstack.settings import Settings

WINDOW = EventWindow(max_future_s=300, max_age_s=86_400)
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


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
        ({"user_id": "a bc"}, "non-negative integer or a key"),
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
        ({"user_id": "7", "include_categories": "1,,2"}, "list of integers"),
        ({"user_id": "7", "price_min": "cheap"}, "price_min must be a number"),
    ]:
        with pytest.raises(InvalidRequest, match=needle):
            from_http(params)


def test_events_are_validated() -> None:
    e = event_from_grpc(pb.RecordEventRequest(user_id="3", item_id=9, event=pb.PURCHASE), WINDOW)
    assert (e.user_id, e.item_id, e.event) == (3, 9, "purchase")
    with pytest.raises(InvalidRequest, match="event must be"):
        event_from_grpc(pb.RecordEventRequest(user_id="3", item_id=9), WINDOW)
    ok = {"user_id": "3", "item_id": 9, "event": "CLICK"}
    assert event_from_http(ok, WINDOW).event == "click"
    for body, needle in [
        ([], "JSON object"),
        ({"user_id": "3", "item_id": 9, "event": "like"}, "event must be"),
        ({"user_id": "3", "item_id": "x", "event": "view"}, "item_id must be an integer"),
        ({"user_id": "3", "item_id": 1, "event": "view", "timestamp": "yesterday"}, "ISO"),
    ]:
        with pytest.raises(InvalidRequest, match=needle):
            event_from_http(body, WINDOW)


@pytest.mark.parametrize(
    ("raw", "ok"),
    [
        ("", True),
        ("0123456789abcdef0123456789abcdef", True),  # what the service hands out
        ("client-7:list_3.a", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("has space", False),
        ("tab\there", False),
        ("ünï", False),
        ('{"a":1}', False),
    ],
)
def test_event_request_ids_are_bounded_and_plain(raw: str, ok: bool) -> None:
    req = pb.RecordEventRequest(user_id="3", item_id=9, event=pb.CLICK, request_id=raw)
    body = {"user_id": "3", "item_id": 9, "event": "click", "request_id": raw}
    if ok:
        assert event_from_grpc(req, WINDOW).request_id == raw
        assert event_from_http(body, WINDOW).request_id == raw
    else:
        with pytest.raises(InvalidRequest, match="request_id must be at most 64"):
            event_from_grpc(req, WINDOW)
        with pytest.raises(InvalidRequest, match="request_id must be at most 64"):
            event_from_http(body, WINDOW)


def test_event_request_id_over_http_is_a_string_or_null() -> None:
    body = {"user_id": "3", "item_id": 9, "event": "click"}
    assert event_from_http({**body, "request_id": None}, WINDOW).request_id == ""
    with pytest.raises(InvalidRequest, match="request_id must be a string"):
        event_from_http({**body, "request_id": 12}, WINDOW)


# ------------------------------------------------------------------------ ids


@pytest.mark.parametrize(
    "raw",
    [
        "²³",  # superscript digits: str.isdigit() says True
        "١٢٣",  # Arabic-Indic digits
        "１２",  # fullwidth digits
        " 12",
        "12 ",
        "+5",  # a key may not read as a signed or decimal number
        "-5",
        "1.5",
        "1" * 4300,  # int() of it would raise a bare ValueError
        "1" * 20,
    ],
)
def test_user_ids_are_ascii_digits_or_keys(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="user_id must be a non-negative integer"):
        parse_user_id(raw)
    with pytest.raises(InvalidRequest):
        from_grpc(_req(user_id=raw))
    with pytest.raises(InvalidRequest):
        from_http({"user_id": raw})


def test_user_id_range_is_int64() -> None:
    assert parse_user_id(str(2**63 - 1)) == 2**63 - 1
    assert parse_user_id("0") == 0
    with pytest.raises(InvalidRequest, match="out of range"):
        parse_user_id(str(2**63))
    with pytest.raises(InvalidRequest, match="must be a string"):
        parse_user_id(12)


def test_huge_user_id_is_refused_without_converting_it() -> None:
    raw = "9" * 1_000_000
    with pytest.raises(InvalidRequest) as err:
        parse_user_id(raw)
    assert len(str(err.value)) < 200  # the message does not echo a megabyte back

    def refuse() -> None:
        with pytest.raises(InvalidRequest):
            parse_user_id(raw)

    assert cpu_cost(refuse) < 0.01


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (7.9, "must be an integer"),
        (7.0, "must be an integer"),
        (True, "must be an integer"),
        ("7", "must be an integer"),
        (None, "must be an integer"),
        (-1, r"must be in \[0, 2\*\*63\)"),
        (2**63, r"must be in \[0, 2\*\*63\)"),
    ],
)
def test_json_item_ids_are_real_integers(value: object, needle: str) -> None:
    body = {"user_id": "3", "item_id": value, "event": "view"}
    with pytest.raises(InvalidRequest, match=needle):
        event_from_http(body, WINDOW)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b'{"user_id": "3", "item_id": 1e400, "event": "view"}', "item_id must be an integer"),
        (
            b'{"user_id": "3", "item_id": 1' + b"0" * 30 + b', "event": "view"}',
            "item_id must be in",
        ),
        (
            b'{"user_id": "3", "item_id": 1' + b"0" * 5000 + b', "event": "view"}',
            "item_id must be in",
        ),
        (b'{"user_id": "3", "item_id": NaN, "event": "view"}', "NaN is not valid JSON"),
        (b'{"user_id": "3", "item_id": 7, "event": "view"', "body must be JSON"),
        (b"\xff\xfe{}", "UTF-8"),
        (b"[" * 10_000 + b"]" * 10_000, "nested too deeply"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "nested too deeply"),
    ],
)
def test_json_bodies_fail_as_invalid_requests(raw: bytes, needle: str) -> None:
    with pytest.raises(InvalidRequest, match=needle):
        event_from_http(parse_json_body(raw), WINDOW)


def test_json_body_size_is_checked_before_parsing() -> None:
    with pytest.raises(PayloadTooLarge):
        parse_json_body(b" " * (MAX_EVENT_BODY_BYTES + 1))


def test_grpc_ids_must_be_non_negative() -> None:
    with pytest.raises(InvalidRequest, match="item_id"):
        event_from_grpc(pb.RecordEventRequest(user_id="3", item_id=-1, event=pb.VIEW), WINDOW)
    with pytest.raises(InvalidRequest, match="exclude_item_ids"):
        from_grpc(_req(filters=pb.Filters(exclude_item_ids=[3, -(2**63)])))


@pytest.mark.parametrize("raw", ["٣", "3 ", "-3", "3.0", str(2**63), "1e3", "0x10"])
def test_query_string_ids_are_ascii_digits(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="list of integers"):
        from_http({"user_id": "1", "exclude_item_ids": f"5,{raw}"})


# ------------------------------------------------------------------------ k and names


@pytest.mark.parametrize("raw", [" 5 ", "5 ", "٥", "+5", "5.0", "", "1e1"])
def test_k_over_http_is_strict(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="k must be an integer"):
        from_http({"user_id": "1", "k": raw})


def test_k_over_http_out_of_range() -> None:
    assert from_http({"user_id": "1", "k": "200"}).k == 200
    for raw in ("201", "99999999999999999999999"):
        with pytest.raises(InvalidRequest, match=r"k must be in 1\.\.200"):
            from_http({"user_id": "1", "k": raw})


@pytest.mark.parametrize("name", ["include_category", "userid", "K", "filters", ""])
def test_unknown_query_parameters_are_named(name: str) -> None:
    with pytest.raises(InvalidRequest, match=f"unknown query parameter {name!r}"):
        from_http({"user_id": "1", name: "3"})


def test_repeated_query_parameter_is_refused() -> None:
    with pytest.raises(InvalidRequest, match="more than once"):
        from_http([("user_id", "1"), ("include_categories", "3"), ("include_categories", "4")])


def test_unknown_event_fields_are_named() -> None:
    body = {"user_id": "1", "item_id": 2, "event": "view", "itemid": 3}
    with pytest.raises(InvalidRequest, match="unknown field 'itemid'"):
        event_from_http(body, WINDOW)


@pytest.mark.parametrize("raw", ["nan", "inf", "-1", "1e3", " 5", "5,0", "١", "0x1"])
def test_http_prices_are_plain_decimals(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="price_max must be a number"):
        from_http({"user_id": "1", "price_max": raw})
    assert from_http({"user_id": "1", "price_max": "12.5"}).filters.price_max == 12.5


def test_surface_and_device_are_bounded() -> None:
    with pytest.raises(InvalidRequest, match="surface"):
        from_http({"user_id": "1", "surface": "x" * 129})
    with pytest.raises(InvalidRequest, match=r"context\.device"):
        from_grpc(_req(context=pb.Context(device="x" * 129)))


# ------------------------------------------------------------------------ list sizes


@pytest.mark.parametrize(
    ("name", "limit"),
    [
        ("include_categories", MAX_CATEGORIES),
        ("exclude_categories", MAX_CATEGORIES),
        ("exclude_item_ids", MAX_EXCLUDE_ITEMS),
    ],
)
def test_list_sizes_are_bounded_on_both_fronts(name: str, limit: int) -> None:
    ok = list(range(limit))
    other = "exclude_categories" if name == "include_categories" else "include_categories"
    assert len(getattr(from_grpc(_req(filters=pb.Filters(**{name: ok}))).filters, name)) == limit
    with pytest.raises(InvalidRequest, match=f"filters.{name} holds {limit + 1} ids"):
        from_grpc(_req(filters=pb.Filters(**{name: [*ok, limit]})))
    with pytest.raises(InvalidRequest, match=f"filters.{name}"):
        from_http({"user_id": "1", name: ",".join(map(str, range(limit + 1)))})
    assert other != name


def test_oversized_lists_are_refused_before_they_are_copied() -> None:
    """A 1.3M-element request (the issue's) costs microseconds, not the event loop."""
    req = _req(filters=pb.Filters(include_categories=range(1_300_000)))
    raw = ",".join(["1"] * 1_300_000)

    def refuse_grpc() -> None:
        with pytest.raises(InvalidRequest, match="holds 1300000 ids"):
            from_grpc(req)

    def refuse_http() -> None:
        with pytest.raises(InvalidRequest, match="exclude_item_ids"):
            from_http({"user_id": "1", "exclude_item_ids": raw})

    assert cpu_cost(refuse_grpc) < 0.005
    assert cpu_cost(refuse_http) < 0.005


# ------------------------------------------------------------------------ timestamps


@pytest.mark.parametrize(
    "ts",
    [
        Timestamp(seconds=-62_135_596_801),  # before 0001-01-01: ToDatetime raises
        Timestamp(seconds=253_402_300_800),  # after 9999-12-31
        Timestamp(seconds=2**62),
        Timestamp(seconds=0, nanos=-1),
        Timestamp(seconds=0, nanos=1_000_000_000),
        Timestamp(seconds=-9_300_000_000),  # 1675: outside datetime64[ns]
        Timestamp(seconds=9_300_000_000),  # 2264
    ],
)
def test_proto_timestamps_out_of_range_are_invalid(ts: Timestamp) -> None:
    with pytest.raises(InvalidRequest, match="timestamp"):
        from_grpc(_req(context=pb.Context(timestamp=ts)))
    with pytest.raises(InvalidRequest, match="timestamp"):
        event_from_grpc(
            pb.RecordEventRequest(user_id="1", item_id=1, event=pb.VIEW, timestamp=ts), WINDOW
        )


@pytest.mark.parametrize(
    "raw",
    [
        "yesterday",
        "0001-01-01T00:00:00+01:00",  # converting it to UTC would overflow
        "9999-12-31T23:59:59-01:00",
        "2300-01-01T00:00:00Z",
        "1600-01-01",
        "2024-01-01T00:00:00+25:00",
        "２０２４-01-01",
        "2024-01-01T00:00:00Z" + " " * 100,
    ],
)
def test_iso_timestamps_out_of_range_or_malformed_are_invalid(raw: str) -> None:
    with pytest.raises(InvalidRequest, match="timestamp"):
        from_http({"user_id": "1", "timestamp": raw})


def test_recommend_timestamps_in_range_are_kept() -> None:
    q = from_http({"user_id": "1", "timestamp": "2024-03-01T10:00:00+02:00"})
    assert q.timestamp == datetime(2024, 3, 1, 8, 0, tzinfo=UTC)
    assert from_http({"user_id": "1", "timestamp": "1990-01-01"}).timestamp.tzinfo == UTC


def _event_at(when: datetime) -> pb.RecordEventRequest:
    ts = Timestamp()
    ts.FromDatetime(when)
    return pb.RecordEventRequest(user_id="1", item_id=1, event=pb.CLICK, timestamp=ts)


@pytest.mark.parametrize(
    ("offset", "ok"),
    [
        (timedelta(0), True),
        (timedelta(seconds=299), True),
        (timedelta(seconds=301), False),
        (timedelta(days=365 * 74), False),  # the year-2100 event
        (-timedelta(hours=23), True),
        (-timedelta(hours=25), False),
    ],
)
def test_event_timestamps_outside_the_window_are_invalid(offset: timedelta, ok: bool) -> None:
    when = NOW + offset
    body = {"user_id": "1", "item_id": 1, "event": "click", "timestamp": when.isoformat()}
    if ok:
        assert event_from_grpc(_event_at(when), WINDOW, NOW).timestamp == when
        assert event_from_http(body, WINDOW, NOW).timestamp == when
        return
    needle = "in the future" if offset > timedelta(0) else "old"
    with pytest.raises(InvalidRequest, match=needle):
        event_from_grpc(_event_at(when), WINDOW, NOW)
    with pytest.raises(InvalidRequest, match=needle):
        event_from_http(body, WINDOW, NOW)


def test_event_window_comes_from_settings() -> None:
    s = Settings(event_max_future_s=5, event_max_age_s=60)
    w = EventWindow.from_settings(s)
    assert (w.max_future_s, w.max_age_s) == (5, 60)
    with pytest.raises(InvalidRequest, match="RECSTACK_EVENT_MAX_FUTURE_S"):
        event_from_grpc(_event_at(NOW + timedelta(seconds=6)), w, NOW)
    with pytest.raises(InvalidRequest, match="RECSTACK_EVENT_MAX_AGE_S"):
        event_from_grpc(_event_at(NOW - timedelta(seconds=61)), w, NOW)
    assert Settings().event_max_future_s == 300


def test_events_without_timestamp_are_now() -> None:
    e = event_from_grpc(pb.RecordEventRequest(user_id="1", item_id=1, event=pb.VIEW), WINDOW, NOW)
    assert e.timestamp == NOW


# ------------------------------------------------------------------------ string ids


def test_keys_name_users_and_items_like_the_importer() -> None:
    """Keys (UUIDs, SKUs) map by recstack/ids.py, digits stay integers (docs/data.md)."""
    uuid = "550e8400-e29b-41d4-a716-446655440000"
    q = from_grpc(
        _req(user_id=uuid, filters=pb.Filters(exclude_item_ids=[5], exclude_item_keys=["SKU-1"]))
    )
    assert q.user_id == key_hash(uuid)
    assert q.filters.exclude_item_ids == {5, key_hash("SKU-1")}
    h = from_http({"user_id": uuid, "exclude_item_keys": "SKU-1,SKU-2", "exclude_item_ids": "5"})
    assert h.user_id == q.user_id
    assert h.filters.exclude_item_ids == {5, key_hash("SKU-1"), key_hash("SKU-2")}
    e = event_from_grpc(pb.RecordEventRequest(user_id="7", item_key="SKU-1", event=pb.VIEW), WINDOW)
    assert (e.user_id, e.item_id) == (7, key_hash("SKU-1"))
    e = event_from_http({"user_id": uuid, "item_key": "42", "event": "click"}, WINDOW)
    assert (e.user_id, e.item_id) == (key_hash(uuid), 42)


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (
            lambda: from_grpc(_req(filters=pb.Filters(exclude_item_keys=["a b"]))),
            "filters.exclude_item_keys must be",
        ),
        (
            lambda: from_http({"user_id": "1", "exclude_item_keys": "SKU-1,,SKU-2"}),
            "exclude_item_keys is empty",
        ),
        (
            lambda: from_http({"user_id": "1", "exclude_item_keys": "x," * MAX_EXCLUDE_ITEMS}),
            "at most",
        ),
        (
            lambda: from_grpc(
                _req(
                    filters=pb.Filters(
                        exclude_item_ids=[1] * MAX_EXCLUDE_ITEMS, exclude_item_keys=["a"]
                    )
                )
            ),
            "at most",
        ),
        (
            lambda: event_from_grpc(
                pb.RecordEventRequest(user_id="1", item_id=3, item_key="a", event=pb.VIEW), WINDOW
            ),
            "not both",
        ),
        (
            lambda: event_from_http(
                {"user_id": "1", "item_id": 3, "item_key": "a", "event": "view"}, WINDOW
            ),
            "not both",
        ),
        (
            lambda: event_from_http({"user_id": "1", "item_key": 3, "event": "view"}, WINDOW),
            "item_key must be a string",
        ),
        (
            lambda: event_from_http({"user_id": "1", "item_key": "é", "event": "view"}, WINDOW),
            "item_key must be",
        ),
    ],
)
def test_bad_keys_are_refused_naming_the_field(call: Any, needle: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(needle)):
        call()

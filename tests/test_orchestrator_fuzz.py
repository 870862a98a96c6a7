"""Property tests of the request validator, alone and over the wire (hypothesis).

Whatever a client sends, the validator either returns a query or raises InvalidRequest,
and the servers answer only documented codes: gRPC OK or INVALID_ARGUMENT, HTTP 200, 400
or 413 with a JSON body (the fake service behind them never fails, so nothing else is
documented for these inputs). A request is accepted over the wire exactly when the
validator accepts it. Examples are capped so the file runs in well under 30 s."""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from _fronts_fixtures import Fronts, running_fronts
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from orchestrator import recommender_pb2 as pb
from orchestrator import recommender_pb2_grpc as pb_grpc
from orchestrator.request import (
    EVENT_FIELDS,
    HTTP_PARAMS,
    EventWindow,
    InvalidRequest,
    event_from_grpc,
    event_from_http,
    from_grpc,
    from_http,
    parse_json_body,
)
from recstack.ids import KEY_PATTERN
from recstack.settings import Settings

WINDOW = EventWindow.from_settings(Settings())
INT64 = st.integers(-(2**63), 2**63 - 1)
FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Strings a client might send for an id, a count or a time: digits of every kind,
# whitespace, signs, huge numbers, and arbitrary text.
tricky_text = st.one_of(
    st.text(max_size=24),
    st.from_regex(r"[0-9]{1,21}", fullmatch=True),
    st.integers(-(2**70), 2**70).map(str),
    st.sampled_from(
        ["", " 5 ", "²³", "١٢٣", "１２", "+5", "-0", "5.0", "1e3", "0x10", "nan", "inf", "1" * 4300]
    ),
    st.from_regex(
        r"(1[6-9]|2[0-3])[0-9]{2}-[01][0-9]-[0-3][0-9](T[0-9:.]{1,15}(Z|[+-][0-9:]{1,5})?)?",
        fullmatch=True,
    ),
)


def mostly(valid: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``valid`` four times out of five: each request has a few faults, not only faults,
    so the rules behind the first one are exercised too."""
    return st.integers(0, 4).flatmap(lambda i: bad if i == 0 else valid)


ID = st.integers(0, 2**63 - 1)
# Client keys (UUIDs, SKUs; recstack/ids.py): valid ones, and near misses.
KEY = st.from_regex(KEY_PATTERN, fullmatch=True)
user_ids = mostly(ID.map(str) | KEY, tricky_text)
key_lists = mostly(st.lists(KEY, max_size=4), st.lists(tricky_text, max_size=3))
id_lists = mostly(
    st.lists(ID, max_size=8),
    st.one_of(
        st.lists(INT64, max_size=8),
        st.sampled_from([999, 1000, 1001, 10_000, 10_001]).map(lambda n: list(range(n))),
    ),
)
NOW_S = int(time.time())
timestamps = mostly(
    st.none() | st.builds(Timestamp, seconds=st.integers(NOW_S - 3600, NOW_S + 200)),
    st.one_of(
        st.builds(Timestamp, seconds=INT64, nanos=st.integers(-(2**31), 2**31 - 1)),
        st.builds(Timestamp, seconds=st.integers(-9_500_000_000, 9_500_000_000)),
    ),
)


@st.composite
def recommend_requests(draw: st.DrawFn) -> pb.RecommendRequest:
    price_min = draw(mostly(st.floats(0, 1000), st.floats()))
    filters = pb.Filters(
        include_categories=draw(id_lists),
        exclude_categories=draw(st.lists(mostly(st.integers(2**62, 2**63 - 1), INT64), max_size=4)),
        exclude_item_ids=draw(id_lists),
        exclude_item_keys=draw(key_lists),
        price=pb.PriceRange(
            min=price_min,
            max=draw(mostly(st.just(0.0) | st.floats(1000, 2000), st.floats())),
        ),
    )
    return pb.RecommendRequest(
        user_id=draw(user_ids),
        k=draw(mostly(st.integers(1, 200), st.integers(-(2**31), 2**31 - 1))),
        context=pb.Context(
            surface=draw(mostly(st.text(max_size=20), st.text(min_size=120, max_size=140))),
            device=draw(st.text(max_size=8)),
            timestamp=draw(timestamps),
        ),
        filters=filters,
    )


@st.composite
def event_requests(draw: st.DrawFn) -> pb.RecordEventRequest:
    return pb.RecordEventRequest(
        user_id=draw(user_ids),
        item_id=draw(mostly(ID, INT64)),
        item_key=draw(mostly(st.just(""), KEY | tricky_text)),
        event=draw(mostly(st.integers(1, 3), st.integers(-5, 5))),
        timestamp=draw(timestamps),
    )


def _query_value(name: str) -> st.SearchStrategy[str]:
    valid: dict[str, st.SearchStrategy[str]] = {
        "user_id": ID.map(str),
        "k": st.integers(1, 200).map(str),
        "surface": st.text(max_size=20),
        "device": st.text(max_size=8),
        "timestamp": st.datetimes(min_value=datetime(1990, 1, 1)).map(lambda d: d.isoformat()),
        "include_categories": st.lists(ID.map(str), max_size=5).map(",".join),
        "exclude_categories": st.just(""),
        "exclude_item_ids": st.lists(ID.map(str), max_size=5).map(",".join),
        "exclude_item_keys": st.lists(KEY, max_size=5).map(",".join),
        "price_min": st.decimals(0, 100, places=2).map(str),
        "price_max": st.decimals(100, 200, places=2).map(str),
    }
    return mostly(valid[name], tricky_text)


@st.composite
def query_pairs(draw: st.DrawFn) -> list[tuple[str, str]]:
    names = draw(st.lists(st.sampled_from(HTTP_PARAMS[1:]), unique=True, max_size=5))
    pairs = [(n, draw(_query_value(n))) for n in ["user_id", *names]]
    extra = draw(
        mostly(st.just([]), st.lists(st.tuples(st.text(max_size=12), tricky_text), max_size=2))
    )
    pairs += extra
    return draw(st.permutations(pairs))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=20)
    | tricky_text,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
event_bodies = mostly(
    st.fixed_dictionaries(
        {
            "user_id": mostly(ID.map(str), tricky_text | json_values),
            "item_id": mostly(ID, INT64 | json_values),
            "event": mostly(
                st.sampled_from(["view", "CLICK", "Purchase"]),
                st.sampled_from(["like", ""]) | json_values,
            ),
        },
        optional={
            "timestamp": mostly(
                st.datetimes(
                    min_value=datetime.now() - timedelta(hours=2),
                    max_value=datetime.now() + timedelta(hours=2),
                    timezones=st.just(UTC),
                ).map(lambda d: d.isoformat()),
                tricky_text | json_values,
            ),
            "item": json_values,
        },
    ),
    json_values,
)
raw_bodies = mostly(
    event_bodies.map(lambda b: json.dumps(b).encode()),
    st.one_of(
        st.binary(max_size=64),
        st.integers(1, 40_000).map(lambda n: b"[" * n + b"]" * n),
        st.integers(1, 6_000).map(lambda n: b'{"item_id": 1' + b"0" * n + b"}"),
    ),
)


def accepts(validate: Any, *args: Any) -> bool:
    """True when the validator accepts; any exception but InvalidRequest fails the test.
    (``--hypothesis-show-statistics`` shows the share of each.)"""
    try:
        validate(*args)
    except InvalidRequest:
        event("refused")
        return False
    event("accepted")
    return True


# ------------------------------------------------------------------ the validator alone


@FUZZ
@given(recommend_requests())
def test_grpc_recommend_validator_raises_only_invalid_request(req: pb.RecommendRequest) -> None:
    accepts(from_grpc, req)


@FUZZ
@given(event_requests())
def test_grpc_event_validator_raises_only_invalid_request(req: pb.RecordEventRequest) -> None:
    accepts(event_from_grpc, req, WINDOW)


@FUZZ
@given(query_pairs())
def test_http_query_validator_raises_only_invalid_request(pairs: list[tuple[str, str]]) -> None:
    if accepts(from_http, pairs):
        names = [n for n, _ in pairs]
        assert set(names) <= set(HTTP_PARAMS) and len(names) == len(set(names))


@FUZZ
@given(raw_bodies)
def test_http_body_validator_raises_only_invalid_request(raw: bytes) -> None:
    def validate(raw: bytes) -> None:
        event = event_from_http(parse_json_body(raw), WINDOW)
        assert 0 <= event.item_id < 2**63 and 0 <= event.user_id < 2**63

    if accepts(validate, raw):
        assert set(json.loads(raw)) <= set(EVENT_FIELDS)


# ------------------------------------------------------------------ over the wire


@pytest.fixture(scope="module")
def fronts() -> Iterator[Fronts]:
    with running_fronts(Settings()) as f:
        yield f


@pytest.fixture(scope="module")
def stub(fronts: Fronts) -> Iterator[pb_grpc.RecommenderStub]:
    with grpc.insecure_channel(fronts.grpc_target) as channel:
        yield pb_grpc.RecommenderStub(channel)


def grpc_outcome(call: Any, req: Any) -> grpc.StatusCode:
    try:
        call(req, timeout=10)
    except grpc.RpcError as e:
        return e.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@FUZZ
@given(recommend_requests())
def test_grpc_recommend_answers_only_documented_codes(
    stub: pb_grpc.RecommenderStub, req: pb.RecommendRequest
) -> None:
    code = grpc_outcome(stub.Recommend, req)
    assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    assert (code == grpc.StatusCode.OK) == accepts(from_grpc, req)


@FUZZ
@given(event_requests())
def test_grpc_record_event_answers_only_documented_codes(
    stub: pb_grpc.RecommenderStub, req: pb.RecordEventRequest
) -> None:
    code = grpc_outcome(stub.RecordEvent, req)
    assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    assert (code == grpc.StatusCode.OK) == accepts(event_from_grpc, req, WINDOW)


def http_outcome(fronts: Fronts, method: str, path: str, body: bytes | None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", fronts.http_port, timeout=10)
    try:
        conn.request(method, path, body=body)
        r = conn.getresponse()
        raw = r.read()
        assert r.getheader("Content-Type", "").startswith("application/json"), raw[:200]
        answer = json.loads(raw)
        if r.status >= 400:
            assert set(answer["error"]) == {"code", "message"}
        return r.status
    finally:
        conn.close()


@FUZZ
@given(query_pairs())
def test_http_recommend_answers_only_documented_codes(
    fronts: Fronts, pairs: list[tuple[str, str]]
) -> None:
    path = "/v1/recommendations?" + urllib.parse.urlencode(pairs)
    status = http_outcome(fronts, "GET", path, None)
    assert status in {200, 400}
    assert (status == 200) == accepts(from_http, pairs)


@FUZZ
@given(raw_bodies)
def test_http_record_event_answers_only_documented_codes(fronts: Fronts, raw: bytes) -> None:
    status = http_outcome(fronts, "POST", "/v1/events", raw)
    assert status in {200, 400, 413}
    ok = accepts(lambda b: event_from_http(parse_json_body(b), WINDOW), raw)
    assert (status == 200) == ok

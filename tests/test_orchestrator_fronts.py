"""The gRPC and HTTP fronts answer every failure with a documented code and a JSON body
(HTTP), never gRPC UNKNOWN or a plain-text 500: validation, unexpected exceptions, store
failures, unknown items, oversized or slow requests, and the drain's health flip. The real
servers of orchestrator/server.py run in-process in front of a fake service."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from _fronts_fixtures import Fronts, running_fronts
from google.protobuf.timestamp_pb2 import Timestamp

from orchestrator import recommender_pb2 as pb
from orchestrator import recommender_pb2_grpc as pb_grpc
from orchestrator import server as srv
from orchestrator.request import MAX_EVENT_BODY_BYTES
from orchestrator.service import ServiceUnavailable, UnknownItem
from recstack.settings import Settings

SETTINGS = Settings(http_header_timeout_s=0.5, http_body_timeout_s=0.5, event_retry_after_s=3)


@pytest.fixture(scope="module")
def fronts() -> Iterator[Fronts]:
    with running_fronts(SETTINGS) as f:
        yield f


@pytest.fixture
def stub(fronts: Fronts) -> Iterator[pb_grpc.RecommenderStub]:
    fronts.service.fail = None
    with grpc.insecure_channel(fronts.grpc_target) as channel:
        yield pb_grpc.RecommenderStub(channel)
    fronts.service.fail = None


def call_http(
    fronts: Fronts,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body); fails the test when the body is not JSON."""
    conn = http.client.HTTPConnection("127.0.0.1", fronts.http_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        raw = r.read()
        assert r.getheader("Content-Type", "").startswith("application/json"), raw[:200]
        return r.status, dict(r.getheaders()), json.loads(raw)
    finally:
        conn.close()


def event_body(**kw: Any) -> bytes:
    body: dict[str, Any] = {"user_id": "3", "item_id": 7, "event": "click"}
    body.update(kw)
    return json.dumps(body).encode()


def grpc_code(call: Any) -> tuple[grpc.StatusCode, str, dict[str, str]]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    e = err.value
    return e.code(), e.details(), dict(e.trailing_metadata() or ())


# ------------------------------------------------------------------ valid calls


def test_valid_calls_are_answered(fronts: Fronts, stub: pb_grpc.RecommenderStub) -> None:
    reply = stub.Recommend(pb.RecommendRequest(user_id="12", k=3), timeout=5)
    assert [i.item_id for i in reply.items] == [0, 1, 2]
    assert stub.RecordEvent(
        pb.RecordEventRequest(user_id="1", item_id=2, event=pb.VIEW), timeout=5
    ).accepted
    status, _, body = call_http(fronts, "GET", "/v1/recommendations?user_id=12&k=3")
    assert status == 200 and len(body["items"]) == 3
    status, _, body = call_http(fronts, "POST", "/v1/events", event_body())
    assert (status, body) == (200, {"accepted": True})


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"X-Request-Timeout-Ms": "250"}, 0.25),
        ({"x-request-timeout-ms": "30000"}, 30.0),
        ({"X-Request-Timeout-Ms": "900", "X-Envoy-Expected-Rq-Timeout-Ms": "120"}, 0.12),
    ],
)
def test_http_deadline_headers_reach_the_service(
    fronts: Fronts, headers: dict[str, str], expected: float | None
) -> None:
    """HTTP has no deadline of its own: the client's (or Envoy's) header is the call's
    deadline, as gRPC's is; the shortest wins. A RecordEvent's deadline also loses the time
    its body took to arrive."""
    fronts.service.deadlines.clear()
    status, _, _ = call_http(fronts, "GET", "/v1/recommendations?user_id=12&k=3", None, headers)
    assert status == 200
    status, _, _ = call_http(fronts, "POST", "/v1/events", event_body(), headers)
    assert status == 200
    got, event = fronts.service.deadlines
    assert got == expected
    if expected is None:
        assert event is None
    else:
        assert expected - 0.05 < event <= expected


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5", "\u00b2", "3600001", "99999999", ""])
def test_bad_http_deadline_headers_are_400(fronts: Fronts, value: str) -> None:
    for method, path, body in [
        ("GET", "/v1/recommendations?user_id=12&k=3", None),
        ("POST", "/v1/events", event_body()),
    ]:
        status, _, reply = call_http(fronts, method, path, body, {"X-Request-Timeout-Ms": value})
        assert status == 400, reply
        assert "X-Request-Timeout-Ms" in reply["error"]["message"]


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "req",
    [
        pb.RecommendRequest(user_id="²³", k=5),
        pb.RecommendRequest(user_id="1" * 4300, k=5),
        pb.RecommendRequest(
            user_id="1", k=5, context=pb.Context(timestamp=Timestamp(seconds=2**62))
        ),
        pb.RecommendRequest(
            user_id="1", k=5, filters=pb.Filters(exclude_categories=range(MAX_EVENT_BODY_BYTES))
        ),
    ],
)
def test_bad_grpc_requests_are_invalid_argument_not_unknown(
    stub: pb_grpc.RecommenderStub, req: pb.RecommendRequest
) -> None:
    code, details, _ = grpc_code(lambda: stub.Recommend(req, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "Unexpected" not in details and len(details) < 300


@pytest.mark.parametrize("method", ["Recommend", "RecordEvent"])
@pytest.mark.parametrize(
    "raw",
    [b"\xff\xff\xff", b"\x0a\x02\xff\xfe", b"\x12\x01"],  # corrupt; bad UTF-8; truncated
)
def test_undecodable_messages_are_invalid_argument(fronts: Fronts, method: str, raw: bytes) -> None:
    with grpc.insecure_channel(fronts.grpc_target) as channel:
        call = channel.unary_unary(f"/recstack.v1.Recommender/{method}")
        code, details, _ = grpc_code(lambda: call(raw, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert "not a valid message" in details


def test_event_timestamp_out_of_proto_range_is_invalid(stub: pb_grpc.RecommenderStub) -> None:
    req = pb.RecordEventRequest(
        user_id="1", item_id=1, event=pb.VIEW, timestamp=Timestamp(seconds=-(2**40))
    )
    code, details, _ = grpc_code(lambda: stub.RecordEvent(req, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "timestamp" in details


def test_event_in_2100_is_refused_on_both_fronts(
    fronts: Fronts, stub: pb_grpc.RecommenderStub
) -> None:
    ts = Timestamp(seconds=4_102_444_800)  # 2100-01-01
    req = pb.RecordEventRequest(user_id="1", item_id=1, event=pb.CLICK, timestamp=ts)
    code, details, _ = grpc_code(lambda: stub.RecordEvent(req, timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "future" in details
    status, _, body = call_http(
        fronts, "POST", "/v1/events", event_body(timestamp="2100-01-01T00:00:00Z")
    )
    assert status == 400 and "future" in body["error"]["message"]
    assert not fronts.service.queries or all(
        getattr(q, "timestamp", None) is None or q.timestamp.year < 2100
        for q in fronts.service.queries
    )


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ("user_id=1&include_category=3", "unknown query parameter 'include_category'"),
        ("user_id=1&k=%205%20", "k must be an integer"),
        ("user_id=%D9%A1%D9%A2", "user_id must be"),  # Arabic-Indic digits
        ("user_id=1&k=5&k=6", "more than once"),
        ("user_id=1&exclude_item_ids=" + "%2C".join(["9"] * 10_001), "exclude_item_ids"),
        ("user_id=1&exclude_item_ids=100000000000000000000000000000", "exclude_item_ids"),
        ("user_id=1&timestamp=0001-01-01T00:00:00%2B01:00", "timestamp"),
        ("user_id=1&price_min=nan", "price_min"),
    ],
)
def test_bad_http_queries_are_400_json(fronts: Fronts, query: str, needle: str) -> None:
    status, _, body = call_http(fronts, "GET", "/v1/recommendations?" + query)
    assert status == 400, body
    assert body["error"]["code"] == "INVALID_ARGUMENT"
    assert needle in body["error"]["message"]


@pytest.mark.parametrize(
    ("raw", "status", "needle"),
    [
        (b"[" * 10_000 + b"]" * 10_000, 400, "nested too deeply"),
        (b'{"user_id": "3", "item_id": 1e400, "event": "view"}', 400, "item_id"),
        (b'{"user_id": "3", "item_id": ' + b"1" * 5000 + b', "event": "view"}', 400, "item_id"),
        (
            b'{"user_id": "3", "item_id": 10000000000000000000000000000000, "event": "view"}',
            400,
            "item_id",
        ),
        (b'{"user_id": "3", "item_id": 7.9, "event": "view"}', 400, "item_id"),
        (b'{"user_id": "3", "item_id": true, "event": "view"}', 400, "item_id"),
        (b'{"user_id": "3", "item_id": "7", "event": "view"}', 400, "item_id"),
        (b'{"user_id": "3", "itemid": 7, "event": "view"}', 400, "unknown field 'itemid'"),
        (b"\xff\xfe\x00", 400, "UTF-8"),
        (b"not json", 400, "JSON"),
        (b" " * (MAX_EVENT_BODY_BYTES + 1), 413, "larger than"),
    ],
)
def test_bad_event_bodies_are_4xx_json(
    fronts: Fronts, raw: bytes, status: int, needle: str
) -> None:
    got, _, body = call_http(fronts, "POST", "/v1/events", raw)
    assert got == status, body
    assert needle in body["error"]["message"]


def test_documented_list_limits_fit_the_http_request_line(fronts: Fronts) -> None:
    ids = "%2C".join([str(2**63 - 1)] * 10_000)
    cats = "%2C".join(str(2**62 + i) for i in range(1_000))
    status, _, body = call_http(
        fronts,
        "GET",
        f"/v1/recommendations?user_id=1&exclude_item_ids={ids}&include_categories={cats}",
    )
    assert status == 200, body


def test_request_line_over_the_limit_is_refused(fronts: Fronts) -> None:
    path = "/v1/recommendations?user_id=1&exclude_item_ids=" + "1" * (srv.HTTP_MAX_LINE + 10)
    with socket.create_connection(("127.0.0.1", fronts.http_port), timeout=5) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        reply = s.recv(65536)
    assert reply.split(b"\r\n")[0].endswith(b" 400 Bad Request"), reply[:100]


def test_body_declared_too_large_is_refused_before_reading(fronts: Fronts) -> None:
    with socket.create_connection(("127.0.0.1", fronts.http_port), timeout=5) as s:
        s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        reply = s.recv(65536)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    assert b"application/json" in reply


def test_oversized_grpc_message_is_resource_exhausted(stub: pb_grpc.RecommenderStub) -> None:
    big = pb.RecommendRequest(
        user_id="1", k=5, filters=pb.Filters(exclude_item_ids=[2**40] * 200_000)
    )
    assert big.ByteSize() > SETTINGS.request_max_bytes
    code, _, _ = grpc_code(lambda: stub.Recommend(big, timeout=5))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


# ------------------------------------------------------------------ failures of the service


def test_unexpected_errors_are_internal_with_one_log_line(
    fronts: Fronts, stub: pb_grpc.RecommenderStub, caplog: pytest.LogCaptureFixture
) -> None:
    fronts.service.fail = RuntimeError("secret detail /etc/passwd")
    with caplog.at_level(logging.INFO, logger="orchestrator.server"):
        code, details, _ = grpc_code(
            lambda: stub.Recommend(pb.RecommendRequest(user_id="1", k=5), timeout=5)
        )
        status, _, body = call_http(fronts, "GET", "/v1/recommendations?user_id=1&k=5")
    assert code == grpc.StatusCode.INTERNAL and details == "internal error"
    assert status == 500 and body == {"error": {"code": "INTERNAL", "message": "internal error"}}
    records = [r for r in caplog.records if r.name == "orchestrator.server"]
    assert len(records) == 2, [r.getMessage() for r in records]  # one per failed call
    assert all(not r.exc_info and "\n" not in r.getMessage() for r in records)
    assert "RuntimeError" in records[0].getMessage()


def test_a_validator_bug_is_internal_not_unknown(
    fronts: Fronts, stub: pb_grpc.RecommenderStub, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*_: Any) -> Any:
        raise ValueError("bug")

    monkeypatch.setattr(srv, "from_grpc", broken)
    monkeypatch.setattr(srv, "from_http", broken)
    code, details, _ = grpc_code(
        lambda: stub.Recommend(pb.RecommendRequest(user_id="1", k=5), timeout=5)
    )
    assert (code, details) == (grpc.StatusCode.INTERNAL, "internal error")
    status, _, body = call_http(fronts, "GET", "/v1/recommendations?user_id=1&k=5")
    assert status == 500 and body["error"]["code"] == "INTERNAL"


def test_store_unavailable_is_503_with_retry_after(
    fronts: Fronts, stub: pb_grpc.RecommenderStub
) -> None:
    fronts.service.fail = ServiceUnavailable("the feature store did not take the event")
    req = pb.RecordEventRequest(user_id="1", item_id=2, event=pb.CLICK)
    code, details, trailers = grpc_code(lambda: stub.RecordEvent(req, timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE and "feature store" in details
    assert trailers.get("retry-after") == "3"
    status, headers, body = call_http(fronts, "POST", "/v1/events", event_body())
    assert status == 503 and headers.get("Retry-After") == "3"
    assert body["error"]["code"] == "UNAVAILABLE"


def test_unknown_item_is_not_found(fronts: Fronts, stub: pb_grpc.RecommenderStub) -> None:
    fronts.service.fail = UnknownItem("item_id 999 is not in the serving catalog")
    req = pb.RecordEventRequest(user_id="1", item_id=999, event=pb.CLICK)
    code, details, _ = grpc_code(lambda: stub.RecordEvent(req, timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "999" in details
    status, _, body = call_http(fronts, "POST", "/v1/events", event_body(item_id=999))
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"


def test_unknown_routes_and_methods_are_json(fronts: Fronts) -> None:
    assert call_http(fronts, "GET", "/v1/nothing")[0] == 404
    assert call_http(fronts, "DELETE", "/v1/events")[0] == 405


# ------------------------------------------------------------------ health and connections


def test_health_flips_to_not_serving_when_the_drain_starts(fronts: Fronts) -> None:
    status, _, body = call_http(fronts, "GET", "/healthz")
    assert (status, body["status"]) == (200, "SERVING")
    fronts.drain.started = True
    try:
        status, _, body = call_http(fronts, "GET", "/healthz")
        assert (status, body["status"]) == (503, "NOT_SERVING")
    finally:
        fronts.drain.started = False


def _drain_under(calls_for: float, every: float, call_s: float) -> float:
    """Seconds ``srv._drain(DRAIN_SECONDS)`` took while calls of ``call_s`` each began every
    ``every`` seconds for ``calls_for`` seconds, through the fronts' own call accounting."""

    async def call() -> None:
        async with srv._observed("Recommend"):
            await asyncio.sleep(call_s)

    async def main() -> float:
        until = time.perf_counter() + calls_for
        calls = []
        t0 = time.perf_counter()
        drain = asyncio.create_task(srv._drain(srv.DRAIN_SECONDS))
        drain.add_done_callback(lambda _: ended.append(time.perf_counter()))
        while time.perf_counter() < until:
            calls.append(asyncio.create_task(call()))
            await asyncio.sleep(every)
        await drain
        await asyncio.gather(*calls)
        return ended[0] - t0

    ended: list[float] = []

    return asyncio.run(main())


def test_the_drain_lasts_while_calls_keep_arriving_and_ends_once_idle() -> None:
    """Calls of 2 ms every 50 ms (a replica's share behind nginx) keep the drain going: it
    ends DRAIN_IDLE_SECONDS after the last one, not at the first poll that finds none in
    flight (a poll every 20 ms misses ~96 % of such calls, which ended the drain early)."""
    idle, limit = srv.DRAIN_IDLE_SECONDS, srv.DRAIN_SECONDS
    took = _drain_under(calls_for=1.0, every=0.05, call_s=0.002)
    assert 1.0 + idle - 0.06 <= took < 1.0 + idle + 0.3, took
    took = _drain_under(calls_for=0.0, every=0.05, call_s=0.002)  # no call at all
    assert idle <= took < idle + 0.3, took
    took = _drain_under(calls_for=limit + 0.5, every=0.05, call_s=0.002)  # never idle
    assert limit <= took < limit + 0.3, took


def test_health_stays_serving_with_an_open_breaker_and_names_it(
    fronts: Fronts, tmp_path: object
) -> None:
    """A dependency whose breaker is open degrades answers, it does not stop them: both
    health endpoints stay SERVING, and /healthz says which breaker is open."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from orchestrator.breaker import OPEN

    breaker = fronts.service.breakers.get("triton:rank:1")
    for _ in range(breaker.cfg.failures):
        with contextlib.suppress(ConnectionError), breaker.call(lambda e: True):
            raise ConnectionError("down")
    status, _, body = call_http(fronts, "GET", "/healthz")
    assert (status, body["status"]) == (200, "SERVING")
    assert body["dependencies"]["triton:rank:1"]["state"] == OPEN
    assert body["dependencies"]["triton:rank:1"]["consecutive_failures"] == breaker.cfg.failures
    with grpc.insecure_channel(fronts.grpc_target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_connection_without_complete_headers_is_closed(fronts: Fronts) -> None:
    with socket.create_connection(("127.0.0.1", fronts.http_port), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes the headers
        t0 = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server
        waited = time.monotonic() - t0
    assert waited < 5 * SETTINGS.http_header_timeout_s + 1


def test_slow_body_is_cut_off_with_408(fronts: Fronts) -> None:
    with socket.create_connection(("127.0.0.1", fronts.http_port), timeout=10) as s:
        s.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        t0 = time.monotonic()
        reply = s.recv(65536)
        waited = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408"), reply[:100]
    assert b'"DEADLINE_EXCEEDED"' in reply
    assert waited < 5 * SETTINGS.http_body_timeout_s + 1

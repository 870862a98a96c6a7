"""End to end: the real offline pipeline (small preset), a real tritonserver, Feast with
SQLite, FAISS, and the orchestrator as its own process — called over gRPC and HTTP."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from exporters import release
from orchestrator import recommender_pb2 as pb
from orchestrator import recommender_pb2_grpc as pb_grpc
from orchestrator.orchestrator_process import start_orchestrator
from orchestrator.processes import ManagedProcess
from orchestrator.triton_server import start_triton
from recstack.settings import Settings

pytestmark = pytest.mark.integration

COLD_USER = "987654321"


@pytest.fixture(scope="module")
def stack(trained_settings: Settings) -> Iterator[dict[str, Any]]:
    s = trained_settings
    triton = start_triton(s, release.model_versions(s))
    procs: dict[str, ManagedProcess] = {"triton": triton}
    try:
        procs["orchestrator"] = start_orchestrator(s)
        channel = grpc.insecure_channel(f"127.0.0.1:{s.orchestrator_grpc_port}")
        yield {
            "settings": s,
            "procs": procs,
            "stub": pb_grpc.RecommenderStub(channel),
            "channel": channel,
        }
        channel.close()
    finally:
        for p in procs.values():
            p.stop()


@pytest.fixture(scope="module")
def tables(trained_settings: Settings) -> dict[str, pd.DataFrame]:
    raw = trained_settings.raw_dir
    return {
        "items": pd.read_parquet(raw / "items.parquet").set_index("item_id"),
        "interactions": pd.read_parquet(raw / "interactions.parquet"),
    }


def _end_of_data(tables: dict[str, pd.DataFrame]) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(tables["interactions"]["timestamp"].max().to_pydatetime())
    return ts


def _active_user(tables: dict[str, pd.DataFrame]) -> str:
    inter = tables["interactions"]
    pos = inter[inter["event"].isin(["click", "purchase"])]
    return str(int(pos["user_id"].value_counts().index[0]))


def _recommend(
    stack: dict[str, Any],
    tables: dict[str, pd.DataFrame],
    user: str,
    k: int = 10,
    timeout: float = 2.0,
    **kw: Any,
) -> pb.RecommendResponse:
    req = pb.RecommendRequest(
        user_id=user,
        k=k,
        context=pb.Context(surface="home", timestamp=_end_of_data(tables)),
        **kw,
    )
    reply: pb.RecommendResponse = stack["stub"].Recommend(req, timeout=timeout)
    return reply


def _http(
    stack: dict[str, Any], path: str, body: dict[str, Any] | None = None
) -> tuple[int, dict[str, Any]]:
    port = stack["settings"].orchestrator_http_port
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method="POST" if body is not None else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_recommend_known_user_over_grpc(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    user = _active_user(tables)
    reply = _recommend(stack, tables, user, k=10)
    ids = [i.item_id for i in reply.items]
    assert len(ids) == 10 and len(set(ids)) == 10
    assert [i.rank for i in reply.items] == list(range(1, 11))
    assert not reply.cold_start
    assert list(reply.degraded) == []
    assert reply.release == str(release.load_manifest(stack["settings"])["release_id"])
    stages = {t.stage for t in reply.timings}
    assert {"user_features", "user_tower", "retrieval", "ranking", "postprocess"} <= stages
    assert all(i.reason for i in reply.items)
    assert set(ids) <= set(tables["items"].index)
    scores = [i.score for i in reply.items]
    assert scores == sorted(scores, reverse=True)


def test_http_front_mirrors_grpc(stack: dict[str, Any], tables: dict[str, pd.DataFrame]) -> None:
    user = _active_user(tables)
    when = urllib.parse.quote(tables["interactions"]["timestamp"].max().isoformat())
    status, body = _http(stack, f"/v1/recommendations?user_id={user}&k=5&timestamp={when}")
    assert status == 200, body
    grpc_ids = [i.item_id for i in _recommend(stack, tables, user, k=5).items]
    assert [i["item_id"] for i in body["items"]] == grpc_ids
    status, body = _http(stack, "/v1/recommendations?user_id=&k=5")
    assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT"
    assert "user_id" in body["error"]["message"]
    status, body = _http(stack, "/v1/recommendations?user_id=1&k=0")
    assert status == 400 and "k must be" in body["error"]["message"]
    status, body = _http(stack, "/v1/nothing-here")
    assert status == 404 and "error" in body


def test_filters_and_category_cap(stack: dict[str, Any], tables: dict[str, pd.DataFrame]) -> None:
    items = tables["items"]
    user = _active_user(tables)
    cats = items["category"].value_counts().index[:4].tolist()
    lo, hi = float(items["price"].quantile(0.1)), float(items["price"].quantile(0.9))
    first = _recommend(stack, tables, user, k=10).items[0].item_id
    reply = _recommend(
        stack,
        tables,
        user,
        k=8,
        filters=pb.Filters(
            include_categories=cats, exclude_item_ids=[first], price=pb.PriceRange(min=lo, max=hi)
        ),
    )
    got = [i.item_id for i in reply.items]
    assert got, "filters left nothing"
    assert first not in got
    assert set(items.loc[got, "category"]) <= set(cats)
    assert items.loc[got, "price"].between(lo, hi).all()
    reply = _recommend(stack, tables, user, k=30)
    counts = items.loc[[i.item_id for i in reply.items], "category"].value_counts()
    assert counts.max() <= 3  # PostprocessConfig.max_per_category


def test_cold_start_user_gets_popular_and_fresh(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    reply = _recommend(stack, tables, COLD_USER, k=10)
    assert reply.cold_start
    assert len(reply.items) == 10
    assert {i.source for i in reply.items} <= {"popular", "fresh"}


def test_record_event_removes_bought_item(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    user = _active_user(tables)
    top = _recommend(stack, tables, user, k=10).items[0].item_id
    stack["stub"].RecordEvent(
        pb.RecordEventRequest(user_id=user, item_id=top, event=pb.PURCHASE), timeout=2
    )
    after = [i.item_id for i in _recommend(stack, tables, user, k=10).items]
    assert top not in after
    status, body = _http(stack, "/v1/events", {"user_id": user, "item_id": 3, "event": "click"})
    assert status == 200 and body == {"accepted": True}


def test_no_seen_item_is_ever_served(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    """Every item a user clicked or bought is filtered, not only the 20 most recent:
    the heaviest users, asked for the longest list the API allows."""
    inter = tables["interactions"]
    pos = inter[inter["event"].isin(["click", "purchase"])]
    heavy = pos.groupby("user_id")["item_id"].nunique().sort_values(ascending=False)
    assert heavy.iloc[0] > 40  # more than the 20 recent items the tower sees
    for user in heavy.index[:5]:
        seen = set(pos.loc[pos["user_id"] == user, "item_id"].tolist())
        reply = _recommend(stack, tables, str(int(user)), k=200)
        served = {i.item_id for i in reply.items}
        assert len(served) > 50 and list(reply.degraded) == []
        assert not served & seen, (user, sorted(served & seen)[:10])


def test_candidates_come_from_several_sources(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    inter = tables["interactions"]
    users = inter.loc[inter["event"] == "purchase", "user_id"].value_counts().index[:20]
    sources: set[str] = set()
    for user in users:
        sources |= {i.source for i in _recommend(stack, tables, str(int(user)), k=50).items}
    assert {"retrieval", "item_to_item"} <= sources, sources


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"user_id": "1", "k": 0}, "k must be in 1..200"),
        ({"user_id": "1", "k": 1_000_000}, "k must be in 1..200"),
        ({"user_id": "", "k": 5}, "user_id is empty"),
        (
            {"user_id": "1", "k": 5, "filters": pb.Filters(price=pb.PriceRange(min=5, max=1))},
            "price",
        ),
        (
            {
                "user_id": "1",
                "k": 5,
                "filters": pb.Filters(include_categories=[2], exclude_categories=[2]),
            },
            "both",
        ),
    ],
)
def test_invalid_arguments(stack: dict[str, Any], kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stack["stub"].Recommend(pb.RecommendRequest(**kw), timeout=2)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()


def test_health_reflection_and_metrics(stack: dict[str, Any]) -> None:
    health = health_pb2_grpc.HealthStub(stack["channel"])
    status = health.Check(
        health_pb2.HealthCheckRequest(service="recstack.v1.Recommender"), timeout=2
    ).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(stack["channel"])
    replies = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=2
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert "recstack.v1.Recommender" in names and "grpc.health.v1.Health" in names
    port = stack["settings"].orchestrator_metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'recstack_stage_seconds_bucket{le="0.001",stage="retrieval"}' in text
    assert 'recstack_requests_total{code="INVALID_ARGUMENT",method="Recommend"}' in text
    assert "recstack_release_info{release=" in text


def test_triton_down_degrades_within_deadline_then_recovers(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    """Runs last in this module: it stops and restarts Triton."""
    s = stack["settings"]
    user = _active_user(tables)
    stack["procs"]["triton"].stop()
    latencies = []
    for _ in range(5):
        t0 = time.perf_counter()
        reply = _recommend(stack, tables, user, k=10, timeout=0.5)
        latencies.append(time.perf_counter() - t0)
        assert reply.degraded, "Triton is down but the answer claims full service"
        assert len(reply.items) == 10
    assert max(latencies) < 0.5
    stack["procs"]["triton"] = start_triton(s, release.model_versions(s))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        reply = _recommend(stack, tables, user, k=10)
        if not reply.degraded:
            break
        time.sleep(0.5)
    assert list(reply.degraded) == [], "no full answer 30 s after Triton came back"
    assert np.isfinite([i.score for i in reply.items]).all()


def test_sigterm_drains_in_flight_requests(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    """Runs after everything else here: it stops the orchestrator."""
    proc = stack["procs"]["orchestrator"]
    user = _active_user(tables)
    req = pb.RecommendRequest(user_id=user, k=50, context=pb.Context(surface="home"))
    futures = [stack["stub"].Recommend.future(req, timeout=10) for _ in range(40)]
    futures[0].result()
    os.kill(proc.pid, signal.SIGTERM)
    codes = []
    for f in futures:
        try:
            f.result()
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as e:
            codes.append(e.code())
    # Accepted calls finish; calls that arrive after the drain began are refused cleanly.
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    assert codes.count(grpc.StatusCode.OK) > 1
    assert proc.popen is not None
    assert proc.popen.wait(timeout=15) == 0

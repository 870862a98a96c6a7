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
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from exporters import release
from exporters.candidates import SOURCES, SourceModel
from exporters.raw_tables import read_table
from orchestrator import recommender_pb2 as pb
from orchestrator import recommender_pb2_grpc as pb_grpc
from orchestrator.orchestrator_process import start_orchestrator
from orchestrator.processes import ManagedProcess, stop_all
from orchestrator.triton_server import start_triton
from recstack.settings import Settings

pytestmark = pytest.mark.integration

COLD_USER = "987654321"


@pytest.fixture(scope="module")
def stack(trained_settings: Settings) -> Iterator[dict[str, Any]]:
    s = trained_settings
    triton = start_triton(s)
    procs: dict[str, ManagedProcess] = {"triton": triton}
    try:
        # The item snapshot's refresh checks the registry every second here (60 s by
        # default), so it runs beside the requests of every test in this module.
        procs["orchestrator"] = start_orchestrator(s.model_copy(update={"feature_refresh_s": 1.0}))
        channel = grpc.insecure_channel(f"127.0.0.1:{s.orchestrator_grpc_port}")
        yield {
            "settings": s,
            "procs": procs,
            "stub": pb_grpc.RecommenderStub(channel),
            "channel": channel,
        }
        channel.close()
    finally:
        stop_all(procs.values())


@pytest.fixture(scope="module")
def tables(trained_settings: Settings) -> dict[str, pd.DataFrame]:
    raw = trained_settings.raw_dir
    return {
        "items": pd.read_parquet(raw / "items.parquet").set_index("item_id"),
        "interactions": read_table(raw, "interactions"),
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
    surface: str = "home",
    **kw: Any,
) -> pb.RecommendResponse:
    req = pb.RecommendRequest(
        user_id=user,
        k=k,
        context=pb.Context(surface=surface, timestamp=_end_of_data(tables)),
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
    # Integer-id data: items are named by their digits (docs/data.md "Ids").
    assert [i.item_key for i in reply.items] == [str(i) for i in ids]
    scores = [i.score for i in reply.items]
    assert scores == sorted(scores, reverse=True)
    # Ranked, and each item says which candidate sources found it (issue 15).
    assert all(i.ranked for i in reply.items)
    for i in reply.items:
        assert i.sources and set(i.sources) <= set(SOURCES), i
        assert list(i.sources) == [s for s in SOURCES if s in i.sources]  # merge order
        assert ("retrieval" in i.sources) == (i.source == "retrieval"), i


def test_http_front_mirrors_grpc(stack: dict[str, Any], tables: dict[str, pd.DataFrame]) -> None:
    user = _active_user(tables)
    when = urllib.parse.quote(tables["interactions"]["timestamp"].max().isoformat())
    status, body = _http(stack, f"/v1/recommendations?user_id={user}&k=5&timestamp={when}")
    assert status == 200, body
    grpc_items = _recommend(stack, tables, user, k=5).items
    assert [i["item_id"] for i in body["items"]] == [i.item_id for i in grpc_items]
    assert [(i["sources"], i["ranked"]) for i in body["items"]] == [
        (list(i.sources), i.ranked) for i in grpc_items
    ]
    assert all(i["ranked"] for i in body["items"])
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
    assert list(reply.degraded) == []
    # The release's diversity floor (PostprocessConfig.min_categories = 3), for the most
    # active users, whose own taste is narrowest.
    inter = tables["interactions"]
    for u in inter["user_id"].value_counts().index[:10]:
        reply = _recommend(stack, tables, str(int(u)), k=10)
        assert list(reply.degraded) == []
        assert items.loc[[i.item_id for i in reply.items], "category"].nunique() >= 3


def test_cold_start_user_gets_popular_and_fresh(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    reply = _recommend(stack, tables, COLD_USER, k=10)
    assert reply.cold_start
    assert len(reply.items) == 10
    assert {i.source for i in reply.items} <= {"popular", "fresh"}
    # A fallback list: not ranked; its one source is the list's.
    assert all(not i.ranked and list(i.sources) == [i.source] for i in reply.items)


def _segment_top(
    s: Settings, tables: dict[str, pd.DataFrame], column: str, value: object, n: int
) -> set[int]:
    """The items most consumed (distinct users, seen events) by users with ``column ==
    value`` (a users-table attribute), or in events with ``column == value`` (a context
    column of the interactions), counted here from the raw tables: every item tied with
    the n-th too."""
    from exporters.raw_tables import read_meta
    from exporters.seen import seen_events

    inter = tables["interactions"]
    if column in inter.columns:
        mine = inter[inter[column].astype(str) == value]
    else:
        users = pd.read_parquet(s.raw_dir / "users.parquet")
        mine = inter[inter["user_id"].isin(users.loc[users[column] == value, "user_id"])]
    mine = mine[mine["event"].isin(seen_events(read_meta(s)))]
    counts = mine.drop_duplicates(["user_id", "item_id"])["item_id"].value_counts()
    return set(counts[counts >= counts.iloc[n - 1]].index.astype(int))


def test_cold_start_serves_the_users_segment_else_global(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    """A user with a profile (country, age bucket) and no events yet gets the popular list
    of their country; a user the store does not know gets the global list."""
    s = stack["settings"]
    users = pd.read_parquet(s.raw_dir / "users.parquet")
    active = set(tables["interactions"]["user_id"].unique())
    newcomers = users[~users["user_id"].isin(active)]
    assert len(newcomers), "the small preset has users who signed up without events"
    info = release.load_manifest(s)["candidates"]["segments"]  # the model's, in the manifest
    assert info["attributes"] == ["country", "age_bucket"] and info["thin"] > 0
    manifest = release.load_manifest(s)
    folder = release.release_dir(s, int(manifest["release_id"]))
    kept = set(SourceModel.load(folder / manifest["candidates"]["file"]).segment_names)
    # The newcomer of the biggest country with a list of its own (the joint segment with
    # the age bucket may be thin: then the country's list is the most specific one).
    newcomers = newcomers.assign(n=newcomers["country"].map(users["country"].value_counts()))
    for _, row in newcomers.sort_values("n", ascending=False).iterrows():
        joint = f"country={row['country']},age_bucket={row['age_bucket']}"
        if f"country={row['country']}" in kept and joint not in kept:
            user = row
            break
    else:
        pytest.fail("no newcomer whose country has a list and whose joint segment is thin")
    name = f"country={user['country']}"
    reply = _recommend(stack, tables, str(int(user["user_id"])), k=10)
    assert reply.cold_start and list(reply.degraded) == []
    assert reply.fallback_segment == name
    popular = [i for i in reply.items if i.source == "popular"]
    assert popular and all(i.reason == f"popular in your country ({name})" for i in popular)
    top = _segment_top(s, tables, "country", int(user["country"]), 35)
    assert {i.item_id for i in popular} <= top
    # An unknown user without a context: no attributes, the global list, and no segment
    # in the reasons.
    cold = _recommend(stack, tables, COLD_USER, k=10, surface="")
    assert cold.cold_start and cold.fallback_segment == "global"
    assert not any("your" in i.reason or "popular on" in i.reason for i in cold.items)
    cold_popular = {i.item_id for i in cold.items if i.source == "popular"}
    assert cold_popular != {i.item_id for i in popular}
    # The same unknown user on the cart page: what users consumed there (the small
    # preset's cart favours a third of the categories).
    assert "surface=cart" in kept and info["context"]["columns"] == ["surface", "device"]
    on_cart = _recommend(stack, tables, COLD_USER, k=10, surface="cart")
    assert on_cart.cold_start and on_cart.fallback_segment == "surface=cart"
    cart = [i for i in on_cart.items if i.source == "popular"]
    assert cart and all(i.reason == "popular on cart (surface=cart)" for i in cart)
    assert {i.item_id for i in cart} <= _segment_top(s, tables, "surface", "cart", 35)
    assert {i.item_id for i in cart} != cold_popular
    # A value the data never had, or one that is not segment-shaped: the global list.
    for other in ("checkout-v2", "a page/with spaces"):
        assert _recommend(stack, tables, COLD_USER, surface=other).fallback_segment == "global"
    # The HTTP front says the same.
    uid = int(user["user_id"])
    status, body = _http(stack, f"/v1/recommendations?user_id={uid}&k=10")
    assert status == 200 and body["cold_start"] and body["fallback_segment"] == name


def _metric(stack: dict[str, Any], name: str, **labels: str) -> float:
    """One sample of the orchestrator's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    port = stack["settings"].orchestrator_metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def _cache(stack: dict[str, Any]) -> tuple[float, float]:
    """(hits, misses) of the orchestrator's user-embedding cache so far."""
    name = "recstack_user_embedding_cache_total"
    return _metric(stack, name, result="hit"), _metric(stack, name, result="miss")


def test_record_event_removes_bought_item(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    """The bought item leaves the list, and not only through the seen filter: the user
    tower's inputs (recent items) now hold it, so the embedding is computed anew — a
    cache keyed on anything staler (the user id, the old inputs) would serve the old
    embedding and fail the cache check below."""
    from exporters import feast_ops
    from orchestrator.online_features import RECENT_ITEMS, RECENT_VIEW, USER_KEY

    user = _active_user(tables)
    top = _recommend(stack, tables, user, k=10).items[0].item_id
    hits, misses = _cache(stack)
    _recommend(stack, tables, user, k=10)  # same inputs: the cached embedding
    assert _cache(stack) == (hits + 1, misses)
    stack["stub"].RecordEvent(
        pb.RecordEventRequest(user_id=user, item_id=top, event=pb.PURCHASE), timeout=2
    )
    store = feast_ops.feature_store(stack["settings"])
    recent = store.get_online_features(
        features=[f"{RECENT_VIEW}:{RECENT_ITEMS}"], entity_rows=[{USER_KEY: int(user)}]
    ).to_dict()[RECENT_ITEMS][0]
    assert recent[0] == top  # the tower's input changed ...
    reply = _recommend(stack, tables, user, k=10)
    assert _cache(stack) == (hits + 1, misses + 1)  # ... so the tower ran on the new one
    after = [i.item_id for i in reply.items]
    assert top not in after and list(reply.degraded) == []
    status, body = _http(stack, "/v1/events", {"user_id": user, "item_id": 3, "event": "click"})
    assert status == 200 and body == {"accepted": True}


def test_events_for_items_outside_the_catalog_are_not_found(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    user = _active_user(tables)
    missing = int(tables["items"].index.max()) + 1_000
    with pytest.raises(grpc.RpcError) as err:
        stack["stub"].RecordEvent(
            pb.RecordEventRequest(user_id=user, item_id=missing, event=pb.PURCHASE), timeout=2
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    status, body = _http(
        stack, "/v1/events", {"user_id": user, "item_id": missing, "event": "click"}
    )
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"
    reply = _recommend(stack, tables, user, k=10)  # the user's history did not take it
    assert all(str(missing) not in i.reason for i in reply.items)


def test_malformed_input_over_http_is_400_json(stack: dict[str, Any]) -> None:
    for path in (
        "/v1/recommendations?user_id=1&include_category=3",
        "/v1/recommendations?user_id=%C2%B2%C2%B3&k=5",
        "/v1/recommendations?user_id=1&k=%205%20",
    ):
        status, body = _http(stack, path)
        assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT", (path, body)
    status, body = _http(stack, "/v1/events", {"user_id": "1", "item_id": 7.9, "event": "view"})
    assert status == 400 and "item_id" in body["error"]["message"]


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
    found_by: set[str] = set()
    most = 0
    for user in users:
        items = _recommend(stack, tables, str(int(user)), k=50).items
        sources |= {i.source for i in items}
        found_by |= {s for i in items for s in i.sources}
        most = max([most, *(len(i.sources) for i in items)])
    assert {"retrieval", "item_to_item"} <= sources, sources
    assert {"retrieval", "item_to_item", "popular"} <= found_by, found_by
    assert most >= 2  # an item proposed by several sources says so


def test_start_up_log_has_no_misleading_noise(stack: dict[str, Any]) -> None:
    """The orchestrator's log (its start-up imports FAISS and reads the Feast registry,
    then refreshes the item snapshot every second here) holds none of the lines users
    read as failures (issue 15), yet still its own INFO records."""
    from orchestrator.processes import log_path

    _recommend_any = stack["stub"].Recommend(pb.RecommendRequest(user_id="1", k=1), timeout=5)
    assert _recommend_any.release
    time.sleep(2.5)  # two refreshes of the snapshot
    text = log_path(stack["settings"], "orchestrator").read_text()
    assert " INFO orchestrator." in text
    for noise in ("swigfaiss", "faiss.loader", "Registry cache expired"):
        assert noise not in text, noise


def test_the_serving_process_does_not_load_torch(stack: dict[str, Any]) -> None:
    """Feast imports torch eagerly (~2 s and ~180 MB per process); the orchestrator runs
    no torch model, so its entry point imports Feast without it (recstack/lean_imports.py)."""
    pid = stack["procs"]["orchestrator"].pid
    maps = Path(f"/proc/{pid}/maps").read_text()
    assert "libtorch" not in maps
    assert "faiss" in maps  # the check reads the serving process's own libraries


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
    served = release.load_manifest(stack["settings"])["release_id"]
    assert (
        f'recstack_stage_seconds_bucket{{le="0.001",release="{served}",stage="retrieval"}}' in text
    )
    assert 'recstack_requests_total{code="INVALID_ARGUMENT",method="Recommend"}' in text
    assert "recstack_release_info{release=" in text
    age = _metric(stack, "recstack_item_snapshot_age_seconds")
    assert 0 < age < 3600, age
    assert _metric(stack, "recstack_item_snapshot_materialized_timestamp_seconds") > 0
    # The refresh loop runs (nothing was materialised meanwhile: nothing reloaded).
    name = "recstack_item_snapshot_refreshes_total"
    until = time.monotonic() + 10
    while _metric(stack, name, result="unchanged") < 2 and time.monotonic() < until:
        time.sleep(0.2)
    assert _metric(stack, name, result="unchanged") >= 2
    assert _metric(stack, name, result="reloaded") == 0
    assert _metric(stack, "recstack_item_snapshot_refreshes_total", result="failed") == 0


def _fresh_user(tables: dict[str, pd.DataFrame]) -> str:
    """A user with history whom no other test here asks for (nothing cached for them)."""
    inter = tables["interactions"]
    pos = inter[inter["event"].isin(["click", "purchase"])]
    return str(int(pos["user_id"].value_counts().index[100]))


def test_triton_down_degrades_within_deadline_then_recovers(
    stack: dict[str, Any], tables: dict[str, pd.DataFrame]
) -> None:
    """Runs last in this module: it stops and restarts Triton.

    With Triton gone, the user tower gives up within its share of the deadline
    (budget.DEFAULT_SHARES: a quarter) and the answer is popular items for the user's
    categories, flagged ``retrieval_unavailable``; a user whose embedding is cached still
    gets retrieval, flagged ``ranking_skipped``. Answers must come well inside the
    client's deadline: half of it here, so a service that spends the deadline fails
    the check instead of hitting the client's DEADLINE_EXCEEDED."""
    from orchestrator.budget import DEFAULT_SHARES

    s = stack["settings"]
    deadline = 0.5
    fresh, cached = _fresh_user(tables), _active_user(tables)
    _recommend(stack, tables, cached, k=10)  # its embedding is in the cache now
    before = _metric(stack, "recstack_degraded_total", reason="retrieval_unavailable")
    stack["procs"]["triton"].stop()
    latencies = []
    for _ in range(5):
        t0 = time.perf_counter()
        reply = _recommend(stack, tables, fresh, k=10, timeout=deadline)
        latencies.append(time.perf_counter() - t0)
        assert list(reply.degraded) == ["retrieval_unavailable"]
        assert len(reply.items) == 10 and not reply.cold_start
        assert {i.source for i in reply.items} <= {"popular", "fresh"}
        assert all(not i.ranked and list(i.sources) == [i.source] for i in reply.items)
        tower_ms = {t.stage: t.ms for t in reply.timings}["user_tower"]
        assert tower_ms <= DEFAULT_SHARES["user_tower"] * deadline * 1000 + 20, tower_ms
        reply = _recommend(stack, tables, cached, k=10, timeout=deadline)
        assert list(reply.degraded) == ["ranking_skipped"]
        assert len(reply.items) == 10
        assert "retrieval" in {i.source for i in reply.items}  # the fallbacks have none
        # Retrieval's merged candidates, in merge order: their sources, but not ranked.
        assert not any(i.ranked for i in reply.items)
        assert all(i.sources and set(i.sources) <= set(SOURCES) for i in reply.items)
    assert max(latencies) < deadline / 2, latencies
    after = _metric(stack, "recstack_degraded_total", reason="retrieval_unavailable")
    assert after == before + 5
    stack["procs"]["triton"] = start_triton(s)
    until = time.monotonic() + 30
    while time.monotonic() < until:
        reply = _recommend(stack, tables, fresh, k=10)
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
    # HTTP health, like gRPC's, says NOT_SERVING as soon as the drain starts (the listener
    # stays open while the calls in flight finish).
    health: list[int] = []
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline and 503 not in health:
        try:
            health.append(_http(stack, "/healthz")[0])
        except (urllib.error.URLError, ConnectionError):
            break
        time.sleep(0.005)
    assert 503 in health, health
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

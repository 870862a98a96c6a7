"""String ids end to end: the small preset re-keyed to UUID users and SKU items, imported
from CSV, trained by the real pipeline, served by a real tritonserver and the orchestrator
process; answers name items by their SKUs over gRPC and HTTP, events take SKUs, and
invalid ids are refused (docs/data.md "Ids")."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pandas as pd
import pytest
from conftest import end_of_data, make_settings, port

from exporters import pipeline, release
from exporters.data_generate import PRESETS, build, generate, item_key, user_key
from orchestrator import recommender_pb2 as pb
from orchestrator import recommender_pb2_grpc as pb_grpc
from orchestrator.orchestrator_process import start_orchestrator
from orchestrator.processes import ManagedProcess, stop_all
from orchestrator.triton_server import start_triton
from recstack.ids import key_hash
from recstack.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The small preset with every id replaced by a string key (``recstack data generate
    --string-ids``: CSV files through the importer), trained by the real pipeline."""
    s = make_settings(
        tmp_path_factory.mktemp("strids"),
        triton_http_port=port(18600),
        triton_grpc_port=port(18601),
        triton_metrics_port=port(18602),
        orchestrator_grpc_port=port(18603),
        orchestrator_http_port=port(18604),
        orchestrator_metrics_port=port(18605),
        orchestrator_admin_port=port(18606),
    )
    generate(s, preset="small", seed=11, string_ids=True)
    pipeline.run(s, progress=lambda _: None)
    tables, *_ = build(PRESETS["small"], 11)  # the same world, with its integer ids
    inter = tables.interactions
    pos = inter[inter["event"].isin(["click", "purchase"])]
    top = int(pos["user_id"].value_counts().index[0])
    items = tables.items.set_index("item_id")
    loved = int(items.loc[pos.loc[pos["user_id"] == top, "item_id"], "category"].mode().iloc[0])
    typical = items[items["category"] == loved]
    return {
        "settings": s,
        "skus": {item_key(int(i)) for i in tables.items["item_id"]},
        "active": [user_key(int(u)) for u in pos["user_id"].value_counts().index[:3]],
        # The most active user's favourite category, and an item shaped like its typical one.
        "loved": loved,
        "typical": {
            "category": loved,
            "brand": int(typical["brand"].mode().iloc[0]),
            "price": float(typical["price"].median()),
            "created_at": (inter["timestamp"].max() - pd.Timedelta(hours=2)).isoformat(),
        },
    }


@pytest.fixture(scope="module")
def stack(keyed: dict[str, Any]) -> Iterator[dict[str, Any]]:
    s: Settings = keyed["settings"]
    procs: list[ManagedProcess] = [start_triton(s)]
    try:
        procs.append(start_orchestrator(s))
        channel = grpc.insecure_channel(f"127.0.0.1:{s.orchestrator_grpc_port}")
        yield {**keyed, "stub": pb_grpc.RecommenderStub(channel), "when": end_of_data(s)}
        channel.close()
    finally:
        stop_all(procs)


def _http(
    s: Settings, path: str, body: dict[str, Any] | None = None, port_: int | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port_ or s.orchestrator_http_port}{path}",
        data=data,
        method="POST" if body is not None else "GET",
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_import_keeps_the_keys_and_the_release_carries_the_item_keys(
    keyed: dict[str, Any],
) -> None:
    s: Settings = keyed["settings"]
    items = pd.read_parquet(s.raw_dir / "items.parquet")
    keys = pd.read_parquet(s.raw_dir / "item_keys.parquet")
    assert set(keys["item_key"]) == keyed["skus"]
    assert sorted(keys["item_id"]) == sorted(items["item_id"])
    assert all(key_hash(k) == i for i, k in zip(keys["item_id"], keys["item_key"], strict=True))
    users = pd.read_parquet(s.raw_dir / "user_keys.parquet")
    assert len(users) == len(pd.read_parquet(s.raw_dir / "users.parquet"))
    manifest = release.load_manifest(s)
    shipped = pd.read_parquet(
        release.release_dir(s, manifest["release_id"]) / manifest["item_keys"]["file"]
    )
    assert shipped.equals(keys)
    # The key table is a served artifact: checksummed, and checked by `release validate`.
    from exporters.release_validate import checksums

    assert "item_keys.parquet" in manifest["checksums"]
    assert checksums(s, manifest) == manifest["checksums"]


def test_recommend_by_uuid_answers_skus_over_grpc(stack: dict[str, Any]) -> None:
    user = stack["active"][0]
    ctx = pb.Context(surface="home", timestamp=stack["when"])
    reply = stack["stub"].Recommend(pb.RecommendRequest(user_id=user, k=10, context=ctx), timeout=5)
    keys = [i.item_key for i in reply.items]
    assert len(keys) == 10 and len(set(keys)) == 10
    assert not reply.cold_start and list(reply.degraded) == []
    assert set(keys) <= stack["skus"]
    assert all(i.item_id == key_hash(i.item_key) for i in reply.items)
    # Reasons name the user's own items by their keys too, never by internal ids.
    named = [i.reason for i in reply.items if "because you engaged with item" in i.reason]
    assert all(r.rsplit(" ", 1)[1] in stack["skus"] for r in named)
    assert not [i.reason for i in reply.items if re.search(r"[0-9]{12}", i.reason)]
    # Excluding by key removes the items.
    again = stack["stub"].Recommend(
        pb.RecommendRequest(
            user_id=user, k=10, context=ctx, filters=pb.Filters(exclude_item_keys=keys[:3])
        ),
        timeout=5,
    )
    assert not set(keys[:3]) & {i.item_key for i in again.items}


def test_http_answers_skus_and_takes_key_filters(stack: dict[str, Any]) -> None:
    s: Settings = stack["settings"]
    user = stack["active"][1]
    when = stack["when"].ToDatetime().isoformat()
    query = urllib.parse.urlencode({"user_id": user, "k": 5, "timestamp": when})
    status, body = _http(s, f"/v1/recommendations?{query}")
    assert status == 200, body
    keys = [i["item_key"] for i in body["items"]]
    assert len(keys) == 5 and set(keys) <= stack["skus"]
    assert all(i["item_id"] == key_hash(i["item_key"]) for i in body["items"])
    query = urllib.parse.urlencode(
        {"user_id": user, "k": 5, "timestamp": when, "exclude_item_keys": ",".join(keys[:2])}
    )
    status, body = _http(s, f"/v1/recommendations?{query}")
    assert status == 200 and not set(keys[:2]) & {i["item_key"] for i in body["items"]}


def test_events_name_items_by_key(stack: dict[str, Any]) -> None:
    s: Settings = stack["settings"]
    user, sku = stack["active"][2], sorted(stack["skus"])[0]
    ok = stack["stub"].RecordEvent(
        pb.RecordEventRequest(user_id=user, item_key=sku, event=pb.CLICK), timeout=5
    )
    assert ok.accepted
    status, body = _http(s, "/v1/events", {"user_id": user, "item_key": sku, "event": "view"})
    assert status in (200, 202), body
    with pytest.raises(grpc.RpcError) as err:
        stack["stub"].RecordEvent(
            pb.RecordEventRequest(user_id=user, item_key="SKU-not-sold", event=pb.CLICK), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("user", "needle"),
    [
        ("not a key", "user_id must be a non-negative integer or a key"),
        ("x" * 65, "longer than 64"),
        ("ümlaut", "A-Z a-z 0-9"),
        ("-7", "not a signed or decimal number"),
    ],
)
def test_invalid_ids_are_refused_with_a_clear_error(
    stack: dict[str, Any], user: str, needle: str
) -> None:
    with pytest.raises(grpc.RpcError) as err:
        stack["stub"].Recommend(pb.RecommendRequest(user_id=user, k=5), timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in (err.value.details() or "")
    s: Settings = stack["settings"]
    status, body = _http(s, "/v1/recommendations?" + urllib.parse.urlencode({"user_id": user}))
    assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT"
    assert needle in body["error"]["message"]
    status, body = _http(
        s, "/v1/events", {"user_id": stack["active"][0], "item_key": user, "event": "view"}
    )
    assert status == 400 and "item_key" in body["error"]["message"]


def test_a_digit_user_id_is_an_integer_id_beside_keys(stack: dict[str, Any]) -> None:
    """Digits are an integer id in a keyed deployment too: a user the data never saw gets
    cold-start items, named by their keys."""
    ctx = pb.Context(timestamp=stack["when"])
    reply = stack["stub"].Recommend(pb.RecommendRequest(user_id="123", k=5, context=ctx), timeout=5)
    assert reply.cold_start and {i.item_key for i in reply.items} <= stack["skus"]


def test_new_items_are_added_marked_and_answered_by_their_keys(stack: dict[str, Any]) -> None:
    """Items that arrive after the release, named by SKUs: added through the admin API,
    retrieved for a user who loves their category and answered by their keys; events and
    the out-of-stock mark take the keys too; a key the catalog holds is refused."""
    s: Settings = stack["settings"]
    admin = s.orchestrator_admin_port
    new = [f"SKU-NEW-{i}" for i in range(5)]
    status, body = _http(
        s, "/admin/items", {"items": [{"item_id": k, **stack["typical"]} for k in new]}, admin
    )
    assert status == 200, body
    status, body = _http(
        s, "/admin/items", {"items": [{"item_id": sorted(stack["skus"])[0]}]}, admin
    )
    assert (
        status == 400
        and f"item '{sorted(stack['skus'])[0]}' is already in release" in (body["error"]["message"])
    )
    user = stack["active"][0]
    when = stack["when"].ToDatetime().isoformat()
    query = {"user_id": user, "k": 200, "timestamp": when, "include_categories": stack["loved"]}
    status, body = _http(s, f"/v1/recommendations?{urllib.parse.urlencode(query)}")
    assert status == 200, body
    found = [i for i in body["items"] if i["item_key"] in new]
    assert found, body["items"][:5]
    assert all(i["item_id"] == key_hash(i["item_key"]) for i in found)
    ok = stack["stub"].RecordEvent(
        pb.RecordEventRequest(user_id=stack["active"][1], item_key=new[0], event=pb.CLICK),
        timeout=5,
    )
    assert ok.accepted
    status, body = _http(s, "/admin/items/unavailable", {"item_ids": new}, admin)
    assert status == 200 and body["unavailable"] == len(new), body
    status, body = _http(s, f"/v1/recommendations?{urllib.parse.urlencode(query)}")
    assert status == 200 and not [i for i in body["items"] if i["item_key"] in new]
    status, body = _http(s, "/admin/items/available", {"item_ids": ["SKU-never-added"]}, admin)
    assert status == 400 and "not in release" in body["error"]["message"]

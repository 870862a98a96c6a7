"""Items added between releases, end to end: the trained small preset, a real tritonserver
(the release's item_tower embeds them), the orchestrator as its own process, the
`recstack items` command as a user runs it, and the admin API. Nothing is retrained.

The module works on a copy of the trained releases (segments are written beside a
release's index), so the other modules' release stays as trained."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import own_stack, port, two_releases_first_live

from exporters import item_delta
from exporters.raw_tables import read_table
from exporters.release import load_manifest, model_versions
from orchestrator.orchestrator_process import settings_env, start_orchestrator
from orchestrator.processes import ManagedProcess, stop_all
from orchestrator.triton_client import TritonClient
from orchestrator.triton_server import start_triton
from recstack.settings import Settings

pytestmark = pytest.mark.integration

FIRST_NEW_ID = 5_000_000


@pytest.fixture(scope="module")
def stack(
    trained_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    releases = tmp_path_factory.mktemp("new_items") / "releases"
    shutil.copytree(trained_settings.releases_dir, releases)
    s = trained_settings.model_copy(
        update={
            "releases_dir": releases,
            "triton_http_port": port(18400),
            "triton_grpc_port": port(18401),
            "triton_metrics_port": port(18402),
            "orchestrator_grpc_port": port(18450),
            "orchestrator_http_port": port(18451),
            "orchestrator_metrics_port": port(18452),
            "orchestrator_admin_port": port(18453),
            "new_items_watch_s": 0.5,
        }
    )
    procs: dict[str, ManagedProcess] = {"triton": start_triton(s)}
    try:
        procs["orchestrator"] = start_orchestrator(s)
        raw = s.raw_dir
        yield {
            "settings": s,
            "procs": procs,
            "items": pd.read_parquet(raw / "items.parquet").set_index("item_id"),
            "interactions": read_table(raw, "interactions"),
            "folder": item_delta.delta_dir(s, int(load_manifest(s)["release_id"])),
        }
    finally:
        stop_all(procs.values())


def _lover(stack: dict[str, Any]) -> tuple[int, int]:
    """The most active user and the category they click and buy most."""
    inter, items = stack["interactions"], stack["items"]
    pos = inter[inter["event"].isin(["click", "purchase"])]
    user = int(pos["user_id"].value_counts().index[0])
    cats = items.loc[pos.loc[pos["user_id"] == user, "item_id"], "category"]
    return user, int(cats.value_counts().index[0])


def _recommend(stack: dict[str, Any], user: int, **params: Any) -> dict[str, Any]:
    end = stack["interactions"]["timestamp"].max().isoformat().replace("+00:00", "Z")
    query = urllib.parse.urlencode({"user_id": user, "k": 200, "timestamp": end, **params})
    port_ = stack["settings"].orchestrator_http_port
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port_}/v1/recommendations?{query}", timeout=10
    ) as r:
        doc: dict[str, Any] = json.loads(r.read())
    return doc


def _admin(stack: dict[str, Any], path: str, body: object) -> tuple[int, dict[str, Any]]:
    port_ = stack["settings"].orchestrator_admin_port
    req = urllib.request.Request(
        f"http://127.0.0.1:{port_}{path}", data=json.dumps(body).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _cli(stack: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recstack.cli", "items", *args],
        env=settings_env(stack["settings"]),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _retrieved(answer: dict[str, Any], ids: set[int]) -> list[int]:
    return [
        i["item_id"] for i in answer["items"] if i["item_id"] in ids and "retrieval" in i["sources"]
    ]


def _new_items_file(stack: dict[str, Any], path: Path, category: int, n: int, first: int) -> Path:
    """``n`` items of ``category`` shaped like that category's typical item."""
    items = stack["items"]
    typical = items[items["category"] == category]
    created = stack["interactions"]["timestamp"].max() - pd.Timedelta(hours=2)
    pd.DataFrame(
        {
            "item_id": np.arange(first, first + n),
            "category": category,
            "brand": int(typical["brand"].mode().iloc[0]),
            "price": float(typical["price"].median()),
            "created_at": created.isoformat(),
        }
    ).to_csv(path, index=False)
    return path


def test_malformed_item_file_is_refused_and_changes_nothing(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    before = item_delta.segment_names(stack["folder"])
    bad = tmp_path / "bad.csv"
    first = FIRST_NEW_ID + 900
    bad.write_text(f"item_id,category,price\n{first},3,1.5\n{first + 1},3,abc\n")
    done = _cli(stack, "add", str(bad))
    assert done.returncode == 2, done.stderr
    assert f"{bad}: line 3, column 'price': 'abc' is not a number" in done.stderr
    status, body = _admin(stack, "/admin/items", {"items": [{"item_id": 1, "price": "2"}]})
    assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT"
    assert "row 1, column 'item_id': item 1 is already in release" in body["error"]["message"]
    status, body = _admin(stack, "/admin/items", {"rows": []})
    assert status == 400 and "exactly 'items'" in body["error"]["message"]
    assert item_delta.segment_names(stack["folder"]) == before
    user, _ = _lover(stack)
    ids = {i["item_id"] for i in _recommend(stack, user)["items"]}
    assert not ids & {FIRST_NEW_ID + 900, FIRST_NEW_ID + 901}


def test_new_item_of_a_loved_category_is_retrieved_without_retraining(
    stack: dict[str, Any], tmp_path: Path
) -> None:
    user, category = _lover(stack)
    new = set(range(FIRST_NEW_ID, FIRST_NEW_ID + 5))
    assert not _retrieved(_recommend(stack, user, include_categories=category), new)
    path = _new_items_file(stack, tmp_path / "new.csv", category, 5, FIRST_NEW_ID)
    t0 = time.monotonic()
    done = _cli(stack, "add", str(path))
    assert done.returncode == 0, done.stderr
    assert "applied by orchestrator" in done.stdout
    answer = _recommend(stack, user, include_categories=category)
    assert time.monotonic() - t0 < 60
    found = _retrieved(answer, new)
    assert found, answer["items"][:5]
    # Ranked with its features (category and price from the file, no events yet).
    assert all(i["ranked"] for i in answer["items"] if i["item_id"] in found)
    assert answer["degraded"] == []


def test_segment_of_another_writer_is_applied_by_polling(stack: dict[str, Any]) -> None:
    """What a second replica sees: a segment nobody told this orchestrator about."""
    s = stack["settings"]
    user, category = _lover(stack)
    rid = int(load_manifest(s)["release_id"])
    # Created before the requests' time (the end of the data): offered, not "not yet".
    created = (stack["interactions"]["timestamp"].max() - pd.Timedelta(hours=1)).isoformat()
    items = item_delta.items_from_json(
        [
            {"item_id": FIRST_NEW_ID + 50 + i, "category": category, "created_at": created}
            for i in range(3)
        ]
    )
    known = item_delta._known(s, rid)
    with TritonClient.from_settings(s, versions=model_versions(s, rid), timeout_s=30) as triton:
        item_delta.add_to_release(
            stack["folder"], load_manifest(s, rid), items, known, triton.item_embedding, 64
        )
    new = set(items.item_ids.tolist())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        answer = _recommend(stack, user, include_categories=category)
        if {i["item_id"] for i in answer["items"]} & new:
            # Each is found by the release's retrieval for its own vector (the bench probe).
            status, body = _admin(stack, "/admin/items/probe", {"item_ids": sorted(new)})
            assert status == 200 and sorted(body["retrieved"][str(rid)]) == sorted(new)
            return
        time.sleep(0.2)
    pytest.fail("the orchestrator did not pick up the segment within 30 s")


def test_unavailable_item_is_not_offered_on_the_next_request(stack: dict[str, Any]) -> None:
    user, category = _lover(stack)
    shown = [i["item_id"] for i in _recommend(stack, user, include_categories=category)["items"]]
    new = [i for i in shown if i >= FIRST_NEW_ID]
    old = [i for i in shown if i < FIRST_NEW_ID]
    assert new and old
    gone = [new[0], old[0]]  # an added item and one of the release's own
    status, body = _admin(stack, "/admin/items/unavailable", {"item_ids": gone})
    assert status == 200 and body["unavailable"] == 2, body
    shown = {i["item_id"] for i in _recommend(stack, user, include_categories=category)["items"]}
    assert not shown & set(gone)
    status, body = _admin(stack, "/admin/items/probe", {"item_ids": gone})
    assert status == 200 and all(v == [] for v in body["retrieved"].values()), body
    status, body = _admin(stack, "/admin/items/unavailable", {"item_ids": [10**15]})
    assert status == 400 and "not in release" in body["error"]["message"]
    done = _cli(stack, "remove", "--available", str(old[0]))
    assert done.returncode == 0, done.stderr
    shown = {i["item_id"] for i in _recommend(stack, user, include_categories=category)["items"]}
    assert old[0] in shown and new[0] not in shown


def test_a_restart_sees_the_added_items(stack: dict[str, Any]) -> None:
    user, category = _lover(stack)
    before = _recommend(stack, user, include_categories=category)
    stack["procs"]["orchestrator"].stop()
    stack["procs"]["orchestrator"] = start_orchestrator(stack["settings"])
    after = _recommend(stack, user, include_categories=category)
    new_before = [i["item_id"] for i in before["items"] if i["item_id"] >= FIRST_NEW_ID]
    new_after = [i["item_id"] for i in after["items"] if i["item_id"] >= FIRST_NEW_ID]
    assert new_after and sorted(new_after) == sorted(new_before)


@pytest.fixture(scope="module")
def ab_settings(
    trained_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """Releases 1 and 2 of the trained models in an A/B test, on a stack of their own."""
    s = own_stack(
        trained_settings, tmp_path_factory.mktemp("new_items_ab"), 18500, 18550, release_watch_s=0.5
    )
    two_releases_first_live(s)
    procs = {"triton": start_triton(s)}
    try:
        procs["orchestrator"] = start_orchestrator(s)
        ab = ["ab", "1", "2", "--split", "50/50", "--reason", "new items in both arms"]
        done = subprocess.run(
            [sys.executable, "-m", "recstack.cli", "release", *ab],
            env=settings_env(s),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        yield s
    finally:
        stop_all(procs.values())


def test_during_an_ab_test_both_arms_get_the_items_through_their_own_tower(
    ab_settings: Settings,
) -> None:
    s = ab_settings
    stack = {"settings": s}
    rows = [{"item_id": FIRST_NEW_ID + 700 + i, "category": i % 3, "price": 5} for i in range(4)]
    status, body = _admin(stack, "/admin/items", {"items": rows})
    assert status == 200 and sorted(body["segments"]) == ["1", "2"], body
    ids = [r["item_id"] for r in rows]
    status, body = _admin(stack, "/admin/items/probe", {"item_ids": ids})
    assert status == 200 and body["retrieved"] == {"1": ids, "2": ids}, body
    items = item_delta.items_from_json(rows)
    for rid in (1, 2):
        folder = item_delta.delta_dir(s, rid)
        (name,) = item_delta.segment_names(folder)
        seg = item_delta.read_segment(folder / name)
        # The vectors are those of this release's item_tower version, on the same inputs.
        pins = model_versions(s, rid)
        with TritonClient.from_settings(s, versions=pins, timeout_s=30) as triton:
            want = item_delta.embed(
                triton.item_embedding,
                items,
                item_delta.embedding_time(load_manifest(s, rid)),
                64,
            )
        np.testing.assert_allclose(seg.embeddings, want, rtol=1e-5, atol=1e-6)
    assert model_versions(s, 1)["item_tower"] != model_versions(s, 2)["item_tower"]


def _release_cli(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recstack.cli", "release", *args],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_promotion_carries_the_added_items_and_stock_marks(ab_settings: Settings) -> None:
    """Items added to the live release after the next one was built are not dropped when
    the next one is promoted: it gets them through its own item tower, with their stock
    state; rolling back to a release that holds them all carries nothing."""
    s = ab_settings
    stack = {"settings": s}
    done = _release_cli(s, "promote", "1", "--reason", "end the A/B test")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "carried" not in done.stdout  # release 1 served all along: it has everything
    rows = [{"item_id": FIRST_NEW_ID + 800 + i, "category": i % 3, "price": 7} for i in range(3)]
    status, body = _admin(stack, "/admin/items", {"items": rows})
    assert status == 200 and sorted(body["segments"]) == ["1"], body
    ids = [r["item_id"] for r in rows]
    status, body = _admin(stack, "/admin/items/unavailable", {"item_ids": [ids[0]]})
    assert status == 200, body

    done = _release_cli(s, "promote", "2", "--reason", "the next release")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "release 2: carried 3 added items and 1 stock marks from releases [1]" in done.stdout
    status, body = _admin(stack, "/admin/items/probe", {"item_ids": ids})
    assert status == 200 and body["retrieved"] == {"2": ids[1:]}, body
    # Embedded by release 2's own item tower, like an item added to it directly.
    folder = item_delta.delta_dir(s, 2)
    carried = [
        seg
        for seg in (item_delta.read_segment(folder / n) for n in item_delta.segment_names(folder))
        if seg.kind == "add" and FIRST_NEW_ID + 800 in seg.item_ids
    ]
    assert len(carried) == 1 and carried[0].item_ids.tolist() == ids
    with TritonClient.from_settings(s, versions=model_versions(s, 2), timeout_s=30) as triton:
        want = item_delta.embed(
            triton.item_embedding,
            item_delta.items_from_json(rows),
            item_delta.embedding_time(load_manifest(s, 2)),
            64,
        )
    np.testing.assert_allclose(carried[0].embeddings, want, rtol=1e-5, atol=1e-6)

    done = _release_cli(s, "rollback", "--reason", "back")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "carried" not in done.stdout
    # Idempotent: a second carry finds nothing to do, by hand or by the command.
    assert item_delta.carry(s, [1], 2, None) == (0, 0)
    done = _cli(stack, "carry", "--from", "2")
    assert done.returncode == 0 and "nothing to carry" in done.stdout, done.stderr
    done = _cli(stack, "carry", "--from", "9")
    assert done.returncode == 2 and "release 9 does not exist" in done.stderr

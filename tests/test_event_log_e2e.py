"""The feedback loop end to end: a real tritonserver and orchestrator (small preset) log
what they served and the events clients sent (gRPC and HTTP, with and without the
answer's request_id); the A/B report counts them; import-events turns them into raw
interactions that the next training's feature tables hold."""

from __future__ import annotations

import json
import shutil
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pandas as pd
import pytest
from conftest import port

from exporters import release
from exporters.ab_report import report_from_log
from exporters.event_import import import_events
from exporters.raw_tables import read_meta, read_table
from orchestrator import recommender_pb2 as pb
from orchestrator import recommender_pb2_grpc as pb_grpc
from orchestrator.event_log import closed_segments, read_records
from orchestrator.orchestrator_process import start_orchestrator
from orchestrator.triton_server import start_triton
from recstack.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def loop(
    trained_settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    s = trained_settings.model_copy(
        update={
            "events_dir_path": tmp_path_factory.mktemp("events"),
            "event_log_flush_ms": 50.0,
            "triton_http_port": port(18120),
            "triton_grpc_port": port(18121),
            "triton_metrics_port": port(18122),
            "orchestrator_grpc_port": port(18170),
            "orchestrator_http_port": port(18171),
            "orchestrator_metrics_port": port(18172),
        }
    )
    triton = start_triton(s, release.model_versions(s))
    try:
        orch = start_orchestrator(s)
        channel = grpc.insecure_channel(f"127.0.0.1:{s.orchestrator_grpc_port}")
        try:
            yield {"settings": s, "stub": pb_grpc.RecommenderStub(channel), "orch": orch}
        finally:
            channel.close()
            orch.stop()
    finally:
        triton.stop()


def _users(s: Settings, n: int) -> list[str]:
    """Known users, not the most active ones (other e2e modules use those)."""
    inter = read_table(s, "interactions", columns=["user_id"])
    counts = inter["user_id"].value_counts()
    return [str(int(u)) for u in counts.index[10 : 10 + n]]


def _post(s: Settings, body: dict[str, Any]) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{s.orchestrator_http_port}/v1/events",
        data=json.dumps(body).encode(),
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return int(r.status)


def _records(folder: Path, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        recs = list(read_records(folder))
        if len(recs) >= n or time.monotonic() > deadline:
            return recs
        time.sleep(0.05)


def test_served_lists_and_events_reach_the_log_report_and_training(
    loop: dict[str, Any], tmp_path: Path
) -> None:
    s: Settings = loop["settings"]
    stub = loop["stub"]
    users = _users(s, 6)
    replies = [stub.Recommend(pb.RecommendRequest(user_id=u, k=5), timeout=5) for u in users]
    ids = [r.request_id for r in replies]
    assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids)
    # HTTP answers carry one too
    with urllib.request.urlopen(
        f"http://127.0.0.1:{s.orchestrator_http_port}/v1/recommendations?user_id={users[0]}&k=5",
        timeout=5,
    ) as r:
        http_reply = json.loads(r.read())
    assert len(http_reply["request_id"]) == 32 and http_reply["request_id"] not in ids

    # clicks on the 2nd item of lists 0-2 with their request_id (gRPC), a purchase of
    # list 3's top item without one (HTTP: attributed by the window), a view of list 4
    sent = []
    for n in range(3):
        item = replies[n].items[1].item_id
        stub.RecordEvent(
            pb.RecordEventRequest(
                user_id=users[n], item_id=item, event=pb.CLICK, request_id=ids[n]
            ),
            timeout=5,
        )
        sent.append((int(users[n]), item, "click"))
    item = replies[3].items[0].item_id
    assert _post(s, {"user_id": users[3], "item_id": item, "event": "purchase"}) == 200
    sent.append((int(users[3]), item, "purchase"))
    item = replies[4].items[0].item_id
    body = {"user_id": users[4], "item_id": item, "event": "view", "request_id": ids[4]}
    assert _post(s, body) == 200
    sent.append((int(users[4]), item, "view"))
    # a bad request_id is refused before anything is stored or logged
    with pytest.raises(grpc.RpcError) as err:
        stub.RecordEvent(
            pb.RecordEventRequest(
                user_id=users[5], item_id=item, event=pb.CLICK, request_id="no spaces"
            ),
            timeout=5,
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id" in (err.value.details() or "")

    recs = _records(s.events_dir, len(users) + 1 + len(sent))
    served = [r for r in recs if r["kind"] == "served"]
    events = [r for r in recs if r["kind"] == "event"]
    assert len(served) == len(users) + 1 and len(events) == len(sent)
    by_id = {r["request_id"]: r for r in served}
    for u, reply in zip(users, replies, strict=True):
        rec = by_id[reply.request_id]
        assert rec["user_id"] == int(u) and rec["release"] == reply.release
        assert rec["items"] == [
            [i.item_id, i.rank, i.source, list(i.sources), i.ranked] for i in reply.items
        ]
        assert all(item[3] for item in rec["items"])  # every item names its sources
        assert rec["degraded"] == list(reply.degraded)
    assert [(e["user_id"], e["item_id"], e["event"]) for e in events] == sent
    assert [e["request_id"] for e in events] == [*ids[:3], "", ids[4]]

    report = report_from_log(s, min_impressions=1)
    (arm,) = report.arms
    assert arm.release == replies[0].release
    assert (arm.requests, arm.impressions) == (7, 35)
    assert (arm.clicks, arm.purchases) == (3, 1)
    assert report.attributed == {"request_id": 3, "window": 1}
    assert report.verdict.startswith("not enough data")  # one arm

    # the writer's counters, on the orchestrator's /metrics
    with urllib.request.urlopen(
        f"http://127.0.0.1:{s.orchestrator_metrics_port}/metrics", timeout=5
    ) as r:
        text = r.read().decode()
    assert 'recstack_event_log_records_total{kind="served"} 7.0' in text
    assert 'recstack_event_log_records_total{kind="event"} 5.0' in text
    assert "recstack_event_log_queue_depth 0.0" in text

    # SIGTERM closes the open segment (renamed *.jsonl)
    loop["orch"].stop()
    assert closed_segments(s.events_dir) and not list(s.events_dir.glob("*.open"))

    # import-events into a copy of the data (the session's data stays as it was)
    data = tmp_path / "data"
    shutil.copytree(s.raw_dir, data / "raw")
    s2 = s.model_copy(update={"data_dir": data})
    before = read_table(s2, "interactions")
    snap0 = read_meta(s2)["snapshot"]
    summary = import_events(s2)
    assert (summary.logged, summary.added, summary.duplicates) == (5, 5, 0)
    assert summary.snapshot != snap0  # `recstack train` re-runs every step on it
    assert import_events(s2).added == 0  # idempotent
    after = read_table(s2, "interactions")
    new = after.merge(before, how="left", indicator=True)
    new = new[new["_merge"] == "left_only"]
    got = sorted(zip(new["user_id"], new["item_id"], new["event"], strict=True))
    assert got == sorted(sent)
    logged_ts = {(e["user_id"], e["item_id"]): e["ts_us"] for e in events}
    for row in new.itertuples():
        assert row.timestamp.value // 1000 == logged_ts[(row.user_id, row.item_id)]

    # ... and the next training's feature tables hold them: the clicked item is first in
    # the user's recent items as of the click
    from exporters import feature_tables

    feature_tables.build(s2)
    recent = pd.read_parquet(s2.features_dir / feature_tables.TABLE_FILES["user_recent_items"])
    u0, item0, _ = sent[0]
    rows = recent[recent["user_id"] == u0].sort_values("event_timestamp")
    last = rows.iloc[-1]
    assert last["event_timestamp"].value // 1000 == logged_ts[(u0, item0)]
    assert int(last["recent_items"][0]) == item0

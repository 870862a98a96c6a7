"""The event log on its own: records round-trip, segments rotate and are deleted past the
total, a full queue drops (counted) instead of blocking, a SIGKILLed writer loses nothing
it had flushed, and a torn last line is never read."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator import event_log as el
from orchestrator.event_log import EventLog, LogConfig, read_records
from orchestrator.request import EventQuery, RecommendQuery
from orchestrator.service import RecItem, RecommendResult
from recstack.settings import PROJECT_ROOT


def served(
    user: int, items: list[int], release: str = "7"
) -> tuple[RecommendQuery, RecommendResult]:
    q = RecommendQuery(user_id=user, k=len(items), surface="home")
    result = RecommendResult(
        items=[
            RecItem(i, 1.0 / (r + 1), r + 1, "popular", "popular", ("popular",))
            for r, i in enumerate(items)
        ],
        release=release,
        degraded=["ranking_skipped"],
    )
    return q, result


def test_records_round_trip(tmp_path: Path) -> None:
    log = EventLog(LogConfig(tmp_path, flush_ms=20))
    q, result = served(5, [10, 11, 12])
    result.fallback_segment = "country=3"
    log.served(q, result)
    when = datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=UTC)
    log.event(EventQuery(5, 11, "click", when, result.request_id))
    assert log.flush()
    recs = list(read_records(tmp_path))
    assert [r["kind"] for r in recs] == ["served", "event"]
    s, e = recs
    assert s["request_id"] == result.request_id and len(result.request_id) == 32
    assert s["items"] == [
        [i, r, "popular", ["popular"], False] for r, i in ((1, 10), (2, 11), (3, 12))
    ]
    assert (s["user_id"], s["release"], s["degraded"]) == (5, "7", ["ranking_skipped"])
    assert s["fallback_segment"] == "country=3"
    # µs exactly: the import writes this value into the raw tables
    assert e["ts_us"] == int(when.timestamp()) * 1_000_000 + 123456
    assert (e["user_id"], e["item_id"], e["event"], e["request_id"]) == (
        5,
        11,
        "click",
        result.request_id,
    )
    # while open, the segment is *.jsonl.open; close() renames it
    assert [p.name.endswith(".jsonl.open") for p in tmp_path.iterdir()] == [True]
    log.close()
    assert [p.suffix for p in tmp_path.iterdir()] == [".jsonl"]
    assert len(list(read_records(tmp_path))) == 2
    assert list(read_records(tmp_path, since_us=s["at_us"] + 10**9)) == []


def test_every_answer_gets_its_own_request_id() -> None:
    ids = {served(1, [1])[1].request_id for _ in range(1000)}
    assert len(ids) == 1000


def test_disabled_log_writes_nothing(tmp_path: Path) -> None:
    log = EventLog(None)
    log.served(*served(1, [1]))
    assert not log.enabled and log.flush() and list(tmp_path.iterdir()) == []
    log.close()


def test_segments_rotate_and_the_oldest_are_deleted(tmp_path: Path) -> None:
    before = el.SEGMENTS_DELETED._value.get()
    log = EventLog(
        LogConfig(tmp_path, flush_ms=5, flush_records=1, segment_bytes=4096, max_bytes=3 * 4096)
    )
    for n in range(200):  # ~600 bytes each: ~30 segments of ~4 kB
        log.served(*served(n, list(range(20))))
    log.close()
    segs = el.closed_segments(tmp_path)
    sizes = [p.stat().st_size for p in segs]
    record = len(json.dumps(el.served_record(0, *served(0, list(range(20))))))
    assert len(segs) >= 2 and sum(sizes) <= 3 * 4096
    # Rotated within a batch too: a segment ends at most one record past its limit.
    assert max(sizes) <= 4096 + record + 1, (max(sizes), record)
    deleted = el.SEGMENTS_DELETED._value.get() - before
    assert deleted >= 10
    users = [r["user_id"] for r in read_records(tmp_path)]
    # what is left is the newest records, in order, each whole
    assert users == list(range(200 - len(users), 200))


def test_a_full_queue_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    before = el.DROPPED.labels("queue_full")._value.get()
    log = EventLog(LogConfig(tmp_path, flush_ms=50, queue_size=8))
    q, result = served(1, [1, 2, 3])
    t0 = time.perf_counter()
    for _ in range(20_000):
        log.served(q, result)
    per_call_us = (time.perf_counter() - t0) / 20_000 * 1e6
    log.close()
    dropped = el.DROPPED.labels("queue_full")._value.get() - before
    written = len(list(read_records(tmp_path)))
    assert dropped > 0 and written > 0
    assert dropped + written == 20_000
    assert per_call_us < 100, per_call_us  # never waits for the writer


def _switches(native_id: int) -> int:
    """Voluntary context switches of one thread of this process (Linux)."""
    status = Path(f"/proc/self/task/{native_id}/status").read_text()
    return int(next(x for x in status.splitlines() if x.startswith("voluntary_ctxt")).split()[1])


def test_records_do_not_wake_the_writer_one_by_one(tmp_path: Path) -> None:
    """The writer sleeps until ``flush_ms`` passes or a batch of ``flush_records`` is
    queued: 60 answers 5 ms apart wake it a few times, not 60 (a per-record wake-up cost
    ~3 context switches per answer on the request cores)."""
    log = EventLog(LogConfig(tmp_path, flush_ms=2_000, flush_records=1_000))
    assert log._thread is not None and log._thread.native_id is not None
    q, result = served(1, [1, 2, 3])
    time.sleep(0.05)  # the writer is asleep
    before = _switches(log._thread.native_id)
    for _ in range(60):
        log.served(q, result)
        time.sleep(0.005)
    woken = _switches(log._thread.native_id) - before
    assert woken <= 5, woken
    assert log.flush()
    assert len(list(read_records(tmp_path))) == 60
    log.close()


def test_a_full_batch_is_written_without_waiting_for_flush_ms(tmp_path: Path) -> None:
    log = EventLog(LogConfig(tmp_path, flush_ms=60_000, flush_records=10))
    q, result = served(1, [1])
    for _ in range(10):
        log.served(q, result)
    t0 = time.monotonic()
    while len(list(read_records(tmp_path))) < 10 and time.monotonic() - t0 < 5:
        time.sleep(0.01)
    assert len(list(read_records(tmp_path))) == 10
    assert time.monotonic() - t0 < 5
    log.close()


CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from datetime import UTC, datetime
    from orchestrator.event_log import EventLog, LogConfig
    from orchestrator.request import EventQuery
    log = EventLog(LogConfig(Path(sys.argv[1]), flush_ms=50))
    for n in range(500):
        log.event(EventQuery(n, 1, "click", datetime.now(UTC)))
    assert log.flush()
    print("flushed", flush=True)
    time.sleep(60)
    """
)


def test_sigkill_keeps_what_was_flushed_and_start_up_closes_the_segment(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=PROJECT_ROOT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "flushed"
    finally:
        proc.kill()
        proc.wait()
    (opened,) = tmp_path.glob("*.jsonl.open")
    # a torn last line, as a crash in the middle of a write leaves it
    with open(opened, "ab") as f:
        f.write(b'{"kind":"event","at_us":1')
    assert len(list(read_records(tmp_path))) == 500  # the open segment, complete lines only
    log = EventLog(LogConfig(tmp_path))  # start-up recovers the dead writer's segment
    log.close()
    assert not list(tmp_path.glob("*.open"))
    (closed,) = el.closed_segments(tmp_path)
    assert closed.read_bytes().endswith(b"\n")
    assert sorted(r["user_id"] for r in read_records(tmp_path)) == list(range(500))


def test_an_open_segment_of_a_live_writer_is_left_alone(tmp_path: Path) -> None:
    live = EventLog(LogConfig(tmp_path, flush_ms=10))
    live.served(*served(1, [1]))
    assert live.flush()
    other = EventLog(LogConfig(tmp_path))  # same pid: treated as this process's own
    other.close()
    live.served(*served(2, [1]))
    live.close()
    assert sorted(r["user_id"] for r in read_records(tmp_path)) == [1, 2]


@pytest.mark.parametrize("line", [b"not json\n", b'{"kind":"served"}\n', b"[1,2]\n"])
def test_unreadable_lines_are_skipped(tmp_path: Path, line: bytes) -> None:
    log = EventLog(LogConfig(tmp_path, flush_ms=10))
    log.served(*served(1, [1]))
    log.close()
    (seg,) = el.closed_segments(tmp_path)
    seg.write_bytes(line + seg.read_bytes())
    assert [r["user_id"] for r in read_records(tmp_path)] == [1]


def test_a_write_error_drops_and_counts_then_logging_resumes(tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "events"
    before = el.DROPPED.labels("write_error")._value.get()
    log = EventLog(LogConfig(folder, flush_ms=10, segment_bytes=4096, max_bytes=1 << 20))
    for n in range(30):  # ~340 bytes each: the segment rotates at least once
        log.served(*served(n, list(range(20))))
    assert log.flush()
    log.served(*served(999, list(range(20))))
    assert log.flush()  # the current segment holds record 999 only after rotation ...
    shutil.rmtree(folder)  # ... and then the folder disappears (a wiped disk, an operator)
    for n in range(100, 120):
        log.served(*served(n, list(range(20))))
    assert log.flush()
    lost = el.DROPPED.labels("write_error")._value.get() - before
    assert lost > 0  # the rotation failed (counted), no exception reached the caller
    folder.mkdir()
    log.served(*served(500, [1]))
    log.close()
    assert [r["user_id"] for r in read_records(folder)] == [500]


def test_answers_and_the_log_carry_the_same_item_fields() -> None:
    """gRPC, HTTP and the event log build an item from one place (RecItem.served): every
    .proto Item field, set to a non-default value, arrives the same in all three."""
    from google.protobuf.json_format import MessageToDict

    from orchestrator import recommender_pb2 as pb
    from orchestrator.server import to_json, to_proto

    item = RecItem(
        123, 0.25, 2, "because you bought 7", "retrieval", ("retrieval", "fresh"), True, "SKU-1"
    )
    result = RecommendResult(items=[item], release="3")
    names = [f.name for f in pb.Item.DESCRIPTOR.fields]
    proto = MessageToDict(to_proto(result).items[0], preserving_proto_field_name=True)
    proto["item_id"] = int(proto["item_id"])  # int64: a string in proto3 JSON
    [answered] = to_json(result)["items"]
    assert list(answered) == names and proto == answered  # 0.25 is exact in float32
    assert answered == {**dataclasses.asdict(item), "sources": ["retrieval", "fresh"]}
    q = RecommendQuery(user_id=5, k=1)
    [logged] = el.served_record(0, q, result)["items"]
    assert logged == [answered[f] for f in el.LOGGED_ITEM_FIELDS]
    assert json.loads(json.dumps(logged)) == logged  # JSON-ready as built
    # An item without a key (integer ids) is named by its digits.
    plain = dataclasses.replace(item, item_key="")
    assert to_proto(RecommendResult(items=[plain], release="3")).items[0].item_key == "123"

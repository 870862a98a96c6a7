"""The in-process model fallback (``RECSTACK_MODEL_FALLBACK=in_process``) against the real
processes: a real tritonserver and the orchestrator as its own process on the session's
trained `small` release.

- The live release's rank ensemble unloaded from Triton: answers are ranked in process,
  flagged ``ranking_in_process``, and equal the answers Triton ranked (same items, same
  order, scores within float tolerance).
- Triton hung (SIGSTOP): users the orchestrator has not seen get their embedding and
  ranking in process (``user_tower_in_process``, ``ranking_in_process``), never the
  popular-items or retrieval-order degradation, each within the client's deadline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from conftest import active_users, end_of_data
from google.protobuf.timestamp_pb2 import Timestamp

from loadtest import faults
from orchestrator import recommender_pb2 as pb
from orchestrator import recommender_pb2_grpc as pb_grpc
from orchestrator.orchestrator_process import start_orchestrator
from orchestrator.processes import ManagedProcess, stop_all
from orchestrator.triton_server import start_triton
from recstack.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(trained_settings: Settings) -> Iterator[dict[str, Any]]:
    # No watchdog re-pinning the unloaded model, no snapshot refresh: the fault holds and
    # answers stay comparable for the whole test.
    s = trained_settings.model_copy(
        update={"feature_refresh_s": 0.0, "triton_watch_s": 0.0, "model_fallback": "in_process"}
    )
    procs: dict[str, ManagedProcess] = {"triton": start_triton(s)}
    try:
        procs["orchestrator"] = start_orchestrator(s)
        channel = grpc.insecure_channel(f"127.0.0.1:{s.orchestrator_grpc_port}")
        yield {"settings": s, "stub": pb_grpc.RecommenderStub(channel)}
        channel.close()
    finally:
        stop_all(procs.values())


@pytest.fixture(scope="module")
def when(trained_settings: Settings) -> Timestamp:
    return end_of_data(trained_settings)


def ask(stack: dict[str, Any], user: str, when: Timestamp, timeout: float = 2.0) -> Any:
    req = pb.RecommendRequest(user_id=user, k=10, context=pb.Context(timestamp=when))
    return stack["stub"].Recommend(req, timeout=timeout)


def assert_recovers(stack: dict[str, Any], user: str, when: Timestamp) -> None:
    """Full (unflagged) answers within the breakers' cool-down plus a few probes."""
    t_end = time.monotonic() + stack["settings"].breaker_cooldown_s + 3.0
    flags: list[str] = []
    while time.monotonic() < t_end:
        flags = list(ask(stack, user, when).degraded)
        if not flags:
            return
        time.sleep(0.2)
    raise AssertionError(f"still degraded {flags} after the cool-down")


def test_rank_unloaded_is_ranked_in_process(
    stack: dict[str, Any], trained_settings: Settings, when: Timestamp
) -> None:
    users = active_users(trained_settings, 25)
    healthy = {u: ask(stack, u, when) for u in users}
    assert all(not r.degraded for r in healthy.values()), [r.degraded for r in healthy.values()]
    with faults.model_unloaded(stack["settings"], "rank"):
        fallback = {u: ask(stack, u, when) for u in users}
    for u in users:
        got, want = fallback[u], healthy[u]
        assert list(got.degraded) == ["ranking_in_process"], (u, list(got.degraded))
        assert [i.item_id for i in got.items] == [i.item_id for i in want.items], u
        for a, b in zip(got.items, want.items, strict=True):
            assert a.score == pytest.approx(b.score, rel=1e-4, abs=1e-4), (u, a.item_id)
    # Triton has the ensemble again: once its breaker lets a probe through, answers are
    # Triton's, not flagged.
    assert_recovers(stack, users[0], when)


def test_triton_hung_answers_in_process(
    stack: dict[str, Any], trained_settings: Settings, when: Timestamp
) -> None:
    # Users not asked before: their embeddings are not cached, so the user tower is needed.
    users = active_users(trained_settings, 80)[40:]
    deadline_s = 1.0
    with faults.triton_paused(stack["settings"]):
        replies = [ask(stack, u, when, timeout=deadline_s) for u in users]
    flags = [set(r.degraded) for r in replies]
    assert all(r.items for r in replies)
    # Never the degradations the fallback replaces; every answer ranked in process.
    assert not any(f & {"retrieval_unavailable", "ranking_skipped"} for f in flags), flags
    assert all("ranking_in_process" in f for f in flags), flags
    assert all("user_tower_in_process" in f for f in flags), flags
    # After SIGCONT: Triton answers again within the breakers' cool-down and a probe.
    assert_recovers(stack, users[1], when)

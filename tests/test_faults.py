"""Dependency faults against the real processes: a real tritonserver and the orchestrator
as its own process (the session's trained `small` release, Feast with SQLite), called over
gRPC at 50 requests/s with deadlines of 100 ms and 1 s interleaved, while a fault from
loadtest/faults.py holds for a few seconds:

- Triton hung (SIGSTOP, then SIGCONT);
- the SQLite online store locked (``BEGIN EXCLUSIVE`` from another connection);
- the ``rank`` ensemble unloaded through Triton's repository API, then reloaded.

Under every fault each request gets an OK answer within min(deadline, the service's
latency ceiling), flagged degraded with the fault's reason once the dependency's breaker
is open (zero DEADLINE_EXCEEDED or INTERNAL); /healthz names the open breaker while gRPC
health stays SERVING; after the fault ends full answers come back within the breaker's
cool-down and a probe. Redis faults (killed, restarted) are tested with Redis durability.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import active_users, end_of_data
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtest import faults
from orchestrator import recommender_pb2 as pb
from orchestrator import recommender_pb2_grpc as pb_grpc
from orchestrator.orchestrator_process import start_orchestrator
from orchestrator.processes import ManagedProcess, stop_all
from orchestrator.triton_server import start_triton
from recstack.settings import Settings

pytestmark = pytest.mark.integration

DEADLINES_S = (0.1, 1.0, 30.0)  # short, over the ceiling, far over it (issue 12: 50 ms-30 s)
RATE = 50.0  # requests/s, as the tester drove it
FAULT_S = 3.0  # long enough for breakers to open and to serve from them for a while
# Scheduling slack on a shared 2-core host: an answer may leave the orchestrator at the
# ceiling and still need a few ms to arrive.
SLACK_S = 0.1
# A pause this long of the test's own process, or this much CPU time stolen by the
# hypervisor, while a check's traffic runs is the host's, not the stack's: the check runs
# once more (see once_more_after_a_stall).
STALL_S = 0.25
STEAL_S = 0.5


@pytest.fixture(scope="module")
def stack(trained_settings: Settings) -> Iterator[dict[str, Any]]:
    # The pinned-version watchdog would load an unloaded model again within 2 s; off here,
    # so the unload fault lasts as long as the test holds it (the breakers are under test).
    s = trained_settings.model_copy(update={"feature_refresh_s": 0.0, "triton_watch_s": 0.0})
    triton = start_triton(s)
    procs: dict[str, ManagedProcess] = {"triton": triton}
    try:
        procs["orchestrator"] = start_orchestrator(s)
        channel = grpc.insecure_channel(f"127.0.0.1:{s.orchestrator_grpc_port}")
        yield {"settings": s, "stub": pb_grpc.RecommenderStub(channel), "channel": channel}
        channel.close()
    finally:
        stop_all(procs.values())


@pytest.fixture(scope="module")
def users(trained_settings: Settings) -> list[str]:
    """Active users (clicks or purchases): full answers need their history."""
    return active_users(trained_settings, 400)


@pytest.fixture(scope="module")
def when(trained_settings: Settings) -> Timestamp:
    return end_of_data(trained_settings)


@dataclass
class Outcome:
    sent_s: float  # from the start of the drive
    deadline_s: float
    code: str
    latency_s: float
    degraded: tuple[str, ...] = ()
    n_items: int = 0


def _steal_s() -> float:
    """CPU time the hypervisor gave other guests while this one wanted to run (/proc/stat
    "steal", all CPUs), in seconds; 0 where the kernel does not count it."""
    with open("/proc/stat") as f:
        fields = f.readline().split()
    return int(fields[8]) / os.sysconf("SC_CLK_TCK") if len(fields) > 8 else 0.0


class HostStalls:
    """While the block runs, a thread that sleeps 5 ms at a time: its longest oversleep is
    the longest the host paused this process (contention or a stolen CPU), which pauses
    the orchestrator and Triton alike; and the CPU time stolen meanwhile."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.steal = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        last = time.perf_counter()
        while not self._stop.wait(0.005):
            now = time.perf_counter()
            self.longest = max(self.longest, now - last - 0.005)
            last = now

    def __enter__(self) -> HostStalls:
        self._steal0 = _steal_s()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.steal = _steal_s() - self._steal0

    @property
    def stalled(self) -> bool:
        return self.longest >= STALL_S or self.steal >= STEAL_S


def once_more_after_a_stall(check: Callable[[], None]) -> None:
    """Run ``check`` (its traffic, its fault and its assertions); if an assertion fails
    while the host stalled (:class:`HostStalls`), run it once more and let that run decide.
    A defect of the stack fails both runs; a failure without a stall is never retried. A
    1 s deadline missed on a 300 ms ceiling (CI, 2026-12-01) needed a pause of 0.7 s."""
    watch = HostStalls()
    try:
        with watch:
            check()
        return
    except AssertionError as e:
        if not watch.stalled:
            raise
        print(
            f"host stall during the check (paused {watch.longest:.2f} s, {watch.steal:.2f} s "
            f"of CPU stolen): {str(e)[:300]}; running it once more"
        )
    check()


def drive(
    stub: pb_grpc.RecommenderStub, users: list[str], when: Timestamp, seconds: float
) -> list[Outcome]:
    """Open loop: one Recommend every 1/RATE s for ``seconds``, deadlines alternating,
    whether earlier calls answered or not; waits for every answer."""
    out: list[Outcome] = []
    lock = threading.Lock()
    pending: list[Any] = []
    t_start = time.perf_counter()
    n = int(seconds * RATE)
    for i in range(n):
        due = t_start + i / RATE
        time.sleep(max(0.0, due - time.perf_counter()))
        deadline = DEADLINES_S[i % len(DEADLINES_S)]
        req = pb.RecommendRequest(
            user_id=users[i % len(users)], k=10, context=pb.Context(timestamp=when)
        )
        sent = time.perf_counter()
        fut = stub.Recommend.future(req, timeout=deadline)

        def done(f: Any, sent: float = sent, deadline: float = deadline) -> None:
            latency = time.perf_counter() - sent
            try:
                reply = f.result()
                o = Outcome(
                    sent - t_start,
                    deadline,
                    "OK",
                    latency,
                    tuple(reply.degraded),
                    len(reply.items),
                )
            except grpc.RpcError as e:
                o = Outcome(sent - t_start, deadline, e.code().name, latency)
            with lock:
                out.append(o)

        fut.add_done_callback(done)
        pending.append(fut)
    for fut in pending:
        with contextlib.suppress(grpc.RpcError):
            fut.result()
    time.sleep(0.05)  # callbacks run on gRPC's threads
    with lock:
        return sorted(out, key=lambda o: o.sent_s)


def dependencies(settings: Settings) -> dict[str, dict[str, Any]]:
    url = f"http://127.0.0.1:{settings.orchestrator_http_port}/healthz"
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "SERVING", body
    deps: dict[str, dict[str, Any]] = body["dependencies"]
    return deps


def grpc_health(stack: dict[str, Any]) -> int:
    reply = health_pb2_grpc.HealthStub(stack["channel"]).Check(
        health_pb2.HealthCheckRequest(service=""), timeout=2
    )
    return int(reply.status)


def under_fault(
    stack: dict[str, Any], users: list[str], when: Timestamp, fault: Any
) -> tuple[list[Outcome], dict[str, dict[str, Any]], int]:
    """Drive traffic for FAULT_S seconds inside ``fault``; also read /healthz and gRPC
    health while the fault holds."""
    with fault:
        outcomes = drive(stack["stub"], users, when, FAULT_S)
        deps = dependencies(stack["settings"])
        health = grpc_health(stack)
    return outcomes, deps, health


def check_answers(outcomes: list[Outcome], settings: Settings, reasons: set[str]) -> None:
    """Every call OK (so within its deadline; see below for 100 ms) with 10 items; within
    the ceiling but for a host hiccup or two; and once the breaker had time to open (the
    second half of the window), every answer degraded, nearly all with the fault's own
    reason, and fast."""
    ceiling = settings.latency_ceiling_ms / 1000
    failed = [o for o in outcomes if o.code != "OK"]
    # A 1 s deadline leaves 700 ms over the ceiling: not one may fail. A 100 ms deadline
    # leaves a host stall of a few tens of ms no room: one in 50 may arrive late (without
    # breakers and caps it was most of them), nothing may fail otherwise.
    assert not [o for o in failed if o.deadline_s > ceiling], failed
    assert {o.code for o in failed} <= {"DEADLINE_EXCEEDED"}, failed
    assert len(failed) <= 0.02 * len(outcomes), failed
    answered = [o for o in outcomes if o.code == "OK"]
    assert all(o.n_items == 10 for o in answered), [o for o in answered if o.n_items != 10]
    # A shared 2-core host can stall any process for a moment: 2 % may be late by more
    # than SLACK_S, measured at this (equally stalled) client.
    over = [o for o in outcomes if o.latency_s > ceiling + SLACK_S]
    assert len(over) <= 0.02 * len(outcomes), over
    late = [o for o in outcomes if o.sent_s >= FAULT_S / 2]
    assert all(o.degraded for o in late), [o for o in late if not o.degraded]
    own = [o for o in late if set(o.degraded) & reasons]
    assert len(own) >= 0.9 * len(late), [o.degraded for o in late if o not in own]
    # Once open, a breaker answers in microseconds: the fault no longer costs the budget.
    median = sorted(o.latency_s for o in late)[len(late) // 2]
    assert median < 0.05, median


def recovery_s(stack: dict[str, Any], users: list[str], when: Timestamp) -> float:
    """Seconds from now until full (not degraded) answers come back both for a user asked
    before (embedding cached: ranking only) and for new ones (user tower and ranking)."""
    t0 = time.perf_counter()
    fresh = iter(users[300:])
    done: set[str] = set()
    while time.perf_counter() - t0 < 30:
        for kind, user in (("cached", users[0]), ("new", next(fresh))):
            req = pb.RecommendRequest(user_id=user, k=10, context=pb.Context(timestamp=when))
            if not stack["stub"].Recommend(req, timeout=1.0).degraded:
                done.add(kind)
        if done == {"cached", "new"}:
            return time.perf_counter() - t0
        time.sleep(0.05)
    raise AssertionError(f"no full answers within 30 s of the fault's end (only {done})")


def assert_recovers(stack: dict[str, Any], users: list[str], when: Timestamp) -> None:
    settings: Settings = stack["settings"]
    took = recovery_s(stack, users, when)
    assert took < settings.breaker_cooldown_s + 2.0, took
    deps = dependencies(settings)
    assert all(d["state"] == "closed" for d in deps.values()), deps


def _pause_this_process(seconds: float) -> None:
    """A real host stall: another process SIGSTOPs this one and SIGCONTs it later."""
    pid = os.getpid()
    subprocess.Popen(["sh", "-c", f"kill -STOP {pid}; sleep {seconds}; kill -CONT {pid}"])
    time.sleep(seconds + 0.5)


def test_a_failed_check_runs_once_more_only_after_a_host_stall() -> None:
    runs: list[int] = []

    def late_once() -> None:
        runs.append(1)
        if len(runs) == 1:
            _pause_this_process(0.4)
            raise AssertionError("late")

    once_more_after_a_stall(late_once)
    assert len(runs) == 2

    def broken(stall: bool) -> Callable[[], None]:
        def check() -> None:
            runs.append(1)
            if stall:
                _pause_this_process(0.4)
            raise AssertionError("broken")

        return check

    for stall, tries in ((False, 1), (True, 2)):  # no stall: no second try; two fails: fail
        runs.clear()
        with pytest.raises(AssertionError, match="broken"):
            once_more_after_a_stall(broken(stall))
        assert len(runs) == tries


def test_healthy_baseline(stack: dict[str, Any], users: list[str], when: Timestamp) -> None:
    """Without a fault the same traffic is answered in full: the checks below measure
    the faults, not a stack that degrades anyway."""
    for user in users[:50]:  # warm: channels, caches, the first calls of each model
        req = pb.RecommendRequest(user_id=user, k=10, context=pb.Context(timestamp=when))
        stack["stub"].Recommend(req, timeout=5)

    def check() -> None:
        outcomes = drive(stack["stub"], users[:50], when, 1.0)
        assert {o.code for o in outcomes} == {"OK"}, [o for o in outcomes if o.code != "OK"]
        full = [o for o in outcomes if not o.degraded]
        assert len(full) >= 0.9 * len(outcomes), [o.degraded for o in outcomes if o.degraded][:5]
        assert all(d["state"] == "closed" for d in dependencies(stack["settings"]).values())

    once_more_after_a_stall(check)


def test_triton_hung(stack: dict[str, Any], users: list[str], when: Timestamp) -> None:
    """Half the users were asked before (their embedding is cached: they skip the tower
    and lose the ranker), half are new (they lose the tower): both breakers open."""
    s = stack["settings"]
    mixed = [u for pair in zip(users[:50], users[100:150], strict=True) for u in pair]

    def check() -> None:
        outcomes, deps, health = under_fault(stack, mixed, when, faults.triton_paused(s))
        check_answers(outcomes, s, {"retrieval_unavailable", "ranking_skipped"})
        assert health == health_pb2.HealthCheckResponse.SERVING
        triton = {k: v for k, v in deps.items() if k.startswith("triton:")}
        assert len(triton) == 2 and all(v["opened"] >= 1 for v in triton.values()), deps
        assert_recovers(stack, users, when)

    once_more_after_a_stall(check)


def test_online_store_locked(stack: dict[str, Any], users: list[str], when: Timestamp) -> None:
    s = stack["settings"]

    def check() -> None:
        outcomes, deps, health = under_fault(stack, users, when, faults.store_locked(s))
        check_answers(outcomes, s, {"features_unavailable"})
        assert health == health_pb2.HealthCheckResponse.SERVING
        assert deps["online_store:sqlite"]["state"] in ("open", "half_open"), deps
        assert_recovers(stack, users, when)

    once_more_after_a_stall(check)


def test_rank_model_unloaded(stack: dict[str, Any], users: list[str], when: Timestamp) -> None:
    s = stack["settings"]

    def check() -> None:
        tower_opened = {k: v["opened"] for k, v in dependencies(s).items() if "user_tower" in k}
        outcomes, deps, health = under_fault(stack, users, when, faults.model_unloaded(s, "rank"))
        check_answers(outcomes, s, {"ranking_skipped"})
        assert health == health_pb2.HealthCheckResponse.SERVING
        rank = [v for k, v in deps.items() if k.startswith("triton:rank_r")]
        assert rank and rank[0]["state"] in ("open", "half_open"), deps
        # The user tower was not touched: its breaker never opened.
        tower = {k: v["opened"] for k, v in deps.items() if "user_tower" in k}
        assert tower and tower == tower_opened, deps
        assert_recovers(stack, users, when)

    once_more_after_a_stall(check)


def test_store_lock_finds_the_store_feast_uses(trained_settings: Settings) -> None:
    """The fault reads feature_store.yaml without Feast (its import is slow): the same
    file as Feast's own config."""
    from exporters import feast_ops

    path = faults.online_store_path(trained_settings)
    assert path == Path(feast_ops.repo_config(trained_settings).online_store.path)

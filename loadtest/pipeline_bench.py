"""``recstack bench pipeline``: the orchestrator's request path in one thread, per stage, in
thread CPU time — the quick, repeatable measurement of issue 13 (docs/benchmark.md).

No load generator, no Triton, no event loop: the release (the live one, or ``--release``)
is loaded with its models in process (orchestrator/local_models.py, as the in-process
reference runs them), and ``RecommendService._recommend`` answers each of ``--users``
release users once per repeat, on empty user-embedding caches, at a fixed request time
(the release's data end). Per request it records the worker's CPU per stage (the
request clock's ``cpu_timings``), the worker's total, and the answer's own cost on the
event loop (metrics, event log, the gRPC response message). Each repeat reports means
over its users; the summary is the median and range over the repeats. Compare numbers
within one run: the machine is shared.

``--record FILE`` writes every answer (items in order, scores, sources, reasons,
degradation); ``--check FILE`` compares the answers with such a file (same items and
order, sources and reasons, scores within ``--tolerance``, same degradation) and exits
1 on any difference: the parity check of a change to the request path.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

# The per-request columns besides the stages: the worker's whole CPU, what no stage
# timed (request set-up, the candidate call's glue), and the answer on the event loop.
WORKER, OUTSIDE, ANSWER = "worker_total", "worker_outside_stages", "answer"
BENCH_DEADLINE_MS = 10_000.0  # every request's deadline here (the service's default: 80)


@dataclass(frozen=True)
class Answer:
    """One user's answer as the parity check compares it."""

    user_id: int
    item_ids: list[int]
    scores: list[float]
    sources: list[str]
    reasons: list[str]
    found: list[list[str]]
    degraded: list[str]
    cold_start: bool

    @classmethod
    def of(cls, user_id: int, result: Any) -> Answer:
        return cls(
            user_id,
            [i.item_id for i in result.items],
            [i.score for i in result.items],
            [i.source for i in result.items],
            [i.reason for i in result.items],
            [list(i.sources) for i in result.items],
            list(result.degraded),
            bool(result.cold_start),
        )


def differences(want: Answer, got: Answer, tolerance: float) -> list[str]:
    """What differs between two answers for one user ([] when they agree)."""
    out = []
    for name in ("item_ids", "sources", "reasons", "found", "degraded", "cold_start"):
        if getattr(want, name) != getattr(got, name):
            out.append(f"{name}: {getattr(want, name)} != {getattr(got, name)}")
    if want.item_ids == got.item_ids:
        gap = np.abs(np.asarray(want.scores) - np.asarray(got.scores))
        if len(gap) and gap.max() > tolerance:
            out.append(f"scores differ by up to {gap.max():.3g} (> {tolerance:g})")
    return out


def _release_users(settings: Settings, release_id: int, n: int, seed: int) -> np.ndarray:
    """``n`` of the release's users (its users file), drawn with ``seed``."""
    from exporters.release import load_manifest, release_dir

    manifest = load_manifest(settings, release_id)
    entry = manifest.get("users")
    if entry is None:
        raise UserError(f"release {release_id} has no user list to draw users from")
    users = np.load(release_dir(settings, release_id) / entry["file"])
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(users, size=min(n, len(users)), replace=False))


def _service(settings: Settings, release_id: int) -> Any:
    """The orchestrator's service over ``release_id`` with its models in process."""
    from orchestrator.budget import BudgetConfig
    from orchestrator.event_log import EventLog
    from orchestrator.local_models import InProcessModels
    from orchestrator.service import RecommendService, ServiceConfig
    from orchestrator.serving_release import ServingRelease

    # The bench measures CPU, not deadlines: a request descheduled on a busy host must not
    # skip a stage (its answer would differ from the recorded one).
    cfg = ServiceConfig(
        budget=BudgetConfig(default_ms=BENCH_DEADLINE_MS, ceiling_ms=BENCH_DEADLINE_MS)
    )
    rel = ServingRelease.load(settings, release_id)
    rel.triton.close()  # never called: the models run here
    rel.triton = InProcessModels.for_release(settings, release_id)  # type: ignore[assignment]
    rel.warm_up(cfg.n_ranked)
    return RecommendService(rel, cfg, settings.max_clock_lead_days, EventLog(None))


def run_once(svc: Any, users: np.ndarray, when: datetime) -> tuple[list[dict[str, float]], list]:
    """Each user once, on an empty user-embedding cache: per request the CPU ms of each
    stage, the worker's total, and the answer's; and the answers."""
    from orchestrator.budget import RequestClock
    from orchestrator.embedding_cache import EmbeddingCache
    from orchestrator.request import RecommendQuery
    from orchestrator.server import to_proto

    rel = svc.router.live
    rel.user_embeddings = EmbeddingCache(rel.user_embeddings.capacity)
    rows, results = [], []
    for user_id in users:
        q = RecommendQuery(user_id=int(user_id), k=10, timestamp=when)
        clock = RequestClock(None, svc.cfg.budget)
        with svc._queue_lock:
            svc._queued += 1  # as recommend() counts it before the worker takes it
        c0 = time.thread_time()
        result = svc._recommend(q, clock, rel)
        c1 = time.thread_time()
        svc._answered(q, result)
        to_proto(result).SerializeToString()
        c2 = time.thread_time()
        row = dict(clock.cpu_timings)
        row[WORKER] = (c1 - c0) * 1000
        row[OUTSIDE] = row[WORKER] - sum(clock.cpu_timings.values())
        row[ANSWER] = (c2 - c1) * 1000
        rows.append(row)
        results.append(result)
    return rows, results


def summarise(repeats: list[list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per column: the median and range over repeats of each repeat's mean over requests
    (a stage a request did not run counts 0 for it)."""
    columns = sorted({c for rows in repeats for row in rows for c in row})
    out = {}
    for c in columns:
        means = [float(np.mean([row.get(c, 0.0) for row in rows])) for rows in repeats]
        out[c] = {
            "median": round(float(np.median(means)), 4),
            "min": round(min(means), 4),
            "max": round(max(means), 4),
        }
    return out


def _table(summary: dict[str, dict[str, float]]) -> str:
    lines = ["| CPU ms / request | median | range |", "| --- | --- | --- |"]
    for c, v in summary.items():
        lines.append(f"| {c} | {v['median']:.3f} | {v['min']:.3f}–{v['max']:.3f} |")
    return "\n".join(lines)


def cli(args: argparse.Namespace) -> int:
    """``recstack bench pipeline [--users N] [--repeats R] [--record F | --check F]``."""
    if args.users < 1 or args.repeats < 1:
        raise UserError("--users and --repeats must be at least 1")
    if args.tolerance < 0:
        raise UserError("--tolerance must be >= 0")
    settings = get_settings()
    from loadtest.reference import reference_release_id

    rid = reference_release_id(settings, args.release)
    users = _release_users(settings, rid, args.users, args.seed)
    t0 = time.perf_counter()
    svc = _service(settings, rid)
    log.info("release %d loaded in %.1f s; %d users", rid, time.perf_counter() - t0, len(users))
    when = datetime.fromtimestamp(svc.router.live.data_end, UTC)
    # Start-up garbage is long-lived, as in the server (orchestrator/server.py).
    gc.collect()
    gc.freeze()
    run_once(svc, users[: min(50, len(users))], when)  # first-touch costs out of the way
    repeats, answers = [], []
    for _ in range(args.repeats):
        rows, results = run_once(svc, users, when)
        repeats.append(rows)
        answers = [Answer.of(int(u), r) for u, r in zip(users, results, strict=True)]
    summary = summarise(repeats)
    print(_table(summary))
    report: dict[str, Any] = {"release": rid, "users": len(users), "repeats": args.repeats}
    report["cpu_ms"] = summary
    status = 0
    if args.check:
        recorded = json.loads(Path(args.check).read_text())["answers"]
        want = {a["user_id"]: Answer(**a) for a in recorded}
        bad = 0
        for got in answers:
            if got.user_id not in want:
                raise UserError(f"{args.check} has no answer for user {got.user_id}")
            diff = differences(want[got.user_id], got, args.tolerance)
            if diff:
                bad += 1
                if bad <= 5:
                    print(f"user {got.user_id}: " + "; ".join(diff))
        print(f"parity: {len(answers) - bad} of {len(answers)} answers equal {args.check}")
        report["parity_differences"] = bad
        status = 1 if bad else 0
    if args.record:
        report["answers"] = [a.__dict__ for a in answers]
        Path(args.record).write_text(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps({k: v for k, v in report.items() if k != "answers"}))
    svc.pool.shutdown(wait=True)
    svc.router.live.close()
    return status

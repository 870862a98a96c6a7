"""The Recommend pipeline (DESIGN.md "Request path") under a deadline, with degradation.

user features (Feast) -> user_tower (Triton) -> FAISS -> filters -> item features (snapshot)
-> rank ensemble (Triton) -> post-processing. Each request runs as plain synchronous code
on a worker thread (FAISS, numpy and the gRPC clients release the GIL), so the asyncio loop
that serves gRPC and HTTP never blocks; the loop waits for it at most until the deadline
and answers with popular items if it does not finish in time.

Degradation, always flagged in the response and counted in metrics:
- Feast down: the user is served as cold start (``features_unavailable``);
- user_tower failed or over budget: popular items in the user's categories
  (``retrieval_unavailable``);
- rank ensemble failed or no budget left: retrieval order (``ranking_skipped``);
- whole request over the deadline: popular items (``deadline_exceeded``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exporters.candidates import gather, source_names
from orchestrator import metrics
from orchestrator.budget import BudgetConfig, RequestClock
from orchestrator.catalog import Catalog, Fallbacks
from orchestrator.online_features import FeatureStoreUnavailable
from orchestrator.postprocess import Candidates, reasons, select
from orchestrator.request import EventQuery, RecommendQuery
from orchestrator.serving_release import ServingRelease, UserView
from orchestrator.triton_client import TritonError

log = logging.getLogger(__name__)


class ServiceUnavailable(Exception):
    """Nothing sensible can be answered (e.g. no release loaded, or the feature store did
    not take an event); gRPC UNAVAILABLE, HTTP 503 with Retry-After: the client may retry."""


class UnknownItem(LookupError):
    """An event for an item the serving catalog does not hold; gRPC NOT_FOUND, HTTP 404.
    Such an item cannot be recommended or filtered, so it must not enter a user's recent
    items (where it would push out real ones)."""


def _event_failure(err: Exception) -> str:
    """The ``reason`` label of a RecordEvent the store did not take."""
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, FeatureStoreUnavailable):
        return "unavailable"
    return "error"


@dataclass(frozen=True)
class RecItem:
    item_id: int
    score: float
    rank: int
    reason: str
    source: str


@dataclass
class RecommendResult:
    items: list[RecItem]
    release: str
    timings: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    cold_start: bool = False


@dataclass(frozen=True)
class ServiceConfig:
    n_candidates: int = 500  # retrieved from FAISS per request
    n_ranked: int = 300  # of those, sent to the ranker (the budget's biggest item)
    # Requests worked on at once (RECSTACK_ORCHESTRATOR_WORKERS). Each spends most of
    # its time waiting on Triton or in FAISS/numpy (GIL released), so a few threads keep
    # 2 cores busy; 8 measured no better at 100/s (docs/benchmark.md).
    workers: int = 4
    budget: BudgetConfig = field(default_factory=BudgetConfig)


class RecommendService:
    """Serves one release; thread-safe (state is read-only after construction)."""

    def __init__(
        self,
        release: ServingRelease,
        cfg: ServiceConfig | None = None,
        clock_lead_days: float = 7.0,
    ) -> None:
        self.release = release
        self.cfg = cfg or ServiceConfig()
        self.pool = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="recommend")
        self.clock_lead_s = clock_lead_days * 86_400.0
        metrics.set_release(self.release_name)

    @classmethod
    async def create(cls, settings: Any, cfg: ServiceConfig | None = None) -> RecommendService:
        """Load the newest release (index, catalog, clients) off the event loop."""
        cfg = cfg or ServiceConfig(workers=settings.orchestrator_workers)
        release = await asyncio.to_thread(ServingRelease.load, settings)
        try:
            await asyncio.to_thread(release.warm_up, cfg.n_ranked)
        except TritonError as e:
            # Serve anyway (degraded) rather than refuse to start: Triton may come later.
            log.warning("warm-up failed, starting degraded: %s", e)
        return cls(release, cfg, settings.max_clock_lead_days)

    @property
    def release_name(self) -> str:
        return str(self.release.release_id)

    @property
    def catalog(self) -> Catalog:
        return self.release.catalog

    @property
    def fallbacks(self) -> Fallbacks:
        return self.release.fallbacks

    async def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.release.close()

    # ----------------------------------------------------------------- async entry points
    async def recommend(self, q: RecommendQuery, deadline_s: float | None) -> RecommendResult:
        """Answer within the deadline, degrading rather than failing."""
        clock = RequestClock(deadline_s, self.cfg.budget)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.pool, self._recommend, q, clock)
        try:
            wait = max(clock.remaining(), 0.0) + clock.cfg.reserve_ms / 2000
            result = await asyncio.wait_for(asyncio.shield(fut), timeout=wait)
        except TimeoutError:
            result = self._fallback(q, clock, ["deadline_exceeded"], None)
        else:  # the worker is done with the clock: its CPU times are final
            for stage, ms in clock.cpu_timings.items():
                metrics.STAGE_CPU_SECONDS.labels(stage).observe(ms / 1000)
        for stage, ms in result.timings.items():
            metrics.STAGE_SECONDS.labels(stage).observe(ms / 1000)
        for reason in result.degraded:
            metrics.DEGRADED.labels(reason).inc()
        if result.cold_start:
            metrics.COLD_START.inc()
        return result

    async def record_event(self, e: EventQuery, deadline_s: float | None) -> None:
        """Push a real-time signal to Feast (visible to the next lookup).

        Raises :class:`UnknownItem` for an item outside the serving catalog and
        :class:`ServiceUnavailable` when the store fails, times out or is down (one log
        line each, counted in ``recstack_event_failures_total``; no traceback)."""
        _, known = self.catalog.rows(np.asarray([e.item_id], dtype=np.int64))
        if not known[0]:
            raise UnknownItem(f"item_id {e.item_id} is not in the serving catalog")
        timeout = 2.0 if deadline_s is None else max(deadline_s, 0.0)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.pool, self.release.features.push_event, e)
        try:
            await asyncio.wait_for(fut, timeout=timeout)
        except Exception as err:  # the event is not stored, whatever the cause: retryable
            reason = _event_failure(err)
            metrics.EVENT_FAILURES.labels(reason).inc()
            log.warning("RecordEvent not stored (%s): %s: %s", reason, type(err).__name__, err)
            raise ServiceUnavailable(
                f"the feature store did not take the event ({reason}); retry later"
            ) from None
        metrics.EVENTS.labels(e.event).inc()

    def feature_time(self, q: RecommendQuery) -> float:
        """The clock of time-relative features (item age, recency) and of "not yet
        created": the request's time, but never later than the release's data end plus
        ``max_clock_lead_days`` — a release trained on 1998 data asked in 2026 (a replay,
        a stale deployment) scores as of its data, not 10,000 days later. Clients that
        replay history pass the request's ``timestamp``."""
        return min(q.timestamp.timestamp(), self.release.data_end + self.clock_lead_s)

    # ----------------------------------------------------------------- the pipeline
    def _recommend(self, q: RecommendQuery, clock: RequestClock) -> RecommendResult:
        if clock.remaining() <= 0:
            # Waited in the queue past its deadline (overload): answer cheaply instead of
            # spending model time on a reply nobody can use; the backlog drains faster.
            return self._fallback(q, clock, ["load_shed"], None)
        degraded: list[str] = []
        rel = self.release
        now = self.feature_time(q)

        with clock.stage("user_features"):
            try:
                user = rel.features.user(q.user_id)
            except Exception as e:  # the store's typed errors and anything below it
                log.warning("user features failed: %s", e)
                degraded.append("features_unavailable")
                user = None
        if user is None or not user.known:
            return self._fallback(q, clock, degraded, user, cold_start=True)

        with clock.stage("user_tower"):
            budget = clock.budget("user_tower")
            embedding = None
            if budget > 0:
                try:
                    embedding = rel.user_embedding(user, timeout_s=budget)
                except TritonError as e:
                    log.warning("user_tower failed: %s", e)
        if embedding is None:
            degraded.append("retrieval_unavailable")
            return self._fallback(q, clock, degraded, user)

        with clock.stage("retrieval"):
            _, ids = rel.index.search(
                np.asarray(embedding, dtype=np.float32), self.cfg.n_candidates
            )
            ids = ids[0]
            ann_rows, known = self.catalog.rows(ids[ids >= 0])
            ann_rows = ann_rows[known]
        with clock.stage("filter"):
            seen = user.seen_items
            created = self.catalog.created_at

            def allowed(rows: np.ndarray) -> np.ndarray:
                return self.catalog.allowed(rows, q.filters, seen) & (created[rows] <= now)

            if rel.sources is not None:
                seen_rows, seen_known = self.catalog.rows(seen)
                seen_rows = np.where(seen_known, seen_rows, -1)
                rows, source_feats = gather(
                    rel.sources, rel.quotas, ann_rows, seen_rows, allowed, now
                )
                sources = source_names(source_feats)
            else:  # a release from before multi-source candidates: the ANN alone
                rows = ann_rows[allowed(ann_rows)][: self.cfg.n_ranked]
                source_feats = None
                sources = np.full(len(rows), "retrieval", dtype=object)
        if len(rows) == 0:
            degraded.append("no_retrieval_candidates")
            return self._fallback(q, clock, degraded, user)

        # Without the ranker: the merged order (ANN first, then the other sources).
        final_scores = -np.arange(len(rows), dtype=np.float64)
        with clock.stage("item_features"):
            item_ids = self.catalog.item_ids[rows]
            items = rel.features.items(item_ids)
        with clock.stage("ranking"):
            budget = clock.budget("ranking")
            if budget <= 0.001:
                degraded.append("ranking_skipped")
            else:
                inputs = user.rank_inputs(
                    embedding, items, self.catalog.embeddings[rows], now, source_feats
                )
                try:
                    final_scores = rel.triton.rank(inputs, timeout_s=budget).astype(np.float64)
                except TritonError as e:
                    log.warning("rank failed: %s", e)
                    degraded.append("ranking_skipped")

        with clock.stage("postprocess"):
            cands = Candidates(
                item_ids,
                final_scores,
                self.catalog.category[rows],
                self.catalog.created_at[rows],
                sources,
            )
            result = self._finish(q, cands, user, now)
        result.timings = clock.timings
        result.degraded = degraded
        return result

    def _finish(
        self, q: RecommendQuery, cands: Candidates, user: UserView | None, now: float
    ) -> RecommendResult:
        top, final = select(cands, q.k, now, self.release.post)
        recent = list(user.recent_items) if user is not None else []
        rrows, rknown = self.catalog.rows(np.asarray(recent, dtype=np.int64))
        recent_cats = np.where(rknown, self.catalog.category[rrows], -1).tolist()
        why = reasons(top, recent, recent_cats)
        items = [
            RecItem(int(i), float(s), r + 1, why[r], str(src))
            for r, (i, s, src) in enumerate(zip(top.item_ids, final, top.sources, strict=True))
        ]
        return RecommendResult(items=items, release=self.release_name)

    def _fallback(
        self,
        q: RecommendQuery,
        clock: RequestClock,
        degraded: list[str],
        user: UserView | None,
        cold_start: bool = False,
    ) -> RecommendResult:
        """Popular and fresh items (filtered), leaning to the user's categories if known."""
        t0 = time.perf_counter()
        now = self.feature_time(q)
        seen = user.seen_items if user is not None else np.zeros(0, dtype=np.int64)
        rows, scores, sources = self.fallbacks.candidates(
            self.catalog, q.filters, seen, max(4 * q.k, 50), now
        )
        if user is not None and user.affinity is not None and len(user.affinity):
            # Known user without a model answer: prefer the categories they engage with.
            aff = np.asarray(user.affinity, dtype=np.float64)
            cats = self.catalog.category[rows]
            scores = scores + np.where(cats < len(aff), aff[np.minimum(cats, len(aff) - 1)], 0)
        cands = Candidates(
            self.catalog.item_ids[rows],
            scores,
            self.catalog.category[rows],
            self.catalog.created_at[rows],
            sources,
        )
        result = self._finish(q, cands, user, now)
        result.timings = dict(clock.timings)
        result.timings["fallback"] = (time.perf_counter() - t0) * 1000
        result.degraded = degraded
        result.cold_start = cold_start
        return result

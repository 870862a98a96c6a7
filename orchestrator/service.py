"""The Recommend pipeline (DESIGN.md "Request path") under a deadline, with degradation.

user features (Feast) -> user_tower (Triton) -> FAISS -> filters -> item features (snapshot)
-> rank ensemble (Triton) -> post-processing. Each request runs as plain synchronous code
on a worker thread (FAISS, numpy and the gRPC clients release the GIL), so the asyncio loop
that serves gRPC and HTTP never blocks; the loop waits for it at most until the deadline
and answers with popular items if it does not finish in time.

Cold start: a user without history (no row in the store, or a profile without events)
gets popular and fresh items, the popular ones of the user's segment (country, age
bucket) when the release has a list for it (exporters/candidates.py; the response's
``fallback_segment``; docs/architecture.md "Cold start").

Degradation, always flagged in the response and counted in metrics
(``recstack_degraded_total{reason}``); an error in a stage is one log line, never INTERNAL:
- Feast down: the user is served as cold start (``features_unavailable``);
- the store has no row for a user of the release's data (a wiped or restarted-empty
  store): served as cold start, flagged (``features_missing``; orchestrator/store_watch.py);
- user_tower failed or over budget, or retrieval/filtering raised (e.g. a NaN embedding):
  popular items in the user's categories (``retrieval_unavailable``);
- the filters left no candidate: fallbacks under the same filters
  (``no_retrieval_candidates``);
- item features or the rank ensemble failed, or no budget left: retrieval order
  (``ranking_skipped``);
- with ``RECSTACK_MODEL_FALLBACK=in_process``, a Triton failure of the user tower or the
  rank ensemble is answered by the release's same models in this process instead
  (``user_tower_in_process``, ``ranking_in_process``; orchestrator/local_models.py);
- the work overran the deadline: popular items (``deadline_exceeded``);
- the request waited in the queue past its deadline (overload): popular items, and the
  queued work is dropped (``load_shed``);
- anything else raised below the stages' own handlers: popular items (``internal_error``).

Releases: the service holds a :class:`ReleaseRouter` that follows the release state
(live release, A/B arms). Each request picks its release once, by a stable hash of the
user id, and every stage of it uses that release (``rel``) — never a user tower of one
release with the index or ranker of another.

Triton stages wait at most their absolute caps, the whole request at most the latency
ceiling (orchestrator/budget.py), and a dependency whose circuit breaker is open
(orchestrator/breaker.py, docs/faults.md) fails at once: the same reasons, in microseconds.

The item side (snapshot, catalog, fallbacks) is refreshed in the background every
``feature_refresh_s`` after a Feast materialisation; each request reads it once
(``release.items``), so it sees one snapshot throughout.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from exporters.candidates import exists_at, found_names, gather_found, source_names
from exporters.item_delta import NewItems
from exporters.schema import CONTEXT_COLUMNS
from orchestrator import metrics
from orchestrator import recommender_pb2 as pb
from orchestrator.breaker import BreakerConfig, Breakers, CircuitOpen
from orchestrator.budget import BudgetConfig, RequestClock, answer_within
from orchestrator.catalog import Catalog, Fallbacks
from orchestrator.event_log import EventLog, new_request_id
from orchestrator.local_models import InProcessModels
from orchestrator.online_features import FeatureStoreUnavailable
from orchestrator.postprocess import Candidates, reasons, select
from orchestrator.release_router import ReleaseRouter
from orchestrator.request import EventQuery, RecommendQuery
from orchestrator.serving_release import ItemState, ServingRelease, UserView
from orchestrator.triton_client import TritonError, TritonInvalidInput
from recstack.errors import UserError

log = logging.getLogger(__name__)


# How long a RecordEvent without a client deadline (HTTP) may take (then the ceiling caps it).
EVENT_DEFAULT_S = 2.0
# Threads for RecordEvent's store pushes (they take turns on the store's own lock anyway).
EVENT_WORKERS = 2


# Answers without a user, or for one without history, are reused for this many seconds
# (per filters, k, cold-start segment and snapshot).
ANONYMOUS_ANSWER_S = 60
GLOBAL_SEGMENT = "global"  # fallback_segment when no segment list fits
SEGMENT_WORDS = {"country": "country", "age_bucket": "age group"}


SERVICE_TIME_EWMA = 0.05


def should_shed(queued: int, workers: int, service_s: float, remaining_s: float) -> bool:
    """Shed a new request at once when the requests queued ahead of it, worked off by
    ``workers`` at ``service_s`` each, take longer than the time it has left. Only past a
    full round of queued work: a short queue is never shed on an estimate."""
    if queued < workers:
        return False
    return queued * service_s / workers > remaining_s


class ServiceUnavailable(Exception):
    """Nothing sensible can be answered (e.g. no release loaded, or the feature store did
    not take an event); gRPC UNAVAILABLE, HTTP 503 with Retry-After: the client may retry."""


class UnknownItem(LookupError):
    """An event for an item the serving catalog does not hold; gRPC NOT_FOUND, HTTP 404.
    Such an item cannot be recommended or filtered, so it must not enter a user's recent
    items (where it would push out real ones)."""


def _stage_failed(stage: str, err: Exception) -> None:
    """One log line per failed stage; a call refused by an open circuit breaker is not
    logged per request (the breaker logs its state changes)."""
    if isinstance(err, CircuitOpen) or isinstance(err.__cause__, CircuitOpen):
        return
    log.warning("%s failed: %s: %s", stage, type(err).__name__, err)


def _in_process(
    rel: ServingRelease,
    err: Exception,
    stage: str,
    degraded: list[str],
    run: Callable[[InProcessModels], np.ndarray],
) -> np.ndarray | None:
    """The stage's answer from the release's in-process models when Triton failed
    (``settings.model_fallback``), flagged ``<stage>_in_process``; None without them, or
    when the failure was the request's own inputs (they would fail here too)."""
    if rel.local is None or isinstance(err, TritonInvalidInput):
        return None
    try:
        out = run(rel.local)
    except Exception as e:
        log.warning("%s in process failed too: %s: %s", stage, type(e).__name__, e)
        return None
    degraded.append(f"{stage}_in_process")
    return out


def _event_failure(err: Exception) -> str:
    """The ``reason`` label of a RecordEvent the store did not take."""
    if isinstance(err, TimeoutError):
        return "timeout"
    if isinstance(err, FeatureStoreUnavailable):
        return "unavailable"
    return "error"


# An answered item's fields: the .proto's Item message names them, and RecItem has one
# attribute per field, so the gRPC and HTTP answers and the event log cannot drift apart.
ITEM_FIELDS = tuple(pb.Item.DESCRIPTOR.fields_by_name)


@dataclass(frozen=True)
class RecItem:
    item_id: int
    score: float
    rank: int
    reason: str
    source: str
    # Every candidate source that proposed it (exporters.candidates.SOURCES names, merge
    # order; a fallback's own list otherwise), and whether the ranker ordered it.
    sources: tuple[str, ...] = ()
    ranked: bool = False
    # The client's id (the imported key, e.g. a SKU); "" = the decimal digits of item_id.
    item_key: str = ""

    def served(self) -> dict[str, Any]:
        """The item as answers carry it: one entry per .proto Item field, JSON-ready (the
        one place that builds it: server.to_proto/to_json, event_log.served_record)."""
        out = {name: getattr(self, name) for name in ITEM_FIELDS}
        out["sources"] = list(self.sources)
        out["item_key"] = self.item_key or str(self.item_id)
        return out


@dataclass
class RecommendResult:
    items: list[RecItem]
    release: str
    timings: dict[str, float] = field(default_factory=dict)
    degraded: list[str] = field(default_factory=list)
    cold_start: bool = False
    # Names this answer in the event log; clients send it back with their events.
    request_id: str = field(default_factory=new_request_id)
    # Fallback answers: the segment whose popular list was served ("global": none).
    fallback_segment: str = ""


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
    """Serves the releases of its router; thread-safe: a request reads the routing table
    once and its release's item state once (both are replaced whole, never mutated)."""

    def __init__(
        self,
        release: ServingRelease | ReleaseRouter,
        cfg: ServiceConfig | None = None,
        clock_lead_days: float = 7.0,
        event_log: EventLog | None = None,
    ) -> None:
        # A bare release (tests, benchmarks) is served alone, with no state to follow.
        self.router = (
            release if isinstance(release, ReleaseRouter) else ReleaseRouter.fixed(release)
        )
        self.event_log = event_log or EventLog(None)  # what was served / done (disabled: None)
        self.cfg = cfg or ServiceConfig()
        self.pool = ThreadPoolExecutor(self.cfg.workers, thread_name_prefix="recommend")
        # RecordEvent's store pushes have threads of their own: behind Recommend's workers,
        # a hung Triton (each worker waiting out its stage cap) made events time out
        # UNAVAILABLE although the store was fine.
        self.event_pool = ThreadPoolExecutor(EVENT_WORKERS, thread_name_prefix="event")
        self.clock_lead_s = clock_lead_days * 86_400.0
        self._tasks: list[asyncio.Task[None]] = []
        # Requests submitted and not yet picked up by a worker, and the workers' time per
        # request (moving average): together they say whether a new request can start in
        # time (should_shed).
        self._queue_lock = threading.Lock()
        self._queued = 0
        self._service_s = 0.010
        # One item ingestion at a time: its "ids are new" check holds until it is applied.
        self._items_lock = threading.Lock()
        metrics.ITEM_SNAPSHOT_AGE.set_function(self._snapshot_age)
        self._export_snapshot_time()

    @classmethod
    async def create(cls, settings: Any, cfg: ServiceConfig | None = None) -> RecommendService:
        """Load the releases the release state serves (index, catalog, clients; warmed up)
        off the event loop, then follow the state, watch Triton's pinned versions and
        refresh the item snapshot in the background."""
        cfg = cfg or ServiceConfig(
            workers=settings.orchestrator_workers, budget=BudgetConfig.from_settings(settings)
        )
        # One breaker per dependency, shared by every release this service holds.
        breakers = Breakers(BreakerConfig.from_settings(settings), on_change=metrics.breaker_event)
        router = ReleaseRouter(
            settings,
            loader=lambda s, rid: ServingRelease.load(s, rid, breakers),
            warm_rows=cfg.n_ranked,
        )
        await router.sync()  # raises UserError when nothing can be served
        svc = cls(router, cfg, settings.max_clock_lead_days, EventLog.from_settings(settings))
        svc.start_refresh(settings.feature_refresh_s)
        svc.start_watch(settings.release_watch_s, settings.triton_watch_s)
        svc.start_new_items_watch(settings.new_items_watch_s)
        return svc

    @property
    def release(self) -> ServingRelease:
        """The live release (A/B arms aside): events, health and fallbacks of last resort."""
        return self.router.live

    @property
    def release_name(self) -> str:
        return str(self.release.release_id)

    @property
    def catalog(self) -> Catalog:
        return self.release.catalog

    def dependencies(self) -> dict[str, dict[str, Any]]:
        """Each dependency's circuit breaker (state, failures), for health details."""
        return self.release.breakers.snapshot()

    @property
    def fallbacks(self) -> Fallbacks:
        return self.release.fallbacks

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self.pool.shutdown(wait=True, cancel_futures=False)
        self.event_pool.shutdown(wait=True, cancel_futures=False)
        self.event_log.close()
        for rel in self.router.served():
            rel.close()

    # ----------------------------------------------------------------- release changes
    def start_watch(self, state_every_s: float, triton_every_s: float) -> None:
        """Follow the release state file (a change is applied within ``state_every_s``)
        and re-pin Triton models that went missing (every ``triton_every_s``; 0: never)."""
        if not self.router.follows_state:
            return
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._watch_state(state_every_s), name="state"))
        if triton_every_s > 0:
            self._tasks.append(
                loop.create_task(self._watch_triton(triton_every_s), name="triton-pins")
            )

    async def _watch_state(self, every_s: float) -> None:
        from exporters.release_state import state_mtime

        settings = self.router.settings
        seen = state_mtime(settings)
        while True:
            await asyncio.sleep(every_s)
            mtime = await asyncio.to_thread(state_mtime, settings)
            if mtime != seen:
                seen = mtime
                await self.sync_releases()

    def releases(self) -> dict[str, Any]:
        """What serves (revision, arms, loaded releases, in flight, last change)."""
        return self.router.describe()

    async def sync_releases(self) -> bool:
        """Apply the release state now (the admin API's reload); True if it changed."""
        try:
            return await self.router.sync()
        except Exception as e:  # never take the watcher down
            log.error("release sync failed: %s: %s", type(e).__name__, e)
            return False

    async def _watch_triton(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await asyncio.to_thread(self.router.check_triton)
            except Exception as e:
                log.warning("Triton pin check failed: %s: %s", type(e).__name__, e)

    # ----------------------------------------------------------------- items added since
    def apply_new_items(self) -> dict[str, int]:
        """Apply every served release's new delta segments now; segments per release."""
        return {str(rel.release_id): rel.apply_new_items() for rel in self.router.served()}

    def start_new_items_watch(self, every_s: float) -> None:
        """Poll the served releases' ``new_items/`` folders (another replica, or
        ``recstack items`` with no orchestrator answering, may have written a segment)."""
        if every_s > 0:
            self._tasks.append(
                asyncio.get_running_loop().create_task(
                    self._new_items_every(every_s), name="new-items"
                )
            )

    async def _new_items_every(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await asyncio.to_thread(self.apply_new_items)
            except Exception as e:  # never take the watcher down
                log.warning("new-item segments not applied: %s: %s", type(e).__name__, e)

    def add_items(self, items: NewItems) -> dict[str, Any]:
        """Embed ``items`` with each served release's item tower (A/B arms each their
        own), persist a segment per release, apply them; every check (ids new to every
        release) passes before the first write. Blocking: call it off the event loop."""
        from exporters.item_delta import add_to_release, refuse_known

        with self._items_lock:
            return self._add_items(items, add_to_release, refuse_known)

    def _add_items(self, items: NewItems, add_to_release: Any, refuse_known: Any) -> dict[str, Any]:
        served = self.router.served()
        for rel in served:
            if rel.delta_dir is None:
                raise UserError(f"release {rel.release_id} keeps no new items (no folder)")
            refuse_known(items, rel.catalog.contains, rel.release_id)
        written = {}
        t0 = time.perf_counter()
        for rel in served:
            path = add_to_release(
                rel.delta_dir,  # type: ignore[arg-type]  # checked above
                rel.manifest,
                items,
                rel.catalog.contains,
                lambda inputs, rel=rel: rel.triton.item_embedding(inputs, timeout_s=60.0),
                rel.triton.item_batch(),
            )
            written[str(rel.release_id)] = path.name
        t1 = time.perf_counter()
        self.apply_new_items()
        t2 = time.perf_counter()
        log.info(
            "%d items added to releases %s: embedded and written in %.3f s, applied in %.3f s",
            len(items),
            sorted(written),
            t1 - t0,
            t2 - t1,
        )
        seconds = {"embed_and_write": round(t1 - t0, 4), "apply": round(t2 - t1, 4)}
        return {"added": len(items), "segments": written, "seconds": seconds}

    def probe_items(self, item_ids: np.ndarray) -> dict[str, list[int]]:
        """Per served release, which of ``item_ids`` its retrieval finds now for a query
        equal to the item's own vector (the index and the added items searched as a
        request searches them, ``n_candidates`` deep, unavailable items left out): a
        check that an item is live, for `recstack bench items` at any catalog size."""
        out = {}
        for rel in self.router.served():
            state = rel.items  # one state, as a request reads it
            catalog = state.catalog
            rows, known = catalog.rows(item_ids)
            ids, rows = item_ids[known], rows[known]
            found = np.zeros(len(ids), dtype=bool)
            if len(ids):
                _, hits = rel.search(state, catalog.vectors(rows), self.cfg.n_candidates)
                found = (hits == ids[:, None]).any(axis=1)
                found &= ~np.isin(rows, catalog.unavailable_rows)
            out[str(rel.release_id)] = [int(i) for i in ids[found]]
        return out

    def mark_items(
        self, item_ids: np.ndarray, kind: str, given: Sequence[object] | None = None
    ) -> dict[str, Any]:
        """Mark items ``unavailable`` (out of stock) or ``available`` again in every
        served release, persisted and applied before this returns (``given``: the ids as
        the client wrote them, for the error)."""
        from exporters.item_delta import mark, refuse_unknown

        with self._items_lock:
            served = self.router.served()
            for rel in served:
                if rel.delta_dir is None:
                    raise UserError(f"release {rel.release_id} keeps no new items (no folder)")
            refuse_unknown(item_ids, {r.release_id: r.catalog.contains for r in served}, given)
            written = {
                str(rel.release_id): mark(
                    rel.delta_dir,  # type: ignore[arg-type]  # checked above
                    rel.release_id,
                    item_ids,
                    kind,
                    rel.catalog.contains,
                ).name
                for rel in served
            }
            self.apply_new_items()
            return {kind: len(np.unique(item_ids)), "segments": written}

    # ----------------------------------------------------------------- item snapshot refresh
    def refresh_features(self) -> bool:
        """Swap in a new item snapshot (with its catalog and fallbacks) in every served
        release if Feast materialised since the current one; True if swapped. A failure
        keeps the old snapshot (one log line, counted): serving must not depend on it."""
        try:
            changed = False
            for rel in self.router.served():
                changed = rel.refresh_items() or changed
        except Exception as e:
            metrics.ITEM_SNAPSHOT_REFRESHES.labels("failed").inc()
            log.warning(
                "item snapshot refresh failed, keeping the old one: %s: %s", type(e).__name__, e
            )
            return False
        metrics.ITEM_SNAPSHOT_REFRESHES.labels("reloaded" if changed else "unchanged").inc()
        self._export_snapshot_time()
        return changed

    def start_refresh(self, interval_s: float) -> None:
        """Check for a new materialisation every ``interval_s`` seconds on a background
        task of the running loop (the reload itself runs on a thread); 0 disables it."""
        if interval_s > 0:
            self._tasks.append(
                asyncio.get_running_loop().create_task(
                    self._refresh_every(interval_s), name="item-snapshot-refresh"
                )
            )

    async def _refresh_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.refresh_features)

    def _live_items(self) -> ItemState | None:
        return getattr(self.release, "items", None) if self.router.table is not None else None

    def _snapshot_age(self) -> float:
        items = self._live_items()
        return time.time() - items.loaded_at if items is not None else float("nan")

    def _export_snapshot_time(self) -> None:
        items = self._live_items()
        if items is not None:
            metrics.ITEM_SNAPSHOT_MATERIALIZED.set(items.materialized_until)

    # ----------------------------------------------------------------- async entry points
    async def recommend(self, q: RecommendQuery, deadline_s: float | None) -> RecommendResult:
        """Answer within the deadline, degrading rather than failing."""
        clock = RequestClock(deadline_s, self.cfg.budget)
        rel = self.router.acquire(str(q.user_id))  # this request's release, end to end
        if should_shed(self._queued, self.cfg.workers, self._service_s, clock.remaining()):
            # The queue ahead cannot be worked off in time: answer now, while it is cheap,
            # instead of all at once at the ceiling (a burst's fallbacks would then queue
            # on the event loop and arrive late).
            self.router.done(rel)
            return self._answered(q, self._fallback(q, clock, ["load_shed"], None, rel.items, rel))
        loop = asyncio.get_running_loop()
        with self._queue_lock:
            self._queued += 1
        try:
            fut = loop.run_in_executor(self.pool, self._recommend, q, clock, rel)
        except BaseException:
            with self._queue_lock:
                self._queued -= 1
            self.router.done(rel)
            raise
        # Counted in flight until the worker is done with it (also after a timeout): the
        # router closes a retired release only when nothing uses it.
        fut.add_done_callback(lambda _: self.router.done(rel))
        try:
            wait = max(clock.remaining(), 0.0) + clock.cfg.reserve_ms / 2000
            result = await asyncio.wait_for(asyncio.shield(fut), timeout=wait)
        except TimeoutError:
            if clock.worker_started is None:
                # Still queued behind other requests (overload): take it off the queue, so
                # the backlog drains instead of doing work nobody will read.
                if fut.cancel():
                    with self._queue_lock:
                        self._queued -= 1
                reason = "load_shed"
            else:
                reason = "deadline_exceeded"
            result = self._fallback(q, clock, [reason], None, rel.items, rel)
        except Exception as e:  # a failure outside the stages' own handlers
            log.warning("recommend failed, answering fallbacks: %s: %s", type(e).__name__, e)
            result = self._fallback(q, clock, ["internal_error"], None, rel.items, rel)
        else:  # the worker is done with the clock: its CPU times are final
            for stage, ms in clock.cpu_timings.items():
                metrics.STAGE_CPU_SECONDS.labels(stage).observe(ms / 1000)
            if clock.worker_started is not None:
                took = time.perf_counter() - clock.worker_started
                self._service_s += SERVICE_TIME_EWMA * (took - self._service_s)
        return self._answered(q, result)

    def _answered(self, q: RecommendQuery, result: RecommendResult) -> RecommendResult:
        """Count and log an answer (every path of :meth:`recommend` ends here)."""
        name = result.release
        metrics.RECOMMENDATIONS.labels(name).inc()
        for stage, ms in result.timings.items():
            metrics.STAGE_SECONDS.labels(stage, name).observe(ms / 1000)
        for reason in result.degraded:
            metrics.DEGRADED.labels(reason, name).inc()
        if result.cold_start:
            metrics.COLD_START.labels(name).inc()
        self.event_log.served(q, result)
        return result

    async def record_event(self, e: EventQuery, deadline_s: float | None) -> None:
        """Push a real-time signal to Feast (visible to the next lookup).

        Raises :class:`UnknownItem` for an item outside the serving catalog and
        :class:`ServiceUnavailable` when the store fails, times out or is down (one log
        line each, counted in ``recstack_event_failures_total``; no traceback)."""
        item = np.asarray([e.item_id], dtype=np.int64)
        if not any(rel.catalog.rows(item)[1][0] for rel in self.router.served()):
            raise UnknownItem(f"item_id {e.item_id} is not in the serving catalog")
        # The answer (UNAVAILABLE included) is due like a Recommend's: before the client's
        # deadline by the margin, within the ceiling. Waiting the whole deadline turned a
        # hung store's UNAVAILABLE into DEADLINE_EXCEEDED at the client.
        timeout = answer_within(deadline_s, self.cfg.budget, EVENT_DEFAULT_S)
        loop = asyncio.get_running_loop()
        fut = loop.run_in_executor(self.event_pool, self.release.features.push_event, e)
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
        self.event_log.event(e)

    def health_detail(self) -> dict[str, Any]:
        """What the health endpoints report beside SERVING: whether the online store
        still holds the live release's users (orchestrator/store_watch.py; every served
        release's share is in ``recstack_online_store_missing_ratio{release}``)."""
        return {"online_store": self.release.features.watch.detail()}

    def feature_time(self, q: RecommendQuery, rel: ServingRelease | None = None) -> float:
        """The clock of time-relative features (item age, recency) and of "not yet
        created": the request's time, but never later than the release's data end plus
        ``max_clock_lead_days`` — a release trained on 1998 data asked in 2026 (a replay,
        a stale deployment) scores as of its data, not 10,000 days later. Clients that
        replay history pass the request's ``timestamp``."""
        rel = rel or self.release
        return min(q.timestamp.timestamp(), rel.data_end + self.clock_lead_s)

    # ----------------------------------------------------------------- the pipeline
    def _recommend(
        self, q: RecommendQuery, clock: RequestClock, rel: ServingRelease
    ) -> RecommendResult:
        clock.worker_started = time.perf_counter()
        with self._queue_lock:
            self._queued -= 1
        state = rel.items  # one snapshot for the whole request
        if clock.remaining() <= 0:
            # Waited in the queue past its deadline (overload): answer cheaply instead of
            # spending model time on a reply nobody can use; the backlog drains faster.
            return self._fallback(q, clock, ["load_shed"], None, state, rel)
        degraded: list[str] = []
        catalog = state.catalog
        now = self.feature_time(q, rel)

        with clock.stage("user_features"):
            try:
                user = rel.features.user(q.user_id)
            except Exception as e:  # the store's typed errors and anything below it
                _stage_failed("user features", e)
                degraded.append("features_unavailable")
                user = None
        if user is None or not user.known or not user.has_history:
            # No row, or a profile without events yet: popular and fresh items, of the
            # user's segment when the release has one for it.
            if user is not None and user.missing:
                degraded.append("features_missing")
            return self._fallback(q, clock, degraded, user, state, rel, cold_start=True)

        with clock.stage("user_tower"):
            budget = clock.budget("user_tower")
            embedding = None
            if budget > 0:
                try:
                    embedding = rel.user_embedding(user, timeout_s=budget)
                except Exception as e:  # TritonError, or a bad answer
                    _stage_failed("user_tower", e)
                    embedding = _in_process(
                        rel,
                        e,
                        "user_tower",
                        degraded,
                        lambda _: rel.user_embedding_in_process(user),
                    )
        if embedding is None:
            degraded.append("retrieval_unavailable")
            return self._fallback(q, clock, degraded, user, state, rel)

        try:
            rows, source_feats, sources, found = self._candidates(
                q, clock, rel, state, user, embedding, now
            )
        except Exception as e:  # e.g. FAISS refusing a NaN embedding (ValueError)
            log.warning("retrieval failed: %s: %s", type(e).__name__, e)
            degraded.append("retrieval_unavailable")
            return self._fallback(q, clock, degraded, user, state, rel)
        if len(rows) == 0:
            degraded.append("no_retrieval_candidates")
            return self._fallback(q, clock, degraded, user, state, rel)

        # Without the ranker: the merged order (ANN first, then the other sources).
        final_scores = -np.arange(len(rows), dtype=np.float64)
        item_ids = catalog.item_ids[rows]
        try:
            with clock.stage("item_features"):
                items = state.snapshot.lookup(item_ids)
            with clock.stage("ranking"):
                budget = clock.budget("ranking")
                if budget <= 0.001:
                    degraded.append("ranking_skipped")
                else:
                    inputs = user.rank_inputs(
                        embedding, items, catalog.vectors(rows), now, source_feats
                    )
                    answer: np.ndarray | None
                    try:
                        answer = rel.triton.rank(inputs, timeout_s=budget)
                    except TritonError as e:
                        _stage_failed("ranking", e)
                        answer = _in_process(
                            rel, e, "ranking", degraded, lambda local: local.rank(inputs)
                        )
                        if answer is None:
                            raise
                    scores = np.asarray(answer, dtype=np.float64)
                    if scores.shape != (len(rows),) or not np.isfinite(scores).all():
                        raise ValueError(f"ranker answered {scores.shape}, non-finite or short")
                    final_scores = scores
        except Exception as e:  # TritonError, bad item features, a bad ranker answer
            if not isinstance(e, TritonError):  # a Triton failure was logged above
                _stage_failed("ranking", e)
            degraded.append("ranking_skipped")

        with clock.stage("postprocess"):
            cands = Candidates(
                item_ids,
                final_scores,
                catalog.category[rows],
                catalog.created_at[rows],
                sources,
                found,
                unique=True,  # merged without duplicates (gather_found, or the ANN's ids)
            )
            ranked = "ranking_skipped" not in degraded
            result = self._finish(q, cands, user, now, catalog, rel, ranked=ranked)
        result.timings = clock.timings
        result.degraded = degraded
        return result

    def _candidates(
        self,
        q: RecommendQuery,
        clock: RequestClock,
        rel: ServingRelease,
        state: ItemState,
        user: UserView,
        embedding: np.ndarray,
        now: float,
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray | None]:
        """(catalog rows, their source features or None, source names, found masks or
        None) that pass the filters: the ANN's neighbours of ``embedding`` merged with the
        other sources."""
        catalog = state.catalog
        with clock.stage("retrieval"):
            ann_rows = rel.search_rows(
                state, np.asarray(embedding, dtype=np.float32), self.cfg.n_candidates
            )
        with clock.stage("filter"):
            seen = user.seen_items
            created = catalog.created_at
            passes = catalog.request_filter(q.filters, seen)  # blocked set built once

            def allowed(rows: np.ndarray) -> np.ndarray:
                return passes(rows) & exists_at(created[rows], now)

            if rel.sources is not None:
                seen_rows, seen_known = catalog.rows(seen)
                seen_rows = np.where(seen_known, seen_rows, -1)
                rows, source_feats, found = gather_found(
                    rel.sources, rel.quotas, ann_rows, seen_rows, allowed, now
                )
                return rows, source_feats, source_names(source_feats), found
            # A release from before multi-source candidates: the ANN alone.
            rows = ann_rows[allowed(ann_rows)][: self.cfg.n_ranked]
            return rows, None, np.full(len(rows), "retrieval", dtype=object), None

    def _finish(
        self,
        q: RecommendQuery,
        cands: Candidates,
        user: UserView | None,
        now: float,
        catalog: Catalog,
        rel: ServingRelease,
        ranked: bool = False,
    ) -> RecommendResult:
        """The top ``q.k`` of ``cands`` as the answer's items; ``ranked``: their scores are
        the ranker's."""
        top, final = select(cands, q.k, now, rel.post)
        recent = list(user.recent_items) if user is not None else []
        rrows, rknown = catalog.rows(np.asarray(recent, dtype=np.int64))
        recent_cats = np.where(rknown, catalog.category[rrows], -1).tolist()
        why = reasons(top, recent, recent_cats, rel.item_key)
        found = found_names(top.found) if top.found is not None else [[str(s)] for s in top.sources]
        items = [
            RecItem(
                int(i),
                float(s),
                r + 1,
                why[r],
                str(src),
                tuple(found[r]),
                ranked,
                rel.item_key(int(i)),
            )
            for r, (i, s, src) in enumerate(zip(top.item_ids, final, top.sources, strict=True))
        ]
        return RecommendResult(items=items, release=str(rel.release_id))

    def _fallback(
        self,
        q: RecommendQuery,
        clock: RequestClock,
        degraded: list[str],
        user: UserView | None,
        state: ItemState,
        rel: ServingRelease,
        cold_start: bool = False,
    ) -> RecommendResult:
        """Popular and fresh items (filtered), leaning to the user's categories if known;
        the popular list is the user's cold-start segment's when the release has one."""
        t0 = time.perf_counter()
        now = self.feature_time(q, rel)
        segment = _segment(user, rel, q)
        if user is None or not user.has_history:
            # No user, or one without history: the answer depends on the filters, k, the
            # segment and the minute only (items created within the minute wait for the
            # next one).
            key = (q.filters, q.k, segment[0], int(now // ANONYMOUS_ANSWER_S))
            items = state.anonymous_answers.get(key)
            if items is None:
                items = self._fallback_items(q, None, state, rel, now, segment)
                state.remember_answer(key, items)
        else:
            items = self._fallback_items(q, user, state, rel, now, segment)
        result = RecommendResult(items=list(items), release=str(rel.release_id))
        result.fallback_segment = segment[0]
        result.timings = dict(clock.timings)
        result.timings["fallback"] = (time.perf_counter() - t0) * 1000
        result.degraded = degraded
        result.cold_start = cold_start
        return result

    def _fallback_items(
        self,
        q: RecommendQuery,
        user: UserView | None,
        state: ItemState,
        rel: ServingRelease,
        now: float,
        segment: tuple[str, np.ndarray | None] = (GLOBAL_SEGMENT, None),
    ) -> list[RecItem]:
        catalog = state.catalog
        seen = user.seen_items if user is not None else np.zeros(0, dtype=np.int64)
        name, segment_rows = segment
        rows, scores, sources = state.fallbacks.candidates(
            catalog, q.filters, seen, max(4 * q.k, 50), now, popular_rows=segment_rows
        )
        if user is not None and user.affinity is not None and len(user.affinity):
            # Known user without a model answer: prefer the categories they engage with.
            aff = np.asarray(user.affinity, dtype=np.float64)
            cats = catalog.category[rows]
            scores = scores + np.where(cats < len(aff), aff[np.minimum(cats, len(aff) - 1)], 0)
        cands = Candidates(
            catalog.item_ids[rows],
            scores,
            catalog.category[rows],
            catalog.created_at[rows],
            sources,
        )
        items = self._finish(q, cands, user, now, catalog, rel).items
        if segment_rows is None:
            return items
        # The segment's own items say so (the global list tops it up under strict filters).
        from_segment = set(catalog.item_ids[segment_rows].tolist())
        why = segment_reason(name)
        return [
            dataclasses.replace(i, reason=why)
            if i.source == "popular" and i.item_id in from_segment
            else i
            for i in items
        ]


def _segment(
    user: UserView | None, rel: ServingRelease, q: RecommendQuery
) -> tuple[str, np.ndarray | None]:
    """(name, catalog rows) of the cold-start segment list of this user (their attributes;
    none for an unknown user) in this request's context (surface, device) in this release,
    or (GLOBAL_SEGMENT, None): nothing known, a thin segment (none kept), or a release from
    before segment lists."""
    if rel.sources is None:
        return GLOBAL_SEGMENT, None
    attributes = user.segment_attributes if user is not None else {}
    found = rel.sources.segment_popular(attributes, {"surface": q.surface, "device": q.device})
    return found if found is not None else (GLOBAL_SEGMENT, None)


def segment_reason(name: str) -> str:
    """An item's reason from a segment list: "popular in your country (country=3)",
    "popular on cart (surface=cart)"."""
    attr, _, value = name.partition("=")
    if attr in CONTEXT_COLUMNS:
        return f"popular on {value} ({name})"
    attrs = [part.split("=", 1)[0] for part in name.split(",")]
    return f"popular in your {' and '.join(SEGMENT_WORDS.get(a, a) for a in attrs)} ({name})"

"""Every degradation reason of the Recommend pipeline, each produced by the failure it names.

In process: orchestrator/service.py over the real release of the session's trained
pipeline (`trained_settings`), a real tritonserver and Feast with its SQLite online store.
Failures are real where they can be: a feature store file that is not a database, an
exclusive lock held on the online store (past the deadline with a slow store timeout, and
a fast features_unavailable with the default one), a worker pool busy with other work, filters
nothing passes. Two are injected through the release's own state (a NaN embedding in
its user-embedding cache, an item snapshot without a ranker feature), as a bad model
answer or a bad materialisation would leave them.

Also here, over the same release: the item snapshot's refresh swaps the snapshot, the
catalog popularity and the popular list together, after a real Feast materialisation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import degraded_count

from exporters.raw_tables import read_table
from loadtest.faults import store_locked
from orchestrator import metrics
from orchestrator.embedding_cache import EmbeddingCache
from orchestrator.online_features import ItemSnapshot
from orchestrator.processes import ManagedProcess
from orchestrator.request import Filters, RecommendQuery
from orchestrator.service import RecommendResult, RecommendService, ServiceConfig
from orchestrator.triton_server import start_triton
from recstack.settings import Settings

pytestmark = pytest.mark.integration


def cache_lookups() -> float:
    return sum(float(metrics.EMBEDDING_CACHE.labels(r)._value.get()) for r in ("hit", "miss"))


@pytest.fixture(scope="module")
def triton(trained_settings: Settings) -> Iterator[ManagedProcess]:
    proc = start_triton(trained_settings)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def serving(trained_settings: Settings) -> Settings:
    """The trained settings, without the background refresh (tests call it themselves)."""
    return trained_settings.model_copy(update={"feature_refresh_s": 0.0})


@pytest.fixture(scope="module")
def service(serving: Settings, triton: ManagedProcess) -> Iterator[RecommendService]:
    svc = asyncio.run(RecommendService.create(serving))
    yield svc
    asyncio.run(svc.close())


@pytest.fixture(scope="module")
def interactions(trained_settings: Settings) -> pd.DataFrame:
    return read_table(trained_settings.raw_dir, "interactions")


def users(interactions: pd.DataFrame) -> list[int]:
    """Users with clicks or purchases, most active first."""
    pos = interactions[interactions["event"].isin(["click", "purchase"])]
    return [int(u) for u in pos["user_id"].value_counts().index]


def query(interactions: pd.DataFrame, user: int, k: int = 10, **filters: object) -> RecommendQuery:
    end: datetime = interactions["timestamp"].max().to_pydatetime()
    return RecommendQuery(user_id=user, k=k, timestamp=end, filters=Filters(**filters))  # type: ignore[arg-type]


def ask(svc: RecommendService, q: RecommendQuery, deadline_s: float = 5.0) -> RecommendResult:
    return asyncio.run(svc.recommend(q, deadline_s))


def test_a_healthy_answer_is_not_degraded(
    service: RecommendService, interactions: pd.DataFrame
) -> None:
    """The baseline the tests below depart from: same service, same users, no flag."""
    for user in users(interactions)[:3]:
        result = ask(service, query(interactions, user))
        assert result.degraded == [] and len(result.items) == 10, result.degraded


def broken_store_settings(serving: Settings, tmp: Path) -> Settings:
    """A copy of the data whose Feast online store file is not a database: the registry
    and the offline tables are fine, every online read fails."""
    data = tmp / "data"
    shutil.copytree(serving.data_dir, data)
    (data / "feast" / "sqlite" / "online_store.db").write_bytes(b"not a database" * 100)
    return serving.model_copy(update={"data_dir": data})


def test_feature_store_down_starts_degraded_and_serves_features_unavailable(
    serving: Settings,
    triton: ManagedProcess,
    interactions: pd.DataFrame,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    broken = broken_store_settings(serving, tmp_path)
    # Warm-up reads the user features and fails: start-up must go on, with one warning.
    svc = asyncio.run(RecommendService.create(broken))
    try:
        assert any("warm-up failed" in r.getMessage() for r in caplog.records)
        before = degraded_count("features_unavailable")
        result = ask(svc, query(interactions, users(interactions)[0]))
        assert result.degraded == ["features_unavailable"]
        assert result.cold_start and len(result.items) == 10
        assert {i.source for i in result.items} <= {"popular", "fresh"}
        assert degraded_count("features_unavailable") == before + 1
    finally:
        asyncio.run(svc.close())


def test_work_longer_than_the_deadline_is_deadline_exceeded(
    serving: Settings, triton: ManagedProcess, interactions: pd.DataFrame
) -> None:
    """An exclusive lock on the SQLite online store stalls the user lookup for as long as
    the store's timeout allows (set to 5 s here, far above the default): the request must
    answer at its deadline, not when the store does."""
    slow_store = serving.model_copy(update={"online_store_timeout_ms": 5000.0})
    svc = asyncio.run(RecommendService.create(slow_store))
    before = degraded_count("deadline_exceeded")
    try:
        with store_locked(serving):
            t0 = time.perf_counter()
            result = ask(svc, query(interactions, users(interactions)[1]), deadline_s=0.3)
            elapsed = time.perf_counter() - t0
    finally:
        asyncio.run(svc.close())
    assert result.degraded == ["deadline_exceeded"]
    assert len(result.items) == 10
    assert elapsed < 0.3 + 0.5, elapsed  # at the deadline, not after the 5 s lock timeout
    assert degraded_count("deadline_exceeded") == before + 1


def test_a_locked_store_answers_features_unavailable_within_its_timeout(
    service: RecommendService, serving: Settings, interactions: pd.DataFrame
) -> None:
    """With the default store timeout (50 ms) the same lock is a store failure, not a
    stall: features_unavailable long before the deadline."""
    timeout_s = serving.online_store_timeout_ms / 1000
    before = degraded_count("features_unavailable")
    # This process holds the whole session's objects: a full collection during the
    # request (seen: > 250 ms in the full suite) would be timed, not the store.
    gc.collect()
    with store_locked(serving):
        t0 = time.perf_counter()
        result = ask(service, query(interactions, users(interactions)[1]), deadline_s=1.0)
        elapsed = time.perf_counter() - t0
    assert result.degraded == ["features_unavailable"] and result.cold_start
    assert len(result.items) == 10
    assert elapsed < timeout_s + 0.2, elapsed  # the busy timeout, not the deadline
    assert degraded_count("features_unavailable") == before + 1


def test_a_request_left_in_the_queue_past_its_deadline_is_shed(
    service: RecommendService, interactions: pd.DataFrame
) -> None:
    """One worker, busy with other work for longer than the request's deadline: the request
    is answered ``load_shed`` and never worked on afterwards."""
    svc = RecommendService(service.release, ServiceConfig(workers=1))
    gate = threading.Event()
    busy = svc.pool.submit(gate.wait, 10)
    before, lookups = degraded_count("load_shed"), cache_lookups()
    try:
        result = ask(svc, query(interactions, users(interactions)[2]), deadline_s=0.2)
    finally:
        gate.set()
        busy.result()
        svc.pool.shutdown(wait=True)
    assert result.degraded == ["load_shed"]
    assert len(result.items) == 10
    assert degraded_count("load_shed") == before + 1
    assert cache_lookups() == lookups  # the shed request never reached the user tower


def test_a_burst_is_shed_on_arrival_not_at_the_ceiling(
    service: RecommendService, interactions: pd.DataFrame
) -> None:
    """More queued work than one worker can do before the deadline: the excess is answered
    ``load_shed`` at once, so every answer arrives within the deadline."""
    svc = RecommendService(service.release, ServiceConfig(workers=1))
    svc._service_s = 0.05  # the measured average once warm; seeded so the test is exact

    async def burst() -> list[tuple[float, RecommendResult]]:
        async def one(user: int) -> tuple[float, RecommendResult]:
            t0 = time.perf_counter()
            result = await svc.recommend(query(interactions, user), 0.3)
            return time.perf_counter() - t0, result

        return await asyncio.gather(*(one(u) for u in users(interactions)[:40]))

    try:
        answers = asyncio.run(burst())
    finally:
        svc.pool.shutdown(wait=True)
    shed_now = [t for t, r in answers if r.degraded == ["load_shed"] and t < 0.1]
    assert len(shed_now) >= 25, sorted(round(t, 3) for t, _ in answers)
    assert all(t < 0.3 for t, _ in answers), max(t for t, _ in answers)
    assert all(len(r.items) == 10 for _, r in answers)


def test_answers_without_a_user_are_computed_once_per_filters_and_minute(
    service: RecommendService, interactions: pd.DataFrame
) -> None:
    """A burst of shed requests costs a lookup each: the first answer without a user is
    kept per (filters, k, minute) on the item state; other filters get their own; a new
    item snapshot starts empty."""
    svc = RecommendService(service.release, ServiceConfig(workers=1))
    gate = threading.Event()
    busy = svc.pool.submit(gate.wait, 30)
    state = service.release.items
    state.anonymous_answers.clear()
    try:
        shed = [ask(svc, query(interactions, u), deadline_s=0.05) for u in users(interactions)[:5]]
        other = ask(svc, query(interactions, 1, exclude_categories=frozenset({0})), 0.05)
    finally:
        gate.set()
        busy.result()
        svc.pool.shutdown(wait=True)
    assert all(r.degraded == ["load_shed"] for r in [*shed, other])
    first = [i.item_id for i in shed[0].items]
    assert all([i.item_id for i in r.items] == first for r in shed)  # one answer, reused
    assert len(state.anonymous_answers) == 2  # the default filters, and the other ones
    cats = service.release.catalog.category[
        service.release.catalog.rows(np.asarray([i.item_id for i in other.items], dtype=np.int64))[
            0
        ]
    ]
    assert 0 not in cats.tolist()  # the filtered answer is its own, not the cached one


def test_filters_that_exclude_every_candidate(
    service: RecommendService, interactions: pd.DataFrame
) -> None:
    user = users(interactions)[3]
    assert ask(service, query(interactions, user)).degraded == []  # the filter makes it
    top_price = float(service.catalog.price.max())
    before = degraded_count("no_retrieval_candidates")
    result = ask(service, query(interactions, user, price_min=top_price + 1.0))
    assert result.degraded == ["no_retrieval_candidates"]
    assert result.items == []  # the fallbacks honour the filters too
    assert degraded_count("no_retrieval_candidates") == before + 1


def test_a_nan_embedding_degrades_retrieval_instead_of_failing(
    service: RecommendService, interactions: pd.DataFrame
) -> None:
    """FAISS refuses a NaN query with ValueError: that must be a degraded answer, not an
    INTERNAL error. The NaN comes from the release's user-embedding cache, where a bad
    tower answer would sit."""
    rel = service.release
    user = users(interactions)[4]
    inputs = rel.features.user(user).tower_inputs()
    dim = rel.catalog.embeddings.shape[1]
    rel.user_embeddings.put(EmbeddingCache.key(inputs), np.full((1, dim), np.nan, np.float32))
    before = degraded_count("retrieval_unavailable")
    result = ask(service, query(interactions, user))
    assert result.degraded == ["retrieval_unavailable"]
    assert len(result.items) == 10 and not result.cold_start
    assert degraded_count("retrieval_unavailable") == before + 1


def test_item_features_without_a_ranker_feature_skip_ranking(
    service: RecommendService, interactions: pd.DataFrame
) -> None:
    """A snapshot that lacks a feature the ranker needs (a bad materialisation) makes the
    ranker's input assembly raise: the answer keeps the retrieval order, flagged."""
    rel = service.release
    state = rel.items
    snap = state.snapshot
    drop = rel.features.layout.item_features[0]
    keep = [i for i, n in enumerate(snap.names) if n != drop]
    broken = ItemSnapshot(
        names=tuple(snap.names[i] for i in keep),
        ids=snap.ids,
        matrix=snap.matrix[:, keep],
        category=snap.category,
        created_at=snap.created_at,
        as_of=snap.as_of,
    )
    before = degraded_count("ranking_skipped")
    rel.items = dataclasses.replace(state, snapshot=broken)
    try:
        result = ask(service, query(interactions, users(interactions)[5]))
    finally:
        rel.items = state
    assert result.degraded == ["ranking_skipped"]
    assert len(result.items) == 10 and not result.cold_start
    assert degraded_count("ranking_skipped") == before + 1


def test_refresh_without_a_new_materialisation_keeps_the_snapshot(
    service: RecommendService,
) -> None:
    state = service.release.items
    before = float(metrics.ITEM_SNAPSHOT_REFRESHES.labels("unchanged")._value.get())
    assert service.refresh_features() is False  # the real registry: nothing new
    assert service.release.items is state
    assert metrics.ITEM_SNAPSHOT_REFRESHES.labels("unchanged")._value.get() == before + 1


class Materialised:
    """The release's feature client right after a materialisation that produced
    ``snapshot`` (everything else is the real client)."""

    def __init__(self, real: object, snapshot: ItemSnapshot) -> None:
        self._real = real
        self._snapshot = snapshot

    def refresh(self) -> bool:
        return True

    @property
    def snapshot(self) -> ItemSnapshot:
        return self._snapshot

    def __getattr__(self, name: str) -> object:
        return getattr(self._real, name)


def test_refresh_swaps_snapshot_catalog_and_fallbacks_together(
    service: RecommendService, interactions: pd.DataFrame
) -> None:
    """After a materialisation that turns popularity upside down, the popularity, the
    popular list and the cold-start answers follow, and the snapshot's age restarts."""
    rel = service.release
    online, state = rel.features.online, rel.items
    snap = state.snapshot
    col = snap.names.index("item_popularity_rank")
    matrix = snap.matrix.copy()
    # New ranks 1..n, the least popular item first (small integers: exact in float32).
    order = np.argsort(-matrix[:, col], kind="stable")
    matrix[order, col] = np.arange(1, len(order) + 1, dtype=np.float32)
    flipped = dataclasses.replace(snap, matrix=matrix)
    cold = query(interactions, 987_654_321, k=20)
    popular_before = [i.item_id for i in ask(service, cold).items if i.source == "popular"]
    time.sleep(0.05)
    age_before = service._snapshot_age()
    rel.features.online = Materialised(online, flipped)  # type: ignore[assignment]
    try:
        assert service.refresh_features() is True
        new = rel.items
        assert new is not state and new.snapshot is flipped
        assert new.catalog.embeddings is state.catalog.embeddings  # the release's vectors
        ranks = flipped.lookup(new.catalog.item_ids).columns(["item_popularity_rank"])[:, 0]
        np.testing.assert_array_equal(new.catalog.popularity, -ranks.astype(np.float64))
        # The new most popular item was the least popular one.
        first = new.fallbacks.popular_rows[0]
        assert state.catalog.popularity[first] == state.catalog.popularity.min()
        assert service._snapshot_age() < age_before
        popular_after = [i.item_id for i in ask(service, cold).items if i.source == "popular"]
        assert popular_after and popular_after != popular_before
    finally:
        rel.features.online = online
        rel.items = state


def test_a_new_materialisation_reaches_the_catalog_and_fallbacks(
    serving: Settings, tmp_path: Path
) -> None:
    """The real path: new item statistics land in the offline table, Feast materialises
    them, and one refresh later the serving release's popularity and popular list are
    the new ones (on a copy of the data: the session's store stays as it was)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from exporters import feast_ops
    from orchestrator.serving_release import ServingRelease

    s = serving.model_copy(update={"data_dir": tmp_path / "data"})
    shutil.copytree(serving.data_dir, s.data_dir)
    # A Feast repository of its own: a copied registry would still name the session's
    # online tables (Feast's infra objects), and applying over it would drop them.
    shutil.rmtree(s.data_dir / "feast")
    feast_ops.apply(s)  # the copy's sources point at the copy's tables
    feast_ops.materialize(s)
    rel = ServingRelease.load(s)
    svc = RecommendService(rel, ServiceConfig(workers=1))
    try:
        assert svc.refresh_features() is False  # nothing new yet
        old = rel.items
        table_path = s.features_dir / "item_statistics.parquet"
        table = pq.read_table(table_path)
        df = table.to_pandas()
        newest = df.sort_values("event_timestamp").drop_duplicates("item_id", keep="last")
        newest = newest.sort_values("item_popularity_rank", kind="stable").copy()
        # A day later the ranking is upside down: the least popular item is now first.
        newest["item_popularity_rank"] = np.arange(len(newest), 0, -1)
        newest["event_timestamp"] = df["event_timestamp"].max() + pd.Timedelta(days=1)
        pq.write_table(
            pa.Table.from_pandas(
                pd.concat([df, newest]), schema=table.schema, preserve_index=False
            ),
            table_path,
        )
        assert svc.refresh_features() is False  # written, not yet materialised
        feast_ops.materialize(s, incremental=True)
        assert svc.refresh_features() is True
        new = rel.items
        assert new is not old and new.catalog.embeddings is old.catalog.embeddings
        rank = dict(zip(newest["item_id"], newest["item_popularity_rank"], strict=True))
        expected = [-float(rank.get(int(i), np.nan)) for i in new.catalog.item_ids]
        known = ~np.isnan(expected)
        np.testing.assert_array_equal(new.catalog.popularity[known], np.array(expected)[known])
        first = int(new.catalog.item_ids[new.fallbacks.popular_rows[0]])
        assert rank[first] == 1
        assert new.fallbacks.popular_rows[0] != old.fallbacks.popular_rows[0]
        assert svc._snapshot_age() < 60
        assert svc.refresh_features() is False  # and only once
    finally:
        svc.pool.shutdown()
        rel.close()

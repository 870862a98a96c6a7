"""``recstack bench features``: Feast SDK vs the fast path, on SQLite, Redis and Redis Cluster.

Per store: one user (the raw SDK call with the ``retrieval`` service, and
:meth:`OnlineFeatures.user`, which is one SDK call for all user features plus decoding),
and 500 items (the SDK with the ranking service's item features, and the in-memory
snapshot). Random known ids per call, warm-up excluded, ``gc.freeze()`` after warm-up as
a service would do (DESIGN.md). The Redis run starts our own redis-server on
settings.redis_port (unless one of ours runs), applies and materialises into it if its
registry has never been materialised or it started the server (no persistence: a fresh
server is empty), and stops it again; ``redis_cluster`` likewise starts the local cluster
of orchestrator/redis_cluster.py on settings.redis_cluster_nodes. Numbers are p50/p99 in ms;
compare rows within one run (the machine is shared).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from exporters import feast_ops
from orchestrator import redis_cluster, redis_server
from orchestrator.online_features import RETRIEVAL_SERVICE, USER_KEY, OnlineFeatures
from orchestrator.processes import ManagedProcess, read_pid
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

N_ITEMS = 500
WARMUP = 10


@dataclass(frozen=True)
class Row:
    store: str
    case: str
    path: str
    n: int
    p50_ms: float
    p99_ms: float


def _measure(fn: Callable[[int], object], repeats: int) -> tuple[float, float]:
    for i in range(WARMUP):
        fn(i)
    gc.collect()
    gc.freeze()
    try:
        times = np.empty(repeats)
        for i in range(repeats):
            t0 = time.perf_counter()
            fn(i)
            times[i] = time.perf_counter() - t0
    finally:
        gc.unfreeze()
    return float(np.percentile(times, 50) * 1e3), float(np.percentile(times, 99) * 1e3)


def _ensure_materialized(settings: Settings, force: bool = False) -> None:
    store = (
        feast_ops.feature_store(settings) if feast_ops.registry_path(settings).exists() else None
    )
    done = store is not None and any(
        v.materialization_intervals for v in store.list_feature_views()
    )
    if done and not force:
        return
    log.info("preparing the %s online store (apply + materialize)", settings.online_store)
    feast_ops.apply(settings)
    feast_ops.materialize(settings)


def bench_store(settings: Settings, repeats: int, seed: int = 0) -> list[Row]:
    """Latency rows for one online store (assumed reachable and materialised)."""
    of = OnlineFeatures(settings).load()
    rng = np.random.default_rng(seed)
    item_ids = of.known_item_ids
    users = _known_users(settings, rng)
    batches = [
        rng.choice(item_ids, size=N_ITEMS, replace=len(item_ids) < N_ITEMS) for _ in range(8)
    ]
    store = of.store
    retrieval = store.get_feature_service(RETRIEVAL_SERVICE)
    item_refs = of.item_feature_refs

    def sdk_user(i: int) -> object:
        rows = [{USER_KEY: int(users[i % len(users)])}]
        return store.get_online_features(features=retrieval, entity_rows=rows).to_dict()

    def sdk_items(i: int) -> object:
        rows = [{"item_id": int(x)} for x in batches[i % len(batches)]]
        return store.get_online_features(features=item_refs, entity_rows=rows).to_dict()

    sdk_repeats = max(20, min(repeats, 60))  # 500-item SDK calls are slow: fewer of them
    cases = [
        ("1 user", "SDK get_online_features(retrieval)", sdk_user, repeats),
        (
            "1 user",
            "OnlineFeatures.user (1 SDK call, all user features)",
            lambda i: of.user(int(users[i % len(users)])),
            repeats,
        ),
        ("500 items", "SDK get_online_features(12 features)", sdk_items, sdk_repeats),
        (
            "500 items",
            "OnlineFeatures.items (snapshot)",
            lambda i: of.items(batches[i % len(batches)]),
            repeats,
        ),
    ]
    out = []
    for case, path, fn, n in cases:
        p50, p99 = _measure(fn, n)
        out.append(Row(settings.online_store, case, path, n, p50, p99))
        log.info("%s %s %s: p50 %.3f ms p99 %.3f ms", settings.online_store, case, path, p50, p99)
    return out


def _known_users(settings: Settings, rng: np.random.Generator) -> np.ndarray:
    import pyarrow.parquet as pq

    from exporters.feature_tables import table_path

    ids = np.unique(
        pq.read_table(table_path(settings, "user_profile"), columns=["user_id"])
        .column(0)
        .to_numpy()
    )
    return rng.choice(ids, size=min(1000, len(ids)), replace=False)


def run(settings: Settings, repeats: int, stores: list[str]) -> list[Row]:
    """Benchmark each store in ``stores`` (sqlite, redis, redis_cluster); Redis and the
    cluster are started if needed."""
    rows: list[Row] = []
    for kind in stores:
        s = settings.model_copy(update={"online_store": kind})
        procs: list[ManagedProcess] = []
        if kind == "redis" and read_pid(s, redis_server.process_name(s)) is None:
            procs = [redis_server.start(s)]
        if kind == "redis_cluster" and not redis_cluster.healthy(s):
            procs = redis_cluster.start(s)
        try:
            # A Redis we just started may be empty, whatever the registry says.
            _ensure_materialized(s, force=bool(procs))
            rows.extend(bench_store(s, repeats))
        finally:
            for proc in procs:
                proc.stop()
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'store':<13} {'case':<10} {'path':<52} {'n':>5} {'p50 ms':>9} {'p99 ms':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.store:<13} {r.case:<10} {r.path:<52} {r.n:>5} {r.p50_ms:>9.3f} {r.p99_ms:>9.3f}"
        )
    return "\n".join(lines)


def cli(args: argparse.Namespace) -> int:
    """``recstack bench features [--repeats N] [--stores sqlite,redis,redis_cluster]``."""
    settings = get_settings()
    stores = [s for s in str(getattr(args, "stores", "sqlite,redis")).split(",") if s]
    rows = run(settings, int(args.repeats), stores)
    print(format_table(rows))
    out = settings.reports_dir / "feature_bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    print(f"written {out}")
    return 0

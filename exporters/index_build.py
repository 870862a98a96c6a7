"""Embed the catalog with the exported item tower and build the FAISS index (pipeline step
``index``).

The embeddings come from ``work/item_tower.onnx`` in onnxruntime (the artifact that ships,
not the PyTorch model). The index type follows the catalog size (:data:`INDEX_TABLE`); its
recall@k against exact search is measured on real queries, the user-tower embeddings of
validation users, because IVF recall depends on how the data clusters.

Outputs (written atomically, ``index.json`` last): ``work/index.faiss``,
``work/index_item_ids.npy`` (row → item_id) and ``work/index.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
from faiss.contrib.evaluation import knn_intersection_measure

from exporters.onnx_export import ARTIFACTS, reference_time, run_onnx
from exporters.raw_tables import RawTables, read_raw
from exporters.split import Split, load_split
from exporters.tower_inputs import item_inputs, users_at
from orchestrator.faiss_index import single_query_scan
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
ITEM_IDS_FILE = "index_item_ids.npy"
META_FILE = "index.json"

# Catalog size (up to, inclusive) → (factory key, search parameters to try, cheapest
# first). Exact search is cheap up to ~100k × 64 (a few ms per query); beyond that IVF.
# The build keeps the first parameters whose recall@k vs exact reaches TARGET_RECALL on
# real queries: on DESIGN.md's clustered 1M vectors nprobe 16 already gives ~1.0, but on
# the demo's tower embeddings IVF recall@500 at 1/8 of the lists probed was only ~0.74,
# so the data decides. Measured on the `large` preset's tower embeddings (1M items, one
# thread, 500 validation users, docs/benchmark.md): IVF1024,Flat needs nprobe 128 for
# recall@500 0.96 (5.9 ms per query), IVF4096,Flat nprobe 256 (2.6 ms); HNSW32 reaches
# only 0.80 at ef 768. Above 300k items the lists hold 4-bit fast-scan PQ codes (SIMD
# scan, 32 B per item) and the k_factor_rf × k best are re-scored exactly against the
# stored vectors (RFlat): IVF4096,PQ64x4fsr,RFlat at nprobe 256, k_factor_rf 2 reaches
# the same recall@500 (0.959) in 1.14 ms, 2.3× faster, and its scores are exact inner
# products. The refine stage keeps the float vectors, which the orchestrator also uses
# for ranking (a view, not a second copy).
INDEX_TABLE: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (100_000, "Flat", ("",)),
    (300_000, "IVF1024,Flat", tuple(f"nprobe={n}" for n in (16, 32, 64, 128, 256))),
    (
        2**63 - 1,
        "IVF4096,PQ64x4fsr,RFlat",
        (
            *(f"nprobe={n},k_factor_rf=2" for n in (64, 128, 256, 512)),
            "nprobe=512,k_factor_rf=4",
        ),
    ),
)
# k-means of the IVF lists trains on at most this many vectors (a seeded sample): 64 per
# list for IVF4096, enough for stable centroids; FAISS's own cap (256 per list = the whole
# 1M catalog) made training ~4× slower for no measurable recall gain.
MAX_TRAIN_VECTORS = 262_144
RECALL_K = 500
N_QUERIES = 1000
TARGET_RECALL = 0.95  # stop trying more expensive search parameters here
MIN_RECALL = 0.8  # below this the index is not fit to ship (the build fails)


class IndexRecallError(RuntimeError):
    """The approximate index misses too many of the exact top-k neighbours."""

    def __init__(self, factory: str, params: str, recall: float, k: int, floor: float) -> None:
        super().__init__(
            f"index {factory!r} ({params or 'default parameters'}) recall@{k} vs exact "
            f"{recall:.3f} < {floor}: add costlier parameters or another factory to INDEX_TABLE"
        )


@dataclass(frozen=True)
class IndexStats:
    """What ``index.json`` records about a built index."""

    factory: str
    search_params: str
    metric: str
    n_items: int
    dim: int
    k: int
    recall_at_k_vs_exact: float
    n_queries: int
    build_seconds: float
    tried: dict[str, float]  # search params → recall@k, in the order tried


def choose_index(n_items: int) -> tuple[str, tuple[str, ...]]:
    """``(factory, search params to try)`` for ``n_items`` from :data:`INDEX_TABLE`."""
    for limit, factory, params in INDEX_TABLE:
        if n_items <= limit:
            return factory, params
    raise AssertionError("INDEX_TABLE must end with an unbounded row")


def build_index(
    embeddings: np.ndarray,
    queries: np.ndarray,
    factory: str,
    search_params: str | Sequence[str],
    k: int = RECALL_K,
    target_recall: float = TARGET_RECALL,
    min_recall: float = MIN_RECALL,
) -> tuple[faiss.Index, IndexStats]:
    """Train and fill an inner-product index over ``embeddings``; measure recall@k against
    exact search for ``queries`` with each of ``search_params`` (cheapest first) and keep
    the first reaching ``target_recall`` (else the last). Raises :class:`IndexRecallError`
    when the kept parameters stay below ``min_recall``."""
    candidates = [search_params] if isinstance(search_params, str) else list(search_params)
    if not candidates:
        raise ValueError("no search parameters to try")
    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"embeddings must be a non-empty [n, d] array, got {x.shape}")
    if q.ndim != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"queries must be [m, {x.shape[1]}], got {q.shape}")
    t0 = time.perf_counter()
    index = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        train = x
        if len(x) > MAX_TRAIN_VECTORS:
            rows = np.random.default_rng(0).choice(len(x), MAX_TRAIN_VECTORS, replace=False)
            train = x[np.sort(rows)]
        index.train(train)
    index.add(x)
    single_query_scan(index)  # searched as serving searches it (recall measured so)
    build_seconds = time.perf_counter() - t0
    k = min(k, len(x))
    want = None
    if len(q):
        exact = faiss.IndexFlatIP(x.shape[1])
        exact.add(x)
        _, want = exact.search(q, k)
    space = faiss.ParameterSpace()
    tried: dict[str, float] = {}
    for params in candidates:
        if params:
            space.set_index_parameters(index, params)  # type: ignore[arg-type]
        recall = 1.0
        if want is not None:
            _, got = index.search(q, k)
            recall = float(knn_intersection_measure(got, want))
        tried[params] = round(recall, 4)
        log.info("index %s (%s): recall@%d %.4f", factory, params or "-", k, recall)
        if recall >= target_recall:
            break
    stats = IndexStats(
        factory=factory,
        search_params=params,
        metric="ip",
        n_items=len(x),
        dim=x.shape[1],
        k=k,
        recall_at_k_vs_exact=round(recall, 4),
        n_queries=len(q),
        build_seconds=round(build_seconds, 3),
        tried=tried,
    )
    log.info("index %s built in %.2f s, keeps %s", factory, build_seconds, params or "-")
    if recall < min_recall:
        raise IndexRecallError(factory, params, recall, k, min_recall)
    return index, stats


def validation_queries(
    tables: RawTables, split: Split, user_tower: Path, seed: int, n: int = N_QUERIES
) -> np.ndarray:
    """User-tower embeddings of up to ``n`` validation users, each as of their validation
    request."""
    users = split.val(tables.interactions)["user_id"].unique()
    if len(users) == 0:  # tiny data: any user is still a realistic query
        users = tables.interactions["user_id"].unique()
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(users, min(n, len(users)), replace=False))
    inputs = users_at(tables, users, split.val_times(users))
    return run_onnx(user_tower, inputs)


def catalog_embeddings(
    items: pd.DataFrame, at: pd.Timestamp, item_tower: Path
) -> tuple[np.ndarray, np.ndarray]:
    """``(item_ids, embeddings)`` of the whole catalog, item ages measured at ``at``."""
    ids = items["item_id"].to_numpy(np.int64)
    return ids, run_onnx(item_tower, item_inputs(items, ids, at))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build(settings: Settings, work: Path | None = None) -> None:
    """Pipeline step ``index``: embed the catalog, build, recall-check and write the index
    (into ``work``, default ``settings.work_dir``; the refit step passes its own)."""
    work = work or settings.work_dir
    item_tower, user_tower = work / ARTIFACTS["item_tower"], work / ARTIFACTS["user_tower"]
    for p in (item_tower, user_tower):
        if not p.exists():
            raise UserError(f"{p} missing: run the onnx_export step first (recstack train)")
    t0 = time.perf_counter()
    tables = read_raw(settings)
    at = reference_time(settings)  # the data's "now": item ages as serving will see them
    ids, emb = catalog_embeddings(tables.items, at, item_tower)
    queries = validation_queries(tables, load_split(settings), user_tower, settings.seed)
    factory, params = choose_index(len(ids))
    index, stats = build_index(emb, queries, factory, params)
    meta: dict[str, Any] = {
        **asdict(stats),
        "item_embeddings_at": at.isoformat(),
        "item_tower_sha256": _sha256(item_tower),
        "total_seconds": round(time.perf_counter() - t0, 3),
    }
    tmp = {name: work / f".{name}.tmp" for name in (INDEX_FILE, ITEM_IDS_FILE, META_FILE)}
    faiss.write_index(index, str(tmp[INDEX_FILE]))
    with tmp[ITEM_IDS_FILE].open("wb") as f:
        np.save(f, ids)
    tmp[META_FILE].write_text(json.dumps(meta, indent=2) + "\n")
    for name in (INDEX_FILE, ITEM_IDS_FILE, META_FILE):
        os.replace(tmp[name], work / name)
    log.info("wrote %s: %d items, %s", work / INDEX_FILE, len(ids), json.dumps(meta))

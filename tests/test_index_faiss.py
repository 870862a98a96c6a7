"""FAISS index build (recall vs exact) and the serving-side FaissIndex."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import pytest
from _two_tower_fixtures import Trained, build_trained

from exporters import index_build, retrieval
from exporters.index_build import IndexRecallError, build_index, choose_index
from exporters.split import load_split
from orchestrator.faiss_index import FaissIndex, IndexMismatchError
from recstack.settings import Settings

DIM = 64


@pytest.fixture(scope="module")
def trained(small_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return build_trained(small_settings, tmp_path_factory)


def _clustered(n: int, n_clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres, like tower embeddings (which cluster by taste)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, DIM))
    x = centres[rng.integers(0, n_clusters, n)] + 0.35 * rng.normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray]:
    return _clustered(10_000, 32, seed=1), _clustered(200, 32, seed=2)


def test_index_table_picks_exact_then_ivf() -> None:
    assert choose_index(10_000) == ("Flat", ("",))
    factory, params = choose_index(1_000_000)
    assert factory.startswith("IVF") and all(p.startswith("nprobe=") for p in params)
    sizes = [row[0] for row in index_build.INDEX_TABLE]
    assert sizes == sorted(sizes)


def test_ivf_recall_vs_exact_is_measured(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = clustered
    index, stats = build_index(x, q, "IVF32,Flat", "nprobe=16", k=100)
    assert stats.recall_at_k_vs_exact >= 0.95
    assert stats.n_items == len(x) and stats.dim == DIM and stats.k == 100
    assert faiss.extract_index_ivf(index).nprobe == 16
    # nprobe=1 on the same data misses neighbours, and the floor turns that into an error.
    with pytest.raises(IndexRecallError, match="recall@100"):
        build_index(x, q, "IVF32,Flat", "nprobe=1", k=100, min_recall=0.99)


def test_search_params_tuned_until_recall_target(clustered: tuple[np.ndarray, np.ndarray]) -> None:
    x, q = clustered
    tries = ("nprobe=1", "nprobe=16", "nprobe=32")
    index, stats = build_index(x, q, "IVF32,Flat", tries, k=100, target_recall=0.95)
    assert stats.search_params == "nprobe=16"  # nprobe=1 fell short, 32 was not needed
    assert list(stats.tried) == ["nprobe=1", "nprobe=16"]
    assert stats.tried["nprobe=1"] < 0.95 <= stats.tried["nprobe=16"]
    assert faiss.extract_index_ivf(index).nprobe == 16
    _, cheap = build_index(x, q, "IVF32,Flat", tries, k=100, target_recall=0.0, min_recall=0.0)
    assert cheap.search_params == "nprobe=1"


def _write(tmp_path: Path, index: faiss.Index, meta: dict[str, object], n: int) -> tuple:
    path, ids_path, meta_path = tmp_path / "i.faiss", tmp_path / "ids.npy", tmp_path / "i.json"
    faiss.write_index(index, str(path))
    np.save(ids_path, np.arange(n, dtype=np.int64) * 10 + 7)
    meta_path.write_text(json.dumps(meta))
    return path, meta_path, ids_path


@pytest.fixture(scope="module")
def flat_files(tmp_path_factory: pytest.TempPathFactory, clustered) -> tuple:  # type: ignore[no-untyped-def]
    x, _ = clustered
    x = x[:2000]
    index = faiss.index_factory(DIM, "Flat", faiss.METRIC_INNER_PRODUCT)
    index.add(x)
    meta = {"factory": "Flat", "search_params": "", "metric": "ip", "dim": DIM, "n_items": len(x)}
    return (*_write(tmp_path_factory.mktemp("flat"), index, meta, len(x)), x)


def test_search_maps_rows_to_item_ids(flat_files: tuple) -> None:
    path, meta, ids, x = flat_files
    idx = FaissIndex.load(path, meta, ids, device="cpu")
    scores, items = idx.search(x[:3], 5)
    assert scores.shape == items.shape == (3, 5)
    assert items.dtype == np.int64
    assert items[:, 0].tolist() == [7, 17, 27]  # each vector finds itself first
    assert np.all(np.diff(scores, axis=1) <= 1e-6)
    _, all_items = idx.search(x[:1], 10_000)  # k beyond the catalog is cut to its size
    assert all_items.shape == (1, len(x))
    # The same search in index rows (the request path's: rows are catalog rows).
    row_scores, rows = idx.search_rows(x[:3], 5)
    assert rows[:, 0].tolist() == [0, 1, 2] and np.array_equal(row_scores, scores)
    assert np.array_equal(idx.item_ids[rows], items)


def _in_new_thread(fn):  # type: ignore[no-untyped-def]
    """``fn()``'s result, called in a thread that never ran OpenMP code before."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


def test_every_searching_thread_uses_the_index_openmp_threads(flat_files: tuple) -> None:
    """omp_set_num_threads is per thread: a worker thread that searches must get the
    index's 1 thread too, not the process default (one per core, whose helpers spun after
    every search: 10.2 vs 5.7 ms of CPU per request with one worker, issue 13)."""
    if _in_new_thread(faiss.omp_get_max_threads) == 1:
        pytest.skip("one core and no OMP_NUM_THREADS: a fresh thread already has 1 thread")
    path, meta, ids, x = flat_files
    idx = FaissIndex.load(path, meta, ids, device="cpu")  # omp_threads=1, the default

    def search_then_threads() -> int:
        idx.search(x[:1], 5)
        return int(faiss.omp_get_max_threads())

    assert _in_new_thread(search_then_threads) == 1
    # Offline indexes (omp_threads=None) leave a thread's setting alone.
    offline = FaissIndex.load(path, meta, ids, device="cpu", omp_threads=None)
    default = _in_new_thread(faiss.omp_get_max_threads)

    def offline_search_then_threads() -> int:
        offline.search(x[:1], 5)
        return int(faiss.omp_get_max_threads())

    assert _in_new_thread(offline_search_then_threads) == default


@pytest.mark.parametrize(
    "queries, k",
    [
        (np.zeros((2, DIM - 1), np.float32), 5),
        (np.zeros(DIM, np.float32), 5),
        (np.zeros((1, 2, DIM), np.float32), 5),
        (np.zeros((2, DIM), np.int64), 5),
        (np.full((1, DIM), np.nan, np.float32), 5),
        (np.zeros((2, DIM), np.float32), 0),
        (np.zeros((2, DIM), np.float32), 2.5),
        ([[0.0] * DIM], 5),
    ],
)
def test_bad_queries_raise_value_error(flat_files: tuple, queries, k) -> None:  # type: ignore[no-untyped-def]
    path, meta, ids, _ = flat_files
    idx = FaissIndex.load(path, meta, ids, device="cpu")
    with pytest.raises(ValueError):
        idx.search(queries, k)
    with pytest.raises(ValueError):
        idx.search_rows(queries, k)


def test_mismatch_detected_at_load(flat_files: tuple, tmp_path: Path) -> None:
    path, meta_path, ids, _ = flat_files
    meta = json.loads(Path(meta_path).read_text())
    with pytest.raises(IndexMismatchError, match="index factory"):
        FaissIndex.load(path, {**meta, "factory": "IVF1024,Flat"}, ids, device="cpu")
    with pytest.raises(IndexMismatchError, match="row count"):
        FaissIndex.load(path, {**meta, "n_items": 5}, ids, device="cpu")
    with pytest.raises(IndexMismatchError, match="item id count"):
        FaissIndex.load(path, meta, np.arange(3), device="cpu")
    l2 = faiss.IndexFlatL2(DIM)
    l2.add(np.zeros((meta["n_items"], DIM), np.float32))
    faiss.write_index(l2, str(tmp_path / "l2.faiss"))
    with pytest.raises(IndexMismatchError, match="metric"):
        FaissIndex.load(tmp_path / "l2.faiss", meta, ids, device="cpu")


def test_ivf_search_params_applied_on_load(clustered, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    x, q = clustered
    index, stats = build_index(x[:5000], q, "IVF32,Flat", "nprobe=4", k=50, min_recall=0.0)
    meta = {
        "factory": stats.factory,
        "search_params": "nprobe=6",
        "metric": "ip",
        "dim": DIM,
        "n_items": stats.n_items,
    }
    idx = FaissIndex.load(*_write(tmp_path, index, meta, stats.n_items), device="cpu")
    assert faiss.extract_index_ivf(idx.index).nprobe == 6
    assert idx.search(q[:2], 50)[1].shape == (2, 50)


def test_pipeline_index_and_retrieval(trained: Trained) -> None:
    s = trained.settings
    meta = json.loads((s.work_dir / index_build.META_FILE).read_text())
    assert meta["factory"] == "Flat" and meta["metric"] == "ip" and meta["dim"] == DIM
    assert meta["recall_at_k_vs_exact"] == 1.0 and meta["tried"] == {"": 1.0}
    assert meta["n_items"] == len(np.load(s.work_dir / index_build.ITEM_IDS_FILE))
    assert {"search_params", "build_seconds", "k"} <= set(meta)
    at = pd.Timestamp(load_split(s).train_end)
    users = np.array([0, 1, 2, 10**9])  # the last one is unknown: still gets candidates
    items, scores = retrieval.retrieve(s, users, at, 50)
    assert items.shape == scores.shape == (4, 50)
    assert (items >= 0).all()
    # The served index and a direct embedding agree (same towers, same index).
    emb = retrieval.embed_users(s, retrieval.user_tower_inputs_at(s, users, at))
    idx = FaissIndex.load(
        s.work_dir / index_build.INDEX_FILE,
        s.work_dir / index_build.META_FILE,
        s.work_dir / index_build.ITEM_IDS_FILE,
        device="cpu",
    )
    assert (idx.search(emb, 50)[1] == items).all()


def test_retrieval_beats_popularity_on_small(trained: Trained) -> None:
    """Recall@100 on the validation split: the towers must beat the most popular items."""
    from exporters.raw_tables import read_raw

    s = trained.settings
    split = load_split(s)
    inter = read_raw(s).interactions
    pos = inter[inter["event"].isin(["click", "purchase"])]
    relevant = split.val(pos).groupby("user_id")["item_id"].apply(set)
    users = relevant.index.to_numpy()
    items, _ = retrieval.retrieve(s, users, split.train_end, 100)
    popular = set(split.train(pos)["item_id"].value_counts().index[:100])

    def recall(rows) -> float:  # type: ignore[no-untyped-def]
        return float(
            np.mean(
                [
                    len(set(r) & relevant[u]) / len(relevant[u])
                    for u, r in zip(users, rows, strict=True)
                ]
            )
        )

    tower, pop = recall(items), recall([popular] * len(users))
    assert tower > pop + 0.03, (tower, pop)


def test_fast_scan_refine_index_loads_and_serves_exact_vectors(clustered, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The large catalogs' index kind (fast-scan PQ + exact refine) round-trips through
    FaissIndex.load (its factory string comes back as Refine(Flat)), scores are exact inner
    products, and the vectors the orchestrator ranks with are the refine stage's, exactly."""
    from orchestrator.serving_release import _index_vectors

    x, q = clustered
    x = x[:8000]
    factory = "IVF32,PQ32x4fsr,RFlat"
    index, stats = build_index(x, q, factory, "nprobe=8,k_factor_rf=2", k=50, min_recall=0.0)
    meta = {
        "factory": factory,
        "search_params": stats.search_params,
        "metric": "ip",
        "dim": DIM,
        "n_items": stats.n_items,
    }
    path, meta_path, ids = _write(tmp_path, index, meta, stats.n_items)
    idx = FaissIndex.load(path, meta_path, ids, device="cpu")
    scores, items = idx.search(q[:3], 50)
    rows = (items - 7) // 10
    exact = np.einsum("qd,qkd->qk", q[:3], x[rows])
    np.testing.assert_allclose(scores, exact, rtol=1e-5, atol=1e-5)
    vectors = _index_vectors(idx)
    np.testing.assert_array_equal(vectors, x)
    assert not vectors.flags.writeable
    with pytest.raises(IndexMismatchError, match="index factory"):
        FaissIndex.load(path, {**meta, "factory": "IVF32,Flat"}, ids, device="cpu")


def test_fast_scan_searched_one_query_at_a_time_as_in_batches(clustered, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Fast-scan indexes are searched with FAST_SCAN_IMPLEM wherever they are built or
    loaded (the build's recall check, serving, offline batches), and a request's single
    query finds exactly what the same query finds inside an offline batch."""
    from orchestrator.faiss_index import FAST_SCAN_IMPLEM, single_query_scan

    x, q = clustered
    factory = "IVF32,PQ32x4fsr,RFlat"
    index, stats = build_index(x, q, factory, "nprobe=8,k_factor_rf=2", k=50, min_recall=0.0)
    assert faiss.downcast_index(index.base_index).implem == FAST_SCAN_IMPLEM
    meta = {"factory": factory, "search_params": stats.search_params, "metric": "ip"}
    path, meta_path, ids = _write(tmp_path, index, meta, stats.n_items)
    idx = FaissIndex.load(path, meta_path, ids, device="cpu", omp_threads=None)
    assert faiss.downcast_index(idx.index.base_index).implem == FAST_SCAN_IMPLEM
    batch_scores, batch_items = idx.search(q[:40], 100)  # k > 20: the reservoir path
    for i in range(40):
        scores, items = idx.search(q[i : i + 1], 100)
        np.testing.assert_array_equal(items[0], batch_items[i])
        np.testing.assert_array_equal(scores[0], batch_scores[i])
    flat = faiss.IndexFlatIP(DIM)
    assert single_query_scan(flat) is flat  # other kinds: untouched


def test_index_without_gpu_implementation_stays_on_cpu(
    flat_files: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CUDA machine an index kind FAISS cannot copy to the GPU (fast-scan PQ) is
    searched on the CPU under device=auto, and is a clear error under device=cuda."""
    from orchestrator import faiss_index

    def no_gpu_copy(*_: object) -> None:
        raise RuntimeError("not implemented for this type of index")

    monkeypatch.setattr(faiss_index, "gpu_available", lambda: True)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: object(), raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", no_gpu_copy, raising=False)
    path, meta, ids, x = flat_files
    idx = FaissIndex.load(path, meta, ids, device="auto")
    assert not idx.on_gpu and idx.search(x[:1], 3)[1][0, 0] == 7
    with pytest.raises(RuntimeError, match="cannot run on the GPU"):
        FaissIndex.load(path, meta, ids, device="cuda")

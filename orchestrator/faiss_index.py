"""The FAISS index of a release, loaded for serving and offline evaluation.

``FaissIndex.load`` checks that the file is the index its metadata describes (factory
string recovered with ``reverse_index_factory``, metric, dimension, row count) so a wrong
or stale file fails at load time rather than answering with wrong neighbours. Searches
take ``[n, dim]`` float queries, check shapes (``ValueError``, never ``assert``) and return
``(scores, item_ids)`` like ``index.search`` returns ``(D, I)``, with row numbers already
mapped to item ids.

On a machine with CUDA-enabled FAISS (``faiss.get_num_gpus() > 0``) the index is copied to
GPU 0. On CPU, searches use one OpenMP thread by default: a single query is faster on one
thread than on two (DESIGN.md), and the server runs requests side by side anyway.

OpenMP's thread count is per thread, not per process: ``omp_set_num_threads`` sets it for
the calling thread only, and a thread that never called it gets the process default (the
number of cores, or ``OMP_NUM_THREADS``). Every thread that searches therefore sets it on
its first search. Before that, the orchestrator's worker threads each searched with a team
of one thread per core, whose helper spun in libgomp's wait loop after every search: one
worker on 2 cores cost 10.2 ms of CPU per request at 100/s instead of 5.7 (issue 13,
docs/benchmark.md). With more threads than cores libgomp throttles the spin, which hid it.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
from faiss.contrib.factory_tools import reverse_index_factory

log = logging.getLogger(__name__)

_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


class IndexMismatchError(ValueError):
    """The index file is not the index its metadata (index.json / manifest) describes."""

    def __init__(self, path: Path | str, what: str, expected: object, found: object) -> None:
        super().__init__(f"{path}: {what} is {found!r}, metadata says {expected!r}")


def gpu_available() -> bool:
    """FAISS was built with CUDA and sees at least one GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _canonical(factory: str, dim: int, metric: int) -> str:
    """``factory`` as ``reverse_index_factory`` spells it (e.g. ``…,RFlat`` comes back as
    ``…,Refine(Flat)``), from an empty index built with it: cheap, nothing is trained."""
    try:
        # Keep a reference: reverse_index_factory walks sub-indexes the parent owns.
        empty = faiss.index_factory(dim, factory, metric)
    except RuntimeError:  # not a factory string FAISS knows: cannot match any file
        return factory
    return str(reverse_index_factory(empty))


# FAISS's fast-scan search for k > 20 picks implementation 13 (int16 scan, results in a
# reservoir, queries processed in batches of ``qbs``). Requests search one query at a time,
# where 11 (the same scan and reservoir, without the query batching) is cheaper: on the
# `large` preset's 1M-item IVF4096,PQ64x4fsr,RFlat index at nprobe 256, k 500, one thread,
# 0.72 vs 0.88 ms per query, the same recall@500 (0.9556) and 99.996 % the same neighbours
# (ties in the int16 distances may pick another item at the cut). For batches of 1,000
# offline it costs ~10 % more; every search uses it anyway, so that training candidates,
# evaluation and serving see the same neighbours (docs/benchmark.md, session 11).
FAST_SCAN_IMPLEM = 11


def single_query_scan(index: faiss.Index) -> faiss.Index:
    """Set :data:`FAST_SCAN_IMPLEM` on the fast-scan part of ``index`` (itself, or the
    base of a refine stage); other index kinds are left as they are. Returns ``index``."""
    part = faiss.downcast_index(index)
    if isinstance(part, faiss.IndexRefine):
        part = faiss.downcast_index(part.base_index)
    if isinstance(part, faiss.IndexIVFFastScan):
        part.implem = FAST_SCAN_IMPLEM
    return index


@dataclass
class FaissIndex:
    """A loaded index plus its row → item_id map. Build with :meth:`load`."""

    index: faiss.Index
    item_ids: np.ndarray
    factory: str
    search_params: str
    dim: int
    on_gpu: bool
    _gpu_resources: Any = None  # keeps the GPU memory pool alive as long as the index
    # OpenMP threads per search on CPU (None: FAISS's default, for offline batches); set
    # in each searching thread on its first search (module docstring).
    omp_threads: int | None = None
    _omp_set: threading.local = field(default_factory=threading.local, repr=False)

    @classmethod
    def load(
        cls,
        path: Path | str,
        index_json: Path | str | Mapping[str, Any],
        item_ids: Path | str | np.ndarray,
        *,
        device: Literal["auto", "cpu", "cuda"] = "auto",
        omp_threads: int | None = 1,
    ) -> FaissIndex:
        """Read ``path`` (``index.faiss``), verify it against ``index_json`` (a path or
        the parsed dict with ``factory``, ``search_params``, ``metric``, ``dim``,
        ``n_items``) and ``item_ids`` (``index_item_ids.npy`` or an array), apply the
        search parameters, move it to the GPU when asked/available.

        ``omp_threads`` is FAISS's OpenMP threads per search on CPU, set in every thread
        that searches (``None`` leaves FAISS's default, which suits big offline batches)."""
        meta = (
            dict(index_json)
            if isinstance(index_json, Mapping)
            else json.loads(Path(index_json).read_text())
        )
        ids = np.asarray(item_ids if isinstance(item_ids, np.ndarray) else np.load(item_ids))
        index = faiss.read_index(str(path))
        factory = str(meta["factory"])
        metric = _METRICS.get(str(meta.get("metric", "ip")))
        if metric is None or index.metric_type != metric:
            raise IndexMismatchError(path, "metric type", meta.get("metric"), index.metric_type)
        found, want = reverse_index_factory(index), _canonical(factory, index.d, metric)
        if found != want:
            raise IndexMismatchError(path, "index factory", want, found)
        if "dim" in meta and index.d != int(meta["dim"]):
            raise IndexMismatchError(path, "dimension", int(meta["dim"]), index.d)
        if "n_items" in meta and index.ntotal != int(meta["n_items"]):
            raise IndexMismatchError(path, "row count", int(meta["n_items"]), index.ntotal)
        if ids.ndim != 1 or len(ids) != index.ntotal:
            raise IndexMismatchError(path, "item id count", index.ntotal, ids.shape)
        params = str(meta.get("search_params") or "")

        use_gpu = device == "cuda" or (device == "auto" and gpu_available())
        if use_gpu and not gpu_available():
            raise RuntimeError("device='cuda' but FAISS sees no GPU (is faiss-gpu installed?)")
        res = None
        if use_gpu:
            res = faiss.StandardGpuResources()
            try:
                index = faiss.index_cpu_to_gpu(res, 0, index)
            except RuntimeError as e:
                # Not every index kind has a GPU implementation (the 4-bit fast-scan PQ of
                # the large catalogs has none): asked for CUDA, say so; on auto, stay on CPU.
                if device == "cuda":
                    raise RuntimeError(f"{factory} cannot run on the GPU: {e}") from e
                log.warning("%s has no GPU implementation, searching on CPU: %s", factory, e)
                use_gpu, res = False, None
        # set_index_parameters takes FAISS's parameter string ("nprobe=64,..."); its
        # generated stub says int, hence the ignores.
        if use_gpu:
            if params:
                faiss.GpuParameterSpace().set_index_parameters(index, params)  # type: ignore[arg-type]
        else:
            if params:
                faiss.ParameterSpace().set_index_parameters(index, params)  # type: ignore[arg-type]
            single_query_scan(index)
        log.info(
            "loaded %s: %s (%s), %d items, dim %d, %s",
            path,
            factory,
            params or "-",
            index.ntotal,
            index.d,
            "GPU" if use_gpu else "CPU",
        )
        return cls(
            index=index,
            item_ids=ids.astype(np.int64, copy=False),
            factory=factory,
            search_params=params,
            dim=int(index.d),
            on_gpu=use_gpu,
            _gpu_resources=res,
            omp_threads=None if use_gpu else omp_threads,
        )

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items for each query row: ``(scores [n, k] float32, item_ids [n, k]
        int64)``, best first. ``k`` larger than the catalog is cut to its size; slots the
        index could not fill hold item id ``-1``."""
        scores, rows = self.search_rows(queries, k)
        item_ids = np.where(rows >= 0, self.item_ids[np.clip(rows, 0, None)], -1)
        return scores, item_ids

    def search_rows(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` in the index's rows (``item_ids`` positions; ``-1`` where
        unfilled) instead of item ids."""
        if not isinstance(queries, np.ndarray):
            raise ValueError(f"queries must be a numpy array, got {type(queries).__name__}")
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must have shape [n, {self.dim}], got {queries.shape}")
        if not np.issubdtype(queries.dtype, np.floating):
            raise ValueError(f"queries must be floating point, got {queries.dtype}")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if not np.isfinite(q).all():
            raise ValueError("queries contain NaN or infinity")
        k = min(int(k), len(self))
        if len(q) == 0 or k == 0:
            return np.zeros((len(q), k), np.float32), np.zeros((len(q), k), np.int64)
        if self.omp_threads is not None and not getattr(self._omp_set, "done", False):
            faiss.omp_set_num_threads(self.omp_threads)  # this thread's setting only
            self._omp_set.done = True
        scores, rows = self.index.search(q, k)
        return scores, rows

"""Offline retrieval with the exported towers and the built index: what the ranker's
candidate generation and the evaluation use, so both see exactly what serving retrieves.

``retrieve(settings, user_ids, at, k)`` = user-tower inputs as of ``at`` (profile plus
history strictly before ``at``) → ``work/user_tower.onnx`` in onnxruntime →
``work/index.faiss`` top-k. Everything is batched; the raw tables, the history table,
the ONNX sessions and the index are loaded once per process and data snapshot.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd

from exporters.history import recent_items_table
from exporters.index_build import INDEX_FILE, ITEM_IDS_FILE, META_FILE
from exporters.onnx_export import ARTIFACTS, run_onnx, session
from exporters.raw_tables import RawTables, read_raw
from exporters.tower_inputs import UserInputs, item_inputs, users_at
from orchestrator.faiss_index import FaissIndex
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

BATCH = 8192


@dataclass
class Retriever:
    """Loaded tables and towers of one work directory; the index loads on first use."""

    settings: Settings
    tables: RawTables
    history: pd.DataFrame
    user_tower: ort.InferenceSession
    item_tower: ort.InferenceSession
    _index: FaissIndex | None = None

    @classmethod
    def open(cls, settings: Settings) -> Retriever:
        work = settings.work_dir
        towers = [work / ARTIFACTS["user_tower"], work / ARTIFACTS["item_tower"]]
        _require(towers)
        tables = read_raw(settings)
        return cls(
            settings=settings,
            tables=tables,
            history=recent_items_table(tables.interactions),
            user_tower=session(towers[0]),
            item_tower=session(towers[1]),
        )

    @property
    def index(self) -> FaissIndex:
        if self._index is None:
            work = self.settings.work_dir
            paths = [work / INDEX_FILE, work / META_FILE, work / ITEM_IDS_FILE]
            _require(paths)
            # Offline batches: let FAISS use all threads (serving pins one per query).
            self._index = FaissIndex.load(*paths, device=self.settings.device, omp_threads=None)
        return self._index

    def user_inputs_at(
        self, user_ids: np.ndarray, at: pd.Timestamp | pd.DatetimeIndex
    ) -> UserInputs:
        return users_at(self.tables, _ids(user_ids), _utc(at), history=self.history)

    def embed_users(self, inputs: UserInputs) -> np.ndarray:
        return run_onnx(self.user_tower, inputs, BATCH)

    def embed_items(self, item_ids: np.ndarray, at: pd.Timestamp) -> np.ndarray:
        inputs = item_inputs(self.tables.items, _ids(item_ids), _utc(at))
        return run_onnx(self.item_tower, inputs, BATCH)

    def retrieve(
        self, user_ids: np.ndarray, at: pd.Timestamp | pd.DatetimeIndex, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        emb = self.embed_users(self.user_inputs_at(user_ids, at))
        scores, items = self.index.search(emb, k)
        return items, scores


def _require(paths: list[Path]) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UserError(
            f"missing {', '.join(missing)}: run `recstack train` (steps two_tower, "
            "onnx_export, index) first"
        )


_CACHE: dict[tuple[str, ...], Retriever] = {}


def _cache_key(settings: Settings) -> tuple[str, ...]:
    """Reload when the data snapshot or any artifact changes."""
    work = settings.work_dir
    parts = [str(settings.data_dir), settings.device]
    for p in (
        settings.raw_dir / "meta.json",
        work / ARTIFACTS["user_tower"],
        work / ARTIFACTS["item_tower"],
        work / META_FILE,
    ):
        parts.append(str(p.stat().st_mtime_ns) if p.exists() else "-")
    return tuple(parts)


def retriever(settings: Settings) -> Retriever:
    """The (cached) :class:`Retriever` for ``settings``' work directory."""
    key = _cache_key(settings)
    if key not in _CACHE:
        _CACHE.clear()  # one data set at a time: tables can be large
        _CACHE[key] = Retriever.open(settings)
    return _CACHE[key]


def user_tower_inputs_at(
    settings: Settings, user_ids: np.ndarray, at: pd.Timestamp | pd.DatetimeIndex
) -> UserInputs:
    """User tower inputs as of ``at``: profile, and recent items of events strictly before
    ``at`` (keys and shapes as in user_tower/config.pbtxt)."""
    return retriever(settings).user_inputs_at(user_ids, at)


def embed_users(settings: Settings, inputs: UserInputs) -> np.ndarray:
    """User embeddings ``[n, 64]`` from ``work/user_tower.onnx``."""
    return retriever(settings).embed_users(inputs)


def embed_items(settings: Settings, item_ids: np.ndarray, at: pd.Timestamp) -> np.ndarray:
    """Item embeddings ``[n, 64]`` from ``work/item_tower.onnx``, ages measured at ``at``."""
    return retriever(settings).embed_items(item_ids, at)


def retrieve(
    settings: Settings, user_ids: np.ndarray, at: pd.Timestamp | pd.DatetimeIndex, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` candidates of each user as of ``at``: ``(item_ids [n, k], scores [n, k])``
    from ``work/index.faiss``, best first (``k`` is cut to the catalog size)."""
    return retriever(settings).retrieve(user_ids, at, k)


def index_meta(settings: Settings) -> dict[str, object]:
    """The parsed ``work/index.json``."""
    return json.loads((settings.work_dir / META_FILE).read_text())  # type: ignore[no-any-return]


def _ids(ids: np.ndarray) -> np.ndarray:
    a = np.asarray(ids)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"ids must be a 1-D integer array, got {a.dtype} {a.shape}")
    return a.astype(np.int64, copy=False)


def _utc(at: pd.Timestamp | pd.DatetimeIndex) -> Any:
    """UTC, for one time or one per row."""
    if isinstance(at, pd.DatetimeIndex | np.ndarray | pd.Series):
        t = pd.DatetimeIndex(at)
        return t.tz_localize("UTC") if t.tz is None else t.tz_convert("UTC")
    t = pd.Timestamp(at)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")

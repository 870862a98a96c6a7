"""The ranker's feature assembly: one user and N candidate items in, N ranker rows out.

This is THE assembly shared by training and serving. Training (``exporters/ranker_train.py``)
runs :class:`RankFeatures` in PyTorch through :func:`assemble`; serving runs the very same
module exported to ONNX (:func:`export_onnx`) as the ``rank_features`` Triton model, whose
``config.pbtxt`` names the inputs. Nothing else computes ranker features.

Where the inputs come from (:class:`Layout`): the Feast ``ranking`` feature service. Its
user features are split into the scalar ``user_features`` and the per-category affinity
array; its item features into the scalar ``item_features``, the item's category (for the
affinity gather) and its creation time (for the age at request time). The layout is read
from the Feast definitions, so the feature lists exist only in ``feature_repo/``.

Output columns (:func:`feature_names`): the user's scalar features, the item's scalar
features, then the cross features in :data:`CROSS_FEATURES`. Scalar features named
``*_at`` (unix seconds) come out as days before the request.

Serving, step by step (what training does in ``ranker_train.candidate_rows``):
``layout = Layout.from_json(ranker_manifest["layout"])``; Feast values of the user and of
the candidates (keyed by feature name) -> :func:`user_arrays` / :func:`item_arrays`;
``user_embedding`` from the user tower, ``item_embedding`` = the release index's item
vectors (what training used); ``request_time`` in unix seconds (float64).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from exporters import model_config
from exporters.feature_tables import default_value
from exporters.rank_layout import (  # noqa: F401 - re-exported: the assembly's contract
    CANDIDATE_CROSS_FEATURES,
    CATEGORY,
    CREATED_AT,
    CROSS_FEATURES,
    I2I_SCORE,
    ITEM_KEY,
    NO_PRICE_REFERENCE,
    POP_LOG_COUNT,
    PRICE,
    TIME_SUFFIX,
    USER_KEY,
    USER_MEAN_PRICE,
    Layout,
    _output_name,
    feature_names,
    is_time_feature,
    layout_from_service,
)

log = logging.getLogger(__name__)

MODEL_NAME = "rank_features"
EMBEDDING_DIM = 64
SECONDS_PER_DAY = 86400.0


class RankFeatures(nn.Module):
    """One user, N candidates -> ``rank_input`` [N, F] float32 (see :data:`CROSS_FEATURES`).

    Stateless (no parameters): all its knowledge is the layout's sizes, the positions of
    the two price features and which scalar columns are times (turned into days before the
    request). Inputs and dtypes follow ``model_repository/rank_features``.
    """

    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self.layout = layout
        self.n_user = len(layout.user_features)
        self.n_item = len(layout.item_columns)
        self.n_categories = layout.n_categories
        if self.n_categories <= 0:
            raise ValueError(f"n_categories must be positive, got {self.n_categories}")
        self.item_price_idx = _index(layout.item_features, layout.item_price_feature)
        self.user_price_idx = _index(layout.user_features, layout.user_price_feature)
        user_times = [is_time_feature(n) for n in layout.user_features]
        item_times = [is_time_feature(n) for n in layout.item_columns]
        self.user_time_mask: torch.Tensor
        self.item_time_mask: torch.Tensor
        self.register_buffer("user_time_mask", torch.tensor(user_times, dtype=torch.bool))
        self.register_buffer("item_time_mask", torch.tensor(item_times, dtype=torch.bool))
        self.has_user_times, self.has_item_times = any(user_times), any(item_times)
        # Candidate-source columns compared within the request (CANDIDATE_CROSS_FEATURES).
        self.candidate_cross = bool(layout.candidate_features)
        if self.candidate_cross:
            self.i2i_idx = layout.item_columns.index(I2I_SCORE)
            self.pop_idx = layout.item_columns.index(POP_LOG_COUNT)

    def forward(
        self,
        user_features: torch.Tensor,  # [1, U] float32
        user_category_affinity: torch.Tensor,  # [1, C] float32
        user_embedding: torch.Tensor,  # [1, 64] float32
        item_features: torch.Tensor,  # [N, I] float32
        item_category: torch.Tensor,  # [N] int64
        item_created_at: torch.Tensor,  # [N] float64, unix seconds
        item_embedding: torch.Tensor,  # [N, 64] float32
        request_time: torch.Tensor,  # [1] float64, unix seconds
    ) -> torch.Tensor:
        n = item_features.shape[0]
        user = user_features.expand(n, self.n_user)
        score = (item_embedding * user_embedding).sum(dim=1, keepdim=True)

        # Unknown or new categories (outside 0..C-1) get affinity 0 instead of an
        # out-of-range gather, which would fail in onnxruntime.
        c = self.n_categories
        valid = (item_category >= 0) & (item_category < c)
        affinity = user_category_affinity[0].index_select(0, item_category.clamp(0, c - 1))
        affinity = torch.where(valid, affinity, torch.zeros_like(affinity)).unsqueeze(1)
        top = user_category_affinity.max()
        affinity_rel = torch.where(top > 0, affinity / top, torch.zeros_like(affinity))

        # Unix seconds need float64: in float32 they are only good to ~2 minutes.
        age = ((request_time - item_created_at) / SECONDS_PER_DAY).to(torch.float32).unsqueeze(1)

        if self.item_price_idx is None or self.user_price_idx is None:
            price_rel = torch.full_like(score, NO_PRICE_REFERENCE)
        else:
            item_price = item_features[:, self.item_price_idx : self.item_price_idx + 1]
            user_price = user_features[:, self.user_price_idx : self.user_price_idx + 1]
            # NaN (no purchase yet) compares false, so it also gets the sentinel.
            has_ref = user_price > 0
            safe = torch.where(has_ref, user_price, torch.ones_like(user_price))
            price_rel = torch.where(
                has_ref, item_price / safe, torch.full_like(item_price, NO_PRICE_REFERENCE)
            )
        items = item_features
        if self.has_user_times:
            user = _days_before(user, self.user_time_mask, request_time)
        if self.has_item_times:
            items = _days_before(items, self.item_time_mask, request_time)
        cols = [user, items, score, affinity, affinity_rel, age, price_rel]
        if self.candidate_cross:
            i2i = item_features[:, self.i2i_idx : self.i2i_idx + 1]
            pop = item_features[:, self.pop_idx : self.pop_idx + 1]
            top_i2i = i2i.max()
            i2i_rel = torch.where(
                top_i2i > 0, i2i / top_i2i.clamp(min=1e-12), torch.zeros_like(i2i)
            )
            cols += [score - score.max(), i2i_rel, pop - pop.max()]
        return torch.cat(cols, 1)


def _days_before(x: torch.Tensor, mask: torch.Tensor, request_time: torch.Tensor) -> torch.Tensor:
    """Columns of ``x`` where ``mask`` holds unix seconds -> days before ``request_time``
    (computed in float64: both sides are exact there), other columns unchanged."""
    days = ((request_time - x.to(torch.float64)) / SECONDS_PER_DAY).to(torch.float32)
    return torch.where(mask, days, x)


def _index(names: Sequence[str], name: str | None) -> int | None:
    if name is None:
        return None
    try:
        return list(names).index(name)
    except ValueError:
        raise ValueError(f"feature {name!r} is not among {list(names)}") from None


# --- Feast values -> assembly inputs (training and serving) -------------------------------


def _column(frame: Mapping[str, Any], name: str, dtype: type) -> np.ndarray:
    """A feature column as ``dtype``. Feast's None (no value as of the request) becomes the
    feature's documented default (exporters/feature_tables.py ``default_value``), the
    value the serving path fills in too."""
    values = pd.to_numeric(pd.Series(frame[name], dtype=object), errors="coerce")
    return values.fillna(default_value(name)).to_numpy(dtype=np.float64).astype(dtype)


def user_arrays(frame: Mapping[str, Any], layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """``(user_features [n, U] float32, user_category_affinity [n, C] float32)`` from Feast
    values keyed by feature name (a DataFrame or a dict of columns, one entry per user).

    A missing scalar gets its default (see :func:`_column`); a missing or wrongly sized
    affinity vector is all zeros, as for a user without events."""
    n = len(frame[layout.affinity_feature])
    cols = [_column(frame, name, np.float32) for name in layout.user_features]
    feats = np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.float32)
    c = layout.n_categories
    affinity = np.zeros((n, c), dtype=np.float32)
    for row, vec in enumerate(frame[layout.affinity_feature]):
        if isinstance(vec, list | tuple | np.ndarray) and len(vec) == c:
            affinity[row] = np.asarray(vec, dtype=np.float32)
    return feats, np.nan_to_num(affinity, nan=0.0)


def item_arrays(
    frame: Mapping[str, Any], layout: Layout
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(item_features [n, I] float32, item_category [n] int64, item_created_at [n]
    float64)`` from Feast values keyed by feature name, one entry per item. Missing values
    get their defaults (see :func:`_column`; an unknown category is -1: affinity 0)."""
    n = len(frame[layout.category_feature])
    cols = [_column(frame, name, np.float32) for name in layout.item_features]
    feats = np.stack(cols, axis=1) if cols else np.zeros((n, 0), dtype=np.float32)
    category = _column(frame, layout.category_feature, np.float64).astype(np.int64)
    created = _column(frame, layout.created_at_feature, np.float64)
    return feats, category, created


# --- example inputs, shared by the export, its parity check and the tests -----------------


def example_inputs(layout: Layout, n: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs with realistic ranges (including unknown categories and a NaN user
    price), keyed by tensor name in ``config.pbtxt`` order."""
    rng = np.random.default_rng(seed)
    u, c, i = len(layout.user_features), layout.n_categories, len(layout.item_columns)
    now = 1.75e9 + rng.uniform(0, 1e6)
    user = rng.gamma(2.0, 10.0, size=(1, u))
    for j, name in enumerate(layout.user_features):
        if is_time_feature(name):
            user[0, j] = now - rng.uniform(0, 60 * SECONDS_PER_DAY)
    user = user.astype(np.float32)
    if u and seed % 2 == 1:
        user[0, 0] = np.nan
    item = rng.gamma(2.0, 20.0, size=(n, i))
    for j, name in enumerate(layout.item_columns):
        if is_time_feature(name):
            item[:, j] = now - rng.uniform(0, 60 * SECONDS_PER_DAY, size=n)
    cats = rng.integers(-1, c + 2, size=n).astype(np.int64)
    return {
        "user_features": user,
        "user_category_affinity": rng.dirichlet(np.ones(c)).astype(np.float32)[None, :],
        "user_embedding": _unit(rng.normal(size=(1, EMBEDDING_DIM))),
        "item_features": item.astype(np.float32),
        "item_category": cats,
        "item_created_at": now - rng.uniform(0, 200 * SECONDS_PER_DAY, size=n),
        "item_embedding": _unit(rng.normal(size=(n, EMBEDDING_DIM))),
        "request_time": np.array([now], dtype=np.float64),
    }


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def run_torch(module: RankFeatures, inputs: Mapping[str, np.ndarray]) -> np.ndarray:
    """The module on numpy inputs (keyword names as in ``config.pbtxt``)."""
    with torch.no_grad():
        out = module(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()})
    return out.numpy()


# --- training rows ---------------------------------------------------------------------------


def assemble(
    layout: Layout,
    *,
    user_features: np.ndarray,
    user_category_affinity: np.ndarray,
    user_embedding: np.ndarray,
    request_time: np.ndarray,
    item_features: np.ndarray,
    item_category: np.ndarray,
    item_created_at: np.ndarray,
    item_embedding: np.ndarray,
    query: np.ndarray,
) -> np.ndarray:
    """Ranker rows for many requests at once, computed by the same :class:`RankFeatures`.

    Per-request arrays (``Q`` rows, one per query): user features [Q, U], affinity [Q, C],
    user embedding [Q, 64], request time [Q] (unix s). Per-candidate arrays (``R`` rows):
    item features [R, I], category [R], created_at [R] (unix s), item embedding [R, 64],
    and ``query`` [R], the index 0..Q-1 of each candidate's request. Rows of one request
    need not be contiguous; the output keeps the input row order. Returns [R, F] float32.
    """
    module = RankFeatures(layout).eval()
    query = np.asarray(query, dtype=np.int64)
    n_rows = query.size
    out = np.empty((n_rows, layout.n_features), dtype=np.float32)
    order = np.argsort(query, kind="stable")
    bounds = np.searchsorted(query[order], np.arange(len(user_features) + 1))
    f32 = np.float32
    with torch.no_grad():
        for q in range(len(user_features)):
            rows = order[bounds[q] : bounds[q + 1]]
            if rows.size == 0:
                continue
            res = module(
                torch.from_numpy(np.ascontiguousarray(user_features[q : q + 1], dtype=f32)),
                torch.from_numpy(
                    np.ascontiguousarray(user_category_affinity[q : q + 1], dtype=f32)
                ),
                torch.from_numpy(np.ascontiguousarray(user_embedding[q : q + 1], dtype=f32)),
                torch.from_numpy(np.ascontiguousarray(item_features[rows], dtype=f32)),
                torch.from_numpy(np.ascontiguousarray(item_category[rows], dtype=np.int64)),
                torch.from_numpy(np.ascontiguousarray(item_created_at[rows], dtype=np.float64)),
                torch.from_numpy(np.ascontiguousarray(item_embedding[rows], dtype=f32)),
                torch.from_numpy(np.asarray(request_time[q : q + 1], dtype=np.float64)),
            )
            out[rows] = res.numpy()
    return out


# --- ONNX export -----------------------------------------------------------------------------


class AssemblyParityError(RuntimeError):
    """The exported ONNX feature assembly does not reproduce the PyTorch module."""

    def __init__(self, path: Path, max_abs_diff: float, tolerance: float) -> None:
        super().__init__(
            f"{path}: ONNX feature assembly differs from PyTorch by {max_abs_diff:.3g} "
            f"(tolerance {tolerance:g})"
        )
        self.max_abs_diff = max_abs_diff


def export_onnx(
    path: Path,
    layout: Layout,
    repository: Path,
    *,
    tolerance: float = 1e-5,
    opset: int = 17,
) -> dict[str, Any]:
    """Export :class:`RankFeatures` to ``path`` (ONNX, dynamic N) with the tensor names of
    ``<repository>/rank_features/config.pbtxt``, then check it against PyTorch on random
    inputs (several N, unknown categories, NaN). Raises :class:`AssemblyParityError` and
    leaves no file at ``path`` when the max abs diff reaches ``tolerance``. Returns the
    parity record."""
    names_in = model_config.input_names(MODEL_NAME, repository)
    names_out = model_config.output_names(MODEL_NAME, repository)
    module = RankFeatures(layout).eval()
    expected = list(example_inputs(layout, 3))
    if names_in != expected:
        raise ValueError(
            f"{model_config.config_path(MODEL_NAME, repository)}: inputs {names_in} do not "
            f"match RankFeatures.forward {expected}"
        )
    sample = example_inputs(layout, 7, seed=1)
    # The candidate axis N is the graph's only dynamic axis, named "n": every tensor whose
    # config.pbtxt dims start with -1 (max_batch_size 0, so dim 0 is N). The other -1s of
    # the config are widths the layout fixes; the graph keeps them fixed, and the
    # production config takes them from the graph (exporters/triton_configs.py), as
    # NVIDIA's onnxruntime backend requires every fixed model dim to equal the config's.
    config = model_config.load_config(MODEL_NAME, repository)
    dynamic = {
        t.name: {0: "n"} for t in (*config.input, *config.output) if list(t.dims[:1]) == [-1]
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # The legacy (TorchScript) exporter, chosen on purpose as for the towers
    # (exporters/onnx_export.py), warns that it is deprecated: not a problem of the run.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            tuple(torch.from_numpy(v) for v in sample.values()),
            str(tmp),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=dynamic,
            opset_version=opset,
            dynamo=False,
        )
    from exporters.onnx_export import declare_config_dims

    declare_config_dims(tmp, MODEL_NAME, repository)
    try:
        record = check_onnx_parity(tmp, layout, tolerance=tolerance)
    except AssemblyParityError:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    log.info("rank_features ONNX: %s, max abs diff vs torch %.3g", path, record["max_abs_diff"])
    return record


def check_onnx_parity(
    path: Path, layout: Layout, *, tolerance: float = 1e-5, sizes: Sequence[int] = (1, 37, 500)
) -> dict[str, Any]:
    """Compare the ONNX file with :class:`RankFeatures` on random inputs of several sizes
    (NaN must match NaN). Raises :class:`AssemblyParityError` at or above ``tolerance``."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    module = RankFeatures(layout).eval()
    worst = 0.0
    for seed, n in enumerate(sizes):
        inputs = example_inputs(layout, n, seed=seed)
        want = run_torch(module, inputs)
        got = sess.run(None, inputs)[0]
        if got.shape != want.shape or not np.array_equal(np.isnan(got), np.isnan(want)):
            raise AssemblyParityError(Path(path), float("inf"), tolerance)
        diff = np.abs(np.nan_to_num(got) - np.nan_to_num(want))
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
    if not worst < tolerance:
        raise AssemblyParityError(Path(path), worst, tolerance)
    return {"max_abs_diff": worst, "tolerance": tolerance, "sizes": list(sizes)}

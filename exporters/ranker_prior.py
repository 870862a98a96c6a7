"""The ranker's prior: the best baseline's order, as the first tree of the ranker.

The ranker is a LightGBM lambdarank model boosted from a *prior*, not from zero: one
regression tree that scores each candidate by the DCG discount of its rank in a baseline
order (most-popular or item-to-item: the gate's baselines, ``c_pop_rank`` /
``c_i2i_rank`` among the ranker's columns), chosen as the better of the two on the
ranker's training requests of the validation window (the test's kind of request). The
lambdarank trees then learn corrections to that order. Where they learn little — a few
hundred requests, noisy early stopping, light users whose test requests differ from the
heavy users' training ones — the ranker serves the baseline's order instead of a weakly
fitted one (docs/quality.md, "The ranker's prior").

The prior is a tree of the model itself (``lgb.train(init_model=...)`` merges it), so the
exported model, Treelite/FIL, the parity checks and serving need nothing new.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import lightgbm as lgb
import numpy as np

from exporters import metrics
from exporters.candidates import ABSENT_RANK
from recstack.settings import RANKER_PRIORS

log = logging.getLogger(__name__)

# A baseline's order is the ascending order of one source feature (lower = better); the
# evaluation ranks its baselines the same way (exporters/evaluate.py).
SOURCE_BASELINES: dict[str, str] = {
    "retrieval": "c_ann_rank",
    "item_to_item": "c_i2i_rank",
    "popularity": "c_pop_rank",
}
# A release must beat these (DESIGN.md "Quality is judged against baselines"); the prior
# is one of them.
GATE_BASELINES: tuple[str, ...] = ("popularity", "item_to_item")
# The setting's values are named once, in recstack/settings.py; they must be these.
PRIOR_CHOICES: tuple[str, ...] = RANKER_PRIORS
if set(PRIOR_CHOICES) != {"auto", "none", *GATE_BASELINES}:
    raise ImportError(f"settings' ranker priors {PRIOR_CHOICES}: not auto, none, {GATE_BASELINES}")
# Ranks below this get their own prior value; later ranks (and absent candidates) get 0.
# A top-10 list after the seen filter and the category cap reaches a few dozen ranks deep.
PRIOR_DEPTH = 250


def prior_value(rank: np.ndarray) -> np.ndarray:
    """The prior's score of a baseline rank: the DCG discount 1 / log2(rank + 2) (rank 0:
    1.0, rank 9: 0.29), 0 from :data:`PRIOR_DEPTH` on and for absent candidates."""
    rank = np.asarray(rank, dtype=np.float64)
    inside = rank < PRIOR_DEPTH
    return np.where(inside, 1.0 / np.log2(np.where(inside, rank, 0.0) + 2.0), 0.0)


def order_ndcg(
    key: np.ndarray, y: np.ndarray, query: np.ndarray, position: np.ndarray, k: int
) -> float:
    """Mean NDCG@k over the requests with a positive row, each request's rows ordered by
    ``key`` ascending (ties: merged position), gain 2^y - 1: ``metrics.ndcg_at_k`` with
    the rows' labels as the relevant items (tested equal), over row arrays instead of
    item lists and relevance dicts, vectorized for millions of training rows."""
    gain = np.exp2(y) - 1.0
    n_q = int(query.max()) + 1 if len(query) else 0

    def dcg(sort_key: np.ndarray) -> np.ndarray:
        rows, rank = metrics.rank_within_query(query, sort_key, position, n_q)
        top = rank < k
        return np.bincount(
            query[rows][top], weights=gain[rows][top] / np.log2(rank[top] + 2.0), minlength=n_q
        )

    best = dcg(-y)  # the ideal order: best labels first
    useful = best > 0
    if not useful.any():
        return 0.0
    return float(np.mean(dcg(key)[useful] / best[useful]))


@dataclass(frozen=True)
class PriorChoice:
    """Which baseline the ranker is boosted from (None: from zero) and why."""

    baseline: str | None
    feature: str | None
    setting: str
    training_ndcg: dict[str, float]
    requests: int  # requests with a positive row that judged
    k: int = 10

    def to_json(self) -> dict[str, Any]:
        return {
            "baseline": self.baseline,
            "feature": self.feature,
            "setting": self.setting,
            "depth": PRIOR_DEPTH,
            f"training_ndcg@{self.k}": self.training_ndcg,
            "requests": self.requests,
        }


def choose(
    setting: str,
    names: Sequence[str],
    rows: np.ndarray,
    y: np.ndarray,
    query: np.ndarray,
    position: np.ndarray,
    k: int,
    where: np.ndarray | None = None,
) -> PriorChoice:
    """The prior for ``setting`` (:data:`PRIOR_CHOICES`): ``auto`` takes the gate baseline
    whose order scores the higher NDCG@k on the rows ``where`` selects (the caller's
    choice: the validation window's training requests; default all rows); a layout
    without the source features has no prior."""
    if setting not in PRIOR_CHOICES:
        raise ValueError(f"ranker prior must be one of {PRIOR_CHOICES}, got {setting!r}")
    present = [b for b in GATE_BASELINES if SOURCE_BASELINES[b] in names]
    sel = slice(None) if where is None else where
    # One column at a time: selecting rows of the whole matrix would copy gigabytes.
    scores = {
        b: round(
            order_ndcg(
                rows[sel, list(names).index(SOURCE_BASELINES[b])],
                y[sel],
                query[sel],
                position[sel],
                k,
            ),
            5,
        )
        for b in present
    }
    if setting == "none" or (setting == "auto" and not present):
        baseline = None
    elif setting == "auto":
        baseline = max(present, key=lambda b: scores[b])
    elif setting in present:
        baseline = setting
    else:  # asked for by name, it cannot be left out silently
        raise ValueError(f"ranker prior {setting!r}: the layout has no {SOURCE_BASELINES[setting]}")
    feature = SOURCE_BASELINES[baseline] if baseline else None
    requests = len(np.unique(query[sel][y[sel] > 0]))
    log.info(
        "ranker prior: %s (%s; NDCG@%d %s on %d requests)", baseline, setting, k, scores, requests
    )
    return PriorChoice(baseline, feature, setting, scores, requests, k)


def prior_booster(names: Sequence[str], feature: str, num_threads: int) -> lgb.Booster:
    """One regression tree over the ranker's columns that gives each row
    ``prior_value(row[feature])``: fitted on one row per rank (every other column 0, so
    no split uses them), one leaf per rank, and checked to reproduce the values."""
    j = list(names).index(feature)
    ranks = np.concatenate([np.arange(PRIOR_DEPTH + 1, dtype=np.float64), [ABSENT_RANK]])
    x = np.zeros((len(ranks), len(names)), dtype=np.float32)
    x[:, j] = ranks
    target = prior_value(ranks)
    bins = {"max_bin": len(ranks) + 1, "min_data_in_bin": 1, "feature_pre_filter": False}
    params = {
        "objective": "regression",
        "num_leaves": len(ranks),
        "min_data_in_leaf": 1,
        "min_sum_hessian_in_leaf": 0.0,
        "learning_rate": 1.0,
        "lambda_l2": 0.0,
        "boost_from_average": False,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": num_threads,
        "verbosity": -1,
        **bins,
    }
    data = lgb.Dataset(x, target, feature_name=list(names), params=bins)
    booster = lgb.train(params, data, num_boost_round=1)
    # Ranks between the fitted ones fall into the leaf of the rank below (thresholds lie
    # between integers); check the fitted ones and a few beyond the depth.
    probe = np.zeros((PRIOR_DEPTH + 3, len(names)), dtype=np.float32)
    probe[:, j] = np.concatenate([np.arange(PRIOR_DEPTH + 1), [PRIOR_DEPTH * 4, ABSENT_RANK]])
    error = np.abs(booster.predict(probe) - prior_value(probe[:, j])).max()
    if error > 1e-5:
        raise RuntimeError(f"the ranker prior tree misses its values by {error:.2g}")
    return booster

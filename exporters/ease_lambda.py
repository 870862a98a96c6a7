"""EASE's regularisation λ, chosen on the validation window (pipeline step ``candidates``).

The item-to-item source is EASE (Steck 2019) on catalogs up to
``baselines.EASE_MAX_ITEMS`` items, and its best λ depends on the data: on a
MovieLens-100k-like file λ = 250 is about right, on a MovieLens-1M-sized one 2,500 scores
~12 % more NDCG@10 (docs/quality.md, "EASE's λ"). A fixed λ made the item-to-item
source — the candidates, the ranker's features and prior, and the gate's baseline — weaker
than a tuned closed-form model on denser data. With ``ease_lambda_tune``
(``RECSTACK_EASE_LAMBDA_TUNE``; off by default: the tuned source is also the gate's
item-to-item baseline, docs/quality.md) the ``candidates`` step fits EASE at each λ of
:data:`GRID` on what the validation requests may know, scores the validation users'
unseen items and keeps the λ with the best NDCG@10 (graded labels, the report's metric);
every cut then uses it. Catalogs above :data:`TUNE_MAX_ITEMS` keep the fixed λ
(``RECSTACK_EASE_LAMBDA``; one fit there costs minutes, not seconds).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from exporters import baselines, metrics
from exporters.labels import relevance

log = logging.getLogger(__name__)

GRID: tuple[float, ...] = (100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0)
# One dense fit per λ: ~1-3 s at 3,700 items on 2 cores, growing with the cube.
TUNE_MAX_ITEMS = 5000
MAX_USERS = 3000  # validation users scored per λ (seeded sample)


@dataclass(frozen=True)
class LambdaChoice:
    """The λ every cut's EASE uses, and why."""

    lam: float
    how: str  # "validation", "setting", or why the default was kept
    validation_ndcg: dict[str, float]
    users: int

    def to_json(self) -> dict[str, Any]:
        return {
            "lambda": self.lam,
            "how": self.how,
            "validation_ndcg@10": self.validation_ndcg,
            "users": self.users,
        }


def choose(
    known: pd.DataFrame,
    labels: pd.DataFrame,
    item_ids: np.ndarray,
    events: Sequence[str],
    default: float,
    grid: Sequence[float] = GRID,
    max_users: int = MAX_USERS,
    seed: int = 0,
) -> LambdaChoice:
    """The λ of ``grid`` whose EASE, fitted on ``known`` (the events the validation
    requests may know, ``events`` only, as the source uses them), gives the validation
    users (``labels``: ``user_id, item_id, label``) the best NDCG@10 over their unseen
    items of ``item_ids``; ``default`` when the catalog is above :data:`TUNE_MAX_ITEMS`
    or no validation user has known events. Ties keep the smaller λ."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if len(item_ids) > TUNE_MAX_ITEMS:
        return LambdaChoice(
            default, f"default: {len(item_ids):,} items > {TUNE_MAX_ITEMS:,}", {}, 0
        )
    X, row_users = baselines.interaction_matrix(known, item_ids, events=events)
    users = np.intersect1d(labels["user_id"].unique(), row_users)
    if len(users) == 0:
        return LambdaChoice(default, "default: no validation user with known events", {}, 0)
    if len(users) > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, max_users, replace=False))
    X_u = X[np.searchsorted(row_users, users)]
    relevant = relevance(labels, users)
    scores: dict[str, float] = {}
    for lam in grid:
        B = baselines.ease_weights(X, lam=lam)
        top = baselines.top_k_unseen(baselines.score_users(X_u, B), X_u, 10)
        ranked = np.where(top >= 0, item_ids[np.maximum(top, 0)], -1)
        scores[f"{lam:g}"] = round(metrics.ndcg_at_k(ranked, relevant, 10), 5)
    best = max(grid, key=lambda lam: (scores[f"{lam:g}"], -lam))
    log.info("EASE λ %g chosen on %d validation users (NDCG@10 %s)", best, len(users), scores)
    return LambdaChoice(best, "validation", scores, len(users))

"""The positives every quality number is computed from: graded labels and, per user, the
relevant items with their grades (the report's evaluation, the ranker's training rows,
EASE's λ choice: one definition)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

# A click is relevant, a purchase more so (gain 2^grade - 1 in NDCG).
LABELS: dict[str, int] = {"click": 1, "purchase": 2}


def graded_labels(interactions: pd.DataFrame) -> pd.DataFrame:
    """``user_id, item_id, label``: each pair's best event (click 1, purchase 2)."""
    pos = interactions[interactions["event"].isin(list(LABELS))]
    grade = pos["event"].map(LABELS).astype(np.int64)
    out = pos[["user_id", "item_id"]].assign(label=grade.to_numpy())
    return out.groupby(["user_id", "item_id"], as_index=False)["label"].max()


def relevance(labels: pd.DataFrame, users: Sequence[int] | np.ndarray) -> list[dict[int, float]]:
    """Each of ``users``' ``{item: grade}`` from ``labels`` (``user_id, item_id, label``),
    in order, as ``exporters.metrics`` takes them; every user must have a label."""
    mine = labels[labels["user_id"].isin(users)]
    by_user = {
        u: dict(zip(g["item_id"], g["label"], strict=True)) for u, g in mine.groupby("user_id")
    }
    return [{int(i): float(g) for i, g in by_user[u].items()} for u in users]

"""The last stage of a request: dedupe, freshness boost, a per-category cap on the top K,
and one human-readable reason per item. Pure numpy on the candidate arrays, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class PostprocessConfig:
    """Business rules; the defaults are the demo's."""

    max_per_category: int = 3
    # Added to a candidate's score: boost * score spread * 2^(-age_days / half_life).
    freshness_boost: float = 0.25
    freshness_half_life_days: float = 7.0


@dataclass(frozen=True)
class Candidates:
    """Parallel arrays, one entry per candidate, in any order."""

    item_ids: np.ndarray  # int64
    scores: np.ndarray  # float32/64, higher is better
    categories: np.ndarray  # int64
    created_at: np.ndarray  # float64 unix seconds
    sources: np.ndarray  # object/str: "retrieval", "popular", "fresh"

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        for name in ("scores", "categories", "created_at", "sources"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"candidates.{name} has {len(getattr(self, name))} rows, not {n}")

    def take(self, idx: np.ndarray) -> Candidates:
        return Candidates(
            self.item_ids[idx],
            self.scores[idx],
            self.categories[idx],
            self.created_at[idx],
            self.sources[idx],
        )


def dedupe(c: Candidates) -> Candidates:
    """Keep the best-scored entry of each item id (sources may overlap)."""
    order = np.argsort(-c.scores, kind="stable")
    _, first = np.unique(c.item_ids[order], return_index=True)
    return c.take(np.sort(order[first]))


def freshness_boosted(c: Candidates, now: float, cfg: PostprocessConfig) -> np.ndarray:
    """Scores with a boost that halves every ``half_life`` days of item age; scaled by the
    spread of the scores so it means the same for ranker scores and retrieval similarities."""
    if len(c.scores) == 0 or cfg.freshness_boost == 0:
        return c.scores.astype(np.float64)
    age_days = np.maximum(now - c.created_at, 0.0) / SECONDS_PER_DAY
    spread = float(np.std(c.scores)) or 1.0
    decay = np.exp2(-age_days / cfg.freshness_half_life_days)
    return c.scores.astype(np.float64) + cfg.freshness_boost * spread * decay


def category_capped_top_k(
    order: np.ndarray, categories: np.ndarray, k: int, max_per_category: int
) -> np.ndarray:
    """Walk candidates in ``order`` and keep at most ``cap`` per category until k are kept.

    ``cap`` is ``max_per_category`` unless the candidates cannot fill k under it (e.g. the
    request filtered to one or two categories): then it is the smallest cap that can, so the
    filter the client asked for wins over diversity and the answer still has k items.
    """
    k = min(k, len(order))
    if k == 0:
        return np.zeros(0, dtype=np.int64)
    cats = np.asarray(categories)[order]
    # Vectorised walk: occurrence[j] = how many candidates before position j (in ``order``)
    # share its category; "keep at most cap per category" is then ``occurrence < cap``.
    by_cat = np.argsort(cats, kind="stable")
    sorted_cats = cats[by_cat]
    starts = np.flatnonzero(np.r_[True, sorted_cats[1:] != sorted_cats[:-1]])
    counts = np.diff(np.r_[starts, len(cats)])
    occurrence = np.empty(len(cats), dtype=np.int64)
    occurrence[by_cat] = np.arange(len(cats)) - np.repeat(starts, counts)
    cap = max_per_category
    while np.minimum(counts, cap).sum() < k:
        cap += 1
    return np.asarray(order, dtype=np.int64)[occurrence < cap][:k]


def select(
    c: Candidates, k: int, now: float, cfg: PostprocessConfig
) -> tuple[Candidates, np.ndarray]:
    """Dedupe, boost, cap; return the top-k candidates and their final scores."""
    c = dedupe(c)
    final = freshness_boosted(c, now, cfg)
    order = np.argsort(-final, kind="stable")
    keep = category_capped_top_k(order, c.categories, k, cfg.max_per_category)
    return c.take(keep), final[keep]


def reasons(
    top: Candidates,
    recent_items: Sequence[int],
    recent_categories: Sequence[int],
) -> list[str]:
    """One reason per item: the user's own recent item in the same category when there is
    one, else why the source proposed it."""
    by_category: dict[int, int] = {}
    for item, cat in zip(recent_items, recent_categories, strict=True):
        by_category.setdefault(int(cat), int(item))  # most recent first
    out: list[str] = []
    for cat, source in zip(top.categories, top.sources, strict=True):
        cat = int(cat)
        if source == "retrieval" and cat in by_category:
            out.append(f"because you engaged with item {by_category[cat]}")
        elif source == "fresh":
            out.append(f"new in category {cat}")
        elif source == "popular":
            out.append(f"popular in category {cat}")
        else:
            out.append(f"matches your interest in category {cat}")
    return out

"""The last stage of a request: dedupe, freshness boost, a per-category cap on the top K,
and one human-readable reason per item. Pure numpy on the candidate arrays, no I/O."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SECONDS_PER_DAY = 86_400.0


@dataclass(frozen=True)
class PostprocessConfig:
    """Business rules, part of a release (its manifest's ``postprocess``, decided from the
    data by :meth:`for_data` and applied by the offline evaluation too, so the quality
    gate judges what is served)."""

    # Diversity: the top k holds at least this many categories (when the candidates have
    # them): the lowest-ranked items of the most represented categories give way to the
    # best items of new ones. A floor costs far less relevance than a per-category cap.
    min_categories: int = 3
    # An optional hard cap per category (0: none).
    max_per_category: int = 0
    # Added to a candidate's score: boost * score spread * 2^(-age_days / half_life).
    freshness_boost: float = 0.25
    freshness_half_life_days: float = 7.0

    @classmethod
    def for_data(cls, meta: Mapping[str, object]) -> PostprocessConfig:
        """The release's rules for its data: no freshness boost when items have no real
        creation times (an import without them dates an item by its first interaction,
        so "new" would only mean "recently discovered")."""
        if meta.get("item_created_at", "given") != "given":
            return cls(freshness_boost=0.0)
        return cls()

    def to_json(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> PostprocessConfig:
        return cls(**dict(data or {}))


@dataclass(frozen=True)
class Candidates:
    """Parallel arrays, one entry per candidate, in any order."""

    item_ids: np.ndarray  # int64
    scores: np.ndarray  # float32/64, higher is better
    categories: np.ndarray  # int64
    created_at: np.ndarray  # float64 unix seconds
    sources: np.ndarray  # object/str: "retrieval", "popular", "fresh"
    # uint8 masks: bit i set where exporters.candidates.SOURCES[i] proposed the candidate
    # (exporters.candidates.gather_found); None: ``sources`` is the only one (fallbacks).
    found: np.ndarray | None = None
    # The caller knows no item id repeats (the merged candidates of a request): dedupe
    # has nothing to do and is skipped.
    unique: bool = False

    def __post_init__(self) -> None:
        n = len(self.item_ids)
        for name in ("scores", "categories", "created_at", "sources", "found"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"candidates.{name} has {len(value)} rows, not {n}")

    def take(self, idx: np.ndarray) -> Candidates:
        return Candidates(
            self.item_ids[idx],
            self.scores[idx],
            self.categories[idx],
            self.created_at[idx],
            self.sources[idx],
            None if self.found is None else self.found[idx],
            self.unique,
        )


def dedupe(c: Candidates) -> Candidates:
    """Keep the best-scored entry of each item id (sources may overlap)."""
    if c.unique:
        return c
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


def diverse_top_k(
    order: np.ndarray, categories: np.ndarray, k: int, min_categories: int
) -> np.ndarray:
    """The first k of ``order``, then, while they hold fewer than ``min_categories``
    categories, the best candidate of a category not yet shown replaces the lowest-ranked
    item of the most represented category. Returns positions in ``order``'s terms, best
    first (by their place in ``order``)."""
    order = np.asarray(order, dtype=np.int64)
    k = min(k, len(order))
    if k == 0:
        return order[:0]
    # The walk is in positions of ``order`` (a candidate's rank is its position) over
    # plain ints: no per-candidate numpy scalars, no rank table of every candidate.
    cats = np.asarray(categories)[order].astype(np.int64).tolist()
    shown = set(cats[:k])
    if len(shown) >= min_categories:
        return order[:k]
    top = list(range(k))
    for pos in range(k, len(order)):
        if len(shown) >= min_categories:
            break
        c = cats[pos]
        if c in shown:
            continue
        counts: dict[int, int] = {}
        for p in top:
            counts[cats[p]] = counts.get(cats[p], 0) + 1
        crowded = max(counts, key=lambda x: counts[x])
        if counts[crowded] < 2:
            break
        top.remove(max(p for p in top if cats[p] == crowded))  # its lowest-ranked item
        top.append(pos)
        shown.add(c)
    return order[sorted(top)]


def select(
    c: Candidates, k: int, now: float, cfg: PostprocessConfig
) -> tuple[Candidates, np.ndarray]:
    """Dedupe, boost, diversify (floor, then the optional cap); return the top-k
    candidates and their final scores."""
    c = dedupe(c)
    final = freshness_boosted(c, now, cfg)
    order = np.argsort(-final, kind="stable")
    if cfg.max_per_category > 0:
        capped = category_capped_top_k(order, c.categories, k, cfg.max_per_category)
        order = np.concatenate([capped, order[~np.isin(order, capped)]])
    keep = diverse_top_k(order, c.categories, k, cfg.min_categories)
    return c.take(keep), final[keep]


def reasons(
    top: Candidates,
    recent_items: Sequence[int],
    recent_categories: Sequence[int],
    name: Callable[[int], str] = str,
) -> list[str]:
    """One reason per item: the user's own recent item in the same category when there is
    one (``name``: its id as the client knows it), else why the source proposed it."""
    by_category: dict[int, int] = {}
    for item, cat in zip(recent_items, recent_categories, strict=True):
        by_category.setdefault(int(cat), int(item))  # most recent first
    out: list[str] = []
    for cat, source in zip(top.categories, top.sources, strict=True):
        cat = int(cat)
        if source == "retrieval" and cat in by_category:
            out.append(f"because you engaged with item {name(by_category[cat])}")
        elif source == "fresh":
            out.append(f"new in category {cat}")
        elif source == "popular":
            out.append(f"popular in category {cat}")
        else:
            out.append(f"matches your interest in category {cat}")
    return out

"""Ranking metrics for the offline report: pure numpy, one function per metric.

Conventions shared by every function:

- ``recommended`` is an int array ``[n_users, L]`` of item ids, best first. ``-1`` pads a row
  that has fewer than ``L`` items (it never matches a relevant item and is not counted as an
  item shown). Only the first ``k`` columns are read.
- ``relevant`` is a sequence of ``n_users`` mappings ``{item_id: gain}`` with ``gain > 0``
  (graded relevance). A set or list of item ids means gain 1 for each (binary relevance).
- Per-user values are averaged over the users that have at least one relevant item; users
  with none are skipped (they carry no signal), and the number counted is returned by
  ``evaluated_users``.

Formulas (``R_u`` relevant items of user ``u``, ``g_u(i)`` their gains, ``r_u(j)`` the item at
position ``j = 1..k`` of the list):

- Recall@k   = mean_u |{r_u(1..k)} ∩ R_u| / |R_u|
- NDCG@k     = mean_u DCG_u@k / IDCG_u@k, with DCG_u@k = Σ_j (2^{g_u(r_u(j))} − 1) / log2(j + 1)
  (gain 0 for items outside R_u) and IDCG_u@k the DCG of R_u sorted by gain, cut at k.
  Graded: the report uses gain 1 for a click and 2 for a purchase.
- Coverage@k = |∪_u {r_u(1..k)}| / n_catalog  (over all users, relevant items or not).
- Category diversity@k = mean_u number of distinct categories among r_u(1..k); the entropy
  variant is mean_u −Σ_c p_uc log2 p_uc with p_uc the share of category c in the list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

Relevance = Mapping[int, float] | Iterable[int]


def _as_gains(rel: Relevance) -> dict[int, float]:
    """A mapping item -> gain; a plain collection of ids means binary relevance (gain 1)."""
    if isinstance(rel, Mapping):
        return {int(i): float(g) for i, g in rel.items() if g > 0}
    return {int(i): 1.0 for i in rel}


def _check(recommended: np.ndarray, relevant: Sequence[Relevance] | None, k: int) -> np.ndarray:
    rec = np.asarray(recommended)
    if rec.ndim != 2:
        raise ValueError(f"recommended must be 2-D [n_users, L], got shape {rec.shape}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    if relevant is not None and len(relevant) != rec.shape[0]:
        raise ValueError(f"{rec.shape[0]} recommendation rows but {len(relevant)} relevance rows")
    return rec[:, :k]


def rank_within_query(
    query: np.ndarray, key: np.ndarray, position: np.ndarray, n_queries: int
) -> tuple[np.ndarray, np.ndarray]:
    """Candidate rows ordered request by request: ``order`` sorts the rows by (``query``,
    ``key`` ascending, ``position``: ties keep retrieval order), and ``rank[j]`` is the
    0-based place of row ``order[j]`` within its request. The offline report's top lists
    and the ranker prior's NDCG both cut this at k."""
    order = np.lexsort((position, key, query))
    q = query[order]
    starts = np.searchsorted(q, np.arange(n_queries))
    return order, np.arange(len(order)) - starts[q]


def evaluated_users(relevant: Sequence[Relevance]) -> int:
    """How many users have at least one relevant item (the denominator of the means)."""
    return sum(1 for r in relevant if _as_gains(r))


def recall_at_k(recommended: np.ndarray, relevant: Sequence[Relevance], k: int) -> float:
    """Mean over users of the share of their relevant items found in the top ``k``."""
    rec = _check(recommended, relevant, k)
    values = []
    for row, rel in zip(rec, relevant, strict=True):
        gains = _as_gains(rel)
        if not gains:
            continue
        hits = len(set(row[row >= 0].tolist()) & gains.keys())
        values.append(hits / len(gains))
    return float(np.mean(values)) if values else 0.0


def _dcg(gains: np.ndarray) -> float:
    discounts = 1.0 / np.log2(np.arange(2, gains.size + 2))
    return float(np.sum((np.exp2(gains) - 1.0) * discounts))


def ndcg_per_user(recommended: np.ndarray, relevant: Sequence[Relevance], k: int) -> np.ndarray:
    """DCG@k / ideal DCG@k of each user with a relevant item (exponential gain
    ``2^g − 1``), in row order; users without one are left out, so two lists scored
    against the same ``relevant`` give aligned arrays (paired comparisons)."""
    rec = _check(recommended, relevant, k)
    values = []
    for row, rel in zip(rec, relevant, strict=True):
        gains = _as_gains(rel)
        if not gains:
            continue
        # A duplicated id in the list earns its gain once: the first time it is shown.
        seen: set[int] = set()
        got = np.zeros(row.size)
        for j, item in enumerate(row.tolist()):
            if item >= 0 and item not in seen:
                got[j] = gains.get(item, 0.0)
                seen.add(item)
        ideal = np.sort(np.fromiter(gains.values(), dtype=float))[::-1][: row.size]
        values.append(_dcg(got) / _dcg(ideal))
    return np.asarray(values, dtype=float)


def ndcg_at_k(recommended: np.ndarray, relevant: Sequence[Relevance], k: int) -> float:
    """Mean over users of DCG@k / ideal DCG@k with exponential gain ``2^g − 1``."""
    return ndcg_mean(ndcg_per_user(recommended, relevant, k))


def ndcg_mean(per_user: np.ndarray) -> float:
    """:func:`ndcg_at_k` from :func:`ndcg_per_user`'s values (0 when no user has a
    relevant item), for callers that also need the per-user values."""
    return float(per_user.mean()) if per_user.size else 0.0


def paired_bootstrap_ci(
    a: np.ndarray, b: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Confidence interval of ``mean(a) − mean(b)`` for per-user values of two lists on
    the same users: the users are resampled with replacement (together for both lists),
    ``n_boot`` times; the interval is the central ``level`` of the resampled differences.
    Seeded, so the same inputs give the same interval."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D and aligned, got {a.shape} and {b.shape}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if a.size == 0:
        return 0.0, 0.0
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for i in range(n_boot):  # a loop bounds memory: n_boot × n_users indices at once is big
        means[i] = diff[rng.integers(0, diff.size, diff.size)].mean()
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(lo), float(hi)


def catalog_coverage(recommended: np.ndarray, n_catalog: int, k: int) -> float:
    """Share of the catalog that appears in at least one user's top ``k``."""
    rec = _check(recommended, None, k)
    if n_catalog <= 0:
        raise ValueError(f"n_catalog must be positive, got {n_catalog}")
    shown = np.unique(rec[rec >= 0])
    return float(shown.size / n_catalog)


def _list_categories(
    recommended: np.ndarray, item_category: Mapping[int, int] | np.ndarray, k: int
) -> list[np.ndarray]:
    """Categories of each user's top ``k`` (padding and unknown items dropped)."""
    rec = _check(recommended, None, k)
    out = []
    for row in rec:
        items = row[row >= 0]
        if isinstance(item_category, np.ndarray):
            # Dense lookup table indexed by item id; -1 marks an unknown category.
            items = items[items < item_category.size]
            cats = item_category[items]
        else:
            cats = np.array([item_category[i] for i in items.tolist() if i in item_category])
        out.append(cats[cats >= 0] if cats.size else cats)
    return out


def category_diversity(
    recommended: np.ndarray, item_category: Mapping[int, int] | np.ndarray, k: int
) -> float:
    """Mean number of distinct categories in a user's top ``k`` (users with an empty list
    are skipped)."""
    lists = [c for c in _list_categories(recommended, item_category, k) if c.size]
    return float(np.mean([np.unique(c).size for c in lists])) if lists else 0.0


def category_entropy(
    recommended: np.ndarray, item_category: Mapping[int, int] | np.ndarray, k: int
) -> float:
    """Mean intra-list Shannon entropy (bits) of the category distribution of the top ``k``."""
    values = []
    for cats in _list_categories(recommended, item_category, k):
        if not cats.size:
            continue
        _, counts = np.unique(cats, return_counts=True)
        p = counts / counts.sum()
        values.append(float(-(p * np.log2(p)).sum()))
    return float(np.mean(values)) if values else 0.0

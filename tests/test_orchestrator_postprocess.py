"""Post-processing: dedupe, freshness boost, category cap and reasons."""

from __future__ import annotations

import dataclasses

import numpy as np

from orchestrator.postprocess import (
    Candidates,
    PostprocessConfig,
    category_capped_top_k,
    dedupe,
    reasons,
    select,
)

NOW = 1_700_000_000.0
DAY = 86_400.0


def _cands(
    ids: list[int],
    scores: list[float],
    cats: list[int],
    age_days: list[float],
    sources: list[str] | None = None,
) -> Candidates:
    return Candidates(
        np.asarray(ids, dtype=np.int64),
        np.asarray(scores, dtype=np.float32),
        np.asarray(cats, dtype=np.int64),
        NOW - np.asarray(age_days) * DAY,
        np.asarray(sources or ["retrieval"] * len(ids), dtype=object),
    )


def test_dedupe_keeps_best_score() -> None:
    c = dedupe(
        _cands(
            [1, 2, 1],
            [0.1, 0.5, 0.9],
            [0, 0, 0],
            [50, 50, 50],
            ["popular", "retrieval", "retrieval"],
        )
    )
    got = dict(zip(c.item_ids.tolist(), c.scores.tolist(), strict=True))
    assert sorted(got) == [1, 2]
    assert abs(got[1] - 0.9) < 1e-6


def test_category_cap_holds_in_top_k() -> None:
    rng = np.random.default_rng(0)
    n = 300
    cats = rng.integers(0, 10, n)
    c = _cands(list(range(n)), rng.normal(size=n).tolist(), cats.tolist(), [100.0] * n)
    top, _ = select(c, 20, NOW, PostprocessConfig(max_per_category=2, freshness_boost=0))
    assert len(top.item_ids) == 20
    assert np.bincount(top.categories).max() <= 2
    assert len(set(top.item_ids.tolist())) == 20


def test_cap_relaxes_only_when_categories_run_out() -> None:
    cats = np.array([5] * 30)
    order = np.arange(30)
    assert len(category_capped_top_k(order, cats, 10, 3)) == 10  # one category: filled
    uneven = np.array([7] + [8] * 50)  # one lonely item in category 7
    kept = category_capped_top_k(np.arange(51), uneven, 10, 3)
    assert len(kept) == 10 and np.bincount(uneven[kept])[8] == 9
    cats2 = np.array([1] * 20 + [2] * 20)
    kept = category_capped_top_k(np.arange(40), cats2, 10, 3)
    assert len(kept) == 10 and np.bincount(cats2[kept]).max() == 5  # ceil(10/2)


def test_freshness_boost_promotes_new_items() -> None:
    c = _cands([1, 2, 3, 4], [1.0, 0.9, 0.0, -1.0], [0, 1, 2, 3], [200.0, 0.0, 200.0, 200.0])
    top, _ = select(c, 2, NOW, PostprocessConfig(freshness_boost=0.0))
    assert top.item_ids.tolist() == [1, 2]
    top, _ = select(c, 2, NOW, PostprocessConfig(freshness_boost=0.5))
    assert top.item_ids.tolist() == [2, 1]  # 0.9 + 0.5 * std(scores) > 1.0


def test_reasons_explain_each_item() -> None:
    top = _cands(
        [10, 11, 12, 13],
        [4, 3, 2, 1],
        [1, 2, 3, 4],
        [1, 1, 1, 1],
        ["retrieval", "popular", "fresh", "retrieval"],
    )
    out = reasons(top, recent_items=[99, 98], recent_categories=[1, 7])
    assert out == [
        "because you engaged with item 99",
        "popular in category 2",
        "new in category 3",
        "matches your interest in category 4",
    ]


def _capped_by_walking(order: np.ndarray, cats: np.ndarray, k: int, cap: int) -> list[int]:
    """The rule spelled out as a loop (the reference for the vectorised version)."""
    k = min(k, len(order))
    while sum(min(int((cats[order] == c).sum()), cap) for c in set(cats[order].tolist())) < k:
        cap += 1
    seen: dict[int, int] = {}
    kept: list[int] = []
    for i in order:
        if seen.get(int(cats[i]), 0) < cap and len(kept) < k:
            seen[int(cats[i])] = seen.get(int(cats[i]), 0) + 1
            kept.append(int(i))
    return kept


def test_category_cap_matches_the_walk_on_random_inputs() -> None:
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(0, 60))
        cats = rng.integers(-1, int(rng.integers(1, 8)), n)
        order = rng.permutation(n)
        k, cap = int(rng.integers(1, 30)), int(rng.integers(1, 4))
        got = category_capped_top_k(order, cats, k, cap).tolist()
        assert got == _capped_by_walking(order, cats, k, cap)


def test_diversity_floor_costs_only_what_it_must() -> None:
    """A floor of 3 categories: a list already diverse is untouched; a one-category list
    gives up its two lowest-ranked items to the best items of two other categories."""
    from orchestrator.postprocess import diverse_top_k

    order = np.arange(12)
    diverse = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    assert diverse_top_k(order, diverse, 5, 3).tolist() == [0, 1, 2, 3, 4]
    mono = np.array([7] * 8 + [3, 3, 5, 5])
    got = diverse_top_k(order, mono, 5, 3).tolist()
    assert got == [0, 1, 2, 8, 10]  # 3 and 4 (category 7) make way for 8 and 10
    assert len(set(mono[got])) == 3
    # Not enough categories among the candidates: as many as exist.
    assert len(set(mono[diverse_top_k(order[:9], mono[:9], 5, 4)])) == 2


def test_served_lists_hold_three_categories_when_they_can() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(10, 60))
        cats = rng.integers(0, int(rng.integers(1, 6)), size=n)
        c = _cands(list(range(n)), rng.normal(size=n).tolist(), cats.tolist(), [100.0] * n)
        top, _ = select(c, 10, NOW, PostprocessConfig(freshness_boost=0))
        assert len(top.item_ids) == 10
        assert len(set(top.categories.tolist())) >= min(3, len(set(cats.tolist())))


def _diverse_top_k_plainly(
    order: np.ndarray, categories: np.ndarray, k: int, min_categories: int
) -> np.ndarray:
    """diverse_top_k as first written (candidate ids and a rank table): the oracle."""
    order = np.asarray(order, dtype=np.int64)
    k = min(k, len(order))
    top = list(order[:k])
    cats = np.asarray(categories)
    shown = {int(cats[i]) for i in top}
    if len(shown) >= min_categories or k == 0:
        return order[:k]
    rank = {int(i): r for r, i in enumerate(order)}
    for cand in order[k:]:
        if len(shown) >= min_categories:
            break
        c = int(cats[cand])
        if c in shown:
            continue
        counts: dict[int, int] = {}
        for i in top:
            counts[int(cats[i])] = counts.get(int(cats[i]), 0) + 1
        crowded = max(counts, key=lambda x: counts[x])
        if counts[crowded] < 2:
            break
        victim = max((i for i in top if int(cats[i]) == crowded), key=lambda i: rank[int(i)])
        top.remove(victim)
        top.append(int(cand))
        shown.add(c)
    return np.array(sorted(top, key=lambda i: rank[int(i)]), dtype=np.int64)


def test_diverse_top_k_equals_the_plain_walk() -> None:
    """The walk over positions (issue 13) picks exactly what the walk over candidate ids
    picked, on random orders, category mixes, k and floors."""
    from orchestrator.postprocess import diverse_top_k

    rng = np.random.default_rng(3)
    changed = 0
    for trial in range(2000):
        n = int(rng.integers(0, 60))
        cats = rng.integers(0, int(rng.integers(1, 8)), size=n)
        order = rng.permutation(n)
        k, floor = int(rng.integers(0, 15)), int(rng.integers(0, 6))
        got = diverse_top_k(order, cats, k, floor)
        want = _diverse_top_k_plainly(order, cats, k, floor)
        assert got.dtype == want.dtype and got.tolist() == want.tolist(), trial
        changed += got.tolist() != order[: min(k, n)].tolist()
    assert changed > 100  # the floor did act in many trials


def test_unique_candidates_skip_dedupe() -> None:
    """Candidates marked unique (a request's merged list) pass dedupe untouched; dedupe of
    the same ids unmarked gives the same candidates."""
    rng = np.random.default_rng(4)
    ids = rng.permutation(200)[:50].astype(np.int64)
    c = Candidates(
        ids,
        rng.random(50),
        rng.integers(0, 5, 50),
        rng.uniform(0, 1e6, 50),
        np.full(50, "retrieval", dtype=object),
    )
    marked = dataclasses.replace(c, unique=True)
    assert dedupe(marked) is marked
    plain = dedupe(c)
    for name in ("item_ids", "scores", "categories", "created_at", "sources"):
        assert np.array_equal(getattr(plain, name), getattr(marked, name))
    assert dedupe(marked).take(np.arange(3)).unique

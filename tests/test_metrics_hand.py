"""exporters/metrics.py against a case computed by hand (see the comments for the sums)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from exporters import metrics

# Three users; -1 pads user B's list. User C has no relevant item and is skipped by the
# per-user means (but still counts for coverage and diversity).
RECOMMENDED = np.array([[1, 2, 3, 4], [5, -1, -1, -1], [1, 2, 3, 4]])
RELEVANT = [{2: 1.0, 5: 2.0}, {5}, {}]
CATEGORY = {1: 0, 2: 0, 3: 1, 4: 2, 5: 3}


def test_recall_at_k() -> None:
    # A: {1,2,3} ∩ {2,5} = 1 of 2 -> 0.5; B: 1 of 1 -> 1.0; mean 0.75.
    assert metrics.recall_at_k(RECOMMENDED, RELEVANT, 3) == pytest.approx(0.75)
    # k=1: A finds nothing, B finds item 5.
    assert metrics.recall_at_k(RECOMMENDED, RELEVANT, 1) == pytest.approx(0.5)
    assert metrics.evaluated_users(RELEVANT) == 2


def test_ndcg_at_k_graded_and_binary() -> None:
    # A: item 2 (gain 2^1-1 = 1) at position 2 -> DCG = 1/log2(3).
    #    ideal: gains [2, 1] -> (2^2-1)/log2(2) + (2^1-1)/log2(3) = 3 + 1/log2(3).
    # B: binary, item 5 first -> 1.
    a = (1 / math.log2(3)) / (3 + 1 / math.log2(3))
    assert metrics.ndcg_at_k(RECOMMENDED, RELEVANT, 3) == pytest.approx((a + 1.0) / 2)
    assert a == pytest.approx(0.17377, abs=1e-5)


def test_ndcg_counts_a_duplicate_once() -> None:
    assert metrics.ndcg_at_k(np.array([[7, 7]]), [{7: 1.0, 8: 1.0}], 2) == pytest.approx(
        1.0 / (1.0 + 1.0 / math.log2(3))
    )


def test_catalog_coverage() -> None:
    # top-3 lists show {1, 2, 3} and {5}: 4 of a 10-item catalog.
    assert metrics.catalog_coverage(RECOMMENDED, 10, 3) == pytest.approx(0.4)


def test_category_diversity_and_entropy() -> None:
    # top-3 categories: A [0,0,1] -> 2 distinct, B [3] -> 1, C [0,0,1] -> 2: mean 5/3.
    assert metrics.category_diversity(RECOMMENDED, CATEGORY, 3) == pytest.approx(5 / 3)
    # entropy: A and C (2/3, 1/3) -> 0.9183 bits each, B 0: mean 0.6122.
    h = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    assert metrics.category_entropy(RECOMMENDED, CATEGORY, 3) == pytest.approx(2 * h / 3)
    dense = np.array([0, 0, 0, 1, 2, 3])  # the same categories as a table indexed by id
    assert metrics.category_diversity(RECOMMENDED, dense, 3) == pytest.approx(5 / 3)


def test_bad_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match="2-D"):
        metrics.recall_at_k(np.array([1, 2]), [{1}], 1)
    with pytest.raises(ValueError, match="relevance rows"):
        metrics.ndcg_at_k(RECOMMENDED, RELEVANT[:2], 3)


def test_ndcg_per_user_is_aligned_and_averages_to_ndcg() -> None:
    per_user = metrics.ndcg_per_user(RECOMMENDED, RELEVANT, 3)
    assert per_user.shape == (2,)  # user C (no relevant item) is left out
    assert per_user[1] == pytest.approx(1.0)  # B's only relevant item is first
    assert per_user.mean() == pytest.approx(metrics.ndcg_at_k(RECOMMENDED, RELEVANT, 3))


def test_paired_bootstrap_interval() -> None:
    rng = np.random.default_rng(1)
    base = rng.random(2000)
    better = base + 0.05 + rng.normal(0, 0.02, 2000)
    lo, hi = metrics.paired_bootstrap_ci(better, base)
    assert 0.0 < lo < 0.05 < hi  # the true lead 0.05 inside, and surely above 0
    assert (lo, hi) == metrics.paired_bootstrap_ci(better, base)  # seeded
    noise = base + rng.normal(0, 0.1, 2000)
    lo, hi = metrics.paired_bootstrap_ci(noise, base)
    assert lo < 0 < hi  # no lead: the interval holds 0
    assert metrics.paired_bootstrap_ci(base, base) == (0.0, 0.0)
    with pytest.raises(ValueError, match="aligned"):
        metrics.paired_bootstrap_ci(base, base[:-1])


def test_rank_within_query_orders_each_request_by_key_then_position() -> None:
    # Rows of two requests, interleaved; request 1's rows 2 and 4 tie on the key, so the
    # earlier retrieval position (row 4: position 0) goes first. Request 2 has no rows.
    query = np.array([1, 0, 1, 0, 1])
    key = np.array([0.5, 0.2, 0.1, 0.9, 0.1])
    position = np.array([2, 0, 1, 1, 0])
    order, rank = metrics.rank_within_query(query, key, position, n_queries=3)
    assert order.tolist() == [1, 3, 4, 2, 0]
    assert rank.tolist() == [0, 1, 0, 1, 2]

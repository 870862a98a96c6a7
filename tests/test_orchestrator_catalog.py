"""Catalog lookups, request filters and the model-free fallback lists."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.catalog import Catalog, Fallbacks
from orchestrator.request import build_filters

NOW = 1_700_000_000.0


@pytest.fixture
def catalog() -> Catalog:
    n = 100
    ids = np.arange(n)[::-1] * 10  # unsorted, sparse ids
    return Catalog.build(
        item_ids=ids,
        category=ids // 10 % 5,
        price=(ids // 10).astype(float),
        created_at=NOW - 60.0 - (ids // 10) * 86_400.0,  # item 0 is the newest
        popularity=(ids // 10).astype(float),  # item 990 the most popular
        embeddings=np.zeros((n, 4), np.float32),
    )


def test_rows_and_unknown_ids(catalog: Catalog) -> None:
    rows, known = catalog.rows(np.array([0, 15, 990, 5000]))
    assert known.tolist() == [True, False, True, False]
    assert catalog.item_ids[rows[known]].tolist() == [0, 990]


def test_filters(catalog: Catalog) -> None:
    rows = np.arange(len(catalog))
    f = build_filters([1, 2], [], [10], 5.0, 50.0)
    mask = catalog.allowed(rows, f, seen=np.array([60]))
    got = catalog.item_ids[rows[mask]]
    assert len(got) > 0
    assert set((got // 10 % 5).tolist()) <= {1, 2}
    assert 10 not in got and 60 not in got
    assert got.min() >= 50 and got.max() <= 500


@pytest.mark.parametrize("how", ["exclude_item_ids", "seen"])
def test_an_excluded_or_seen_item_that_passes_every_other_filter_is_dropped(
    catalog: Catalog, how: str
) -> None:
    """Item 110 (category 1, price 11) passes the category and price filters, so only
    the exclusion can remove it; and it removes nothing else."""
    rows = np.arange(len(catalog))
    target = 110
    base = catalog.allowed(rows, build_filters([1, 2], [], [], 5.0, 50.0), seen=np.array([]))
    assert target in catalog.item_ids[rows[base]]  # the control: allowed without exclusion
    if how == "exclude_item_ids":
        f, seen = build_filters([1, 2], [], [target], 5.0, 50.0), np.array([])
    else:
        f, seen = build_filters([1, 2], [], [], 5.0, 50.0), np.array([target])
    mask = catalog.allowed(rows, f, seen=seen)
    dropped = set(catalog.item_ids[rows[base & ~mask]].tolist())
    assert dropped == {target}
    assert not np.any(mask & ~base)  # excluding never lets anything else in


def test_exclusion_without_other_filters(catalog: Catalog) -> None:
    rows = np.arange(len(catalog))
    mask = catalog.allowed(rows, build_filters([], [], [0, 990], 0, 0), seen=np.array([]))
    assert sorted(catalog.item_ids[rows[~mask]].tolist()) == [0, 990]


def test_fallbacks_mix_fresh_and_popular(catalog: Catalog) -> None:
    fb = Fallbacks.build(catalog)
    rows, scores, sources = fb.candidates(
        catalog, build_filters([], [3], [], 0, 0), np.array([990]), 10, NOW, fresh_share=0.3
    )
    ids = catalog.item_ids[rows]
    assert (sources == "fresh").sum() == 3 and (sources == "popular").sum() == 7
    assert ids[sources == "fresh"].tolist() == [0, 10, 20]
    # An item created at the request's instant is not offered yet (candidates.exists_at):
    # at NOW - 60 item 0 exists only from the next instant on.
    rows, _, sources = fb.candidates(
        catalog, build_filters([], [3], [], 0, 0), np.array([990]), 10, NOW - 60.0, 0.3
    )
    assert catalog.item_ids[rows[sources == "fresh"]].tolist() == [10, 20, 40]
    assert 990 not in ids and not np.any(ids // 10 % 5 == 3)
    assert np.all(np.diff(scores[sources == "popular"]) < 0)


def test_a_segment_list_leads_and_the_global_list_tops_it_up(catalog: Catalog) -> None:
    fb = Fallbacks.build(catalog)
    # A segment's list: items 50, 60, 70 (rows), the middle one filtered by category 1.
    segment = catalog.rows(np.array([50, 60, 70]))[0]
    rows, _, sources = fb.candidates(
        catalog, build_filters([], [1], [], 0, 0), np.array([]), 10, NOW, popular_rows=segment
    )
    popular = catalog.item_ids[rows[sources == "popular"]].tolist()
    assert popular[:2] == [50, 70]
    # Then the global list (most popular first), without repeating the segment's items.
    global_order = [int(i) for i in range(990, -1, -10) if i // 10 % 5 != 1 and i not in (50, 70)]
    assert popular[2:] == global_order[:5]


def test_build_rejects_misaligned_arrays() -> None:
    with pytest.raises(ValueError, match="category has 1 rows"):
        Catalog.build(
            np.arange(2), np.zeros(1), np.zeros(2), np.zeros(2), np.zeros(2), np.zeros((2, 4))
        )


def test_request_filter_equals_a_direct_check_over_random_requests(catalog: Catalog) -> None:
    """The per-request filter (blocked set built once, used for several lists) keeps
    exactly the rows a direct check of every filter keeps."""
    rng = np.random.default_rng(3)
    ids = catalog.item_ids
    for trial in range(200):
        include = rng.choice(5, size=int(rng.integers(0, 3)), replace=False).tolist()
        others = [c for c in range(5) if c not in include]
        exclude = others[: int(rng.integers(0, 2))]
        excluded_ids = rng.choice(1200, size=int(rng.integers(0, 30))).tolist()
        lo, hi = sorted(rng.uniform(0, 120, 2).tolist()) if rng.random() < 0.5 else (0, 0)
        f = build_filters(include, exclude, excluded_ids, lo, hi)
        seen = rng.choice(1200, size=int(rng.integers(0, 80)))  # some ids not in the catalog
        passes = catalog.request_filter(f, seen)
        for _ in range(3):  # one filter, several lists, as in the candidate merge
            rows = rng.integers(0, len(catalog), size=int(rng.integers(0, 150)))
            cats, price = catalog.category[rows], catalog.price[rows]
            expected = ~np.isin(ids[rows], np.concatenate([seen, excluded_ids]))
            if include:
                expected &= np.isin(cats, include)
            expected &= ~np.isin(cats, exclude)
            expected &= (price >= f.price_min) & (price <= f.price_max)
            np.testing.assert_array_equal(passes(rows), expected, err_msg=str(trial))

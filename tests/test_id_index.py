"""id -> position lookups: the dense table and the binary-search fallback agree."""

from __future__ import annotations

import numpy as np
import pytest

from orchestrator.id_index import IdIndex


@pytest.mark.parametrize(
    "ids",
    [
        np.arange(5000)[::-1],  # compact: dense table
        np.arange(5000) * 7 + 3,  # span 7x the count: binary search
        np.array([5, -3, 2**40, 0]),  # negative and huge ids: binary search
        # compact ids plus a few far away (items added since a release): table + search
        np.concatenate([np.arange(5000), [10**12, 7 * 10**9, 60_000_000]]),
        np.concatenate([np.arange(3000), np.arange(3000) * 1000 + 10**7]),  # half and half
    ],
)
def test_positions(ids: np.ndarray) -> None:
    index = IdIndex(ids)
    rng = np.random.default_rng(0)
    known_ids = rng.choice(ids, 50)
    queries = np.concatenate([known_ids, [-1, -7, 2**41, int(ids.max()) + 1]])
    pos, known = index.positions(queries)
    assert known.tolist() == [True] * 50 + [False] * 4
    assert (ids[pos[:50]] == known_ids).all()
    assert (pos[50:] == 0).all()


def test_dense_only_for_compact_ids() -> None:
    assert IdIndex(np.arange(10_000)).dense
    assert not IdIndex(np.arange(10_000) * 5).dense
    assert IdIndex(np.array([0, 900])).dense  # small catalogs: a table is cheap anyway


@pytest.mark.parametrize(
    "ids",
    [
        np.array([1, 2, 2]),
        np.array([10**12, 5, 10**12]),
        np.concatenate([np.arange(5000), [10**12, 10**12]]),
    ],
)
def test_duplicates_rejected(ids: np.ndarray) -> None:
    with pytest.raises(ValueError, match="not unique"):
        IdIndex(ids)


def test_empty() -> None:
    pos, known = IdIndex(np.zeros(0, np.int64)).positions(np.array([1, 2]))
    assert pos.tolist() == [0, 0] and known.tolist() == [False, False]

"""Baselines: EASE against a direct solve, co-visitation finds planted pairs, top-N lists."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from exporters.baselines import (
    EASE_MAX_ITEMS,
    covisitation_weights,
    ease_weights,
    interaction_matrix,
    popularity_scores,
    score_users,
    spd_inverse,
    top_k_unseen,
    top_n_neighbours,
)


def _random_x(n_users: int, n_items: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.csr_matrix((rng.random((n_users, n_items)) < density).astype(np.float32))


def test_interaction_matrix_orders_rows_and_columns_and_filters_events() -> None:
    df = pd.DataFrame(
        {
            "user_id": [7, 7, 3, 3, 3, 9],
            "item_id": [20, 20, 10, 30, 99, 10],
            "event": ["view", "purchase", "click", "view", "view", "purchase"],
        }
    )
    X, users = interaction_matrix(df, item_ids=np.array([30, 10, 20]))
    assert users.tolist() == [3, 7, 9]
    # Item 99 is outside the catalog; the repeated (7, 20) pair counts once.
    assert X.toarray().tolist() == [[1, 1, 0], [0, 0, 1], [0, 1, 0]]
    X2, users2 = interaction_matrix(
        df, item_ids=np.array([10, 20, 30]), user_ids=np.array([9, 3, 5]), events=["purchase"]
    )
    assert users2.tolist() == [9, 3, 5]
    assert X2.toarray().tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]
    assert popularity_scores(X).tolist() == [1.0, 2.0, 1.0]
    assert popularity_scores(X).dtype == np.float64


def test_ease_matches_a_direct_numpy_solve() -> None:
    X = _random_x(40, 12, 0.3, seed=1)
    lam = 5.0
    B = ease_weights(X, lam=lam)
    # Direct: for each column j, minimise ||X_j − X_{-j} b||² + λ||b||² over the others.
    Xd = X.toarray().astype(np.float64)
    n = Xd.shape[1]
    expected = np.zeros((n, n))
    for j in range(n):
        others = [k for k in range(n) if k != j]
        A = Xd[:, others]
        b = np.linalg.solve(A.T @ A + lam * np.eye(n - 1), A.T @ Xd[:, j])
        expected[others, j] = b
    np.testing.assert_allclose(B, expected, atol=1e-10)
    assert np.all(np.diag(B) == 0)
    B32 = ease_weights(X, lam=lam, dtype=np.float32)
    assert B32.dtype == np.float32
    np.testing.assert_allclose(B32, expected, atol=1e-4)
    S = score_users(X[:3], B)
    np.testing.assert_allclose(S, Xd[:3] @ expected, atol=1e-9)


@pytest.mark.parametrize(("dtype", "tol"), [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_the_cholesky_inverse_equals_numpys(dtype: type, tol: float) -> None:
    A = np.random.default_rng(5).normal(size=(60, 30))
    G = (A.T @ A + 3.0 * np.eye(30)).astype(dtype)
    expected = np.linalg.inv(G.astype(np.float64))
    P = spd_inverse(G.copy())
    assert P is not None and P.dtype == dtype
    np.testing.assert_allclose(P, expected, atol=tol * np.abs(expected).max())
    np.testing.assert_array_equal(P, P.T)  # both triangles, not potri's upper one only
    assert spd_inverse(np.array([[1.0, 2.0], [2.0, 1.0]])) is None  # indefinite


def test_ease_refuses_large_catalogs_and_bad_lambda() -> None:
    big = sp.csr_matrix((2, EASE_MAX_ITEMS + 1), dtype=np.float32)
    with pytest.raises(ValueError, match="covisitation"):
        ease_weights(big)
    with pytest.raises(ValueError, match="lam"):
        ease_weights(_random_x(5, 4, 0.5, 0), lam=0.0)


def test_covisitation_finds_planted_pairs() -> None:
    rng = np.random.default_rng(3)
    n_users, n_items = 400, 200
    X = (rng.random((n_users, n_items)) < 0.02).astype(np.float32)
    # Planted pairs (2k, 2k+1) for k < 20: whoever has one mostly has the other.
    for k in range(20):
        a, b = 2 * k, 2 * k + 1
        fans = rng.choice(n_users, size=30, replace=False)
        X[fans, a] = 1.0
        X[fans[:27], b] = 1.0
    Xs = sp.csr_matrix(X)
    # Small chunks exercise the chunked path; results must not depend on them.
    W = covisitation_weights(Xs, top_n=5, chunk_items=17)
    W_one = covisitation_weights(Xs, top_n=5)
    np.testing.assert_allclose(W.toarray(), W_one.toarray(), rtol=1e-6)
    assert W.shape == (n_items, n_items)
    assert W.diagonal().sum() == 0
    assert np.diff(W.indptr).max() <= 5
    idx, _ = top_n_neighbours(W, top_n=3)
    for k in range(20):
        a, b = 2 * k, 2 * k + 1
        assert idx[a, 0] == b and idx[b, 0] == a
    # Cosine: a pair with 27 shared users out of ~30+ each scores close to 0.9.
    Xd = X.astype(np.float64)
    co = Xd[:, 0] @ Xd[:, 1]
    expected = co / np.sqrt(Xd[:, 0].sum() * Xd[:, 1].sum())
    assert W[0, 1] == pytest.approx(expected, rel=1e-5)


def test_top_n_shapes_padding_and_order_dense_and_sparse() -> None:
    B = np.array(
        [
            [0.0, 0.5, -1.0, 0.2],
            [0.1, 0.0, 0.0, 0.0],
            [0.0, 0.0, 9.0, 0.0],  # only the diagonal: no neighbours
            [0.3, 0.3, 0.9, 0.0],
        ]
    )
    for M in (B, sp.csr_matrix(B)):
        idx, wts = top_n_neighbours(M, top_n=3)
        assert idx.shape == wts.shape == (4, 3)
        assert idx.dtype == np.int32 and wts.dtype == np.float32
        assert idx[0].tolist() == [1, 3, -1]
        np.testing.assert_allclose(wts[0], [0.5, 0.2, 0.0])
        assert idx[1].tolist() == [0, -1, -1]
        assert idx[2].tolist() == [-1, -1, -1]
        assert idx[3, 0] == 2 and sorted(idx[3, 1:].tolist()) == [0, 1]
    idx, _ = top_n_neighbours(B, top_n=3, positive_only=False)
    assert idx[0].tolist() == [1, 3, 2]
    # More slots than items: padded.
    idx, _ = top_n_neighbours(B, top_n=6)
    assert idx.shape == (4, 6) and idx[0, 3:].tolist() == [-1, -1, -1]


def test_ease_beats_popularity_on_planted_structure() -> None:
    # Users consume whole clusters; holding out one item per user, EASE finds it.
    rng = np.random.default_rng(5)
    n_users, n_clusters, size = 300, 10, 8
    n_items = n_clusters * size
    X = np.zeros((n_users, n_items), np.float32)
    held = np.zeros(n_users, np.int64)
    for u in range(n_users):
        c = rng.integers(n_clusters)
        items = c * size + rng.choice(size, size=5, replace=False)
        X[u, items[:4]] = 1.0
        held[u] = items[4]
    Xs = sp.csr_matrix(X)
    S = score_users(Xs, ease_weights(Xs, lam=10.0))
    S[X > 0] = -np.inf
    ease_hits = np.mean([held[u] in np.argsort(-S[u])[:5] for u in range(n_users)])
    pop = popularity_scores(Xs)
    P = np.tile(pop, (n_users, 1))
    P[X > 0] = -np.inf
    pop_hits = np.mean([held[u] in np.argsort(-P[u])[:5] for u in range(n_users)])
    assert ease_hits > 0.8 > 0.3 > pop_hits


def test_top_k_unseen_excludes_consumed_items_and_pads() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.5], [1.0, 2.0, 3.0, 4.0]])
    seen = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 1, 1, 0]], np.float32))
    top = top_k_unseen(scores, seen, k=3)
    assert top.dtype == np.int64
    assert top[0].tolist() == [2, 3, 0]  # the tie 0.5/0.5 goes to the lower column
    assert top[1].tolist() == [3, -1, -1]
    with pytest.raises(ValueError, match="shape"):
        top_k_unseen(scores[:1], seen, k=3)

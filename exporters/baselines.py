"""Baseline recommenders on a binary user × item matrix: most-popular, EASE, co-visitation.

Recstack is judged against these (DESIGN.md, "Quality is judged against baselines"), and
their sparse neighbour lists are what the online item-to-item candidate source serves.

- :func:`interaction_matrix` builds the binary matrix X (users × items) from the raw
  interactions table; a rated/viewed item counts as consumed.
- :func:`popularity_scores`: column sums of X, the most-popular baseline.
- :func:`ease_weights`: Steck 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"
  (WWW '19): B = argmin ||X − XB||² + λ||B||² with diag(B) = 0, closed form
  P = (XᵀX + λI)⁻¹, B = −P / diag(P) (column-wise), diag(B) = 0. Dense n_items²: only for
  catalogs up to :data:`EASE_MAX_ITEMS`.
- :func:`covisitation_weights`: cosine-normalised co-occurrence XᵀX, computed sparsely
  in chunks of item rows and kept top-N per item, so it scales to 1M items.
- :func:`top_n_neighbours`: either model as fixed-width neighbour lists, the artifact an
  online source reads (row i = items to recommend to someone who consumed item i).
- :func:`score_users`: x_u · B for some user rows; :func:`top_k_unseen`: the best k
  items of each row among those the user has not consumed.

Convention everywhere: score(u) = x_u · B, so ``B[i, j]`` is how much consuming item i
speaks for item j. numpy/scipy only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recstack.settings import EASE_LAMBDA

log = logging.getLogger(__name__)

# A dense float64 n×n Gram matrix and its inverse: 20k items → 2 × 3.2 GB and an O(n³)
# solve of minutes. Beyond that, use covisitation_weights.
EASE_MAX_ITEMS = 20_000


def interaction_matrix(
    interactions: pd.DataFrame,
    item_ids: np.ndarray,
    user_ids: np.ndarray | None = None,
    events: Sequence[str] | None = None,
) -> tuple[sp.csr_matrix, np.ndarray]:
    """Binary user × item matrix of ``interactions`` (columns ``user_id``, ``item_id`` and,
    when ``events`` is given, ``event``).

    Rows follow ``user_ids`` (default: the sorted unique users of the table); columns follow
    ``item_ids``. Events of other users/items, or of other types than ``events`` (default:
    all — a rated item is a consumed item), are ignored. Repeated pairs count once.
    Returns ``(X, row_user_ids)``, X float32 CSR with ones.
    """
    item_ids = np.asarray(item_ids, dtype=np.int64)
    if item_ids.ndim != 1:
        raise ValueError(f"item_ids must be 1-d, got shape {item_ids.shape}")
    if np.unique(item_ids).size != item_ids.size:
        raise ValueError("item_ids has duplicates")
    df = interactions
    if events is not None:
        if "event" not in df.columns:
            raise ValueError("events given but the table has no 'event' column")
        df = df[df["event"].astype(str).isin(list(events))]
    u = df["user_id"].to_numpy(dtype=np.int64)
    i = df["item_id"].to_numpy(dtype=np.int64)
    if user_ids is None:
        rows_users = np.unique(u)
    else:
        rows_users = np.asarray(user_ids, dtype=np.int64)
        if rows_users.ndim != 1:
            raise ValueError(f"user_ids must be 1-d, got shape {rows_users.shape}")
        if np.unique(rows_users).size != rows_users.size:
            raise ValueError("user_ids has duplicates")
    rows = positions(rows_users, u)
    cols = positions(item_ids, i)
    ok = (rows >= 0) & (cols >= 0)
    X = sp.csr_matrix(
        (np.ones(int(ok.sum()), np.float32), (rows[ok], cols[ok])),
        shape=(rows_users.size, item_ids.size),
    )
    X.sum_duplicates()
    X.data[:] = 1.0
    return X, rows_users


def positions(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Index of each of ``values`` in ``ids`` (any order), -1 where absent."""
    if ids.size == 0:
        return np.full(np.shape(values), -1, dtype=np.int64)
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    pos = np.searchsorted(sorted_ids, values)
    pos_c = np.minimum(pos, sorted_ids.size - 1)
    found = (pos < sorted_ids.size) & (sorted_ids[pos_c] == values)
    return np.where(found, order[pos_c], -1).astype(np.int64)


def popularity_scores(X: sp.spmatrix | np.ndarray) -> np.ndarray:
    """Number of users who consumed each item (column sums), float64 [n_items]."""
    return np.asarray(X.sum(axis=0), dtype=np.float64).ravel()


def ease_weights(
    X: sp.spmatrix | np.ndarray, lam: float = EASE_LAMBDA, dtype: type = np.float64
) -> np.ndarray:
    """EASE item-item weights B [n_items, n_items] (Steck 2019), diag(B) = 0.

    G = XᵀX + λI, P = G⁻¹, B[i, j] = −P[i, j] / P[j, j]. Dense: raises ValueError when the
    catalog has more than :data:`EASE_MAX_ITEMS` items (use :func:`covisitation_weights`).
    ``dtype`` is float64 (default) or float32 (half the memory, a less exact inverse).
    """
    n = X.shape[1]
    if n > EASE_MAX_ITEMS:
        raise ValueError(
            f"EASE needs a dense {n:,}×{n:,} inverse; the limit is {EASE_MAX_ITEMS:,} items. "
            "Use covisitation_weights(X, top_n) for large catalogs."
        )
    if lam <= 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if dtype not in (np.float64, np.float32):
        raise ValueError(f"dtype must be float64 or float32, got {dtype}")
    t0 = time.perf_counter()
    Xs = sp.csr_matrix(X, dtype=dtype)

    def gram() -> np.ndarray:
        G = (Xs.T @ Xs).toarray().astype(dtype, copy=False)
        G[np.diag_indices(n)] += lam
        return G

    P = spd_inverse(gram())
    if P is None:  # not positive definite in this precision: the general inverse
        log.warning("EASE: no Cholesky factor of XᵀX + λI (λ=%g); using the LU inverse", lam)
        P = np.linalg.inv(gram())
    B = P / (-np.diag(P))[None, :]
    B[np.diag_indices(n)] = 0.0
    log.info("EASE on %d items (λ=%g) in %.1f s", n, lam, time.perf_counter() - t0)
    return B


def spd_inverse(G: np.ndarray) -> np.ndarray | None:
    """G⁻¹ of a symmetric positive definite ``G`` (float32/64, overwritten) through its
    Cholesky factor: LAPACK's potrf + potri take ~n³ flops where np.linalg.inv's LU solve
    takes ~2.7n³ (a 10k-item float32 Gram here: 43–46 s → 12–13 s, max difference 6e-7 of
    the largest entry). None when the factorisation fails, i.e. ``G`` is not positive
    definite in its precision."""
    from scipy.linalg import lapack

    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (G,))
    factor, info = potrf(G, lower=False, overwrite_a=True, clean=False)
    if info != 0:
        return None
    P, info = potri(factor, lower=False, overwrite_c=True)
    if info != 0:
        return None
    low = np.tril_indices(P.shape[0], -1)
    P[low] = P.T[low]  # potri fills the upper triangle only
    return np.asarray(P)


def covisitation_weights(
    X: sp.spmatrix | np.ndarray, top_n: int, chunk_items: int | None = None
) -> sp.csr_matrix:
    """Item → item co-visitation, cosine-normalised, top ``top_n`` per item (CSR, float32).

    W[i, j] = |users with i and j| / sqrt(|users with i| · |users with j|), diagonal
    removed, only the ``top_n`` largest of each row kept (ties broken by lower column).
    XᵀX is computed sparsely for ``chunk_items`` item rows at a time, so memory is bounded
    by one chunk's co-occurrences plus the kept top-N. Measured here (2 shared cores):
    100k users, 1M Zipf-popular items, 4M events (3.4M distinct pairs), top 50 → 23M
    weights in 143 s with a 2.8 GB peak (plus 15 s for :func:`top_n_neighbours`).
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    t0 = time.perf_counter()
    Xc = sp.csc_matrix(X, dtype=np.float32)
    Xc.data[:] = 1.0
    n_items = Xc.shape[1]
    counts = np.asarray(Xc.sum(axis=0), dtype=np.float64).ravel()
    inv = np.zeros(n_items, np.float64)
    inv[counts > 0] = 1.0 / np.sqrt(counts[counts > 0])
    XT = Xc.T.tocsr()  # items × users
    Xr = Xc.tocsr()  # users × items
    if chunk_items is None:
        # Aim for ~20M co-occurrence entries per chunk: estimate a row's fill by the
        # average number of co-visited items per item.
        per_user = np.diff(Xr.indptr).astype(np.float64)
        pairs = float((per_user**2).sum())
        avg = max(pairs / max(n_items, 1), 1.0)
        chunk_items = int(np.clip(20_000_000 / avg, 256, max(n_items, 256)))
    rows_out: list[np.ndarray] = []
    cols_out: list[np.ndarray] = []
    vals_out: list[np.ndarray] = []
    for lo in range(0, n_items, chunk_items):
        hi = min(lo + chunk_items, n_items)
        C = (XT[lo:hi] @ Xr).tocsr()  # (hi-lo) × n_items co-occurrence counts
        C.sum_duplicates()
        r, c, v = _top_rows(C, lo, inv, top_n)
        rows_out.append(r)
        cols_out.append(c)
        vals_out.append(v)
    rows = np.concatenate(rows_out) if rows_out else np.zeros(0, np.int64)
    cols = np.concatenate(cols_out) if cols_out else np.zeros(0, np.int64)
    vals = np.concatenate(vals_out) if vals_out else np.zeros(0, np.float32)
    W = sp.csr_matrix((vals, (rows, cols)), shape=(n_items, n_items), dtype=np.float32)
    log.info(
        "co-visitation on %d items, top %d: %d weights in %.1f s",
        n_items,
        top_n,
        W.nnz,
        time.perf_counter() - t0,
    )
    return W


def _top_rows(
    C: sp.csr_matrix, lo: int, inv: np.ndarray, top_n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cosine-normalise rows lo.. of the co-occurrence chunk, drop the diagonal, keep top_n
    per row; return global (row, col, value) triplets."""
    n_rows = C.shape[0]
    row = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(C.indptr)) + lo
    col = C.indices.astype(np.int64)
    val = C.data.astype(np.float64) * inv[row] * inv[col]
    keep = (col != row) & (val > 0)
    row, col, val = row[keep], col[keep], val[keep]
    # Sort by (row, -value, col) and keep the first top_n of each row.
    order = np.lexsort((col, -val, row))
    row, col, val = row[order], col[order], val[order]
    starts = np.searchsorted(row, row, side="left")
    rank = np.arange(row.size) - starts
    sel = rank < top_n
    return row[sel], col[sel], val[sel].astype(np.float32)


def top_n_neighbours(
    B: np.ndarray | sp.spmatrix, top_n: int, positive_only: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Per item i, the ``top_n`` columns j with the largest ``B[i, j]`` (diagonal excluded).

    Returns ``(index [n_items, top_n] int32, weight [n_items, top_n] float32)``, each row
    sorted by weight, descending; missing slots hold index -1 and weight 0. With
    ``positive_only`` (default) weights ≤ 0 are not neighbours (EASE has negative
    weights that would only lower a score). Row i is what to recommend to someone who
    consumed item i.
    """
    if top_n < 1:
        raise ValueError(f"top_n must be >= 1, got {top_n}")
    if B.ndim != 2 or B.shape[0] != B.shape[1]:
        raise ValueError(f"B must be square, got shape {B.shape}")
    n = B.shape[0]
    idx = np.full((n, top_n), -1, np.int32)
    wts = np.zeros((n, top_n), np.float32)
    if sp.issparse(B):
        C = sp.csr_matrix(B)
        C.sum_duplicates()
        row = np.repeat(np.arange(n, dtype=np.int64), np.diff(C.indptr))
        col = C.indices.astype(np.int64)
        val = C.data.astype(np.float64)
        keep = (col != row) & ((val > 0) if positive_only else np.ones(val.size, bool))
        row, col, val = row[keep], col[keep], val[keep]
        order = np.lexsort((col, -val, row))
        row, col, val = row[order], col[order], val[order]
        rank = np.arange(row.size) - np.searchsorted(row, row, side="left")
        sel = rank < top_n
        idx[row[sel], rank[sel]] = col[sel]
        wts[row[sel], rank[sel]] = val[sel]
        return idx, wts
    D = np.asarray(B)
    k = min(top_n, n - 1) if n > 1 else 0
    if k == 0:
        return idx, wts
    # In blocks of rows, so a 20k × 20k float64 B does not need a second full copy.
    block = max(1, 20_000_000 // max(n, 1))
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        S = np.array(D[lo:hi], dtype=np.float64)
        S[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        pv = np.take_along_axis(S, part, axis=1)
        order = np.argsort(-pv, axis=1, kind="stable")
        part = np.take_along_axis(part, order, axis=1)
        pv = np.take_along_axis(pv, order, axis=1)
        ok = pv > 0 if positive_only else np.isfinite(pv)
        idx[lo:hi, :k] = np.where(ok, part, -1)
        wts[lo:hi, :k] = np.where(ok, pv, 0.0)
    return idx, wts


def top_k_unseen(scores: np.ndarray, X_seen: sp.spmatrix | np.ndarray, k: int) -> np.ndarray:
    """Per row, the column indices of the ``k`` highest ``scores`` among the items the
    user has not consumed (``X_seen`` > 0), best first: [n_rows, k] int64, -1 padded when
    fewer than k items are left. Ties break towards the lower column index."""
    if scores.shape != X_seen.shape:
        raise ValueError(f"scores {scores.shape} and X_seen {X_seen.shape} differ in shape")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n_rows, n_items = scores.shape
    seen = (sp.csr_matrix(X_seen).toarray() if sp.issparse(X_seen) else np.asarray(X_seen)) > 0
    S = np.where(seen, -np.inf, np.asarray(scores, dtype=np.float64))
    kk = min(k, n_items)
    out = np.full((n_rows, k), -1, np.int64)
    if kk == 0:
        return out
    part = np.argpartition(-S, kk - 1, axis=1)[:, :kk]
    vals = np.take_along_axis(S, part, axis=1)
    order = np.lexsort((part, -vals), axis=1)
    part = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(vals, order, axis=1)
    out[:, :kk] = np.where(np.isfinite(vals), part, -1)
    return out


def score_users(X_rows: sp.spmatrix | np.ndarray, B: np.ndarray | sp.spmatrix) -> np.ndarray:
    """Scores x_u · B of each row of ``X_rows`` [n_users, n_items], dense float (B's
    precision, at least float32)."""
    if X_rows.shape[1] != B.shape[0]:
        raise ValueError(f"X_rows has {X_rows.shape[1]} items but B has {B.shape[0]} rows")
    S = X_rows @ B
    if sp.issparse(S):
        S = S.toarray()
    return np.asarray(S)

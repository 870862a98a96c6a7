"""The catalog as the orchestrator sees it during a request: item attributes needed for
filters, fallbacks and post-processing, as numpy arrays aligned by row, with a vectorised
item_id -> row lookup. Built once per release from the item-feature snapshot and the index.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.request import Filters


@dataclass(frozen=True)
class Catalog:
    """Row-aligned item attributes. ``item_ids`` is sorted ascending (for searchsorted)."""

    item_ids: np.ndarray  # int64, sorted
    category: np.ndarray  # int64
    price: np.ndarray  # float64
    created_at: np.ndarray  # float64 unix seconds
    popularity: np.ndarray  # float64, higher = more popular (recent engagement)
    embeddings: np.ndarray  # float32 [n, dim], the item tower's vectors of this release

    @classmethod
    def build(
        cls,
        item_ids: np.ndarray,
        category: np.ndarray,
        price: np.ndarray,
        created_at: np.ndarray,
        popularity: np.ndarray,
        embeddings: np.ndarray,
    ) -> Catalog:
        """Sort by item id and check that every array has one row per item."""
        n = len(item_ids)
        for name, arr in (
            ("category", category),
            ("price", price),
            ("created_at", created_at),
            ("popularity", popularity),
            ("embeddings", embeddings),
        ):
            if len(arr) != n:
                raise ValueError(f"catalog {name} has {len(arr)} rows for {n} items")
        order = np.argsort(item_ids, kind="stable")
        ids = np.asarray(item_ids, dtype=np.int64)[order]
        if n and np.any(ids[1:] == ids[:-1]):
            raise ValueError("catalog item ids are not unique")
        return cls(
            ids,
            np.asarray(category, dtype=np.int64)[order],
            np.asarray(price, dtype=np.float64)[order],
            np.asarray(created_at, dtype=np.float64)[order],
            np.asarray(popularity, dtype=np.float64)[order],
            np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32)[order]),
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, known): the row of each id, and which ids are in the catalog at all."""
        ids = np.asarray(item_ids, dtype=np.int64)
        rows = np.searchsorted(self.item_ids, ids)
        rows = np.minimum(rows, max(len(self.item_ids) - 1, 0))
        known = (self.item_ids[rows] == ids) if len(self.item_ids) else np.zeros(len(ids), bool)
        return rows, known

    def allowed(self, rows: np.ndarray, filters: Filters, seen: np.ndarray) -> np.ndarray:
        """Mask over ``rows``: passes the request filters and is not in ``seen`` (ids)."""
        mask = np.ones(len(rows), dtype=bool)
        ids = self.item_ids[rows]
        cats = self.category[rows]
        if filters.include_categories:
            mask &= np.isin(cats, np.fromiter(filters.include_categories, np.int64))
        if filters.exclude_categories:
            mask &= ~np.isin(cats, np.fromiter(filters.exclude_categories, np.int64))
        excluded = np.concatenate(
            [np.asarray(seen, dtype=np.int64), np.fromiter(filters.exclude_item_ids, np.int64)]
        )
        if len(excluded):
            mask &= ~np.isin(ids, excluded)
        if filters.price_min > 0 or np.isfinite(filters.price_max):
            price = self.price[rows]
            mask &= (price >= filters.price_min) & (price <= filters.price_max)
        return mask


@dataclass(frozen=True)
class Fallbacks:
    """Precomputed candidate lists that need no model: most popular and newest items."""

    popular_rows: np.ndarray  # catalog rows, most popular first
    fresh_rows: np.ndarray  # catalog rows, newest first

    @classmethod
    def build(cls, catalog: Catalog, depth: int = 5000) -> Fallbacks:
        """Keep the top ``depth`` of each list: enough to survive strict filters."""
        depth = min(depth, len(catalog))
        popular = np.argsort(-catalog.popularity, kind="stable")[:depth]
        fresh = np.argsort(-catalog.created_at, kind="stable")[:depth]
        return cls(popular.astype(np.int64), fresh.astype(np.int64))

    def candidates(
        self,
        catalog: Catalog,
        filters: Filters,
        seen: np.ndarray,
        n: int,
        now: float,
        fresh_share: float = 0.3,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, scores, sources) of up to ``n`` popular and fresh items passing the filters;
        scores decrease along each list so post-processing keeps their order."""
        out_rows, out_scores, out_sources = [], [], []
        n_fresh = round(n * fresh_share)
        for rows, count, source in (
            (self.fresh_rows, n_fresh, "fresh"),
            (self.popular_rows, n - n_fresh, "popular"),
        ):
            rows = rows[catalog.created_at[rows] <= now]  # not yet released: not offered
            rows = rows[catalog.allowed(rows, filters, seen)][:count]
            out_rows.append(rows)
            out_scores.append(1.0 - np.arange(len(rows), dtype=np.float64) / max(len(rows), 1))
            out_sources.append(np.full(len(rows), source, dtype=object))
        return np.concatenate(out_rows), np.concatenate(out_scores), np.concatenate(out_sources)

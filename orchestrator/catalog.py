"""The catalog as the orchestrator sees it during a request: item attributes needed for
filters, fallbacks and post-processing, as numpy arrays aligned by row, with a vectorised
item_id -> row lookup. Built once per release from the item-feature snapshot and the index;
rows follow the index's rows, so a FAISS result is already a catalog row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from exporters.candidates import exists_at
from orchestrator.id_index import IdIndex
from orchestrator.request import Filters


@dataclass(frozen=True)
class Catalog:
    """Row-aligned item attributes, rows in the order given to :meth:`build`."""

    item_ids: np.ndarray  # int64, unique
    category: np.ndarray  # int64
    price: np.ndarray  # float64
    created_at: np.ndarray  # float64 unix seconds
    popularity: np.ndarray  # float64, higher = more popular (recent engagement)
    embeddings: np.ndarray  # float32 [n_index, dim], the index rows' item-tower vectors
    # Rows after the index's: items added since the release (orchestrator/new_items.py),
    # their vectors kept apart so the index's (often a view into it) are never copied.
    added_embeddings: np.ndarray | None = None  # float32 [n - n_index, dim]
    unavailable_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted
    _rows: IdIndex = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rows", IdIndex(self.item_ids))  # raises on duplicates

    @classmethod
    def build(
        cls,
        item_ids: np.ndarray,
        category: np.ndarray,
        price: np.ndarray,
        created_at: np.ndarray,
        popularity: np.ndarray,
        embeddings: np.ndarray,
        added_embeddings: np.ndarray | None = None,
        unavailable: np.ndarray | None = None,
    ) -> Catalog:
        """Check that every array has one row per item and the ids are unique; rows keep
        the given order (the index's, so FAISS rows are catalog rows). ``embeddings``
        cover the first rows, ``added_embeddings`` the rest; ``unavailable`` item ids are
        never offered (ids not in the catalog are ignored)."""
        n = len(item_ids)
        n_added = 0 if added_embeddings is None else len(added_embeddings)
        for name, arr, want in (
            ("category", category, n),
            ("price", price, n),
            ("created_at", created_at, n),
            ("popularity", popularity, n),
            ("embeddings", embeddings, n - n_added),
        ):
            if len(arr) != want:
                raise ValueError(f"catalog {name} has {len(arr)} rows for {want} items")
        try:
            catalog = cls(
                np.asarray(item_ids, dtype=np.int64),
                np.asarray(category, dtype=np.int64),
                np.asarray(price, dtype=np.float64),
                np.asarray(created_at, dtype=np.float64),
                np.asarray(popularity, dtype=np.float64),
                np.ascontiguousarray(embeddings, dtype=np.float32),
                None if not n_added else np.ascontiguousarray(added_embeddings, dtype=np.float32),
            )
        except ValueError as e:
            raise ValueError(f"catalog item ids: {e}") from None
        if unavailable is not None and len(unavailable):
            rows, known = catalog.rows(np.asarray(unavailable, dtype=np.int64))
            object.__setattr__(catalog, "unavailable_rows", np.unique(rows[known]))
        return catalog

    def __len__(self) -> int:
        return len(self.item_ids)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The item-tower vectors of ``rows`` (index rows and added rows alike)."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.added_embeddings is None:
            return self.embeddings[rows]
        n = len(self.embeddings)
        out = np.empty((len(rows), self.embeddings.shape[1]), dtype=np.float32)
        inside = rows < n
        out[inside] = self.embeddings[rows[inside]]
        out[~inside] = self.added_embeddings[rows[~inside] - n]
        return out

    def contains(self, item_ids: np.ndarray) -> np.ndarray:
        """Which of ``item_ids`` have a row (one table lookup each, not a search)."""
        return self.rows(item_ids)[1]

    def rows(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(rows, known): the row of each id, and which ids are in the catalog at all."""
        return self._rows.positions(item_ids)

    def allowed(self, rows: np.ndarray, filters: Filters, seen: np.ndarray) -> np.ndarray:
        """Mask over ``rows``: passes the request filters and is not in ``seen`` (ids)."""
        return self.request_filter(filters, seen)(rows)

    def request_filter(
        self, filters: Filters, seen: np.ndarray
    ) -> Callable[[np.ndarray], np.ndarray]:
        """:meth:`allowed` of one request as a function of rows. The blocked items (``seen``
        ids and the filter's excluded ids) are looked up and sorted once here, not on each
        call: the candidate merge filters five source lists per request."""
        excluded = np.concatenate(
            [np.asarray(seen, dtype=np.int64), np.fromiter(filters.exclude_item_ids, np.int64)]
        )
        excluded_rows, known = self.rows(excluded)
        # Sorted; out-of-stock items (unavailable_rows) are blocked for everyone.
        blocked = np.unique(np.concatenate([excluded_rows[known], self.unavailable_rows]))
        include = np.fromiter(filters.include_categories, np.int64)
        exclude = np.fromiter(filters.exclude_categories, np.int64)
        price_min, price_max = filters.price_min, filters.price_max
        by_price = price_min > 0 or np.isfinite(price_max)

        def mask(rows: np.ndarray) -> np.ndarray:
            rows = np.asarray(rows, dtype=np.int64)
            ok = np.ones(len(rows), dtype=bool)
            if len(include):
                ok &= np.isin(self.category[rows], include)
            if len(exclude):
                ok &= ~np.isin(self.category[rows], exclude)
            if len(blocked):
                pos = np.minimum(np.searchsorted(blocked, rows), len(blocked) - 1)
                ok &= blocked[pos] != rows
            if by_price:
                price = self.price[rows]
                ok &= (price >= price_min) & (price <= price_max)
            return ok

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

    def extended(self, catalog: Catalog, new_rows: np.ndarray, depth: int = 5000) -> Fallbacks:
        """The lists of ``catalog`` when it is this one's catalog plus ``new_rows``: each
        list merged with the new rows (what :meth:`build` gives, ties included, without
        sorting the whole catalog again)."""
        new_rows = np.asarray(new_rows, dtype=np.int64)
        out = []
        for rows, key in (
            (self.popular_rows, -catalog.popularity),
            (self.fresh_rows, -catalog.created_at),
        ):
            merged = np.concatenate([rows, new_rows])
            out.append(merged[np.argsort(key[merged], kind="stable")][:depth])
        return Fallbacks(out[0], out[1])

    def candidates(
        self,
        catalog: Catalog,
        filters: Filters,
        seen: np.ndarray,
        n: int,
        now: float,
        fresh_share: float = 0.3,
        popular_rows: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(rows, scores, sources) of up to ``n`` popular and fresh items passing the filters;
        scores decrease along each list so post-processing keeps their order.
        ``popular_rows``: another popular list to serve (a cold-start segment's), most
        popular first; its rows run out under strict filters sooner than the global list,
        which then tops it up."""
        out_rows, out_scores, out_sources = [], [], []
        n_fresh = round(n * fresh_share)
        passes = catalog.request_filter(filters, seen)
        popular = self.popular_rows
        if popular_rows is not None:
            rest = self.popular_rows[~np.isin(self.popular_rows, popular_rows)]
            popular = np.concatenate([np.asarray(popular_rows, dtype=np.int64), rest])
        for rows, count, source in (
            (self.fresh_rows, n_fresh, "fresh"),
            (popular, n - n_fresh, "popular"),
        ):
            rows = rows[exists_at(catalog.created_at[rows], now)]  # not yet released: not offered
            rows = rows[passes(rows)][:count]
            out_rows.append(rows)
            out_scores.append(1.0 - np.arange(len(rows), dtype=np.float64) / max(len(rows), 1))
            out_sources.append(np.full(len(rows), source, dtype=object))
        return np.concatenate(out_rows), np.concatenate(out_scores), np.concatenate(out_sources)

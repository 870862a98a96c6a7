"""Candidate sources beside the two-tower ANN, their merge, and the per-candidate source
features the ranker sees: one module for training and serving (the orchestrator imports
it), so candidates are generated and described the same way on both sides.

Sources (DESIGN.md "Request path", step 4), each in catalog rows (= the release index's
row order):

- ``ann``: the FAISS search over the item tower (computed by the caller);
- ``i2i``: item-to-item neighbours of the user's seen items. Score of item j for a user
  = Σ over the user's newest :data:`exporters.seen.I2I_HISTORY` seen items i of
  ``weights[i, k]`` where ``neighbours[i, k] == j``: an EASE model (Steck 2019) for
  catalogs up to ``baselines.EASE_MAX_ITEMS`` items, cosine co-visitation beyond, cut to
  sparse top-N lists so the cost is O(history × N) per request whatever the catalog;
- ``popular``: the most consumed items before the model's cut-off;
- ``category_popular``: the same within the user's most consumed category;
- ``fresh``: the newest items created before the request's time.

Beside them, for users without history (cold start, orchestrator/service.py): the most
consumed items per *segment* of users sharing attributes of the users table
(:data:`SEGMENT_ATTRIBUTES`, alone and together), from the same events as ``popular``.
A segment is kept only with at least :data:`SEGMENT_MIN_USERS` users and
:data:`SEGMENT_MIN_CONSUMPTIONS` consumed (user, item) pairs; a thinner one is left out
and its users get the global list. Fresh items stay global: items carry no segment, and
a segment's "fresh" would be the new items it already consumed — popularity again.

The merged list keeps the ANN's order, then item-to-item, popular, category-popular and
fresh items, each cut to its :class:`Quotas` share after the caller's filters, without
duplicates (:func:`gather`). Every merged candidate carries :data:`CANDIDATE_FEATURES`
(ranks in each source, the item-to-item score, the item's long-term popularity), which
the ranker is trained on point-in-time: the model used for training candidates is built
from the events its requests may know only.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from exporters import baselines
from exporters.schema import CONTEXT_COLUMNS
from exporters.seen import I2I_HISTORY
from recstack.settings import EASE_LAMBDA

log = logging.getLogger(__name__)

CANDIDATE_FEATURES: tuple[str, ...] = (
    "c_ann_rank",  # position in the (filtered) ANN list, ABSENT_RANK if not there
    "c_i2i_rank",  # position in the (filtered) item-to-item list, ABSENT_RANK if not there
    "c_i2i_score",  # item-to-item score (0: no neighbour of the user's history)
    "c_pop_rank",  # rank by consumption count before the cut-off (0 = most consumed)
    "c_pop_log_count",  # log1p(consumption count before the cut-off)
    "c_catpop_rank",  # position in the popular list of the user's main category, or ABSENT
    "c_fresh_rank",  # position in the newest-items list (at the request), or ABSENT
)
ABSENT_RANK = 10_000.0
# The candidate sources in merge order (gather_found's ``found`` bits): the ANN,
# item-to-item, popular, popular in the user's main category, newest items.
SOURCES: tuple[str, ...] = ("retrieval", "item_to_item", "popular", "category_popular", "fresh")
MODEL_FILE = "candidates.npz"
# Up to this many items the release keeps EASE's whole weight matrix (float32: 100 MB at
# 5,000 items) and scores every item exactly (one [history, n] row sum per request);
# beyond, the top-N neighbour lists.
DENSE_MAX_ITEMS = 5000
# The dense path scores the user's newest DENSE_HISTORY seen items (the neighbour-list
# path I2I_HISTORY): heavy raters' older items still carry signal (measured on the sparse
# preset: EASE over the newest 200 0.095, over all 0.108 NDCG@10).
DENSE_HISTORY = 1000
# Users-table attributes that define cold-start segments (exporters/schema.py USERS), in
# the order a segment's name lists them.
SEGMENT_ATTRIBUTES: tuple[str, ...] = ("country", "age_bucket")
# Context segments: the interactions' request context (exporters/schema.py
# CONTEXT_COLUMNS), one list per value ("surface=cart"), tried after the user's attribute
# segments (who the user is says more than where they are, when both are known). Only
# values of this shape make a segment (free text such as a URL does not).
CONTEXT_VALUE = re.compile(r"[A-Za-z0-9_.:-]{1,32}")
# A set of segment lists: (names, rows, start), segment s's rows rows[start[s]:start[s+1]].
Segments = tuple[tuple[str, ...], np.ndarray, np.ndarray]
# A segment thinner than this serves its users the global popular list: its own top
# items would be a handful of users' tastes.
SEGMENT_MIN_USERS = 30
SEGMENT_MIN_CONSUMPTIONS = 500
SEGMENT_DEPTH = 500  # rows kept per segment list (enough to survive strict filters)


@dataclass(frozen=True)
class Quotas:
    """How many filtered candidates each source contributes (before de-duplication)."""

    ann: int = 250
    i2i: int = 100
    popular: int = 50
    category_popular: int = 30  # popular in the user's most consumed category
    fresh: int = 20  # the newest items

    @property
    def total(self) -> int:
        return self.ann + self.i2i + self.popular + self.category_popular + self.fresh

    def to_json(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Quotas:
        return cls(**(data or {}))


@dataclass(frozen=True)
class SourceModel:
    """The non-ANN sources of one cut-off, in catalog rows (``item_ids`` order)."""

    item_ids: np.ndarray  # int64 [n]: row -> item id (the index's order)
    neighbours: np.ndarray  # int32 [n, N]: rows, best first, -1 padded
    weights: np.ndarray  # float32 [n, N]
    pop_count: np.ndarray  # float32 [n]: consumption count before the cut-off
    pop_rank: np.ndarray  # float32 [n]: 0 = most consumed (ties by row)
    popular_rows: np.ndarray  # int64: rows, most consumed first (the top of pop_rank)
    info: dict[str, Any]  # method, cut-off, sizes (for the manifest)
    dense: np.ndarray | None = None  # float32 [n, n] EASE weights (small catalogs)
    category: np.ndarray | None = None  # int64 [n] (-1 unknown)
    created_at: np.ndarray | None = None  # float64 [n], unix seconds
    # Derived (from_arrays): rows by category then popularity, and by age.
    category_rows: np.ndarray | None = None  # int64 [n]
    category_start: np.ndarray | None = None  # int64 [C + 1] offsets into category_rows
    newest_rows: np.ndarray | None = None  # int64 [n], newest first
    # -created_at of newest_rows (ascending, so a request's cut is one searchsorted).
    newest_neg_created: np.ndarray | None = None
    # Cold-start segments ("country=3", "country=3,age_bucket=2"): segment_rows
    # [segment_start[s] : segment_start[s + 1]] are segment s's rows, most consumed first.
    segment_names: tuple[str, ...] = ()
    segment_rows: np.ndarray | None = None  # int64
    segment_start: np.ndarray | None = None  # int64 [S + 1]

    def segment_popular(
        self, attributes: dict[str, int], context: dict[str, str] | None = None
    ) -> tuple[str, np.ndarray] | None:
        """The most specific kept segment of a user with these attribute values (negative:
        unknown) in this request ``context`` (``surface``/``device``; "" unknown) and its
        rows, most consumed first; None when no segment fits."""
        if not self.segment_names or self.segment_rows is None or self.segment_start is None:
            return None
        for name in segment_candidates(attributes, context):
            try:
                s = self.segment_names.index(name)
            except ValueError:
                continue
            lo, hi = self.segment_start[s], self.segment_start[s + 1]
            return name, self.segment_rows[lo:hi]
        return None

    @property
    def n_neighbours(self) -> int:
        return int(self.neighbours.shape[1])

    def save(self, path: Path) -> None:
        """Write atomically (a reader sees the old file or the new one)."""
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with tmp.open("wb") as f:
            np.savez(
                f,
                item_ids=self.item_ids,
                neighbours=self.neighbours,
                weights=self.weights,
                pop_count=self.pop_count,
                info=np.array(json.dumps(self.info)),
                dense=self.dense if self.dense is not None else np.zeros((0, 0), np.float32),
                category=self.category if self.category is not None else np.zeros(0, np.int64),
                created_at=self.created_at
                if self.created_at is not None
                else np.zeros(0, np.float64),
                segment_names=np.array(self.segment_names, dtype=np.str_),
                segment_rows=self.segment_rows
                if self.segment_rows is not None
                else np.zeros(0, np.int64),
                segment_start=self.segment_start
                if self.segment_start is not None
                else np.zeros(0, np.int64),
            )
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> SourceModel:
        with np.load(path, allow_pickle=False) as z:

            def optional(name: str) -> np.ndarray | None:
                return z[name] if name in z.files and z[name].size else None

            return cls.from_arrays(
                z["item_ids"],
                z["neighbours"],
                z["weights"],
                z["pop_count"],
                json.loads(str(z["info"])),
                dense=optional("dense"),
                category=optional("category"),
                created_at=optional("created_at"),
                # A file from before segments has none: its cold starts get global lists.
                segments=(
                    tuple(str(n) for n in z["segment_names"]),
                    z["segment_rows"],
                    z["segment_start"],
                )
                if "segment_names" in z.files and z["segment_names"].size
                else None,
            )

    @classmethod
    def from_arrays(
        cls,
        item_ids: np.ndarray,
        neighbours: np.ndarray,
        weights: np.ndarray,
        pop_count: np.ndarray,
        info: dict[str, Any],
        popular_depth: int = 2000,
        dense: np.ndarray | None = None,
        category: np.ndarray | None = None,
        created_at: np.ndarray | None = None,
        segments: tuple[tuple[str, ...], np.ndarray, np.ndarray] | None = None,
    ) -> SourceModel:
        """``segments``: (names, rows, start) as :func:`segment_lists` returns them."""
        n = len(item_ids)
        if neighbours.shape != weights.shape or neighbours.shape[0] != n or len(pop_count) != n:
            raise ValueError(
                f"candidate model arrays disagree: {n} items, neighbours {neighbours.shape}, "
                f"weights {weights.shape}, popularity {len(pop_count)}"
            )
        order = np.lexsort((np.arange(n), -np.asarray(pop_count, dtype=np.float64)))
        rank = np.empty(n, dtype=np.float32)
        rank[order] = np.arange(n, dtype=np.float32)
        by_cat = start = newest = newest_at = None
        if category is not None and len(category) == n:
            category = np.asarray(category, dtype=np.int64)
            by_cat = np.lexsort((rank, category))  # category, then most popular first
            n_cat = int(category.max()) + 1 if n else 0
            start = np.searchsorted(category[by_cat], np.arange(n_cat + 1)).astype(np.int64)
        else:
            category = None
        if created_at is not None and len(created_at) == n:
            created_at = np.asarray(created_at, dtype=np.float64)
            newest = np.argsort(-created_at, kind="stable").astype(np.int64)
            newest_at = -created_at[newest]
        else:
            created_at = None
        names: tuple[str, ...] = ()
        seg_rows = seg_start = None
        if segments is not None:
            names = tuple(segments[0])
            seg_rows = np.asarray(segments[1], dtype=np.int64)
            seg_start = np.asarray(segments[2], dtype=np.int64)
            if len(seg_start) != len(names) + 1 or (
                len(names) and (seg_start[-1] != len(seg_rows) or (seg_rows >= n).any())
            ):
                raise ValueError(
                    f"candidate model segments disagree: {len(names)} names, "
                    f"{len(seg_start)} offsets, {len(seg_rows)} rows over {n} items"
                )
        return cls(
            np.asarray(item_ids, dtype=np.int64),
            np.ascontiguousarray(neighbours, dtype=np.int32),
            np.ascontiguousarray(weights, dtype=np.float32),
            np.asarray(pop_count, dtype=np.float32),
            rank,
            order[:popular_depth].astype(np.int64),
            info,
            None if dense is None else np.ascontiguousarray(dense, dtype=np.float32),
            category,
            created_at,
            by_cat,
            start,
            newest,
            newest_at,
            names,
            seg_rows,
            seg_start,
        )


def default_top_n(n_items: int) -> int:
    """Neighbours kept per item: the whole useful list on small catalogs, a bounded
    memory (n × N × 8 bytes: 240 MB at 1M items) on large ones."""
    if n_items <= 50_000:
        return 100
    return 30


def build_model(
    interactions: pd.DataFrame,
    item_ids: np.ndarray,
    events: Sequence[str],
    before: pd.Timestamp | None,
    top_n: int | None = None,
    lam: float = EASE_LAMBDA,  # the pipeline passes the setting or the validation's choice
    cut: str = "",
    items: pd.DataFrame | None = None,
    users: pd.DataFrame | None = None,
) -> SourceModel:
    """The item-to-item and popularity sources from ``events`` strictly before ``before``
    (all when None; callers may also pass only the rows they may know), over the catalog
    rows ``item_ids``. ``cut`` names the cut-off in the model's info. ``items``
    (``item_id, category, created_at``) enables the category-popular and fresh sources,
    ``users`` (``user_id`` and any of :data:`SEGMENT_ATTRIBUTES`) the cold-start segment
    lists — from the same events, so they are as point-in-time as the rest."""
    t0 = time.perf_counter()
    df = interactions if before is None else interactions[interactions["timestamp"] < before]
    X, row_users = baselines.interaction_matrix(df, item_ids, events=events)
    n = len(item_ids)
    top_n = top_n or default_top_n(n)
    if n <= baselines.EASE_MAX_ITEMS:
        method = f"ease(lambda={lam:g})"
        B: Any = baselines.ease_weights(X, lam=lam, dtype=np.float32 if n > 5000 else np.float64)
    else:
        method = "covisitation(cosine)"
        B = baselines.covisitation_weights(X, top_n)
    neighbours, weights = baselines.top_n_neighbours(B, top_n)
    dense = (
        np.asarray(B, dtype=np.float32)
        if n <= DENSE_MAX_ITEMS and method.startswith("ease")
        else None
    )
    del B
    pop_count = baselines.popularity_scores(X)
    segments = None
    segment_info: dict[str, Any] = {"attributes": []}
    if users is not None:
        segments, segment_info = segment_lists(X, row_users, users, pop_count)
        by_context, segment_info["context"] = context_lists(df, item_ids, events, pop_count)
        segments = join_segments(segments, by_context)
    info = {
        "method": method,
        "events": list(events),
        "before": None if before is None else pd.Timestamp(before).isoformat(),
        "cut": cut,
        "users": int(X.shape[0]),
        "interactions": int(X.nnz),
        "top_n": int(top_n),
        "dense": dense is not None,
        "segments": segment_info,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    log.info("candidate sources: %s", json.dumps(info))
    category = created = None
    if items is not None:
        ids = np.asarray(item_ids, dtype=np.int64)
        category = items.set_index("item_id")["category"].reindex(ids).fillna(-1)
        category = category.to_numpy(np.int64)
        created = created_seconds(items).reindex(ids).fillna(0.0).to_numpy(np.float64)
    return SourceModel.from_arrays(
        item_ids,
        neighbours,
        weights,
        pop_count,
        info,
        dense=dense,
        category=category,
        created_at=created,
        segments=segments,
    )


def segment_name(attributes: dict[str, int]) -> str:
    """``country=3,age_bucket=2``: the attributes in :data:`SEGMENT_ATTRIBUTES` order."""
    return ",".join(f"{a}={attributes[a]}" for a in SEGMENT_ATTRIBUTES if a in attributes)


def segment_candidates(
    attributes: dict[str, int], context: dict[str, str] | None = None
) -> list[str]:
    """The segments a user with these attribute values (negative: unknown) belongs to in
    this request ``context``, most specific first: all known attributes together, then
    each alone, then each context value (``surface=cart``, ``device=ios``)."""
    known = {a: int(v) for a, v in attributes.items() if a in SEGMENT_ATTRIBUTES and v >= 0}
    names = [segment_name(known)] if len(known) > 1 else []
    names += [segment_name({a: known[a]}) for a in SEGMENT_ATTRIBUTES if a in known]
    for col in CONTEXT_COLUMNS:
        value = (context or {}).get(col, "")
        if value and CONTEXT_VALUE.fullmatch(value):
            names.append(f"{col}={value}")
    return names


def segment_lists(
    X: Any,
    row_users: np.ndarray,
    users: pd.DataFrame,
    pop_count: np.ndarray,
    min_users: int = SEGMENT_MIN_USERS,
    min_consumptions: int = SEGMENT_MIN_CONSUMPTIONS,
    depth: int = SEGMENT_DEPTH,
) -> tuple[Segments, dict[str, Any]]:
    """Per-segment popular lists from the binary user × item matrix ``X`` (rows
    ``row_users``): ``((names, rows, start), info)``. Rows of a segment are the items its
    users consumed, by how many of them did (ties: global popularity, then row). Only
    attributes the data has are used: a column of ``users`` that is missing or holds one
    known value (an import without it writes 0 for everyone) defines no segment."""
    attrs = [
        a
        for a in SEGMENT_ATTRIBUTES
        if a in users.columns and users.loc[users[a] >= 0, a].nunique() > 1
    ]
    info: dict[str, Any] = {
        "attributes": attrs,
        "min_users": min_users,
        "min_consumptions": min_consumptions,
        "kept": 0,
        "thin": 0,
    }
    empty = ((), np.zeros(0, np.int64), np.zeros(1, np.int64))
    if not attrs or X.shape[0] == 0:
        return empty, info
    table = users.drop_duplicates("user_id").set_index("user_id")[attrs]
    values = table.reindex(np.asarray(row_users, dtype=np.int64)).fillna(-1).astype(np.int64)
    groupings = [[a] for a in attrs] + ([attrs] if len(attrs) > 1 else [])
    X = X.tocsr()
    per_user = np.diff(X.indptr)  # consumed items per matrix row
    names: list[str] = []
    lists: list[np.ndarray] = []
    n_thin = 0
    rank_of = _global_rank(pop_count)
    for group in groupings:
        cols = values[group]
        ok = (cols >= 0).all(axis=1).to_numpy()
        for key, idx in cols[ok].groupby(group).indices.items():
            member = np.flatnonzero(ok)[idx]
            keys = key if isinstance(key, tuple) else (key,)
            name = segment_name({a: int(v) for a, v in zip(group, keys, strict=True)})
            active = member[per_user[member] > 0]
            if len(active) < min_users or int(per_user[active].sum()) < min_consumptions:
                n_thin += 1
                continue
            names.append(name)
            lists.append(_by_popularity(np.asarray(X[active].sum(axis=0)).ravel(), rank_of, depth))
    info["kept"], info["thin"] = len(names), n_thin
    if not names:
        return empty, info
    start = np.concatenate([[0], np.cumsum([len(r) for r in lists])]).astype(np.int64)
    return (tuple(names), np.concatenate(lists), start), info


def join_segments(a: Segments, b: Segments) -> Segments:
    """Two (names, rows, start) segment sets as one."""
    if not b[0]:
        return a
    start = np.concatenate([a[2], a[2][-1] + b[2][1:]]).astype(np.int64)
    return (tuple(a[0]) + tuple(b[0]), np.concatenate([a[1], b[1]]).astype(np.int64), start)


def _by_popularity(counts: np.ndarray, rank_of: np.ndarray, depth: int) -> np.ndarray:
    """Rows with a count, most counted first (ties: the global popularity rank)."""
    rows = np.flatnonzero(counts)
    return rows[np.lexsort((rank_of[rows], -counts[rows]))][:depth].astype(np.int64)


def _global_rank(pop_count: np.ndarray) -> np.ndarray:
    """Each row's place in the global popular order (ties by row)."""
    order = np.lexsort((np.arange(len(pop_count)), -pop_count))
    rank_of = np.empty(len(pop_count), np.int64)
    rank_of[order] = np.arange(len(pop_count))
    return rank_of


def context_lists(
    interactions: pd.DataFrame,
    item_ids: np.ndarray,
    events: Sequence[str],
    pop_count: np.ndarray,
    min_users: int = SEGMENT_MIN_USERS,
    min_consumptions: int = SEGMENT_MIN_CONSUMPTIONS,
    depth: int = SEGMENT_DEPTH,
) -> tuple[Segments, dict[str, Any]]:
    """Per request-context value popular lists (``surface=cart``): the items most users
    consumed in that context, from the same events as the global list, with the user
    segments' thinness rules. A context column that is absent or holds fewer than two
    segment-shaped values defines none."""
    info: dict[str, Any] = {"columns": [], "kept": 0, "thin": 0}
    empty: Segments = ((), np.zeros(0, np.int64), np.zeros(1, np.int64))
    cols = [c for c in CONTEXT_COLUMNS if c in interactions.columns]
    if not cols or interactions.empty:
        return empty, info
    consumed = interactions[interactions["event"].astype(str).isin(list(events))]
    rank_of = _global_rank(pop_count)
    names: list[str] = []
    lists: list[np.ndarray] = []
    for col in cols:
        values = consumed[col].astype(str)
        shaped = [v for v in values.unique() if CONTEXT_VALUE.fullmatch(v)]
        if len(shaped) < 2:
            continue
        info["columns"].append(col)
        for value in sorted(shaped):
            X, _ = baselines.interaction_matrix(consumed[values == value], item_ids)
            per_user = np.diff(X.indptr)
            if (per_user > 0).sum() < min_users or int(per_user.sum()) < min_consumptions:
                info["thin"] += 1
                continue
            names.append(f"{col}={value}")
            lists.append(_by_popularity(np.asarray(X.sum(axis=0)).ravel(), rank_of, depth))
    info["kept"] = len(names)
    if not names:
        return empty, info
    start = np.concatenate([[0], np.cumsum([len(r) for r in lists])]).astype(np.int64)
    return (tuple(names), np.concatenate(lists), start), info


def exists_at(created: np.ndarray, now: float) -> np.ndarray:
    """Which items exist for a request at ``now`` (unix s): those created strictly before
    it. Without creation times an import dates an item by its first interaction
    (exporters/data_import.py); offline, a request made at a user's first validation or
    test event would otherwise see the item first met in that very event as "created
    now" — the fresh source would offer it and ``x_item_age_days`` 0 would mark it, a
    label leak the ranker learns and serving never has (docs/quality.md)."""
    return created < now


def created_seconds(items: pd.DataFrame) -> pd.Series:
    """Item id -> creation time in unix seconds (NaN where unknown), from an items table
    with ``item_id`` and ``created_at``."""
    epoch = pd.Timestamp(0, tz="UTC")
    seconds = (pd.to_datetime(items["created_at"], utc=True) - epoch).dt.total_seconds()
    return pd.Series(seconds.to_numpy(), index=items["item_id"].to_numpy())


def i2i_scores(model: SourceModel, history_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every row reachable from the user's newest seen items with its summed weight,
    best first: ``(rows int64, scores float32)``. ``history_rows`` are catalog rows,
    newest first; -1 (not in the catalog) is skipped."""
    depth = DENSE_HISTORY if model.dense is not None else I2I_HISTORY
    hist = np.asarray(history_rows, dtype=np.int64)[:depth]
    # Rows past the model's are items added since the release: no neighbours yet.
    hist = hist[(hist >= 0) & (hist < len(model.item_ids))]
    if len(hist) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    if model.dense is not None:  # exact EASE scores of every item
        dense_scores = model.dense[hist].sum(axis=0)
        order = np.argsort(-dense_scores, kind="stable")
        return order.astype(np.int64), dense_scores[order].astype(np.float32)
    nb = model.neighbours[hist].ravel()
    w = model.weights[hist].ravel()
    ok = nb >= 0
    rows, inverse = np.unique(nb[ok], return_inverse=True)
    scores = np.bincount(inverse, weights=w[ok], minlength=len(rows)).astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    return rows[order].astype(np.int64), scores[order]


def gather(
    model: SourceModel,
    quotas: Quotas,
    ann_rows: np.ndarray,
    seen_rows: np.ndarray,
    allowed: Callable[[np.ndarray], np.ndarray],
    now: float = float("inf"),
) -> tuple[np.ndarray, np.ndarray]:
    """``gather_found`` without the ``found`` masks (training and evaluation)."""
    rows, feats, _ = gather_found(model, quotas, ann_rows, seen_rows, allowed, now)
    return rows, feats


def gather_found(
    model: SourceModel,
    quotas: Quotas,
    ann_rows: np.ndarray,
    seen_rows: np.ndarray,
    allowed: Callable[[np.ndarray], np.ndarray],
    now: float = float("inf"),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The merged candidates of one request — training, evaluation and serving all call
    this — as ``(rows int64 [M], features float32 [M, len(CANDIDATE_FEATURES)], found
    uint8 [M])``; ``found`` has bit i set where ``SOURCES[i]`` proposed the row (after its
    filter and quota), so the answer can say which sources found each item.

    ``ann_rows``: the ANN result in catalog rows, best first, unfiltered; ``seen_rows``:
    the user's seen items in catalog rows, newest first (-1 for items outside the
    catalog); ``allowed(rows) -> bool mask``: the request's filters (seen items, request
    filters, items not yet created); ``now``: the request's time (unix s), where the
    newest-items list starts. Each source is filtered, cut to its quota, and the lists are
    merged without duplicates: ANN order, then item-to-item, popular, popular in the
    user's most consumed category (of their newest seen items), newest. Only a bounded
    head of each list is filtered (quota × 4 plus the user's seen items), so the cost does
    not grow with the catalog."""
    ann_head = np.asarray(ann_rows, dtype=np.int64)
    n_seen = int((np.asarray(seen_rows) >= 0).sum())
    reach_rows, reach_scores = i2i_scores(model, seen_rows)
    i2i_head = reach_rows[: 4 * quotas.i2i + n_seen]
    pop_head = model.popular_rows[: 4 * quotas.popular + n_seen]
    catpop_head = _category_popular(model, seen_rows, 4 * quotas.category_popular + n_seen)
    fresh_head = np.zeros(0, dtype=np.int64)
    if model.newest_rows is not None and model.newest_neg_created is not None:
        # The items created before now start here (:func:`exists_at`).
        first_ok = int(np.searchsorted(model.newest_neg_created, -now, side="right"))
        fresh_head = model.newest_rows[first_ok : first_ok + 4 * quotas.fresh + n_seen]
    # One filter call for the five heads (``allowed`` is elementwise): each call costs
    # several numpy calls, and these lists are short.
    heads = (ann_head, i2i_head, pop_head, catpop_head, fresh_head)
    ok = np.split(allowed(np.concatenate(heads)), np.cumsum([len(h) for h in heads])[:-1])
    i2i_ok = ok[1]
    i2i = i2i_head[i2i_ok]
    lists = (  # in SOURCES order, each cut to its quota
        ann_head[ok[0]][: quotas.ann],
        i2i[: quotas.i2i],
        pop_head[ok[2]][: quotas.popular],
        catpop_head[ok[3]][: quotas.category_popular],
        fresh_head[ok[4]][: quotas.fresh],
    )
    lengths = [len(a) for a in lists]
    stacked = np.concatenate(lists)
    unique, first, inverse = np.unique(stacked, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # unique -> merged (first appearance) order
    rows = unique[order]
    merged_at = np.empty(len(unique), dtype=np.int64)  # unique index -> merged position
    merged_at[order] = np.arange(len(unique))
    at = merged_at[inverse.ravel()]  # each stacked entry's merged position
    # Bit i of a row's mask: SOURCES[i] proposed it. Each list is duplicate-free, so a
    # row gets each bit at most once and the sum is the bitwise or.
    bits = np.repeat(1 << np.arange(len(lists)), lengths)
    found_by = np.bincount(at, weights=bits, minlength=len(rows)).astype(np.uint8)
    feats = np.full((len(rows), len(CANDIDATE_FEATURES)), ABSENT_RANK, dtype=np.float32)
    # Positions in the ANN, category-popular and fresh lists: those lists are merged
    # whole, so each entry's merged position is known from the merge itself.
    ends = np.cumsum(lengths)
    for column, source in ((0, 0), (5, 3), (6, 4)):
        feats[at[ends[source] - lengths[source] : ends[source]], column] = np.arange(
            lengths[source]
        )
    # The item-to-item score of every candidate, also of those found by another source,
    # and its position in the (filtered, uncut) item-to-item list: found by looking the
    # reachable rows up among the merged ones.
    feats[:, 2] = 0.0
    if len(unique) and len(reach_rows):
        j = np.minimum(np.searchsorted(unique, reach_rows), len(unique) - 1)
        hit = unique[j] == reach_rows
        where = merged_at[j[hit]]
        feats[where, 2] = reach_scores[hit]
        i2i_pos = np.full(len(reach_rows), -1, dtype=np.int64)
        i2i_pos[: len(i2i_head)][i2i_ok] = np.arange(len(i2i))
        pos = i2i_pos[hit]
        feats[where[pos >= 0], 1] = pos[pos >= 0]
    # Items added since the release (rows past the model's) have no consumption yet:
    # ranked after every item of the model, count 0.
    n = len(model.item_ids)
    inside = rows < n
    feats[:, 3] = np.where(inside, model.pop_rank[np.minimum(rows, n - 1)], n)
    feats[:, 4] = np.where(inside, np.log1p(model.pop_count[np.minimum(rows, n - 1)]), 0.0)
    return rows, feats, found_by


CATEGORY_HISTORY = 50  # the newest seen items that pick the user's main category


def _category_popular(model: SourceModel, seen_rows: np.ndarray, depth: int) -> np.ndarray:
    """The most popular rows of the category most frequent among the user's newest seen
    items (empty without categories or history)."""
    if model.category is None or model.category_rows is None or model.category_start is None:
        return np.zeros(0, dtype=np.int64)
    hist = np.asarray(seen_rows, dtype=np.int64)[:CATEGORY_HISTORY]
    cats = model.category[hist[(hist >= 0) & (hist < len(model.category))]]
    cats = cats[(cats >= 0) & (cats < len(model.category_start) - 1)]
    if len(cats) == 0:
        return np.zeros(0, dtype=np.int64)
    main = int(np.bincount(cats).argmax())
    lo, hi = model.category_start[main], model.category_start[main + 1]
    return model.category_rows[lo : min(hi, lo + depth)]


def found_names(found: np.ndarray) -> list[list[str]]:
    """Per ``found`` mask (``gather_found``), the names of the sources that set it, in
    SOURCES order."""
    return [[name for i, name in enumerate(SOURCES) if int(m) >> i & 1] for m in found]


def source_names(features: np.ndarray) -> np.ndarray:
    """The first source that found each merged candidate (for the response's ``source``):
    ``retrieval`` (ANN), ``item_to_item``, ``popular`` or ``fresh``."""
    # Codes into _SOURCE_NAMES, later rules winning; one gather of the names at the end.
    code = np.zeros(len(features), dtype=np.intp)
    code[features[:, 6] < ABSENT_RANK] = 1
    code[features[:, 5] < ABSENT_RANK] = 0
    code[features[:, 1] < ABSENT_RANK] = 2
    code[features[:, 0] < ABSENT_RANK] = 3
    return _SOURCE_NAMES[code]


_SOURCE_NAMES = np.array(["popular", "fresh", "item_to_item", "retrieval"], dtype=object)

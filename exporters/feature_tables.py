"""Event-timestamped feature tables (``recstack features build``): the Feast FileSources.

Written under ``settings.features_dir`` from the canonical raw tables (all of the data;
Feast's point-in-time joins keep training rows from seeing the future):

==========================  ==========  ===================================================
file                        entity      rows and ``event_timestamp``
==========================  ==========  ===================================================
``user_profile.parquet``    user_id     one per user, ts = ``signup_at``
``user_activity.parquet``   user_id     one per user and *change day*, ts = end of that day
``user_recent_items.parquet`` user_id   one per click/purchase (exporters/history.py), ts =
                                        the event's time
``item_profile.parquet``    item_id     one per item, ts = ``created_at``
``item_statistics.parquet`` item_id     one per item and *change day*, ts = end of that day
==========================  ==========  ===================================================

Daily statistics and leakage: a row for UTC day ``D`` carries ``event_timestamp =``
midnight after ``D`` and is computed from events strictly before that instant (days
``<= D``). A point-in-time join "as of t" picks the newest row with ``ts <= t``, so it sees
only events before ``t``; it is at most one day stale (today's events appear tomorrow —
recent items, pushed in real time, cover today).

A *change day* of an entity is a day with its events, or 7 or 30 days after one (when an
event leaves a trailing window), capped at the last day of data: the windowed counts only
change on those days, so the newest row is always the current value. Time-dependent
quantities are stored as absolute times (``user_last_event_at``, ``created_at``: unix
seconds), and the feature assembly turns them into ages at request time.

The category affinity is a vector of length ``n_categories``: event-weighted counts per
category (view 1, click 3, purchase 5), decayed with a ``AFFINITY_HALF_LIFE_DAYS`` half-life,
normalised to sum 1 (Feast type Array(Float32)).

Every entity of a table also has a baseline row at BASELINE_TS holding the defaults
(FEATURE_DEFAULTS), which training and serving also use for entities without rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from exporters import history, materialize_state, seen
from exporters.raw_tables import read_meta, read_table
from recstack.errors import UserError
from recstack.settings import ENGINES, Settings, get_settings

log = logging.getLogger(__name__)

WINDOWS_DAYS: tuple[int, ...] = (7, 30)
EVENT_WEIGHTS: dict[str, float] = {"view": 1.0, "click": 3.0, "purchase": 5.0}
AFFINITY_HALF_LIFE_DAYS = 21.0
SECONDS_PER_DAY = 86_400
US_PER_DAY = SECONDS_PER_DAY * 1_000_000
# Day indices are offset so "day - 30" stays inside an entity's key range (see _Windows).
_DAY_OFFSET = max(WINDOWS_DAYS) + 1
_TS = pa.timestamp("us", tz="UTC")

# Values for entities (or views) the store has no row for — training (historical rows)
# and serving (online lookups) fill the same ones. Codes unknown to the towers are -1
# (exporters/tower_inputs.py); an item with no events ranks after every item with some;
# every other scalar is 0 (so a mean purchase price of 0 means "no purchase"); the
# affinity vector is zeros and recent items are all history.PAD.
UNKNOWN_CODE = -1
UNRANKED = 1_000_000_000
FEATURE_DEFAULTS: dict[str, float] = {
    "age_bucket": UNKNOWN_CODE,
    "country": UNKNOWN_CODE,
    "category": UNKNOWN_CODE,
    "brand": UNKNOWN_CODE,
    "item_popularity_rank": UNRANKED,
}


def default_value(feature: str) -> float:
    """The documented default of a scalar feature (see FEATURE_DEFAULTS)."""
    return float(FEATURE_DEFAULTS.get(feature, 0.0))


# Every entity of a table also gets a *baseline* row at this time holding the defaults, so
# the table is defined at every instant. Besides being the honest value ("nothing known
# yet"), it works around Feast's file offline store, which drops an entity_df row from
# get_historical_features entirely when the entity has rows but all are newer than it.
BASELINE_TS = pd.Timestamp("1970-01-02", tz="UTC")


TABLE_FILES: dict[str, str] = {
    "user_profile": "user_profile.parquet",
    "user_activity": "user_activity.parquet",
    "user_recent_items": "user_recent_items.parquet",
    "user_seen_items": "user_seen_items.parquet",
    "item_profile": "item_profile.parquet",
    "item_statistics": "item_statistics.parquet",
}


def table_path(settings: Settings, name: str) -> Path:
    """Where feature table ``name`` (a key of TABLE_FILES) lives."""
    return settings.features_dir / TABLE_FILES[name]


def _write(table: pa.Table, path: Path) -> None:
    """Write atomically: readers (Feast, a running materialisation) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def _ts_array(us: np.ndarray) -> pa.Array:
    return pa.array(us.astype("datetime64[us]"), type=pa.timestamp("us")).cast(_TS)


def _us(values: pd.Series | np.ndarray) -> np.ndarray:
    """Microseconds since the epoch (UTC) as int64, from any datetime-like column."""
    s = pd.to_datetime(pd.Series(values), utc=True).dt.tz_localize(None)
    return s.to_numpy(dtype="datetime64[us]").view(np.int64)


def vector_column(rows: np.ndarray) -> pa.Array:
    """[n, width] rows as an Arrow list<float32> column (Feast Array(Float32))."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    offsets = pa.array(np.arange(rows.shape[0] + 1, dtype=np.int32) * rows.shape[1])
    return pa.ListArray.from_arrays(offsets, pa.array(rows.ravel(), type=pa.float32()))


def decode_vector(value: object, width: int | None = None) -> np.ndarray:
    """A vector feature value (list, array, or None/NaN when missing) as float32; zeros of
    ``width`` when missing."""
    if value is None or (np.isscalar(value) and pd.isna(value)):
        return np.zeros(width or 0, dtype=np.float32)
    return np.asarray(value, dtype=np.float32)


class _Windows:
    """Trailing-window sums at arbitrary (entity, day) points, vectorised.

    Events are keyed ``rank(entity) * stride + day``; a global cumulative sum over sorted
    keys gives ``cum(e, d)`` = sum of weights with key <= (e, d) by binary search, and
    ``cum(e, d) - cum(e, d - w)`` is the window sum (earlier entities cancel out). The
    entity's rank among the sorted distinct entities, not its id, keeps the key inside
    int64: ids of string keys are 63-bit hashes (recstack/ids.py), and ``id * stride``
    overflowed, putting 99 % of their rows under wrong ids.
    """

    def __init__(self, ent: np.ndarray, day: np.ndarray, stride: int, tiebreak: np.ndarray) -> None:
        self.stride = stride
        self.entities, rank = np.unique(ent, return_inverse=True)
        key = rank.astype(np.int64) * stride + day
        # Within a key, events are in time order, so the last one at a position is the newest.
        self.order = np.lexsort((tiebreak, key))
        self.keys = key[self.order]

    def positions(self, ent: np.ndarray, day: np.ndarray) -> np.ndarray:
        """Number of events with key <= (ent, day): an index into :meth:`cumsum`. An entity
        without events is placed before the next one's events (every window sums to 0)."""
        rank = np.searchsorted(self.entities, ent)
        known = rank < len(self.entities)
        known[known] = self.entities[rank[known]] == ent[known]
        key = np.where(known, rank * self.stride + day, rank * self.stride - 1)
        return np.searchsorted(self.keys, key, side="right")

    def cumsum(self, weights: np.ndarray) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(weights[self.order], dtype=np.float64)])

    def window(
        self, weights: np.ndarray, ent: np.ndarray, day: np.ndarray, days: int
    ) -> np.ndarray:
        cs = self.cumsum(weights)
        return cs[self.positions(ent, day)] - cs[self.positions(ent, day - days)]


def _change_days(ent: np.ndarray, day: np.ndarray, last_day: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique (entity, day) rows: event days and the days events leave each window."""
    stride = int(day.max()) + max(WINDOWS_DAYS) + 2
    entities, rank = np.unique(ent, return_inverse=True)  # ranks keep the keys in int64
    base = rank.astype(np.int64) * stride + day
    key = np.unique(np.concatenate([base] + [base + w for w in WINDOWS_DAYS]))
    e, d = entities[key // stride], key % stride
    keep = d <= last_day
    return e[keep], d[keep]


def _event_arrays(inter: pd.DataFrame) -> dict[str, np.ndarray]:
    us = _us(inter["timestamp"])
    day = us // US_PER_DAY
    return {"us": us, "day": day, "event": inter["event"].to_numpy()}


def _counts(
    win: _Windows,
    ev: dict[str, np.ndarray],
    q_ent: np.ndarray,
    q_day: np.ndarray,
    prefix: str,
) -> dict[str, np.ndarray]:
    """``<prefix>_<event>s_<w>d`` trailing counts per event type and window."""
    out: dict[str, np.ndarray] = {}
    for w in WINDOWS_DAYS:
        for event in ("view", "click", "purchase"):
            weights = (ev["event"] == event).astype(np.float64)
            out[f"{prefix}_{event}s_{w}d"] = win.window(weights, q_ent, q_day, w).astype(np.int64)
    return out


def with_baseline(table: pa.Table, key: str, vector_width: int = 0) -> pa.Table:
    """``table`` plus one BASELINE_TS row of defaults per entity (see BASELINE_TS)."""
    ids = np.unique(table[key].to_numpy())
    n = len(ids)
    cols: dict[str, pa.Array] = {}
    for name, typ in zip(table.schema.names, table.schema.types, strict=True):
        if name == key:
            cols[name] = pa.array(ids, type=typ)
        elif name == "event_timestamp":
            cols[name] = _ts_array(np.full(n, BASELINE_TS.value // 1000, dtype=np.int64))
        elif pa.types.is_list(typ) and pa.types.is_floating(typ.value_type):
            cols[name] = vector_column(np.zeros((n, vector_width), dtype=np.float32))
        elif pa.types.is_list(typ):
            cols[name] = pa.array([[]] * n, type=typ)
        else:
            cols[name] = pa.array(np.full(n, default_value(name)), type=pa.float64()).cast(typ)
    baseline = pa.table(cols, schema=table.schema)
    return pa.concat_tables([baseline, table])


def user_profile_table(users: pd.DataFrame) -> pa.Table:
    """One row per user at sign-up."""
    return pa.table(
        {
            "user_id": pa.array(users["user_id"].to_numpy(np.int64)),
            "event_timestamp": _ts_array(_us(users["signup_at"])),
            "age_bucket": pa.array(users["age_bucket"].to_numpy(np.int64)),
            "country": pa.array(users["country"].to_numpy(np.int64)),
        }
    )


def item_profile_table(items: pd.DataFrame) -> pa.Table:
    """One row per item at creation; ``created_at`` also as a feature (unix seconds)."""
    created = _us(items["created_at"])
    return pa.table(
        {
            "item_id": pa.array(items["item_id"].to_numpy(np.int64)),
            "event_timestamp": _ts_array(created),
            "category": pa.array(items["category"].to_numpy(np.int64)),
            "brand": pa.array(items["brand"].to_numpy(np.int64)),
            "price": pa.array(items["price"].to_numpy(np.float64)),
            "created_at": pa.array(created.astype(np.float64) / 1e6),
        }
    )


def user_recent_items_table(inter: pd.DataFrame) -> pa.Table:
    """exporters/history.recent_items_table as Arrow (list<int64>)."""
    df = history.recent_items_table(inter)
    return pa.table(
        {
            "user_id": pa.array(df["user_id"].to_numpy(np.int64)),
            "event_timestamp": _ts_array(_us(pd.Series(df["event_timestamp"])))
            if len(df)
            else pa.array([], type=_TS),
            "recent_items": pa.array(df["recent_items"].tolist(), type=pa.list_(pa.int64())),
        }
    )


def user_seen_items_table(inter: pd.DataFrame, events: Sequence[str]) -> pa.Table:
    """One row per user: the seen items (exporters/seen.py) at the user's last seen event.

    Serving reads the newest row (and real-time pushes replace it); training derives the
    same lists at any time from the event log with ``exporters.seen.seen_lists``, so this
    table holds only the latest state rather than one growing list per event."""
    df = seen.seen_table(inter, events)
    return pa.table(
        {
            "user_id": pa.array(df["user_id"].to_numpy(np.int64)),
            "event_timestamp": _ts_array(_us(pd.Series(df["last_seen_at"])))
            if len(df)
            else pa.array([], type=_TS),
            "seen_items": pa.array(
                [np.asarray(x, dtype=np.int64) for x in df["seen_items"]],
                type=pa.list_(pa.int64()),
            ),
        }
    )


def user_activity_table(
    inter: pd.DataFrame, items: pd.DataFrame, n_categories: int, last_day: int | None = None
) -> pa.Table:
    """Trailing counts, last event time, mean purchase price and category affinity per
    user and change day (see the module docstring).

    ``last_day`` (UTC day index, default: the last day of ``inter``) caps the change days:
    an engine that runs this on a subset of the users passes the whole data's last day."""
    ev = _event_arrays(inter)
    user = inter["user_id"].to_numpy(np.int64)
    if len(user) == 0:
        return _empty_user_activity()
    if last_day is None:
        last_day = int(ev["day"].max())
    first = int(ev["day"].min())
    day = ev["day"] - first + _DAY_OFFSET
    q_user, q_day = _change_days(user, day, last_day - first + _DAY_OFFSET)
    stride = int(day.max()) + 2 * _DAY_OFFSET
    win = _Windows(user, day, stride, ev["us"])
    cols = _counts(win, ev, q_user, q_day, "user")
    # Prefix [start, hi) of the sorted events = this user's events up to the row's day
    # (day 0 is before any event: the offset keeps real days >= _DAY_OFFSET).
    hi = win.positions(q_user, q_day)
    start = win.positions(q_user, np.zeros_like(q_day))
    last_at = ev["us"][win.order][hi - 1].astype(np.float64) / 1e6

    # Mean purchase price over all purchases so far (0 when none: "no reference").
    price_of = pd.Series(items["price"].to_numpy(np.float64), index=items["item_id"].to_numpy())
    item_price = price_of.reindex(inter["item_id"].to_numpy()).fillna(0.0).to_numpy()
    is_buy = (ev["event"] == "purchase").astype(np.float64)
    cs_n, cs_spent = win.cumsum(is_buy), win.cumsum(is_buy * item_price)
    n_buy = cs_n[hi] - cs_n[start]
    spent = cs_spent[hi] - cs_spent[start]
    mean_price = np.where(n_buy > 0, spent / np.maximum(n_buy, 1), 0.0)

    affinity = _affinity(inter, items, ev, win, day, hi, start, n_categories)
    table = {
        "user_id": pa.array(q_user),
        "event_timestamp": _ts_array((q_day - _DAY_OFFSET + first + 1) * US_PER_DAY),
        **{k: pa.array(v) for k, v in cols.items()},
        "user_last_event_at": pa.array(last_at),
        "user_mean_purchase_price": pa.array(mean_price),
        "user_category_affinity": vector_column(affinity),
    }
    return pa.table(table)


def _empty_user_activity() -> pa.Table:
    cols: dict[str, pa.Array] = {
        "user_id": pa.array([], pa.int64()),
        "event_timestamp": pa.array([], _TS),
    }
    for w in WINDOWS_DAYS:
        for e in ("view", "click", "purchase"):
            cols[f"user_{e}s_{w}d"] = pa.array([], pa.int64())
    cols["user_last_event_at"] = pa.array([], pa.float64())
    cols["user_mean_purchase_price"] = pa.array([], pa.float64())
    cols["user_category_affinity"] = pa.array([], pa.list_(pa.float32()))
    return pa.table(cols)


def _affinity(
    inter: pd.DataFrame,
    items: pd.DataFrame,
    ev: dict[str, np.ndarray],
    win: _Windows,
    day: np.ndarray,
    hi: np.ndarray,
    start: np.ndarray,
    n_categories: int,
) -> np.ndarray:
    """[rows, n_categories] float32 decayed, normalised category counts.

    decayed(D) = sum_d w_d 2^-((D-d)/h) = 2^(-D/h) sum_d w_d 2^(d/h): the common factor
    cancels in the normalisation, so a cumulative sum of ``w 2^(d/h)`` per (user, category)
    is all we need. Days are relative to the user's first event to keep 2^(d/h) finite.
    """
    cat_of = pd.Series(items["category"].to_numpy(np.int64), index=items["item_id"].to_numpy())
    cat = cat_of.reindex(inter["item_id"].to_numpy()).fillna(-1).to_numpy(np.int64)
    w = np.zeros(len(cat), dtype=np.float64)
    for event, weight in EVENT_WEIGHTS.items():
        w[ev["event"] == event] = weight
    user = inter["user_id"].to_numpy(np.int64)
    first_day = pd.Series(day).groupby(user).transform("min").to_numpy()
    w = w * np.exp2((day - first_day) / AFFINITY_HALF_LIFE_DAYS)
    ok = (cat >= 0) & (cat < n_categories)
    out = np.zeros((len(hi), n_categories), dtype=np.float64)
    for c in tqdm(range(n_categories), desc="category affinity", leave=False, disable=None):
        cs = win.cumsum(np.where(ok & (cat == c), w, 0.0))
        out[:, c] = cs[hi] - cs[start]
    total = out.sum(axis=1, keepdims=True)
    np.divide(out, total, out=out, where=total > 0)
    return out.astype(np.float32)


def item_daily_counts(inter: pd.DataFrame) -> pd.DataFrame:
    """``item_id, day, n``: events per item and UTC day index (the popularity rank's input)."""
    day = _us(inter["timestamp"]) // US_PER_DAY
    counts = (
        pd.DataFrame({"item_id": inter["item_id"].to_numpy(np.int64), "day": day})
        .groupby(["item_id", "day"], sort=True)
        .size()
    )
    return pd.DataFrame(
        {
            "item_id": counts.index.get_level_values(0).to_numpy(np.int64),
            "day": counts.index.get_level_values(1).to_numpy(np.int64),
            "n": counts.to_numpy(np.int64),
        }
    )


def item_statistics_table(
    inter: pd.DataFrame, last_day: int | None = None, daily: pd.DataFrame | None = None
) -> pa.Table:
    """Trailing counts, CTR and popularity rank per item and change day.

    ``item_popularity_rank`` = 1 + the number of items with more events in the trailing 7
    days (ties share a rank; items without events rank after every item with some), as of
    the end of the row's day. It is refreshed on the item's change days only.

    The rank compares an item with every item, so an engine that runs this on a subset of
    the items passes ``daily`` (:func:`item_daily_counts` of all events) and ``last_day``
    (the whole data's last UTC day index); both default to those of ``inter``.
    """
    ev = _event_arrays(inter)
    item = inter["item_id"].to_numpy(np.int64)
    if len(item) == 0:
        cols = {"item_id": pa.array([], pa.int64()), "event_timestamp": pa.array([], _TS)}
        for name in _item_stat_names():
            cols[name] = pa.array([], pa.float32() if "ctr" in name else pa.int64())
        return pa.table(cols)
    first = int(ev["day"].min())
    day = ev["day"] - first + _DAY_OFFSET
    last = (int(ev["day"].max()) if last_day is None else last_day) - first + _DAY_OFFSET
    q_item, q_day = _change_days(item, day, last)
    stride = max(last, int(day.max())) + 2 * _DAY_OFFSET
    win = _Windows(item, day, stride, ev["us"])
    cols = _counts(win, ev, q_item, q_day, "item")
    ctr = cols["item_clicks_30d"] / np.maximum(cols["item_views_30d"], 1)
    if daily is None:
        daily = item_daily_counts(inter)
    rank = _popularity_rank(
        daily["item_id"].to_numpy(np.int64),
        daily["day"].to_numpy(np.int64) - first + _DAY_OFFSET,
        daily["n"].to_numpy(np.int64),
        q_item,
        q_day,
    )
    return pa.table(
        {
            "item_id": pa.array(q_item),
            "event_timestamp": _ts_array((q_day - _DAY_OFFSET + first + 1) * US_PER_DAY),
            **{k: pa.array(v) for k, v in cols.items()},
            "item_ctr_30d": pa.array(ctr.astype(np.float32)),
            "item_popularity_rank": pa.array(rank),
        }
    )


def _item_stat_names() -> list[str]:
    names = [f"item_{e}s_{w}d" for w in WINDOWS_DAYS for e in ("view", "click", "purchase")]
    return [*names, "item_ctr_30d", "item_popularity_rank"]


def _popularity_rank(
    item: np.ndarray, day: np.ndarray, n: np.ndarray, q_item: np.ndarray, q_day: np.ndarray
) -> np.ndarray:
    """Rank by trailing-7-day event count among all items, per query day (one pass per day
    with dense per-item counts: O(days × items-with-events)); ``n`` events of ``item`` on
    ``day``."""
    uniq, idx = np.unique(item, return_inverse=True)
    q_idx = np.searchsorted(uniq, q_item)
    days = np.unique(q_day)
    # Daily per-item counts as a sparse (day, item) list; a rolling 7-day dense sum per day.
    order = np.argsort(day, kind="stable")
    d_sorted, i_sorted, n_sorted = day[order], idx[order], n[order]
    bounds = np.searchsorted(d_sorted, np.arange(day.min(), day.max() + 2))
    base = int(day.min())
    rank = np.zeros(len(q_item), dtype=np.int64)
    q_order = np.argsort(q_day, kind="stable")
    q_bounds = np.searchsorted(q_day[q_order], days)
    q_bounds = np.r_[q_bounds, len(q_order)]
    window = np.zeros(len(uniq), dtype=np.int64)
    current = base - 1

    def add(d: int, sign: int) -> None:
        k = d - base
        if 0 <= k < len(bounds) - 1:
            lo, hi = bounds[k], bounds[k + 1]
            np.add.at(window, i_sorted[lo:hi], sign * n_sorted[lo:hi])

    for j, d in enumerate(tqdm(days, desc="popularity rank", leave=False, disable=None)):
        while current < d:  # slide the 7-day window forward one day at a time
            current += 1
            add(current, 1)
            add(current - 7, -1)
        sorted_counts = np.sort(window)
        rows = q_order[q_bounds[j] : q_bounds[j + 1]]
        mine = window[q_idx[rows]]
        rank[rows] = 1 + len(window) - np.searchsorted(sorted_counts, mine, side="right")
    return rank


@dataclass(frozen=True)
class Context:
    """What a table function needs beyond its entities' rows: small tables and values of
    the whole data, the same whichever engine (and which subset of entities) runs it."""

    items: pd.DataFrame  # item_id, category, price (the catalog's columns the logic reads)
    n_categories: int
    last_day: int | None  # the last UTC day index with events (None: no events)
    seen_events: tuple[str, ...]
    item_daily: pd.DataFrame  # item_daily_counts of all events


@dataclass(frozen=True)
class TableSpec:
    """One feature table: which raw table it reads, its entity, and its one definition.

    ``make`` is *per-entity separable*: its rows for an entity depend only on that entity's
    rows of ``source`` (and the Context), so running it on any partition of the entities
    and concatenating gives the same table as running it on everything. The pandas engine
    calls it once on the whole frame; the Spark engine (exporters/spark_engine.py) once per
    entity-hash partition."""

    name: str
    source: str  # "interactions" | "users" | "items"
    key: str  # the entity column rows are partitioned by
    make: Callable[[pd.DataFrame, Context], pa.Table]


def _user_profile(df: pd.DataFrame, ctx: Context) -> pa.Table:
    return with_baseline(user_profile_table(df), "user_id")


def _item_profile(df: pd.DataFrame, ctx: Context) -> pa.Table:
    return with_baseline(item_profile_table(df), "item_id")


def _user_recent_items(df: pd.DataFrame, ctx: Context) -> pa.Table:
    return with_baseline(user_recent_items_table(df), "user_id")


def _user_seen_items(df: pd.DataFrame, ctx: Context) -> pa.Table:
    return user_seen_items_table(df, ctx.seen_events)


def _user_activity(df: pd.DataFrame, ctx: Context) -> pa.Table:
    table = user_activity_table(df, ctx.items, ctx.n_categories, ctx.last_day)
    return with_baseline(table, "user_id", ctx.n_categories)


def _item_statistics(df: pd.DataFrame, ctx: Context) -> pa.Table:
    return with_baseline(item_statistics_table(df, ctx.last_day, ctx.item_daily), "item_id")


TABLES: tuple[TableSpec, ...] = (
    TableSpec("user_profile", "users", "user_id", _user_profile),
    TableSpec("item_profile", "items", "item_id", _item_profile),
    TableSpec("user_recent_items", "interactions", "user_id", _user_recent_items),
    TableSpec("user_seen_items", "interactions", "user_id", _user_seen_items),
    TableSpec("user_activity", "interactions", "user_id", _user_activity),
    TableSpec("item_statistics", "interactions", "item_id", _item_statistics),
)
assert sorted(t.name for t in TABLES) == sorted(TABLE_FILES)


def make_context(
    items: pd.DataFrame,
    meta: dict[str, object],
    settings: Settings,
    last_day: int | None,
    item_daily: pd.DataFrame,
) -> Context:
    """The Context of a build; ``last_day`` and ``item_daily`` come from the engine."""
    n_cat = int(meta.get("n_categories") or 0)  # type: ignore[call-overload]
    if len(items):
        n_cat = max(n_cat, int(items["category"].max()) + 1)
    return Context(
        items=items[["item_id", "category", "price"]],
        n_categories=n_cat,
        last_day=last_day,
        seen_events=seen.seen_events(meta, settings.seen_events),
        item_daily=item_daily,
    )


def build(settings: Settings, engine: str | None = None) -> None:
    """Write every feature table from the raw tables under ``settings.raw_dir`` with
    ``engine`` ("pandas" or "spark"; default ``settings.offline_engine``)."""
    engine = engine or settings.offline_engine
    if engine not in ENGINES:
        raise UserError(f"unknown offline engine {engine!r}; expected one of {ENGINES}")
    t0 = time.perf_counter()
    meta = read_meta(settings)
    # Rewritten below: until the build is done the tables match no raw data.
    materialize_state.build_record_path(settings).unlink(missing_ok=True)
    if engine == "spark":
        from exporters import spark_engine  # pyspark is installed only for this engine

        spark_engine.build_feature_tables(settings)
    else:
        _build_pandas(settings)
    config = {"engine": engine, "seen_events": list(seen.seen_events(meta, settings.seen_events))}
    materialize_state.record_build(settings, meta, config)
    log.info(
        "feature tables (%s) written to %s in %.1f s",
        engine,
        settings.features_dir,
        time.perf_counter() - t0,
    )


def _build_pandas(settings: Settings) -> None:
    frames = {name: read_table(settings, name) for name in ("interactions", "items", "users")}
    inter = frames["interactions"]
    last_day = int(_us(inter["timestamp"]).max() // US_PER_DAY) if len(inter) else None
    ctx = make_context(
        frames["items"], read_meta(settings), settings, last_day, item_daily_counts(inter)
    )
    for spec in tqdm(TABLES, desc="feature tables", disable=None):
        t = time.perf_counter()
        table = spec.make(frames[spec.source], ctx)
        _write(table, table_path(settings, spec.name))
        log.info("%s: %d rows in %.1f s", spec.name, table.num_rows, time.perf_counter() - t)


def cli(args: argparse.Namespace) -> int:
    """``recstack features build [--engine pandas|spark]``."""
    settings = get_settings()
    build(settings, getattr(args, "offline_engine", None))
    print(f"feature tables written to {settings.features_dir}")
    return 0

"""Turn the raw tables into the two towers' input arrays.

One definition for training examples, the ONNX parity rows, the index build and offline
retrieval, so the towers see the same values everywhere. Arrays are keyed by the tensor
names of ``model_repository/{user,item}_tower/config.pbtxt`` and shaped ``[n, dims...]``
as those configs say (``user_id`` is ``[n, 1]``, ``recent_items`` is ``[n, HISTORY_LEN]``).

Unknown values are encoded, not dropped: a user or item missing from its table gets ``-1``
for its categorical attributes (the towers map any out-of-vocabulary code to a shared
"unknown" row) and ``0`` for price and age.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd

from exporters.history import HISTORY_LEN, PAD, recent_items_table
from exporters.raw_tables import RawTables

UNKNOWN = -1
SECONDS_PER_DAY = 86_400.0

UserInputs = dict[str, np.ndarray]
ItemInputs = dict[str, np.ndarray]


def pad_lists(lists: Sequence[Sequence[int]], max_len: int = HISTORY_LEN) -> np.ndarray:
    """Vectorised :func:`exporters.history.pad` for many rows: ``[n, max_len]`` int64."""
    n = len(lists)
    out = np.full((n, max_len), PAD, dtype=np.int64)
    if n == 0:
        return out
    lens = np.fromiter((min(len(x), max_len) for x in lists), dtype=np.int64, count=n)
    total = int(lens.sum())
    if total == 0:
        return out
    flat = np.fromiter(
        itertools.chain.from_iterable(x[:max_len] for x in lists), dtype=np.int64, count=total
    )
    rows = np.repeat(np.arange(n), lens)
    starts = np.cumsum(lens) - lens
    cols = np.arange(total) - np.repeat(starts, lens)
    out[rows, cols] = flat
    return out


def history_before(
    interactions: pd.DataFrame,
    user_ids: np.ndarray,
    times: np.ndarray | pd.Series | pd.Timestamp,
    history: pd.DataFrame | None = None,
) -> np.ndarray:
    """Recent items of each ``(user_ids[i], times[i])`` from events strictly before that
    time: ``[n, HISTORY_LEN]`` int64, PAD-filled.

    ``history`` is ``recent_items_table(interactions)`` when the caller already has it.
    An event at exactly ``times[i]`` is excluded (a training example at t must not see
    its own click).
    """
    user_ids = np.asarray(user_ids, dtype=np.int64)
    n = len(user_ids)
    if n == 0:
        return np.full((0, HISTORY_LEN), PAD, dtype=np.int64)
    if history is None:
        history = recent_items_table(interactions)
    if isinstance(times, pd.Timestamp):
        ts = pd.Series(pd.DatetimeIndex([times] * n))
    else:
        ts = pd.Series(pd.DatetimeIndex(times))
    ts = _as_utc_us(ts)
    left = pd.DataFrame({"user_id": user_ids, "ts": ts.array, "row": np.arange(n)})
    left = left.sort_values("ts", kind="stable")
    right = history.rename(columns={"event_timestamp": "ts"})[["user_id", "ts", "recent_items"]]
    right = right.assign(ts=_as_utc_us(right["ts"])).sort_values("ts", kind="stable")
    joined = pd.merge_asof(
        left, right, on="ts", by="user_id", allow_exact_matches=False, direction="backward"
    )
    lists = [x if isinstance(x, list) else [] for x in joined["recent_items"]]
    out = np.empty((n, HISTORY_LEN), dtype=np.int64)
    out[joined["row"].to_numpy()] = pad_lists(lists)
    return out


def _as_utc_us(ts: pd.Series) -> pd.Series:
    """UTC microsecond timestamps (merge_asof needs identical dtypes on both sides)."""
    s = pd.Series(ts).reset_index(drop=True)
    if s.dt.tz is None:
        s = s.dt.tz_localize("UTC")
    return s.dt.tz_convert("UTC").astype("datetime64[us, UTC]")


def user_inputs(users: pd.DataFrame, user_ids: np.ndarray, recent: np.ndarray) -> UserInputs:
    """User tower inputs: profile attributes looked up in ``users`` (unknown user → -1)
    plus ``recent`` (``[n, HISTORY_LEN]``, from :func:`history_before`)."""
    user_ids = np.asarray(user_ids, dtype=np.int64)
    recent = np.asarray(recent, dtype=np.int64)
    if recent.shape != (len(user_ids), HISTORY_LEN):
        raise ValueError(f"recent must be [{len(user_ids)}, {HISTORY_LEN}], got {recent.shape}")
    pos = pd.Index(users["user_id"].to_numpy()).get_indexer(user_ids)
    known = pos >= 0
    return {
        "user_id": user_ids.reshape(-1, 1),
        "age_bucket": _lookup(users["age_bucket"], pos, known).reshape(-1, 1),
        "country": _lookup(users["country"], pos, known).reshape(-1, 1),
        "recent_items": recent,
    }


def item_inputs(
    items: pd.DataFrame, item_ids: np.ndarray, at: pd.Timestamp | np.ndarray | pd.Series
) -> ItemInputs:
    """Item tower inputs for ``item_ids`` with ``age_days`` measured at ``at`` (one time for
    all rows, or one per row). Age is clipped at 0; unknown items get -1 codes, price 0."""
    item_ids = np.asarray(item_ids, dtype=np.int64)
    pos = pd.Index(items["item_id"].to_numpy()).get_indexer(item_ids)
    known = pos >= 0
    price = np.zeros(len(item_ids), dtype=np.float64)
    price[known] = items["price"].to_numpy(dtype=np.float64)[pos[known]]
    created = epoch_us(items["created_at"])
    if isinstance(at, pd.Timestamp):
        at_us = np.full(len(item_ids), _ts_us(at), dtype=np.int64)
    else:
        at_us = epoch_us(pd.Series(at))
    age = np.zeros(len(item_ids), dtype=np.float64)
    age[known] = (at_us[known] - created[pos[known]]) / 1e6 / SECONDS_PER_DAY
    return {
        "item_id": item_ids.reshape(-1, 1),
        "category": _lookup(items["category"], pos, known).reshape(-1, 1),
        "brand": _lookup(items["brand"], pos, known).reshape(-1, 1),
        "price": np.nan_to_num(np.maximum(price, 0.0)).astype(np.float32).reshape(-1, 1),
        "age_days": np.maximum(age, 0.0).astype(np.float32).reshape(-1, 1),
    }


def epoch_us(ts: pd.Series) -> np.ndarray:
    """Microseconds since the epoch (UTC) as int64."""
    return _as_utc_us(ts).dt.tz_localize(None).to_numpy().astype(np.int64)


def _ts_us(t: pd.Timestamp) -> int:
    t = pd.Timestamp(t)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return int(t.value // 1000)


def _lookup(column: pd.Series, pos: np.ndarray, known: np.ndarray) -> np.ndarray:
    out = np.full(len(pos), UNKNOWN, dtype=np.int64)
    out[known] = column.to_numpy(dtype=np.int64)[pos[known]]
    return out


def take(inputs: dict[str, np.ndarray], rows: np.ndarray | slice) -> dict[str, np.ndarray]:
    """The same rows of every array (a batch)."""
    return {k: v[rows] for k, v in inputs.items()}


def vocab_sizes(tables: RawTables) -> dict[str, int]:
    """Size of each categorical vocabulary (max code + 1); the towers add an unknown row."""
    return {
        "age_bucket": int(tables.users["age_bucket"].max()) + 1 if len(tables.users) else 1,
        "country": int(tables.users["country"].max()) + 1 if len(tables.users) else 1,
        "category": int(tables.items["category"].max()) + 1 if len(tables.items) else 1,
        "brand": int(tables.items["brand"].max()) + 1 if len(tables.items) else 1,
        "max_user_id": int(tables.users["user_id"].max()) if len(tables.users) else 0,
        "max_item_id": int(tables.items["item_id"].max()) if len(tables.items) else 0,
    }


def users_at(
    tables: RawTables,
    user_ids: np.ndarray,
    at: pd.Timestamp | pd.DatetimeIndex,
    history: pd.DataFrame | None = None,
) -> UserInputs:
    """User tower inputs of ``user_ids`` as they were just before ``at`` (one time for
    all, or one per user): profile plus the recent items of events strictly before it."""
    recent = history_before(tables.interactions, user_ids, at, history=history)
    return user_inputs(tables.users, user_ids, recent)

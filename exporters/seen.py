"""What a user has already consumed ("seen" items): one definition for the Feast
``user_seen_items`` table, the real-time push path, the ranker's training candidates, the
offline evaluation and the item-to-item candidate source, so the four cannot drift apart.

A user's seen items are every distinct item of a *seen event* (see :func:`seen_events`),
newest first, capped at :data:`SEEN_CAP` (the oldest drop out; a user with more distinct
items than that is rare, and the cap bounds one online read). Serving never recommends a
seen item; the item-to-item source scores the newest :data:`I2I_HISTORY` of them.

Which events count is a property of the data: for imported ratings every rating is a
consumption (a 2-star rating means the user watched the film), so ``recstack data import``
records all event types in ``meta.json``; for the synthetic marketplace a view is an
impression, not a consumption, so only clicks and purchases count. ``RECSTACK_SEEN_EVENTS``
overrides both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import pandas as pd

from exporters.schema import EVENTS
from exporters.tower_inputs import epoch_us

SEEN_CAP = 5000
I2I_HISTORY = 200
DEFAULT_SEEN_EVENTS: tuple[str, ...] = ("click", "purchase")


def seen_events(meta: dict[str, object], override: Sequence[str] | None = None) -> tuple[str, ...]:
    """The event types that make an item "seen": ``override`` (settings), else the data's
    ``meta.json`` ``seen_events``, else clicks and purchases."""
    chosen = cast(Sequence[str], override or meta.get("seen_events") or DEFAULT_SEEN_EVENTS)
    events = tuple(str(e) for e in chosen)
    unknown = [e for e in events if e not in EVENTS]
    if unknown:
        raise ValueError(f"seen events {unknown} are not among {EVENTS}")
    return events


def update_seen(previous: Sequence[int], item_id: int, cap: int = SEEN_CAP) -> list[int]:
    """The seen list after one more seen event on ``item_id``: newest first, distinct."""
    out = [int(item_id)]
    out.extend(int(i) for i in previous if i != item_id)
    return out[:cap]


def seen_table(
    interactions: pd.DataFrame,
    events: Sequence[str],
    before: pd.Timestamp | None = None,
    cap: int = SEEN_CAP,
) -> pd.DataFrame:
    """``user_id, last_seen_at, seen_items`` (int64 array, newest first, distinct, capped)
    of every user with a seen event strictly before ``before`` (all events when None).

    Equal to folding :func:`update_seen` over the user's events in time order (ties in time
    broken by row order, as the event log stores them)."""
    df = interactions[interactions["event"].isin(list(events))]
    if before is not None:
        df = df[df["timestamp"] < before]
    if df.empty:
        return pd.DataFrame(
            {
                "user_id": np.array([], np.int64),
                "last_seen_at": pd.Series([], dtype="datetime64[us, UTC]"),
                "seen_items": [],
            }
        )
    # Newest first per user; the first row of each (user, item) is its latest event.
    order = np.lexsort(
        (
            -np.arange(len(df)),
            -epoch_us(df["timestamp"]),
            df["user_id"].to_numpy(),
        )
    )
    d = df.iloc[order][["user_id", "item_id", "timestamp"]]
    d = d[~d.duplicated(["user_id", "item_id"], keep="first")]
    users = d["user_id"].to_numpy(np.int64)
    items = d["item_id"].to_numpy(np.int64)
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    ends = np.r_[starts[1:], len(users)]
    lists = [items[s : min(e, s + cap)] for s, e in zip(starts, ends, strict=True)]
    return pd.DataFrame(
        {
            "user_id": users[starts],
            "last_seen_at": d["timestamp"].iloc[starts].to_numpy(),
            "seen_items": lists,
        }
    )


def seen_lists(
    interactions: pd.DataFrame,
    user_ids: np.ndarray,
    events: Sequence[str],
    before: pd.Timestamp | pd.DatetimeIndex | None = None,
    cap: int = SEEN_CAP,
) -> list[np.ndarray]:
    """Seen items of each of ``user_ids`` (unique; newest first) from events before
    ``before`` (one time for all, or one per user); an empty array for a user without
    any."""
    ids = np.asarray(user_ids, dtype=np.int64)
    rows = interactions[interactions["user_id"].isin(ids)]
    if isinstance(before, pd.DatetimeIndex):
        # Epoch µs (int64), compared by numpy: a zone-aware index's to_numpy() is an object
        # array of Timestamps, compared one at a time (3.5 s instead of 0.4 s per call on
        # MovieLens-1M's size). A NaT limit is the smallest int64: nothing is before it.
        limit = pd.Series(before.as_unit("us").asi8, index=ids)
        cut = limit.reindex(rows["user_id"].to_numpy()).to_numpy()
        rows = rows[epoch_us(rows["timestamp"]) < cut]
        before = None
    table = seen_table(rows, events, before, cap)
    by_user = dict(zip(table["user_id"].tolist(), table["seen_items"], strict=True))
    empty = np.array([], dtype=np.int64)
    return [np.asarray(by_user.get(int(u), empty), dtype=np.int64) for u in ids]

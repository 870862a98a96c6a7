"""A user's recent items: one definition for the Feast feature table, the tower training
examples and the real-time push path, so the three cannot drift apart.

Recent items are the last ``HISTORY_LEN`` distinct items the user clicked or purchased, most
recent first, padded with ``PAD`` (the user tower's ``recent_items`` input has this width).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

HISTORY_LEN = 20
PAD = -1
HISTORY_EVENTS = ("click", "purchase")


def update_recent(previous: Sequence[int], item_id: int, max_len: int = HISTORY_LEN) -> list[int]:
    """The recent-items list after one more click/purchase of ``item_id`` (no padding)."""
    out = [int(item_id)]
    out.extend(int(i) for i in previous if i != item_id and i != PAD)
    return out[:max_len]


def pad(items: Sequence[int], max_len: int = HISTORY_LEN) -> np.ndarray:
    """Fixed-width int64 row for the user tower."""
    row = np.full(max_len, PAD, dtype=np.int64)
    n = min(len(items), max_len)
    row[:n] = np.asarray(items[:n], dtype=np.int64)
    return row


def recent_items_table(interactions: pd.DataFrame, max_len: int = HISTORY_LEN) -> pd.DataFrame:
    """One row per click/purchase: ``user_id, event_timestamp, recent_items`` where the list
    includes that event (it is what an online lookup right after the event returns).

    A point-in-time join "as of t" on this table therefore sees exactly the events at or
    before t; callers that must exclude the event at t itself (training examples) join as
    of the previous row.
    """
    pos = interactions[interactions["event"].isin(HISTORY_EVENTS)]
    pos = pos.sort_values(["user_id", "timestamp"], kind="stable")
    users = pos["user_id"].to_numpy()
    items = pos["item_id"].to_numpy()
    lists: list[list[int]] = []
    current: list[int] = []
    prev_user = None
    for u, i in zip(users, items, strict=True):
        if u != prev_user:
            current, prev_user = [], u
        current = update_recent(current, int(i), max_len)
        lists.append(current)
    return pd.DataFrame(
        {
            "user_id": users.astype(np.int64),
            # ns, as the object array of Timestamps this once was became (without
            # building one Timestamp per event).
            "event_timestamp": pd.DatetimeIndex(pos["timestamp"]).as_unit("ns"),
            "recent_items": lists,
        }
    )

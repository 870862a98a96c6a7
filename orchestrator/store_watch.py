"""Does the online store still hold the users the release knows?

A wiped or restarted-empty online store does not fail: every read answers "no row", and
without this check each known user would be served as a silent cold start. The release
carries its users' ids (``users.npy``, exporters/release.py): every one of them has a
row in the store once it is materialised (the feature tables give each user a baseline
row). So a lookup of such a user that finds nothing is a user the store lost — the
answer is flagged ``features_missing`` — and many of them in a row mean the store looks
emptied, which the health detail and ``recstack_online_store_missing_ratio`` say.

Why an id array rather than the store's row count against the count materialised: it is
exact per user (a count only says "some rows are gone", and Redis has no per-view count),
costs 8 bytes a user (100k users: 0.8 MB) and one binary search per request, and it
needs nothing from the store, which may be the thing that is broken.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

WINDOW = 50  # the latest lookups of release users the share is taken over (recent state)
EMPTY_SHARE = 0.5  # at least this share of them missing: the store looks emptied
MIN_LOOKUPS = 20  # ... once at least this many were looked up


class StoreWatch:
    """Membership in the release's users, and the outcome of their recent lookups
    (thread-safe: requests record from the worker threads)."""

    def __init__(self, users: np.ndarray | None) -> None:
        self.users = None if users is None else np.unique(np.asarray(users, dtype=np.int64))
        self._recent: deque[bool] = deque(maxlen=WINDOW)  # True: the store had no row
        self._lock = threading.Lock()
        self._emptied = False

    @property
    def enabled(self) -> bool:
        """False for a release without its users (written before ``users.npy``)."""
        return self.users is not None

    def knows(self, user_id: int) -> bool:
        """True when ``user_id`` is one of the release's users."""
        users = self.users
        if users is None or len(users) == 0:
            return False
        i = int(np.searchsorted(users, user_id))
        return i < len(users) and int(users[i]) == user_id

    def record(self, user_id: int, found: bool) -> bool:
        """Note a lookup of ``user_id``; True when it is a release user the store lost."""
        if not self.knows(user_id):
            return False
        with self._lock:
            self._recent.append(not found)
            emptied = self._looks_emptied()
            changed, self._emptied = emptied != self._emptied, emptied
        if changed and emptied:
            log.warning(
                "the online store looks emptied: %s (restore it or re-materialise: "
                "`recstack features materialize`)",
                self.summary(),
            )
        elif changed:
            log.info("the online store holds the release's users again: %s", self.summary())
        return not found

    def _looks_emptied(self) -> bool:
        n = len(self._recent)
        return n >= MIN_LOOKUPS and sum(self._recent) >= EMPTY_SHARE * n

    def missing_ratio(self) -> float:
        """Share of the recent lookups of release users that found no row (0 with none)."""
        with self._lock:
            n = len(self._recent)
            return sum(self._recent) / n if n else 0.0

    def summary(self) -> str:
        with self._lock:
            n, missing = len(self._recent), sum(self._recent)
        return f"{missing} of the last {n} users of the release looked up had no features"

    def detail(self) -> dict[str, Any]:
        """The health detail: counts, and whether the store looks emptied."""
        if self.users is None:
            return {"release_users": None, "checked": False}
        with self._lock:
            n, missing, emptied = len(self._recent), sum(self._recent), self._looks_emptied()
        return {
            "release_users": len(self.users),
            "checked": True,
            "recent_lookups": n,
            "recent_missing": missing,
            "looks_emptied": emptied,
            **({"message": self.summary()} if emptied else {}),
        }

    def probe_ids(self, n: int) -> np.ndarray:
        """``n`` release users spread over the id range, for a start-up check."""
        if self.users is None or len(self.users) == 0:
            return np.zeros(0, dtype=np.int64)
        pos = np.linspace(0, len(self.users) - 1, num=min(n, len(self.users))).astype(np.int64)
        return self.users[np.unique(pos)]

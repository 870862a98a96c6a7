"""Train / validation / test split (``<data_dir>/split.json``), in one of two modes.

- ``time``: two boundaries cut the interactions' time range: training is
  ``timestamp < train_end``, validation ``train_end <= timestamp < val_end``, test
  ``timestamp >= val_end``. By default validation and test are the last 10% of the time
  span each (``--val-days`` / ``--test-days`` set them). Validation requests are made at
  ``train_end``, test requests at ``val_end``. Right for a steady stream of events (a
  marketplace log), where every window holds many users.
- ``per_user`` (leave-last-N-out): each user's last ``test_last`` events are test, the
  ``val_last`` before them validation, the rest training; a user's validation request is
  made at their first validation event, their test request at their first test event
  (boundaries per user in ``split_users.parquet``; events sharing a boundary's timestamp
  go to the later window; users with too few events are training only). Right for
  ratings data, which arrives in bursts per user: a global time cut leaves a few hundred
  users in the last windows and the ranker with nothing to learn from.

``auto`` (the default) takes ``time`` when its validation window holds at least
:data:`AUTO_MIN_VAL_SHARE` of the users, else ``per_user``. Every training step filters
through a :class:`Split`, so no event of a user's validation or test window reaches
training, and every request sees only events strictly before its own time.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from exporters.raw_tables import read_meta, read_table
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
USERS_FILE = "split_users.parquet"
DEFAULT_FRACTION = 0.10
MODES = ("auto", "time", "per_user")
# auto: a time split whose validation window holds fewer users than this share of all
# users is replaced by the per-user split.
AUTO_MIN_VAL_SHARE = 0.3
_NEVER = pd.Timestamp.max.tz_localize("UTC")


@dataclass(frozen=True, eq=False)
class Split:
    """The boundaries (UTC). Row filters take a frame with ``user_id`` and a timestamp
    column. ``train_end`` / ``val_end`` are the global boundaries (``time``) or, in
    ``per_user`` mode, the latest validation / test start of any user (informational)."""

    train_end: pd.Timestamp
    val_end: pd.Timestamp
    mode: str = "time"
    # per_user: user_id -> first instant of the user's validation / test window.
    val_start: pd.Series | None = None
    test_start: pd.Series | None = None
    params: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.train_end > self.val_end:
            raise ValueError(f"train_end {self.train_end} is after val_end {self.val_end}")
        if self.mode not in ("time", "per_user"):
            raise ValueError(f"unknown split mode {self.mode!r}")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Split):
            return NotImplemented
        if self.to_json() != other.to_json():
            return False
        a, b = self.users_table(), other.users_table()
        return (a is None and b is None) or (a is not None and b is not None and a.equals(b))

    __hash__ = None  # type: ignore[assignment]

    @property
    def per_user(self) -> bool:
        return self.mode == "per_user"

    @staticmethod
    def before(df: pd.DataFrame, t: pd.Timestamp, col: str = "timestamp") -> pd.DataFrame:
        """Rows strictly before ``t``: what is known when predicting at ``t``."""
        return df[df[col] < t]

    def _starts(self, users: pd.Series | np.ndarray, which: str) -> np.ndarray:
        """Per row, the user's validation or test start (datetime64[us, UTC] values)."""
        starts = self.val_start if which == "val" else self.test_start
        assert starts is not None
        got = starts.reindex(np.asarray(users, dtype=np.int64))
        return pd.DatetimeIndex(got.fillna(_NEVER)).as_unit("us").to_numpy()

    def _ts(self, df: pd.DataFrame, col: str) -> np.ndarray:
        return pd.DatetimeIndex(pd.to_datetime(df[col], utc=True)).as_unit("us").to_numpy()

    def train(self, df: pd.DataFrame, col: str = "timestamp") -> pd.DataFrame:
        """Rows before their validation window."""
        if not self.per_user:
            return df[df[col] < self.train_end]
        return df[self._ts(df, col) < self._starts(df["user_id"], "val")]

    def val(self, df: pd.DataFrame, col: str = "timestamp") -> pd.DataFrame:
        """Rows in their validation window."""
        if not self.per_user:
            ts = df[col]
            return df[(ts >= self.train_end) & (ts < self.val_end)]
        ts = self._ts(df, col)
        users = df["user_id"]
        return df[(ts >= self._starts(users, "val")) & (ts < self._starts(users, "test"))]

    def test(self, df: pd.DataFrame, col: str = "timestamp") -> pd.DataFrame:
        """Rows in their test window."""
        if not self.per_user:
            return df[df[col] >= self.val_end]
        return df[self._ts(df, col) >= self._starts(df["user_id"], "test")]

    def not_test(self, df: pd.DataFrame, col: str = "timestamp") -> pd.DataFrame:
        """Training and validation rows: what test requests may know about."""
        if not self.per_user:
            return df[df[col] < self.val_end]
        return df[self._ts(df, col) < self._starts(df["user_id"], "test")]

    def val_times(self, user_ids: np.ndarray) -> pd.DatetimeIndex:
        """The time of each user's validation request (ranker training queries)."""
        if not self.per_user:
            return pd.DatetimeIndex([self.train_end] * len(user_ids)).as_unit("us")
        return pd.DatetimeIndex(self._starts(user_ids, "val"), tz="UTC")

    def test_times(self, user_ids: np.ndarray) -> pd.DatetimeIndex:
        """The time of each user's test request (the evaluation)."""
        if not self.per_user:
            return pd.DatetimeIndex([self.val_end] * len(user_ids)).as_unit("us")
        return pd.DatetimeIndex(self._starts(user_ids, "test"), tz="UTC")

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "train_end": self.train_end.isoformat(),
            "val_end": self.val_end.isoformat(),
            **({"params": self.params} if self.params else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], users: pd.DataFrame | None = None) -> Split:
        mode = str(data.get("mode", "time"))
        if mode == "per_user":
            if users is None:
                raise ValueError("a per-user split needs its users table")
            idx = users["user_id"].to_numpy(np.int64)
            return cls(
                _utc(data["train_end"]),
                _utc(data["val_end"]),
                "per_user",
                pd.Series(pd.to_datetime(users["val_start"], utc=True).to_numpy(), index=idx),
                pd.Series(pd.to_datetime(users["test_start"], utc=True).to_numpy(), index=idx),
                data.get("params"),
            )
        return cls(_utc(data["train_end"]), _utc(data["val_end"]), params=data.get("params"))

    def users_table(self) -> pd.DataFrame | None:
        """The per-user boundaries as written to ``split_users.parquet``."""
        if not self.per_user or self.val_start is None or self.test_start is None:
            return None
        return pd.DataFrame(
            {
                "user_id": self.val_start.index.to_numpy(np.int64),
                "val_start": pd.to_datetime(self.val_start.to_numpy(), utc=True),
                "test_start": pd.to_datetime(
                    self.test_start.reindex(self.val_start.index).to_numpy(), utc=True
                ),
            }
        )


def _utc(value: str | pd.Timestamp) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def compute_split(
    interactions: pd.DataFrame,
    val_days: float | None = None,
    test_days: float | None = None,
) -> Split:
    """Boundaries so that the last ``test_days`` of the data are test and the
    ``val_days`` before them validation (each default: 10% of the time span).

    Boundaries are whole seconds (floored) so ``split.json`` is exact and readable.
    Raises UserError when the training part would be empty.
    """
    if len(interactions) == 0:
        raise UserError("cannot split: no interactions")
    ts = interactions["timestamp"]
    lo, hi = _utc(ts.min()), _utc(ts.max())
    span = hi - lo
    for name, days in (("val_days", val_days), ("test_days", test_days)):
        if days is not None and not days >= 0:
            raise UserError(f"{name} must be >= 0, got {days}")
    val = pd.Timedelta(days=val_days) if val_days is not None else span * DEFAULT_FRACTION
    test = pd.Timedelta(days=test_days) if test_days is not None else span * DEFAULT_FRACTION
    # The test window ends with the last event, which it must include: `hi - test` is the
    # first instant of the test window.
    val_end = (hi - test).floor("s")
    train_end = (val_end - val).floor("s")
    split = Split(train_end=train_end, val_end=val_end)
    n_train = int((ts < train_end).sum())
    if n_train == 0:
        raise UserError(
            f"cannot split: validation ({val}) + test ({test}) cover the whole time span "
            f"{lo} .. {hi}; nothing is left for training"
        )
    n_val = int(((ts >= train_end) & (ts < val_end)).sum())
    n_test = len(ts) - n_train - n_val
    for name, n, start, end in (
        ("validation", n_val, train_end, val_end),
        ("test", n_test, val_end, hi),
    ):
        if n == 0:
            # Models would be chosen (validation) or judged (test) on nothing: say so.
            log.warning(
                "split: the %s window %s .. %s holds no interactions; the data spans "
                "%s .. %s (an outlying timestamp stretches the default windows: check the "
                "data, or set RECSTACK_SPLIT_VAL_DAYS / RECSTACK_SPLIT_TEST_DAYS)",
                name,
                start,
                end,
                lo,
                hi,
            )
    log.info(
        "split: train < %s <= val < %s <= test (%d / %d / %d rows)",
        train_end,
        val_end,
        n_train,
        n_val,
        n_test,
    )
    return split


def compute_per_user_split(interactions: pd.DataFrame, val_last: int, test_last: int) -> Split:
    """Leave-last-N-out: each user's last ``test_last`` events are test and the
    ``val_last`` before them validation (events tied with a boundary go to the later
    window); users with at most ``val_last + test_last`` events keep all for training."""
    if val_last < 1 or test_last < 1:
        raise UserError(
            f"per-user split needs val_last and test_last >= 1, got {val_last}, {test_last}"
        )
    if len(interactions) == 0:
        raise UserError("cannot split: no interactions")
    df = interactions[["user_id", "timestamp"]].sort_values(["user_id", "timestamp"], kind="stable")
    from_end = df.groupby("user_id").cumcount(ascending=False).to_numpy()
    sizes = df.groupby("user_id")["timestamp"].transform("size").to_numpy()
    eligible = sizes > val_last + test_last
    test_rows = df[eligible & (from_end == test_last - 1)]
    val_rows = df[eligible & (from_end == test_last + val_last - 1)]
    test_start = test_rows.set_index("user_id")["timestamp"]
    val_start = val_rows.set_index("user_id")["timestamp"].reindex(test_start.index)
    if len(test_start) == 0:
        raise UserError(
            f"cannot split per user: no user has more than {val_last + test_last} events"
        )
    split = Split(
        train_end=_utc(val_start.max()),
        val_end=_utc(test_start.max()),
        mode="per_user",
        val_start=pd.Series(pd.to_datetime(val_start, utc=True).to_numpy(), index=val_start.index),
        test_start=pd.Series(
            pd.to_datetime(test_start, utc=True).to_numpy(), index=test_start.index
        ),
        params={"val_last": val_last, "test_last": test_last},
    )
    n = df["user_id"].nunique()
    log.info(
        "per-user split: the last %d events of %d of %d users are test, the %d before them "
        "validation (%d / %d / %d rows)",
        test_last,
        len(test_start),
        n,
        val_last,
        len(split.train(interactions)),
        len(split.val(interactions)),
        len(split.test(interactions)),
    )
    return split


def choose_split(
    interactions: pd.DataFrame,
    mode: str = "auto",
    val_days: float | None = None,
    test_days: float | None = None,
    val_last: int = 5,
    test_last: int = 5,
) -> Split:
    """The split of ``mode`` (see the module docstring for ``auto``)."""
    if mode not in MODES:
        raise UserError(f"unknown split mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode == "per_user":
        return compute_per_user_split(interactions, val_last, test_last)
    split = compute_split(interactions, val_days=val_days, test_days=test_days)
    if mode == "time":
        return split
    users = interactions["user_id"].nunique()
    in_val = split.val(interactions)["user_id"].nunique()
    if users and in_val >= AUTO_MIN_VAL_SHARE * users:
        return split
    log.warning(
        "split: the time split's validation window holds %d of %d users (< %.0f%%): using "
        "the per-user split (each user's last %d events test, %d before them validation). "
        "Force one with RECSTACK_SPLIT_MODE=time|per_user.",
        in_val,
        users,
        AUTO_MIN_VAL_SHARE * 100,
        test_last,
        val_last,
    )
    return compute_per_user_split(interactions, val_last, test_last)


def split_path(settings: Settings) -> Path:
    return settings.data_dir / SPLIT_FILE


def write_split(
    settings: Settings, val_days: float | None = None, test_days: float | None = None
) -> Split:
    """Compute the split on the current raw interactions (mode and windows from the
    settings unless given) and write ``split.json`` (and ``split_users.parquet`` for a
    per-user split) atomically: a reader sees the old files or the new ones."""
    interactions = read_table(settings, "interactions", columns=["user_id", "timestamp"])
    split = choose_split(
        interactions,
        settings.split_mode,
        val_days if val_days is not None else settings.split_val_days,
        test_days if test_days is not None else settings.split_test_days,
        settings.split_val_last,
        settings.split_test_last,
    )
    data = {**split.to_json(), "snapshot": read_meta(settings).get("snapshot")}
    path = split_path(settings)
    users = split.users_table()
    if users is not None:
        users_path = settings.data_dir / USERS_FILE
        tmp_users = users_path.with_name(f".{users_path.name}.tmp-{os.getpid()}")
        users.to_parquet(tmp_users, index=False)
        os.replace(tmp_users, users_path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
    return split


def load_split(settings: Settings) -> Split:
    """The split written by :func:`write_split`."""
    path = split_path(settings)
    if not path.exists():
        raise UserError(f"no split at {path}: run `recstack train --only split` first")
    try:
        data = json.loads(path.read_text())
        users = None
        if data.get("mode") == "per_user":
            users = pd.read_parquet(settings.data_dir / USERS_FILE)
        return Split.from_json(data, users)
    except (KeyError, ValueError, OSError) as e:
        raise UserError(f"{path}: not a valid split file ({e})") from e

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
  go to the later window). Right for ratings data, which arrives in bursts per user: a
  global time cut leaves a few hundred users in the last windows and the ranker with
  nothing to learn from. *Light users* — too few events for ``val_last + test_last`` but
  more than ``light_last`` — get a test window of their last ``light_last`` events
  (default 1) and nothing else: on a file where most users rated a handful of items they
  are most of the requests served, so the offline report and the release gate judge them;
  the ranker does not learn from them (their one-event windows made it serve worse,
  docs/quality.md "Light users"). ``light_last = 0`` keeps them training only, as users
  with fewer events always are.

``auto`` (the default) takes ``time`` when its validation window holds at least
:data:`AUTO_MIN_VAL_SHARE` of the users, else ``per_user``. Every training step filters
through a :class:`Split`, so no event of a user's validation or test window reaches
training, and every request sees only events strictly before its own time.

**Ranker windows.** The ranker learns from requests made at the start of a window, labelled
by the window's events. Window 0 is validation; ``windows`` > 1 adds earlier windows of the
same size (the ``val_last`` events before a user's validation window, or the ``val_days``
before ``train_end``), each one more request per user: on sparse ratings data one request
per user leaves the ranker a few hundred queries (docs/quality.md). Each window's requests
see only the events before the window's start, candidate sources included. The towers
behind those requests' retrieval must not have learnt from any window's events (an id
embedding trained on a window's positives would make retrieval look perfect there), so
:meth:`Split.train` — what the selection run's towers learn from — ends before the earliest
window; the released towers are refit on everything anyway.
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
from recstack.atomic_files import write_json_atomic
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
# Ranker windows when not set (RECSTACK_SPLIT_WINDOWS): a time split's validation window
# holds many users' requests; a per-user split's holds one per user, too few for the
# ranker on sparse data, so it takes four earlier windows (docs/quality.md measures 1, 3, 5).
DEFAULT_WINDOWS = {"time": 1, "per_user": 5}
_NEVER = pd.Timestamp.max.tz_localize("UTC")


def _utc_values(times: pd.Series | pd.DatetimeIndex) -> np.ndarray:
    """UTC times as datetime64[us] values without their zone, which numpy compares whole
    (NaT compares False). A zone-aware index's ``to_numpy()`` is an object array of
    Timestamps, compared one Python object at a time: on a MovieLens-1M-sized split that
    was most of the candidates step (7 cuts × ~1M rows)."""
    return pd.DatetimeIndex(times).as_unit("us").tz_convert(None).to_numpy()


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
    # Ranker windows (module docstring): 1 = validation only. per_user: window k's start
    # per user (k = 1 .. windows-1, ``earlier[k - 1]``); users with too few events for
    # window k are absent from it.
    windows: int = 1
    earlier: tuple[pd.Series, ...] = ()

    def __post_init__(self) -> None:
        if self.train_end > self.val_end:
            raise ValueError(f"train_end {self.train_end} is after val_end {self.val_end}")
        if self.mode not in ("time", "per_user"):
            raise ValueError(f"unknown split mode {self.mode!r}")
        if self.windows < 1:
            raise ValueError(f"windows must be >= 1, got {self.windows}")
        if self.per_user and len(self.earlier) != self.windows - 1:
            raise ValueError(f"{self.windows} windows need {self.windows - 1} earlier starts")

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
        """Per row, the user's validation or test start (:func:`_utc_values`)."""
        starts = self.val_start if which == "val" else self.test_start
        assert starts is not None
        got = starts.reindex(np.asarray(users, dtype=np.int64))
        return _utc_values(got.fillna(_NEVER))

    def _ts(self, df: pd.DataFrame, col: str) -> np.ndarray:
        return _utc_values(pd.to_datetime(df[col], utc=True))

    @property
    def window_length(self) -> pd.Timedelta:
        """The time split's window size (validation's)."""
        return self.val_end - self.train_end

    def _window_start(self, users: pd.Series | np.ndarray, k: int, absent: str) -> np.ndarray:
        """Per row, the user's window-``k`` start (:func:`_utc_values`). A user
        without window ``k`` gets the start of their earliest window before it
        (``absent="earliest"``: the events they contribute to others' window-``k``
        requests, and never one of their own windows' events) or NaT (``"none"``)."""
        if k == 0:
            return self._starts(users, "val")
        got = self.earlier[k - 1].reindex(np.asarray(users, dtype=np.int64))
        starts = _utc_values(pd.to_datetime(got, utc=True))
        if absent == "none":
            return starts
        return np.where(pd.isna(starts), self._window_start(users, k - 1, absent), starts)

    def _check_window(self, k: int) -> None:
        if not 0 <= k < self.windows:
            raise ValueError(f"window {k} out of range: the split has {self.windows}")

    def before_window(self, df: pd.DataFrame, k: int, col: str = "timestamp") -> pd.DataFrame:
        """What window ``k``'s requests may know: rows before the window's start (per
        user; a user without window ``k`` contributes the rows before their earliest
        window). Window 0: the rows before validation."""
        self._check_window(k)
        if not self.per_user:
            return df[df[col] < self.train_end - k * self.window_length]
        return df[self._ts(df, col) < self._window_start(df["user_id"], k, "earliest")]

    def window(self, df: pd.DataFrame, k: int, col: str = "timestamp") -> pd.DataFrame:
        """Rows in ranker window ``k`` (0: validation)."""
        self._check_window(k)
        if k == 0:
            return self.val(df, col)
        if not self.per_user:
            end = self.train_end - (k - 1) * self.window_length
            ts = df[col]
            return df[(ts >= end - self.window_length) & (ts < end)]
        users = df["user_id"]
        ts = self._ts(df, col)
        start = self._window_start(users, k, "none")
        end = self._window_start(users, k - 1, "none")
        # NaT compares False: users without the window have no rows in it.
        return df[(ts >= start) & (ts < end)]

    def window_times(self, user_ids: np.ndarray, k: int) -> pd.DatetimeIndex:
        """The time of each user's window-``k`` request."""
        self._check_window(k)
        if k == 0:
            return self.val_times(user_ids)
        if not self.per_user:
            at = self.train_end - k * self.window_length
            return pd.DatetimeIndex([at] * len(user_ids)).as_unit("us")
        starts = self._window_start(user_ids, k, "none")
        if pd.isna(starts).any():
            raise ValueError(f"some users have no window {k}")
        return pd.DatetimeIndex(starts, tz="UTC")

    def train_description(self) -> str:
        """Where :meth:`train`'s rows end, in words (reports)."""
        if self.per_user:
            return f"each user's earliest of {self.windows} ranker window(s)"
        return (self.train_end - (self.windows - 1) * self.window_length).isoformat()

    def train(self, df: pd.DataFrame, col: str = "timestamp") -> pd.DataFrame:
        """Rows before the earliest ranker window: what the selection run's towers learn
        from (module docstring). With one window: the rows before validation."""
        return self.before_window(df, self.windows - 1, col)

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
            "windows": self.windows,
            **({"params": self.params} if self.params else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], users: pd.DataFrame | None = None) -> Split:
        mode = str(data.get("mode", "time"))
        windows = int(data.get("windows", 1))
        if mode == "per_user":
            if users is None:
                raise ValueError("a per-user split needs its users table")
            idx = users["user_id"].to_numpy(np.int64)

            def column(name: str) -> pd.Series:
                return pd.Series(pd.to_datetime(users[name], utc=True).to_numpy(), index=idx)

            return cls(
                _utc(data["train_end"]),
                _utc(data["val_end"]),
                "per_user",
                column("val_start"),
                column("test_start"),
                data.get("params"),
                windows,
                tuple(column(_window_column(k)) for k in range(1, windows)),
            )
        return cls(
            _utc(data["train_end"]),
            _utc(data["val_end"]),
            params=data.get("params"),
            windows=windows,
        )

    def users_table(self) -> pd.DataFrame | None:
        """The per-user boundaries as written to ``split_users.parquet``."""
        if not self.per_user or self.val_start is None or self.test_start is None:
            return None
        index = self.val_start.index

        def column(starts: pd.Series) -> pd.DatetimeIndex:
            return pd.to_datetime(starts.reindex(index).to_numpy(), utc=True)

        return pd.DataFrame(
            {
                "user_id": index.to_numpy(np.int64),
                "val_start": column(self.val_start),
                "test_start": column(self.test_start),
                **{_window_column(k): column(s) for k, s in enumerate(self.earlier, 1)},
            }
        )


def _window_column(k: int) -> str:
    """``split_users.parquet``'s column of ranker window ``k``'s start (k >= 1)."""
    return f"window{k}_start"


def _utc(value: str | pd.Timestamp) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def compute_split(
    interactions: pd.DataFrame,
    val_days: float | None = None,
    test_days: float | None = None,
    windows: int = 1,
) -> Split:
    """Boundaries so that the last ``test_days`` of the data are test and the
    ``val_days`` before them validation (each default: 10% of the time span), with
    ``windows - 1`` earlier ranker windows of the validation's size before it (fewer, with
    a warning, when they would leave nothing to train the towers on).

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
    n_train = int((ts < train_end).sum())
    if n_train == 0:
        raise UserError(
            f"cannot split: validation ({val}) + test ({test}) cover the whole time span "
            f"{lo} .. {hi}; nothing is left for training"
        )
    fits = windows
    while fits > 1 and not (ts < train_end - (fits - 1) * (val_end - train_end)).any():
        fits -= 1
    if fits < windows:
        log.warning(
            "split: %d ranker windows of %s would leave no event before the earliest; using %d",
            windows,
            val_end - train_end,
            fits,
        )
    split = Split(train_end=train_end, val_end=val_end, windows=fits)
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


def compute_per_user_split(
    interactions: pd.DataFrame,
    val_last: int,
    test_last: int,
    windows: int = 1,
    light_last: int = 0,
) -> Split:
    """Leave-last-N-out: each user's last ``test_last`` events are test and the
    ``val_last`` before them validation (events tied with a boundary go to the later
    window). ``windows - 1`` earlier ranker windows of ``val_last`` events each come
    before validation, for the users with an event before them. Users with at most
    ``val_last + test_last`` events but more than ``light_last`` get a test window of
    their last ``light_last`` events only (module docstring: no validation or ranker
    window, which start where their test does); the rest keep all for training. When no
    user has more than ``val_last + test_last`` events, the split is made with one
    validation and one test event instead (logged), so the ranker has requests; with no
    user above 2 events it is refused."""
    if val_last < 1 or test_last < 1:
        raise UserError(
            f"per-user split needs val_last and test_last >= 1, got {val_last}, {test_last}"
        )
    if light_last < 0:
        raise UserError(f"per-user split needs light_last >= 0, got {light_last}")
    if len(interactions) == 0:
        raise UserError("cannot split: no interactions")
    df = interactions[["user_id", "timestamp"]].sort_values(["user_id", "timestamp"], kind="stable")
    from_end = df.groupby("user_id").cumcount(ascending=False).to_numpy()
    sizes = df.groupby("user_id")["timestamp"].transform("size").to_numpy()
    heavy = sizes > val_last + test_last
    if not heavy.any():
        # No user has the events these windows need: the ranker would have no request to
        # learn from. One validation and one test event is the most such data gives.
        if val_last + test_last > 2 and (sizes > 2).any():
            log.warning(
                "per-user split: no user has more than %d events (val_last %d + test_last "
                "%d): splitting with val_last 1 and test_last 1 instead",
                val_last + test_last,
                val_last,
                test_last,
            )
            return compute_per_user_split(interactions, 1, 1, windows, light_last)
        raise UserError(
            f"cannot split per user: no user has more than {val_last + test_last} events "
            "(a validation and a test window), so the ranker has no request to learn from"
        )
    light = ~heavy & (light_last > 0) & (sizes > light_last)
    # Per row, its user's window sizes (0 for users who are training only); a light
    # user's validation window is empty (it starts at the test start).
    test_n = np.where(heavy, test_last, np.where(light, light_last, 0))
    val_n = np.where(heavy, val_last, 0)
    eligible = heavy | light
    test_rows = df[eligible & (from_end == test_n - 1)]
    val_rows = df[eligible & (from_end == test_n + val_n - 1)]
    test_start = test_rows.set_index("user_id")["timestamp"]
    val_start = val_rows.set_index("user_id")["timestamp"].reindex(test_start.index)

    def starts(rows: pd.DataFrame) -> pd.Series:
        by_user = rows.set_index("user_id")["timestamp"]
        return pd.Series(pd.to_datetime(by_user, utc=True).to_numpy(), index=by_user.index)

    earlier = []
    for k in range(1, windows):  # heavy users only: light users have no ranker window
        offset = test_last + val_last * (k + 1)
        earlier.append(starts(df[heavy & (sizes > offset) & (from_end == offset - 1)]))
    split = Split(
        train_end=_utc(val_start.max()),
        val_end=_utc(test_start.max()),
        mode="per_user",
        val_start=starts(val_rows).reindex(test_start.index),
        test_start=starts(test_rows),
        params={"val_last": val_last, "test_last": test_last, "light_last": light_last},
        windows=windows,
        earlier=tuple(earlier),
    )
    n = df["user_id"].nunique()
    n_light = int(light[from_end == 0].sum())
    log.info(
        "per-user split: the last %d events of %d of %d users are test, the %d before them "
        "validation (%d light users: their last %d test, nothing else); (%d / %d / %d "
        "rows); %d earlier ranker windows (users: %s)",
        test_last,
        len(test_start),
        n,
        val_last,
        n_light,
        light_last,
        len(split.before_window(interactions, 0)),
        len(split.val(interactions)),
        len(split.test(interactions)),
        windows - 1,
        ", ".join(str(len(e)) for e in earlier) or "-",
    )
    return split


def choose_split(
    interactions: pd.DataFrame,
    mode: str = "auto",
    val_days: float | None = None,
    test_days: float | None = None,
    val_last: int = 5,
    test_last: int = 5,
    windows: int | None = None,
    light_last: int = 0,
) -> Split:
    """The split of ``mode`` (see the module docstring for ``auto``); ``windows``: ranker
    windows, None for the mode's default (:data:`DEFAULT_WINDOWS`); ``light_last``: the
    per-user split's test window for light users (0: none)."""
    if mode not in MODES:
        raise UserError(f"unknown split mode {mode!r}; choose one of {', '.join(MODES)}")
    if windows is not None and windows < 1:
        raise UserError(f"the split needs at least 1 ranker window, got {windows}")
    per_user_windows = windows or DEFAULT_WINDOWS["per_user"]
    if mode == "per_user":
        return compute_per_user_split(
            interactions, val_last, test_last, per_user_windows, light_last
        )
    split = compute_split(
        interactions, val_days, test_days, windows=windows or DEFAULT_WINDOWS["time"]
    )
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
    return compute_per_user_split(interactions, val_last, test_last, per_user_windows, light_last)


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
        settings.split_windows,
        settings.split_light_last,
    )
    data = {**split.to_json(), "snapshot": read_meta(settings).get("snapshot")}
    path = split_path(settings)
    users = split.users_table()
    if users is not None:
        users_path = settings.data_dir / USERS_FILE
        tmp_users = users_path.with_name(f".{users_path.name}.tmp-{os.getpid()}")
        users.to_parquet(tmp_users, index=False)
        os.replace(tmp_users, users_path)
    write_json_atomic(path, data)
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

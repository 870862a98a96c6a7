"""Time-based train / validation / test split (``<data_dir>/split.json``).

Two boundaries cut the interactions' time range: training is ``timestamp < train_end``,
validation ``train_end <= timestamp < val_end``, test ``timestamp >= val_end``. Every
training step filters through a :class:`Split`, so no event at or after ``train_end``
reaches training. By default validation and test are the last 10% of the time span each.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from exporters.raw_tables import read_meta, read_table
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
DEFAULT_FRACTION = 0.10


@dataclass(frozen=True)
class Split:
    """The two boundaries (UTC). Row filters take a frame with a timestamp column."""

    train_end: pd.Timestamp
    val_end: pd.Timestamp

    def __post_init__(self) -> None:
        if self.train_end > self.val_end:
            raise ValueError(f"train_end {self.train_end} is after val_end {self.val_end}")

    @staticmethod
    def before(df: pd.DataFrame, t: pd.Timestamp, col: str = "timestamp") -> pd.DataFrame:
        """Rows strictly before ``t``: what is known when predicting at ``t``."""
        return df[df[col] < t]

    def train(self, df: pd.DataFrame, col: str = "timestamp") -> pd.DataFrame:
        """Rows with ``col < train_end``."""
        return df[df[col] < self.train_end]

    def val(self, df: pd.DataFrame, col: str = "timestamp") -> pd.DataFrame:
        """Rows with ``train_end <= col < val_end``."""
        ts = df[col]
        return df[(ts >= self.train_end) & (ts < self.val_end)]

    def test(self, df: pd.DataFrame, col: str = "timestamp") -> pd.DataFrame:
        """Rows with ``col >= val_end``."""
        return df[df[col] >= self.val_end]

    def to_json(self) -> dict[str, str]:
        return {"train_end": self.train_end.isoformat(), "val_end": self.val_end.isoformat()}

    @classmethod
    def from_json(cls, data: dict[str, str]) -> Split:
        return cls(_utc(data["train_end"]), _utc(data["val_end"]))


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
    if n_val == 0 or n_test == 0:
        log.warning("split leaves validation (%d rows) or test (%d rows) empty", n_val, n_test)
    log.info(
        "split: train < %s <= val < %s <= test (%d / %d / %d rows)",
        train_end,
        val_end,
        n_train,
        n_val,
        n_test,
    )
    return split


def split_path(settings: Settings) -> Path:
    return settings.data_dir / SPLIT_FILE


def write_split(
    settings: Settings, val_days: float | None = None, test_days: float | None = None
) -> Split:
    """Compute the split on the current raw interactions and write ``split.json``
    (atomically: a reader sees the old file or the new one)."""
    interactions = read_table(settings, "interactions", columns=["timestamp"])
    split = compute_split(interactions, val_days=val_days, test_days=test_days)
    data = {**split.to_json(), "snapshot": read_meta(settings).get("snapshot")}
    path = split_path(settings)
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
        return Split.from_json(json.loads(path.read_text()))
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: not a valid split file ({e})") from e

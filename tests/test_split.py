"""The time-based split: exact boundaries, disjoint parts, nothing from the future."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from exporters.data_generate import generate
from exporters.raw_tables import read_meta, read_table
from exporters.split import Split, compute_split, load_split, split_path, write_split
from recstack.errors import UserError
from recstack.settings import Settings

T0 = pd.Timestamp("2026-01-01T00:00:00Z")


def _frame(offsets_h: list[float]) -> pd.DataFrame:
    ts = [T0 + pd.Timedelta(hours=h) for h in offsets_h]
    return pd.DataFrame({"timestamp": pd.Series(ts).dt.as_unit("us"), "n": range(len(ts))})


def test_boundaries_are_exact_and_inclusive_on_the_right_side() -> None:
    # 100 days of hourly rows; explicit windows of 10 days each.
    df = _frame([float(h) for h in range(100 * 24 + 1)])
    split = compute_split(df, val_days=10, test_days=10)
    assert split.val_end == T0 + pd.Timedelta(days=90)
    assert split.train_end == T0 + pd.Timedelta(days=80)
    train, val, test = split.train(df), split.val(df), split.test(df)
    # A row exactly at a boundary belongs to the later part.
    assert train["timestamp"].max() == split.train_end - pd.Timedelta(hours=1)
    assert val["timestamp"].min() == split.train_end
    assert val["timestamp"].max() == split.val_end - pd.Timedelta(hours=1)
    assert test["timestamp"].min() == split.val_end
    assert len(train) + len(val) + len(test) == len(df)
    assert len(val) == len(test) - 1 == 10 * 24


def test_default_windows_are_ten_percent_of_the_span() -> None:
    df = _frame([0.0, 500.0, 1000.0])  # span 1000 h
    split = compute_split(df)
    assert split.val_end == T0 + pd.Timedelta(hours=900)
    assert split.train_end == T0 + pd.Timedelta(hours=800)


def test_boundaries_are_whole_seconds() -> None:
    df = _frame([0.0, 10.0001234])
    split = compute_split(df, val_days=0.1, test_days=0.1)
    for t in (split.train_end, split.val_end):
        assert t == t.floor("s")
        assert str(t.tz) == "UTC"


def test_generated_data_split_leaks_nothing(small_settings: Settings) -> None:
    inter = read_table(small_settings, "interactions")
    split = compute_split(inter)
    train, val, test = split.train(inter), split.val(inter), split.test(inter)
    assert min(len(train), len(val), len(test)) > 1000
    assert train["timestamp"].max() < split.train_end <= val["timestamp"].min()
    assert val["timestamp"].max() < split.val_end <= test["timestamp"].min()
    assert len(train) + len(val) + len(test) == len(inter)
    assert not set(train.index) & set(val.index)
    assert not set(val.index) & set(test.index)
    before = Split.before(inter, split.val_end)
    assert len(before) == len(train) + len(val)


def test_write_and_load_round_trip(settings: Settings) -> None:
    generate(settings, preset="small", seed=3)
    written = write_split(settings, val_days=7, test_days=7)
    assert load_split(settings) == written
    data = json.loads(split_path(settings).read_text())
    assert pd.Timestamp(data["train_end"]) == written.train_end
    assert pd.Timestamp(data["val_end"]) == written.val_end
    assert data["val_end"].endswith("+00:00")
    assert data["snapshot"] == read_meta(settings)["snapshot"]
    assert written.val_end - written.train_end == pd.Timedelta(days=7)


@pytest.mark.parametrize(
    ("val_days", "test_days", "message"),
    [(-1.0, 5.0, "val_days must be >= 0"), (50.0, 50.0, "nothing is left for training")],
)
def test_impossible_splits_are_refused(val_days: float, test_days: float, message: str) -> None:
    df = _frame([float(h) for h in range(0, 24 * 90, 6)])
    with pytest.raises(UserError, match=message):
        compute_split(df, val_days=val_days, test_days=test_days)


def test_load_split_without_a_file_is_a_user_error(settings: Settings) -> None:
    with pytest.raises(UserError, match="no split"):
        load_split(settings)


def test_split_refuses_reversed_boundaries() -> None:
    with pytest.raises(ValueError):
        Split(train_end=T0 + pd.Timedelta(days=1), val_end=T0)


def _ratings(rows_per_user: dict[int, int]) -> pd.DataFrame:
    rows = []
    t0 = pd.Timestamp("1998-01-01", tz="UTC")
    for u, n in rows_per_user.items():
        for k in range(n):
            rows.append((u, 100 + k, t0 + pd.Timedelta(minutes=u * 1000 + k)))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"]).assign(event="click")


def test_per_user_split_holds_out_each_users_last_events() -> None:
    from exporters.split import compute_per_user_split

    df = _ratings({1: 20, 2: 11, 3: 10, 4: 3})
    split = compute_per_user_split(df, val_last=5, test_last=5)
    test, val, train = split.test(df), split.val(df), split.train(df)
    assert len(test) + len(val) + len(train) == len(df)
    for u in (1, 2):
        assert len(test[test.user_id == u]) == 5 and len(val[val.user_id == u]) == 5
        mine = df[df.user_id == u]
        assert test[test.user_id == u]["timestamp"].min() > val[val.user_id == u]["timestamp"].max()
        assert (
            val[val.user_id == u]["timestamp"].min() > train[train.user_id == u]["timestamp"].max()
        )
        assert split.test_times(np.array([u]))[0] == mine["timestamp"].iloc[-5]
        assert split.val_times(np.array([u]))[0] == mine["timestamp"].iloc[-10]
    # Too few events to hold any out: training only.
    assert set(train.user_id) >= {3, 4} and not {3, 4} & set(test.user_id)


def test_auto_split_prefers_time_unless_its_windows_hold_few_users() -> None:
    from exporters.split import choose_split

    bursty = _ratings({u: 30 for u in range(50)})  # users one after another in time
    assert choose_split(bursty, "auto").mode == "per_user"
    steady = bursty.assign(
        timestamp=pd.Timestamp("1998-01-01", tz="UTC")
        + pd.to_timedelta(np.tile(np.arange(30), 50) * 3600, unit="s")
    )
    assert choose_split(steady, "auto").mode == "time"


def test_per_user_split_round_trips(settings: Settings) -> None:
    from exporters.raw_tables import read_table

    generate(settings, preset="small", seed=3)
    written = write_split(settings.model_copy(update={"split_mode": "per_user"}))
    loaded = load_split(settings)
    assert loaded.per_user and loaded == written
    inter = read_table(settings, "interactions")
    assert len(loaded.test(inter)) == len(written.test(inter)) > 0


def test_an_empty_window_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """One row 20 years after the others stretches the default windows (10 % of the span
    each) over empty time: the validation window gets nothing, and the split says so."""
    hours = [float(h) for h in range(30 * 24)] + [20 * 365 * 24.0]
    with caplog.at_level(logging.WARNING, logger="exporters.split"):
        split = compute_split(_frame(hours))
    assert len(split.val(_frame(hours))) == 0
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1, messages
    assert "validation window" in messages[0] and "holds no interactions" in messages[0]
    assert "RECSTACK_SPLIT_VAL_DAYS" in messages[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exporters.split"):
        compute_split(_frame([float(h) for h in range(30 * 24)]))  # evenly spread: quiet
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_ranker_windows_per_user_partition_each_users_history() -> None:
    """Window k holds the ``val_last`` events before window k-1; the towers' training
    rows (``train``) end before every window a user has; each window's requests know only
    the rows before it."""
    from exporters.split import compute_per_user_split

    df = _ratings({1: 21, 2: 16, 3: 11, 4: 3})
    split = compute_per_user_split(df, val_last=5, test_last=5, windows=3)
    assert split.windows == 3

    def items(part: pd.DataFrame, u: int) -> list[int]:
        return sorted(part[part.user_id == u]["item_id"] - 100)

    w1, w2 = split.window(df, 1), split.window(df, 2)
    assert items(split.test(df), 1) == list(range(16, 21))
    assert items(split.window(df, 0), 1) == items(split.val(df), 1) == list(range(11, 16))
    assert items(w1, 1) == list(range(6, 11)) and items(w2, 1) == list(range(1, 6))
    assert items(split.train(df), 1) == [0]
    # User 2 (16 events) has window 1 but not 2; user 3 only validation; user 4 nothing.
    assert items(w1, 2) == list(range(1, 6)) and items(w2, 2) == []
    assert items(split.train(df), 2) == [0]
    assert items(split.train(df), 3) == [0] and items(split.train(df), 4) == [0, 1, 2]
    assert set(w1.user_id) == {1, 2} and set(w2.user_id) == {1}
    parts = [split.train(df), w2, w1, split.val(df), split.test(df)]
    assert sum(len(p) for p in parts) == len(df)
    # A window's requests are at its start and know the rows before it, by user.
    mine = df[df.user_id == 1]
    assert split.window_times(np.array([1]), 2)[0] == mine["timestamp"].iloc[1]
    known = split.before_window(df, 1)
    assert items(known, 1) == list(range(6)) and items(known, 2) == [0]
    assert items(known, 3) == [0]  # no window 1: the rows before their earliest window
    assert items(split.before_window(df, 0), 1) == list(range(11))
    with pytest.raises(ValueError, match="no window 2"):
        split.window_times(np.array([2]), 2)
    with pytest.raises(ValueError, match="out of range"):
        split.window(df, 3)


def test_light_users_get_a_test_window_only() -> None:
    """Users with too few events for val_last + test_last but more than ``light_last``:
    their last ``light_last`` events are test (the report and the gate judge them) and
    nothing else — no validation or ranker window, so the ranker learns from heavy users
    only, and the towers from everything before the test; heavy users split as without
    light users; a single event stays training only."""
    from exporters.split import compute_per_user_split

    df = _ratings({1: 21, 2: 10, 3: 2, 4: 1})
    split = compute_per_user_split(df, val_last=5, test_last=5, windows=3, light_last=1)
    heavy_only = compute_per_user_split(df, val_last=5, test_last=5, windows=3)

    def items(part: pd.DataFrame, u: int) -> list[int]:
        return sorted(part[part.user_id == u]["item_id"] - 100)

    parts = [split.test(df), split.val(df), split.window(df, 1), split.window(df, 2)]
    old = [heavy_only.test(df), heavy_only.val(df), heavy_only.window(df, 1)]
    for part, before in zip(
        [*parts, split.train(df)],
        [*old, heavy_only.window(df, 2), heavy_only.train(df)],
        strict=True,
    ):
        assert items(part, 1) == items(before, 1)
    test, val, w1, w2 = parts
    assert items(test, 2) == [9] and items(test, 3) == [1]
    assert 2 not in set(val.user_id) | set(w1.user_id) | set(w2.user_id)
    assert items(split.train(df), 2) == list(range(9)) and items(split.train(df), 3) == [0]
    assert items(split.before_window(df, 0), 2) == list(range(9))
    assert items(split.train(df), 4) == [0] and 4 not in set(test.user_id)
    assert split.test_times(np.array([2]))[0] == df[df.user_id == 2]["timestamp"].iloc[-1]
    assert sum(len(p) for p in parts) + len(split.train(df)) == len(df)
    assert set(heavy_only.test(df).user_id) == {1}


def test_a_split_of_only_light_users_names_what_it_needs() -> None:
    from exporters.split import compute_per_user_split

    df = _ratings({1: 1, 2: 1})
    with pytest.raises(UserError, match="more than 10 events"):
        compute_per_user_split(df, val_last=5, test_last=5, light_last=1)
    # Light users could be tested, but no one has a validation event to learn from.
    with pytest.raises(UserError, match=r"more than 2 events .* no request to learn from"):
        compute_per_user_split(_ratings({1: 2, 2: 2}), val_last=1, test_last=1, light_last=1)
    with pytest.raises(UserError, match="more than 10 events"):
        compute_per_user_split(_ratings({1: 2}), val_last=5, test_last=5, light_last=0)


def test_without_a_user_for_the_windows_one_validation_and_one_test_event(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No user has more than val_last + test_last events (light users only, as in short
    review histories): the split falls back to 1 + 1 and says so, instead of leaving the
    ranker without a request."""
    from exporters.split import compute_per_user_split

    df = _ratings({1: 8, 2: 3, 3: 2, 4: 1})
    with caplog.at_level(logging.WARNING, logger="exporters.split"):
        split = compute_per_user_split(df, val_last=5, test_last=5, windows=3, light_last=1)
    assert "val_last 1 and test_last 1 instead" in caplog.text
    assert split.params == {"val_last": 1, "test_last": 1, "light_last": 1}
    assert split.params == compute_per_user_split(df, 1, 1, 3, 1).params

    def items(part: pd.DataFrame, u: int) -> list[int]:
        return sorted(part[part.user_id == u]["item_id"] - 100)

    test, val = split.test(df), split.val(df)
    assert [items(test, u) for u in (1, 2, 3)] == [[7], [2], [1]]
    assert [items(val, u) for u in (1, 2)] == [[6], [1]] and 3 not in set(val.user_id)
    assert items(split.window(df, 1), 1) == [5] and items(split.window(df, 2), 1) == [4]
    assert items(split.train(df), 4) == [0]


def test_ranker_windows_of_a_time_split_step_back_by_the_validation_size() -> None:
    df = _frame([float(h) for h in range(100 * 24 + 1)])
    split = compute_split(df, val_days=10, test_days=10, windows=3)
    day = pd.Timedelta(days=1)
    assert split.window_times(np.array([7]), 2)[0] == T0 + 60 * day
    w1 = split.window(df, 1)
    assert w1["timestamp"].min() == T0 + 70 * day and w1["timestamp"].max() < T0 + 80 * day
    assert split.train(df)["timestamp"].max() < T0 + 60 * day
    assert len(split.before_window(df, 1)) == 70 * 24
    # Windows that would leave the towers nothing are dropped, with a warning.
    assert compute_split(df, val_days=10, test_days=10, windows=20).windows == 8


def test_ranker_windows_round_trip(settings: Settings) -> None:
    generate(settings, preset="small", seed=3)
    written = write_split(
        settings.model_copy(update={"split_mode": "per_user", "split_windows": 2})
    )
    loaded = load_split(settings)
    assert loaded.windows == written.windows == 2 and loaded == written
    inter = read_table(settings, "interactions")
    assert len(loaded.window(inter, 1)) == len(written.window(inter, 1)) > 0
    assert json.loads(split_path(settings).read_text())["windows"] == 2

"""The ranker learns from several windows per user (exporters/split.py): one request per
(window, user), each with the candidate sources of the events before its window."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from exporters import feast_ops, ranker_train
from exporters.candidates import SourceModel
from exporters.raw_tables import read_table
from exporters.split import load_split, write_split
from recstack.settings import Settings


def test_ranker_trains_on_every_window(trained_settings: Settings, tmp_path: Path) -> None:
    # A copy of the trained small preset's data (towers, index, Feast), re-split per user
    # with two windows; only the split, candidate sources and ranker are redone.
    data = tmp_path / "data"
    shutil.copytree(trained_settings.data_dir, data)
    s = trained_settings.model_copy(
        update={"data_dir": data, "split_mode": "per_user", "split_windows": 2}
    )
    split = write_split(s)
    assert split.windows == 2
    ranker_train.build_candidate_models(s)
    infos = {
        cut: SourceModel.load(ranker_train.candidate_model_path(s, cut)).info
        for cut in ("train", "train_w1", "eval")
    }
    # Each cut knows fewer events than the next: window 1's sources never saw window 1.
    inter = read_table(s, "interactions")
    assert infos["train_w1"]["interactions"] < infos["train"]["interactions"]
    assert infos["train"]["interactions"] < infos["eval"]["interactions"]

    ranker_train.train(s, ranker_train.RankerParams(max_queries=150, num_trees=30))
    stats = ranker_train.load_manifest(s)["stats"]
    windows = stats["windows"]
    assert [w["window"] for w in windows] == [0, 1]
    assert all(w["queries"] == 150 and w["positives"] > 0 for w in windows)
    assert stats["queries"] == 300
    assert stats["train_queries"] + stats["holdout_queries"] == stats["queries_with_positive"]
    # Window 1's labels are the events of window 1, not of validation.
    loaded = load_split(s)
    w1 = loaded.window(inter, 1)
    assert len(w1) and set(w1.index).isdisjoint(loaded.val(inter).index)
    # The towers' rows (train) hold no window's events.
    assert set(loaded.train(inter).index).isdisjoint(w1.index)


def test_point_in_time_features_in_chunks_equal_one_call(
    trained_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feast's point-in-time join is called per PIT_CHUNK_ROWS entity rows (its memory is
    rows × each key's history): the rows, their order and values are those of one call,
    and those of the as-of join training uses with the file offline store."""
    s = trained_settings
    events = read_table(s, "interactions").sample(300, random_state=5)
    times = pd.DatetimeIndex(events["timestamp"])
    layout = ranker_train.layout_for(s, ranker_train.n_categories_of(s))
    got = {}
    for chunk in (10_000, 7):
        monkeypatch.setattr(feast_ops, "PIT_CHUNK_ROWS", chunk)
        got[chunk] = feast_ops.feast_point_in_time(
            feast_ops.feature_store(s),
            "item_id",
            events["item_id"].to_numpy(),
            times,
            layout.item_refs,
        )
    assert len(got[7]) == 300 and got[7]["item_id"].tolist() == events["item_id"].tolist()
    assert got[7].notna().to_numpy().mean() > 0.5  # real values, not a frame of NaN
    pd.testing.assert_frame_equal(got[7], got[10_000])
    as_of = ranker_train.point_in_time_features(
        s, "item_id", events["item_id"].to_numpy(), times, layout.item_refs
    )
    pd.testing.assert_frame_equal(as_of, got[7])

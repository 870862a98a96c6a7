"""The ranker learns from several windows per user (exporters/split.py): one request per
(window, user), each with the candidate sources of the events before its window."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from exporters import feast_ops, ranker_prior, ranker_train
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
        update={
            "data_dir": data,
            "split_mode": "per_user",
            "split_windows": 2,
            "ease_lambda_tune": True,
        }
    )
    split = write_split(s)
    assert split.windows == 2
    ranker_train.build_candidate_models(s)
    infos = {
        cut: SourceModel.load(ranker_train.candidate_model_path(s, cut)).info
        for cut in ("train", "train_w1", "eval")
    }
    # EASE's λ, chosen on the validation window (the small preset's 800 items are below
    # the limit), is every cut's.
    lam = json.loads((s.work_dir / ranker_train.EASE_LAMBDA_FILE).read_text())
    assert lam["how"] == "validation" and lam["users"] > 0
    ndcg = lam["validation_ndcg@10"]
    assert ndcg[f"{lam['lambda']:g}"] == max(ndcg.values())
    assert {i["method"] for i in infos.values()} == {f"ease(lambda={lam['lambda']:g})"}
    # Each cut knows fewer events than the next: window 1's sources never saw window 1.
    inter = read_table(s, "interactions")
    assert infos["train_w1"]["interactions"] < infos["train"]["interactions"]
    assert infos["train"]["interactions"] < infos["eval"]["interactions"]

    # A row budget below the windows' rows: LightGBM sees every positive and a share of
    # the negatives; the early-stopping holdout keeps whole lists.
    params = ranker_train.RankerParams(max_queries=150, num_trees=30, max_train_rows=20_000)
    ranker_train.train(s, params)
    stats = ranker_train.load_manifest(s)["stats"]
    windows = stats["windows"]
    assert [w["window"] for w in windows] == [0, 1]
    assert all(w["queries"] == 150 and w["positives"] > 0 for w in windows)
    assert stats["queries"] == 300
    assert stats["train_queries"] + stats["holdout_queries"] == stats["queries_with_positive"]
    assert 0.05 < stats["train_negatives_kept"] < 0.5
    # Boosted from the better gate baseline on the validation window's training requests
    # (not window 1's): the saved ranker's first tree is that baseline's order
    # (exporters/ranker_prior.py).
    prior = stats["prior"]
    assert prior["setting"] == "auto"
    assert prior["baseline"] in ranker_prior.GATE_BASELINES
    assert prior["training_ndcg@10"][prior["baseline"]] == max(prior["training_ndcg@10"].values())
    assert 0 < prior["requests"] <= min(windows[0]["queries"], stats["train_queries"])
    names = ranker_train.load_manifest(s)["feature_names"]
    sample = np.load(s.work_dir / ranker_train.SAMPLE_FILE)
    first = ranker_train.load_booster(s).predict(sample, num_iteration=1)
    expected = ranker_prior.prior_value(sample[:, names.index(prior["feature"])])
    np.testing.assert_allclose(first, expected, atol=1e-5)
    # Window 1's labels are the events of window 1, not of validation.
    loaded = load_split(s)
    w1 = loaded.window(inter, 1)
    assert len(w1) and set(w1.index).isdisjoint(loaded.val(inter).index)
    # The towers' rows (train) hold no window's events.
    assert set(loaded.train(inter).index).isdisjoint(w1.index)


def test_sample_negatives_keeps_positives_and_a_share_of_each_query() -> None:
    rng = np.random.default_rng(0)
    query = np.repeat(np.arange(200), 300)
    y = (rng.random(len(query)) < 0.02).astype(np.int64) * rng.integers(1, 3, len(query))
    rows = query % 10 != 0  # a tenth of the queries are someone else's (the holdout)
    kept = ranker_train.sample_negatives(y, rows, 15_000, np.random.default_rng(1))
    assert not (kept & ~rows).any()  # only rows it was given
    assert (kept[rows & (y > 0)]).all()  # every positive
    assert abs(int(kept.sum()) - 15_000) < 400  # about the budget
    mine = np.arange(200) % 10 != 0
    negatives = np.bincount(query[rows & (y == 0)], minlength=200)[mine]
    share = np.bincount(query[kept & (y == 0)], minlength=200)[mine] / negatives
    assert share.min() > 0.15 and share.max() < 0.42  # each query about the same share
    again = ranker_train.sample_negatives(y, rows, 15_000, np.random.default_rng(1))
    assert (again == kept).all()  # seeded
    fits = ranker_train.sample_negatives(y, rows, int(rows.sum()), np.random.default_rng(1))
    assert (fits == rows).all() and fits is not rows


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

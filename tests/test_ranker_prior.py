"""The ranker's prior (exporters/ranker_prior.py): a baseline's order as the model's first
tree, chosen on the training requests, kept when the model is saved and reloaded."""

from __future__ import annotations

from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest

from exporters import metrics, ranker_prior
from exporters.candidates import ABSENT_RANK

NAMES = ["u_age", "c_ann_rank", "c_i2i_rank", "c_pop_rank", "x_tower_score"]


def _ranks(rng: np.random.Generator, n: int) -> np.ndarray:
    r = rng.integers(0, 3 * ranker_prior.PRIOR_DEPTH, n).astype(np.float32)
    r[rng.random(n) < 0.2] = ABSENT_RANK
    return r


def test_prior_value_is_the_dcg_discount_then_zero() -> None:
    v = ranker_prior.prior_value(np.array([0, 1, 9, 249, 250, 4000, ABSENT_RANK]))
    assert v[0] == 1.0 and v[1] == pytest.approx(1 / np.log2(3))
    assert v[2] == pytest.approx(1 / np.log2(11)) and v[3] > 0
    assert (v[4:] == 0).all()
    assert (np.diff(v[:4]) < 0).all()  # a better rank scores higher


def test_prior_tree_scores_every_rank_by_its_column_alone() -> None:
    rng = np.random.default_rng(0)
    booster = ranker_prior.prior_booster(NAMES, "c_pop_rank", num_threads=1)
    assert booster.num_trees() == 1
    x = rng.normal(size=(5000, len(NAMES))).astype(np.float32) * 100
    x[:, 3] = _ranks(rng, len(x))
    x[:300, 3] = np.arange(300)  # every fitted rank and a few beyond
    np.testing.assert_allclose(booster.predict(x), ranker_prior.prior_value(x[:, 3]), atol=1e-6)


def _oracle_ndcg(key: np.ndarray, y: np.ndarray, query: np.ndarray, k: int) -> float:
    """The project's NDCG (exporters/metrics.py, what the report and the gate use) of each
    request's rows in ``key`` order, the rows' labels as the relevant items' gains."""
    lists, relevant = [], []
    for q in np.unique(query):
        idx = np.flatnonzero(query == q)
        lists.append(idx[np.argsort(key[idx], kind="stable")][:k])
        relevant.append({int(r): float(y[r]) for r in idx})
    return metrics.ndcg_at_k(np.stack(lists), relevant, k)


def test_order_ndcg_equals_the_projects_ndcg() -> None:
    rng = np.random.default_rng(1)
    query = np.sort(rng.integers(0, 40, 2000))
    position = np.concatenate([np.arange(c) for c in np.bincount(query)])
    y = rng.choice([0, 0, 0, 0, 1, 2], len(query)).astype(np.float64)
    key = rng.permutation(len(query)).astype(np.float64)  # no ties: the oracle's order
    got = ranker_prior.order_ndcg(key, y, query, position, 10)
    assert got == pytest.approx(_oracle_ndcg(key, y, query, 10))


def _requests(good: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """40 requests of 30 candidates; the ``good`` source ranks the positive first."""
    rng = np.random.default_rng(2)
    query = np.repeat(np.arange(40), 30)
    position = np.tile(np.arange(30), 40)
    y = (position == 7).astype(np.float64)
    rows = rng.normal(size=(len(query), len(NAMES))).astype(np.float32)
    for j in (1, 2, 3):
        rows[:, j] = np.tile(rng.permutation(30), 40)
    rows[:, NAMES.index(ranker_prior.SOURCE_BASELINES[good])] = np.where(
        position == 7, 0, position + 1
    )
    return rows, y, query, position


@pytest.mark.parametrize("good", ["popularity", "item_to_item"])
def test_auto_takes_the_baseline_that_ranks_the_training_requests_better(good: str) -> None:
    rows, y, query, position = _requests(good)
    choice = ranker_prior.choose("auto", NAMES, rows, y, query, position, 10)
    assert choice.baseline == good
    assert choice.feature == ranker_prior.SOURCE_BASELINES[good]
    assert choice.training_ndcg[good] == 1.0
    other = next(b for b in ranker_prior.GATE_BASELINES if b != good)
    assert choice.training_ndcg[other] < 0.6
    # Asked for by name, the other one is taken even though it ranks worse.
    assert ranker_prior.choose(other, NAMES, rows, y, query, position, 10).baseline == other


def test_no_prior_when_asked_or_without_source_columns() -> None:
    rows, y, query, position = _requests("popularity")
    assert ranker_prior.choose("none", NAMES, rows, y, query, position, 10).baseline is None
    bare = ["u_age", "x_tower_score"]
    choice = ranker_prior.choose("auto", bare, rows[:, [0, 4]], y, query, position, 10)
    assert choice.baseline is None and choice.training_ndcg == {}
    with pytest.raises(ValueError, match="must be one of"):
        ranker_prior.choose("ease", NAMES, rows, y, query, position, 10)
    with pytest.raises(ValueError, match="has no c_pop_rank"):
        ranker_prior.choose("popularity", bare, rows[:, [0, 4]], y, query, position, 10)


def test_boosted_ranker_saved_and_reloaded_starts_with_the_prior(tmp_path: Path) -> None:
    """lambdarank trees trained from the prior (``init_model``) are merged after its tree:
    the saved model's first iteration is the prior, and the whole model is prior + trees."""
    rows, y, query, _ = _requests("popularity")
    init = ranker_prior.prior_booster(NAMES, "c_pop_rank", num_threads=1)
    data = lgb.Dataset(rows, y, group=np.bincount(query), feature_name=NAMES)
    params = {"objective": "lambdarank", "num_leaves": 7, "min_data_in_leaf": 5, "verbosity": -1}
    booster = lgb.train(params, data, num_boost_round=5, init_model=init)
    path = tmp_path / "ranker.txt"
    booster.save_model(str(path), num_iteration=6)
    loaded = lgb.Booster(model_file=str(path))
    assert loaded.num_trees() == 6
    prior = ranker_prior.prior_value(rows[:, NAMES.index("c_pop_rank")])
    np.testing.assert_allclose(loaded.predict(rows, num_iteration=1), prior, atol=1e-6)
    trees = loaded.predict(rows, raw_score=True, start_iteration=1)
    np.testing.assert_allclose(loaded.predict(rows, raw_score=True), prior + trees, atol=1e-6)


def test_where_picks_the_requests_that_judge() -> None:
    """The training requests alone choose (the early-stopping holdout is left out)."""
    a, b = _requests("popularity"), _requests("item_to_item")
    rows, y, position = (np.concatenate([a[i], b[i]]) for i in (0, 1, 3))
    query = np.concatenate([a[2], b[2] + 40])
    for first, good in ((True, "popularity"), (False, "item_to_item")):
        where = (query < 40) == first
        got = ranker_prior.choose("auto", NAMES, rows, y, query, position, 10, where=where)
        assert got.baseline == good
        alone = ranker_prior.choose(
            "auto", NAMES, rows[where], y[where], query[where], position[where], 10
        )
        assert got == alone

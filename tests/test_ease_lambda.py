"""EASE's λ chosen on the validation window (exporters/ease_lambda.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from exporters import baselines, ease_lambda, metrics
from exporters.data_generate import PRESETS, RatingsPreset, build_ratings


@pytest.fixture(scope="module")
def split() -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
    """The sparse preset's ratings: each user's last rating is the validation label, the
    rest what the validation requests know (every rating a click)."""
    preset = PRESETS["sparse"]
    assert isinstance(preset, RatingsPreset)
    r = build_ratings(preset, 3).ratings.sort_values(["user_id", "timestamp"], kind="stable")
    last = r.groupby("user_id").cumcount(ascending=False) == 0
    known = r[~last].assign(event="click")
    labels = r[last][["user_id", "item_id"]].assign(label=1)
    return known, labels, np.sort(r["item_id"].unique())


def test_the_lambda_with_the_better_validation_ndcg_is_chosen(
    split: tuple[pd.DataFrame, pd.DataFrame, np.ndarray],
) -> None:
    known, labels, items = split
    # λ = 1 barely regularises EASE on ~900 users: it must lose to 250, and be seen to.
    choice = ease_lambda.choose(known, labels, items, ["click"], 77.0, grid=(1.0, 250.0))
    assert choice.how == "validation"
    assert choice.lam == 250.0
    assert choice.validation_ndcg["1"] < choice.validation_ndcg["250"]
    assert choice.users == labels["user_id"].nunique()
    # The recorded NDCG is the report's metric on EASE's unseen top 10.
    X, row_users = baselines.interaction_matrix(known, items, events=["click"])
    top = baselines.top_k_unseen(
        baselines.score_users(X, baselines.ease_weights(X, lam=250.0)), X, 10
    )
    truth = labels.set_index("user_id")["item_id"]
    relevant = [{int(truth[u]): 1.0} for u in row_users]
    expected = metrics.ndcg_at_k(np.where(top >= 0, items[np.maximum(top, 0)], -1), relevant, 10)
    assert choice.validation_ndcg["250"] == pytest.approx(expected, abs=1e-5)
    # A sample of the users, seeded: the same choice twice.
    again = ease_lambda.choose(known, labels, items, ["click"], 77.0, (1.0, 250.0), max_users=300)
    assert again.users == 300
    assert again == ease_lambda.choose(
        known, labels, items, ["click"], 77.0, (1.0, 250.0), max_users=300
    )


def test_the_default_is_kept_where_no_choice_can_be_made(
    split: tuple[pd.DataFrame, pd.DataFrame, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    known, labels, items = split
    strangers = labels.assign(user_id=labels["user_id"] + 10**9)  # nobody known
    choice = ease_lambda.choose(known, strangers, items, ["click"], 77.0)
    assert (choice.lam, choice.users) == (77.0, 0)
    assert "no validation user" in choice.how
    monkeypatch.setattr(ease_lambda, "TUNE_MAX_ITEMS", len(items) - 1)
    big = ease_lambda.choose(known, labels, items, ["click"], 77.0)
    assert big.lam == 77.0 and "items >" in big.how and big.validation_ndcg == {}

"""The synthetic marketplace: determinism and the structure the models are meant to learn."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from exporters.data_generate import END, PRESETS, generate
from exporters.raw_tables import read_meta, read_raw
from exporters.schema import EVENTS, TABLES
from recstack.errors import UserError
from recstack.settings import Settings


@pytest.fixture(scope="module")
def raw(small_settings: Settings):
    return read_raw(small_settings)


def test_same_seed_gives_identical_tables(small_settings: Settings, settings: Settings) -> None:
    generate(settings, preset="small", seed=7)  # the session fixture used seed 7 too
    a, b = read_raw(small_settings), read_raw(settings)
    for name in TABLES:
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    assert read_meta(settings)["snapshot"] == read_meta(small_settings)["snapshot"]


def test_different_seed_gives_different_tables(
    small_settings: Settings, settings: Settings
) -> None:
    generate(settings, preset="small", seed=8)
    assert read_meta(settings)["snapshot"] != read_meta(small_settings)["snapshot"]
    assert not read_raw(settings).interactions.equals(read_raw(small_settings).interactions)


def test_tables_match_schema_and_meta(small_settings: Settings, raw) -> None:
    meta = read_meta(small_settings)
    preset = PRESETS["small"]
    assert meta["n_users"] == len(raw.users) == preset.n_users
    assert meta["n_items"] == len(raw.items) == preset.n_items
    assert meta["n_categories"] == raw.items["category"].max() + 1 == preset.n_categories
    assert meta["n_interactions"] == len(raw.interactions)
    assert pd.Timestamp(meta["end"]) == END
    assert pd.Timestamp(meta["start"]) == END - pd.Timedelta(days=preset.days)
    assert 40_000 <= len(raw.interactions) <= 60_000
    for name, schema in TABLES.items():
        assert list(getattr(raw, name).columns) == schema.names
    ts = raw.interactions["timestamp"]
    assert ts.is_monotonic_increasing
    assert ts.min() >= pd.Timestamp(meta["start"]) and ts.max() < END
    assert set(raw.interactions["event"]) == set(EVENTS)


def test_popularity_and_activity_are_heavy_tailed(raw) -> None:
    per_item = raw.interactions["item_id"].value_counts()
    top = per_item.iloc[: max(1, len(raw.items) // 100)].sum()
    assert top / per_item.sum() > 0.12  # top 1% of items; uniform would be 1%
    per_user = raw.interactions["user_id"].value_counts()
    assert per_user.iloc[: len(raw.users) // 10].sum() / per_user.sum() > 0.35


def test_cold_start_items_and_users_exist_and_act_late(small_settings: Settings, raw) -> None:
    start = pd.Timestamp(read_meta(small_settings)["start"])
    new_items = raw.items.loc[raw.items["created_at"] > start, "item_id"]
    new_users = raw.users.loc[raw.users["signup_at"] > start, "user_id"]
    assert 0.05 < len(new_items) / len(raw.items) < 0.3
    assert 0.05 < len(new_users) / len(raw.users) < 0.3
    inter = raw.interactions
    assert inter["item_id"].isin(new_items).sum() > 100
    assert inter["user_id"].isin(new_users).sum() > 100


def test_nobody_acts_before_signup_or_item_creation(raw) -> None:
    inter = raw.interactions
    # Generated ids are 0..n-1, so a table's column indexed by id is a lookup.
    assert (raw.items["item_id"] == np.arange(len(raw.items))).all()
    assert (raw.users["user_id"] == np.arange(len(raw.users))).all()
    ts = inter["timestamp"].to_numpy()
    assert (ts >= raw.items["created_at"].to_numpy()[inter["item_id"]]).all()
    assert (ts >= raw.users["signup_at"].to_numpy()[inter["user_id"]]).all()


def test_funnel_view_click_purchase(raw) -> None:
    inter = raw.interactions
    counts = inter["event"].value_counts()
    assert counts["view"] > 2 * counts["click"] > 0
    assert counts["click"] > 2 * counts["purchase"] > 0
    pairs = {
        e: set(zip(g["user_id"], g["item_id"], strict=True)) for e, g in inter.groupby("event")
    }
    assert pairs["click"] <= pairs["view"]
    assert pairs["purchase"] <= pairs["click"]
    buys = inter[inter["event"] == "purchase"]
    assert buys.duplicated(["user_id", "item_id"]).mean() < 0.1  # repeats are rare


def test_tastes_are_personal(small_settings: Settings, raw) -> None:
    """A user's own past categories predict their later clicks far better than the
    globally popular categories: the signal a personalised model must find."""
    inter = raw.interactions.merge(raw.items[["item_id", "category"]], on="item_id")
    pos = inter[inter["event"] != "view"]
    cut = pos["timestamp"].quantile(0.8)
    past, future = pos[pos["timestamp"] < cut], pos[pos["timestamp"] >= cut]
    top_global = set(past["category"].value_counts().index[:3])
    top_user = past.groupby("user_id")["category"].agg(lambda c: set(c.value_counts().index[:3]))
    future = future[future["user_id"].isin(top_user.index)]
    personal = np.mean(
        [c in top_user[u] for u, c in zip(future["user_id"], future["category"], strict=True)]
    )
    popular = future["category"].isin(top_global).mean()
    assert personal > 0.5
    assert personal > 3 * popular


def test_demographics_lean_towards_tastes(raw) -> None:
    # Users' age bucket is not independent of what they buy.
    inter = raw.interactions[raw.interactions["event"] != "view"]
    df = inter.merge(raw.items[["item_id", "category"]]).merge(raw.users[["user_id", "age_bucket"]])
    table = pd.crosstab(df["category"], df["age_bucket"]).to_numpy().astype(float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    chi2 = ((table - expected) ** 2 / np.maximum(expected, 1e-9)).sum()
    dof = (table.shape[0] - 1) * (table.shape[1] - 1)
    assert chi2 > 3 * dof


def test_unknown_preset_is_a_user_error(settings: Settings) -> None:
    with pytest.raises(UserError, match="unknown preset"):
        generate(settings, preset="huge")
    assert not settings.raw_dir.exists()

"""Feature tables on the hand-made timeline (no Feast): values, timestamps, no leakage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from _features_fixtures import N_CATEGORIES, timeline, timeline_settings, ts

from exporters import feature_tables
from exporters.feature_tables import BASELINE_TS, UNRANKED, decode_vector


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pd.DataFrame]:
    s = timeline_settings(tmp_path_factory.mktemp("tables"))
    feature_tables.build(s)
    out = {
        name: pq.read_table(feature_tables.table_path(s, name)).to_pandas()
        for name in feature_tables.TABLE_FILES
    }
    leftovers = [p.name for p in Path(s.features_dir).iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temp files
    return out


def _row(df: pd.DataFrame, key: str, ent: int, when: str) -> pd.Series:
    rows = df[(df[key] == ent) & (df["event_timestamp"] == ts(when))]
    assert len(rows) == 1, f"no single row for {key}={ent} at {when}: {df[df[key] == ent]}"
    return rows.iloc[0]


def test_user_activity_rows_on_change_days_at_midnight(tables: dict[str, pd.DataFrame]) -> None:
    ua = tables["user_activity"]
    got = sorted(ua[ua.user_id == 1]["event_timestamp"].dt.strftime("%Y-%m-%d"))
    assert got[0] == "1970-01-02"  # the baseline row (defaults)
    got = [g[5:] for g in got[1:]]
    # event days 03-01, 03-03, 03-20; window exits 03-08, 03-10 (7d); 30d exits and the
    # 7d exit of 03-20 fall after the last day of data (03-20) and are not written.
    assert got == ["03-02", "03-04", "03-09", "03-11", "03-21"]


def test_user_activity_counts_only_events_before_the_row(
    tables: dict[str, pd.DataFrame],
) -> None:
    ua = tables["user_activity"]
    r = _row(ua, "user_id", 1, "03-02")
    assert (r.user_views_7d, r.user_clicks_7d, r.user_purchases_7d) == (1, 1, 0)
    assert r.user_last_event_at == ts("03-01 10:00").timestamp()
    assert r.user_mean_purchase_price == 0.0
    r = _row(ua, "user_id", 1, "03-04")
    assert (r.user_clicks_7d, r.user_purchases_7d, r.user_mean_purchase_price) == (1, 1, 30.0)
    r = _row(ua, "user_id", 1, "03-09")  # the 03-01 events left the 7-day window
    assert (r.user_views_7d, r.user_clicks_7d, r.user_purchases_7d) == (0, 0, 1)
    assert (r.user_views_30d, r.user_clicks_30d, r.user_purchases_30d) == (1, 1, 1)
    r = _row(ua, "user_id", 1, "03-21")
    assert (r.user_clicks_7d, r.user_clicks_30d, r.user_purchases_7d) == (1, 2, 0)


def test_category_affinity_is_a_decayed_distribution(tables: dict[str, pd.DataFrame]) -> None:
    ua = tables["user_activity"]
    first = decode_vector(_row(ua, "user_id", 1, "03-02").user_category_affinity)
    assert first.shape == (N_CATEGORIES,) and first.dtype == np.float32
    # view of category 0 (weight 1) and click of category 1 (weight 3), same day
    np.testing.assert_allclose(first, [0.25, 0.75, 0.0], rtol=1e-6)
    later = decode_vector(_row(ua, "user_id", 1, "03-04").user_category_affinity)
    assert later.sum() == pytest.approx(1.0, abs=1e-6)
    assert later[2] > later[1] > later[0] > 0  # the newer purchase weighs most


def test_item_statistics_and_popularity(tables: dict[str, pd.DataFrame]) -> None:
    st = tables["item_statistics"]
    r = _row(st, "item_id", 11, "03-03")
    assert (r.item_views_7d, r.item_clicks_7d, r.item_clicks_30d) == (1, 2, 2)
    assert r.item_ctr_30d == pytest.approx(2.0)
    assert r.item_popularity_rank == 1  # 3 events in 7 days: more than items 10 and 12
    r10 = _row(st, "item_id", 10, "03-02")
    assert r10.item_popularity_rank == 1  # on 03-01 items 10 and 11 tie with one event
    assert 13 not in set(st.item_id)  # no events, no rows: readers use the defaults


def test_profiles_and_recent_items(tables: dict[str, pd.DataFrame]) -> None:
    ip = tables["item_profile"]
    ip = ip[ip.event_timestamp > BASELINE_TS].set_index("item_id")
    assert ip.loc[13, "event_timestamp"] == ts("03-05")
    assert ip.loc[13, "created_at"] == ts("03-05").timestamp()
    up = tables["user_profile"]
    up = up[up.event_timestamp > BASELINE_TS].set_index("user_id")
    assert (up.loc[2, "age_bucket"], up.loc[2, "country"]) == (4, 3)
    ri = tables["user_recent_items"]
    u1 = ri[ri.user_id == 1].sort_values("event_timestamp")
    assert [list(x) for x in u1.recent_items] == [[], [11], [12, 11], [10, 12, 11]]


def test_every_entity_has_a_baseline_row_of_defaults(tables: dict[str, pd.DataFrame]) -> None:
    for name, key in [
        ("user_activity", "user_id"),
        ("item_statistics", "item_id"),
        ("item_profile", "item_id"),
        ("user_profile", "user_id"),
    ]:
        df = tables[name]
        base = df[df.event_timestamp == BASELINE_TS]
        assert sorted(base[key]) == sorted(set(df[key])), name
    ua = tables["user_activity"]
    b = ua[(ua.event_timestamp == BASELINE_TS)].iloc[0]
    assert decode_vector(b.user_category_affinity).tolist() == [0.0] * N_CATEGORIES
    assert b.user_views_7d == 0 and b.user_mean_purchase_price == 0.0
    ip = tables["item_profile"]
    b = ip[ip.event_timestamp == BASELINE_TS].iloc[0]
    assert (b.category, b.brand, b.price) == (-1, -1, 0.0)
    st = tables["item_statistics"]
    assert (st[st.event_timestamp == BASELINE_TS].item_popularity_rank == UNRANKED).all()


def test_empty_interactions_write_empty_tables(tmp_path: Path) -> None:
    t = timeline()
    assert feature_tables.user_activity_table(t.interactions.iloc[:0], t.items, 3).num_rows == 0
    assert feature_tables.item_statistics_table(t.interactions.iloc[:0]).num_rows == 0


def test_hashed_string_key_ids_get_the_same_rows() -> None:
    """Ids of string keys are 63-bit hashes: the windowed tables must hold the same rows
    for them as for small ids (a key of id × days overflowed int64 and moved 99 % of the
    rows to wrong ids)."""
    from exporters.data_generate import PRESETS, build
    from recstack.ids import key_hash

    tables, *_ = build(PRESETS["small"], 5)
    inter, items = tables.interactions, tables.items
    uh = {int(u): key_hash(f"user-{u}") for u in tables.users["user_id"]}
    ih = {int(i): key_hash(f"SKU-{i}") for i in items["item_id"]}
    hashed = inter.assign(user_id=inter["user_id"].map(uh), item_id=inter["item_id"].map(ih))
    hashed_items = items.assign(item_id=items["item_id"].map(ih))
    n_cat = int(items["category"].max()) + 1
    for table, key, ids, args in (
        (feature_tables.user_activity_table, "user_id", uh, (n_cat,)),
        (feature_tables.item_statistics_table, "item_id", ih, ()),
    ):
        small = (table(inter, items, *args) if args else table(inter)).to_pandas()
        big = (table(hashed, hashed_items, *args) if args else table(hashed)).to_pandas()
        small[key] = small[key].map(ids)
        cols = [c for c in small.columns if c != "user_category_affinity"]
        order = [key, "event_timestamp"]
        pd.testing.assert_frame_equal(
            small[cols].sort_values(order, ignore_index=True),
            big[cols].sort_values(order, ignore_index=True),
        )

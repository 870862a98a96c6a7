"""``feast_ops.as_of_features`` against Feast's own point-in-time join
(``get_historical_features`` of the file offline store) on the trained `small` release's
feature tables: every view, entity rows at, just before and just after the tables' row
times, at random times, before any row, and for ids that have no row; and a view with a
TTL (recstack's have none), built with Feast's classes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from exporters import feast_ops
from recstack.settings import Settings

pytestmark = pytest.mark.slow

ROW = "__row"


def _feast_join(
    store: object, key: str, ids: np.ndarray, times: pd.DatetimeIndex, refs: list[str]
) -> pd.DataFrame:
    """Feast's own join, one row per input row (Feast drops rows with no value)."""
    entity_df = pd.DataFrame({key: ids, "event_timestamp": times, ROW: np.arange(len(ids))})
    with feast_ops.identity_dask_tokens():
        df = store.get_historical_features(entity_df=entity_df, features=refs).to_df()  # type: ignore[attr-defined]
    names = [r.split(":", 1)[1] for r in refs]
    df = df.drop_duplicates(ROW).set_index(ROW).reindex(np.arange(len(ids)))
    df[key] = ids
    return df[[key, *names]].reset_index(drop=True)


def _same(x: object, y: object) -> bool:
    if isinstance(x, list | np.ndarray) or isinstance(y, list | np.ndarray):
        return x is not None and y is not None and np.array_equal(np.asarray(x), np.asarray(y))
    return bool((pd.isna(x) and pd.isna(y)) or x == y)  # type: ignore[arg-type]


def test_as_of_join_equals_feasts_point_in_time_join(trained_settings: Settings) -> None:
    store = feast_ops.feature_store(trained_settings)
    rng = np.random.default_rng(5)
    views = store.list_feature_views()
    assert {v.name for v in views} >= {"user_activity", "item_statistics", "user_recent_items"}
    for view in views:
        key = view.entity_columns[0].name
        refs = [f"{view.name}:{f.name}" for f in view.features]
        path, ts = feast_ops.batch_table(store, view)
        table = pd.read_parquet(path)
        table[ts] = pd.to_datetime(table[ts], utc=True)
        rows = table.sample(min(400, len(table)), random_state=1)
        at_rows = pd.DatetimeIndex(rows[ts]) + pd.to_timedelta(
            rng.choice([-1, 0, 1], len(rows)), unit="us"
        )
        lo, hi = table[ts].min().value, table[ts].max().value
        n_rand = 400
        ids = np.concatenate(
            [
                rows[key].to_numpy(),
                rng.choice(table[key].unique(), n_rand),
                [-5, 10**12],  # no row at all
            ]
        ).astype(np.int64)
        times = at_rows.append(
            pd.DatetimeIndex(pd.to_datetime(rng.integers(lo - 10**15, hi, n_rand + 2), utc=True))
        )
        # Feast keeps one row per (key, time) however many entity rows ask for it.
        keep = ~pd.DataFrame({"k": ids, "t": times}).duplicated().to_numpy()
        ids, times = ids[keep], times[keep]

        ours = feast_ops.as_of_features(store, key, ids, times, refs)
        feast = _feast_join(store, key, ids, times, refs)
        assert list(ours.columns) == list(feast.columns)
        # Where several table rows share the chosen time (two events in one second), Feast's
        # dask sort picks any of them; ours is the last in the table's order, as
        # materialisation (write_latest) puts into the online store.
        ties = table[table.duplicated([key, ts], keep=False)]
        tied = pd.MultiIndex.from_frame(ties[[key, ts]])
        for i in range(len(ids)):
            hist = table[(table[key] == ids[i]) & (table[ts] <= times[i])]
            chosen = hist[ts].max() if len(hist) else None
            if chosen is not None and (ids[i], chosen) in tied:
                last = hist[hist[ts] == chosen].iloc[-1]
                assert all(_same(ours.at[i, f], last[f]) for f in ours.columns[1:]), (view.name, i)
                continue
            diff = [f for f in ours.columns if not _same(ours.at[i, f], feast.at[i, f])]
            assert not diff, (view.name, ids[i], times[i], diff, ours.iloc[i], feast.iloc[i])
        assert ours.iloc[:, 1].isna().any() and ours.iloc[:, 1].notna().any(), view.name


def test_a_views_ttl_bounds_the_age_of_the_row_it_takes(tmp_path: Path) -> None:
    """No view of recstack has a TTL; Feast's rule for one (keep a row when
    ``t - ttl <= row time <= t``) on a view built here with Feast's own classes."""
    from datetime import timedelta
    from types import SimpleNamespace

    from feast import Entity, FeatureView, Field, FileSource
    from feast.types import Int64

    t0 = pd.Timestamp("2026-03-01", tz="UTC")
    table = pd.DataFrame(
        {
            "user_id": [1, 1, 2],
            "event_timestamp": [t0, t0 + pd.Timedelta(hours=2), t0],
            "v": [10, 20, 30],
        }
    )
    path = tmp_path / "v.parquet"
    table.to_parquet(path)
    view = FeatureView(
        name="v_view",
        entities=[Entity(name="user", join_keys=["user_id"])],
        ttl=timedelta(hours=1),
        schema=[Field(name="user_id", dtype=Int64), Field(name="v", dtype=Int64)],
        source=FileSource(path=str(path), timestamp_field="event_timestamp"),
    )
    store = SimpleNamespace(
        get_feature_view=lambda name, allow_registry_cache=True: view,
        config=SimpleNamespace(repo_path=None),
    )
    hour = pd.Timedelta(hours=1)
    asks = [
        (1, t0 - pd.Timedelta(seconds=1)),  # before any row
        (1, t0 + hour),  # exactly the TTL old: kept
        (1, t0 + hour + pd.Timedelta(microseconds=1)),  # older than the TTL
        (1, t0 + 2 * hour),  # the newer row
        (2, t0 + 3 * hour),  # its only row expired
    ]
    got = feast_ops.as_of_features(
        store,  # type: ignore[arg-type]
        "user_id",
        np.array([a[0] for a in asks]),
        pd.DatetimeIndex([a[1] for a in asks]),
        ["v_view:v"],
    )
    assert got["v"].tolist()[1::2] == [10.0, 20.0]
    assert got["v"].isna().tolist() == [True, False, True, False, True]

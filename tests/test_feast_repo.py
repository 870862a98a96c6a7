"""Feast on the hand-made timeline, against SQLite and Redis: point-in-time training rows,
online lookups (SDK and fast path), real-time push, defaults, failures."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _features_fixtures import (  # noqa: F401 - fixtures
    N_CATEGORIES,
    FeastEnv,
    feast_env,
    free_port,
    redis_server,
    timeline_settings,
    ts,
)

from exporters import feast_ops, feature_tables
from exporters.feature_tables import UNRANKED
from exporters.history import PAD
from orchestrator.online_features import (
    EntityRowReader,
    FeatureStoreUnavailable,
    OnlineFeatures,
    push_event,
)
from orchestrator.processes import read_pid
from orchestrator.redis_server import process_name
from recstack.errors import UserError
from recstack.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def online(feast_env: FeastEnv) -> OnlineFeatures:  # noqa: F811
    return OnlineFeatures(feast_env.settings).load()


def test_ranking_rows_are_point_in_time(feast_env: FeastEnv) -> None:  # noqa: F811
    when = ["03-01 12:00", "03-02 00:00", "03-04 12:00", "03-09 12:00", "03-09 12:00"]
    entity_df = pd.DataFrame(
        {
            "user_id": [1, 1, 1, 1, 1],
            "item_id": [11, 11, 13, 13, 10],
            "event_timestamp": [ts(w) for w in when],
        }
    )
    df = feast_ops.historical_features(feast_env.settings, entity_df, "ranking")
    # entity_df's rows in its order, even two items for one user at one time
    assert (
        df[["user_id", "item_id"]].values.tolist()
        == entity_df[["user_id", "item_id"]].values.tolist()
    )
    assert df["category"].tolist()[-1] == 0
    df = df.iloc[:4]
    # The click at 03-01 10:00 is in the daily row published at midnight, not before.
    assert df["user_clicks_7d"].tolist() == [0, 1, 1, 0]
    assert df["user_last_event_at"][1] == ts("03-01 10:00").timestamp()
    assert df["user_purchases_7d"].tolist() == [0, 0, 1, 1]
    assert df["item_clicks_7d"].tolist()[:2] == [0, 1]
    # Item 13 is created on 03-05: unknown (default) before, its profile after.
    assert df["category"].tolist()[2:] == [-1, 1]
    assert df["item_popularity_rank"].tolist()[2:] == [UNRANKED, UNRANKED]
    assert df["user_category_affinity"][0].tolist() == [0.0] * N_CATEGORIES
    np.testing.assert_allclose(df["user_category_affinity"][1], [0.25, 0.75, 0.0], rtol=1e-6)


def test_recent_items_are_point_in_time(feast_env: FeastEnv) -> None:  # noqa: F811
    when = ["03-01 09:30", "03-01 10:00", "03-04 00:00", "03-20 09:00"]
    entity_df = pd.DataFrame({"user_id": [1] * 4, "event_timestamp": [ts(w) for w in when]})
    df = feast_ops.historical_features(feast_env.settings, entity_df, "retrieval")
    got = df["recent_items"].tolist()
    assert [list(x) for x in got] == [[], [11], [12, 11], [10, 12, 11]]


def test_online_user_lookup(online: OnlineFeatures) -> None:
    u = online.user(1)
    assert u.known and (u.age_bucket, u.country) == (2, 7)
    assert u.recent_items.tolist() == [10, 12, 11] + [PAD] * 17
    assert u.scalar("user_clicks_7d") == 1 and u.scalar("user_mean_purchase_price") == 30.0
    assert u.category_affinity.shape == (N_CATEGORIES,)
    assert u.category_affinity.sum() == pytest.approx(1.0, abs=1e-6)


def test_unknown_ids_get_defaults(online: OnlineFeatures) -> None:
    u = online.user(424242)
    assert not u.known and (u.age_bucket, u.country) == (-1, -1)
    assert (u.recent_items == PAD).all() and (u.scalars == 0).all()
    assert u.category_affinity.tolist() == [0.0] * N_CATEGORIES
    it = online.items(np.array([999, 10]))
    assert it.known.tolist() == [False, True]
    assert it.category.tolist() == [-1, 0]
    names = list(online.item_feature_names)
    expected = [feature_tables.default_value(n) for n in names]
    assert it.matrix[0].tolist() == expected
    assert expected[names.index("item_popularity_rank")] == UNRANKED


def test_fast_path_equals_sdk(online: OnlineFeatures) -> None:
    ids = np.array([12, 10, 11, 13, 999], dtype=np.int64)
    fast, sdk = online.items(ids), online.items_sdk(ids)
    assert fast.names == sdk.names == online.item_feature_names
    np.testing.assert_array_equal(fast.matrix, sdk.matrix)
    np.testing.assert_array_equal(fast.category, sdk.category)
    np.testing.assert_array_equal(fast.created_at, sdk.created_at)
    np.testing.assert_array_equal(fast.known, sdk.known)
    assert fast.created_at[3] == ts("03-05").timestamp()
    assert fast.matrix.dtype == np.float32 and fast.matrix.shape == (5, len(fast.names))


def test_user_row_reader_equals_sdk(online: OnlineFeatures) -> None:
    refs = online._user_refs
    reader = EntityRowReader(online.store, "user_id", refs)
    for user in (1, 2, 424242):
        sdk = online.store.get_online_features(features=refs, entity_rows=[{"user_id": user}])
        want = {k: v[0] for k, v in sdk.to_dict().items() if k != "user_id"}
        got = reader.read(user)
        assert got.keys() == want.keys()
        for name, value in want.items():
            if isinstance(value, list):
                assert list(got[name]) == pytest.approx(value), name
            else:
                assert got[name] == value, name
    assert reader.read(1)["recent_items"] == [10, 12, 11]
    assert all(v is None for v in reader.read(424242).values())


def test_one_read_equals_the_per_view_reads(online: OnlineFeatures) -> None:
    """On SQLite and Redis a user read is one store call for every view (one statement,
    one HMGET); it returns what one provider read per view returns (values and the newest
    row time), for known and unknown users."""
    refs = online._user_refs
    fast = EntityRowReader(online.store, "user_id", refs)
    plain = EntityRowReader(online.store, "user_id", refs, one_read=False)
    assert fast.one_read and not plain.one_read
    for user in (1, 2, 3, 424242):
        assert fast.read_row(user) == plain.read_row(user), user
    stamp, values = fast.read_row(1)
    assert stamp is not None and stamp.tzinfo is not None and values["recent_items"]
    assert fast.read_row(424242)[1] == dict.fromkeys(values)  # no row: every value None


def test_push_is_visible_within_a_second(online: OnlineFeatures) -> None:
    assert online.user(2).recent_items[:2].tolist() == [11, PAD]
    assert online.push_event(2, 12, "view") is None  # views do not change recent items
    with pytest.raises(ValueError, match="unknown event"):
        online.push_event(2, 12, "like")
    t0 = time.monotonic()
    assert online.push_event(2, 13, "click", datetime.now(UTC)) == [13, 11]
    while online.user(2).recent_items[0] != 13:
        assert time.monotonic() - t0 < 1.0, "pushed event not visible within 1 s"
        time.sleep(0.01)
    assert time.monotonic() - t0 < 1.0
    # The module-level function (as the orchestrator's RecordEvent may call it) agrees.
    push_event(online.settings, 2, 11, "purchase")
    assert online.user(2).recent_items[:3].tolist() == [11, 13, PAD]


def test_refresh_reloads_only_after_materialization(
    feast_env: FeastEnv,  # noqa: F811
    online: OnlineFeatures,
) -> None:
    assert online.refresh() is False
    feast_ops.materialize(feast_env.settings, incremental=True)
    assert online.refresh() is True
    assert online.items(np.array([11])).known.tolist() == [True]


def _down_settings(env: FeastEnv, tmp: Path):  # type: ignore[no-untyped-def]
    s = env.settings
    if env.store_kind == "redis":
        return s.model_copy(update={"redis_port": free_port()})
    # SQLite "down": the registry is fine, the online database file is not a database.
    data = tmp / "data"
    shutil.copytree(s.data_dir / "feast", data / "feast")
    (data / "feast" / "sqlite" / "online_store.db").write_bytes(b"not a database" * 100)
    return s.model_copy(update={"data_dir": data})


def test_store_down_gives_typed_error_quickly(feast_env: FeastEnv, tmp_path: Path) -> None:  # noqa: F811
    of = OnlineFeatures(_down_settings(feast_env, tmp_path)).load()
    t0 = time.monotonic()
    with pytest.raises(FeatureStoreUnavailable, match=feast_env.store_kind):
        of.user(1)
    assert time.monotonic() - t0 < 1.5
    with pytest.raises(FeatureStoreUnavailable):
        of.push_event(1, 10, "click")
    assert of.items(np.array([10])).known.tolist() == [True]  # the snapshot still serves


def test_broken_definition_fails_apply_and_changes_nothing(tmp_path: Path) -> None:
    s = timeline_settings(tmp_path)
    feature_tables.build(s)
    feast_ops.apply(s)
    registry = feast_ops.registry_path(s)
    before = hashlib.sha256(registry.read_bytes()).hexdigest()
    defs = s.feature_repo / "definitions.py"
    defs.write_text(
        defs.read_text()
        + "\nuser_profile_again = FeatureView(name='user_profile', entities=[user],"
        " schema=[Field(name='age_bucket', dtype=Int64)], source=user_profile_source)\n"
    )
    with pytest.raises(UserError, match="ConflictingFeatureViewNames: Multiple FeatureViews"):
        feast_ops.apply(s)
    assert hashlib.sha256(registry.read_bytes()).hexdigest() == before
    assert [p.name for p in registry.parent.iterdir() if p.name.startswith(".")] == []


@pytest.mark.redis
def test_hung_redis_times_out_then_recovers(
    feast_env: FeastEnv,  # noqa: F811
    online: OnlineFeatures,
    redis_server: Settings,  # noqa: F811
) -> None:
    if feast_env.store_kind != "redis":
        pytest.skip("Redis only: SQLite has no server to hang")
    pid = read_pid(redis_server, process_name(redis_server))
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)  # the server accepts nothing and answers nothing
    try:
        t0 = time.monotonic()
        with pytest.raises(FeatureStoreUnavailable, match="redis"):
            online.user(1)
        assert time.monotonic() - t0 < 2.0  # 0.5 s socket timeout, one retry
    finally:
        os.kill(pid, signal.SIGCONT)
    assert online.user(1).known

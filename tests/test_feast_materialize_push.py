"""A materialisation must not undo what RecordEvent pushed since the feature tables were
built: the pushed recent/seen items are newer than every batch row, so they stay (SQLite
upserts unconditionally; recstack skips batch rows older than what the store holds, as
Feast's Redis store does itself). A batch row newer than the stored one still wins."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from _features_fixtures import FeastEnv, own_redis_server, timeline, timeline_settings, ts
from conftest import port

from exporters import feast_ops, feature_tables
from exporters.history import PAD
from exporters.raw_tables import RawTables, write_raw
from orchestrator.online_features import OnlineFeatures
from recstack.settings import Settings

pytestmark = pytest.mark.integration

# A redis-server of this module's own: the session one of _features_fixtures belongs to
# test_feast_repo.py (a fixture imported into two modules is two fixtures, two servers).
REDIS_PORT = port(6392)


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with own_redis_server(tmp_path_factory.mktemp("redis_push"), REDIS_PORT) as s:
        yield s


def build_env(base: Path, store: str) -> FeastEnv:
    """_features_fixtures.build_env, on this module's Redis port."""
    s = timeline_settings(base, store).model_copy(update={"redis_port": REDIS_PORT})
    feature_tables.build(s)
    feast_ops.apply(s)
    feast_ops.materialize(s)
    return FeastEnv(s, store)


@pytest.mark.parametrize("store", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_materialize_keeps_newer_pushed_rows(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if store == "redis":
        request.getfixturevalue("own_redis")
    env = build_env(tmp_path, store)
    online = OnlineFeatures(env.settings).load()
    assert online.user(2).recent_items[:2].tolist() == [11, PAD]
    online.push_event(2, 13, "purchase", datetime.now(UTC))
    assert online.user(2).recent_items[:3].tolist() == [13, 11, PAD]
    assert 13 in online.user(2).seen_items.tolist()

    # A second apart (the store keeps times to the second): a push that one
    # materialisation kept must stay kept by the next, whenever it ran. Keeping only
    # pushes "since the previous materialisation" lost it here (the old flake).
    time.sleep(1.1)
    feast_ops.materialize(env.settings)  # full
    assert online.user(2).recent_items[:3].tolist() == [13, 11, PAD]
    assert 13 in online.user(2).seen_items.tolist()
    feast_ops.materialize(env.settings, incremental=True)
    assert online.user(2).recent_items[:3].tolist() == [13, 11, PAD]

    # A late event (older than the batch's newest) is stored on both stores (its row is
    # stamped just after the stored one, so Redis does not skip it) ...
    online.push_event(1, 13, "click", datetime(2026, 3, 1, tzinfo=UTC))
    assert online.user(1).recent_items[0] == 13
    # ... and the next full materialisation: Redis keeps it (its row is newer than the
    # batch's, and Feast's Redis store skips older rows); on SQLite the row dates from
    # before the last materialisation, so the batch replaces it (a documented limit,
    # docs/events.md: a late event reaches the lists again with the next import).
    feast_ops.materialize(env.settings)
    expected = [13, 10, 12] if store == "redis" else [10, 12, 11]
    assert online.user(1).recent_items[:3].tolist() == expected


def test_a_replaced_older_data_set_still_replaces_the_lists(tmp_path: Path) -> None:
    """Rows newer than the batch but written by an earlier materialisation (another data
    set) are not pushes: the new data's lists replace them (SQLite)."""
    env = build_env(tmp_path, "sqlite")
    online = OnlineFeatures(env.settings).load()
    assert online.user(1).recent_items[:3].tolist() == [10, 12, 11]
    # A year earlier, and user 1 only ever clicked item 11.
    year = pd.Timedelta(days=365)
    t = timeline()
    older = RawTables(
        interactions=pd.DataFrame(
            {
                "user_id": [1, 2],
                "item_id": [11, 11],
                "timestamp": [ts("03-02 15:00") - year, ts("03-02 15:05") - year],
                "event": ["click", "click"],
            }
        ),
        items=t.items.assign(created_at=t.items["created_at"] - year),
        users=t.users.assign(signup_at=t.users["signup_at"] - year),
    )
    write_raw(env.settings, older, source="test:older")
    feature_tables.build(env.settings)
    feast_ops.materialize(env.settings)
    assert online.user(1).recent_items[:2].tolist() == [11, PAD]

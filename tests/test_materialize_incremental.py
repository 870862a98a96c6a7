"""Incremental materialisation (exporters/materialize_state.py, ``feast_ops.materialize(
incremental=True)``): after events are appended and the feature tables rebuilt, only the
entities with rows in the changed window are written to the online store, and the store
then equals what a full materialisation gives. Anything but an append falls back to a
full one.

Writes are counted in the SQLite online store itself: every stored row is marked first
(``created_ts``, which Feast's upsert sets to NULL), so a marked row was not written. On
Redis, Feast writes each row with one ``HSET``, so the server's own command statistics
count the rows written."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from _features_fixtures import (
    online_frames,
    own_redis_server,
    timeline,
    timeline_settings,
    ts,
)
from _raw_days_fixtures import log_events, split_for_append
from conftest import make_settings, port

from exporters import feast_ops, feature_tables
from exporters.event_import import import_events
from exporters.raw_tables import (
    COMPUTED_META,
    RawTables,
    append_interactions,
    read_meta,
    read_raw,
    write_raw,
)
from orchestrator.request import EventQuery
from recstack.settings import PROJECT_ROOT, Settings

MARK = "before"
# A redis-server of this module's own (a session fixture imported into two modules is two
# servers: each module that needs one takes its own port).
REDIS_PORT = port(6393)


def _db(s: Settings) -> sqlite3.Connection:
    return sqlite3.connect(s.data_dir / "feast" / "sqlite" / "online_store.db")


def _views(con: sqlite3.Connection) -> list[str]:
    rows = con.execute("select name from sqlite_master where type = 'table'").fetchall()
    return sorted(r[0].removeprefix("recstack_") for r in rows)


def _mark_stored(s: Settings) -> None:
    with _db(s) as con:
        for view in _views(con):
            con.execute(f"update recstack_{view} set created_ts = ?", (MARK,))


def _written(s: Settings) -> dict[str, set[int]]:
    """Per view, the ids of the entities written since :func:`_mark_stored`."""
    from feast.infra.key_encoding_utils import deserialize_entity_key

    out = {}
    with _db(s) as con:
        for view in _views(con):
            blobs = con.execute(
                f"select distinct entity_key from recstack_{view} where created_ts is null"
            ).fetchall()
            keys = [deserialize_entity_key(b[0], 3) for b in blobs]
            out[view] = {int(k.entity_values[0].int64_val) for k in keys}
    return out


def _stored_count(s: Settings) -> dict[str, int]:
    with _db(s) as con:
        return {
            v: con.execute(f"select count(distinct entity_key) from recstack_{v}").fetchone()[0]
            for v in _views(con)
        }


def _online(s: Settings) -> list[pd.DataFrame]:
    """Every user's and item's online values (all views), lists and arrays as tuples."""
    out = []
    for df in online_frames(s):
        for col in df.columns:  # lists and arrays compare as tuples
            if df[col].dtype == object:
                df[col] = df[col].map(lambda v: None if v is None else tuple(v))
        out.append(df)
    return out


def _assert_equals_full(s: Settings) -> None:
    """The online store now equals what a full materialisation of the same tables gives."""
    got = _online(s)
    feast_ops.materialize(s)
    for g, w in zip(got, _online(s), strict=True):
        pd.testing.assert_frame_equal(g, w)


def _materialised(s: Settings) -> Settings:
    feature_tables.build(s)
    feast_ops.apply(s)
    feast_ops.materialize(s)
    return s


def _import_timeline_events(s: Settings) -> None:
    """Logged events on 03-20 (a day with data) and 03-22 (a new day, a new user 77),
    imported, and the feature tables rebuilt."""
    log_events(
        s,
        [
            EventQuery(2, 12, "click", datetime(2026, 3, 20, 7, tzinfo=UTC)),
            EventQuery(1, 13, "view", datetime(2026, 3, 22, 11, tzinfo=UTC)),
            EventQuery(77, 12, "purchase", datetime(2026, 3, 22, 12, tzinfo=UTC)),
        ],
    )
    assert import_events(s).added == 3
    feature_tables.build(s)


def test_imported_events_materialise_only_the_changed_window(tmp_path: Path) -> None:
    """The timeline, then logged events on 03-20 (a day with data) and 03-22 (a new day,
    a new user): the window starts on 03-20. Users 1 and 2 and the new user 77 have rows
    in it; items 10, 12, 13 have statistics in it, item 11 (events on 03-01/02 only) and
    every item profile (created 01-01 and 03-05) do not; of the profiles only user 77's."""
    s = _materialised(timeline_settings(tmp_path))
    _import_timeline_events(s)
    _mark_stored(s)
    feast_ops.materialize(s, incremental=True)
    written = _written(s)
    assert written["user_profile"] == {77}
    assert written["item_profile"] == set()
    assert written["item_statistics"] == {10, 12, 13}
    for view in ("user_activity", "user_recent_items", "user_seen_items"):
        assert written[view] == {1, 2, 77}, view
    assert _stored_count(s)["item_statistics"] == 4  # item 11's row is still there
    _assert_equals_full(s)
    # Again with nothing new (the hourly job's usual case): nothing is written.
    _mark_stored(s)
    feast_ops.materialize(s, incremental=True)
    assert not any(_written(s).values())


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with own_redis_server(tmp_path_factory.mktemp("redis_incremental"), REDIS_PORT) as s:
        yield s


def _rows_written(client: Any) -> int:
    """Entity rows Feast's Redis store has written so far (one HSET per row)."""
    return int(client.info("commandstats").get("cmdstat_hset", {}).get("calls", 0))


@pytest.mark.redis
def test_incremental_on_redis_writes_only_the_window_and_equals_full(
    tmp_path: Path, own_redis: Settings
) -> None:
    """The same import on the Redis store: only rows of the window's 13 entity rows are
    written (user 77's profile, items 10/12/13's statistics, users 1/2/77 in the three
    activity views), and the store then holds what a full materialisation into an emptied
    Redis gives (a full one over the kept rows would prove nothing: Redis keeps a stored
    row that is not older)."""
    import redis

    s = timeline_settings(tmp_path, "redis").model_copy(update={"redis_port": REDIS_PORT})
    client = redis.Redis(host="127.0.0.1", port=REDIS_PORT)
    client.flushall()
    _materialised(s)
    _import_timeline_events(s)
    before = _rows_written(client)
    feast_ops.materialize(s, incremental=True)
    incremental = _rows_written(client) - before
    got = _online(s)
    client.flushall()
    before = _rows_written(client)
    feast_ops.materialize(s)
    full = _rows_written(client) - before
    # At most the window's 13 entity rows (Redis skips a row not newer than the stored
    # one), against every entity's row for the full one: 10 and 20 when written.
    assert 0 < incremental <= 13 < full
    for g, w in zip(got, _online(s), strict=True):
        pd.testing.assert_frame_equal(g, w)


def test_incremental_equals_full_on_the_small_preset(
    small_settings: Settings, tmp_path: Path
) -> None:
    """The small preset without its last day and a third of the two days before, then
    those rows appended: old events leaving the 7- and 30-day windows on the new day give
    rows to users without new events too; the store still equals a full materialisation,
    and far fewer entities than all were written."""
    s = make_settings(tmp_path, feature_repo=PROJECT_ROOT / "feature_repo")
    raw, meta = read_raw(small_settings), read_meta(small_settings)
    first, later = split_for_append(raw.interactions)
    write_raw(
        s,
        RawTables(interactions=first, items=raw.items, users=raw.users),
        source="test",
        extra_meta={k: v for k, v in meta.items() if k not in COMPUTED_META},
    )
    _materialised(s)
    append_interactions(s, later)
    feature_tables.build(s)
    _mark_stored(s)
    feast_ops.materialize(s, incremental=True)
    written, stored = _written(s), _stored_count(s)
    # The window starts on the first appended day: profiles are written only for the
    # items created and users signed up since.
    start = pd.Timestamp(sorted(read_meta(s)["days"])[-3], tz="UTC")
    for view, table, key, col in (
        ("item_profile", raw.items, "item_id", "created_at"),
        ("user_profile", raw.users, "user_id", "signup_at"),
    ):
        assert written[view] == set(table.loc[table[col] >= start, key].tolist()), view
    for view in ("user_activity", "item_statistics", "user_recent_items", "user_seen_items"):
        rows = pd.read_parquet(feature_tables.table_path(s, view))
        key = "item_id" if view.startswith("item") else "user_id"
        in_window = set(rows.loc[rows["event_timestamp"] >= start, key].tolist())
        assert written[view] == in_window, view
        assert 0 < len(written[view]) < stored[view], view
    _assert_equals_full(s)


def test_replaced_data_or_no_record_materialises_everything(tmp_path: Path) -> None:
    s = timeline_settings(tmp_path)
    feature_tables.build(s)
    feast_ops.apply(s)
    assert not any(_stored_count(s).values())  # nothing online yet
    feast_ops.materialize(s, incremental=True)  # no earlier materialisation: a full one
    assert _stored_count(s)["user_activity"] == 2
    # The same data rewritten (not appended to) without user 2's events: another lineage.
    t = timeline()
    inter = t.interactions[t.interactions["user_id"] == 1]
    write_raw(
        s,
        RawTables(interactions=inter, items=t.items, users=t.users),
        source="test",
        start=ts("01-01"),
    )
    feature_tables.build(s)
    _mark_stored(s)
    feast_ops.materialize(s, incremental=True)
    assert _written(s)["item_profile"] == {10, 11, 12, 13}  # everything was written


@pytest.mark.parametrize("what", ["features rebuilt", "definitions changed"])
def test_a_changed_build_or_repository_materialises_everything(tmp_path: Path, what: str) -> None:
    s = _materialised(timeline_settings(tmp_path))
    if what == "features rebuilt":
        s = s.model_copy(update={"seen_events_csv": "view,click,purchase"})
        feature_tables.build(s)
    else:
        defs = s.feature_repo / "definitions.py"
        defs.write_text(defs.read_text() + "\n# a comment changes the repository's hash\n")
    _mark_stored(s)
    feast_ops.materialize(s, incremental=True)
    assert _written(s)["item_profile"] == {10, 11, 12, 13}

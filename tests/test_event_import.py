"""``recstack data import-events`` on the hand-made timeline: logged events become raw
interactions exactly (to the µs), a second run adds nothing, unknown items are skipped,
new users are added, bad records are refused naming the log, other meta is kept."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
from _features_fixtures import timeline_settings

from exporters.event_import import import_events
from exporters.raw_tables import read_meta, read_table
from orchestrator.event_log import EventLog, LogConfig
from orchestrator.request import EventQuery
from recstack.errors import UserError
from recstack.settings import Settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return timeline_settings(tmp_path)


def log_events(s: Settings, events: list[EventQuery]) -> None:
    log = EventLog(LogConfig(s.events_dir, flush_ms=10))
    for e in events:
        log.event(e)
    log.close()


T1 = datetime(2026, 3, 21, 9, 0, 0, 123456, tzinfo=UTC)
T2 = datetime(2026, 3, 22, 10, 30, tzinfo=UTC)


def test_events_become_interactions_once(settings: Settings) -> None:
    before = read_table(settings, "interactions")
    meta0 = read_meta(settings)
    log_events(
        settings,
        [
            EventQuery(1, 13, "click", T1, "abc"),
            EventQuery(1, 13, "click", T1, "abc"),  # a client retry: the same event
            EventQuery(77, 12, "purchase", T2),  # a user the users table lacks
            EventQuery(2, 999, "click", T2),  # an item the items table lacks
            EventQuery(1, 10, "click", datetime(2026, 3, 20, 8, tzinfo=UTC)),  # already raw
        ],
    )
    s = import_events(settings)
    assert (s.logged, s.added, s.duplicates, s.unknown_items, s.new_users) == (5, 2, 2, 1, 1)
    after = read_table(settings, "interactions")
    assert len(after) == len(before) + 2
    new = after.merge(before, how="left", indicator=True).query("_merge == 'left_only'")
    assert new[["user_id", "item_id", "event"]].values.tolist() == [
        [1, 13, "click"],
        [77, 12, "purchase"],
    ]
    assert new["timestamp"].iloc[0] == pd.Timestamp(T1)  # microseconds kept
    users = read_table(settings, "users").set_index("user_id")
    assert users.loc[77, "signup_at"] == pd.Timestamp(T2)
    assert (users.loc[77, "age_bucket"], users.loc[77, "country"]) == (0, 0)
    meta = read_meta(settings)
    assert meta["snapshot"] != meta0["snapshot"]
    assert meta["source"] == "test:timeline+events" and meta["imported_events"] == 2
    assert meta["start"] == meta0["start"]
    assert pd.Timestamp(meta["end"]) == pd.Timestamp(T2)
    # twice: nothing new, nothing written
    again = import_events(settings)
    assert (again.added, again.duplicates, again.snapshot) == (0, 4, None)
    assert read_meta(settings)["snapshot"] == meta["snapshot"]


def test_since_limits_to_newer_records(settings: Settings) -> None:
    log_events(settings, [EventQuery(1, 13, "click", T1)])
    later = datetime.now(UTC)
    log_events(settings, [EventQuery(2, 12, "click", T2)])
    s = import_events(settings, since=later)
    assert (s.logged, s.added) == (1, 1)


def test_bad_records_are_refused_naming_the_log(settings: Settings) -> None:
    log_events(settings, [EventQuery(1, 13, "click", T1)])
    seg = next(settings.events_dir.glob("*.jsonl"))
    rec = json.loads(seg.read_text())
    seg.write_text(seg.read_text() + json.dumps({**rec, "event": "like"}) + "\n")
    before = read_meta(settings)["snapshot"]
    with pytest.raises(UserError, match=r"events.*row 2, column 'event'.*unknown event 'like'"):
        import_events(settings)
    seg.write_text(seg.read_text() + json.dumps({**rec, "user_id": "x"}) + "\n")
    with pytest.raises(UserError, match="wrong type"):
        import_events(settings)
    assert read_meta(settings)["snapshot"] == before  # nothing written


def test_no_log_is_a_clear_error(settings: Settings) -> None:
    with pytest.raises(UserError, match="no event log"):
        import_events(settings)
    settings.events_dir.mkdir()
    assert import_events(settings).snapshot is None


def test_events_take_the_context_of_the_answer_they_name(settings: Settings) -> None:
    """An event's surface and device are those of the served answer its request_id names
    (what the cold-start context lists learn from); without one they are unknown ("")."""
    from orchestrator.request import RecommendQuery
    from orchestrator.service import RecItem, RecommendResult

    log = EventLog(LogConfig(settings.events_dir, flush_ms=10))
    q = RecommendQuery(user_id=1, k=1, surface="cart", device="ios")
    result = RecommendResult(
        items=[RecItem(13, 1.0, 1, "popular", "popular", ("popular",))], release="1"
    )
    log.served(q, result)
    log.event(EventQuery(1, 13, "click", T1, result.request_id))
    log.event(EventQuery(2, 12, "click", T2))  # no request_id
    log.close()
    assert import_events(settings).added == 2
    after = read_table(settings, "interactions").set_index(["user_id", "item_id"])
    assert tuple(after.loc[(1, 13), ["surface", "device"]].iloc[-1]) == ("cart", "ios")
    assert tuple(after.loc[(2, 12), ["surface", "device"]].iloc[-1]) == ("", "")

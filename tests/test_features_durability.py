"""Nothing accepted is lost: real-time pushes on the real stores.

- Redis (the project's own redis-server config, append-only file): events pushed through
  OnlineFeatures.push_event survive a ``kill -9`` of Redis and a restart.
- Both stores: a push is visible to a new connection as soon as it returns (SQLite: the
  write is committed before the answer), and every push is stored whatever its
  timestamp: after an event stamped in the future, an event late by an hour, or a row
  stamped in 2100 — Feast's Redis store keeps a stored row that is not older than the one
  written, which silently dropped such events.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from _features_fixtures import build_env, free_port, timeline_settings
from conftest import require_redis_server

from orchestrator import redis_server as rs
from orchestrator.online_features import (
    PUSH_SOURCE,
    OnlineFeatures,
    _push_frame,
    row_time,
)
from orchestrator.processes import ManagedProcess
from recstack.settings import Settings

pytestmark = pytest.mark.integration


def recent(s: Settings, user: int) -> list[int]:
    """The user's recent items through a new client (a new connection to the store)."""
    return [int(i) for i in OnlineFeatures(s).load().user(user).recent_items if i >= 0]


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, list]]:
    """The timeline materialised into a redis-server of this module (it gets killed)."""
    from exporters import feast_ops, feature_tables

    require_redis_server()
    base = tmp_path_factory.mktemp("durable_redis")
    s = timeline_settings(base, "redis").model_copy(update={"redis_port": free_port()})
    procs: list[ManagedProcess] = [rs.start(s)]
    try:
        feature_tables.build(s)
        feast_ops.apply(s)
        feast_ops.materialize(s)
        yield s, procs
    finally:
        procs[-1].stop()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The timeline materialised into each online store (Redis: this module's server;
    the session's ``redis_server`` fixture belongs to test_feast_repo.py)."""
    if request.param == "redis":
        settings: Settings = request.getfixturevalue("own_redis")[0]
        return settings
    return build_env(tmp_path_factory.mktemp("durable_sqlite"), "sqlite").settings


@pytest.mark.redis
def test_accepted_events_survive_kill_9_of_redis(own_redis: tuple[Settings, list]) -> None:
    s, procs = own_redis
    online = OnlineFeatures(s).load()
    before = {u: recent(s, u) for u in (1, 2)}
    pushed = [(1, 13), (2, 10), (1, 11), (2, 12), (1, 12)]
    now = datetime.now(UTC)
    for user, item in pushed:
        online.push_event(user, item, "click", now)
    expected = {u: recent(s, u) for u in (1, 2)}
    assert expected[1][:3] == [12, 11, 13] and expected[2][:2] == [12, 10]
    assert expected != before

    # No clean shutdown: SIGKILL right after the last acknowledged write.
    proc = procs[-1]
    os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait(10)  # type: ignore[union-attr]
    assert not rs.ping(s)
    procs.append(rs.start(s))

    assert {u: recent(s, u) for u in (1, 2)} == expected
    aof = rs.data_dir(s) / "appendonlydir"  # where it came from
    assert aof.is_dir() and any(p.stat().st_size > 0 for p in aof.iterdir())
    # The client that pushed reconnects and sees them too, and takes new events.
    assert [int(i) for i in online.user(1).recent_items[:3]] == [12, 11, 13]
    online.push_event(1, 10, "purchase", datetime.now(UTC))
    assert recent(s, 1)[:2] == [10, 12]


def test_a_push_is_committed_before_it_returns(store: Settings) -> None:
    """A second client (its own connection, another Feast store object) reads the push
    right after it returns: SQLite committed it, Redis applied it."""
    s = store
    online = OnlineFeatures(s).load()
    for item in (10, 11, 12, 13):
        new = online.push_event(2, item, "click", datetime.now(UTC))
        assert recent(s, 2) == new


def test_every_push_is_stored_whatever_its_timestamp(store: Settings) -> None:
    s = store
    online = OnlineFeatures(s).load()
    now = datetime.now(UTC)
    # An event from a client whose clock runs 4 minutes ahead (inside the skew window),
    # then one stamped by the server's clock: both stored.
    online.push_event(1, 13, "click", now + timedelta(minutes=4))
    online.push_event(1, 11, "click", now)
    assert recent(s, 1)[:2] == [11, 13]
    # An event delivered an hour late: stored, at the front (arrival order).
    online.push_event(1, 12, "purchase", now - timedelta(hours=1))
    assert recent(s, 1)[:3] == [12, 11, 13]
    # A row stamped far in the future (an old import, a bad clock) through Feast's own
    # push: later events are still stored.
    frame = _push_frame(1, [10, 12], datetime(2100, 1, 1, tzinfo=UTC))
    online.store.push(PUSH_SOURCE, frame)
    assert recent(s, 1)[:2] == [10, 12]
    online.push_event(1, 13, "click", now)
    assert recent(s, 1)[:3] == [13, 10, 12]
    online.push_event(1, 11, "click", now)
    assert recent(s, 1)[:3] == [11, 13, 10]


def test_row_time_is_always_after_the_stored_row() -> None:
    now = datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert row_time(now, None) == now
    assert row_time(now, now - timedelta(seconds=1)) == now
    later = datetime(2100, 1, 1, tzinfo=UTC)
    assert row_time(now, later) > later
    assert row_time(now, now) > now
    assert row_time(now.replace(tzinfo=None), None) == now  # naive means UTC
    assert abs(row_time(None, None) - datetime.now(UTC)) < timedelta(seconds=5)

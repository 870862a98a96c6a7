"""A hand-made timeline for the feature tests, and Feast/Redis environments built on it.

Timeline (UTC, 2026): users 1 and 2 sign up on 01-01; items 10 (category 0), 11
(category 1), 12 (category 2) exist from 01-01, item 13 (category 1) from 03-05.

- user 1: view 10 on 03-01 09:00, click 11 on 03-01 10:00, purchase 12 on 03-03 12:00,
  click 10 on 03-20 08:00
- user 2: view 11 on 03-02 15:00, click 11 on 03-02 15:05
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_settings, port, require_redis_server

from exporters.raw_tables import RawTables, write_raw
from recstack.settings import PROJECT_ROOT, Settings

REDIS_TEST_PORT = port(6391)
N_CATEGORIES = 3


def ts(s: str) -> pd.Timestamp:
    return pd.Timestamp(f"2026-{s}", tz="UTC")


def timeline() -> RawTables:
    users = pd.DataFrame(
        {
            "user_id": [1, 2],
            "age_bucket": [2, 4],
            "country": [7, 3],
            "signup_at": [ts("01-01"), ts("01-01")],
        }
    )
    items = pd.DataFrame(
        {
            "item_id": [10, 11, 12, 13],
            "category": [0, 1, 2, 1],
            "brand": [5, 6, 7, 6],
            "price": [10.0, 20.0, 30.0, 25.0],
            "created_at": [ts("01-01"), ts("01-01"), ts("01-01"), ts("03-05")],
        }
    )
    events = [
        (1, 10, "03-01 09:00", "view"),
        (1, 11, "03-01 10:00", "click"),
        (1, 12, "03-03 12:00", "purchase"),
        (1, 10, "03-20 08:00", "click"),
        (2, 11, "03-02 15:00", "view"),
        (2, 11, "03-02 15:05", "click"),
    ]
    inter = pd.DataFrame(
        {
            "user_id": [e[0] for e in events],
            "item_id": [e[1] for e in events],
            "timestamp": [ts(e[2]) for e in events],
            "event": [e[3] for e in events],
        }
    )
    return RawTables(interactions=inter, items=items, users=users)


def copy_feature_repo(dest: Path) -> Path:
    """A private copy of feature_repo/ (tests may break definitions in it)."""
    shutil.copytree(
        PROJECT_ROOT / "feature_repo", dest, ignore=shutil.ignore_patterns("__pycache__")
    )
    return dest


def timeline_settings(base: Path, online_store: str = "sqlite") -> Settings:
    """Settings rooted in ``base`` with the timeline's raw data written."""
    s = make_settings(
        base,
        online_store=online_store,
        redis_port=REDIS_TEST_PORT,
        feature_repo=copy_feature_repo(base / "feature_repo"),
    )
    write_raw(s, timeline(), source="test:timeline", start=ts("01-01"), end=ts("03-21"))
    return s


def free_port() -> int:
    """A loopback port nothing listens on (for "store is down")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class FeastEnv:
    """Feature tables built, applied and materialised for one online store."""

    settings: Settings
    store_kind: str


def build_env(base: Path, store_kind: str) -> FeastEnv:
    """Timeline -> feature tables -> feast apply -> full materialisation."""
    from exporters import feast_ops, feature_tables

    s = timeline_settings(base, store_kind)
    feature_tables.build(s)
    feast_ops.apply(s)
    feast_ops.materialize(s)
    return FeastEnv(s, store_kind)


@contextmanager
def own_redis_server(base: Path, redis_port: int) -> Iterator[Settings]:
    """A redis-server of ours on ``redis_port`` (settings rooted in ``base``), stopped after."""
    from orchestrator import redis_server as rs

    require_redis_server()
    s = make_settings(base, redis_port=redis_port)
    proc = rs.start(s)
    try:
        yield s
    finally:
        proc.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """Our own redis-server on REDIS_TEST_PORT for the session (stopped afterwards)."""
    with own_redis_server(tmp_path_factory.mktemp("redis"), REDIS_TEST_PORT) as s:
        yield s


@pytest.fixture(
    scope="module",
    params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)],
)
def feast_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FeastEnv:
    """The timeline applied and materialised, once per online store."""
    if request.param == "redis":
        request.getfixturevalue("redis_server")
    return build_env(tmp_path_factory.mktemp(f"feast_{request.param}"), request.param)


def online_frames(s: Settings) -> list[pd.DataFrame]:
    """Every user's and item's online values (all views of the entity), one frame per
    entity, rows in the raw table's order, the key column first and the rest sorted (the
    order Feast returns them in varies)."""
    from exporters import feast_ops
    from exporters.raw_tables import read_table

    store = feast_ops.feature_store(s)
    out = []
    for key, table in (("user_id", "users"), ("item_id", "items")):
        views = [
            v for v in store.list_feature_views() if [c.name for c in v.entity_columns] == [key]
        ]
        refs = [f"{v.name}:{f.name}" for v in views for f in v.features]
        rows = [{key: int(i)} for i in read_table(s, table)[key].tolist()]
        df = store.get_online_features(features=refs, entity_rows=rows).to_df()
        out.append(df[[key, *sorted(c for c in df.columns if c != key)]])
    return out

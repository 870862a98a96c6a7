"""Tiny raw data with learnable structure for the two-tower / ONNX / index tests.

Users prefer two categories; items have power-law popularity inside their category. Small
enough that training takes about a second on one core.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import make_settings

from exporters.raw_tables import RawTables, write_raw
from exporters.two_tower import HParams, TwoTower
from recstack.settings import Settings

START = pd.Timestamp("2026-01-01", tz="UTC")
DAYS = 30


def tiny_tables(
    seed: int = 0, n_users: int = 300, n_items: int = 200, n_events: int = 8000
) -> RawTables:
    """Deterministic tiny users/items/interactions frames in the canonical schema."""
    rng = np.random.default_rng(seed)
    n_cat = 10
    items = pd.DataFrame(
        {
            "item_id": np.arange(n_items, dtype=np.int64),
            "category": rng.integers(0, n_cat, n_items).astype(np.int64),
            "brand": rng.integers(0, 15, n_items).astype(np.int64),
            "price": rng.lognormal(3.0, 1.0, n_items),
            "created_at": START + pd.to_timedelta(rng.integers(-60, DAYS - 5, n_items), unit="D"),
        }
    )
    users = pd.DataFrame(
        {
            "user_id": np.arange(n_users, dtype=np.int64),
            "age_bucket": rng.integers(0, 6, n_users).astype(np.int64),
            "country": rng.integers(0, 5, n_users).astype(np.int64),
            "signup_at": START - pd.to_timedelta(rng.integers(1, 300, n_users), unit="D"),
        }
    )
    fav = rng.integers(0, n_cat, (n_users, 2))
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    by_cat = {c: np.flatnonzero(items["category"].to_numpy() == c) for c in range(n_cat)}
    activity = rng.pareto(1.5, n_users) + 1.0
    u = rng.choice(n_users, n_events, p=activity / activity.sum())
    cats = np.where(rng.random(n_events) < 0.85, fav[u, rng.integers(0, 2, n_events)], -1)
    it = np.empty(n_events, dtype=np.int64)
    for k in range(n_events):
        pool = by_cat[cats[k]] if cats[k] >= 0 and len(by_cat[cats[k]]) else np.arange(n_items)
        p = pop[pool] / pop[pool].sum()
        it[k] = pool[rng.choice(len(pool), p=p)]
    ts = START + pd.to_timedelta(np.sort(rng.integers(0, DAYS * 86_400, n_events)), unit="s")
    created = items["created_at"].to_numpy()[it]
    ts = pd.Series(np.maximum(ts.to_numpy(), created))
    event = rng.choice(["view", "click", "purchase"], n_events, p=[0.5, 0.4, 0.1])
    inter = pd.DataFrame(
        {"user_id": u.astype(np.int64), "item_id": it, "timestamp": ts, "event": event}
    ).sort_values("timestamp", kind="stable", ignore_index=True)
    return RawTables(interactions=inter, items=items, users=users)


def write_tiny(settings: Settings, seed: int = 0, **kw: int) -> RawTables:
    """Write the tiny tables as ``settings``' raw data and return them."""
    tables = tiny_tables(seed, **kw)
    write_raw(settings, tables, source="test")
    return tables


TEST_HPARAMS = HParams(batch_size=512, epochs=2)


@dataclass(frozen=True)
class Trained:
    """A work directory with every retrieval artifact built from the `small` preset."""

    settings: Settings
    model: TwoTower
    meta: dict[str, Any]


_TRAINED: dict[str, Trained] = {}


def build_trained(small_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """Copy of the `small` raw data + split + two-tower + ONNX towers + index, built once
    per session (test modules wrap this in their own fixture)."""
    if "small" in _TRAINED:
        return _TRAINED["small"]
    from exporters import index_build, onnx_export, two_tower
    from exporters.split import write_split

    s = make_settings(tmp_path_factory.mktemp("two_tower"))
    shutil.copytree(small_settings.raw_dir, s.raw_dir)
    write_split(s)
    model, _result, meta = two_tower.fit(s, TEST_HPARAMS, progress=False)
    two_tower.save(model, meta, s.work_dir / two_tower.CHECKPOINT)
    onnx_export.export_towers(s)
    index_build.build(s)
    _TRAINED["small"] = Trained(settings=s, model=model, meta=meta)
    return _TRAINED["small"]

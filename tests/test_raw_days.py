"""The raw interactions as a day-partitioned dataset (exporters/event_days.py,
exporters/raw_tables.py): a full write reads back as the tables it was given (rows and
order), an append adds part files without touching existing ones and reads back as the
whole data would, the snapshot is a content hash whatever the parts, and a legacy single
file still reads and is rewritten in the day layout by the next import."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from _features_fixtures import timeline_settings
from _raw_days_fixtures import log_events, split_for_append
from conftest import make_settings

from exporters import event_days
from exporters.data_generate import PRESETS, build
from exporters.event_import import import_events
from exporters.raw_tables import (
    RawTables,
    append_interactions,
    is_day_partitioned,
    read_days,
    read_meta,
    read_table,
    to_arrow,
    write_raw,
)
from orchestrator.request import EventQuery


@pytest.fixture(scope="module")
def small_tables() -> RawTables:
    tables, _, _ = build(PRESETS["small"], 7)
    return tables


def _canonical(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """``df`` as the readers return it (canonical schema and dtypes)."""
    return to_arrow(name, df).to_pandas()


def _files(raw: Path) -> dict[str, tuple[int, int]]:
    """Every parquet file under ``raw``: (inode, mtime in ns)."""
    return {
        str(p.relative_to(raw)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in raw.rglob("*.parquet")
    }


def test_a_full_write_reads_back_in_its_rows_and_order(
    small_tables: RawTables, tmp_path: Path
) -> None:
    s = make_settings(tmp_path)
    write_raw(s, small_tables, source="test")
    parts = event_days.list_parts(s.raw_dir)
    days = sorted({p.day for p in parts})
    assert len(days) == len(parts) > 30  # one part per UTC day
    assert not (s.raw_dir / "interactions.parquet").exists()
    got = read_table(s, "interactions")
    pd.testing.assert_frame_equal(got, _canonical("interactions", small_tables.interactions))
    # Every row is in the part of its own UTC day.
    for p in parts[:3]:
        ts = pq.read_table(p.path)["timestamp"]
        assert set(event_days.day_names(ts)) == {p.day}
    # Hive-style: pyarrow.dataset (and so pandas, Spark) reads the folder as one table.
    table = ds.dataset(s.raw_dir / "interactions", partitioning="hive").to_table()
    assert table.num_rows == len(got)
    meta = read_meta(s)
    assert sorted(meta["days"]) == days and meta["lineage"] == meta["snapshot"]
    assert sum(d["rows"] for d in meta["days"].values()) == meta["n_interactions"] == len(got)


def test_an_append_adds_files_and_reads_as_the_whole_data(
    small_tables: RawTables, tmp_path: Path
) -> None:
    whole = make_settings(tmp_path / "whole")
    write_raw(whole, small_tables, source="test")
    first, later = split_for_append(read_table(whole, "interactions"))
    s = make_settings(tmp_path / "appended")
    write_raw(
        s,
        RawTables(interactions=first, items=small_tables.items, users=small_tables.users),
        source="test",
    )
    before = _files(s.raw_dir)
    meta0 = read_meta(s)
    snap = append_interactions(s, later)
    after = _files(s.raw_dir)
    # Nothing existing was rewritten: same inode, same mtime; only new part files.
    assert {k: after[k] for k in before} == before
    new = sorted(set(after) - set(before))
    assert len(new) == 3 and all(k.startswith("interactions/day=") for k in new)
    assert sum(k.endswith("part-000001.parquet") for k in new) == 2  # existing days
    assert sum(k.endswith("part-000000.parquet") for k in new) == 1  # a new day
    # The read equals the whole data's, rows and order (merged days sorted as one file).
    pd.testing.assert_frame_equal(read_table(s, "interactions"), read_table(whole, "interactions"))
    # A content hash: the same rows give the same snapshot whatever the part files.
    meta = read_meta(s)
    assert snap == meta["snapshot"] == read_meta(whole)["snapshot"] != meta0["snapshot"]
    assert meta["days"] == read_meta(whole)["days"]
    assert meta["lineage"] == meta0["lineage"]  # appended to, not replaced
    assert meta["n_interactions"] == read_meta(whole)["n_interactions"]
    assert meta["events"] == read_meta(whole)["events"]
    # read_days reads only those days' parts.
    last = sorted(meta["days"])[-1]
    got = read_days(s, [last])
    assert len(got) == meta["days"][last]["rows"]
    assert set(event_days.day_names(to_arrow("interactions", got)["timestamp"])) == {last}


def test_an_append_that_fails_validation_changes_nothing(tmp_path: Path) -> None:
    s = timeline_settings(tmp_path)
    before = _files(s.raw_dir)
    meta = read_meta(s)
    bad = pd.DataFrame(
        {
            "user_id": [1],
            "item_id": [999],  # not in the items table
            "timestamp": [pd.Timestamp("2026-03-25", tz="UTC")],
            "event": ["click"],
        }
    )
    with pytest.raises(Exception, match="item_id missing from the items table"):
        append_interactions(s, bad)
    assert _files(s.raw_dir) == before and read_meta(s) == meta
    assert not [p for p in s.raw_dir.parent.iterdir() if p.name.startswith(".raw")]


def test_import_events_appends_day_parts(tmp_path: Path) -> None:
    """``recstack data import-events`` writes only part files for the days its events fall
    on: one beside the existing part of 03-20, one for the new day 03-22."""
    s = timeline_settings(tmp_path)
    before = _files(s.raw_dir)
    log_events(
        s,
        [
            EventQuery(2, 12, "click", datetime(2026, 3, 20, 7, 0, tzinfo=UTC)),
            EventQuery(1, 13, "view", datetime(2026, 3, 22, 11, 0, tzinfo=UTC)),
        ],
    )
    assert import_events(s).added == 2
    after = _files(s.raw_dir)
    assert {k: after[k] for k in before if k.startswith("interactions/")} == {
        k: v for k, v in before.items() if k.startswith("interactions/")
    }
    assert sorted(set(after) - set(before)) == [
        "interactions/day=2026-03-20/part-000001.parquet",
        "interactions/day=2026-03-22/part-000000.parquet",
    ]
    inter = read_table(s, "interactions")
    # 03-20 holds two parts, merged in time order: the new 07:00 click before the 08:00 one
    # of the first part (concatenated parts would put it after).
    day = inter[inter["timestamp"].dt.strftime("%Y-%m-%d") == "2026-03-20"]
    assert day[["user_id", "item_id"]].values.tolist() == [[2, 12], [1, 10]]
    assert inter["timestamp"].iloc[-1] == pd.Timestamp("2026-03-22 11:00", tz="UTC")


def test_a_legacy_single_file_reads_and_is_migrated_by_an_import(tmp_path: Path) -> None:
    s = timeline_settings(tmp_path)
    want = read_table(s, "interactions")
    meta = read_meta(s)
    # What a workspace written before the day layout holds: one interactions.parquet.
    legacy = to_arrow("interactions", want)
    shutil.rmtree(s.raw_dir / "interactions")
    pq.write_table(legacy, s.raw_dir / "interactions.parquet")
    assert not is_day_partitioned(s)
    pd.testing.assert_frame_equal(read_table(s, "interactions"), want)
    assert read_days(s, ["2026-03-02"])["user_id"].tolist() == [2, 2]
    log_events(s, [EventQuery(1, 13, "view", datetime(2026, 3, 22, 11, 0, tzinfo=UTC))])
    assert import_events(s).added == 1
    assert is_day_partitioned(s) and not (s.raw_dir / "interactions.parquet").exists()
    got = read_table(s, "interactions")
    assert len(got) == len(want) + 1
    assert read_meta(s)["lineage"] != meta["snapshot"]  # rewritten: a new lineage
    assert os.path.isdir(s.raw_dir / "interactions" / "day=2026-03-22")


def test_a_full_write_keeps_the_files_of_unchanged_days(
    small_tables: RawTables, tmp_path: Path
) -> None:
    """A full write of the same events (here: after an append, with one day changed and an
    item added, as ``recstack items`` folding does) hard-links the files of the days whose
    rows are unchanged and writes only the others."""
    whole = make_settings(tmp_path / "whole")
    write_raw(whole, small_tables, source="test")
    first, later = split_for_append(read_table(whole, "interactions"))
    s = make_settings(tmp_path / "s")
    write_raw(s, RawTables(first, small_tables.items, small_tables.users), source="test")
    append_interactions(s, later)  # two days in two parts, one new day
    before = _files(s.raw_dir)
    inter = read_table(s, "interactions")
    day = sorted(read_meta(s)["days"])[10]
    changed = inter["timestamp"].dt.strftime("%Y-%m-%d") == day
    inter = inter[~changed | (inter.index != inter.index[changed][0])]  # one event fewer
    items = pd.concat(
        [small_tables.items, small_tables.items.tail(1).assign(item_id=10**6)], ignore_index=True
    )
    write_raw(s, RawTables(inter, items, small_tables.users), source="test")
    after = _files(s.raw_dir)
    moved = sorted(k for k in after if k.startswith("interactions/") and after[k] != before.get(k))
    assert moved == [f"interactions/day={day}/part-000000.parquet"]
    assert sorted(k for k in after if k.startswith("interactions/")) == sorted(
        k for k in before if k.startswith("interactions/")
    )
    pd.testing.assert_frame_equal(read_table(s, "interactions"), inter.reset_index(drop=True))

"""The raw interactions as a day-partitioned parquet dataset: layout, order, hashes.

Layout (hive-style, so pyarrow.dataset, pandas and Spark read the folder as one table with
a ``day`` partition column)::

    <raw_dir>/interactions/day=2026-09-30/part-000000.parquet
                                         part-000001.parquet   # a later append
    <raw_dir>/interactions.parquet                             # legacy: one file

A row's day is the UTC day of its ``timestamp``. A full write (exporters/raw_tables
``write_raw``) writes one part per day; an append (``append_interactions``) adds
``part-<seq+1>`` files for the days its rows fall on and never touches an existing file.

The canonical row order (what :func:`read_parts` returns and the Spark engine restores
within a partition, see :func:`order_rows`): days ascending; a day held in one part in that
file's order; a day held in several parts sorted by ``ORDER`` (stable: ties in part, then
file order). Every writer sorts interactions by ``ORDER`` (the generator, the importer, the
event import), so this is exactly the order a single rewritten file had, and ties in time —
which the feature tables break by row order — fall as they did.

A day's hash (:func:`day_hash`) is a content hash of its rows in that order: equal for
equal rows whichever parts hold them, so a snapshot built from day hashes is a content
hash, and an append re-hashes only the days it touched.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

DIR = "interactions"
LEGACY_FILE = "interactions.parquet"
ORDER: tuple[str, ...] = ("timestamp", "user_id", "item_id", "event")
US_PER_DAY = 86_400 * 1_000_000
_PART = re.compile(r"^part-(\d{6,})\.parquet$")
_DAY = re.compile(r"^day=(\d{4}-\d{2}-\d{2})$")
# Columns carrying a row's place in the dataset, for engines that lose the read order
# (Spark's shuffle): its day, its part's sequence number, its row in the part file, and
# whether its day is held in several parts (then ORDER decides).
DAY_COL, PART_COL, POS_COL, MERGED_COL = "_day", "_part", "_pos", "_merged"
PLACE_COLUMNS = (DAY_COL, PART_COL, POS_COL, MERGED_COL)


@dataclass(frozen=True)
class Part:
    """One part file: its day (``YYYY-MM-DD``; "" for the legacy single file) and sequence."""

    day: str
    seq: int
    path: Path


def dataset_dir(raw: Path) -> Path:
    """``<raw>/interactions``."""
    return raw / DIR


def part_path(raw: Path, day: str, seq: int) -> Path:
    """Where part ``seq`` of ``day`` lives."""
    return dataset_dir(raw) / f"day={day}" / f"part-{seq:06d}.parquet"


def list_parts(raw: Path) -> list[Part]:
    """Every part in canonical order (day, then sequence); the legacy single file as one
    part of day "" when there is no dataset folder; [] when neither exists. Names that are
    not ``day=.../part-NNNNNN.parquet`` (temporary files: ``.name``) are ignored."""
    folder = dataset_dir(raw)
    if not folder.is_dir():
        legacy = raw / LEGACY_FILE
        return [Part("", 0, legacy)] if legacy.exists() else []
    parts = []
    for day_dir in folder.iterdir():
        day = _DAY.match(day_dir.name)
        if day is None or not day_dir.is_dir():
            continue
        for f in day_dir.iterdir():
            seq = _PART.match(f.name)
            if seq is not None:
                parts.append(Part(day.group(1), int(seq.group(1)), f))
    return sorted(parts, key=lambda p: (p.day, p.seq))


def day_names(ts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """``YYYY-MM-DD`` (UTC) of each timestamp, as a numpy str array."""
    us = pc.cast(pc.cast(ts, pa.timestamp("us", tz="UTC")), pa.int64())
    us = us.to_numpy(zero_copy_only=False)
    days = (us // US_PER_DAY).astype("datetime64[D]")
    return np.datetime_as_string(days, unit="D")


def split_by_day(table: pa.Table) -> dict[str, pa.Table]:
    """``table``'s rows per UTC day (days ascending), each in its order within the table."""
    days = day_names(table["timestamp"])
    if len(days) and not (days[1:] >= days[:-1]).all():
        order = np.argsort(days, kind="stable")
        table, days = table.take(pa.array(order)), days[order]
    names, starts = np.unique(days, return_index=True)
    bounds = [*starts.tolist(), len(days)]
    return {str(d): table.slice(bounds[i], bounds[i + 1] - bounds[i]) for i, d in enumerate(names)}


def _key_codes(values: pd.Series) -> np.ndarray:
    """Integers that sort as ``values`` do (timestamps, ints, strings)."""
    if pd.api.types.is_datetime64_any_dtype(values):
        return pd.to_datetime(values, utc=True).to_numpy("datetime64[us]").view(np.int64)
    if pd.api.types.is_integer_dtype(values):
        return values.to_numpy(np.int64)
    return pd.factorize(values.astype(str), sort=True)[0].astype(np.int64)


def order_rows(df: pd.DataFrame) -> np.ndarray:
    """Positions that put ``df``'s rows (with PLACE_COLUMNS and ORDER columns) in canonical
    order (module docstring): the one definition both readers use."""
    merged = df[MERGED_COL].to_numpy(bool)
    keys = [np.where(merged, _key_codes(df[c]), 0) for c in reversed(ORDER)] if merged.any() else []
    day = pd.factorize(df[DAY_COL].astype(str), sort=True)[0]
    return np.lexsort((df[POS_COL].to_numpy(np.int64), df[PART_COL].to_numpy(np.int64), *keys, day))


def _merge_day(tables: list[pa.Table], day: str) -> pa.Table:
    """One day's parts (in sequence order) as one table in canonical order."""
    if len(tables) == 1:
        return tables[0]
    table = pa.concat_tables(tables)
    place = pd.DataFrame(
        {
            DAY_COL: day,
            PART_COL: np.repeat(np.arange(len(tables)), [t.num_rows for t in tables]),
            POS_COL: np.concatenate([np.arange(t.num_rows) for t in tables]),
            MERGED_COL: True,
            **{c: table[c].to_pandas() for c in ORDER},
        }
    )
    return table.take(pa.array(order_rows(place)))


def read_parts(parts: list[Part], columns: list[str] | None = None) -> pa.Table:
    """``parts`` (canonical order, as :func:`list_parts` gives them) as one table in
    canonical order. Days held in several parts also read the ORDER columns to merge."""
    by_day: dict[str, list[Part]] = {}
    for p in parts:
        by_day.setdefault(p.day, []).append(p)
    out = []
    for day, ps in by_day.items():
        cols = columns
        if columns is not None and len(ps) > 1:
            cols = [*columns, *(c for c in ORDER if c not in columns)]
        merged = _merge_day([pq.read_table(p.path, columns=cols) for p in ps], day)
        out.append(merged if cols == columns else merged.select(columns))
    return pa.concat_tables(out) if out else pa.table({})


def day_hash(table: pa.Table) -> str:
    """Content hash of one day's rows in canonical order (hex SHA-256, 16 chars); pandas'
    row hash uses a fixed key, so equal contents give equal bytes everywhere."""
    rows = pd.util.hash_pandas_object(table.to_pandas(), index=False).to_numpy()
    return hashlib.sha256(rows.tobytes()).hexdigest()[:16]


def day_summaries(tables: dict[str, pa.Table]) -> dict[str, dict[str, object]]:
    """``{day: {"rows": n, "hash": day_hash}}`` of each day's table (canonical order)."""
    return {d: {"rows": t.num_rows, "hash": day_hash(t)} for d, t in sorted(tables.items())}

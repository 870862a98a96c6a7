"""Read, validate and atomically write the canonical raw tables and ``meta.json``.

The generator and the importer both end in :func:`write_raw`; every offline step reads
through :func:`read_table` / :func:`read_meta`. Schemas live in exporters/schema.py.

``meta.json`` = ``{source, snapshot, n_users, n_items, n_categories, start, end}`` plus
``n_interactions``, ``events`` (count per event) and ``cardinalities`` (max code + 1 of
``category``, ``brand``, ``age_bucket``, ``country``: the sizes of embedding tables).
``snapshot`` is a SHA-256 of the three tables' contents (not of the parquet bytes, so it
does not change with the pyarrow version that wrote them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exporters.schema import CONTEXT_COLUMNS, CONTEXT_MAX_CHARS, EVENTS, OPTIONAL_COLUMNS, TABLES
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

META_FILE = "meta.json"
# Key tables of data imported with string ids (exporters/data_import.py): internal int64
# id -> the client's key, only for ids that are keys (digit ids are their own name).
KEY_FILES = {"items": "item_keys.parquet", "users": "user_keys.parquet"}
KEY_COLUMNS = {"items": ("item_id", "item_key"), "users": ("user_id", "user_key")}
CODE_COLUMNS = {"items": ("category", "brand"), "users": ("age_bucket", "country")}


@dataclass(frozen=True)
class RawTables:
    """The three canonical tables as pandas frames (columns as in exporters/schema.py)."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame

    def as_dict(self) -> dict[str, pd.DataFrame]:
        return {"interactions": self.interactions, "items": self.items, "users": self.users}


def _raw_dir(where: Settings | Path) -> Path:
    return where.raw_dir if isinstance(where, Settings) else Path(where)


def table_path(where: Settings | Path, name: str) -> Path:
    """``<raw_dir>/<name>.parquet`` for one of the tables in ``schema.TABLES``."""
    if name not in TABLES:
        raise ValueError(f"unknown raw table {name!r}; expected one of {sorted(TABLES)}")
    return _raw_dir(where) / f"{name}.parquet"


def _missing(raw: Path) -> UserError:
    return UserError(
        f"no raw data in {raw}: run `recstack data generate` or `recstack data import` first"
    )


def read_table(where: Settings | Path, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """One canonical table (optionally only some columns); timestamps are UTC, µs. Optional
    columns a file from before them lacks read as their default (schema.OPTIONAL_COLUMNS)."""
    path = table_path(where, name)
    if not path.exists():
        raise _missing(path.parent)
    optional = OPTIONAL_COLUMNS.get(name, {})
    present = set(pq.read_schema(path).names)
    absent = [c for c in (columns or TABLES[name].names) if c in optional and c not in present]
    wanted = None if columns is None else [c for c in columns if c not in absent]
    df = pq.read_table(path, columns=wanted).to_pandas()
    return df.assign(**{c: optional[c] for c in absent}) if absent else df


def read_raw(where: Settings | Path) -> RawTables:
    """All three canonical tables."""
    return RawTables(**{name: read_table(where, name) for name in TABLES})


def read_meta(where: Settings | Path) -> dict[str, object]:
    """The parsed ``meta.json`` of the current raw data."""
    path = _raw_dir(where) / META_FILE
    if not path.exists():
        raise _missing(path.parent)
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def read_keys(where: Settings | Path) -> dict[str, pd.DataFrame]:
    """The key tables (``KEY_FILES``) of the current raw data, by table name: what a
    rewrite of the same data (events or new items folded in) passes on to
    :func:`write_raw`, so the clients' ids survive it."""
    raw = _raw_dir(where)
    return {
        name: pq.read_table(raw / file).to_pandas()
        for name, file in KEY_FILES.items()
        if (raw / file).exists()
    }


def to_arrow(name: str, df: pd.DataFrame) -> pa.Table:
    """``df`` as an Arrow table with exactly the canonical schema (column order, types)."""
    schema = TABLES[name]
    optional = OPTIONAL_COLUMNS.get(name, {})
    absent = {c: v for c, v in optional.items() if c not in df.columns}
    if absent:
        df = df.assign(**absent)
    missing = [f for f in schema.names if f not in df.columns]
    if missing:
        raise UserError(f"{name} table: missing column(s) {missing}")
    table = pa.Table.from_pandas(df[schema.names], preserve_index=False)
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise UserError(f"{name} table does not match the canonical schema: {e}") from e


def validate(tables: dict[str, pa.Table]) -> None:
    """Whole-table invariants every consumer relies on; raises UserError naming the table.

    Row-level checks with line numbers belong to the importer; this is the last guard
    before anything becomes visible.
    """
    for name, schema in TABLES.items():
        t = tables[name]
        if not t.schema.equals(schema):
            raise UserError(f"{name} table: schema {t.schema} != canonical {schema}")
        for col in t.column_names:
            if t[col].null_count:
                raise UserError(f"{name} table: column {col!r} has {t[col].null_count} nulls")
    inter, items, users = tables["interactions"], tables["items"], tables["users"]
    if inter.num_rows == 0:
        raise UserError("interactions table is empty")
    item_ids = items["item_id"].to_numpy()
    user_ids = users["user_id"].to_numpy()
    for name, ids, col in (("items", item_ids, "item_id"), ("users", user_ids, "user_id")):
        if ids.size and ids.min() < 0:
            raise UserError(f"{name} table: negative {col}")
        if np.unique(ids).size != ids.size:
            raise UserError(f"{name} table: duplicate {col}")
    for name, cols in CODE_COLUMNS.items():
        for col in cols:
            v = tables[name][col].to_numpy()
            if v.size and v.min() < 0:
                raise UserError(f"{name} table: negative code in {col!r}")
    price = items["price"].to_numpy()
    if price.size and not (np.isfinite(price).all() and price.min() >= 0):
        raise UserError("items table: price must be finite and >= 0")
    for col in CONTEXT_COLUMNS:
        longest = pc.max(pc.utf8_length(inter[col])).as_py() if inter.num_rows else 0
        if longest and longest > CONTEXT_MAX_CHARS:
            raise UserError(
                f"interactions table: a {col!r} value is longer than {CONTEXT_MAX_CHARS} characters"
            )
    bad_events = set(inter["event"].unique().to_pylist()) - set(EVENTS)
    if bad_events:
        raise UserError(f"interactions table: unknown event(s) {sorted(bad_events)}")
    for col, ids, name in (("item_id", item_ids, "items"), ("user_id", user_ids, "users")):
        unknown = ~np.isin(inter[col].to_numpy(), ids)
        if unknown.any():
            first = int(inter[col].to_numpy()[unknown][0])
            raise UserError(
                f"interactions table: {int(unknown.sum())} rows reference a {col} missing "
                f"from the {name} table (first: {first})"
            )


def snapshot(tables: dict[str, pa.Table]) -> str:
    """Deterministic content hash of the three tables (hex SHA-256, first 16 chars)."""
    h = hashlib.sha256()
    for name in sorted(TABLES):
        t = tables[name]
        h.update(f"{name}:{t.num_rows}:{t.schema.to_string(show_schema_metadata=False)}".encode())
        # pandas' row hash uses a fixed key, so equal contents give equal bytes everywhere.
        rows = pd.util.hash_pandas_object(t.to_pandas(), index=False).to_numpy()
        h.update(rows.tobytes())
    return h.hexdigest()[:16]


def _iso(ts: pd.Timestamp) -> str:
    return pd.Timestamp(ts).tz_convert("UTC").isoformat()


def _meta(
    tables: dict[str, pa.Table],
    source: str,
    start: pd.Timestamp | None,
    end: pd.Timestamp | None,
    extra: dict[str, object] | None = None,
) -> dict[str, object]:
    inter = tables["interactions"]
    ts = inter["timestamp"]
    lo = pd.Timestamp(pc.min(ts).as_py())
    hi = pd.Timestamp(pc.max(ts).as_py())
    vc = pc.value_counts(inter["event"])
    events = dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True))

    def card(name: str, col: str) -> int:
        v = tables[name][col].to_numpy()
        return int(v.max()) + 1 if v.size else 0

    return {
        "source": source,
        "snapshot": snapshot(tables),
        "n_users": tables["users"].num_rows,
        "n_items": tables["items"].num_rows,
        "n_categories": card("items", "category"),
        "start": _iso(start if start is not None else lo),
        "end": _iso(end if end is not None else hi),
        "n_interactions": inter.num_rows,
        "events": {e: int(events.get(e, 0)) for e in EVENTS},
        "cardinalities": {c: card(n, c) for n, cols in CODE_COLUMNS.items() for c in cols},
        **(extra or {}),
    }


def write_raw(
    settings: Settings,
    tables: RawTables,
    source: str,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
    extra_meta: dict[str, object] | None = None,
    keys: dict[str, pd.DataFrame] | None = None,
) -> Path:
    """Write the tables and ``meta.json`` into ``settings.raw_dir`` atomically.
    ``keys``: the key tables (``KEY_FILES``) by table name, written in the same swap.

    Everything is written into a temporary folder beside ``raw_dir``, read back and
    validated, then renamed over ``raw_dir``. On any failure the previous raw data stays
    exactly as it was. ``start``/``end`` default to the interactions' time range.
    Returns ``raw_dir``.
    """
    raw = settings.raw_dir
    raw.parent.mkdir(parents=True, exist_ok=True)
    arrow = {name: to_arrow(name, df) for name, df in tables.as_dict().items()}
    validate(arrow)
    tmp = Path(tempfile.mkdtemp(prefix=f".{raw.name}.tmp-", dir=raw.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the data folder is not a secret
        for name, t in arrow.items():
            pq.write_table(t, tmp / f"{name}.parquet", compression="zstd")
        for name, df in (keys or {}).items():
            id_col, key_col = KEY_COLUMNS[name]
            kt = pa.table(
                {
                    id_col: pa.array(df[id_col], pa.int64()),
                    key_col: pa.array(df[key_col], pa.string()),
                }
            )
            pq.write_table(kt, tmp / KEY_FILES[name], compression="zstd")
        # Read back what is on disk: the snapshot describes the files, not our memory.
        written = {name: pq.read_table(tmp / f"{name}.parquet") for name in TABLES}
        validate(written)
        meta = _meta(written, source, start, end, extra_meta)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        _swap_in(tmp, raw)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "raw data %s: %d interactions, %d users, %d items -> %s",
        meta["snapshot"],
        meta["n_interactions"],
        meta["n_users"],
        meta["n_items"],
        raw,
    )
    return raw


def _swap_in(new: Path, target: Path) -> None:
    """Replace ``target`` by the fully written folder ``new``.

    rename(2) cannot replace a non-empty directory, so the old folder is renamed aside
    first; readers see the old tables or the new ones, never a mix.
    """
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

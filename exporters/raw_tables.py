"""Read, validate and atomically write the canonical raw tables and ``meta.json``.

The generator and the importer both end in :func:`write_raw`; every offline step reads
through :func:`read_table` / :func:`read_meta`. Schemas live in exporters/schema.py.

``meta.json`` = ``{source, snapshot, n_users, n_items, n_categories, start, end}`` plus
``n_interactions``, ``events`` (count per event), ``cardinalities`` (max code + 1 of
``category``, ``brand``, ``age_bucket``, ``country``: the sizes of embedding tables),
``days`` (rows and content hash of each UTC day of interactions) and ``lineage`` (the
snapshot of the last full write; appends keep it, so "same lineage" = "only appended to
since", what incremental materialisation relies on).
``snapshot`` is a SHA-256 of the three tables' contents (not of the parquet bytes, so it
does not change with the pyarrow version that wrote them); the interactions enter it
through their day hashes, so an append re-hashes only the days it touched and equal data
gives an equal snapshot whichever part files hold it.

The interactions are a day-partitioned dataset (exporters/event_days.py); items and users
are one file each. :func:`append_interactions` adds rows without rewriting any file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from exporters import event_days
from exporters.schema import CONTEXT_COLUMNS, CONTEXT_MAX_CHARS, EVENTS, OPTIONAL_COLUMNS, TABLES
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

META_FILE = "meta.json"
# Key tables of data imported with string ids (exporters/data_import.py): internal int64
# id -> the client's key, only for ids that are keys (digit ids are their own name).
# meta.json fields the writers compute from the tables; the others are carried over.
COMPUTED_META = (
    "source",
    "snapshot",
    "n_users",
    "n_items",
    "n_categories",
    "start",
    "end",
    "n_interactions",
    "events",
    "cardinalities",
    "days",
    "lineage",
)
ORDER = list(event_days.ORDER)
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
    """``<raw_dir>/<name>.parquet`` for one of the tables in ``schema.TABLES`` (for the
    interactions: the legacy single file; see :func:`table_parts`)."""
    if name not in TABLES:
        raise ValueError(f"unknown raw table {name!r}; expected one of {sorted(TABLES)}")
    return _raw_dir(where) / f"{name}.parquet"


def table_parts(where: Settings | Path, name: str) -> list[event_days.Part]:
    """The parquet files that hold table ``name``, in canonical order ([] when absent):
    the interactions' day parts (or their legacy single file), else the table's one file
    (as a part of day "")."""
    if name == "interactions":
        return event_days.list_parts(_raw_dir(where))
    path = table_path(where, name)
    return [event_days.Part("", 0, path)] if path.exists() else []


def is_day_partitioned(where: Settings | Path) -> bool:
    """Whether the interactions are a day-partitioned dataset (not a legacy single file)."""
    return event_days.dataset_dir(_raw_dir(where)).is_dir()


def _missing(raw: Path) -> UserError:
    return UserError(
        f"no raw data in {raw}: run `recstack data generate` or `recstack data import` first"
    )


def read_table(where: Settings | Path, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    """One canonical table (optionally only some columns); timestamps are UTC, µs. Optional
    columns a file from before them lacks read as their default (schema.OPTIONAL_COLUMNS)."""
    parts = table_parts(where, name)
    if not parts:
        raise _missing(_raw_dir(where))
    optional = OPTIONAL_COLUMNS.get(name, {})
    present = set(pq.read_schema(parts[0].path).names)
    absent = [c for c in (columns or TABLES[name].names) if c in optional and c not in present]
    wanted = None if columns is None else [c for c in columns if c not in absent]
    df = event_days.read_parts(parts, wanted).to_pandas()
    return df.assign(**{c: optional[c] for c in absent}) if absent else df


def read_days(
    where: Settings | Path, days: list[str], columns: list[str] | None = None
) -> pd.DataFrame:
    """The interactions of the UTC days ``days`` (``YYYY-MM-DD``) in canonical order: only
    those days' parts are read (a legacy single file is read whole, then filtered)."""
    if not is_day_partitioned(where):
        df = read_table(where, "interactions")
        df = df[np.isin(event_days.day_names(pa.array(df["timestamp"])), days)]
        df = df.reset_index(drop=True)
        return df if columns is None else df[columns]
    wanted = set(days)
    parts = [p for p in event_days.list_parts(_raw_dir(where)) if p.day in wanted]
    if not parts:
        empty = TABLES["interactions"].empty_table()
        return (empty if columns is None else empty.select(columns)).to_pandas()
    return event_days.read_parts(parts, columns).to_pandas()


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


def _table_hash(h: hashlib._Hash, name: str, t: pa.Table) -> None:
    h.update(f"{name}:{t.num_rows}:{t.schema.to_string(show_schema_metadata=False)}".encode())
    # pandas' row hash uses a fixed key, so equal contents give equal bytes everywhere.
    h.update(pd.util.hash_pandas_object(t.to_pandas(), index=False).to_numpy().tobytes())


def _snapshot(days: dict[str, dict[str, object]], items: pa.Table, users: pa.Table) -> str:
    """The snapshot from the interactions' day summaries and the other two tables."""
    h = hashlib.sha256()
    n = sum(int(d["rows"]) for d in days.values())  # type: ignore[call-overload]
    schema = TABLES["interactions"].to_string(show_schema_metadata=False)
    h.update(f"interactions:{n}:{schema}".encode())
    for day, d in sorted(days.items()):
        h.update(f"{day}:{d['rows']}:{d['hash']};".encode())
    _table_hash(h, "items", items)
    _table_hash(h, "users", users)
    return h.hexdigest()[:16]


def snapshot(tables: dict[str, pa.Table]) -> str:
    """Deterministic content hash of the three tables (hex SHA-256, first 16 chars)."""
    days = event_days.day_summaries(event_days.split_by_day(tables["interactions"]))
    return _snapshot(days, tables["items"], tables["users"])


def _iso(ts: pd.Timestamp) -> str:
    return pd.Timestamp(ts).tz_convert("UTC").isoformat()


def _event_counts(inter: pa.Table) -> dict[str, int]:
    vc = pc.value_counts(inter["event"])
    got = dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True))
    return {e: int(got.get(e, 0)) for e in EVENTS}


def _meta(
    days: dict[str, dict[str, object]],
    events: dict[str, int],
    items: pa.Table,
    users: pa.Table,
    source: str,
    start: pd.Timestamp,
    end: pd.Timestamp,
    lineage: str | None,
    extra: dict[str, object] | None = None,
) -> dict[str, object]:
    """meta.json of interactions summarised by ``days`` and ``events`` (counts per event);
    ``lineage`` None: this write starts one (a full write)."""
    tables = {"items": items, "users": users}

    def card(name: str, col: str) -> int:
        v = tables[name][col].to_numpy()
        return int(v.max()) + 1 if v.size else 0

    snap = _snapshot(days, items, users)
    return {
        "source": source,
        "snapshot": snap,
        "n_users": users.num_rows,
        "n_items": items.num_rows,
        "n_categories": card("items", "category"),
        "start": _iso(start),
        "end": _iso(end),
        "n_interactions": sum(int(d["rows"]) for d in days.values()),  # type: ignore[call-overload]
        "events": events,
        "cardinalities": {c: card(n, c) for n, cols in CODE_COLUMNS.items() for c in cols},
        **(extra or {}),
        "days": days,
        "lineage": lineage or snap,
    }


def _write_keys(folder: Path, keys: dict[str, pd.DataFrame]) -> None:
    for name, df in keys.items():
        id_col, key_col = KEY_COLUMNS[name]
        kt = pa.table(
            {
                id_col: pa.array(df[id_col], pa.int64()),
                key_col: pa.array(df[key_col], pa.string()),
            }
        )
        pq.write_table(kt, folder / KEY_FILES[name], compression="zstd")


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
    exactly as it was. ``start``/``end`` default to the interactions' time range. The
    interactions become one part per UTC day (exporters/event_days.py), each day's rows in
    their order in ``tables``. Returns ``raw_dir``.
    """
    raw = settings.raw_dir
    raw.parent.mkdir(parents=True, exist_ok=True)
    arrow = {name: to_arrow(name, df) for name, df in tables.as_dict().items()}
    validate(arrow)
    with _staged(raw) as tmp:
        kept = _write_days(raw, tmp, event_days.split_by_day(arrow["interactions"]))
        for name in ("items", "users"):
            pq.write_table(arrow[name], tmp / f"{name}.parquet", compression="zstd")
        _write_keys(tmp, keys or {})
        # Read back what is on disk: the snapshot describes the files, not our memory.
        written_arrow = {
            "interactions": event_days.read_parts(event_days.list_parts(tmp)),
            **{name: pq.read_table(tmp / f"{name}.parquet") for name in ("items", "users")},
        }
        validate(written_arrow)
        inter = written_arrow["interactions"]
        days = event_days.day_summaries(event_days.split_by_day(inter))
        meta = _meta(
            days,
            _event_counts(inter),
            written_arrow["items"],
            written_arrow["users"],
            source,
            start if start is not None else pd.Timestamp(pc.min(inter["timestamp"]).as_py()),
            end if end is not None else pd.Timestamp(pc.max(inter["timestamp"]).as_py()),
            lineage=None,
            extra=extra_meta,
        )
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info(
        "raw data %s: %d interactions (%d of %d days' files kept), %d users, %d items -> %s",
        meta["snapshot"],
        meta["n_interactions"],
        kept,
        len(days),
        meta["n_users"],
        meta["n_items"],
        raw,
    )
    return raw


def _write_days(raw: Path, tmp: Path, by_day: dict[str, pa.Table]) -> int:
    """One part per day of ``by_day`` under ``tmp``, except days whose rows equal (in
    order) those the current ``raw`` holds: their part files are hard-linked, not
    rewritten (a full write of the same events — new items folded in, a re-import of a
    longer export — leaves the old days' files as they were). Returns the days kept."""
    old_days: dict[str, dict[str, object]] = {}
    if is_day_partitioned(raw):
        with contextlib.suppress(UserError, OSError, ValueError):
            old_days = dict(read_meta(raw).get("days") or {})  # type: ignore[call-overload]
    old_parts = event_days.list_parts(raw) if old_days else []
    kept = 0
    for day, t in by_day.items():
        old = old_days.get(day)
        if old and old["rows"] == t.num_rows and old["hash"] == event_days.day_hash(t):
            for part in (p for p in old_parts if p.day == day):
                target = event_days.part_path(tmp, day, part.seq)
                target.parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(part.path, target)
            kept += 1
            continue
        path = event_days.part_path(tmp, day, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(t, path, compression="zstd")
    return kept


def append_interactions(
    settings: Settings,
    new: pd.DataFrame,
    users: pd.DataFrame | None = None,
    source: str | None = None,
    end: pd.Timestamp | None = None,
    extra_meta: dict[str, object] | None = None,
) -> str:
    """Add the interactions ``new`` (and replace the users table by ``users``, if given)
    without rewriting any existing part file; returns the new snapshot.

    Needs a day-partitioned dataset (:func:`is_day_partitioned`; a legacy single file is
    rewritten once by :func:`write_raw` instead). A new temporary folder beside ``raw_dir``
    gets hard links to every existing file (same inode: nothing is copied or rewritten),
    one new part per day that ``new`` falls on (``part-<last + 1>`` for a day that already
    has parts), the users table if given and ``meta.json``; the new parts are read back
    and validated with the items and users, then the folder is renamed over ``raw_dir``
    as :func:`write_raw` does. ``meta.json``: ``source``/``end`` replaced when given,
    ``extra_meta`` merged in, counts, ``days`` (touched days re-hashed) and ``snapshot``
    updated, ``lineage`` kept."""
    raw = settings.raw_dir
    if not is_day_partitioned(raw):
        raise UserError(f"{raw}: interactions are not day-partitioned; rewrite them with write_raw")
    meta = read_meta(raw)
    items = to_arrow("items", read_table(raw, "items"))
    users_t = to_arrow("users", users if users is not None else read_table(raw, "users"))
    added = to_arrow("interactions", new)
    validate({"interactions": added, "items": items, "users": users_t})
    added = added.take(pc.sort_indices(added, sort_keys=[(c, "ascending") for c in ORDER]))
    last_seq: dict[str, int] = {}
    for part in event_days.list_parts(raw):
        last_seq[part.day] = max(last_seq.get(part.day, -1), part.seq)
    with _staged(raw) as tmp:
        skip = {META_FILE, *(["users.parquet"] if users is not None else [])}
        _link_tree(raw, tmp, skip)
        touched = event_days.split_by_day(added)
        for day, t in touched.items():
            path = event_days.part_path(tmp, day, last_seq.get(day, -1) + 1)
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(t, path, compression="zstd")
        if users is not None:
            pq.write_table(users_t, tmp / "users.parquet", compression="zstd")
        parts = [p for p in event_days.list_parts(tmp) if p.day in touched]
        days = dict(meta.get("days") or {})  # type: ignore[call-overload]
        check = {"items": items, "users": to_arrow("users", read_table(tmp, "users"))}
        for day in touched:
            day_table = event_days.read_parts([p for p in parts if p.day == day])
            validate({"interactions": day_table, **check})
            days[day] = {"rows": day_table.num_rows, "hash": event_days.day_hash(day_table)}
        counts = _event_counts(added)
        events = {e: int(meta["events"].get(e, 0)) + counts[e] for e in EVENTS}  # type: ignore[attr-defined]
        hi = pd.Timestamp(pc.max(added["timestamp"]).as_py())
        carried = {k: v for k, v in meta.items() if k not in COMPUTED_META}
        new_meta = _meta(
            dict(sorted(days.items())),
            events,
            check["items"],
            check["users"],
            source or str(meta["source"]),
            pd.Timestamp(str(meta["start"])),
            end if end is not None else max(pd.Timestamp(str(meta["end"])), hi),
            lineage=str(meta.get("lineage") or meta["snapshot"]),
            extra={**carried, **(extra_meta or {})},
        )
        (tmp / META_FILE).write_text(json.dumps(new_meta, indent=2) + "\n")
    log.info(
        "raw data %s: %d interactions appended on %d day(s) -> %s",
        new_meta["snapshot"],
        added.num_rows,
        len(touched),
        raw,
    )
    return str(new_meta["snapshot"])


def _link_tree(src: Path, dest: Path, skip: set[str]) -> None:
    """Hard links in ``dest`` to every file under ``src`` (top-level names in ``skip``
    excepted), folders made as needed; a copy where the file system refuses links."""
    for path in src.rglob("*"):
        rel = path.relative_to(src)
        if rel.parts[0] in skip or any(p.startswith(".") for p in rel.parts):
            continue
        target = dest / rel
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(path, target)


def _link_or_copy(src: Path, dest: Path) -> None:
    """A hard link (same inode: nothing rewritten); a copy where links are refused."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


@contextlib.contextmanager
def _staged(raw: Path) -> Iterator[Path]:
    """A temporary folder beside ``raw`` to write the new raw data into: renamed over
    ``raw`` (:func:`_swap_in`) when the block ends, removed if it raises."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{raw.name}.tmp-", dir=raw.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the data folder is not a secret
        yield tmp
        _swap_in(tmp, raw)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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

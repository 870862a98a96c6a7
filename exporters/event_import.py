"""``recstack data import-events``: the event log's RecordEvents become raw interactions,
so the next ``recstack train`` learns from what users did with the served lists.

Each logged event (orchestrator/event_log.py) is one interaction ``(user_id, item_id,
timestamp, event)`` with the event's own timestamp to the microsecond, and the
``surface`` and ``device`` of the answer its ``request_id`` names (the served record; ""
without one). The values go through the same column checks as ``recstack data import``
(exporters/data_import.py) and the result through the same whole-table validation and
atomic swap (exporters/raw_tables.py). The new interactions are appended as new day part
files (``append_interactions``): no existing file is rewritten, and only the days the log's
events fall on are read to find duplicates. A workspace whose interactions are still one
legacy file is rewritten once, in the day layout. Rules:

- an event already in the raw interactions (same user, item, timestamp and event) or
  twice in the log is skipped: running the import twice adds nothing the second time;
- an event for an item the items table does not hold is skipped and counted (the catalog
  has changed since it was served; it has no item features to train on);
- a user the users table does not hold (a cold-start user who clicked) is added with the
  defaults of an import without a users file (codes 0, signed up at the first event);
- ``meta.json`` keeps its start, its end moves to the newest event if later, its other
  fields are kept, and ``imported_events`` counts what the log added. A new snapshot makes
  ``recstack train`` re-run every step.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa

from exporters import event_days
from exporters.data_import import (
    _context,
    _events,
    _first_times,
    _ids,
    _Source,
    _timestamps,
    _utc,
)
from exporters.raw_tables import (
    COMPUTED_META,
    RawTables,
    append_interactions,
    is_day_partitioned,
    read_days,
    read_keys,
    read_meta,
    read_raw,
    read_table,
    write_raw,
)
from exporters.schema import CONTEXT_COLUMNS, EVENTS
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

KEY = ["user_id", "item_id", "timestamp", "event"]


@dataclass(frozen=True)
class ImportSummary:
    logged: int  # events read from the log
    added: int  # new interactions
    duplicates: int  # already imported, or twice in the log
    unknown_items: int  # skipped: not in the items table
    new_users: int  # added to the users table
    snapshot: str | None  # the new raw snapshot (None: nothing written)


def _logged_events(settings: Settings, since: datetime | None) -> pa.Table:
    from orchestrator.event_log import read_records

    folder = settings.events_dir
    if not folder.is_dir():
        raise UserError(f"no event log in {folder} (RECSTACK_EVENTS_DIR)")
    since_us = None if since is None else int(since.timestamp() * 1_000_000)
    cols: dict[str, list[object]] = {
        "user_id": [],
        "item_id": [],
        "timestamp": [],
        "event": [],
    }
    request_ids: list[str] = []
    # The request context of an event is that of the answer it names (its request_id):
    # served records come before the events that follow them in the log.
    context: dict[str, tuple[str, str]] = {}
    for rec in read_records(folder, since_us, kinds=("served", "event")):
        if rec.get("kind") == "served":
            rid = rec.get("request_id")
            if rid:
                context[str(rid)] = (str(rec.get("surface") or ""), str(rec.get("device") or ""))
            continue
        cols["user_id"].append(rec.get("user_id"))
        cols["item_id"].append(rec.get("item_id"))
        cols["timestamp"].append(rec.get("ts_us"))
        cols["event"].append(rec.get("event"))
        request_ids.append(str(rec.get("request_id") or ""))
    ctx = [context.get(r, ("", "")) for r in request_ids]
    try:
        return pa.table(
            {
                "user_id": pa.array(cols["user_id"], pa.int64()),
                "item_id": pa.array(cols["item_id"], pa.int64()),
                "timestamp": pa.array(cols["timestamp"], pa.int64()).cast(
                    pa.timestamp("us", tz="UTC")
                ),
                "event": pa.array(cols["event"], pa.string()),
                "surface": pa.array([c[0] for c in ctx], pa.string()),
                "device": pa.array([c[1] for c in ctx], pa.string()),
            }
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as e:
        raise UserError(f"{folder}: an event record has a value of the wrong type: {e}") from e


def import_events(settings: Settings, since: datetime | None = None) -> ImportSummary:
    """Append the logged events (made at or after ``since``) to the raw interactions; see
    the module docstring for the rules. Writes nothing when nothing is new."""
    table = _logged_events(settings, since)
    if table.num_rows == 0:
        return ImportSummary(0, 0, 0, 0, 0, None)
    src = _Source(settings.events_dir, table, is_csv=False)
    user_ids = _ids(src, "user_id")
    item_ids = _ids(src, "item_id")
    ts = _timestamps(src, "timestamp")
    codes, _ = _events(src)  # logged events carry an event column
    meta = read_meta(settings)
    items = read_table(settings, "items", ["item_id"])

    known = np.isin(item_ids, items["item_id"].to_numpy())
    unknown_items = int((~known).sum())
    if unknown_items:
        log.warning("%d logged events name items the items table lacks: skipped", unknown_items)
    new = pd.DataFrame(
        {
            "user_id": user_ids[known],
            "item_id": item_ids[known],
            "timestamp": ts[known],
            "event": np.asarray(EVENTS, dtype=object)[codes[known]],
            **{c: _context(src, c)[known] for c in CONTEXT_COLUMNS},
        }
    )
    deduped = new.drop_duplicates(KEY)
    # An event can only repeat a raw interaction of its own UTC day: read only those days.
    days = sorted(set(event_days.day_names(pa.array(_utc(deduped["timestamp"].to_numpy())))))
    old = read_days(settings, days, KEY)
    old_keys = pd.DataFrame(
        {
            "user_id": old["user_id"].to_numpy(np.int64),
            "item_id": old["item_id"].to_numpy(np.int64),
            "timestamp": old["timestamp"]
            .dt.tz_convert(None)
            .to_numpy("datetime64[us]")
            .view(np.int64),
            "event": old["event"].astype(str).to_numpy(object),
        }
    ).drop_duplicates()
    merged = deduped.merge(old_keys, on=KEY, how="left", indicator=True)
    fresh = merged[merged["_merge"] == "left_only"].drop(columns="_merge")
    duplicates = int(known.sum()) - len(fresh)
    if fresh.empty:
        return ImportSummary(table.num_rows, 0, duplicates, unknown_items, 0, None)

    users = read_table(settings, "users")
    missing = np.setdiff1d(fresh["user_id"].unique(), users["user_id"].to_numpy())
    if len(missing):
        u = fresh["user_id"].to_numpy(np.int64)
        t = fresh["timestamp"].to_numpy(np.int64)
        signup = _first_times(missing, u, t, np.full(len(missing), np.iinfo(np.int64).min), "")
        users = pd.concat(
            [
                users,
                pd.DataFrame(
                    {
                        "user_id": missing,
                        "age_bucket": 0,
                        "country": 0,
                        "signup_at": _utc(signup),
                    }
                ),
            ],
            ignore_index=True,
        ).sort_values("user_id", kind="stable")
    added = pd.DataFrame(
        {
            "user_id": fresh["user_id"].to_numpy(np.int64),
            "item_id": fresh["item_id"].to_numpy(np.int64),
            "timestamp": _utc(fresh["timestamp"].to_numpy(np.int64)),
            "event": fresh["event"].to_numpy(object),
            **{c: fresh[c].to_numpy(object) for c in CONTEXT_COLUMNS},
        }
    )
    end = max(pd.Timestamp(str(meta["end"])), added["timestamp"].max())
    imported = int(meta.get("imported_events", 0) or 0) + len(added)  # type: ignore[call-overload]
    source = str(meta["source"])
    if "+events" not in source:
        source += "+events"
    if is_day_partitioned(settings):
        snapshot = append_interactions(
            settings,
            added,
            users=users.reset_index(drop=True) if len(missing) else None,
            source=source,
            end=end,
            extra_meta={"imported_events": imported},
        )
    else:
        _rewrite_legacy(settings, meta, added, users, source, end, imported)
        snapshot = str(read_meta(settings)["snapshot"])
    return ImportSummary(
        table.num_rows, len(added), duplicates, unknown_items, len(missing), snapshot
    )


def _rewrite_legacy(
    settings: Settings,
    meta: dict[str, object],
    added: pd.DataFrame,
    users: pd.DataFrame,
    source: str,
    end: pd.Timestamp,
    imported: int,
) -> None:
    """A workspace whose interactions are one legacy file: the whole table, re-sorted,
    through ``write_raw`` once, which writes the day layout (later imports append)."""
    raw = read_raw(settings)
    old = raw.interactions
    as_text = {c: old[c].astype(str) for c in ("event", *CONTEXT_COLUMNS)}
    inter = pd.concat([old.assign(**as_text), added], ignore_index=True)
    inter = inter.sort_values(list(event_days.ORDER), kind="stable")
    extra = {k: v for k, v in meta.items() if k not in COMPUTED_META}
    extra["imported_events"] = imported
    write_raw(
        settings,
        RawTables(interactions=inter.reset_index(drop=True), items=raw.items, users=users),
        source=source,
        start=pd.Timestamp(str(meta["start"])),
        end=end,
        extra_meta=extra,
        keys=read_keys(settings),  # the imported data's string ids stay named
    )


def cli(args: argparse.Namespace) -> int:
    """``recstack data import-events [--since S]``."""
    from exporters.ab_report import parse_since

    settings = get_settings()
    s = import_events(settings, parse_since(args.since) if args.since else None)
    print(
        f"{s.logged:,} logged events: {s.added:,} added, {s.duplicates:,} already imported,"
        f" {s.unknown_items:,} for unknown items skipped, {s.new_users:,} new users"
    )
    if s.snapshot is None:
        print(f"raw data unchanged ({settings.raw_dir})")
    else:
        print(f"raw data snapshot {s.snapshot} -> {settings.raw_dir}; `recstack train` uses it")
    return 0

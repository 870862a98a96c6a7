"""What the feature tables and the online store were made from, and the time window an
incremental materialisation must cover (``recstack features materialize --incremental``,
the pipeline's ``feast_materialize`` step).

Two small records:

- ``<work_dir>/features_source.json`` (written by ``feature_tables.build``): the raw data
  the feature tables were built from — its snapshot, lineage and per-day hashes
  (meta.json, exporters/raw_tables.py) — and the build's configuration.
- ``<registry dir>/materialized.json`` (written by ``feast_ops.materialize``): that record
  as of the last materialisation into this online store, plus the materialisation's end.

Why a window is enough. The raw data only grows by appends within one lineage
(``recstack data import-events``); the feature tables are then rebuilt whole (below), and
every row whose value can differ from the previous build has ``event_timestamp`` at or
after the start of the earliest *changed* day (a day with new rows): the daily statistics
of day D (timestamped at the end of D) depend only on days <= D, recent/seen-items rows
are timestamped at events at or after the first new one, and new users sign up at their
first event. Rows of days after the previous last day are new too (an old event leaving a
7- or 30-day window on a day that did not exist before), so the window also starts no
later than just after the end of the previous last day (the rows stamped exactly then are
that day's own), and no later than the previous materialisation's end. Every entity with
a row in ``[start, end]`` gets its newest row (which is then its newest overall); every
other entity's newest row is older than ``start``, unchanged, and already online. So the
online store ends up exactly as after a full materialisation, having written only the
window's entities.

Anything else — another lineage (a full `data generate`/`import`, items folded in), days
that disappeared, another offline engine or online store, changed feature definitions
(``feature_repo/`` files) or build configuration, a missing record — falls back to a
full materialisation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd

from recstack.atomic_files import write_json_atomic
from recstack.settings import Settings

log = logging.getLogger(__name__)

BUILD_RECORD = "features_source.json"
MATERIALIZED_RECORD = "materialized.json"


def build_record_path(settings: Settings) -> Path:
    """``<work_dir>/features_source.json``."""
    return settings.work_dir / BUILD_RECORD


def _repo_hash(settings: Settings) -> str:
    """Hash of the feature repository's definitions and YAML files (names and bytes)."""
    h = hashlib.sha256()
    repo = settings.feature_repo
    for path in sorted([*repo.glob("*.py"), *repo.glob("*.yaml")]):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def record_build(
    settings: Settings, meta: Mapping[str, object], config: Mapping[str, object]
) -> None:
    """After a feature-table build from the raw data of ``meta``: what it was built from.
    ``config``: the build's inputs besides the raw data (engine, seen events, ...)."""
    write_json_atomic(
        build_record_path(settings),
        {
            "snapshot": meta.get("snapshot"),
            "lineage": meta.get("lineage"),
            "days": {d: v["hash"] for d, v in (meta.get("days") or {}).items()},  # type: ignore[attr-defined]
            "config": config,
        },
    )


def _materialized_path(registry: Path) -> Path:
    return registry.parent / MATERIALIZED_RECORD


def forget(registry: Path) -> None:
    """Drop the record of the last materialisation (before one starts: if it fails half
    way, the next incremental one must not trust the old record)."""
    _materialized_path(registry).unlink(missing_ok=True)


def record_materialized(settings: Settings, registry: Path, end: datetime) -> None:
    """After a successful materialisation up to ``end`` into the store of ``registry``."""
    built = _read_json(build_record_path(settings))
    if built is None:
        return
    write_json_atomic(
        _materialized_path(registry),
        {**built, "end": end.isoformat(), "store": _store_config(settings)},
    )


def _store_config(settings: Settings) -> dict[str, object]:
    return {
        "online_store": settings.online_store,
        "offline_engine": settings.offline_engine,
        "repo": _repo_hash(settings),
    }


def incremental_start(settings: Settings, registry: Path) -> tuple[datetime | None, str]:
    """The start of the window an incremental materialisation must write (module
    docstring), or None when only a full one is correct; with the reason, for the log."""
    prev = _read_json(_materialized_path(registry))
    built = _read_json(build_record_path(settings))
    if prev is None:
        return None, "no record of an earlier materialisation into this store"
    if built is None:
        return None, "no record of what the feature tables were built from"
    if prev.get("store") != _store_config(settings):
        return None, "another online store, offline engine or feature repository since"
    if prev.get("config") != built.get("config"):
        return None, "the feature tables were built with another configuration"
    if not built.get("lineage") or prev.get("lineage") != built.get("lineage"):
        return None, "the raw data was replaced (not only appended to) since"
    old: dict[str, str] = prev.get("days") or {}  # type: ignore[assignment]
    new: dict[str, str] = built.get("days") or {}  # type: ignore[assignment]
    if not old or set(old) - set(new):
        return None, "days of raw data disappeared since"
    end = pd.Timestamp(str(prev["end"])).to_pydatetime()
    changed = sorted(d for d, h in new.items() if old.get(d) != h)
    # Rows stamped exactly at midnight after the old last day are that day's statistics
    # (unchanged unless the day is in ``changed``); a new day's rows come strictly later.
    after_last = _midnight(max(old)) + timedelta(days=1, microseconds=1)
    starts = [after_last, end, *([_midnight(changed[0])] if changed else [])]
    return min(starts), f"{len(changed)} changed day(s) since the last materialisation"


def _midnight(day: str) -> datetime:
    return datetime.fromisoformat(day).replace(tzinfo=UTC)

"""Raw data in the day layout with appended parts: the same rows as a source workspace,
written as a full write of most of them plus an append (exporters/raw_tables.py
``append_interactions``) of the last day (a new day partition) and every third row of
the two days before it (a second part file for those days)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from exporters import event_days
from exporters.raw_tables import (
    COMPUTED_META,
    RawTables,
    append_interactions,
    read_meta,
    read_raw,
    write_raw,
)
from orchestrator.event_log import EventLog, LogConfig
from orchestrator.request import EventQuery
from recstack.settings import Settings


def split_for_append(inter: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the rows of the full write, the rows appended afterwards); see the module docstring."""
    days = event_days.day_names(pa.array(inter["timestamp"]))
    last = sorted(set(days))[-3:]
    pos = np.arange(len(inter))
    later = (days == last[2]) | (np.isin(days, last[:2]) & (pos % 3 == 0))
    return inter[~later].reset_index(drop=True), inter[later].reset_index(drop=True)


def appended_copy(src: Settings, dest: Path) -> Settings:
    """``src``'s raw data re-written under ``dest`` (a new data_dir) as a full write plus
    an append; returns settings for it (feature_repo etc. as in ``src``)."""
    s = src.model_copy(update={"data_dir": dest / "data"})
    raw = read_raw(src)
    meta = read_meta(src)
    first, later = split_for_append(raw.interactions)
    extra = {k: v for k, v in meta.items() if k not in COMPUTED_META}
    write_raw(
        s,
        RawTables(interactions=first, items=raw.items, users=raw.users),
        source=str(meta["source"]),
        start=pd.Timestamp(str(meta["start"])),
        end=pd.Timestamp(str(meta["end"])),
        extra_meta=extra,
    )
    append_interactions(s, later)
    return s


def log_events(s: Settings, events: list[EventQuery]) -> None:
    """Write ``events`` to ``s``'s event log as the orchestrator does (for import-events)."""
    log = EventLog(LogConfig(s.events_dir, flush_ms=10))
    for e in events:
        log.event(e)
    log.close()

"""Canonical raw tables: the one definition every offline step reads.

``recstack data generate`` and ``recstack data import`` both write these three tables
under ``<data_dir>/raw/`` (the interactions as day partitions, exporters/event_days.py;
items and users as one parquet file each); nothing downstream reads any other raw format.

- interactions: one row per event. ``event`` is one of EVENTS (imported ratings are
  mapped to events, see exporters/data_import.py). ``surface`` and ``device`` are the
  request context the event happened in (``""``: not known), the same free text as a
  Recommend's ``context``; they define the cold-start context segments
  (exporters/candidates.py). Optional: a table without them gets ``""``.
- items: catalog metadata. ``category`` and ``brand`` are small non-negative integer codes.
- users: profile attributes. ``age_bucket`` and ``country`` are small integer codes.

Timestamps are UTC, microsecond precision. Ids are non-negative int64.
"""

from __future__ import annotations

import pyarrow as pa

EVENTS: tuple[str, ...] = ("view", "click", "purchase")

TS = pa.timestamp("us", tz="UTC")

INTERACTIONS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("timestamp", TS),
        ("event", pa.string()),
        ("surface", pa.string()),
        ("device", pa.string()),
    ]
)

# The interactions' request-context columns, and the longest value (as a Recommend's
# context.surface / context.device: orchestrator/request.py MAX_TEXT).
CONTEXT_COLUMNS: tuple[str, ...] = ("surface", "device")
CONTEXT_MAX_CHARS = 128
# Columns a table may lack: filled with this value (tables written before they existed,
# generators and imports without a request context).
OPTIONAL_COLUMNS: dict[str, dict[str, object]] = {"interactions": {c: "" for c in CONTEXT_COLUMNS}}

ITEMS = pa.schema(
    [
        ("item_id", pa.int64()),
        ("category", pa.int64()),
        ("brand", pa.int64()),
        ("price", pa.float64()),
        ("created_at", TS),
    ]
)

USERS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("age_bucket", pa.int64()),
        ("country", pa.int64()),
        ("signup_at", TS),
    ]
)

TABLES: dict[str, pa.Schema] = {"interactions": INTERACTIONS, "items": ITEMS, "users": USERS}

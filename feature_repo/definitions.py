"""recstack's Feast definitions: the one place that lists features.

Sources are the parquet tables written by ``exporters/feature_tables.py`` (column meanings
and timestamp semantics are documented there and in docs/features.md). Helper code lives
outside this folder because ``feast apply`` imports every ``.py`` file in it.

Two feature services are the contracts readers ask for by name:

- ``retrieval``: what the user tower needs (profile codes + recent items);
- ``filtering``: the user's seen items (never recommended again; the item-to-item
  candidate source's history);
- ``ranking``: user activity statistics (ending with the category affinity vector), then
  item profile, then item statistics. Its order (service order, then each view's schema
  order) is the ranker's feature order; only append to it, and bump the ranker's layout
  when you do.

FileSource paths come from ``RECSTACK_FEATURES_DIR``, which ``recstack features apply``
sets to ``settings.features_dir`` while it parses this file (the paths are stored in the
registry, which lives beside them under the same data_dir).

``RECSTACK_OFFLINE_STORE`` (set the same way from ``settings.offline_engine``) picks the
source class of the same parquet files: ``file`` (FileSource, Feast's file offline store)
or ``spark`` (SparkSource, Feast's Spark offline store, docs/offline.md).
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource
from feast.data_source import DataSource
from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource
from feast.types import Array, Float32, Float64, Int64
from feast.value_type import ValueType

FEATURES_DIR = Path(
    os.environ.get("RECSTACK_FEATURES_DIR")
    or Path(__file__).resolve().parent.parent / "data" / "features"
)

# A TTL of 0 keeps a value forever: profiles never expire, and statistics rows are written
# on every day their value changes (see exporters/feature_tables.py), so the newest row is
# current however old it is. Recent items are a user's state until the next event.
FOREVER = timedelta(0)

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.INT64, description="a user")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="an item")


OFFLINE_STORE = os.environ.get("RECSTACK_OFFLINE_STORE") or "file"
if OFFLINE_STORE not in ("file", "spark"):
    raise ValueError(f"RECSTACK_OFFLINE_STORE={OFFLINE_STORE!r}: expected file or spark")


def _file(name: str) -> DataSource:
    path = str(FEATURES_DIR / f"{name}.parquet")
    if OFFLINE_STORE == "spark":
        return SparkSource(
            name=f"{name}_source",
            path=path,
            file_format="parquet",
            timestamp_field="event_timestamp",
        )
    return FileSource(name=f"{name}_source", path=path, timestamp_field="event_timestamp")


user_profile_source = _file("user_profile")
user_activity_source = _file("user_activity")
user_recent_items_source = _file("user_recent_items")
user_seen_items_source = _file("user_seen_items")
item_profile_source = _file("item_profile")
item_statistics_source = _file("item_statistics")

# Real-time user events: the orchestrator pushes a user's new recent-items row here after
# a click or purchase (orchestrator/online_features.py: push_event).
user_events_push = PushSource(name="user_events_push", batch_source=user_recent_items_source)
# ... and its new seen-items row after any seen event (exporters/seen.py).
user_seen_push = PushSource(name="user_seen_push", batch_source=user_seen_items_source)

user_profile = FeatureView(
    name="user_profile",
    entities=[user],
    ttl=FOREVER,
    schema=[Field(name="age_bucket", dtype=Int64), Field(name="country", dtype=Int64)],
    source=user_profile_source,
    description="profile codes as of sign-up",
)

user_activity = FeatureView(
    name="user_activity",
    entities=[user],
    ttl=FOREVER,
    schema=[
        Field(name="user_views_7d", dtype=Int64),
        Field(name="user_clicks_7d", dtype=Int64),
        Field(name="user_purchases_7d", dtype=Int64),
        Field(name="user_views_30d", dtype=Int64),
        Field(name="user_clicks_30d", dtype=Int64),
        Field(name="user_purchases_30d", dtype=Int64),
        Field(name="user_last_event_at", dtype=Float64, description="unix seconds"),
        Field(name="user_mean_purchase_price", dtype=Float64, description="0: no purchase"),
        Field(
            name="user_category_affinity",
            dtype=Array(Float32),
            description="decayed event counts per category, sums to 1 (n_categories long)",
        ),
    ],
    source=user_activity_source,
    description="daily trailing-window statistics, as of the end of each change day",
)

user_recent_items = FeatureView(
    name="user_recent_items",
    entities=[user],
    ttl=FOREVER,
    schema=[
        Field(
            name="recent_items",
            dtype=Array(Int64),
            description="last 20 distinct clicked/purchased items, newest first",
        )
    ],
    source=user_events_push,
    description="exporters/history.py; batch rows per event, real-time rows by push",
)

user_seen_items = FeatureView(
    name="user_seen_items",
    entities=[user],
    ttl=FOREVER,
    schema=[
        Field(
            name="seen_items",
            dtype=Array(Int64),
            description="every distinct item of a seen event, newest first (capped)",
        )
    ],
    source=user_seen_push,
    description="exporters/seen.py; serving-side state (latest row per user), real-time push",
)

item_profile = FeatureView(
    name="item_profile",
    entities=[item],
    ttl=FOREVER,
    schema=[
        Field(name="category", dtype=Int64),
        Field(name="brand", dtype=Int64),
        Field(name="price", dtype=Float64),
        Field(name="created_at", dtype=Float64, description="unix seconds"),
    ],
    source=item_profile_source,
    description="catalog attributes as of creation",
)

item_statistics = FeatureView(
    name="item_statistics",
    entities=[item],
    ttl=FOREVER,
    schema=[
        Field(name="item_views_7d", dtype=Int64),
        Field(name="item_clicks_7d", dtype=Int64),
        Field(name="item_purchases_7d", dtype=Int64),
        Field(name="item_views_30d", dtype=Int64),
        Field(name="item_clicks_30d", dtype=Int64),
        Field(name="item_purchases_30d", dtype=Int64),
        Field(name="item_ctr_30d", dtype=Float32),
        Field(name="item_popularity_rank", dtype=Int64, description="1 = most events in 7d"),
    ],
    source=item_statistics_source,
    description="daily trailing-window statistics, as of the end of each change day",
)

retrieval = FeatureService(
    name="retrieval",
    features=[user_profile, user_recent_items],
    description="user tower inputs",
)

filtering = FeatureService(
    name="filtering",
    features=[user_seen_items],
    description="what serving must never recommend again (seen items)",
)

ranking = FeatureService(
    name="ranking",
    features=[user_activity, item_profile, item_statistics],
    description="ranker inputs; the order is the ranker's feature order",
)

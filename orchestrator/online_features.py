"""Online features for one request: the user through Feast, candidate items from an
in-memory snapshot, and real-time pushes of user events.

Why two paths: Feast's ``get_online_features`` costs ~0.4 ms for one user but ~27 ms p50 /
~128 ms p99 for 500 items (DESIGN.md), so per request

- the user is one online-store read per user feature view (``retrieval`` + the user part
  of ``ranking``) through Feast's provider (:class:`EntityRowReader`) — real-time pushes
  are visible immediately;
- items come from :class:`ItemSnapshot`: numpy arrays holding, per item, the newest row of
  each item feature view with ``event_timestamp <=`` that view's last materialisation end
  (read from the Feast registry), taken from the view's batch source — exactly the row
  Feast's (full-from-the-start) materialisation wrote into the online store. It is
  refreshed by :meth:`OnlineFeatures.refresh`, which the orchestrator calls every
  ``RECSTACK_FEATURE_REFRESH_S`` seconds (it reloads only when the registry says
  something new was materialised; orchestrator/service.py). Freshness: as of the last
  materialisation, like the online store.

Feature lists, dtypes and sources come from the Feast registry (the ``ranking`` and
``retrieval`` services); nothing here repeats them. Unknown ids get the defaults in
exporters/feature_tables.py (FEATURE_DEFAULTS), never an exception. An online store
that cannot be reached raises :class:`FeatureStoreUnavailable`, fast: every read and push
gives up after ``settings.online_store_timeout_ms`` (SQLite busy timeout, Redis socket
timeouts with one retry; exporters/feast_ops.py ``bound_online_io``), and with a
:class:`~orchestrator.breaker.Breakers` the store has a circuit breaker: failures and
user reads slower than that timeout open it, and while it is open every read and push
fails at once (cause :class:`~orchestrator.breaker.CircuitOpen`). On a Redis Cluster each
master has its own breaker, chosen by the slot of the user's key.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from feast import FeatureStore, FeatureView
from feast.data_source import PushMode, PushSource

from exporters import feast_ops, history
from exporters.feast_ops import ServiceFeature
from exporters.feature_tables import decode_vector, default_value
from exporters.raw_tables import read_meta
from exporters.schema import EVENTS
from exporters.seen import seen_events, update_seen
from orchestrator.breaker import Breakers, CircuitBreaker, CircuitOpen
from orchestrator.id_index import IdIndex
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

RETRIEVAL_SERVICE = "retrieval"
RANKING_SERVICE = "ranking"
FILTERING_SERVICE = "filtering"
PUSH_SOURCE = "user_events_push"
SEEN_PUSH_SOURCE = "user_seen_push"
RECENT_ITEMS = "recent_items"
RECENT_VIEW = "user_recent_items"
SEEN_ITEMS = "seen_items"
SEEN_VIEW = "user_seen_items"
USER_KEY, ITEM_KEY = "user_id", "item_id"
# Item features with a role of their own in the feature assembly.
CATEGORY, CREATED_AT = "category", "created_at"


class FeatureStoreUnavailable(RuntimeError):
    """The Feast online store could not be reached (down, timed out, or not set up)."""

    def __init__(self, store: str, cause: BaseException) -> None:
        super().__init__(
            f"Feast online store ({store}) unavailable: {type(cause).__name__}: {cause}"
        )
        self.store = store


@functools.cache  # asked on every user read: the tuple is built once
def _unavailable_errors() -> tuple[type[BaseException], ...]:
    import redis.exceptions as rex

    return (
        rex.ConnectionError,
        rex.TimeoutError,
        # Redis Cluster: slots not served (CLUSTERDOWN, a master down or not yet rejoined),
        # TRYAGAIN, redirections left over after the client's own, no node reachable.
        rex.ClusterError,
        rex.TryAgainError,
        rex.AskError,
        rex.RedisClusterException,
        sqlite3.OperationalError,
        sqlite3.DatabaseError,
        ConnectionError,
        TimeoutError,
    )


@dataclass(frozen=True)
class UserFeatures:
    """One user's features. ``scalars`` follow ``scalar_names`` (the ranking service's user
    features without the vector); ``known`` is False when the store had no row at all."""

    user_id: int
    known: bool
    age_bucket: int
    country: int
    recent_items: np.ndarray  # int64 [HISTORY_LEN], newest first, padded with history.PAD
    scalar_names: tuple[str, ...]
    scalars: np.ndarray  # float32 [U]
    category_affinity: np.ndarray  # float32 [C] (zeros when unknown)
    # Every item of a seen event, newest first (exporters/seen.py); empty when the
    # registry has no ``filtering`` service (a repository older than seen items).
    seen_items: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def scalar(self, name: str) -> float:
        return float(self.scalars[self.scalar_names.index(name)])


@dataclass(frozen=True)
class ItemFeatures:
    """Features of N items in request order: ``matrix`` [N, F] float32 in ``names`` order
    (the ranking service's item features), plus category and creation time at full
    precision. ``known`` marks items present in the snapshot."""

    item_ids: np.ndarray  # int64 [N]
    names: tuple[str, ...]
    matrix: np.ndarray  # float32 [N, F]
    category: np.ndarray  # int64 [N]
    created_at: np.ndarray  # float64 [N], unix seconds
    known: np.ndarray  # bool [N]

    def columns(self, names: Sequence[str]) -> np.ndarray:
        """The float32 [N, len(names)] sub-matrix for ``names``, in that order."""
        idx = [self.names.index(n) for n in names]
        return self.matrix[:, idx]


@dataclass
class ItemSnapshot:
    """Item features for every materialised item, as sorted ids and aligned arrays."""

    names: tuple[str, ...]
    ids: np.ndarray  # int64 [M], unique; sorted, then items added since the release
    matrix: np.ndarray  # float32 [M, F]
    category: np.ndarray  # int64 [M]
    created_at: np.ndarray  # float64 [M]
    as_of: dict[str, datetime | None] = field(default_factory=dict)  # view -> end
    # Computed once: lookup runs on every request (hot path).
    defaults: np.ndarray = field(init=False, repr=False)
    positions: IdIndex = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.defaults = np.array([default_value(n) for n in self.names], dtype=np.float32)
        self.positions = IdIndex(self.ids)

    def lookup(self, item_ids: np.ndarray) -> ItemFeatures:
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        defaults = self.defaults
        if len(self.ids):
            pos, known = self.positions.positions(ids)
            # Gather, then patch the (rare) unknown rows: cheaper than np.where over [N, F].
            matrix = self.matrix[pos]
            category = self.category[pos]
            created = self.created_at[pos]
            if not known.all():
                unknown = ~known
                matrix[unknown] = defaults
                category[unknown] = int(default_value(CATEGORY))
                created[unknown] = default_value(CREATED_AT)
        else:
            known = np.zeros(len(ids), dtype=bool)
            matrix = np.broadcast_to(defaults, (len(ids), len(self.names))).copy()
            category = np.full(len(ids), int(default_value(CATEGORY)), dtype=np.int64)
            created = np.full(len(ids), default_value(CREATED_AT), dtype=np.float64)
        return ItemFeatures(
            ids, self.names, matrix.astype(np.float32, copy=False), category, created, known
        )


def _materialized_end(store: FeatureStore, view: str) -> datetime | None:
    intervals = store.get_feature_view(view, allow_registry_cache=True).materialization_intervals
    return max((end for _, end in intervals), default=None)


def load_item_snapshot(store: FeatureStore, features: Sequence[ServiceFeature]) -> ItemSnapshot:
    """Build the snapshot from each item view's batch source, as of its materialisation."""
    names = tuple(f.name for f in features)
    by_view: dict[str, list[str]] = {}
    for f in features:
        by_view.setdefault(f.view, []).append(f.name)
    frames: list[pd.DataFrame] = []
    as_of: dict[str, datetime | None] = {}
    for view_name, cols in by_view.items():
        view = store.get_feature_view(view_name, allow_registry_cache=True)
        end = _materialized_end(store, view_name)
        as_of[view_name] = end
        if end is None:
            log.warning("feature view %s was never materialised: its items get defaults", view_name)
            continue
        path, ts = feast_ops.batch_table(store, view)
        table = pq.read_table(path, columns=[ITEM_KEY, ts, *cols])
        table = table.filter(pc.less_equal(table[ts], pc.cast(end, table[ts].type)))
        df = table.to_pandas()
        # Newest row per item (stable sort: ties keep file order, like Feast's dedup).
        df = df.sort_values(ts, kind="stable").drop_duplicates(ITEM_KEY, keep="last")
        frames.append(df.set_index(ITEM_KEY)[cols])
    if frames:
        joined = pd.concat(frames, axis=1, join="outer").sort_index()
    else:
        joined = pd.DataFrame(columns=list(names), index=pd.Index([], dtype=np.int64))
    for n in names:
        if n not in joined.columns:
            joined[n] = np.nan
        joined[n] = joined[n].astype(np.float64).fillna(default_value(n))
    ids = joined.index.to_numpy(np.int64)
    return ItemSnapshot(
        names=names,
        ids=ids,
        matrix=joined[list(names)].to_numpy(np.float32),
        category=joined[CATEGORY].to_numpy(np.int64)
        if CATEGORY in joined
        else np.full(len(ids), -1, np.int64),
        created_at=joined[CREATED_AT].to_numpy(np.float64)
        if CREATED_AT in joined
        else np.zeros(len(ids)),
        as_of=as_of,
    )


class EntityRowReader:
    """One entity's features straight from Feast's online store: the provider's
    ``online_read`` once per feature view, values decoded with Feast's own
    ``feast_value_type_to_python_type`` — what ``get_online_features`` does for a single
    entity row, without its per-call request planning (registry look-ups, type checks,
    building and converting the response proto). That planning held the GIL for ~1.5 ms
    per request at 30 req/s on the 1M catalog (docs/benchmark.md); this read costs one
    store round trip per view. On SQLite and Redis the views' reads are one store call
    instead: on SQLite the ``UNION ALL`` of the per-view ``SELECT`` Feast's store runs
    (table names and key bytes by Feast's own helpers; 0.12 instead of 0.27 ms for the 4
    user views at 1M, docs/benchmark.md, issue 13); on Redis one ``HMGET`` of every view's
    fields, since Feast keeps all views of an entity in one hash (its own key, field and
    decoding helpers). Like the SDK it returns None for features with no row (Feast's
    online reads apply no TTL either)."""

    def __init__(
        self, store: FeatureStore, join_key: str, refs: Sequence[str], one_read: bool = True
    ) -> None:
        """``one_read`` False: one provider read per view on SQLite and Redis too (the path
        of every other store; the parity test compares both)."""
        by_view: dict[str, list[str]] = {}
        for ref in refs:
            view, name = ref.split(":", 1)
            by_view.setdefault(view, []).append(name)
        self.join_key = join_key
        self._config = store.config
        # The provider is what the SDK itself reads through (Redis, SQLite, ...).
        self._provider = store._get_provider()
        self._views = [
            (store.get_feature_view(v, allow_registry_cache=True), tuple(names))
            for v, names in by_view.items()
        ]
        if not self._views:
            raise ValueError("EntityRowReader needs at least one 'view:feature' reference")
        self._value_type = store.get_entity(
            self._views[0][0].entities[0], allow_registry_cache=True
        ).value_type
        self._sqlite = self._sqlite_statement() if one_read else None
        self._redis = self._redis_fields() if one_read else None

    @property
    def one_read(self) -> bool:
        """Whether a read is one store call for every view (SQLite, Redis)."""
        return self._sqlite is not None or self._redis is not None

    def _sqlite_statement(self) -> str | None:
        """Every view's rows of one entity in one statement (``?1``: the key's bytes), each
        row tagged with its view's position; None unless the online store is SQLite."""
        from feast.infra.online_stores.sqlite import SqliteOnlineStore, _quote_id, _table_id

        if not isinstance(getattr(self._provider, "online_store", None), SqliteOnlineStore):
            return None
        versioning = self._config.registry.enable_online_feature_view_versioning
        return " UNION ALL ".join(
            f"SELECT {i}, feature_name, value, event_ts FROM "
            f"{_quote_id(_table_id(self._config.project, view, versioning))} "
            "WHERE entity_key = ?1"
            for i, (view, _) in enumerate(self._views)
        )

    def _redis_fields(self) -> tuple[list[Any], list[tuple[str, list[str], int]]] | None:
        """(every view's hash fields, and per view: its stored name, its field names with
        its timestamp field, how many fields) as Feast's Redis store reads them; None
        unless the online store is Redis."""
        from feast.infra.online_stores.redis import RedisOnlineStore, _versioned_fv_name

        online = getattr(self._provider, "online_store", None)
        if not isinstance(online, RedisOnlineStore):
            return None
        fields: list[Any] = []
        views = []
        for view, names in self._views:
            fv_name = _versioned_fv_name(view, self._config)
            requested, hset_keys = online._generate_hset_keys_for_features(
                view, list(names), fv_name_override=fv_name
            )
            fields += hset_keys
            views.append((fv_name, requested, len(hset_keys)))
        return fields, views

    def _rows(self, entity_key: Any) -> list[tuple[datetime | None, dict[str, Any] | None]]:
        """Per view, what the provider's ``online_read`` answers for one entity: (the
        row's event time, feature name -> ValueProto), or (None, None) without a row."""
        if self._redis is not None:
            return self._redis_rows(entity_key, *self._redis)
        if self._sqlite is None:
            out = []
            for view, names in self._views:
                # A fresh list per call: the Redis store mutates the one it is given.
                rows = self._provider.online_read(self._config, view, [entity_key], list(names))
                out.append(rows[0] if rows else (None, None))
            return out
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.protos.feast.types.Value_pb2 import Value

        key = serialize_entity_key(
            entity_key,
            entity_key_serialization_version=self._config.entity_key_serialization_version,
        )
        online: Any = self._provider.online_store  # SqliteOnlineStore (checked at init)
        conn = online._get_conn(self._config)  # the store's one connection
        stamps: list[datetime | None] = [None] * len(self._views)
        values: list[dict[str, Any]] = [{} for _ in self._views]
        for i, name, raw, stamp in conn.execute(self._sqlite, (key,)).fetchall():
            proto = Value()
            proto.ParseFromString(raw)
            values[i][name] = proto
            stamps[i] = stamp  # the view's last row's, as Feast's online_read takes it
        return [(t, v) if v else (None, None) for t, v in zip(stamps, values, strict=True)]

    def _redis_rows(
        self, entity_key: Any, fields: list[Any], views: list[tuple[str, list[str], int]]
    ) -> list[tuple[datetime | None, dict[str, Any] | None]]:
        """Every view's fields in one ``HMGET`` of the entity's hash (one round trip, not
        one per view), each view's slice decoded as Feast's ``online_read`` decodes it."""
        online: Any = self._provider.online_store  # RedisOnlineStore (checked at init)
        key = online._generate_redis_keys_for_entities(self._config, [entity_key])[0]
        values = online._read_hash_fields(self._config, [(key, fields)])[0]
        out = []
        start = 0
        for fv_name, requested, n in views:
            out.append(
                online._get_features_for_entity(values[start : start + n], fv_name, requested)
            )
            start += n
        return out

    def read(self, key: int) -> dict[str, Any]:
        """Feature name -> Python value (None when missing) for the entity ``key``."""
        return self.read_row(key)[1]

    def read_row(self, key: int) -> tuple[datetime | None, dict[str, Any]]:
        """(the newest stored row's event timestamp over the views, or None when no view
        has a row; feature name -> Python value, None when missing) for ``key``."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.type_map import feast_value_type_to_python_type, python_values_to_proto_values

        value = python_values_to_proto_values([key], self._value_type)[0]
        entity_key = EntityKey(join_keys=[self.join_key], entity_values=[value])
        out: dict[str, Any] = {}  # Feast's Python values: int, float, list, ... or None
        newest: datetime | None = None
        for (_, names), (stamp, values) in zip(self._views, self._rows(entity_key), strict=True):
            if values and stamp is not None:
                stamp = _utc_datetime(stamp)
                newest = stamp if newest is None else max(newest, stamp)
            for name in names:
                proto = values.get(name) if values else None
                out[name] = None if proto is None else feast_value_type_to_python_type(proto)
        return newest, out


class OnlineFeatures:
    """The orchestrator's feature client (thread-safe for lookups; pushes are serialised).

    Construction does no I/O: call :meth:`load` (or :meth:`refresh`) once at start-up.
    """

    def __init__(
        self,
        settings: Settings,
        store: FeatureStore | None = None,
        breakers: Breakers | None = None,
    ) -> None:
        self.settings = settings
        self._store = store
        self.timeout_s = settings.online_store_timeout_ms / 1000
        # One breaker for the store; on a Redis Cluster one per master (see _breaker_for).
        self._breakers = breakers
        self._breaker: CircuitBreaker | None = (
            breakers.get(f"online_store:{settings.online_store}") if breakers else None
        )
        # Feast's RedisCluster client, bounded (feast_ops.bound_cluster_client); made at the
        # first read, since it connects as it is made and the cluster may be down then.
        self._cluster: Any = None
        self._cluster_lock = threading.Lock()
        # SQLite: every read and push shares Feast's one connection. A thread that waits for
        # that connection inside the sqlite3 module can hold the GIL while another sits in
        # SQLite's busy handler on a locked store, freezing the whole process (the event
        # loop too) for the busy timeout. Taking turns on a Python lock, with a timeout,
        # waits without the GIL and bounds the wait.
        self._io_lock = threading.Lock() if settings.online_store == "sqlite" else None
        self._snapshot: ItemSnapshot | None = None
        self._item_features: list[ServiceFeature] = []
        self._user_refs: list[str] = []
        self._user_reader: EntityRowReader | None = None
        self._recent_reader: EntityRowReader | None = None
        self._seen_reader: EntityRowReader | None = None
        self._push_views: list[FeatureView] = []
        self._seen_push_views: list[FeatureView] = []
        self._seen_events: tuple[str, ...] = seen_events({}, settings.seen_events)
        self._user_scalars: tuple[str, ...] = ()
        self._vector: str | None = None
        self._n_categories = 0
        self._push_lock = threading.Lock()
        self._refresh_lock = threading.Lock()

    @property
    def store(self) -> FeatureStore:
        if self._store is None:
            self._store = feast_ops.feature_store(self.settings)
        return self._store

    # --- set-up --------------------------------------------------------------------------
    def load(self) -> OnlineFeatures:
        """Read the services from the registry and build the item snapshot."""
        self.store.refresh_registry()
        feast_ops.bound_online_io(self.store, self.timeout_s)
        ranking = feast_ops.service_features(self.store, RANKING_SERVICE)
        retrieval = feast_ops.service_features(self.store, RETRIEVAL_SERVICE)
        filtering = _optional_service(self.store, FILTERING_SERVICE)
        user = [f for f in [*retrieval, *ranking, *filtering] if f.entity_key == USER_KEY]
        self._user_refs = [f"{f.view}:{f.name}" for f in user]
        self._seen_events = _data_seen_events(self.settings)
        self._user_reader = EntityRowReader(self.store, USER_KEY, self._user_refs)
        self._recent_reader = EntityRowReader(
            self.store, USER_KEY, [f"{RECENT_VIEW}:{RECENT_ITEMS}"]
        )
        # Feast's own rule (FeatureStore._fvs_for_push_source_or_raise): the views whose
        # stream source is this push source.
        self._push_views = [
            v
            for v in self.store.list_feature_views(allow_cache=True)
            if isinstance(v.stream_source, PushSource) and v.stream_source.name == PUSH_SOURCE
        ]
        if not self._push_views:
            raise UserError(f"no feature view is fed by the push source {PUSH_SOURCE!r}")
        self._seen_push_views = [
            v
            for v in self.store.list_feature_views(allow_cache=True)
            if isinstance(v.stream_source, PushSource) and v.stream_source.name == SEEN_PUSH_SOURCE
        ]
        if self._seen_push_views:
            self._seen_reader = EntityRowReader(self.store, USER_KEY, [f"{SEEN_VIEW}:{SEEN_ITEMS}"])
        ranking_user = [f for f in ranking if f.entity_key == USER_KEY]
        self._user_scalars = tuple(f.name for f in ranking_user if not f.dtype.startswith("Array"))
        vectors = [f.name for f in ranking_user if f.dtype.startswith("Array")]
        self._vector = vectors[0] if vectors else None
        self._item_features = [f for f in ranking if f.entity_key == ITEM_KEY]
        snapshot = self._load_snapshot()
        self._n_categories = _n_categories(self.settings, snapshot)
        self._snapshot = snapshot
        return self

    def _load_snapshot(self) -> ItemSnapshot:
        t0 = time.perf_counter()
        snapshot = load_item_snapshot(self.store, self._item_features)
        log.info(
            "item snapshot: %d items × %d features in %.2f s (as of %s)",
            len(snapshot.ids),
            len(self._item_features),
            time.perf_counter() - t0,
            snapshot.as_of,
        )
        return snapshot

    def refresh(self) -> bool:
        """Reload the item snapshot if a materialisation happened since; True if reloaded.

        Only the snapshot is rebuilt (services, readers and the affinity width stay as
        :meth:`load` found them: the serving release was checked against those), and it
        replaces the old one in a single assignment: a lookup sees the old or the new
        snapshot, never a mix. Safe to call from a background thread while serving."""
        with self._refresh_lock:
            if self._snapshot is None:
                self.load()
                return True
            self.store.refresh_registry()
            current = {v: _materialized_end(self.store, v) for v in self._snapshot.as_of}
            if current == self._snapshot.as_of:
                return False
            self._snapshot = self._load_snapshot()
            return True

    @property
    def snapshot(self) -> ItemSnapshot:
        """The current item snapshot (replaced whole by :meth:`refresh`)."""
        return self._require_snapshot()

    @property
    def item_feature_names(self) -> tuple[str, ...]:
        """The ranking service's item features, in order (columns of ItemFeatures.matrix)."""
        return self._require_snapshot().names

    @property
    def n_categories(self) -> int:
        """Length of the category affinity vector (as in exporters/feature_tables.py)."""
        self._require_snapshot()
        return self._n_categories

    @property
    def user_feature_names(self) -> tuple[str, ...]:
        """The ranking service's scalar user features, in order (UserFeatures.scalars)."""
        self._require_snapshot()
        return self._user_scalars

    def _require_snapshot(self) -> ItemSnapshot:
        if self._snapshot is None:
            raise RuntimeError("OnlineFeatures.load() was not called")
        return self._snapshot

    # --- lookups -------------------------------------------------------------------------
    def user(self, user_id: int) -> UserFeatures:
        """One Feast lookup for everything the request needs about the user."""
        self._require_snapshot()
        if self._user_reader is None:
            raise RuntimeError("OnlineFeatures.load() was not called")
        with self._guarded(slow_s=self.timeout_s, user_id=int(user_id)):
            values = self._user_reader.read(int(user_id))
        known = any(v is not None for v in values.values())
        recent = values.get(RECENT_ITEMS) or []
        scalars = np.array(
            [_or_default(values.get(n), n) for n in self._user_scalars], dtype=np.float32
        )
        affinity = decode_vector(
            values.get(self._vector) if self._vector else None, self._n_categories
        )
        return UserFeatures(
            user_id=int(user_id),
            known=known,
            age_bucket=int(_or_default(values.get("age_bucket"), "age_bucket")),
            country=int(_or_default(values.get("country"), "country")),
            recent_items=history.pad(list(recent)),
            scalar_names=self._user_scalars,
            scalars=scalars,
            category_affinity=affinity,
            seen_items=np.asarray(values.get(SEEN_ITEMS) or [], dtype=np.int64),
        )

    def items(self, item_ids: np.ndarray) -> ItemFeatures:
        """Item features for candidates from the in-memory snapshot (no I/O)."""
        return self._require_snapshot().lookup(item_ids)

    def items_sdk(self, item_ids: np.ndarray) -> ItemFeatures:
        """The same through Feast's SDK (slow: for benchmarks and parity checks)."""
        snap = self._require_snapshot()
        ids = np.asarray(item_ids, dtype=np.int64).reshape(-1)
        refs = self.item_feature_refs
        data = self._online_rows([{ITEM_KEY: int(i)} for i in ids], refs)
        known = np.zeros(len(ids), dtype=bool)
        cols = []
        for n in snap.names:
            vals = data[n]
            known |= np.array([v is not None for v in vals])
            cols.append([_or_default(v, n) for v in vals])
        matrix = np.array(cols, dtype=np.float64).T.reshape(len(ids), len(snap.names))
        cat = matrix[:, snap.names.index(CATEGORY)] if CATEGORY in snap.names else -1
        created = (
            np.array([_or_default(v, CREATED_AT) for v in data[CREATED_AT]], dtype=np.float64)
            if CREATED_AT in data
            else np.zeros(len(ids))
        )
        return ItemFeatures(
            ids, snap.names, matrix.astype(np.float32), np.asarray(cat, np.int64), created, known
        )

    @property
    def item_feature_refs(self) -> list[str]:
        """``view:feature`` references of the item features (for SDK calls)."""
        ranking = feast_ops.service_features(self.store, RANKING_SERVICE)
        return [f"{f.view}:{f.name}" for f in ranking if f.entity_key == ITEM_KEY]

    @property
    def known_item_ids(self) -> np.ndarray:
        """Sorted ids of the items in the snapshot."""
        return self._require_snapshot().ids

    def _online_rows(self, rows: list[dict[str, int]], refs: list[str]) -> dict[str, list[object]]:
        try:
            return self.store.get_online_features(features=refs, entity_rows=rows).to_dict()
        except _unavailable_errors() as e:
            raise FeatureStoreUnavailable(self.settings.online_store, e) from e

    # --- real-time push ------------------------------------------------------------------
    def push_event(
        self, user_id: int, item_id: int, event: str, ts: datetime | None = None
    ) -> list[int] | None:
        """Record a user event in the online store: :func:`push_event`'s rule and rows,
        written without the SDK's per-call registry work, plus the user's seen items
        (``exporters.seen.update_seen``) when ``event`` is a seen event. Returns the new
        recent-items list (None when the event does not change it).

        ``FeatureStore.push`` re-reads every feature view and service from the registry
        on each call (~22 ms of CPU per event on the 1M preset, mostly typeguard checks
        while decoding protos). Here the views fed by the push sources are found once at
        :meth:`load`, the current lists are read with :class:`EntityRowReader`, and the
        new rows go through the provider's ``ingest_df`` — the call ``push`` itself ends
        in.

        Every event taken is stored: the row is written at :func:`row_time` (the event's
        time, or just after the stored row's when that is as new or newer), because Feast's
        Redis store silently keeps a stored row that is not older than the one written.
        The lists are in arrival order, newest first: a late event goes to the front (the
        batch table orders by event time; the online list keeps no per-item times)."""
        changes_recent = _changes_history(event)
        changes_seen = self._seen_reader is not None and event in self._seen_events
        if not (changes_recent or changes_seen):
            return None
        if self._recent_reader is None:
            raise RuntimeError("OnlineFeatures.load() was not called")
        provider = self.store._get_provider()
        new: list[int] | None = None
        with self._push_lock, self._guarded(slow_s=None, user_id=int(user_id)):
            if changes_seen and self._seen_reader is not None:
                stored, values = self._seen_reader.read_row(int(user_id))
                seen_now = update_seen(list(values[SEEN_ITEMS] or []), int(item_id))
                frame = _push_frame(user_id, seen_now, row_time(ts, stored), SEEN_ITEMS)
                for view in self._seen_push_views:
                    provider.ingest_df(view, frame)
            if changes_recent:
                stored, values = self._recent_reader.read_row(int(user_id))
                new = history.update_recent(list(values[RECENT_ITEMS] or []), int(item_id))
                frame = _push_frame(user_id, new, row_time(ts, stored))
                for view in self._push_views:
                    provider.ingest_df(view, frame)
        return new

    def _breaker_for(self, user_id: int) -> CircuitBreaker | None:
        """The breaker that guards ``user_id``'s row: the store's, or on a Redis Cluster
        the one of the master that holds its hash (``online_store:redis_cluster:host:port``).
        A lost master then opens only its own breaker: its users fail fast, the other
        masters' users are still read (one breaker for the cluster would open on a lost
        third's failures and turn everyone away for the cool-down).

        On a cluster this first makes the bounded client if there is none yet, under the
        store's breaker: with no node reachable that raises (the store's failure)."""
        if self.settings.online_store != "redis_cluster":
            return self._breaker
        cluster = self._cluster_client()
        if self._breakers is None:
            return None
        from feast.infra.online_stores.helpers import _redis_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        config = self.store.config
        key = _redis_key(
            config.project,
            EntityKey(join_keys=[USER_KEY], entity_values=[Value(int64_val=user_id)]),
            entity_key_serialization_version=config.entity_key_serialization_version,
        )
        try:
            node = cluster.nodes_manager.get_node_from_slot(cluster.keyslot(key))
        except _unavailable_errors():  # the slot is not served (SlotNotCoveredError)
            return self._breaker
        return self._breakers.get(f"online_store:redis_cluster:{node.name}")

    def _cluster_client(self) -> Any:
        """Feast's RedisCluster client, made and bounded on first use, before Feast would
        make it without the bounds (one thread at a time; under the store's breaker)."""
        if self._cluster is None:
            with self._cluster_lock:
                if self._cluster is None:
                    guard = (
                        self._breaker.call(_is_store_failure, None)
                        if self._breaker
                        else contextlib.nullcontext()
                    )
                    with guard:
                        self._cluster = feast_ops.bound_cluster_client(self.store, self.timeout_s)
        return self._cluster

    @contextlib.contextmanager
    def _guarded(self, slow_s: float | None, user_id: int) -> Iterator[None]:
        """One online-store call for ``user_id``: its failures as
        :class:`FeatureStoreUnavailable`, through its breaker when there is one
        (``slow_s``: a slower call counts as a failure; pushes write and are not timed)."""
        failures: tuple[type[BaseException], ...] = (CircuitOpen, *_unavailable_errors())
        try:
            breaker = self._breaker_for(user_id)
            if breaker is None:
                with self._turn():
                    yield
            else:
                with breaker.call(_is_store_failure, slow_s), self._turn():
                    yield
        except failures as e:
            raise FeatureStoreUnavailable(self.settings.online_store, e) from e

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """This thread's turn on the store's connection (SQLite), waited for at most the
        store's timeout: a TimeoutError (a store failure) after that."""
        if self._io_lock is None:
            yield
            return
        if not self._io_lock.acquire(timeout=self.timeout_s):
            raise TimeoutError(f"the online store's connection stayed busy for {self.timeout_s} s")
        try:
            yield
        finally:
            self._io_lock.release()


def _is_store_failure(err: BaseException) -> bool:
    return isinstance(err, _unavailable_errors())


def _optional_service(store: FeatureStore, name: str) -> list[ServiceFeature]:
    """A feature service's features, or none when the registry predates it."""
    try:
        return feast_ops.service_features(store, name)
    except UserError:
        log.warning("the Feast registry has no %r feature service: seen items not served", name)
        return []


def _data_seen_events(settings: Settings) -> tuple[str, ...]:
    """The seen events of the data the store was loaded from (settings override first)."""
    try:
        meta = read_meta(settings)
    except (UserError, OSError, ValueError):
        meta = {}
    return seen_events(meta, settings.seen_events)


def _n_categories(settings: Settings, snapshot: ItemSnapshot) -> int:
    """meta.json's n_categories, at least max(category) + 1 (the feature tables' rule)."""
    try:
        n = int(read_meta(settings).get("n_categories") or 0)  # type: ignore[call-overload]
    except (UserError, OSError, ValueError):
        n = 0
    if len(snapshot.category):
        n = max(n, int(snapshot.category.max()) + 1)
    return n


def _utc_datetime(when: datetime) -> datetime:
    """``when`` as an aware UTC datetime (naive values are taken as UTC): :func:`_utc`
    without the pandas round trip, for the stamps of every user read."""
    if type(when) is not datetime:  # a pandas Timestamp or another subclass
        return _utc(when).to_pydatetime()  # type: ignore[no-any-return]
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def _utc(when: datetime) -> pd.Timestamp:
    """``when`` as a UTC timestamp (naive values are taken as UTC)."""
    ts = pd.Timestamp(when)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


# How far past the stored row a pushed row is stamped when the event is not newer than it.
# The Redis store hands timestamps back through a float (feast/infra/online_stores/redis.py,
# seconds + nanos / 1e9): a millisecond is far above that rounding, and far below any
# meaning the row's time has (no TTL, no point-in-time read on the online side).
ROW_TIME_STEP = timedelta(milliseconds=1)


def row_time(event_ts: datetime | None, stored: datetime | None) -> datetime:
    """The event timestamp to write a pushed row with: the event's time (now when None),
    or ``stored`` + :data:`ROW_TIME_STEP` when the stored row is as new or newer.

    Feast's Redis store writes a row only if its timestamp is newer than the stored one's
    (``online_write_batch`` skips ``new <= stored``, nanosecond precision), so a late
    event, or any event after one stamped in the future, would be dropped without an
    error. The row stands for "the lists after this event": always newer than the last."""
    when = _utc(event_ts or datetime.now(UTC)).to_pydatetime()
    if stored is None:
        return when
    last = _utc(stored).to_pydatetime()
    return when if when > last else last + ROW_TIME_STEP


def _or_default(value: object, name: str) -> float:
    return default_value(name) if value is None else float(value)  # type: ignore[arg-type]


def _changes_history(event: str) -> bool:
    """Clicks and purchases change recent items, views do not; anything else is an error."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}; expected one of {EVENTS}")
    return event in history.HISTORY_EVENTS


def _push_frame(
    user_id: int, items: list[int], ts: datetime | None, column: str = RECENT_ITEMS
) -> pd.DataFrame:
    """The one-row frame a push source takes (its schema: feature_repo/definitions.py)."""
    return pd.DataFrame(
        {
            USER_KEY: np.array([int(user_id)], dtype=np.int64),
            "event_timestamp": [_utc(ts or datetime.now(UTC))],
            column: [np.array(items, dtype=np.int64)],
        }
    )


def push_event(
    store_or_settings: FeatureStore | Settings,
    user_id: int,
    item_id: int,
    event: str,
    ts: datetime | None = None,
    store_name: str = "online store",
) -> list[int] | None:
    """Apply one click/purchase to the user's recent items and push the new row through
    the ``user_events_push`` PushSource to the online store (visible to the next lookup).

    Reads the current list online, applies ``history.update_recent`` (the same rule as
    the batch table), writes at :func:`row_time` of ``ts`` (default: now) and the stored
    row's time, so the write is never skipped. Other events (views) do not change recent
    items: returns None; an unknown event raises ValueError. Concurrent pushes for one
    user must be serialised by the caller (OnlineFeatures.push_event does): it is a
    read-modify-write.
    """
    if not _changes_history(event):
        return None
    if isinstance(store_or_settings, Settings):
        store_name = store_or_settings.online_store
        store = feast_ops.feature_store(store_or_settings)
    else:
        store = store_or_settings
    try:
        response = store.get_online_features(
            features=[f"{RECENT_VIEW}:{RECENT_ITEMS}"], entity_rows=[{USER_KEY: int(user_id)}]
        )
        current = response.to_dict()[RECENT_ITEMS][0]
        # The stored row's time: the feature's timestamp in the response (0: no row).
        stamp = response.proto.results[-1].event_timestamps[0]
        stored = stamp.ToDatetime(tzinfo=UTC) if stamp.seconds or stamp.nanos else None
        new = history.update_recent(list(current or []), int(item_id))
        frame = _push_frame(user_id, new, row_time(ts, stored))
        store.push(PUSH_SOURCE, frame, to=PushMode.ONLINE)
    except _unavailable_errors() as e:
        raise FeatureStoreUnavailable(store_name, e) from e
    return new

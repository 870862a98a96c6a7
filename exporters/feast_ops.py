"""Run Feast on recstack's feature repository: config per Settings, apply, materialize,
point-in-time training rows.

The repository is ``settings.feature_repo`` (definitions.py + thin YAML files).
``settings.online_store`` picks the YAML (``feature_store.yaml``: SQLite,
``feature_store.redis.yaml``: Redis, ``feature_store.redis-cluster.yaml``: Redis Cluster);
``${RECSTACK_*}`` placeholders in it are filled from Settings (not from the process
environment), so tests can point everything at a tmp dir.
The registry and the SQLite file live under ``<data_dir>/feast/<store>/``.

``apply`` is all-or-nothing: it applies to a staged copy of the registry and renames it
over the real one only when Feast succeeded, so a broken definition fails with Feast's
message and changes nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import shlex
import shutil
import string
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml
from feast import FeatureService, FeatureStore, FeatureView, RepoConfig
from feast.repo_config import FeastConfigError
from pydantic import ValidationError

from exporters import materialize_state
from exporters.feature_tables import BASELINE_TS, TABLE_FILES, decode_vector, default_value
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

YAML_FILES = {
    "sqlite": "feature_store.yaml",
    "redis": "feature_store.redis.yaml",
    "redis_cluster": "feature_store.redis-cluster.yaml",
}
# Read by feature_repo/definitions.py at import time (FileSource paths, source class).
FEATURES_DIR_ENV = "RECSTACK_FEATURES_DIR"
OFFLINE_STORE_ENV = "RECSTACK_OFFLINE_STORE"
# Full materialisation starts at the tables' baseline rows (Feast needs a start).
EPOCH = BASELINE_TS.to_pydatetime()
# redis-py retries a refused connection 10 times with backoff (~5 s); a request must fail
# fast instead, so Feast's client gets one immediate retry.
REDIS_RETRIES = 1
# Views whose newest rows recstack writes itself (write_latest) instead of Feast's
# materialize: Feast's file offline store reads them through dask, which tokenizes list
# columns row by row (~0.7 ms per row: 190 s for the demo's 264k recent-items rows).
DIRECT_VIEWS = ("user_activity", "user_recent_items", "user_seen_items")
# With the Spark offline store there is no dask to avoid: only the views whose rows are
# also pushed in real time (their pushed rows must be kept, see write_latest) stay direct.
PUSHED_VIEWS = ("user_recent_items", "user_seen_items")


def direct_views(settings: Settings) -> tuple[str, ...]:
    """The views ``materialize`` writes itself (write_latest) rather than through Feast."""
    return PUSHED_VIEWS if settings.offline_engine == "spark" else DIRECT_VIEWS


SCALAR_TYPES = ("Int64", "Int32", "Float64", "Float32", "Bool")


@dataclass(frozen=True)
class ServiceFeature:
    """One feature of a feature service, in the service's order."""

    view: str
    name: str
    dtype: str  # Feast type name, e.g. "Int64", "Array(Float32)"
    entity_key: str  # the view's join key: user_id or item_id


def yaml_path(settings: Settings) -> Path:
    """The feature_store YAML that ``settings.online_store`` selects."""
    return settings.feature_repo / YAML_FILES[settings.online_store]


def placeholders(settings: Settings) -> dict[str, str]:
    """The ``${RECSTACK_*}`` values of the YAML files and definitions.py, from Settings."""
    return {
        "RECSTACK_DATA_DIR": str(settings.data_dir),
        FEATURES_DIR_ENV: str(settings.features_dir),
        OFFLINE_STORE_ENV: offline_store_type(settings),
        "RECSTACK_REDIS_HOST": settings.redis_host,
        "RECSTACK_REDIS_PORT": str(settings.redis_port),
        "RECSTACK_REDIS_CLUSTER_NODES": settings.redis_cluster_nodes,
    }


def offline_store_type(settings: Settings) -> str:
    """Feast's offline store of ``settings.offline_engine``: file (pandas) or spark."""
    return "spark" if settings.offline_engine == "spark" else "file"


def _raw_config(settings: Settings) -> dict[str, Any]:
    path = yaml_path(settings)
    if not path.exists():
        raise UserError(f"{path} is missing (settings.feature_repo = {settings.feature_repo})")
    text = string.Template(path.read_text()).safe_substitute(placeholders(settings))
    raw: dict[str, Any] = yaml.safe_load(os.path.expandvars(text))
    if settings.offline_engine == "spark":
        # The YAMLs name the online store; the offline store and the materialisation
        # engine follow the offline engine (one YAML per online store, not two).
        from exporters.spark_engine import prepare_python, spark_conf

        prepare_python()
        raw["offline_store"] = {"type": "spark", "spark_conf": spark_conf(settings)}
        raw["batch_engine"] = {"type": "spark.engine", "spark_conf": spark_conf(settings)}
    return raw


def _config(raw: dict[str, Any], settings: Settings) -> RepoConfig:
    try:
        config = RepoConfig(**raw)
    except ValidationError as e:
        raise UserError(str(FeastConfigError(e, yaml_path(settings)))) from e
    config.repo_path = settings.feature_repo
    return config


def repo_config(settings: Settings) -> RepoConfig:
    """The validated Feast RepoConfig for these settings."""
    return _config(_raw_config(settings), settings)


def registry_path(settings: Settings) -> Path:
    """The registry file (``<data_dir>/feast/<store>/registry.db``)."""
    return Path(repo_config(settings).registry.path)


def feature_store(settings: Settings) -> FeatureStore:
    """A FeatureStore for these settings (registry cached until ``refresh_registry``).

    Feast's getters re-read the registry file on every call unless asked not to
    (``allow_cache``/``allow_registry_cache`` default to False), and log "Registry cache
    expired, so refreshing" each time, whatever ``cache_ttl_seconds`` says (0: never
    expires). recstack's reads go through the cache and refresh explicitly where a newer
    registry matters (``OnlineFeatures.load``/``refresh``); a new store reads it once."""
    config = repo_config(settings)
    Path(config.registry.path).parent.mkdir(parents=True, exist_ok=True)
    store = FeatureStore(config=config)
    if settings.online_store in ("redis", "redis_cluster"):
        _fail_fast_redis(store)
    return store


def offline_feature_store(settings: Settings) -> FeatureStore:
    """A FeatureStore for offline work (point-in-time rows, materialisation).

    With the Spark engine the Spark session is started here, from ``settings.spark_*``:
    Feast's Spark offline store and engine reuse an active session, and Feast 0.67's Spark
    engine, when it has to start one itself, passes its whole ``batch_engine`` block as
    Spark properties (``type``, ``spark_conf``: ignored) instead of ``spark_conf``, so its
    session would miss the master and memory settings."""
    if settings.offline_engine == "spark":
        from exporters.spark_engine import session

        session(settings)
    return feature_store(settings)


def _redis_client(store: FeatureStore) -> Any:
    """Feast's redis-py client of ``store`` (a Redis or a RedisCluster; private API).

    A RedisCluster connects as it is made (it reads the slot map from a start-up node):
    with no node reachable this raises ``RedisClusterException``, and Feast makes it again
    on its next call."""
    online: Any = store._get_provider().online_store
    return online._get_client(store.config.online_store)


def _fail_fast_redis(store: FeatureStore) -> None:
    """Replace redis-py's default retry policy on Feast's client (see REDIS_RETRIES).

    A RedisCluster retries a whole command after refreshing its slot map (its default:
    3 times); each of its nodes already has a client that does not retry. One immediate
    retry here too: enough to follow a changed slot map. A cluster that cannot be reached
    yet is left to the first call (which fails with the cluster's own message)."""
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisClusterException
    from redis.retry import Retry

    try:
        client = _redis_client(store)
    except RedisClusterException as e:
        log.warning("the Redis Cluster is not reachable yet: %s", e)
        return
    client.set_retry(Retry(NoBackoff(), REDIS_RETRIES))


def bound_online_io(store: FeatureStore, timeout_s: float) -> None:
    """Make every online-store call of ``store`` give up after about ``timeout_s``: SQLite's
    busy timeout (Python's default waits 5 s for a lock another connection holds), Redis's
    socket and connect timeouts (the YAML's 0.5 s). For the serving path only: batch
    writes (materialisation) keep the YAML's limits.

    Redis Cluster: see :func:`bound_cluster_client`; a cluster not reachable now gets its
    bounds when a later call makes the client (``OnlineFeatures`` does, at its first read)."""
    from redis.exceptions import RedisClusterException

    config = store.config
    online: Any = store._get_provider().online_store  # SQLite or Redis: private clients
    if config.online_store.type == "sqlite":
        conn = online._get_conn(config)  # the one connection every read and push uses
        conn.execute(f"PRAGMA busy_timeout = {max(1, round(timeout_s * 1000))}")
    elif config.online_store.type == "redis" and config.online_store.redis_type == "redis_cluster":
        try:
            bound_cluster_client(store, timeout_s)
        except RedisClusterException as e:
            log.warning("the Redis Cluster is not reachable yet: %s", e)
    elif config.online_store.type == "redis":
        client = online._get_client(config.online_store)
        client.connection_pool.connection_kwargs.update(_timeouts(timeout_s))
        client.connection_pool.disconnect()  # open connections keep their old timeouts
    else:
        raise UserError(f"no timeout known for online store {config.online_store.type!r}")


def _timeouts(timeout_s: float) -> dict[str, float]:
    return {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}


def bound_cluster_client(store: FeatureStore, timeout_s: float) -> Any:
    """Feast's RedisCluster client of ``store``, made if needed, bounded for serving; raises
    ``RedisClusterException`` when no node answers.

    The store timeout on every node's client, on those the client makes when it refreshes
    its slot map, and on the client itself if it has to be made (the connection string
    Feast makes it from), and no retry of a failed command: a retry would wait on the same
    dead node again (its slots do not move without a failover), and the next request reads
    with the refreshed map anyway. What a failed command still costs: one slot-map refresh
    (CLUSTER SLOTS from the first node that answers) and, for a node that times out, one
    more timeout (Feast reads through a pipeline, which sends a failed command again on
    its own: ~2 x ``timeout_s``, docs/faults.md)."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    online_config = store.config.online_store
    parts = [p for p in online_config.connection_string.split(",") if "timeout=" not in p]
    parts += [f"{k}={v}" for k, v in _timeouts(timeout_s).items()]
    online_config.connection_string = ",".join(parts)
    client = _redis_client(store)
    client.set_retry(Retry(NoBackoff(), 0))
    client.nodes_manager.connection_kwargs.update(_timeouts(timeout_s))
    for node in client.get_nodes():
        if node.redis_connection is not None:
            pool = node.redis_connection.connection_pool
            pool.connection_kwargs.update(_timeouts(timeout_s))
            pool.disconnect()  # open connections keep their old timeouts
    return client


@contextlib.contextmanager
def _definitions_context(settings: Settings) -> Iterator[None]:
    """What parsing feature_repo/ needs: cwd = the repo (Feast names modules relative to
    it), the repo on sys.path, fresh imports of edited files, RECSTACK_FEATURES_DIR set."""
    repo = settings.feature_repo.resolve()
    env = {
        FEATURES_DIR_ENV: str(settings.features_dir),
        OFFLINE_STORE_ENV: offline_store_type(settings),
    }
    old_cwd, old_env = os.getcwd(), {name: os.environ.get(name) for name in env}
    old_bytecode = sys.dont_write_bytecode
    # Feast imports each file as a module named by its path relative to the repo: drop any
    # cached module of those names (an earlier apply, maybe of another repo copy).
    for path in repo.glob("**/*.py"):
        name = ".".join(path.relative_to(repo).with_suffix("").parts)
        sys.modules.pop(name, None)
    importlib.invalidate_caches()
    os.chdir(repo)
    sys.path.insert(0, str(repo))
    os.environ.update(env)
    sys.dont_write_bytecode = True  # no __pycache__ inside feature_repo/
    try:
        yield
    finally:
        os.chdir(old_cwd)
        with contextlib.suppress(ValueError):
            sys.path.remove(str(repo))
        for name, value in old_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        sys.dont_write_bytecode = old_bytecode


def apply(settings: Settings) -> None:
    """``feast apply`` of settings.feature_repo, all or nothing (see the module docstring).

    Raises UserError with Feast's own message when a definition is broken."""
    from feast.project import Project
    from feast.repo_operations import apply_total_with_repo_instance, parse_repo

    raw = _raw_config(settings)
    config = _config(raw, settings)
    real = Path(config.registry.path)
    real.parent.mkdir(parents=True, exist_ok=True)
    staged = real.with_name(f".{real.name}.staged")
    staged.unlink(missing_ok=True)
    if real.exists():
        shutil.copy2(real, staged)
    raw_staged = dict(raw)
    raw_staged["registry"] = {**raw["registry"], "path": str(staged)}
    try:
        with _definitions_context(settings):
            repo = parse_repo(settings.feature_repo.resolve())
            if not repo.projects:
                repo.projects.append(Project(name=config.project, description=""))
            store = FeatureStore(config=_config(raw_staged, settings))
            apply_total_with_repo_instance(
                store, config.project, store.registry, repo, skip_source_validation=False
            )
    except (Exception, SystemExit) as e:
        staged.unlink(missing_ok=True)
        raise UserError(
            f"feast apply of {settings.feature_repo} failed; registry {real} unchanged: "
            f"{type(e).__name__}: {e}"
        ) from e
    os.replace(staged, real)
    log.info("applied %s -> %s", settings.feature_repo, real)


def _newest_feature_time(settings: Settings) -> datetime | None:
    newest: datetime | None = None
    for name in TABLE_FILES.values():
        path = settings.features_dir / name
        if not path.exists():
            continue
        col = pq.read_table(path, columns=["event_timestamp"]).column(0)
        if len(col) == 0:
            continue
        ts = pd.Timestamp(col.to_pandas().max()).to_pydatetime()
        newest = ts if newest is None else max(newest, ts)
    return newest


def materialization_end(settings: Settings) -> datetime:
    """Now, or just after the newest feature row if the data lies in the future."""
    end = datetime.now(UTC)
    newest = _newest_feature_time(settings)
    if newest is not None and newest >= end:
        end = newest + timedelta(seconds=1)
    return end


def materialize(settings: Settings, incremental: bool = False) -> None:
    """Load the online store from the feature tables: everything (default), or with
    ``incremental`` only the entities with rows in the window that changed since the last
    materialisation into this store (exporters/materialize_state.py; a full one where
    that is not known to be correct). Either way the store ends up the same."""
    registry = registry_path(settings)
    if not registry.exists():
        raise UserError("the Feast registry does not exist: run `recstack features apply` first")
    start, why = (None, "full materialisation asked for")
    if incremental:
        start, why = materialize_state.incremental_start(settings, registry)
    log.info(
        "materialising %s: %s",
        "everything" if start is None else f"from {start.isoformat()}",
        why if start is not None else f"full ({why})",
    )
    store = offline_feature_store(settings)
    end = materialization_end(settings)
    views = [v.name for v in store.list_feature_views(allow_cache=True) if v.online]
    direct = direct_views(settings)
    by_feast = [v for v in views if v not in direct]
    # Materialised before: the store may hold rows pushed (RecordEvent) since, which
    # write_latest keeps when they are newer than the batch row.
    materialized_before = any(
        store.get_feature_view(v, allow_registry_cache=True).materialization_intervals
        for v in by_feast
    )
    # A materialisation that fails half way leaves no record: the next incremental one
    # is then a full one.
    materialize_state.forget(registry)
    # An explicit window, not Feast's materialize_incremental: that starts at each view's
    # previous end (wall clock), and imported events are older than it.
    store.materialize(start_date=start or EPOCH, end_date=end, feature_views=by_feast)
    for view in direct:
        if view in views:
            write_latest(store, view, end, keep_pushed=materialized_before, start=start)
    materialize_state.record_materialized(settings, registry, end)
    log.info("materialized into %s up to %s", settings.online_store, end.isoformat())


def batch_table(store: FeatureStore, view: FeatureView) -> tuple[Path, str]:
    """A feature view's offline table file (relative paths resolved against the feature
    repository, as Feast does) and its event-time column: what the direct readers of the
    tables read instead of going through Feast's offline store."""
    source = view.batch_source
    raw = getattr(source, "path", None)
    if source is None or not raw:
        raise UserError(f"feature view {view.name}: its batch source is not a file table")
    path = Path(raw)
    if not path.is_absolute() and store.config.repo_path is not None:
        path = Path(store.config.repo_path) / path
    return path, source.timestamp_field


def write_latest(
    store: FeatureStore,
    view_name: str,
    end: datetime,
    keep_pushed: bool = True,
    start: datetime | None = None,
) -> int:
    """What ``materialize`` does for one view — the newest batch row per entity with
    ``event_timestamp <= end`` (and ``>= start``, if given: an incremental
    materialisation's window) into the online store — without Feast's dask reader (see
    DIRECT_VIEWS), except, with ``keep_pushed``, for entities whose stored row was pushed
    after the view's feature table was written and is newer than the batch row: those
    keep theirs. Returns the number of rows written.

    "Pushed after the table was written" (the table file's modification time), not "after
    the previous materialisation": a push that an earlier materialisation kept must stay
    kept by the next one too. Comparing with the previous materialisation's end (wall
    clock) dropped such a push whenever the two materialisations fell in different
    seconds."""
    view = store.get_feature_view(view_name, allow_registry_cache=True)
    path, ts = batch_table(store, view)
    pushed_after = datetime.fromtimestamp(path.stat().st_mtime, UTC) if keep_pushed else None
    keys = [c.name for c in view.entity_columns]
    table = pq.read_table(path, columns=[*keys, ts, *(f.name for f in view.features)])
    table = table.filter(pc.less_equal(table[ts], pc.cast(end, table[ts].type)))
    if start is not None:
        table = table.filter(pc.greater_equal(table[ts], pc.cast(start, table[ts].type)))
    df = table.to_pandas().sort_values(ts, kind="stable").drop_duplicates(keys, keep="last")
    df = df.reset_index(drop=True)
    newer = _not_older_than_stored(store, view, df, keys, ts, pushed_after)
    if newer.any():
        store.write_to_online_store(view_name, df=df[newer].reset_index(drop=True))
    log.info(
        "%s: wrote the newest row of %d entities (%d kept a newer pushed row)",
        view_name,
        int(newer.sum()),
        int((~newer).sum()),
    )
    return int(newer.sum())


STORED_READ_CHUNK = 5_000  # entity keys per online_read while comparing event times


def _not_older_than_stored(
    store: FeatureStore,
    view: Any,
    df: pd.DataFrame,
    keys: list[str],
    ts: str,
    pushed_after: datetime | None,
) -> np.ndarray:
    """Per row of ``df``: False where the online store holds a row for its entity that
    is at least as new (to the second) and dates from after ``pushed_after``, i.e. was
    pushed since the feature table was written; True elsewhere.

    RecordEvent pushes recent/seen items with the event's time; the feature tables were
    built earlier, so their rows are older. Feast's SQLite store upserts unconditionally,
    so without this a full (or incremental) materialisation put back the lists of the
    last import. Only rows pushed since the feature table was written are kept: a newer
    row left by an earlier data set (say 2026 data replaced by 1998 ratings) is
    overwritten as before. (Feast's Redis store skips any write older than what it holds,
    so on Redis such leftovers stay; clear the store when changing data sets.)"""
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    keep = np.ones(len(df), dtype=bool)
    if pushed_after is None or len(keys) != 1 or not len(df):
        # Nothing materialised before: nothing pushed to keep. recstack's views written
        # here have one int64 key (user_id).
        return keep
    t = pd.Timestamp(pushed_after)
    after_us = (t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")).value // 1000
    # The SQLite store keeps event times to the second (rounded down): compare with both
    # sides floored, so a push in the same second as the previous end still counts.
    after_s = after_us - after_us % 1_000_000
    provider = store._get_provider()
    ids = df[keys[0]].to_numpy(np.int64)
    row_us = pd.to_datetime(df[ts], utc=True).to_numpy("datetime64[us]").view(np.int64)
    row_s = row_us - row_us % 1_000_000
    for lo in range(0, len(ids), STORED_READ_CHUNK):
        chunk = ids[lo : lo + STORED_READ_CHUNK]
        entity_keys = [
            EntityKey(join_keys=keys, entity_values=[Value(int64_val=int(v))]) for v in chunk
        ]
        stored = provider.online_read(store.config, view, entity_keys)
        for j, (when, _) in enumerate(stored):
            if when is not None:
                t = pd.Timestamp(when)
                t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
                stored_us = t.value // 1000
                keep[lo + j] = not (stored_us >= row_s[lo + j] and stored_us >= after_s)
    return keep


def service_features(store: FeatureStore, service_name: str) -> list[ServiceFeature]:
    """The ordered features of a feature service, read from the registry."""
    try:
        service: FeatureService = store.get_feature_service(service_name, allow_cache=True)
    except Exception as e:
        raise UserError(f"feature service {service_name!r}: {e}") from e
    out: list[ServiceFeature] = []
    for proj in service.feature_view_projections:
        view = store.get_feature_view(proj.name, allow_registry_cache=True)
        keys = [c.name for c in view.entity_columns]
        for f in proj.features:
            out.append(ServiceFeature(proj.name_to_use(), f.name, str(f.dtype), keys[0]))
    return out


def historical_features(
    settings: Settings, entity_df: pd.DataFrame, service_name: str, fill: bool = True
) -> pd.DataFrame:
    """Point-in-time correct feature rows for ``entity_df`` (columns: ``event_timestamp``
    plus the service's join keys, e.g. user_id and item_id), via Feast's
    ``get_historical_features``: each row sees feature values as of its own timestamp.
    Returns entity_df's rows, in its order, with the service's features appended.

    Asked once per join key with that key's distinct (key, timestamp) pairs: Feast 0.67's
    file offline store deduplicates on the join keys it has seen so far, so a (user, item)
    frame loses rows that share a user and a timestamp. With the file offline store the
    join is :func:`point_in_time`'s.

    With ``fill`` (default) missing values get the serving defaults
    (feature_tables.FEATURE_DEFAULTS) and vectors become float32 arrays (zeros when
    missing), so training sees exactly what orchestrator/online_features serves.
    """
    ts = "event_timestamp"
    if ts not in entity_df.columns:
        raise UserError("entity_df needs an event_timestamp column")
    store = offline_feature_store(settings)
    features = service_features(store, service_name)
    out = entity_df.copy()
    out[ts] = pd.to_datetime(out[ts], utc=True)
    for key in dict.fromkeys(f.entity_key for f in features):
        if key not in out.columns:
            raise UserError(f"entity_df lacks {key!r}, a join key of service {service_name!r}")
        group = [f for f in features if f.entity_key == key]
        keys = out[[key, ts]].drop_duplicates().reset_index(drop=True)
        refs = [f"{f.view}:{f.name}" for f in group]
        got = point_in_time(
            settings, store, key, keys[key].to_numpy(), pd.DatetimeIndex(keys[ts]), refs
        )
        got[ts] = keys[ts]  # point_in_time keeps the rows' order
        got = got[[key, ts, *(f.name for f in group)]]
        out = out.merge(got, on=[key, ts], how="left", validate="many_to_one")
    if fill:
        out = fill_defaults(out, features)
    return out


# Entity rows per get_historical_features call where Feast's own join runs (the Spark
# engine; tests of the file store). Feast's file-source join pairs every entity row with its
# key's whole feature history before keeping the latest row as of its time, so its memory
# is rows × history: a per-user split's window of 3,000 users × 349 candidates over two
# years of daily item rows (~1M × 730) went past 21 GB and was killed.
PIT_CHUNK_ROWS = 50_000
ROW = "_recstack_row"  # entity_df row number, kept through Feast's join


def point_in_time(
    settings: Settings,
    store: FeatureStore,
    key: str,
    ids: np.ndarray,
    times: pd.DatetimeIndex,
    refs: Sequence[str],
) -> pd.DataFrame:
    """Feature values ``refs`` of entities ``ids`` (join key ``key``) as of ``times`` (one
    per row), point-in-time as Feast's ``get_historical_features`` joins them: one row per
    input row, in its order, columns ``key`` and the features; an entity with no value as
    of its time gets NaN/None (Feast itself drops such rows). With the file offline store
    the join is :func:`as_of_features` (the same rule on the same tables, without dask's
    merge of every row with its key's whole history); with Spark, Feast's own
    (:func:`feast_point_in_time`)."""
    if settings.offline_engine == "spark":
        return feast_point_in_time(store, key, ids, times, refs)
    return as_of_features(store, key, ids, times, list(refs))


def feast_point_in_time(
    store: FeatureStore,
    key: str,
    ids: np.ndarray,
    times: pd.DatetimeIndex,
    refs: Sequence[str],
) -> pd.DataFrame:
    """:func:`point_in_time` through Feast's ``get_historical_features`` on ``store``'s
    offline store, ``PIT_CHUNK_ROWS`` entity rows per call."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) > PIT_CHUNK_ROWS:
        return pd.concat(
            [
                feast_point_in_time(
                    store, key, ids[i : i + PIT_CHUNK_ROWS], times[i : i + PIT_CHUNK_ROWS], refs
                )
                for i in range(0, len(ids), PIT_CHUNK_ROWS)
            ],
            ignore_index=True,
        )
    entity_df = pd.DataFrame(
        {key: ids, "event_timestamp": times, ROW: np.arange(len(ids), dtype=np.int64)}
    )
    with identity_dask_tokens():
        df = store.get_historical_features(entity_df=entity_df, features=list(refs)).to_df()
    names = [r.split(":", 1)[1] for r in refs]
    df = df.drop_duplicates(ROW).set_index(ROW).reindex(np.arange(len(ids)))
    df[key] = ids
    return df[[key, *names]].reset_index(drop=True)


def as_of_features(
    store: FeatureStore,
    key: str,
    ids: np.ndarray,
    times: pd.DatetimeIndex,
    refs: list[str],
) -> pd.DataFrame:
    """Feast's point-in-time join, done with one sorted as-of merge per feature view:
    for each row (``ids[i]`` as of ``times[i]``), each view's newest batch row of that
    entity with timestamp <= the row's time (and, for a view with a TTL, not older than
    it; ties in the table's order), as the file offline store's ``get_historical_features``
    picks it. One row per input row, in its order; columns ``key`` and the features (by
    name); a row with no value as of its time gets NaN/None where Feast drops the row.

    Why: the file offline store (dask) merges every entity row with its key's whole
    history before it keeps the newest row — entity rows × days of daily statistics rows.
    A ranker window on MovieLens-1M's shape (6,040 users × ~390 candidates, ~3 years of
    daily item rows) is ~2.4M entity rows × ~1,000 rows each: hours. This reads the same
    tables (``batch_table``) and the same definitions from the registry; tests compare it
    with Feast's own join (tests/test_point_in_time_join.py)."""
    ids = np.asarray(ids, dtype=np.int64)
    when = pd.DatetimeIndex(times)
    when = when.tz_localize("UTC") if when.tz is None else when.tz_convert("UTC")
    n = len(ids)
    left = pd.DataFrame({key: ids, "_at": when.as_unit("us").asi8, "_row": np.arange(n)})
    left = left.sort_values("_at", kind="stable")
    out = pd.DataFrame({key: ids})
    by_view: dict[str, list[str]] = {}
    for ref in refs:
        view_of, _, name = ref.partition(":")
        by_view.setdefault(view_of, []).append(name)
    for view_name, names in by_view.items():
        view = store.get_feature_view(view_name, allow_registry_cache=True)
        keys = [c.name for c in view.entity_columns]
        if keys != [key]:
            raise UserError(f"feature view {view_name}: join keys {keys}, expected [{key!r}]")
        path, ts = batch_table(store, view)
        created = getattr(view.batch_source, "created_timestamp_column", None) or None
        cols = [key, ts, *([created] if created else []), *names]
        right = pq.read_table(path, columns=cols).to_pandas()
        # A row without a time would match any time in Feast; recstack's tables have none.
        right = right[right[ts].notna()]
        right["_t"] = pd.DatetimeIndex(pd.to_datetime(right[ts], utc=True)).as_unit("us").asi8
        right[key] = right[key].astype(np.int64)
        # Newest last among equal times: created time, then the table's order (stable).
        right = right.sort_values(["_t", *([created] if created else [])], kind="stable")
        ttl = view.ttl.total_seconds() if view.ttl else 0.0
        merged = pd.merge_asof(
            left,
            right[[key, "_t", *names]],
            left_on="_at",
            right_on="_t",
            by=key,
            direction="backward",
            allow_exact_matches=True,
            tolerance=int(ttl * 1e6) if ttl > 0 else None,
        )
        merged = merged.set_index("_row").reindex(np.arange(n))
        for name in names:
            out[name] = merged[name].to_numpy()
    return out


def fill_defaults(df: pd.DataFrame, features: list[ServiceFeature]) -> pd.DataFrame:
    """Missing scalars -> documented defaults (as float64); float vectors -> float32 arrays
    (zeros when missing)."""
    for f in features:
        if f.name not in df.columns:
            continue
        if f.dtype in SCALAR_TYPES:
            df[f.name] = df[f.name].astype("float64").fillna(default_value(f.name))
        elif f.dtype.startswith("Array(Float"):
            width = max((len(v) for v in df[f.name] if _is_vector(v)), default=0)
            df[f.name] = [decode_vector(v if _is_vector(v) else None, width) for v in df[f.name]]
    return df


def _is_vector(v: object) -> bool:
    return isinstance(v, list | np.ndarray)


@contextlib.contextmanager
def identity_dask_tokens() -> Iterator[None]:
    """Let Feast's file offline store (dask) name object columns by identity.

    dask tokenizes the joined frames on every ``persist``, pickling object columns (the
    affinity lists) element by element: ~50 µs per row and persist, 20 s for 50k rows.
    Tokens only name the graph keys of this one-shot computation, so identity is enough;
    the arrays are kept alive meanwhile so an id is never reused. Scoped to the block.
    """
    from dask.tokenize import normalize_token

    normalize_token.dispatch(np.ndarray)  # let dask register its numpy handlers first
    original = normalize_token.dispatch(np.ndarray)
    alive: list[np.ndarray] = []

    def by_identity(x: np.ndarray) -> Any:
        if x.dtype.hasobject and x.shape:
            alive.append(x)
            return ("object-ndarray", id(x), x.shape)
        return original(x)

    normalize_token.register(np.ndarray)(by_identity)
    try:
        yield
    finally:
        normalize_token.register(np.ndarray)(original)
        alive.clear()


def cli_apply(args: argparse.Namespace) -> int:
    """``recstack features apply``."""
    settings = get_settings()
    apply(settings)
    print(f"applied {settings.feature_repo} ({settings.online_store}) -> {registry_path(settings)}")
    return 0


def cli_materialize(args: argparse.Namespace) -> int:
    """``recstack features materialize [--incremental]``."""
    settings = get_settings()
    materialize(settings, incremental=bool(getattr(args, "incremental", False)))
    print(f"materialized into the {settings.online_store} online store")
    return 0


def plain_feast_env(settings: Settings) -> dict[str, str]:
    """What a shell needs exported for plain ``feast`` in feature_repo/: the placeholders
    and the YAML ``settings.online_store`` selects. Feast 0.67 expands the YAML with
    ``os.path.expandvars`` (feast/repo_config.py ``load_repo_config``), which has no
    ``${VAR:-default}`` form and leaves an unset variable as literal text, so the YAML
    cannot carry recstack's defaults itself."""
    # FEAST_FS_YAML_FILE_PATH: Feast's own variable for the YAML (feast/utils.py).
    return {**placeholders(settings), "FEAST_FS_YAML_FILE_PATH": str(cli_yaml_path(settings))}


def cli_yaml_path(settings: Settings) -> Path:
    """The YAML for Feast's own CLI: ``yaml_path``, or with the Spark engine a generated
    variant of it (its offline store and engine replaced as :func:`_raw_config` does), at
    ``<registry dir>/feature_store.spark.yaml``."""
    if settings.offline_engine != "spark":
        return yaml_path(settings)
    raw = _raw_config(settings)
    path = Path(raw["registry"]["path"]).parent / "feature_store.spark.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = f"# Generated by recstack from {yaml_path(settings)} (offline engine spark).\n"
    path.write_text(header + yaml.safe_dump(raw, sort_keys=False))
    return path


def cli_feast(args: argparse.Namespace) -> int:
    """``recstack feast ARGS...``: Feast's own CLI on settings.feature_repo with the YAML
    ``settings.online_store`` selects and the ``${RECSTACK_*}`` values of these settings in
    its environment (which the YAML and definitions.py read), e.g. ``recstack feast
    feature-views list``. Returns Feast's exit status. ``recstack feast --env`` prints
    those values as ``export`` lines instead, for ``eval`` before plain ``feast``."""
    settings = get_settings()
    path = yaml_path(settings)
    if not path.exists():
        raise UserError(f"{path} is missing (settings.feature_repo = {settings.feature_repo})")
    feast_args = list(args.feast_args)
    if feast_args[:1] == ["--"]:
        feast_args = feast_args[1:]
    if args.env:
        if feast_args:
            raise UserError("--env prints the environment for plain `feast`; it takes no ARGS")
        for name, value in plain_feast_env(settings).items():
            print(f"export {name}={shlex.quote(value)}")
        return 0
    env = {**os.environ, **placeholders(settings), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [
        sys.executable,
        "-c",
        "import sys; from recstack.lean_imports import lean_feast_imports; lean_feast_imports(); "
        "from feast.cli.cli import cli; sys.exit(cli(prog_name='feast'))",
        "--chdir",
        str(settings.feature_repo),
        "--feature-store-yaml",
        str(cli_yaml_path(settings)),
        *feast_args,
    ]
    return subprocess.run(command, env=env, check=False).returncode

"""One settings object for every command: environment variables (``RECSTACK_*``), an
optional ``recstack.env`` file at the project root, then defaults that run on a laptop."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Offline engines (docs/offline.md): pandas on this host, or Spark (local mode or a cluster).
Engine = Literal["pandas", "spark"]
ENGINES: tuple[str, ...] = get_args(Engine)
# Time or per-user split of the interactions (exporters/split.py, docs/data.md).
SplitMode = Literal["auto", "time", "per_user"]
SPLIT_MODES: tuple[str, ...] = get_args(SplitMode)
# What the ranker is boosted from (exporters/ranker_prior.py): auto, none, or a gate baseline.
RankerPrior = Literal["auto", "none", "popularity", "item_to_item"]
RANKER_PRIORS: tuple[str, ...] = get_args(RankerPrior)
# EASE's fixed λ (the item-to-item source, the gate's baseline, bench quality's EASE row):
# about right on a MovieLens-100k-like file (docs/quality.md, "EASE's λ").
EASE_LAMBDA = 250.0


class Settings(BaseSettings):
    """Paths, ports and switches. Every path is absolute after validation."""

    model_config = SettingsConfigDict(
        env_prefix="RECSTACK_",
        env_file=PROJECT_ROOT / "recstack.env",
        extra="forbid",
        populate_by_name=True,
    )

    root: Path = PROJECT_ROOT
    data_dir: Path = Field(default=PROJECT_ROOT / "data", description="raw data, features, work")
    model_repository: Path = PROJECT_ROOT / "model_repository"
    releases_dir: Path = PROJECT_ROOT / "releases"
    feature_repo: Path = PROJECT_ROOT / "feature_repo"
    run_dir: Path = Field(default=PROJECT_ROOT / ".run", description="pids, logs, sockets")
    triton_venv: Path = PROJECT_ROOT / ".venv-triton"

    seed: int = 42
    # "auto" uses CUDA when torch/onnxruntime/faiss report a device, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"

    # Feast online store: sqlite (default), redis (Debian redis-server on loopback) or
    # redis_cluster (a Redis Cluster: the nodes below; orchestrator/redis_cluster.py).
    online_store: Literal["sqlite", "redis", "redis_cluster"] = "sqlite"
    redis_host: str = "127.0.0.1"
    redis_port: int = 6390
    # Redis Cluster nodes, host:port comma-separated: the client's start-up nodes (it
    # discovers the rest); `recstack serve redis-cluster` runs them as masters when they
    # are on this machine (each also uses port + 10000, the cluster bus).
    redis_cluster_nodes: str = "127.0.0.1:6400,127.0.0.1:6401,127.0.0.1:6402"

    triton_host: str = "127.0.0.1"
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    # How the orchestrator calls Triton: "http" (KServe v2 REST with binary tensors over
    # kept-alive connections; cheaper here, orchestrator/triton_http.py) or "grpc".
    triton_protocol: Literal["http", "grpc"] = "http"
    # Key Triton's model-repository API (load/unload/index) requires in a header; empty: a
    # random key per run dir (orchestrator/triton_server.py). Set it (a Kubernetes Secret)
    # where Triton and its clients do not share a run dir.
    triton_repository_key: str = Field(default="", repr=False)

    orchestrator_host: str = "127.0.0.1"
    orchestrator_grpc_port: int = 50051
    orchestrator_http_port: int = 8080
    orchestrator_metrics_port: int = 9100
    # Admin API (GET /admin/releases, POST /admin/reload): not the public API; loopback by
    # default like Triton's repository API (docs/releases.md says how to protect both).
    orchestrator_admin_host: str = "127.0.0.1"
    orchestrator_admin_port: int = 9101
    # Replicas on this machine (orchestrator/replicas.py, docs/deploy.md): with N > 1,
    # `recstack serve orchestrator` starts N orchestrators behind Debian's nginx, which
    # listens on the gRPC and HTTP ports above; replica i takes the four ports from
    # replica_port_base + 10*i (gRPC, HTTP, metrics, admin). The release commands notify
    # every replica's admin port and prune Triton once all of them serve the new state.
    orchestrator_replicas: int = Field(default=1, ge=1, le=16)
    orchestrator_replica_port_base: int = Field(default=50100, ge=1024, le=65_535 - 160)
    # Recommend calls worked on at once (threads); see orchestrator/service.py.
    orchestrator_workers: int = Field(default=4, ge=1, le=64)
    # The orchestrator's event loop (gRPC front, HTTP front, metrics): "uvloop" (libuv;
    # ~0.15-0.2 ms less CPU per Recommend on the loop's thread here, docs/benchmark.md)
    # or Python's own "asyncio" loop.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # User-tower outputs kept per release, keyed by the tower's inputs (0 disables it);
    # ~0.5 kB each. See orchestrator/embedding_cache.py.
    user_embedding_cache: int = Field(default=50_000, ge=0)
    # Every this many seconds the orchestrator asks the Feast registry whether item
    # features were materialised since its snapshot and, if so, reloads the snapshot and
    # the catalog popularity and popular/fresh lists built from it (0 disables it).
    feature_refresh_s: float = Field(default=60.0, ge=0)
    # Release changes (exporters/release_state.py): the orchestrator polls the state file
    # this often (a `recstack release` command also tells it at once through the admin
    # API), and checks as often that Triton still has every pinned model version ready.
    release_watch_s: float = Field(default=1.0, gt=0)
    triton_watch_s: float = Field(default=2.0, ge=0)
    # Items added between releases (exporters/item_delta.py): the orchestrator lists each
    # served release's new_items/ folder this often and applies new segments (0: only at
    # start and on POST /admin/items/reload, which `recstack items` calls).
    new_items_watch_s: float = Field(default=1.0, ge=0)
    # After a change the orchestrator unloads from Triton what no served release needs.
    # Turn off where several orchestrators share one Triton and a promotion job prunes
    # (replicas started here get it off; `recstack release` then prunes, see above).
    orchestrator_prunes_triton: bool = True
    # A new release is loaded beside the served ones only if its estimated size fits in
    # MemAvailable minus this headroom (MB); else the change is refused.
    release_memory_headroom_mb: int = Field(default=512, ge=0)

    # Hung dependencies (orchestrator/budget.py, orchestrator/breaker.py, docs/faults.md).
    # A Recommend call is answered within min(client deadline, this ceiling), whatever the
    # client's deadline: past it the answer is the popular-items fallback.
    latency_ceiling_ms: float = Field(default=300.0, gt=0)
    # Absolute caps of the Triton stages (each also gets at most its share of the
    # deadline); ~4x the p99 measured at 100/s on the 2-core host (docs/benchmark.md).
    user_tower_cap_ms: float = Field(default=50.0, gt=0)
    ranking_cap_ms: float = Field(default=100.0, gt=0)
    # When Triton cannot answer (down, hung, breaker open, model unloaded): "none" degrades
    # (popular items, retrieval order); "in_process" runs the release's same artifacts in
    # the orchestrator (orchestrator/local_models.py) and flags the answer
    # `user_tower_in_process` / `ranking_in_process`. Off by default: see docs/faults.md.
    model_fallback: Literal["none", "in_process"] = "none"
    # The online store's reads and writes: SQLite busy timeout, Redis socket timeouts; a
    # user read slower than this counts as a failure for the store's breaker.
    online_store_timeout_ms: float = Field(default=50.0, gt=0)
    # Circuit breaker per dependency: open after this many consecutive failures (or this
    # failure share over the last `window` calls), fail fast for the cool-down, then let
    # one probe through.
    breaker_failures: int = Field(default=5, ge=1)
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_window: int = Field(default=20, ge=1)
    breaker_cooldown_s: float = Field(default=1.0, ge=0)

    # RecordEvent timestamps: at most this far ahead of the server's clock (client clock
    # skew) and at most this far behind it (late delivery); others are INVALID_ARGUMENT.
    event_max_future_s: float = Field(default=300.0, ge=0)
    event_max_age_s: float = Field(default=86_400.0, gt=0)
    # Seconds a client should wait before retrying a RecordEvent the feature store could
    # not take (HTTP Retry-After, gRPC trailing metadata ``retry-after``).
    event_retry_after_s: int = Field(default=1, ge=0)
    # Largest request accepted: HTTP body (413 beyond it) and gRPC message
    # (RESOURCE_EXHAUSTED). The biggest valid request (10,000 excluded item ids) is ~100 kB.
    request_max_bytes: int = Field(default=1 << 20, ge=1024)
    # HTTP: a connection must deliver complete request headers within this many seconds of
    # opening (or of the previous response, when kept alive), else it is closed; the same
    # value closes idle keep-alive connections (aiohttp's keepalive_timeout does both).
    http_header_timeout_s: float = Field(default=20.0, gt=0)
    # HTTP: a request body must arrive within this many seconds (408 otherwise).
    http_body_timeout_s: float = Field(default=10.0, gt=0)

    # The event log (orchestrator/event_log.py, docs/events.md): what was served and every
    # accepted RecordEvent, as JSON lines in rotating segments under ``events_dir``
    # (default <data_dir>/events). A background thread writes them: a request never
    # waits; a full queue drops records (counted), a crash loses at most the records of
    # the last ``event_log_flush_ms`` (plus what sat in the queue).
    event_log: bool = True
    events_dir_path: Path | None = Field(default=None, alias="RECSTACK_EVENTS_DIR")
    event_log_flush_ms: float = Field(default=200.0, gt=0, le=60_000)
    event_log_flush_records: int = Field(default=1_000, ge=1)
    event_log_queue: int = Field(default=100_000, ge=1)
    # A segment is closed (renamed to *.jsonl) past this size; the oldest closed segments
    # are deleted while all of them together exceed the total.
    event_log_segment_bytes: int = Field(default=64 << 20, ge=4096)
    event_log_max_bytes: int = Field(default=2 << 30, ge=4096)

    # Quality and time (exporters/seen.py, orchestrator/service.py). Event types that make
    # an item "seen" (comma-separated; empty: what the data's meta.json says).
    seen_events_csv: str = Field(default="", alias="RECSTACK_SEEN_EVENTS")
    # Time-relative features are computed against min(request time, the release's data
    # end + this many days): a release never scores with a clock far outside its data.
    max_clock_lead_days: float = Field(default=7.0, ge=0)
    # The train/validation/test split (exporters/split.py): auto, time or per_user; the
    # time split's windows in days (None: 10% of the span each); the per-user split's
    # events held out per user.
    split_mode: SplitMode = "auto"
    split_val_days: float | None = Field(default=None, ge=0)
    split_test_days: float | None = Field(default=None, ge=0)
    split_val_last: int = Field(default=5, ge=1)
    split_test_last: int = Field(default=5, ge=1)
    # Light users (too few events for val_last + test_last): their last this many events
    # are test when they have more, nothing else; 0: training only (exporters/split.py).
    split_light_last: int = Field(default=1, ge=0)
    # Ranker windows (exporters/split.py): requests per user the ranker learns from;
    # None: 1 for a time split, 5 for a per-user split.
    split_windows: int | None = Field(default=None, ge=1)
    # What the ranker is boosted from (exporters/ranker_prior.py): auto, the better of the
    # gate's baselines on the validation window's training requests; popularity or
    # item_to_item; none: zero.
    ranker_prior: RankerPrior = "auto"
    # EASE's λ for the item-to-item source; with ``ease_lambda_tune`` chosen instead on
    # the validation window from a grid (exporters/ease_lambda.py; catalogs up to 5,000
    # items). Off by default: a tuned source is also a stronger gate baseline, and on the
    # small preset's implicit-feedback file the release then lost the gate
    # (docs/quality.md, "EASE's λ").
    ease_lambda: float = Field(default=EASE_LAMBDA, gt=0)
    ease_lambda_tune: bool = False
    # Refit the released towers and index on every event (pipeline step refit); off:
    # release the selection run's towers (trained before the validation window).
    refit_towers: bool = True
    # The offline engine of the feature tables (docs/offline.md): pandas on this host, or
    # Spark (`make setup-spark`: Java + pyspark) at ``spark_master`` — local[*] is Spark's
    # local mode on this host's cores, spark://host:7077 (or yarn, k8s://...) a cluster.
    # ``spark_partitions`` entity-hash partitions (0: about one per 1M events, at least
    # the default parallelism); each must fit in one executor's memory.
    offline_engine: Engine = "pandas"
    spark_master: str = "local[*]"
    spark_driver_memory: str = "2g"
    spark_executor_memory: str = "2g"
    spark_partitions: int = Field(default=0, ge=0)
    # Publish a release although its evaluation loses to the baselines; the reason is
    # recorded in the manifest (`recstack train --force-release REASON`).
    force_release: str = ""

    @field_validator("redis_cluster_nodes")
    @classmethod
    def _check_cluster_nodes(cls, value: str) -> str:
        parse_nodes(value)
        return value

    @property
    def redis_cluster_addresses(self) -> list[tuple[str, int]]:
        """``redis_cluster_nodes`` as (host, port) pairs."""
        return parse_nodes(self.redis_cluster_nodes)

    @property
    def seen_events(self) -> tuple[str, ...] | None:
        """The ``RECSTACK_SEEN_EVENTS`` override, or None (use the data's own)."""
        names = tuple(e.strip() for e in self.seen_events_csv.split(",") if e.strip())
        return names or None

    @property
    def raw_dir(self) -> Path:
        """Canonical raw tables (see exporters/schema.py)."""
        return self.data_dir / "raw"

    @property
    def features_dir(self) -> Path:
        """Event-timestamped feature tables: the Feast offline sources."""
        return self.data_dir / "features"

    @property
    def work_dir(self) -> Path:
        """Intermediate training outputs (checkpoints, candidates); resumable steps."""
        return self.data_dir / "work"

    @property
    def events_dir(self) -> Path:
        """The event log's folder (``RECSTACK_EVENTS_DIR``, default <data_dir>/events)."""
        return self.events_dir_path or self.data_dir / "events"

    @property
    def reports_dir(self) -> Path:
        return self.data_dir / "reports"


def parse_nodes(value: str) -> list[tuple[str, int]]:
    """``host:port,host:port`` -> [(host, port)]; ValueError naming the bad entry."""
    out: list[tuple[str, int]] = []
    for entry in (e.strip() for e in value.split(",")):
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 - 10000:
            raise ValueError(f"{entry!r} is not host:port (port 1..55535: the bus is port+10000)")
        out.append((host, int(port)))
    if len(set(out)) != len(out):
        raise ValueError(f"a node is listed twice in {value!r}")
    return out


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (read once)."""
    return Settings()

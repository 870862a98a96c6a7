"""Prometheus metrics of the orchestrator (served on settings.orchestrator_metrics_port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Sub-millisecond resolution where it matters: stages take 0.05-20 ms.
_BUCKETS = (
    0.0002,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
)

# Per-request metrics carry the release that served the request (the A/B arm).
STAGE_SECONDS = Histogram(
    "recstack_stage_seconds",
    "Time spent per request stage",
    ["stage", "release"],
    buckets=_BUCKETS,
)
STAGE_CPU_SECONDS = Histogram(
    "recstack_stage_cpu_seconds",
    "CPU time of the worker thread per request stage (compare with recstack_stage_seconds)",
    ["stage"],
    buckets=_BUCKETS,
)
REQUEST_SECONDS = Histogram(
    "recstack_request_seconds", "End-to-end handler time", ["method"], buckets=_BUCKETS
)
REQUESTS = Counter(
    "recstack_requests_total", "Requests by method and status code", ["method", "code"]
)
DEGRADED = Counter("recstack_degraded_total", "Degraded answers by reason", ["reason", "release"])
RELEASE = Gauge(
    "recstack_release_info", "Releases served, value = share of users routed to each", ["release"]
)
RECOMMENDATIONS = Counter(
    "recstack_recommendations_total",
    "Recommend answers by the release that served them",
    ["release"],
)
COLD_START = Counter("recstack_cold_start_total", "Requests for users without history", ["release"])
RELEASE_CHANGES = Counter(
    "recstack_release_changes_total",
    "Release state changes the orchestrator applied or refused",
    ["result"],  # done, refused (memory, bad release), failed
)
TRITON_REPINS = Counter(
    "recstack_triton_repins_total",
    "Times a pinned model version was found missing in Triton and loaded again",
)
EMBEDDING_CACHE = Counter(
    "recstack_user_embedding_cache_total", "User-tower cache look-ups by result", ["result"]
)
EVENTS = Counter("recstack_events_total", "RecordEvent calls pushed to Feast", ["event"])
EVENT_FAILURES = Counter(
    "recstack_event_failures_total",
    "RecordEvent calls the feature store did not take (answered UNAVAILABLE / 503)",
    ["reason"],  # unavailable (store down or locked), timeout, error
)

ONLINE_STORE_MISSING = Gauge(
    "recstack_online_store_missing_ratio",
    "Share of the recent look-ups of the release's users that found no row in the online"
    " store (answered features_missing; near 1: the store was emptied)",
    ["release"],
)

ITEM_SNAPSHOT_AGE = Gauge(
    "recstack_item_snapshot_age_seconds",
    "Seconds since the item feature snapshot (and the catalog popularity and popular/fresh"
    " lists built from it) was loaded",
)
ITEM_SNAPSHOT_MATERIALIZED = Gauge(
    "recstack_item_snapshot_materialized_timestamp_seconds",
    "Newest Feast materialisation end (unix s) the item snapshot reflects",
)
ITEM_SNAPSHOT_REFRESHES = Counter(
    "recstack_item_snapshot_refreshes_total",
    "Item snapshot refresh checks by result",
    ["result"],  # reloaded, unchanged, failed
)


_served: list[str] = []


def set_releases(shares: dict[str, float]) -> None:
    """Expose exactly the served releases, each with its share of users."""
    for old in _served:
        RELEASE.remove(old)
    _served[:] = list(shares)
    for release, share in shares.items():
        RELEASE.labels(release=release).set(share)


BREAKER_STATE = Gauge(
    "recstack_dependency_breaker_state",
    "Circuit breaker per dependency: 0 closed, 1 half-open (probing), 2 open (failing fast)",
    # triton:<model>:<version>, online_store:<sqlite|redis>,
    # online_store:redis_cluster:<host:port> (one per master)
    ["dependency"],
)
BREAKER_TRANSITIONS = Counter(
    "recstack_dependency_breaker_transitions_total",
    "Circuit breaker state changes by new state",
    ["dependency", "state"],
)
BREAKER_REJECTED = Counter(
    "recstack_dependency_breaker_rejected_total",
    "Calls not made because the dependency's breaker was open (each failed in microseconds)",
    ["dependency"],
)


def breaker_event(dependency: str, what: str) -> None:
    """A breaker's listener (orchestrator/breaker.py): a new breaker, a new state, or a
    refused call."""
    from orchestrator.breaker import CLOSED, CREATED, REJECTED, STATE_VALUE

    if what == REJECTED:
        BREAKER_REJECTED.labels(dependency).inc()
        return
    if what == CREATED:
        BREAKER_STATE.labels(dependency).set(STATE_VALUE[CLOSED])
        return
    BREAKER_STATE.labels(dependency).set(STATE_VALUE[what])
    BREAKER_TRANSITIONS.labels(dependency, what).inc()

"""Prometheus metrics of the orchestrator (served on settings.orchestrator_metrics_port)."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

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


def thread_group(name: str | None, is_main: bool, comm: str) -> str:
    """The ``thread`` label of a thread: ``main`` (the event loop and the gRPC/HTTP fronts),
    a Python thread's name without its pool number (``recommend_3`` -> ``recommend``,
    ``Thread-1 (_poll_wrapper)`` -> ``poll_wrapper``), else ``native:<comm>`` (threads no
    Python code started: gRPC's core, OpenMP and onnxruntime helpers)."""
    if is_main:
        return "main"
    if name is None:
        return f"native:{comm}"
    target = re.fullmatch(r"Thread-\d+ \((.+)\)", name)
    return re.sub(r"_\d+$", "", target.group(1).lstrip("_") if target else name)


class ThreadCpuCollector:
    """``recstack_thread_cpu_seconds_total{thread}``: the process's CPU time (user +
    system, from /proc) by thread group, read at scrape time — which part of a request's
    CPU the front's event loop, the workers and the background threads spend (issue 13:
    the orchestrator's own cost, next to the per-stage histograms). A thread stays in the
    group it was first seen in, and threads that ended keep the time last seen, so the
    counters never go down (what a thread spent after the last scrape before it ended is
    not counted). Nothing on machines without /proc."""

    def __init__(self, tasks: Path = Path("/proc/self/task")) -> None:
        self._tasks = tasks
        self._tick = float(os.sysconf("SC_CLK_TCK")) if hasattr(os, "sysconf") else 100.0
        self._lock = threading.Lock()
        # live thread (tid, start time) -> (group, seconds): the start time tells a reused
        # tid from the thread that had it before.
        self._last: dict[tuple[int, int], tuple[str, float]] = {}
        self._ended: dict[str, float] = {}  # group -> seconds of threads that ended

    def _read(self) -> dict[tuple[int, int], tuple[str, float]]:
        names = {t.native_id: t.name for t in threading.enumerate()}
        main = threading.main_thread().native_id
        now: dict[tuple[int, int], tuple[str, float]] = {}
        try:
            entries = list(os.scandir(self._tasks))
        except OSError:
            return now
        for entry in entries:
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:  # ended between the listing and the read
                continue
            # "tid (comm) state ... utime stime": comm may hold spaces and parentheses.
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            tid = int(entry.name)
            key = (tid, int(fields[19]))
            seconds = (int(fields[11]) + int(fields[12])) / self._tick
            seen = self._last.get(key)
            # A joined thread leaves threading.enumerate() before its task leaves /proc:
            # keep the group it was seen in rather than fall back to its kernel name.
            group = seen[0] if seen else thread_group(names.get(tid), tid == main, comm)
            now[key] = (group, seconds)
        return now

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield self._family()

    def collect(self) -> Iterator[CounterMetricFamily]:
        with self._lock:
            now = self._read()
            for key, (group, seconds) in self._last.items():
                if key not in now:
                    self._ended[group] = self._ended.get(group, 0.0) + seconds
            self._last = now
            totals = dict(self._ended)
            for group, seconds in now.values():
                totals[group] = totals.get(group, 0.0) + seconds
        family = self._family()
        for group in sorted(totals):
            family.add_metric([group], totals[group])
        yield family

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "recstack_thread_cpu_seconds",
            "CPU time (user + system) of the process's threads by group: main (event loop"
            " and fronts), recommend (workers), event, event-log, native:<name> (gRPC core,"
            " OpenMP)",
            labels=["thread"],
        )


THREAD_CPU = ThreadCpuCollector()
REGISTRY.register(THREAD_CPU)

"""Shared fixtures. Servers (Triton, Redis, the orchestrator) are started by fixtures of
the tests that need them and stopped afterwards; nothing here is mocked."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from recstack.settings import Settings


def port(n: int) -> int:
    """A fixed test port shifted by ``RECSTACK_TEST_PORT_OFFSET``, so two test runs on one
    machine (two checkouts) do not answer each other's requests."""
    import os

    return n + int(os.environ.get("RECSTACK_TEST_PORT_OFFSET", "0"))


def make_settings(base: Path, **overrides: object) -> Settings:
    """Settings whose writable paths all live under ``base`` (the repo's committed
    model_repository configs are copied there so version folders stay in the tmp dir)."""
    from exporters.model_repo import copy_committed_repository

    repo = copy_committed_repository(base / "model_repository")
    return Settings(
        data_dir=base / "data",
        model_repository=repo,
        releases_dir=base / "releases",
        run_dir=base / "run",
        **overrides,  # type: ignore[arg-type]
    )


def degraded_count(reason: str) -> float:
    """``recstack_degraded_total{reason}`` summed over releases (this process's registry)."""
    from orchestrator import metrics

    return sum(
        s.value
        for m in metrics.DEGRADED.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.labels.get("reason") == reason
    )


def active_users(s: Settings, n: int) -> list[str]:
    """The ``n`` users with the most clicks and purchases (full answers need a history)."""
    from exporters.raw_tables import read_table

    inter = read_table(s.raw_dir, "interactions")
    pos = inter[inter["event"].isin(["click", "purchase"])]
    return [str(int(u)) for u in pos["user_id"].value_counts().index[:n]]


def end_of_data(s: Settings) -> Any:
    """The newest interaction's time as a protobuf Timestamp: requests that carry it score
    as of the data (features relative to time, "not yet created"), not the wall clock."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from exporters.raw_tables import read_table

    inter = read_table(s.raw_dir, "interactions", columns=["timestamp"])
    ts = Timestamp()
    ts.FromDatetime(inter["timestamp"].max().to_pydatetime())
    return ts


def own_stack(
    trained: Settings, base: Path, triton_port: int, orchestrator_port: int, **update: Any
) -> Settings:
    """``trained`` (the trained small preset) on a stack of its own: empty releases folder,
    a copy of the committed model repository, its run folder, Triton on ``triton_port``
    +0/+1/+2 and the orchestrator's gRPC/HTTP/metrics/admin on ``orchestrator_port``
    +0..+3 (both before the test offset: :func:`port` applies it); ``update``: more
    settings."""
    from exporters.model_repo import copy_committed_repository

    return trained.model_copy(
        update={
            "releases_dir": base / "releases",
            "model_repository": copy_committed_repository(base / "model_repository"),
            "run_dir": base / "run",
            "triton_http_port": port(triton_port),
            "triton_grpc_port": port(triton_port + 1),
            "triton_metrics_port": port(triton_port + 2),
            "orchestrator_grpc_port": port(orchestrator_port),
            "orchestrator_http_port": port(orchestrator_port + 1),
            "orchestrator_metrics_port": port(orchestrator_port + 2),
            "orchestrator_admin_port": port(orchestrator_port + 3),
            **update,
        }
    )


def two_releases_first_live(s: Settings) -> Settings:
    """Publish releases 1 and 2 from the trained models and make 1 the live one (the
    starting point of the promotion tests); returns ``s``."""
    from exporters import release
    from exporters.release_state import ReleaseState, save_state

    assert release.publish(s) == 1 and release.publish(s) == 2
    state = ReleaseState(live=1)
    state.record("bootstrap", release=1)
    save_state(s, state)
    return s


def cpu_cost(call: Callable[[], object], repeat: int = 3) -> float:
    """The least thread CPU time (seconds) ``call`` took over ``repeat`` runs: what a
    "costs microseconds, not seconds" claim is about, without the host's preemptions and
    stray pauses that a single wall-clock reading on a busy 2-core runner includes."""
    import time

    best = float("inf")
    for _ in range(repeat):
        t0 = time.thread_time()
        call()
        best = min(best, time.thread_time() - t0)
    return best


def in_ci() -> bool:
    """CI sets ``CI=true`` (GitHub Actions, GitLab, and ``.ci/run`` do)."""
    import os

    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_redis_server() -> None:
    """Skip without ``redis-server`` on a developer's machine; fail under CI, where set-up
    (``make setup``) installs it, so a broken install cannot pass as skipped tests."""
    import shutil

    if shutil.which("redis-server") is not None:
        return
    message = "redis-server is not installed (make setup installs it)"
    if in_ci():
        pytest.fail(f"{message}; CI=true, so the Redis tests must run, not skip")
    pytest.skip(message)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Fresh settings rooted in a per-test temporary folder."""
    return make_settings(tmp_path)


@pytest.fixture(scope="session")
def small_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """Settings with the `small` preset generated once per test session (read-only use)."""
    from exporters.data_generate import generate

    s = make_settings(tmp_path_factory.mktemp("small"))
    generate(s, preset="small", seed=7)
    return s


@pytest.fixture(scope="session")
def trained_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The whole offline pipeline (`recstack train`) run once on the `small` preset:
    raw data, features, Feast, towers, ONNX, index, ranker, Treelite, report, release."""
    from exporters import pipeline
    from exporters.data_generate import generate

    s = make_settings(
        tmp_path_factory.mktemp("trained"),
        triton_http_port=port(18100),
        triton_grpc_port=port(18101),
        triton_metrics_port=port(18102),
        orchestrator_grpc_port=port(18150),
        orchestrator_http_port=port(18151),
        orchestrator_metrics_port=port(18152),
        orchestrator_admin_port=port(18153),
    )
    generate(s, preset="small", seed=11)
    pipeline.run(s, progress=lambda _: None)
    return s

"""The in-process reference (issue 13): the orchestrator's own pipeline with its models run
in this process instead of Triton. A benchmark tool, not a serving mode: it tells what the
same release costs without Triton, so the benchmark can report recstack's CPU and latency
as a ratio to it (``loadtest/bench_large.sh``, docs/benchmark.md).

Everything but the model calls is recstack's: :class:`RecommendService` over a
:class:`ServingRelease` (the same Feast online store, FAISS index, item snapshot,
candidate sources and post-processing) behind the same gRPC/HTTP front and metrics
(``orchestrator.server.serve``). Only ``release.triton`` is replaced by
:class:`InProcessModels`, which runs the release's pinned versions of the same artifacts
the way the embedded Triton's shims do (model_repository/_shims/): the ONNX models in
onnxruntime with one intra-op thread, the ranker's tl2cgen-compiled library with one
thread. Tensor names and the rank ensemble's steps come from config.pbtxt.

``recstack bench reference --port P`` serves it; its answers equal the orchestrator's
(tests/test_reference_parity.py)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import sys
from typing import TYPE_CHECKING

from orchestrator.local_models import InProcessModels
from orchestrator.processes import ManagedProcess
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

if TYPE_CHECKING:
    from orchestrator.service import RecommendService

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the service
def reference_release_id(settings: Settings, release_id: int | None) -> int:
    """``release_id``, else the release state's live release (what the orchestrator
    serves to every user when no A/B test is on)."""
    if release_id is not None:
        return int(release_id)
    from exporters.release_state import load_state

    state = load_state(settings)
    if state.live is None:
        raise UserError(f"no release to serve in {settings.releases_dir}")
    if len(state.serving) > 1:
        raise UserError(
            f"the release state serves {state.serving} (an A/B test): the reference serves "
            "one release; pass --release"
        )
    return int(state.live)


async def create_reference_service(
    settings: Settings, release_id: int | None = None
) -> RecommendService:
    """The orchestrator's :class:`RecommendService` (configured from ``settings`` as
    ``RecommendService.create`` does) over one release whose models run in process."""
    from orchestrator import metrics
    from orchestrator.breaker import BreakerConfig, Breakers
    from orchestrator.budget import BudgetConfig
    from orchestrator.event_log import EventLog
    from orchestrator.service import RecommendService, ServiceConfig
    from orchestrator.serving_release import ServingRelease

    rid = reference_release_id(settings, release_id)
    cfg = ServiceConfig(
        workers=settings.orchestrator_workers, budget=BudgetConfig.from_settings(settings)
    )
    breakers = Breakers(BreakerConfig.from_settings(settings), on_change=metrics.breaker_event)

    def load() -> ServingRelease:
        rel = ServingRelease.load(settings, rid, breakers)
        rel.triton.close()  # never called: the models run here
        rel.triton = InProcessModels.for_release(settings, rid)  # type: ignore[assignment]
        rel.warm_up(cfg.n_ranked)
        return rel

    rel = await asyncio.to_thread(load)
    log.info("reference: release %d, models in process %s", rid, rel.triton.versions)
    svc = RecommendService(rel, cfg, settings.max_clock_lead_days, EventLog.from_settings(settings))
    svc.start_refresh(settings.feature_refresh_s)
    return svc


def reference_settings(
    settings: Settings,
    port: int,
    http_port: int | None = None,
    metrics_port: int | None = None,
    admin_port: int | None = None,
) -> Settings:
    """``settings`` with the reference's own ports (gRPC ``port``, then HTTP, metrics and
    admin at +1, +2, +3 unless given) and its own event log folder
    (``<events_dir>/reference``): its answers must never reach the served-answer log that
    ``recstack data import-events`` trains on."""
    ports = {
        "orchestrator_grpc_port": port,
        "orchestrator_http_port": http_port or port + 1,
        "orchestrator_metrics_port": metrics_port or port + 2,
        "orchestrator_admin_port": admin_port or port + 3,
    }
    for name, value in ports.items():
        if not 0 < int(value) < 65536:
            raise UserError(f"{name.removeprefix('orchestrator_')} {value} is not a TCP port")
    if len(set(ports.values())) < len(ports):
        raise UserError(f"the reference's ports must differ: {ports}")
    return settings.model_copy(
        update={**ports, "events_dir_path": settings.events_dir / "reference"}
    )


NAME = "reference"


def start_reference(
    settings: Settings, release_id: int | None = None, timeout: float = 600.0
) -> ManagedProcess:
    """Start ``recstack bench reference`` on ``settings``' orchestrator ports (see
    :func:`reference_settings`) in the background; returns once gRPC health says SERVING."""
    from orchestrator.orchestrator_process import grpc_serving, orchestrator_ports, settings_env
    from orchestrator.processes import start_process

    argv = [sys.executable, "-m", "recstack.cli", "bench", "reference"]
    argv += ["--port", str(settings.orchestrator_grpc_port)]
    argv += ["--http-port", str(settings.orchestrator_http_port)]
    argv += ["--metrics-port", str(settings.orchestrator_metrics_port)]
    argv += ["--admin-port", str(settings.orchestrator_admin_port)]
    if release_id is not None:
        argv += ["--release", str(release_id)]
    target = f"{settings.orchestrator_host}:{settings.orchestrator_grpc_port}"
    return start_process(
        NAME,
        argv,
        settings,
        ready=lambda: grpc_serving(target),
        timeout=timeout,
        env=settings_env(settings),
        ports=orchestrator_ports(settings),
    )


def cli(args: argparse.Namespace) -> int:
    """``recstack bench reference --port P [--release R] [--detach]``."""
    settings = reference_settings(
        get_settings(), args.port, args.http_port, args.metrics_port, args.admin_port
    )
    if args.release is not None and args.release < 0:
        raise UserError(f"--release {args.release}: release ids are >= 0")
    if args.detach:
        proc = start_reference(settings, args.release, args.timeout)
        print(
            f"reference running (pid {proc.pid}) on grpc port "
            f"{settings.orchestrator_grpc_port}, metrics port "
            f"{settings.orchestrator_metrics_port}; log {proc.log_path}"
        )
        return 0
    from orchestrator.server import run_loop, serve

    make = functools.partial(create_reference_service, release_id=args.release)
    run_loop(serve(settings, make_service=make), settings)
    return 0

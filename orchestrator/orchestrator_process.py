"""Run the orchestrator as a background server of ours (``serve orchestrator --detach``,
the demo, end-to-end tests): a separate process, ready once gRPC health says SERVING."""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.processes import ManagedProcess, start_process
from recstack.settings import Settings

NAME = "orchestrator"


def grpc_serving(target: str, timeout: float = 1.0) -> bool:
    """True when the server at ``target`` answers health checks with SERVING."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process see the same settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        env[f"RECSTACK_{name.upper()}"] = str(value)
    return env


def start_orchestrator(settings: Settings, timeout: float = 180.0) -> ManagedProcess:
    """Start ``recstack serve orchestrator`` in the background and wait until it serves."""
    target = f"{settings.orchestrator_host}:{settings.orchestrator_grpc_port}"
    return start_process(
        NAME,
        [sys.executable, "-m", "recstack.cli", "serve", "orchestrator"],
        settings,
        ready=lambda: grpc_serving(target),
        timeout=timeout,
        env=settings_env(settings),
    )

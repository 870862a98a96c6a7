"""Run the orchestrator as a background server of ours (``serve orchestrator --detach``,
the demo, end-to-end tests): a separate process, ready once gRPC health says SERVING."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from orchestrator.processes import ManagedProcess, Port, start_process
from recstack.settings import Settings

NAME = "orchestrator"
FEAST_METRICS_PREFIX = "feast_metrics_"  # feast/metrics.py's tempfile.mkdtemp prefix


def grpc_serving(target: str, timeout: float = 1.0) -> bool:
    """True when the server at ``target`` answers health checks with SERVING."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process see the same settings.

    Importing Feast sets ``PROMETHEUS_MULTIPROC_DIR`` (to a temp dir of its own) in this
    process; inherited, it would switch the child's prometheus_client into multiprocess
    mode (metric values in mmap files of a directory this process deletes at exit). Such
    values are dropped; a directory the user chose is kept."""
    env = dict(os.environ)
    for name in ("PROMETHEUS_MULTIPROC_DIR", "PROMETHEUS_MULTIPROCESS_DIR"):
        if Path(env.get(name, "/")).name.startswith(FEAST_METRICS_PREFIX):
            del env[name]
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        key = field.alias or f"RECSTACK_{name.upper()}"  # an alias is the whole env name
        if value is None:  # str(None) would not parse: leave it to the child's default
            env.pop(key, None)
        else:
            env[key] = str(value)
    return env


def orchestrator_ports(settings: Settings, setting: str | None = None) -> list[Port]:
    """The four ports an orchestrator listens on; ``setting``: the variable that moves
    them all instead of their own (a replica's come from the replica port base)."""
    host, admin = settings.orchestrator_host, settings.orchestrator_admin_host
    ports = [
        Port.of(settings, "orchestrator_grpc_port", host),
        Port.of(settings, "orchestrator_http_port", host),
        Port.of(settings, "orchestrator_metrics_port", host),
        Port.of(settings, "orchestrator_admin_port", admin),
    ]
    return [Port(p.host, p.port, setting) for p in ports] if setting else ports


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
        ports=orchestrator_ports(settings),
    )

"""Servers we start are stopped with their whole process group: no orphans."""

from __future__ import annotations

import os
import socket
import sys
import time

import pytest

from orchestrator.processes import (
    Port,
    port_taken,
    read_pid,
    start_process,
    stop_order,
    stop_process,
)
from recstack.errors import UserError
from recstack.settings import Settings

# A parent that starts a child and both sleep: what tritonserver + its stubs look like.
SCRIPT = """
import socket, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[2], "w").write(str(child.pid))
s = socket.socket(); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
time.sleep(600)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purpose.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def _connectable(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_start_ready_stop_leaves_no_orphans(settings: Settings) -> None:
    port, child_file = _free_port(), settings.data_dir / "child.pid"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    proc = start_process(
        "fake",
        [sys.executable, "-c", SCRIPT, str(port), str(child_file)],
        settings,
        ready=lambda: _connectable(port),
        timeout=20,
    )
    assert read_pid(settings, "fake") == proc.pid
    with pytest.raises(UserError, match="already runs"):
        start_process("fake", [sys.executable, "-c", "pass"], settings, ready=lambda: True)
    child = int(child_file.read_text())
    assert _alive(child)
    assert stop_process(settings, "fake")
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "child of the stopped server survived"
    assert read_pid(settings, "fake") is None
    assert not stop_process(settings, "fake")


def test_a_taken_port_is_refused_before_start_naming_its_holder(settings: Settings) -> None:
    """Another server on the port (here this test process's socket) would answer the
    readiness check in our server's place: refuse, naming the port, the variable that
    moves it, who holds it and `recstack stop`; start nothing."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    marker = settings.data_dir / "started"
    argv = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert port_taken("127.0.0.1", port)
        ports = [Port("127.0.0.1", _free_port(), "RECSTACK_A_PORT")]
        ports.append(Port("127.0.0.1", port, "RECSTACK_B_PORT"))
        with pytest.raises(UserError) as refused:
            start_process("fake", argv, settings, ready=lambda: True, ports=ports)
    message = str(refused.value)
    assert f"127.0.0.1:{port} (RECSTACK_B_PORT) already in use" in message
    assert f"127.0.0.1:{ports[0].port}" not in message  # the free one is not blamed
    assert f"pid {os.getpid()} `" in message and f"working directory {os.getcwd()}" in message
    assert "`recstack stop` in that checkout" in message
    assert "RECSTACK_A_PORT, RECSTACK_B_PORT" in message  # the variables that move them
    assert not marker.exists() and read_pid(settings, "fake") is None
    assert not port_taken("127.0.0.1", port)  # closed: free again at once


def test_early_exit_reports_the_log(settings: Settings) -> None:
    argv = [sys.executable, "-c", "import sys; print('boom on start'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match="boom on start"):
        start_process("dies", argv, settings, ready=lambda: False, timeout=10)
    assert read_pid(settings, "dies") is None


def test_child_env_drops_feasts_prometheus_dir(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feast's import-time PROMETHEUS_MULTIPROC_DIR must not put the orchestrator's own
    metrics into multiprocess mode; a directory the user set on purpose is passed on."""
    from orchestrator.orchestrator_process import settings_env

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/tmp/feast_metrics_abc123")
    monkeypatch.setenv("PROMETHEUS_MULTIPROCESS_DIR", "/tmp/feast_metrics_abc123")
    env = settings_env(settings)
    assert "PROMETHEUS_MULTIPROC_DIR" not in env and "PROMETHEUS_MULTIPROCESS_DIR" not in env
    assert env["RECSTACK_ORCHESTRATOR_GRPC_PORT"] == str(settings.orchestrator_grpc_port)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/srv/metrics")
    assert settings_env(settings)["PROMETHEUS_MULTIPROC_DIR"] == "/srv/metrics"


def test_recstack_stop_goes_from_the_front_to_the_stores() -> None:
    """nginx, then the orchestrators and the reference (Triton's and the stores' clients),
    then Triton, then the online stores; an unknown kind before the stores."""
    names = ["redis-6379", "triton", "orchestrator-1", "nginx", "reference", "orchestrator"]
    names += ["redis-cluster-7000", "spark-history"]
    assert stop_order(names) == [
        "nginx",
        "orchestrator",
        "orchestrator-1",
        "reference",
        "triton",
        "spark-history",
        "redis-6379",
        "redis-cluster-7000",
    ]

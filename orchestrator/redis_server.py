"""Debian's ``redis-server`` as a process of our own (``recstack serve redis``).

Service start-up is blocked on these machines, so the project starts redis-server itself
on ``settings.redis_host:settings.redis_port`` with a config of its own, and stops it by pid
(orchestrator/processes.py).

Persistence: the append-only file (AOF), fsynced once a second. Materialisation could
rebuild the batch features, but not the events pushed in real time (RecordEvent): an event
answered ``accepted`` must survive a restart. Redis appends each write to the AOF (a
``write(2)`` into the kernel) before it replies, so a killed Redis (or a killed
orchestrator) loses nothing it acknowledged; only a crash of the machine itself (kernel,
power) can lose the writes of the last second or two not yet fsynced. ``appendfsync
always`` would close that window at the cost of an fsync per write (docs/features.md).
The data lives beside the Feast registry that records what was materialised into this
store: ``<data_dir>/feast/redis/server-<port>`` (the run dir holds only the config).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import socket
from pathlib import Path

from orchestrator.processes import ManagedProcess, Port, hold, start_process, stop_process
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)


def process_name(settings: Settings) -> str:
    """The pid/log name; the port is part of it so test and demo servers never clash."""
    return f"redis-{settings.redis_port}"


def redis_binary() -> str:
    """Path of redis-server, or a UserError saying how to install it."""
    path = shutil.which("redis-server")
    if path is None:
        raise UserError(
            "redis-server is not installed: `make setup` installs it "
            "(apt-get install -y redis-server)"
        )
    return path


def data_dir(settings: Settings) -> Path:
    """Where this server keeps its append-only file (next to the store's Feast registry)."""
    return settings.data_dir / "feast" / "redis" / f"server-{settings.redis_port}"


def _config(settings: Settings) -> str:
    workdir = data_dir(settings)
    workdir.mkdir(parents=True, exist_ok=True)
    return server_config(settings.redis_host, settings.redis_port, workdir)


def server_config(host: str, port: int, workdir: Path, extra: tuple[str, ...] = ()) -> str:
    """redis.conf for one of our servers: loopback, AOF only (see above), log to stdout."""
    return "\n".join(
        [
            f"bind {host}",
            f"port {port}",
            "protected-mode yes",
            "daemonize no",
            'save ""',  # no RDB snapshots: the AOF is the one durable copy
            "appendonly yes",
            # Written to the kernel before each reply, fsynced every second: see above.
            "appendfsync everysec",
            f"dir {workdir}",
            "loglevel warning",
            'logfile ""',  # stdout, captured by processes.start_process
            "databases 1",
            *extra,
            "",
        ]
    )


def ping(settings: Settings, timeout: float = 0.5) -> bool:
    """True if a Redis server answers PING on the configured address."""
    return ping_address(settings.redis_host, settings.redis_port, timeout)


def ping_address(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a Redis server answers PING on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def start(settings: Settings, timeout: float = 20.0) -> ManagedProcess:
    """Start redis-server and return once it answers PING (UserError naming who holds
    the port when something else listens there)."""
    conf = settings.run_dir / process_name(settings) / "redis.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(_config(settings))
    return start_process(
        process_name(settings),
        [redis_binary(), str(conf)],
        settings,
        ready=lambda: ping(settings),
        timeout=timeout,
        ports=[Port.of(settings, "redis_port", settings.redis_host)],
    )


def stop(settings: Settings) -> bool:
    """Stop our redis-server on the configured port, if it runs."""
    return stop_process(settings, process_name(settings))


def cli(args: argparse.Namespace) -> int:
    """``recstack serve redis [--detach]``."""
    settings = get_settings()
    proc = start(settings)
    where = f"{settings.redis_host}:{settings.redis_port}"
    return hold([proc], f"redis-server on {where} (pid {proc.pid})", args.detach)

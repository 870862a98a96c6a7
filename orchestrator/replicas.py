"""Several orchestrator replicas on one machine behind Debian's nginx (issue 14, part 3).

``RECSTACK_ORCHESTRATOR_REPLICAS=N recstack serve orchestrator`` starts N orchestrator
processes that share one Triton, the release state and the online store, and nginx in front
of them on the orchestrator's public gRPC and HTTP ports. Each replica has its own four
ports (:func:`replicas`); the event log folder is shared (segment names carry the pid).

Balancing is nginx's: round robin per call over HTTP/2 (``grpc_pass``) and HTTP/1.1
(``proxy_pass``) upstreams with keep-alive connections, passive health (a replica that
refuses connections or resets them is skipped for ``fail_timeout``), and a retry on the
next replica for calls a replica refused (``Recommend`` is marked safe to repeat, as is
``GET /v1/recommendations``; ``RecordEvent``/``POST /v1/events`` are never repeated once
sent). gRPC calls already streamed to a replica that dies fail: nginx does not buffer
gRPC request bodies, so it cannot resend them (docs/deploy.md has the measured count).
nginx runs as the current user with its own prefix under ``<run_dir>/nginx``, on loopback
(``orchestrator_host``).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Set
from dataclasses import dataclass
from pathlib import Path

from orchestrator import recommender_pb2 as pb
from orchestrator.orchestrator_process import grpc_serving, orchestrator_ports, settings_env
from orchestrator.processes import (
    ManagedProcess,
    log_path,
    read_pid,
    require_pid,
    start_process,
    stop_process,
)
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

NGINX = "nginx"  # the process name (pid file) and the prefix folder under run_dir
PORT_STRIDE = 10  # ports per replica: base + 10*i + (0 gRPC, 1 HTTP, 2 metrics, 3 admin)
RECOMMEND_PATH = "/{}/Recommend".format(pb.DESCRIPTOR.services_by_name["Recommender"].full_name)
# A replica that failed (refused or reset a connection) gets no calls for this long, then
# one call probes it again (nginx's passive health check).
FAIL_TIMEOUT_S = 2
WORKER_SHUTDOWN_S = 10


@dataclass(frozen=True)
class Replica:
    """One orchestrator of the set: its process name and ports."""

    index: int
    grpc_port: int
    http_port: int
    metrics_port: int
    admin_port: int

    @property
    def name(self) -> str:
        return f"orchestrator-{self.index}"


def replicas(settings: Settings) -> list[Replica]:
    """The replicas ``settings`` describes (none when one orchestrator serves directly)."""
    if settings.orchestrator_replicas < 2:
        return []
    base = settings.orchestrator_replica_port_base
    out = [
        Replica(i, *(base + PORT_STRIDE * i + k for k in range(4)))
        for i in range(settings.orchestrator_replicas)
    ]
    public = {
        settings.orchestrator_grpc_port,
        settings.orchestrator_http_port,
        settings.orchestrator_metrics_port,
        settings.orchestrator_admin_port,
    }
    taken = public & {
        p for r in out for p in (r.grpc_port, r.http_port, r.metrics_port, r.admin_port)
    }
    if taken:
        raise UserError(
            f"replica ports (from RECSTACK_ORCHESTRATOR_REPLICA_PORT_BASE="
            f"{base}) overlap the orchestrator's public ports {sorted(taken)}: move the base"
        )
    return out


def admin_ports(settings: Settings) -> dict[str, int]:
    """Every orchestrator's admin port by process name: the replicas', or the one's."""
    reps = replicas(settings)
    if not reps:
        return {"orchestrator": settings.orchestrator_admin_port}
    return {r.name: r.admin_port for r in reps}


def replica_settings(settings: Settings, replica: Replica) -> Settings:
    """What replica ``replica`` runs with: its ports, one orchestrator (no recursion), and no
    Triton pruning (another replica may still serve what one no longer needs)."""
    return settings.model_copy(
        update={
            "orchestrator_grpc_port": replica.grpc_port,
            "orchestrator_http_port": replica.http_port,
            "orchestrator_metrics_port": replica.metrics_port,
            "orchestrator_admin_port": replica.admin_port,
            "orchestrator_replicas": 1,
            "orchestrator_prunes_triton": False,
        }
    )


# ------------------------------------------------------------------------- nginx
def nginx_binary() -> str:
    """Debian's nginx (``make setup`` installs it)."""
    found = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None
    )
    if found is None:
        raise UserError("nginx is not installed: run `make setup` (apt-get install nginx)")
    return found


def nginx_prefix(settings: Settings) -> Path:
    return settings.run_dir / NGINX


def render_nginx_conf(settings: Settings, out: Set[str] = frozenset()) -> str:
    """nginx.conf for the replicas of ``settings`` (a prefix of its own, no root needed);
    the replicas named in ``out`` are listed ``down``: nginx sends them nothing."""
    reps = replicas(settings)
    if not reps:
        raise UserError("nginx balances replicas: set RECSTACK_ORCHESTRATOR_REPLICAS >= 2")
    prefix = nginx_prefix(settings)
    host = settings.orchestrator_host
    # A root master would switch its workers to `nobody`; keep them the current user.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n" if os.geteuid() == 0 else ""
    # aiohttp drops idle keep-alive connections after http_header_timeout_s: nginx must
    # drop its idle ones first, or it may send on a connection the replica is closing.
    idle_s = max(1, int(settings.http_header_timeout_s / 2))
    body = settings.request_max_bytes

    fail = FAIL_TIMEOUT_S

    def servers(port_of: str) -> str:
        return "".join(
            f"        server {host}:{getattr(r, port_of)} max_fails=1 fail_timeout={fail}s"
            f"{' down' if r.name in out else ''};\n"
            for r in reps
        )

    def upstream(name: str, port_of: str) -> str:
        return (
            f"    upstream {name} {{\n{servers(port_of)}"
            f"        keepalive 32;\n"
            f"        keepalive_timeout {idle_s}s;\n"
            f"        keepalive_requests 1000000;\n"
            f"    }}\n"
        )

    temp = "".join(
        f"    {kind}_temp_path {prefix}/tmp/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""# Rendered by orchestrator/replicas.py from the settings at every start; do not edit.
{user}daemon off;
master_process on;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
# A reload (a replica taken out or brought back) lets the old worker finish its calls;
# one that still has some after this long closes them.
worker_shutdown_timeout {WORKER_SHUTDOWN_S}s;

events {{
    worker_connections 4096;
}}

http {{
{temp}    # Which replica answered each call; a retried call lists every replica it tried.
    # grpc-status is a header in error answers, a trailer in OK ones.
    log_format recstack '$msec $request_time $status $upstream_addr $upstream_status '
                        '"$request_uri" $sent_http_grpc_status$sent_trailer_grpc_status';
    access_log {prefix}/access.log recstack buffer=64k flush=1s;
    client_max_body_size {body};
    keepalive_requests 1000000;
    http2_max_concurrent_streams 1024;

{upstream("recstack_grpc", "grpc_port")}
{upstream("recstack_http", "http_port")}
    server {{
        listen {host}:{settings.orchestrator_grpc_port} http2;
        grpc_connect_timeout 1s;
        # A call a replica refused (its port is closed: stopped, killed, restarting) goes
        # to the next one. Recommend only reads, so nginx may repeat it even once sent;
        # but nginx streams gRPC request bodies unbuffered and cannot resend a call it
        # already streamed to a replica that then died: those calls fail (UNAVAILABLE).
        location = {RECOMMEND_PATH} {{
            grpc_pass grpc://recstack_grpc;
            grpc_next_upstream error timeout non_idempotent;
        }}
        # RecordEvent writes: retried only if it never reached a replica. Health checks and
        # reflection land on any replica.
        location / {{
            grpc_pass grpc://recstack_grpc;
            grpc_next_upstream error timeout;
        }}
    }}

    server {{
        listen {host}:{settings.orchestrator_http_port};
        location / {{
            proxy_pass http://recstack_http;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_connect_timeout 1s;
            # GET /v1/recommendations is retried on the next replica; a POST /v1/events
            # only if it never reached one (nginx does not repeat a sent POST).
            proxy_next_upstream error timeout http_502 http_504;
        }}
    }}
}}
"""


def write_nginx_conf(settings: Settings, out: Set[str] = frozenset()) -> Path:
    """Write the config beside ``nginx.conf`` (and the prefix's folders); returns its path.
    :func:`check_nginx_conf` moves it into place once nginx accepts it."""
    prefix = nginx_prefix(settings)
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (prefix / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf.new"
    conf.write_text(render_nginx_conf(settings, out))
    return conf


def nginx_argv(settings: Settings, conf: Path, *extra: str) -> list[str]:
    # -e: the error log before the config is read (the compiled-in path needs root).
    return [
        nginx_binary(),
        "-p",
        str(nginx_prefix(settings)),
        "-e",
        "stderr",
        "-c",
        str(conf),
        *extra,
    ]


def check_nginx_conf(settings: Settings, out: Set[str] = frozenset()) -> str:
    """Render the config, ``nginx -t`` it, then rename it to ``nginx.conf`` (a running
    nginx reads that file only at a reload); nginx's output, or a UserError with it."""
    conf = write_nginx_conf(settings, out)
    done = subprocess.run(nginx_argv(settings, conf, "-t"), capture_output=True, text=True)
    if done.returncode != 0:
        raise UserError(f"nginx rejects {conf}:\n{done.stderr.strip()}")
    conf.replace(conf.with_name("nginx.conf"))
    return done.stderr.strip()


def start_nginx(settings: Settings, timeout: float = 30.0) -> ManagedProcess:
    """nginx in front of the replicas, ready once a health check passes through it."""
    check_nginx_conf(settings)
    conf = nginx_prefix(settings) / "nginx.conf"
    target = f"{settings.orchestrator_host}:{settings.orchestrator_grpc_port}"
    return start_process(
        NGINX,
        nginx_argv(settings, conf),
        settings,
        ready=lambda: grpc_serving(target),
        timeout=timeout,
        ports=orchestrator_ports(settings)[:2],  # nginx takes the public gRPC and HTTP ports
    )


# ------------------------------------------------------------------------- the set
def start_replica(settings: Settings, replica: Replica, timeout: float = 180.0) -> ManagedProcess:
    """``recstack serve orchestrator`` on the replica's ports; returns once it serves."""
    rs = replica_settings(settings, replica)
    target = f"{rs.orchestrator_host}:{rs.orchestrator_grpc_port}"
    return start_process(
        replica.name,
        [sys.executable, "-m", "recstack.cli", "serve", "orchestrator"],
        settings,
        ready=lambda: grpc_serving(target),
        timeout=timeout,
        env=settings_env(rs),
        ports=orchestrator_ports(rs, "RECSTACK_ORCHESTRATOR_REPLICA_PORT_BASE"),
    )


def start_replicas(settings: Settings, timeout: float = 180.0) -> dict[str, ManagedProcess]:
    """Start every replica that is not running (in parallel), then nginx if it is not;
    running ones are kept, so this also brings back a replica that died."""
    reps = replicas(settings)
    if not reps:
        raise UserError("RECSTACK_ORCHESTRATOR_REPLICAS is 1: start one with `serve orchestrator`")
    nginx_binary()  # fail before starting anything
    missing = [r for r in reps if read_pid(settings, r.name) is None]
    started: dict[str, ManagedProcess] = {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(reps)) as pool:
        futures = {r.name: pool.submit(start_replica, settings, r, timeout) for r in missing}
        errors = []
        for name, fut in futures.items():
            try:
                started[name] = fut.result()
            except Exception as e:
                errors.append(f"{name}: {e}")
    if errors:
        for proc in started.values():
            proc.stop()
        raise UserError("replicas did not start:\n" + "\n".join(errors))
    if read_pid(settings, NGINX) is None:
        try:
            started[NGINX] = start_nginx(settings)
        except Exception:
            for proc in started.values():
                proc.stop()
            raise
    else:  # nginx kept running: give it back the replicas a drain took out
        reload_nginx(settings, down_replicas(settings))
    return started


def nginx_workers(master: int) -> set[int]:
    """The pids of nginx's workers: the master's children (read from /proc)."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # the process ended while we read
        if int(fields[1]) == master:
            out.add(int(stat.parent.name))
    return out


def down_replicas(settings: Settings) -> set[str]:
    """The replicas without a live process: listed ``down`` at nginx's next reload."""
    return {r.name for r in replicas(settings) if read_pid(settings, r.name) is None}


def reload_nginx(
    settings: Settings, out: Set[str], timeout: float = WORKER_SHUTDOWN_S + 5.0
) -> float:
    """Render the config with ``out`` down, check it, have the running nginx load it
    (SIGHUP) and wait until the workers of the old config have exited: from then on no
    call goes to a replica in ``out``. Returns the seconds it took."""
    master = require_pid(settings, NGINX)
    check_nginx_conf(settings, out)
    t0 = time.monotonic()
    old = nginx_workers(master)
    os.kill(master, signal.SIGHUP)
    while time.monotonic() - t0 < timeout:
        now = nginx_workers(master)
        if not now & old and now - old:
            return time.monotonic() - t0
        time.sleep(0.02)
    raise UserError(
        f"nginx did not take the new config within {timeout:.0f} s "
        f"(its log: {log_path(settings, NGINX)})"
    )


def drain_replica(settings: Settings, name: str, timeout: float = 30.0) -> tuple[float, float]:
    """Stop replica ``name`` without failing a call: take it out of nginx's upstream
    (:func:`reload_nginx`), then SIGTERM it and wait for its exit (with no call arriving
    its drain ends after ``DRAIN_IDLE_SECONDS``). A SIGTERM alone, from outside, races
    nginx, which does not see NOT_SERVING and keeps sending until the port closes.
    Returns (seconds until nginx sent it nothing, seconds until it exited)."""
    names = {r.name for r in replicas(settings)}
    if name not in names:
        raise UserError(f"{name} is not a replica of this set ({', '.join(sorted(names))})")
    require_pid(settings, name)
    out_s = (
        reload_nginx(settings, down_replicas(settings) | {name})
        if read_pid(settings, NGINX) is not None
        else 0.0
    )
    t0 = time.monotonic()
    stop_process(settings, name, timeout)
    return out_s, time.monotonic() - t0


def stop_replicas(settings: Settings) -> list[str]:
    """Stop nginx and every replica (``recstack stop`` does the same for all servers)."""
    names = [NGINX] + [r.name for r in replicas(settings)]
    return [n for n in names if stop_process(settings, n)]


def serve(settings: Settings, detach: bool) -> int:
    """``recstack serve orchestrator`` with N > 1 replicas: start them and nginx; without
    ``--detach`` stay in the foreground until SIGINT/SIGTERM, then stop them (nginx first,
    then each replica drains)."""
    started = start_replicas(settings)
    reps = replicas(settings)
    host = settings.orchestrator_host
    for r in reps:
        print(
            f"{r.name}: grpc {host}:{r.grpc_port} http {host}:{r.http_port} "
            f"metrics {host}:{r.metrics_port} "
            f"admin {settings.orchestrator_admin_host}:{r.admin_port}"
        )
    print(
        f"nginx: grpc {host}:{settings.orchestrator_grpc_port} http "
        f"{host}:{settings.orchestrator_http_port} -> {len(reps)} replicas "
        f"(started now: {', '.join(sorted(started)) or 'none, all were running'})",
        flush=True,
    )
    if detach:
        return 0
    stop = asyncio.Event()

    async def wait() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()

    try:
        asyncio.run(wait())
    finally:
        stop_replicas(settings)
    return 0


def cli_drain(args: argparse.Namespace) -> int:
    """``recstack serve drain NAME``: stop one replica without failing a call (out of
    nginx first, then SIGTERM); ``recstack serve orchestrator --detach`` brings it back."""
    out_s, stop_s = drain_replica(get_settings(), args.name)
    print(f"{args.name}: out of nginx's upstream in {out_s:.2f} s, stopped {stop_s:.2f} s later")
    return 0


def cli_signal(args: argparse.Namespace) -> int:
    """``recstack serve signal NAME --signal TERM|KILL``: signal one server of ours (a replica
    in a load test's timed action). TERM goes to the process (it drains); KILL to its group."""
    settings = get_settings()
    pid = require_pid(settings, args.name)
    if args.signal == "KILL":
        os.killpg(pid, signal.SIGKILL)
    else:
        os.kill(pid, signal.SIGTERM)
    print(f"SIG{args.signal} sent to {args.name} (pid {pid})")
    return 0

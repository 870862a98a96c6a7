"""A local Redis Cluster of Debian's ``redis-server`` (``recstack serve redis-cluster``).

One master per address of ``settings.redis_cluster_nodes`` (three by default), each a
process of ours like the single node of orchestrator/redis_server.py, with the same
persistence (AOF, fsynced every second) plus ``cluster-enabled yes``; the first start
joins them with ``redis-cli --cluster create ... --cluster-yes`` (no replicas). A node's
cluster state (its id, the slot map) is its ``nodes.conf``, beside its AOF under
``<data_dir>/feast/redis_cluster/node-<port>``: a killed master restarted with
:func:`start_node` rejoins with its slots and its data, and the cluster heals.

``cluster-require-full-coverage no``: with a master down, the others keep answering for
their slots, so only the users hashed to the lost third degrade (``features_unavailable``),
not everyone. Without replicas nothing fails over: the lost slots come back with the
master. (A production cluster adds a replica per master; the client then follows the
failover through ``MOVED`` and a refreshed slot map.)
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
import time
from pathlib import Path

from orchestrator.processes import ManagedProcess, Port, hold, start_process, stop_process
from orchestrator.redis_server import ping_address, redis_binary, server_config
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

N_SLOTS = 16384
# Milliseconds before the other masters mark an unreachable one FAIL (Redis: 15 s).
NODE_TIMEOUT_MS = 2000


def process_name(port: int) -> str:
    """The pid/log name of the node on ``port``."""
    return f"redis-cluster-{port}"


def node_dir(settings: Settings, port: int) -> Path:
    """Where the node on ``port`` keeps its AOF and nodes.conf."""
    return settings.data_dir / "feast" / "redis_cluster" / f"node-{port}"


def _local(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_nodes(settings: Settings) -> list[tuple[str, int]]:
    """The configured nodes, all on loopback (else a UserError: start them where they run)."""
    nodes = settings.redis_cluster_addresses
    remote = [f"{h}:{p}" for h, p in nodes if not _local(h)]
    if remote:
        raise UserError(
            f"RECSTACK_REDIS_CLUSTER_NODES names nodes not on this machine ({', '.join(remote)}): "
            "the project starts only a local cluster; point the setting at your cluster instead"
        )
    if len(nodes) < 3:
        raise UserError(f"a Redis Cluster needs at least 3 masters; got {len(nodes)}")
    return nodes


# A node's cluster bus listens on its port + this (Redis's default, as settings.py states).
BUS_OFFSET = 10_000


def _config(settings: Settings, host: str, port: int) -> str:
    workdir = node_dir(settings, port)
    workdir.mkdir(parents=True, exist_ok=True)
    return server_config(
        host,
        port,
        workdir,
        (
            "cluster-enabled yes",
            "cluster-config-file nodes.conf",  # relative to dir: beside the AOF
            f"cluster-port {port + BUS_OFFSET}",
            f"cluster-node-timeout {NODE_TIMEOUT_MS}",
            "cluster-require-full-coverage no",  # see the module docstring
        ),
    )


def start_node(settings: Settings, host: str, port: int, timeout: float = 20.0) -> ManagedProcess:
    """Start the node on ``host:port`` (a restart rejoins from its nodes.conf); UserError
    naming who holds it when something else listens on the port or its bus port."""
    name = process_name(port)
    conf = settings.run_dir / name / "redis.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(_config(settings, host, port))
    return start_process(
        name,
        [redis_binary(), str(conf)],
        settings,
        ready=lambda: ping_address(host, port),
        timeout=timeout,
        ports=[Port(host, p, "RECSTACK_REDIS_CLUSTER_NODES") for p in (port, port + BUS_OFFSET)],
    )


def cluster_info(host: str, port: int, timeout: float = 0.5) -> dict[str, str]:
    """CLUSTER INFO of one node as a dict ({} when it does not answer)."""
    import redis

    try:
        with redis.Redis(host, port, socket_timeout=timeout, socket_connect_timeout=timeout) as r:
            text = r.execute_command("CLUSTER", "INFO")
    except redis.exceptions.RedisError:
        return {}
    if isinstance(text, dict):  # redis-py may parse it already
        return {str(k): str(v) for k, v in text.items()}
    raw = text.decode() if isinstance(text, bytes) else str(text)
    return dict(line.split(":", 1) for line in raw.split() if ":" in line)


def healthy(settings: Settings) -> bool:
    """Every configured node answers, sees every slot assigned and the cluster ok."""
    for host, port in settings.redis_cluster_addresses:
        info = cluster_info(host, port)
        if info.get("cluster_state") != "ok" or info.get("cluster_slots_ok") != str(N_SLOTS):
            return False
    return True


def wait_healthy(settings: Settings, timeout: float) -> float:
    """Wait until :func:`healthy`; the seconds it took (RuntimeError past ``timeout``)."""
    t0 = time.monotonic()
    while not healthy(settings):
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"the Redis Cluster {settings.redis_cluster_nodes} is not ok")
        time.sleep(0.05)
    return time.monotonic() - t0


def _create(nodes: list[tuple[str, int]]) -> None:
    cli = shutil.which("redis-cli")
    if cli is None:
        raise UserError("redis-cli is not installed (Debian's redis-tools, with redis-server)")
    argv = [cli, "--cluster", "create", *(f"{h}:{p}" for h, p in nodes), "--cluster-yes"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")


def start(settings: Settings, timeout: float = 30.0) -> list[ManagedProcess]:
    """Start every node; join them into a cluster the first time; return once the cluster
    answers ``cluster_state:ok`` on every node."""
    nodes = local_nodes(settings)
    procs: list[ManagedProcess] = []
    try:
        for host, port in nodes:
            procs.append(start_node(settings, host, port))
        infos = [cluster_info(h, p) for h, p in nodes]
        assigned = [int(i.get("cluster_slots_assigned", "0")) for i in infos]
        if not any(assigned):
            _create(nodes)  # fresh nodes: no slots anywhere yet
        elif any(int(i.get("cluster_known_nodes", "0")) != len(nodes) for i in infos):
            raise UserError(
                f"the nodes under {node_dir(settings, nodes[0][1]).parent} belong to another "
                "cluster layout; remove that folder to start afresh"
            )
        wait_healthy(settings, timeout)
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs


def stop(settings: Settings) -> bool:
    """Stop every configured node of ours that runs; True if one was stopped."""
    stopped = [stop_process(settings, process_name(p)) for _, p in settings.redis_cluster_addresses]
    return any(stopped)


def cli(args: argparse.Namespace) -> int:
    """``recstack serve redis-cluster [--detach]``."""
    settings = get_settings()
    procs = start(settings)
    pids = ", ".join(str(p.pid) for p in procs)
    started = f"Redis Cluster on {settings.redis_cluster_nodes} (pids {pids})"
    return hold(procs, started, args.detach)

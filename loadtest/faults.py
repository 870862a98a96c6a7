"""Dependency faults for a fixed time, against the real processes of a running stack:
``recstack loadtest fault triton-pause|store-lock|model-unload|redis-pause|redis-master-kill
--seconds S``.
Used by the ``chaos`` scenario's timed actions and by tests/test_faults.py.

- ``triton-pause``: SIGSTOP to tritonserver (from its pid file), SIGCONT after S seconds:
  a hung server, whose TCP connections stay open and whose calls never answer;
- ``store-lock``: ``BEGIN EXCLUSIVE`` on the SQLite online store from another connection,
  held S seconds (a long write, a backup, a stuck materialisation);
- ``redis-pause``: SIGSTOP to the project's redis-server (the Redis online store), SIGCONT
  after S seconds;
- ``redis-master-kill``: SIGKILL to a master of the project's Redis Cluster (the first of
  ``settings.redis_cluster_nodes``, or ``--node PORT``), restarted after S seconds from its
  AOF and nodes.conf (orchestrator/redis_cluster.py); ends when the cluster is ok again;
- ``model-unload``: unload a model through Triton's repository API, reload it after S
  seconds at the pinned version of the newest release (an ensemble with its composing
  models, as ``recstack serve triton`` loads them).

Each function blocks for the fault's duration and always ends the fault (also on Ctrl-C
or an exception), so a run never leaves Triton stopped or the store locked.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sqlite3
import string
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

from recstack.errors import UserError
from recstack.settings import Settings, get_settings

TRITON = "triton"  # orchestrator/triton_server.py's process name (its pid file)


@contextlib.contextmanager
def triton_paused(settings: Settings) -> Iterator[int]:
    """tritonserver stopped (SIGSTOP) inside the block, continued (SIGCONT) after it."""
    with _paused(settings, TRITON, "Triton") as pid:
        yield pid


@contextlib.contextmanager
def redis_paused(settings: Settings) -> Iterator[int]:
    """The project's redis-server (orchestrator/redis_server.py) stopped inside the block:
    a hung store, whose connections stay open and whose calls never answer."""
    from orchestrator import redis_server

    if settings.online_store != "redis":
        raise UserError(f"redis-pause needs the Redis online store, not {settings.online_store}")
    with _paused(settings, redis_server.process_name(settings), "redis-server") as pid:
        yield pid


@contextlib.contextmanager
def redis_master_killed(settings: Settings, port: int | None = None) -> Iterator[int]:
    """A master of the project's Redis Cluster killed (SIGKILL) inside the block, then
    restarted from its AOF and nodes.conf; waits until every node sees the cluster ok.
    Yields the killed master's port (default: the first configured node)."""
    from orchestrator import redis_cluster
    from orchestrator.processes import read_pid

    if settings.online_store != "redis_cluster":
        raise UserError(
            f"redis-master-kill needs the Redis Cluster online store, not {settings.online_store}"
        )
    nodes = dict((p, h) for h, p in redis_cluster.local_nodes(settings))
    port = next(iter(nodes)) if port is None else port
    if port not in nodes:
        raise UserError(f"--node {port} is not one of {settings.redis_cluster_nodes}")
    pid = read_pid(settings, redis_cluster.process_name(port))
    if pid is None:
        raise UserError(f"no running cluster node on port {port} under {settings.run_dir}")
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while read_pid(settings, redis_cluster.process_name(port)) is not None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server {pid} outlived SIGKILL")
        time.sleep(0.01)
    try:
        yield port
    finally:
        redis_cluster.start_node(settings, nodes[port], port)
        redis_cluster.wait_healthy(settings, 30)


@contextlib.contextmanager
def _paused(settings: Settings, name: str, what: str) -> Iterator[int]:
    """SIGSTOP to the process recorded as ``name`` in the run dir, SIGCONT after."""
    from orchestrator.processes import read_pid

    pid = read_pid(settings, name)
    if pid is None:
        raise UserError(f"no running {what} recorded under {settings.run_dir}")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def online_store_path(settings: Settings) -> Path:
    """The SQLite online store file that ``feature_store.yaml`` names. The YAML is read as
    text with ``${RECSTACK_DATA_DIR}`` filled in (exporters/feast_ops.py's rule), not
    through Feast: importing Feast takes 15-20 s on a busy host, and the fault must start
    when the scenario says."""
    if settings.online_store != "sqlite":
        raise UserError(f"store-lock needs the SQLite online store, not {settings.online_store!r}")
    yaml_file = settings.feature_repo / "feature_store.yaml"
    text = string.Template(yaml_file.read_text()).safe_substitute(
        RECSTACK_DATA_DIR=str(settings.data_dir)
    )
    path = Path(yaml.safe_load(text)["online_store"]["path"])
    if not path.is_absolute():
        path = settings.feature_repo / path
    if not path.exists():
        raise UserError(f"{path} does not exist: materialise the features first")
    return path


@contextlib.contextmanager
def store_locked(settings: Settings) -> Iterator[Path]:
    """An exclusive lock on the SQLite online store inside the block: every other
    connection's read and write is refused (``database is locked``) until it ends."""
    path = online_store_path(settings)
    db = sqlite3.connect(path, timeout=10)
    try:
        db.execute("BEGIN EXCLUSIVE")
        yield path
    finally:
        db.rollback()
        db.close()


@contextlib.contextmanager
def model_unloaded(settings: Settings, model: str) -> Iterator[dict[str, int]]:
    """``model`` of the live release unloaded inside the block (``rank``: the live release's
    own ensemble ``rank_r<id>``), loaded again at the pinned versions after it; yields the
    unloaded model -> version. The orchestrator re-pins a missing model itself within
    ``RECSTACK_TRITON_WATCH_S``: set it to 0 to hold the fault for the whole block."""
    from exporters.release import model_versions
    from exporters.release_state import load_state
    from orchestrator.triton_server import (
        ENSEMBLE,
        ENSEMBLE_VERSION,
        ensemble_name,
        load_releases,
        unload_model,
    )

    state = load_state(settings)
    if state.live is None:
        raise UserError(f"no live release in {settings.releases_dir}")
    pinned = model_versions(settings, state.live)
    if model not in pinned:
        raise UserError(f"the live release pins no model {model!r} (it has {sorted(pinned)})")
    name = ensemble_name(state.live) if model == ENSEMBLE else model
    version = ENSEMBLE_VERSION if model == ENSEMBLE else pinned[model]
    unload_model(settings, name)
    try:
        yield {name: version}
    finally:
        load_releases(settings, state.serving, keep=True)


FAULTS = ("triton-pause", "store-lock", "model-unload", "redis-pause", "redis-master-kill")


def hold(
    settings: Settings, fault: str, seconds: float, model: str = "rank", node: int | None = None
) -> None:
    """Inject ``fault`` for ``seconds`` and end it."""
    if seconds <= 0:
        raise UserError(f"--seconds must be > 0, got {seconds:g}")
    if fault == "triton-pause":
        ctx: contextlib.AbstractContextManager[object] = triton_paused(settings)
    elif fault == "store-lock":
        ctx = store_locked(settings)
    elif fault == "model-unload":
        ctx = model_unloaded(settings, model)
    elif fault == "redis-pause":
        ctx = redis_paused(settings)
    elif fault == "redis-master-kill":
        ctx = redis_master_killed(settings, node)
    else:
        raise UserError(f"unknown fault {fault!r}; expected one of {FAULTS}")
    with ctx:
        print(f"{fault} for {seconds:g} s", flush=True)
        time.sleep(seconds)
    print(f"{fault} ended", flush=True)


def cli(args: argparse.Namespace) -> int:
    """``recstack loadtest fault FAULT --seconds S [--model M] [--node PORT]``."""
    hold(get_settings(), args.fault, args.seconds, args.model, getattr(args, "node", None))
    return 0

"""Feast's Redis store in cluster mode (``RECSTACK_ONLINE_STORE=redis_cluster``) against
the project's own 3-master Redis Cluster (orchestrator/redis_cluster.py), beside the
single-node store on the same timeline:

- parity: after materialise, after pushes (the orchestrator's RecordEvent path and
  Feast's own ``push``) and after a materialisation over the pushes, every user row and
  item row read from the cluster equals the single node's, event times included;
- a master killed (SIGKILL) during reads: its users fail fast as FeatureStoreUnavailable
  (the orchestrator's ``features_unavailable``) and its own breaker opens; the other
  masters' users are still read, their breaker stays closed; restarted from its AOF and
  nodes.conf it rejoins, and its users read as before.

One cluster and one single node for the module (a few seconds each), the timeline's data.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _features_fixtures import FeastEnv, own_redis_server, timeline_settings
from conftest import make_settings, port, require_redis_server

from exporters import feast_ops, feature_tables
from orchestrator import redis_cluster
from orchestrator.breaker import BreakerConfig, Breakers
from orchestrator.online_features import FeatureStoreUnavailable, OnlineFeatures, push_event
from orchestrator.processes import ManagedProcess, stop_all
from recstack.errors import UserError
from recstack.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.redis]

SINGLE_PORT = port(6413)
CLUSTER_PORTS = (port(6410), port(6411), port(6412))
NODES = ",".join(f"127.0.0.1:{p}" for p in CLUSTER_PORTS)
USERS = (1, 2, 3)  # 3: unknown to the data
ITEMS = (10, 11, 12, 13, 99)  # 99: unknown


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with own_redis_server(tmp_path_factory.mktemp("rc_single"), SINGLE_PORT) as s:
        yield s


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The cluster's nodes live under this module's data dir; the envs below share it."""
    require_redis_server()
    base = tmp_path_factory.mktemp("rc_cluster")
    s = make_settings(base, online_store="redis_cluster", redis_cluster_nodes=NODES)
    procs = {p.name: p for p in redis_cluster.start(s)}
    try:
        yield {"settings": s, "procs": procs}
    finally:
        stop_all(procs.values())


def build(s: Settings) -> FeastEnv:
    feature_tables.build(s)
    feast_ops.apply(s)
    feast_ops.materialize(s)
    return FeastEnv(s, s.online_store)


@pytest.fixture(scope="module")
def envs(
    single: Settings, cluster: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, FeastEnv]:
    """The timeline materialised into the single node and into the cluster."""
    one = timeline_settings(tmp_path_factory.mktemp("rc_env_single"), "redis")
    one = one.model_copy(update={"redis_port": SINGLE_PORT})
    many = timeline_settings(tmp_path_factory.mktemp("rc_env_cluster"), "redis_cluster")
    many = many.model_copy(update={"redis_cluster_nodes": NODES})
    return {"redis": build(one), "redis_cluster": build(many)}


def rows(online: OnlineFeatures) -> dict[str, Any]:
    """Everything the orchestrator reads for USERS (decoded, with the stored rows' event
    times) and the SDK's rows for ITEMS, as plain Python values."""
    out: dict[str, Any] = {}
    for u in USERS:
        stamp, values = online._user_reader.read_row(u)  # type: ignore[union-attr]
        feats = {
            k: v.tolist() if isinstance(v, np.ndarray) else v
            for k, v in asdict(online.user(u)).items()
        }
        out[f"user {u}"] = (stamp, values, feats)
    items = online.items_sdk(np.array(ITEMS))
    out["items"] = (items.matrix.tolist(), items.known.tolist(), items.created_at.tolist())
    return out


def patient(s: Settings) -> Settings:
    """Parity is under test here, not timeouts: a stall of this shared host must not fail
    a read (the fault tests below keep the serving timeout)."""
    return s.model_copy(update={"online_store_timeout_ms": 2000.0})


def assert_parity(envs: dict[str, FeastEnv]) -> dict[str, Any]:
    got = {k: rows(OnlineFeatures(patient(e.settings)).load()) for k, e in envs.items()}
    assert got["redis_cluster"] == got["redis"]
    return got["redis"]


def test_cluster_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not host:port"):
        make_settings(tmp_path, redis_cluster_nodes="127.0.0.1:7000,127.0.0.1")
    s = make_settings(tmp_path, redis_cluster_nodes="10.0.0.5:7000,127.0.0.1:7001,127.0.0.1:7002")
    with pytest.raises(UserError, match="not on this machine"):
        redis_cluster.start(s)
    s = make_settings(tmp_path, redis_cluster_nodes="127.0.0.1:7000,127.0.0.1:7001")
    with pytest.raises(UserError, match="at least 3 masters"):
        redis_cluster.start(s)


def test_keys_are_spread_over_the_masters(envs: dict[str, FeastEnv]) -> None:
    import redis

    sizes = []
    for p in CLUSTER_PORTS:
        with redis.Redis("127.0.0.1", p) as r:
            sizes.append(r.dbsize())
    # 2 users + 4 items, one hash each, on 3 masters by CRC16 slot.
    assert sum(sizes) == 6 and sum(n > 0 for n in sizes) >= 2, sizes


def test_materialise_push_and_read_parity(envs: dict[str, FeastEnv]) -> None:
    first = assert_parity(envs)
    assert first["user 2"][2]["recent_items"][:2] == [11, -1]
    # Unknown: no row on either store (Feast's Redis store says so with time 0).
    assert not first["user 3"][2]["known"]
    assert set(first["user 3"][1].values()) == {None}

    when = datetime.now(UTC)
    for env in envs.values():
        online = OnlineFeatures(patient(env.settings)).load()
        online.push_event(2, 13, "purchase", when)
        online.push_event(1, 11, "click", when)
        online.push_event(1, 12, "view", when)  # seen, not recent
        push_event(env.settings, 2, 12, "click", when)  # Feast's own push path
    pushed = assert_parity(envs)
    assert pushed["user 2"][2]["recent_items"][:4] == [12, 13, 11, -1]
    assert pushed["user 1"][2]["recent_items"][:2] == [11, 10]
    assert 12 in pushed["user 1"][2]["seen_items"]

    for env in envs.values():
        feast_ops.materialize(env.settings)  # full: the pushed rows are newer, they stay
    again = assert_parity(envs)
    assert again["user 2"][2]["recent_items"] == pushed["user 2"][2]["recent_items"]


def owner_port(online: OnlineFeatures, user: int) -> int:
    """The port of the master holding ``user``'s hash."""
    from feast.infra.online_stores.helpers import _redis_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey
    from feast.protos.feast.types.Value_pb2 import Value

    client = feast_ops._redis_client(online.store)
    key = _redis_key(
        online.store.config.project,
        EntityKey(join_keys=["user_id"], entity_values=[Value(int64_val=user)]),
        entity_key_serialization_version=online.store.config.entity_key_serialization_version,
    )
    return int(client.nodes_manager.get_node_from_slot(client.keyslot(key)).port)


def _timed_user(online: OnlineFeatures, user: int) -> tuple[bool, float]:
    t0 = time.perf_counter()
    try:
        online.user(user)
        return True, time.perf_counter() - t0
    except FeatureStoreUnavailable:
        return False, time.perf_counter() - t0


def test_a_killed_master_fails_its_users_fast_and_heals_on_restart(
    envs: dict[str, FeastEnv], cluster: dict[str, Any]
) -> None:
    s = envs["redis_cluster"].settings
    breakers = Breakers(BreakerConfig(cooldown_s=0.2))
    online = OnlineFeatures(s, breakers=breakers).load()
    owners = {u: owner_port(online, u) for u in (1, 2)}
    assert owners[1] != owners[2], owners  # the timeline's two users on two masters
    before = {u: online.user(u) for u in (1, 2)}
    victim = owners[1]
    procs: dict[str, ManagedProcess] = cluster["procs"]
    proc = procs[redis_cluster.process_name(victim)]
    os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait(10)  # type: ignore[union-attr]

    lost, kept = [], []
    t_end = time.monotonic() + 1.5
    while time.monotonic() < t_end:
        lost.append(_timed_user(online, 1))
        kept.append(_timed_user(online, 2))
    assert not any(ok for ok, _ in lost)
    assert all(ok for ok, _ in kept)
    states = breakers.snapshot()
    assert states[f"online_store:redis_cluster:127.0.0.1:{victim}"]["opened"] >= 1, states
    other = states[f"online_store:redis_cluster:127.0.0.1:{owners[2]}"]
    assert other["state"] == "closed" and other["opened"] == 0, states
    # A refused connection plus one slot-map refresh: far under the store timeout (50 ms),
    # with room for a stall of this shared host.
    slowest = sorted(t for _, t in lost)[int(0.95 * len(lost))]
    assert slowest < s.online_store_timeout_ms / 1000, slowest

    # Restarted as the cluster fixture started it: same data dir (AOF, nodes.conf).
    procs[proc.name] = redis_cluster.start_node(cluster["settings"], "127.0.0.1", victim)
    t0 = time.monotonic()
    while not _timed_user(online, 1)[0]:
        assert time.monotonic() - t0 < 15, "the restarted master did not rejoin"
        time.sleep(0.05)
    redis_cluster.wait_healthy(cluster["settings"], 10)  # every node sees it back (gossip)
    for u in (1, 2):  # its data came back from the AOF
        a, b = asdict(online.user(u)), asdict(before[u])
        assert {k: np.asarray(v).tolist() for k, v in a.items()} == {
            k: np.asarray(v).tolist() for k, v in b.items()
        }


def test_a_hung_master_costs_its_users_the_store_timeout_then_nothing(
    envs: dict[str, FeastEnv], cluster: dict[str, Any]
) -> None:
    """SIGSTOP (connections open, no answers): the cluster client's own retries and slot-map
    refreshes would wait on the hung node again and again; bounded (bound_online_io), a
    read of its users gives up after the store timeout once more at most (Feast's pipeline
    sends a failed command again on its own), until the master's breaker opens: then it
    costs nothing. The other masters' users are read throughout."""
    s = envs["redis_cluster"].settings
    breakers = Breakers(BreakerConfig(cooldown_s=10.0))
    online = OnlineFeatures(s, breakers=breakers).load()
    victim, other = owner_port(online, 1), owner_port(online, 2)
    online.user(1)
    pid = cluster["procs"][redis_cluster.process_name(victim)].pid
    os.kill(pid, signal.SIGSTOP)
    try:
        lost = [_timed_user(online, 1) for _ in range(20)]
        kept = [_timed_user(online, 2) for _ in range(20)]
    finally:
        os.kill(pid, signal.SIGCONT)
    timeout = s.online_store_timeout_ms / 1000
    print("hung master, reads of its user (ms):", [round(t * 1e3, 1) for _, t in lost])
    assert not any(ok for ok, _ in lost) and all(ok for ok, _ in kept)
    opened = breakers.snapshot()[f"online_store:redis_cluster:127.0.0.1:{victim}"]
    assert opened["state"] == "open", opened
    # The reads before the breaker opened (at most 5): 1-2 timeouts each (measured here:
    # 54-67 ms and 105-116 ms), + 100 ms for a stall of this shared host (as test_faults).
    assert max(t for _, t in lost[:5]) < 2 * timeout + 0.1, lost[:5]
    assert sorted(t for _, t in lost[:5])[2] < 2 * timeout + 0.02, lost[:5]
    assert max(t for _, t in lost[5:]) < 0.005, lost[5:]  # open: no call made
    assert breakers.snapshot()[f"online_store:redis_cluster:127.0.0.1:{other}"]["opened"] == 0


def test_a_cluster_down_at_start_is_degraded_then_read_when_it_comes(
    envs: dict[str, FeastEnv], cluster: dict[str, Any]
) -> None:
    """A RedisCluster client connects as it is made. With every node down, the feature
    client still loads (the orchestrator starts degraded, as with one Redis down), each
    read fails fast under the store's breaker, and once the nodes are back (restarted from
    their nodes.conf: same cluster) the first read makes the client, with the bounds."""
    s = envs["redis_cluster"].settings
    procs: dict[str, ManagedProcess] = cluster["procs"]
    stop_all(procs.values())
    breakers = Breakers(BreakerConfig(cooldown_s=0.0))
    online = OnlineFeatures(s, breakers=breakers).load()
    t0 = time.perf_counter()
    with pytest.raises(FeatureStoreUnavailable, match="cannot be connected"):
        online.user(1)
    assert time.perf_counter() - t0 < s.online_store_timeout_ms / 1000 + 0.1
    store_breaker = breakers.snapshot()["online_store:redis_cluster"]
    assert store_breaker["consecutive_failures"] == 1, store_breaker

    procs.update({p.name: p for p in redis_cluster.start(cluster["settings"])})
    assert online.user(1).known and online.user(2).known
    client = feast_ops._redis_client(online.store)
    assert client.retry.get_retries() == 0
    assert client.nodes_manager.connection_kwargs["socket_timeout"] == 0.05

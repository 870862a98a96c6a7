"""Several orchestrator replicas behind Debian's nginx (orchestrator/replicas.py): real
Triton, two replicas as their own processes, real nginx, the project's load generator
(`recstack loadtest run`) and `recstack release` as processes of their own."""

from __future__ import annotations

import datetime
import json
import re
import shlex
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from conftest import active_users, own_stack, port, two_releases_first_live

from exporters.release_state import load_state
from loadtest.scenario import load_scenario
from orchestrator import recommender_pb2 as pb
from orchestrator import recommender_pb2_grpc as pb_grpc
from orchestrator.orchestrator_process import settings_env
from orchestrator.processes import ManagedProcess, pid_alive, read_pid
from orchestrator.replicas import (
    NGINX,
    RECOMMEND_PATH,
    Replica,
    check_nginx_conf,
    drain_replica,
    nginx_binary,
    nginx_prefix,
    render_nginx_conf,
    replicas,
    start_replicas,
    stop_replicas,
)
from orchestrator.server import DRAIN_SECONDS
from orchestrator.triton_server import ensemble_name, loaded_models, start_triton
from recstack.cli import build_parser
from recstack.errors import UserError
from recstack.settings import Settings

REPLICAS = 2
CLI = (sys.executable, "-m", "recstack.cli")


def _need_nginx() -> None:
    try:
        nginx_binary()
    except UserError:
        if __import__("conftest").in_ci():
            raise
        pytest.skip("nginx is not installed (make setup installs it)")


def test_nginx_config_renders_valid_and_names_every_replica(settings: Settings) -> None:
    _need_nginx()
    s = settings.model_copy(
        update={
            "orchestrator_replicas": 3,
            "orchestrator_grpc_port": port(18350),
            "orchestrator_http_port": port(18351),
            "orchestrator_replica_port_base": port(18360),
        }
    )
    s.run_dir.mkdir(parents=True, exist_ok=True)
    out = check_nginx_conf(s)  # `nginx -t` with the prefix under tmp, as this user
    assert "test is successful" in out
    conf = render_nginx_conf(s)
    reps = replicas(s)
    assert [r.grpc_port for r in reps] == [port(18360), port(18370), port(18380)]
    for r in reps:
        assert f"server 127.0.0.1:{r.grpc_port} " in conf
        assert f"server 127.0.0.1:{r.http_port} " in conf
    assert f"listen 127.0.0.1:{port(18350)} http2;" in conf
    assert f"location = {RECOMMEND_PATH} " in conf and "non_idempotent" in conf
    assert str(nginx_prefix(s)) in conf and "/var/" not in conf
    # Only Recommend may be repeated after it was sent; RecordEvent may not.
    assert conf.count("non_idempotent") == 1
    # A replica taken out (a drain) is listed `down` in both upstreams, the others are not.
    assert " down;" not in conf
    assert "test is successful" in check_nginx_conf(s, {reps[1].name})
    conf = (nginx_prefix(s) / "nginx.conf").read_text()
    assert conf == render_nginx_conf(s, {reps[1].name})
    downs = re.findall(r"server 127\.0\.0\.1:(\d+) .* down;", conf)
    assert sorted(map(int, downs)) == [reps[1].grpc_port, reps[1].http_port]
    # A setting nginx refuses is a clear error, not a server that never starts.
    bad = s.model_copy(update={"orchestrator_host": "not a host"})
    with pytest.raises(UserError, match="nginx rejects"):
        check_nginx_conf(bad)
    # The rejected config was not moved into place: a reload would still read the good one.
    assert (nginx_prefix(s) / "nginx.conf").read_text() == conf
    clash = s.model_copy(update={"orchestrator_replica_port_base": port(18351) - 11})
    with pytest.raises(UserError, match="overlap"):
        replicas(clash)
    with pytest.raises(UserError, match="REPLICAS"):
        render_nginx_conf(s.model_copy(update={"orchestrator_replicas": 1}))


def test_replica_kill_scenario_commands_parse_and_name_replicas() -> None:
    """The shipped scenario's actions are commands of this CLI, aimed at replica names that
    `serve orchestrator` gives (a rename on either side fails here)."""
    sc = load_scenario("replica_kill")
    names = {r.name for r in replicas(Settings(orchestrator_replicas=3))}
    for action in sc.actions:
        argv = shlex.split(action.run)
        assert argv[0] == "recstack"
        args = build_parser().parse_args(argv[1:])
        assert args.name in names and args.signal in ("KILL", "TERM")
    assert {shlex.split(a.run)[-1] for a in sc.actions} == {"KILL", "TERM"}


def test_drain_refuses_what_is_not_a_running_replica(settings: Settings) -> None:
    s = settings.model_copy(update={"orchestrator_replicas": 2})
    with pytest.raises(UserError, match="orchestrator-7 is not a replica of this set"):
        drain_replica(s, "orchestrator-7")
    with pytest.raises(UserError, match="orchestrator-1 does not run"):
        drain_replica(s, "orchestrator-1")


def test_signal_refuses_a_server_that_does_not_run(settings: Settings) -> None:
    done = subprocess.run(
        [*CLI, "serve", "signal", "orchestrator-7", "--signal", "KILL"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0 and "orchestrator-7 does not run" in done.stderr, done.stderr


# ------------------------------------------------------------------------- the stack
@pytest.fixture(scope="module")
def rs(trained_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    s = own_stack(
        trained_settings,
        tmp_path_factory.mktemp("replicas"),
        18300,
        18310,
        orchestrator_replicas=REPLICAS,
        orchestrator_replica_port_base=port(18320),
        release_watch_s=0.5,
    )
    return two_releases_first_live(s)


@pytest.fixture(scope="module")
def stack(rs: Settings) -> Iterator[ManagedProcess]:
    _need_nginx()
    triton = start_triton(rs)
    try:
        start_replicas(rs)
        yield triton
    finally:
        stop_replicas(rs)
        triton.stop()


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def _served(s: Settings, r: Replica) -> float:
    """Recommend calls a replica answered (its own metrics endpoint), both fronts."""
    text = _get(f"http://127.0.0.1:{r.metrics_port}/metrics")
    pattern = r'^recstack_requests_total\{code="OK",method="(?:http\.)?Recommend"\} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.M))


def _models(s: Settings) -> set[str]:
    return {name for name, _ in loaded_models(s)}


def _admin(r: Replica) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_get(f"http://127.0.0.1:{r.admin_port}/admin/releases"))
    return doc


def test_calls_are_spread_over_every_replica(rs: Settings, stack: ManagedProcess) -> None:
    reps = replicas(rs)
    before = [_served(rs, r) for r in reps]
    users = active_users(rs, 50)
    with grpc.insecure_channel(f"127.0.0.1:{rs.orchestrator_grpc_port}") as channel:
        stub = pb_grpc.RecommenderStub(channel)  # one channel: one HTTP/2 connection
        for u in users:
            stub.Recommend(pb.RecommendRequest(user_id=u, k=10), timeout=5)
    for u in users[:20]:
        _get(f"http://127.0.0.1:{rs.orchestrator_http_port}/v1/recommendations?user_id={u}&k=5")
    got = [_served(rs, r) - b for r, b in zip(reps, before, strict=True)]
    assert sum(got) == 70, got
    # Round robin per call (not per connection): each replica takes about half.
    assert all(25 <= g <= 45 for g in got), got


def _run_load(
    s: Settings, tmp: Path, name: str, rate: float, seconds: float, actions: list[dict[str, str]]
) -> dict[str, Any]:
    """`recstack loadtest run` (open loop, Poisson) through nginx with timed actions."""
    scenario = {
        "name": name,
        "target": {"kind": "grpc", "timeout": "1s"},
        "load": {"arrival": "poisson", "rate": rate, "duration": f"{seconds}s", "warmup": "1s"},
        "traffic": {"cold_start_share": 0.05, "event_share": 0.1},
        "slo": {"p99_ms": 300, "max_error_share": 0.0},
        "actions": actions,
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(scenario))
    out = tmp / name
    done = subprocess.run(
        [*CLI, "loadtest", "run", str(path), "--out", str(out), "--no-progress"],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc: dict[str, Any] = json.loads((out / "result.json").read_text())
    for a in doc["actions"]:
        assert a["returncode"] == 0, (a, Path(a["log"]).read_text())
    return doc


def _access_log(s: Settings, since: float) -> list[tuple[float, str, str, str]]:
    """nginx's access log lines since ``since``: (time, upstream addrs, their statuses,
    grpc-status) of each Recommend/RecordEvent call."""
    time.sleep(1.5)  # the log buffer is flushed every second
    rows = []
    for line in (nginx_prefix(s) / "access.log").read_text().splitlines():
        parts = line.split(" ")
        t = float(parts[0])
        if t >= since and '"/recstack.v1.Recommender/' in line:
            # msec, request_time, status, upstream addrs (", "-separated), statuses, uri, grpc
            m = re.match(r"^(\S+) (\S+) (\S+) (.+?) (\d.*?|-) (\".*?\") (\S*)$", line)
            assert m, line
            rows.append((t, m.group(4), m.group(5), m.group(7)))
    return rows


def _grpc_status(row: tuple[float, str, str, str]) -> str:
    """An access-log row's grpc-status: a header in error answers, a trailer in OK ones,
    the other logged as "-"."""
    return row[3].replace("-", "")


def _kill_and_count(
    s: Settings, tmp: Path, signal_name: str
) -> tuple[dict[str, Any], list[tuple[float, str, str, str]], Replica]:
    victim = replicas(s)[1]
    pid = read_pid(s, victim.name)
    assert pid is not None
    t0 = time.time()
    cmd = f"{sys.executable} -m recstack.cli serve signal {victim.name} --signal {signal_name}"
    doc = _run_load(s, tmp, f"replica_{signal_name.lower()}", 40, 12, [{"at": "5s", "run": cmd}])
    assert not pid_alive(pid), f"{victim.name} still runs after SIG{signal_name}"
    return doc, _access_log(s, t0), victim


def _restart(s: Settings) -> None:
    started = start_replicas(s)  # brings back the missing replica, keeps the rest
    assert set(started) == {replicas(s)[1].name}, started
    # ... and puts it back into nginx's upstream if a drain took it out.
    assert " down;" not in (nginx_prefix(s) / "nginx.conf").read_text()


def _log_time(line: str) -> float:
    """The epoch time of a recstack log line ("2026-12-01 22:10:03,123 INFO ...")."""
    stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return stamp.timestamp()


def test_sigkill_of_a_replica_fails_at_most_its_calls_in_flight(
    rs: Settings, stack: ManagedProcess, tmp_path: Path
) -> None:
    doc, rows, victim = _kill_and_count(rs, tmp_path, "KILL")
    try:
        addr = f"127.0.0.1:{victim.grpc_port}"
        # Calls nginx had sent to the replica when it died: their stream was cut and nginx
        # cannot resend a gRPC call whose body it already streamed (it does not buffer it),
        # so they fail (UNAVAILABLE). Calls that reached it later found the port closed and
        # went to the next replica (and so do nginx's probes after fail_timeout).
        cut = [r for r in rows if r[1] == addr and r[2] != "200"]
        rerouted = [r for r in rows if r[1].startswith(addr + ",")]
        failed = doc["requests"]["errors"]
        print(f"SIGKILL: {failed} failed, {len(cut)} cut in flight, {len(rerouted)} rerouted")
        assert failed == len(cut), (doc["errors"], cut)
        if cut:  # all of them at the one moment it died
            assert max(r[0] for r in cut) - min(r[0] for r in cut) < 1.0, cut
        assert rerouted and all(r[2].endswith("200") for r in rerouted), rerouted
        assert doc["requests"]["ok"] > 300
    finally:
        _restart(rs)


def _term_time(s: Settings, victim: Replica, since: float) -> float:
    """When the replica logged the start of its drain (its SIGTERM), after ``since``."""
    log = (s.run_dir / "logs" / f"{victim.name}.log").read_text().splitlines()
    # The log is appended across restarts: this drain's line is the last one.
    term = _log_time([line for line in log if line.endswith(" draining")][-1])
    assert term > since
    return term


def test_sigterm_of_a_replica_drains_and_fails_only_calls_at_its_stop(
    rs: Settings, stack: ManagedProcess, tmp_path: Path
) -> None:
    """A SIGTERM from outside (no `serve drain`): nginx does not see NOT_SERVING and keeps
    sending, so the replica answers for the whole DRAIN_SECONDS, then stops. The only calls
    that may fail are the few grpc.aio's stop cancels at that moment."""
    doc, rows, victim = _kill_and_count(rs, tmp_path, "TERM")
    try:
        term = _term_time(rs, victim, rows[0][0] - 1)
        addr = f"127.0.0.1:{victim.grpc_port}"
        # It kept answering through its drain (~20 calls/s reach it), not only until a poll
        # happened to find no call in flight.
        served = [r for r in rows if r[1] == addr and _grpc_status(r) == "0" and r[0] > term]
        assert len(served) > 20, len(served)
        assert max(r[0] for r in served) > term + DRAIN_SECONDS - 0.3
        failed = [r for r in rows if r[1] == addr and _grpc_status(r) != "0"]
        print(f"SIGTERM: {len(served)} answered while draining, {len(failed)} failed at stop")
        assert doc["requests"]["errors"] == len(failed), (doc["errors"], failed)
        assert all(term + DRAIN_SECONDS - 0.1 < r[0] < term + DRAIN_SECONDS + 1 for r in failed)
        assert doc["requests"]["ok"] > 300
    finally:
        _restart(rs)


def test_drain_of_a_replica_fails_no_call_and_nginx_sends_it_nothing_after(
    rs: Settings, stack: ManagedProcess, tmp_path: Path
) -> None:
    """`recstack serve drain` takes the replica out of nginx's upstream (a reload), then
    SIGTERMs it: no call fails, none reaches it after its SIGTERM, and its drain ends on
    idleness (DRAIN_IDLE_SECONDS) instead of lasting DRAIN_SECONDS under traffic."""
    victim = replicas(rs)[1]
    pid = read_pid(rs, victim.name)
    assert pid is not None
    t0 = time.time()
    cmd = f"{sys.executable} -m recstack.cli serve drain {victim.name}"
    doc = _run_load(rs, tmp_path, "replica_drain", 40, 12, [{"at": "5s", "run": cmd}])
    rows = _access_log(rs, t0)
    try:
        assert not pid_alive(pid), f"{victim.name} still runs after its drain"
        assert doc["requests"]["errors"] == 0, doc["errors"]
        assert doc["requests"]["ok"] > 300
        said = Path(doc["actions"][0]["log"]).read_text()
        m = re.search(r"out of nginx's upstream in (\S+) s, stopped (\S+) s later", said)
        assert m, said
        print(f"drain: {said.strip()}")
        assert float(m.group(2)) < DRAIN_SECONDS, said  # idle: nginx sent it nothing
        term = _term_time(rs, victim, t0)
        addr = f"127.0.0.1:{victim.grpc_port}"
        to_victim = [r[0] for r in rows if addr in r[1]]
        assert len(to_victim) > 20  # it served its share until it was taken out
        assert max(to_victim) < term, (max(to_victim), term)
        assert sum(r[0] > term for r in rows) > 100  # the other replica served the rest
    finally:
        _restart(rs)


def test_promotion_converges_on_every_replica_one_release_per_request(
    rs: Settings, stack: ManagedProcess, tmp_path: Path
) -> None:
    reps = replicas(rs)
    assert {_admin(r)["revision"] for r in reps} == {load_state(rs).revision}
    assert ensemble_name(1) in _models(rs)
    promote = f"{sys.executable} -m recstack.cli release promote 2 --reason replicas"
    # Validation (a scratch Triton) takes ~10 s here; the swap falls inside the 25 s run.
    doc = _run_load(rs, tmp_path, "replica_promote", 30, 25, [{"at": "2s", "run": promote}])
    assert doc["actions"][0]["ended_s"] < 23, doc["actions"]
    assert doc["requests"]["errors"] == 0, doc["errors"]
    out = Path(doc["actions"][0]["log"]).read_text()
    for r in reps:
        assert f"{r.name} serves revision" in out, out
    state = load_state(rs)
    assert state.live == 2
    # Every replica serves the new revision, and each answer names the release it used.
    assert {_admin(r)["revision"] for r in reps} == {state.revision}
    assert {_admin(r)["live"] for r in reps} == {2}
    assert set(doc["releases"]) <= {"1", "2"} and "2" in doc["releases"], doc["releases"]
    with grpc.insecure_channel(f"127.0.0.1:{rs.orchestrator_grpc_port}") as channel:
        stub = pb_grpc.RecommenderStub(channel)
        seen = Counter(
            stub.Recommend(pb.RecommendRequest(user_id=u, k=10), timeout=5).release
            for u in active_users(rs, 20)
        )
    assert seen == {"2": 20}, seen
    # The replicas do not prune; the CLI did, once every replica served the new state.
    assert "unloaded" in out
    assert ensemble_name(1) not in _models(rs)
    assert ensemble_name(2) in _models(rs)
    assert read_pid(rs, NGINX) is not None

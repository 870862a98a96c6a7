"""``recstack demo`` (what ``make demo`` runs): data -> offline pipeline -> Triton + the
orchestrator up -> real recommendations for a known and a cold-start user, with their
latency. The servers keep running afterwards; ``recstack stop`` stops them."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import grpc

from recstack.settings import Settings, get_settings


def _data(settings: Settings, preset: str, string_ids: bool = False) -> None:
    from exporters.data_generate import generate

    meta_path = settings.raw_dir / "meta.json"
    if string_ids:
        t0 = time.perf_counter()
        generate(settings, preset=preset, seed=settings.seed, string_ids=True)
        print(
            f"data: the {preset} preset with UUID users and SKU items, imported in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        return
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if f"preset={preset}" in json.dumps(meta.get("source", "")):
            print(f"data: {settings.raw_dir} already holds the {preset} preset, kept")
            return
    t0 = time.perf_counter()
    generate(settings, preset=preset, seed=settings.seed)
    print(f"data: generated the {preset} preset in {time.perf_counter() - t0:.1f} s")


def _known_user(settings: Settings) -> str:
    """A user with a long history: the most active one in the training data, by the id
    the client knows (its key when the data was imported with string ids)."""
    from exporters.raw_tables import read_keys, read_table

    inter = read_table(settings.raw_dir, "interactions", columns=["user_id"])
    user = int(inter["user_id"].value_counts().index[0])
    keys = read_keys(settings).get("users")
    if keys is not None:
        match = keys.loc[keys["user_id"] == user, "user_key"]
        if len(match):
            return str(match.iloc[0])
    return str(user)


def _show(title: str, reply: Any, client_ms: list[float]) -> None:
    print(f"\n{title}")
    print(
        f"  release {reply.release}; cold_start={reply.cold_start}; "
        f"degraded={list(reply.degraded) or 'none'}"
    )
    for it in reply.items:
        print(
            f"  {it.rank:2d}. item {it.item_key:>8}  score {it.score:8.4f}  "
            f"[{it.source}] {it.reason}"
        )
    stages = ", ".join(f"{t.stage} {t.ms:.2f}" for t in reply.timings)
    print(f"  server stages (ms): {stages}")
    print(
        f"  client latency over {len(client_ms)} calls: p50 "
        f"{statistics.median(client_ms):.2f} ms, max {max(client_ms):.2f} ms"
    )


def _query(settings: Settings, user_id: str, k: int = 10) -> None:
    from orchestrator import recommender_pb2 as pb
    from orchestrator import recommender_pb2_grpc as pb_grpc

    target = f"{settings.orchestrator_host}:{settings.orchestrator_grpc_port}"
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RecommenderStub(channel)
        request = pb.RecommendRequest(
            user_id=user_id, k=k, context=pb.Context(surface="home", device="web")
        )
        stub.Recommend(request, timeout=5)  # warm-up
        client_ms = []
        reply = None
        for _ in range(50):
            t0 = time.perf_counter()
            reply = stub.Recommend(request, timeout=1)
            client_ms.append((time.perf_counter() - t0) * 1000)
        _show(f"Recommend(user_id={user_id}, k={k})", reply, client_ms)


def run(settings: Settings, preset: str, string_ids: bool = False) -> None:
    """The whole demo; leaves Triton and the orchestrator running."""
    from exporters import pipeline, release
    from exporters.release_ops import promote
    from orchestrator.orchestrator_process import orchestrator_ports, start_orchestrator
    from orchestrator.processes import read_pid, require_free, stop_process
    from orchestrator.triton_server import start_triton, triton_ports

    # Before minutes of training: servers of another checkout on our ports would take our
    # servers' place (this checkout's own are restarted below).
    for name, ports in (
        ("triton", triton_ports(settings)),
        ("orchestrator", orchestrator_ports(settings)),
    ):
        if read_pid(settings, name) is None:
            require_free(ports, name)
    _data(settings, preset, string_ids)
    pipeline.run(settings)
    report = settings.reports_dir / "report.md"
    headline = [line for line in report.read_text().splitlines() if line.startswith("**")]
    print(f"\noffline evaluation ({report}):\n  " + " ".join(headline).strip("*"))
    for name in ("orchestrator", "triton"):
        if read_pid(settings, name) is not None:
            stop_process(settings, name)
    # The release just trained goes live (validated like any promotion; on a fresh clone
    # the first release is live already). Servers follow the release state.
    newest = release.release_ids(settings)[-1]
    promote(settings, newest, reason="recstack demo: the release it just trained")
    versions = release.model_versions(settings, newest)
    triton = start_triton(settings)
    print(f"\ntritonserver up (pid {triton.pid}), models {versions}; log {triton.log_path}")
    orch = start_orchestrator(settings)
    print(f"orchestrator up (pid {orch.pid}); log {orch.log_path}")

    _query(settings, _known_user(settings))
    _query(settings, "999999999")  # never seen: cold start

    host = settings.orchestrator_host
    print(f"""
The stack is up. Try it yourself:
  curl -s 'http://{host}:{settings.orchestrator_http_port}/v1/recommendations?user_id={_known_user(settings)}&k=5'
  curl -s -X POST http://{host}:{settings.orchestrator_http_port}/v1/events \\
       -d '{{"user_id": "42", "item_id": 7, "event": "purchase"}}'
  grpcurl -plaintext {host}:{settings.orchestrator_grpc_port} list
  grpcurl -plaintext -d '{{"user_id": "42", "k": 5}}' \\
       {host}:{settings.orchestrator_grpc_port} recstack.v1.Recommender/Recommend
  curl -s http://{host}:{settings.triton_http_port}/v2/models/user_tower/config
  curl -s http://{host}:{settings.orchestrator_metrics_port}/metrics | grep recstack_
Stop everything with: .venv/bin/recstack stop""")


def cli(args: argparse.Namespace) -> int:
    """``recstack demo [--preset P] [--string-ids]``."""
    run(get_settings(), args.preset, getattr(args, "string_ids", False))
    return 0

"""``recstack bench triton`` (a benchmark, not a test): latency of the served models
through Triton gRPC against the same computation in-process, as ratios inside one run
(the machines are shared and noisy).

* user_tower, batch 1: Triton vs onnxruntime on the version's ``model.onnx``;
* the ``rank`` ensemble with 500 candidates: Triton vs onnxruntime (rank_features) +
  the tl2cgen library (ranker) in-process;
* rank_features alone in onnxruntime vs a Python implementation of the assembly, when one
  is given (``assembly=``);
* user_tower under concurrent clients with and without dynamic batching (reloads the
  model with the batcher removed, then restores it).

Inputs are built from config.pbtxt and the artifacts' static shapes: small ids (valid
for any embedding table) and random floats."""

from __future__ import annotations

import argparse
import functools
import json
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from exporters.model_config import load_config
from exporters.model_repo import list_versions
from orchestrator.triton_client import TritonClient, model_spec
from orchestrator.triton_server import (
    load_model,
    model_config_dict,
    server_ready,
    start_triton,
)
from recstack.settings import Settings, get_settings

Assembly = Callable[[Mapping[str, np.ndarray]], np.ndarray]


def _percentiles(samples_ns: list[int]) -> dict[str, float]:
    ms = np.asarray(samples_ns) / 1e6
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def _time(fn: Callable[[], object], repeats: int, warmup: int = 30) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        fn()
        samples.append(time.perf_counter_ns() - t0)
    return _percentiles(samples)


def _session(path: Path):  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # as in the shim
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _static(dim: object, default: int) -> int:
    return dim if isinstance(dim, int) and dim > 0 else default


def user_tower_inputs(session, batch: int, repository: Path) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """Zeros and ones for the id inputs (valid in any table), shaped from the config."""
    spec = model_spec("user_tower", repository)
    rng = np.random.default_rng(0)
    return {
        t.name: rng.integers(0, 2, (batch, *t.dims)).astype(t.dtype)
        if t.dtype.kind == "i"
        else rng.normal(size=(batch, *t.dims)).astype(t.dtype)
        for t in spec.inputs
    }


def rank_inputs(session, n: int) -> dict[str, np.ndarray]:  # type: ignore[no-untyped-def]
    """One user and ``n`` candidates, widths from the rank_features ONNX model."""
    rng = np.random.default_rng(1)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    now = time.time()
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        dims = [n if (k == 0 and name.startswith("item_")) else _static(d, 1) for k, d in
                enumerate(shape)]  # fmt: skip
        if name == "item_category":
            out[name] = np.zeros(dims, np.int64)
        elif name == "item_created_at":
            out[name] = now - rng.uniform(0, 30 * 86400, dims)
        elif name == "request_time":
            out[name] = np.array([now])
        else:
            out[name] = rng.normal(size=dims).astype(np.float32)
    return out


def _concurrent(client_factory, fn, concurrency: int, seconds: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    samples: list[int] = []
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def worker() -> None:
        client = client_factory()
        local = []
        while time.monotonic() < stop:
            t0 = time.perf_counter_ns()
            fn(client)
            local.append(time.perf_counter_ns() - t0)
        with lock:
            samples.extend(local)
        client.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**_percentiles(samples), "rps": len(samples) / seconds}


def bench_dynamic_batching(
    settings: Settings,
    versions: Mapping[str, int],
    inputs: Mapping[str, np.ndarray],
    repeats: int,
    concurrency: int,
    seconds: float,
    rounds: int = 2,
) -> dict[str, dict[str, float]]:
    """user_tower with the repository's dynamic batcher, with a batcher that never waits
    (``max_queue_delay_microseconds: 0``: it only merges requests already queued), and
    without one; alternated ``rounds`` times so drift on a shared machine hits all of
    them: one client, then ``concurrency`` clients."""
    committed = model_config_dict(settings, "user_tower")
    no_wait = {**committed, "dynamic_batching": {"max_queue_delay_microseconds": "0"}}
    without = {k: v for k, v in committed.items() if k != "dynamic_batching"}
    delay = committed.get("dynamic_batching", {}).get("max_queue_delay_microseconds", 0)
    variants = {f"batching {delay}us": committed, "batching 0us": no_wait, "no batching": without}
    version = versions["user_tower"]
    single: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
    many: dict[str, list[dict[str, float]]] = {name: [] for name in variants}

    def factory() -> TritonClient:
        return TritonClient.from_settings(settings, versions, timeout_s=5.0)

    def call(c: TritonClient) -> None:
        c.user_embedding(inputs)

    try:
        for _ in range(rounds):
            for name, config in variants.items():
                load_model(settings, "user_tower", version, config=config)
                with factory() as client:
                    single[name].append(_time(functools.partial(call, client), repeats // rounds))
                many[name].append(_concurrent(factory, call, concurrency, seconds))
    finally:
        load_model(settings, "user_tower", version)  # the repository's config again

    def mean(runs: list[dict[str, float]]) -> dict[str, float]:
        return {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}

    out = {}
    for name in single:
        out[f"user_tower b1 x1 {name}"] = mean(single[name])
        out[f"user_tower b1 x{concurrency} {name}"] = mean(many[name])
    return out


def bench_triton(
    settings: Settings,
    repeats: int = 300,
    candidates: int = 500,
    assembly: Assembly | None = None,
    concurrency: int = 8,
    seconds: float = 5.0,
) -> dict[str, dict[str, float]]:
    """Run the benchmark against the Triton at ``settings``' ports (which must serve the
    newest versions). Returns {case: {p50_ms, p99_ms, ...}}."""
    import tl2cgen

    repo = settings.model_repository
    versions = {m: list_versions(settings, m)[-1] for m in ("user_tower", "rank_features",
                "ranker", "rank")}  # fmt: skip
    user_session = _session(repo / "user_tower" / str(versions["user_tower"]) / "model.onnx")
    feats_session = _session(repo / "rank_features" / str(versions["rank_features"]) / "model.onnx")
    ranker_cfg = load_config("ranker", repo)
    library = (
        repo / "ranker" / str(versions["ranker"])
        / ranker_cfg.parameters["compiled_artifact"].string_value
    )  # fmt: skip
    predictor = tl2cgen.Predictor(str(library), nthread=1)

    results: dict[str, dict[str, float]] = {}
    client = TritonClient.from_settings(settings, versions, timeout_s=5.0)
    user = user_tower_inputs(user_session, 1, repo)
    results["user_tower b1 triton"] = _time(lambda: client.user_embedding(user), repeats)
    results["user_tower b1 in-process"] = _time(lambda: user_session.run(None, user), repeats)

    ranking = rank_inputs(feats_session, candidates)

    def in_process_rank() -> np.ndarray:
        (rows,) = feats_session.run(None, ranking)
        # tl2cgen 1.0 under NumPy 2 cannot convert dtypes itself (copy=False): do it here.
        rows = np.ascontiguousarray(rows, dtype=predictor.threshold_type)
        dmat = tl2cgen.DMatrix(rows, dtype=predictor.threshold_type)
        return predictor.predict(dmat, pred_margin=True).reshape(-1)

    triton_scores = client.rank(ranking)
    if not np.allclose(triton_scores, in_process_rank(), rtol=1e-4, atol=1e-4):
        raise RuntimeError("Triton's rank scores differ from the in-process computation")
    results[f"rank n={candidates} triton"] = _time(lambda: client.rank(ranking), repeats)
    results[f"rank n={candidates} in-process"] = _time(in_process_rank, repeats)
    results[f"rank_features n={candidates} onnxruntime"] = _time(
        lambda: feats_session.run(None, ranking), repeats
    )
    if assembly is not None:
        results[f"rank_features n={candidates} python"] = _time(lambda: assembly(ranking), repeats)
    client.close()

    if concurrency > 1:
        inputs = user_tower_inputs(user_session, 1, repo)
        results.update(
            bench_dynamic_batching(
                settings, versions, inputs, repeats, concurrency, seconds / 2, rounds=2
            )
        )
    return results


def report(results: Mapping[str, Mapping[str, float]]) -> str:
    """A table plus the Triton / in-process ratios."""
    lines = [f"{'case':44s} {'p50 ms':>9s} {'p99 ms':>9s} {'rps':>8s}"]
    for case, r in results.items():
        rps = f"{r['rps']:8.0f}" if "rps" in r else ""
        lines.append(f"{case:44s} {r['p50_ms']:9.3f} {r['p99_ms']:9.3f} {rps}")
    for triton_case in [c for c in results if c.endswith(" triton")]:
        base = triton_case.removesuffix(" triton")
        local = results.get(f"{base} in-process")
        if local:
            lines.append(
                f"ratio {base} triton/in-process: p50 "
                f"{results[triton_case]['p50_ms'] / local['p50_ms']:.1f}x, p99 "
                f"{results[triton_case]['p99_ms'] / local['p99_ms']:.1f}x"
            )
    return "\n".join(lines)


def cli(args: argparse.Namespace) -> int:
    """``recstack bench triton [--repeats N]``: uses a running Triton, or starts one."""
    settings = get_settings()
    proc = None
    if not server_ready(settings):
        proc = start_triton(settings)  # UserError when nothing is published yet
    try:
        results = bench_triton(settings, repeats=args.repeats)
    finally:
        if proc is not None:
            proc.stop()
    print(report(results))
    out = settings.reports_dir / "bench_triton.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"written {out}")
    return 0

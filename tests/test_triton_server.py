"""The real embedded tritonserver on tiny real artifacts: started through
`recstack serve triton` (foreground) once for this module, queried with tritonclient gRPC
and HTTP and with curl, and stopped with SIGTERM by the last test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightgbm as lgb
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from _triton_fixtures import (
    Artifacts,
    assemble,
    export_user_tower,
    item_inputs,
    publish_all,
    rank_inputs,
    shared_artifacts,
    user_inputs,
)
from conftest import make_settings, port
from tritonclient.utils import InferenceServerException

from exporters.model_repo import publish_version
from orchestrator.processes import read_pid
from orchestrator.triton_client import (
    TritonClient,
    TritonInvalidInput,
    TritonModelNotFound,
    TritonUnavailable,
)
from orchestrator.triton_server import load_model, server_ready, stub_pids
from recstack.settings import PROJECT_ROOT, Settings

pytestmark = pytest.mark.integration

PORTS = {
    "triton_http_port": port(18000),
    "triton_grpc_port": port(18001),
    "triton_metrics_port": port(18002),
}


@dataclass
class Served:
    settings: Settings
    art: Artifacts
    versions: dict[str, int]
    proc: subprocess.Popen[str]
    out: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("triton")
    settings = make_settings(base, **PORTS)
    art = shared_artifacts(tmp_path_factory)
    versions = publish_all(settings, art)
    env = dict(os.environ)
    env.update(
        RECSTACK_MODEL_REPOSITORY=str(settings.model_repository),
        RECSTACK_RUN_DIR=str(settings.run_dir),
        RECSTACK_RELEASES_DIR=str(settings.releases_dir),
        RECSTACK_DATA_DIR=str(settings.data_dir),
        **{f"RECSTACK_{k.upper()}": str(v) for k, v in PORTS.items()},
    )
    out = base / "serve.out"
    with out.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recstack.cli", "serve", "triton"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=PROJECT_ROOT,
            text=True,
        )
    deadline = time.monotonic() + 150
    while "tritonserver ready" not in out.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"serve triton did not become ready:\n{out.read_text()}")
        time.sleep(0.2)
    yield Served(settings, art, versions, proc, out)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _ort(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, inputs)


def _grpc(s: Served) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(f"127.0.0.1:{s.settings.triton_grpc_port}")


def _infer_grpc(s: Served, model: str, inputs: dict[str, np.ndarray], version: str = "1"):  # type: ignore[no-untyped-def]
    tensors = []
    for name, array in inputs.items():
        t = grpcclient.InferInput(name, list(array.shape), _triton_type(array))
        t.set_data_from_numpy(array)
        tensors.append(t)
    return _grpc(s).infer(model, tensors, model_version=version, client_timeout=10)


def _triton_type(array: np.ndarray) -> str:
    return {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}[
        array.dtype.name
    ]


def _over(s: Served, protocol: str) -> Settings:
    """The served settings with the orchestrator's client on ``protocol``."""
    return Settings(**{**s.settings.model_dump(), "triton_protocol": protocol})


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("batch", [1, 512])
def test_user_tower_client_equals_onnxruntime(served: Served, batch: int, protocol: str) -> None:
    inputs = user_inputs(batch, seed=batch)
    (expected,) = _ort(served.art.user_tower, inputs)
    settings = _over(served, protocol)
    with TritonClient.from_settings(settings, served.versions, timeout_s=10) as client:
        assert client.protocol == protocol
        got = client.user_embedding(inputs)
    assert got.shape == (batch, 64)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 512])
def test_item_tower_http_equals_onnxruntime(served: Served, batch: int) -> None:
    inputs = item_inputs(batch, seed=batch)
    (expected,) = _ort(served.art.item_tower, inputs)
    client = httpclient.InferenceServerClient(f"127.0.0.1:{served.settings.triton_http_port}")
    tensors = []
    for name, array in inputs.items():
        t = httpclient.InferInput(name, list(array.shape), _triton_type(array))
        t.set_data_from_numpy(array, binary_data=True)
        tensors.append(t)
    got = client.infer("item_tower", tensors, model_version="1").as_numpy("item_embedding")
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_curl_kserve_v2_json(served: Served) -> None:
    inputs = user_inputs(2, seed=3)
    body = {
        "inputs": [
            {"name": k, "shape": list(v.shape), "datatype": "INT64", "data": v.ravel().tolist()}
            for k, v in inputs.items()
        ]
    }
    url = f"http://127.0.0.1:{served.settings.triton_http_port}/v2/models/user_tower/versions/1"
    meta = subprocess.run(["curl", "-sf", url], capture_output=True, text=True, check=True)
    assert {t["name"] for t in json.loads(meta.stdout)["inputs"]} == set(inputs)
    res = subprocess.run(
        ["curl", "-sf", "-H", "Content-Type: application/json", "-d", json.dumps(body),
         f"{url}/infer"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    (out,) = json.loads(res.stdout)["outputs"]
    assert out["name"] == "user_embedding" and out["shape"] == [2, 64]
    (expected,) = _ort(served.art.user_tower, inputs)
    np.testing.assert_allclose(np.array(out["data"]).reshape(2, 64), expected, atol=1e-5)


@pytest.mark.parametrize("n", [1, 512])
def test_ranker_equals_lightgbm_raw_scores(served: Served, n: int) -> None:
    rows = np.random.default_rng(n).normal(size=(n, 10)).astype(np.float32)
    got = _infer_grpc(served, "ranker", {"input__0": rows}).as_numpy("output__0")
    booster = lgb.Booster(model_file=str(served.art.booster_file))
    expected = booster.predict(rows.astype(np.float64), raw_score=True)
    assert got.shape == (n, 1)
    np.testing.assert_allclose(got[:, 0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [1, 512])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_rank_ensemble_equals_assembly_plus_ranker(served: Served, n: int, protocol: str) -> None:
    inputs = rank_inputs(n, seed=n)
    (rank_input,) = _ort(served.art.rank_features, inputs)
    np.testing.assert_allclose(rank_input, assemble(inputs), rtol=1e-5, atol=1e-5)
    booster = lgb.Booster(model_file=str(served.art.booster_file))
    expected = booster.predict(rank_input.astype(np.float64), raw_score=True)
    with TritonClient.from_settings(_over(served, protocol), served.versions, 10) as client:
        got = client.rank(inputs)
    assert got.shape == (n,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _expect_error(served: Served, fn, fragment: str) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as info:
        fn()
    message = str(info.value)
    assert fragment.lower() in message.lower(), message
    # ... and the server goes on serving.
    good = _infer_grpc(served, "user_tower", user_inputs(1)).as_numpy("user_embedding")
    assert good.shape == (1, 64)
    return message


def test_bad_requests_get_clear_errors_and_server_keeps_serving(served: Served) -> None:
    ok = user_inputs(1)
    wrong_shape = {**ok, "recent_items": ok["recent_items"][:, :19]}
    _expect_error(served, lambda: _infer_grpc(served, "user_tower", wrong_shape), "recent_items")
    wrong_dtype = {**ok, "user_id": ok["user_id"].astype(np.float32)}
    _expect_error(served, lambda: _infer_grpc(served, "user_tower", wrong_dtype), "user_id")
    wrong_name = {**{k: v for k, v in ok.items() if k != "country"}, "land": ok["country"]}
    _expect_error(served, lambda: _infer_grpc(served, "user_tower", wrong_name), "land")
    _expect_error(served, lambda: _infer_grpc(served, "no_such_model", ok), "no_such_model")
    _expect_error(served, lambda: _infer_grpc(served, "user_tower", ok, version="9"), "9")
    rows = np.zeros((3, 7), np.float32)  # the ranker takes 10 features
    msg = _expect_error(served, lambda: _infer_grpc(served, "ranker", {"input__0": rows}), "10")
    assert "INVALID_ARG" in msg


def test_bad_request_in_a_batch_fails_alone(served: Served) -> None:
    client = _grpc(served)
    results: dict[int, object] = {}

    def make_cb(i: int):  # type: ignore[no-untyped-def]
        return lambda result, error: results.__setitem__(i, error or result)

    for i in range(12):
        inputs = user_inputs(1, seed=i)
        if i == 5:
            inputs["user_id"][:] = 10**6  # out of the embedding table: fails in onnxruntime
        tensors = []
        for name, array in inputs.items():
            t = grpcclient.InferInput(name, list(array.shape), "INT64")
            t.set_data_from_numpy(array)
            tensors.append(t)
        client.async_infer("user_tower", tensors, make_cb(i), model_version="1")
    deadline = time.monotonic() + 20
    while len(results) < 12 and time.monotonic() < deadline:
        time.sleep(0.01)
    errors = [i for i, r in results.items() if isinstance(r, InferenceServerException)]
    assert errors == [5]
    assert "INVALID_ARG" in str(results[5])


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_typed_client_errors(served: Served, protocol: str) -> None:
    settings = _over(served, protocol)
    with TritonClient.from_settings(settings, served.versions, timeout_s=10) as client:
        with pytest.raises(TritonInvalidInput, match="missing inputs"):
            client.infer("user_tower", {"user_id": np.zeros((1, 1), np.int64)})
        with pytest.raises(TritonInvalidInput, match="expected"):
            client.infer("user_tower", {**user_inputs(1), "recent_items": np.zeros((1, 3))})
        with pytest.raises(TritonModelNotFound):
            client.infer("user_tower", user_inputs(1), version=42)
        with pytest.raises(TritonModelNotFound):
            client.infer("nope", {})
        with pytest.raises(TritonInvalidInput, match="10"):
            client.infer("ranker", {"input__0": np.zeros((2, 4), np.float32)})
        # Refused by the model inside Triton (a user id past the embedding table): Triton's
        # INVALID_ARG, and the connection goes on serving.
        bad = user_inputs(1)
        bad["user_id"][:] = 10**6
        with pytest.raises(TritonInvalidInput, match="user_tower"):
            client.user_embedding(bad)
        assert client.user_embedding(user_inputs(1)).shape == (1, 64)
        assert client.ready() and client.ready("rank")
        assert not client.ready("nope")
    gone = {"triton_grpc_port": port(18009), "triton_http_port": port(18009)}
    down = Settings(**{**settings.model_dump(), **gone})
    with TritonClient.from_settings(down, timeout_s=0.5) as client:
        assert not client.ready()
        with pytest.raises(TritonUnavailable):
            client.user_embedding(user_inputs(1))


def _executions(served: Served, model: str) -> int:
    """How many requests ``model`` has run so far (Triton's statistics)."""
    stats = _grpc(served).get_inference_statistics(model, as_json=True)["model_stats"]
    return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats) + sum(
        int(m["inference_stats"]["fail"].get("count", 0)) for m in stats
    )


def test_row_caps_from_the_configs_are_checked_before_anything_runs(served: Served) -> None:
    """The rank ensemble's candidates become the ranker's batch: more than its
    max_batch_size fail in Triton only after rank_features ran on all of them. The client
    refuses them before sending; within the cap the ensemble answers."""
    from exporters.model_config import load_config

    cap = load_config("ranker", served.settings.model_repository).max_batch_size
    with TritonClient.from_settings(served.settings, served.versions, timeout_s=30) as client:
        assert client.max_rows("rank") == cap
        assert (
            client.max_rows("user_tower")
            == load_config("user_tower", served.settings.model_repository).max_batch_size
        )
        before = _executions(served, "rank_features")
        with pytest.raises(TritonInvalidInput, match=f"{cap + 1} rows.*at most {cap}"):
            client.rank(rank_inputs(cap + 1))
        with pytest.raises(TritonInvalidInput, match="at most"):
            client.user_embedding(user_inputs(client.max_rows("user_tower") + 1))  # type: ignore[operator]
        assert _executions(served, "rank_features") == before  # nothing reached Triton
        assert client.rank(rank_inputs(cap)).shape == (cap,)
    # Without the client's check: Triton refuses too, but rank_features has run first.
    before = _executions(served, "rank_features")
    _expect_error(served, lambda: _infer_grpc(served, "rank", rank_inputs(cap + 1)), "batch")
    assert _executions(served, "rank_features") == before + 1


def test_shims_fall_back_to_cpu_without_cuda(served: Served) -> None:
    log = (served.settings.run_dir / "logs" / "triton.log").read_text()
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA present: the fallback path is not taken here")
    for model in ("user_tower", "item_tower", "rank_features"):
        assert f"{model}: onnxruntime" in log
        line = next(x for x in log.splitlines() if f"{model}: onnxruntime" in x)
        assert "providers ['CPUExecutionProvider'] on CPU instance" in line, line


def test_new_version_loads_pinned_and_old_one_goes(served: Served, tmp_path: Path) -> None:
    """A release switch: publish user_tower v2, load exactly v2, then go back to v1."""
    onnx = export_user_tower(tmp_path / "v2.onnx", seed=99)
    v2 = publish_version(served.settings, "user_tower", {"model.onnx": onnx})
    assert v2 == 2
    inputs = user_inputs(4, seed=4)
    (expected_v2,) = _ort(onnx, inputs)
    (expected_v1,) = _ort(served.art.user_tower, inputs)
    load_model(served.settings, "user_tower", v2)
    try:
        with TritonClient.from_settings(served.settings, {"user_tower": v2}, 10) as client:
            np.testing.assert_allclose(client.user_embedding(inputs), expected_v2, atol=1e-5)
            with pytest.raises(TritonModelNotFound):
                client.user_embedding(inputs, version=1)
    finally:
        load_model(served.settings, "user_tower", 1)
    with TritonClient.from_settings(served.settings, {"user_tower": 1}, 10) as client:
        np.testing.assert_allclose(client.user_embedding(inputs), expected_v1, atol=1e-5)
    assert not np.allclose(expected_v1, expected_v2, atol=1e-3)


def test_zz_sigterm_stops_cleanly_without_orphan_stubs(served: Served) -> None:
    """Last test of the module: SIGTERM to `recstack serve triton` (foreground)."""
    assert served.proc.poll() is None
    # one per Python-backend model (+ one a version switch may still be unloading)
    assert len(stub_pids(served.settings)) >= 4
    served.proc.send_signal(signal.SIGTERM)
    assert served.proc.wait(timeout=30) == 0
    assert "tritonserver stopped" in served.out.read_text()
    assert stub_pids(served.settings) == []
    assert read_pid(served.settings, "triton") is None
    assert not server_ready(served.settings)

"""The triton-direct target: request tensors built from the committed config.pbtxt (unit),
and a short open-loop run against a real embedded tritonserver serving a tiny user tower
(integration; artifacts shared with the Triton tests). Ports 19070-19072."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from _triton_fixtures import N_USERS, shared_artifacts
from conftest import make_settings, port

from loadtest.runner import run_scenario
from loadtest.scenario import Target, validate_scenario
from loadtest.targets import TritonModel
from recstack.errors import UserError
from recstack.settings import Settings

PORTS = {
    "triton_http_port": port(19070),
    "triton_grpc_port": port(19071),
    "triton_metrics_port": port(19072),
}


def test_inputs_follow_config_pbtxt(settings: Settings) -> None:
    rng = np.random.default_rng(0)
    tower = TritonModel("x", Target(kind="triton", model="user_tower", batch_size=4), settings)
    arrays = tower.input_arrays(rng)
    assert list(arrays) == ["user_id", "age_bucket", "country", "recent_items"]
    assert arrays["recent_items"][0].shape == (4, 20)
    assert {dt for _, dt in arrays.values()} == {"INT64"}

    rank = TritonModel("x", Target(kind="triton", model="rank"), settings)
    with pytest.raises(UserError, match=r"rank\.user_features has variable dims .*target\.dims"):
        rank.input_arrays(rng)
    dims = {
        "user_features": [1, 3],
        "user_category_affinity": [1, 5],
        "user_embedding": [1, 64],
        "item_features": [50, 4],
        "item_category": [50],
        "item_created_at": [50],
        "item_embedding": [50, 64],
        "request_time": [1],
    }
    rank = TritonModel("x", Target(kind="triton", model="rank", dims=dims), settings)
    arrays = rank.input_arrays(rng)
    assert arrays["item_features"][0].shape == (50, 4)
    assert arrays["item_features"][1] == "FP32"
    assert arrays["item_created_at"][1] == "FP64"


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    from exporters.model_repo import publish_version
    from orchestrator.triton_server import start_triton

    settings = make_settings(tmp_path_factory.mktemp("loadtest_triton"), **PORTS)
    art = shared_artifacts(tmp_path_factory)
    version = publish_version(settings, "user_tower", {"model.onnx": art.user_tower})
    proc = start_triton(settings, {"user_tower": version})
    try:
        yield settings
    finally:
        proc.stop()


def _triton_success(settings: Settings, model: str) -> tuple[int, int]:
    """(count, total ns) of ``model``'s successful requests so far, from Triton's
    statistics API (time inside the server: queue + compute)."""
    import json
    import urllib.request

    url = f"http://{settings.triton_host}:{settings.triton_http_port}/v2/models/{model}/stats"
    with urllib.request.urlopen(url, timeout=5) as response:
        stats = json.load(response)["model_stats"][0]["inference_stats"]["success"]
    return int(stats["count"]), int(stats["ns"])


@pytest.mark.integration
def test_user_tower_open_loop(triton: Settings) -> None:
    sc = validate_scenario(
        {
            "name": "triton-test",
            "target": {"kind": "triton", "model": "user_tower", "batch_size": 1},
            # No warm-up: the client's numbers then cover every request Triton counts.
            "load": {"arrival": "poisson", "rate": 100, "duration": 2, "warmup": 0},
            "traffic": {"user_range": [0, N_USERS - 1], "cold_start_share": 0},
        }
    )
    before = _triton_success(triton, "user_tower")
    doc = run_scenario(sc, triton)
    after = _triton_success(triton, "user_tower")
    assert doc["target"] == {
        "kind": "triton",
        "address": f"127.0.0.1:{port(19071)}",
        "model": "user_tower",
    }
    assert doc["errors"] == {}, doc["errors"]
    assert doc["requests"]["ok"] == doc["requests"]["scheduled"] > 100
    # Ordering, not fixed milliseconds (a busy host moves those): the client's latency
    # from the intended send includes the generator's lag, and the client's mean latency
    # includes Triton's own queue + compute time for the same requests.
    lat, from_send = doc["latency_ms"], doc["latency_from_send_ms"]
    # (slack: the loop may fire a timer tick early, and HDR percentiles keep 3 digits)
    for key in ("p50", "max"):
        assert lat[key] >= from_send[key] - (1.0 + 2e-3 * from_send[key]), (lat, from_send)
    # Triton's own books for the same requests: as many successes as the client counted,
    # and each one's time in the server (queue + compute) inside its client latency.
    count, ns = after[0] - before[0], after[1] - before[1]
    assert count == doc["requests"]["ok"], (count, doc["requests"])
    server_ms = ns / count / 1e6
    assert 0 < server_ms <= from_send["mean"], (server_ms, from_send)
    # A model that is not loaded is a clear error before any load is sent.
    missing = sc.model_dump()
    missing["target"]["model"] = "item_tower"
    with pytest.raises(UserError, match=r"item_tower .* not ready"):
        run_scenario(validate_scenario(missing), triton)

"""The in-process reference (issue 13): the orchestrator's own pipeline with its models run
in this process instead of Triton. A benchmark tool, not a serving mode: it tells what the
same release costs without Triton, so the benchmark can report recstack's CPU and latency
as a ratio to it (``loadtest/bench_large.sh``, docs/benchmark.md).

Everything but the model calls is recstack's: :class:`RecommendService` over a
:class:`ServingRelease` (the same Feast online store, FAISS index, item snapshot,
candidate sources and post-processing) behind the same gRPC/HTTP front and metrics
(``orchestrator.server.serve``). Only ``release.triton`` is replaced by
:class:`InProcessModels`, which runs the release's pinned versions of the same artifacts
the way the embedded Triton's shims do (model_repository/_shims/): the ONNX models in
onnxruntime with one intra-op thread, the ranker's tl2cgen-compiled library with one
thread. Tensor names and the rank ensemble's steps come from config.pbtxt.

``recstack bench reference --port P`` serves it; its answers equal the orchestrator's
(tests/test_reference_parity.py)."""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from exporters.model_config import load_config
from orchestrator.processes import ManagedProcess
from orchestrator.triton_client import (
    RANK,
    USER_TOWER,
    ModelSpec,
    TritonInvalidInput,
    TritonModelNotFound,
    _check_rows,
    _check_shape,
    model_spec,
)
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

    from orchestrator.service import RecommendService

log = logging.getLogger(__name__)

# The shims of model_repository/_shims/ a config names (``default_model_filename``), i.e.
# how the embedded Triton runs the model; the same runtime is used here.
ONNX_SHIM = "onnx_model.py"
TREELITE_SHIM = "treelite_model.py"

Runner = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


def _params(config: ModelConfig) -> dict[str, str]:
    return {k: v.string_value for k, v in config.parameters.items()}


def _onnx_runner(spec: ModelSpec, version_dir: Path, params: Mapping[str, str]) -> Runner:
    """onnxruntime on the version's artifact, session options as in onnx_model.py."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    artifact = version_dir / params.get("artifact", "model.onnx")
    session = ort.InferenceSession(str(artifact), options, providers=["CPUExecutionProvider"])
    names = [t.name for t in spec.outputs]

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = session.run(names, dict(feeds))
        return {
            t.name: np.ascontiguousarray(r, dtype=t.dtype)
            for t, r in zip(spec.outputs, results, strict=True)
        }

    return run


def _treelite_runner(spec: ModelSpec, version_dir: Path, params: Mapping[str, str]) -> Runner:
    """The compiled tl2cgen library, as treelite_model.py loads and calls it (raw margins)."""
    import tl2cgen

    library = version_dir / params.get("compiled_artifact", "model.so")
    predictor = tl2cgen.Predictor(str(library), nthread=int(params.get("nthread", "1")))
    (inp,) = spec.inputs
    (out,) = spec.outputs
    # tl2cgen's predict "may be called by only one thread at a time"; Triton's one
    # instance serialises its calls the same way.
    lock = threading.Lock()

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = np.ascontiguousarray(feeds[inp.name], dtype=predictor.threshold_type)
        if rows.ndim != 2 or rows.shape[1] != predictor.num_feature:
            raise TritonInvalidInput(
                f"{spec.name}: input {inp.name!r} has shape {list(rows.shape)}, expected "
                f"[rows, {predictor.num_feature}] (the ranker's feature count)"
            )
        with lock:
            scores = predictor.predict(
                tl2cgen.DMatrix(rows, dtype=predictor.threshold_type), pred_margin=True
            )
        return {out.name: scores.reshape(rows.shape[0], -1).astype(out.dtype, copy=False)}

    return run


_RUNTIMES = {ONNX_SHIM: _onnx_runner, TREELITE_SHIM: _treelite_runner}


@dataclass(frozen=True)
class _Step:
    model: str
    inputs: dict[str, str]  # the model's input -> the ensemble tensor that feeds it
    outputs: dict[str, str]  # the model's output -> the ensemble tensor it writes


class InProcessModels:
    """The model client of :class:`~orchestrator.serving_release.ServingRelease`
    (``user_embedding``, ``rank``, ``ready``, ``max_rows``, ``spec``, ``versions``,
    ``close``), answered in this process from the artifacts of ``versions`` (model ->
    version, a release's pins). Inputs are checked as :class:`TritonClient` checks them;
    ``timeout_s`` is accepted and not enforced (a call in process cannot be abandoned)."""

    def __init__(self, repository: Path, versions: Mapping[str, int], ensemble: str = RANK) -> None:
        self.repository = repository
        self.ensemble = ensemble
        self._specs: dict[str, ModelSpec] = {
            USER_TOWER: model_spec(USER_TOWER, repository),
            ensemble: model_spec(ensemble, repository),
        }
        config = load_config(ensemble, repository)
        self._steps = [
            _Step(s.model_name, dict(s.input_map), dict(s.output_map))
            for s in config.ensemble_scheduling.step
        ]
        if not self._steps:
            raise ValueError(f"{ensemble} has no ensemble steps in its config.pbtxt")
        models = [USER_TOWER, *(s.model for s in self._steps)]
        missing = [m for m in models if m not in versions]
        if missing:
            raise ValueError(f"no pinned version for {missing} (pins: {dict(versions)})")
        self.versions = {m: int(versions[m]) for m in models}
        self._runners = {m: self._load(m, self.versions[m]) for m in models}

    @classmethod
    def for_release(cls, settings: Settings, release_id: int) -> InProcessModels:
        """The models a release pins (its manifest's ``models``)."""
        from exporters.release import model_versions

        return cls(settings.model_repository, model_versions(settings, release_id))

    def _load(self, model: str, version: int) -> Runner:
        config = load_config(model, self.repository)
        runtime = _RUNTIMES.get(config.default_model_filename)
        if runtime is None:
            raise ValueError(
                f"{model}: no in-process runtime for default_model_filename "
                f"{config.default_model_filename!r} (known: {sorted(_RUNTIMES)})"
            )
        version_dir = self.repository / model / str(version)
        if not version_dir.is_dir():
            raise TritonModelNotFound(f"{model} v{version}: no folder {version_dir}")
        self._specs.setdefault(model, model_spec(model, self.repository))
        return runtime(self._specs[model], version_dir, _params(config))

    def spec(self, model: str) -> ModelSpec:
        try:
            return self._specs[model]
        except KeyError:
            raise TritonModelNotFound(f"{model} is not run in process") from None

    def max_rows(self, model: str) -> int | None:
        return self.spec(model).max_rows

    def ready(self, model: str | None = None) -> bool:
        return model is None or model in self._runners or model == self.ensemble

    def _checked(self, model: str, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The inputs as TritonClient.infer would send them (names, dtypes, shapes, rows)."""
        spec = self.spec(model)
        expected = {t.name for t in spec.inputs}
        if set(inputs) != expected:
            raise TritonInvalidInput(
                f"{model}: unknown inputs {sorted(set(inputs) - expected)}, missing inputs "
                f"{sorted(expected - set(inputs))}; config.pbtxt names {sorted(expected)}"
            )
        out = {}
        for t in spec.inputs:
            array = np.asarray(inputs[t.name])
            if array.dtype != t.dtype:
                if not np.can_cast(array.dtype, t.dtype, "same_kind"):
                    raise TritonInvalidInput(
                        f"{model}: input {t.name!r} is {array.dtype}, expected {t.dtype}"
                    )
                array = array.astype(t.dtype)
            _check_shape(t, array.shape, spec.batching)
            _check_rows(model, spec, t, array.shape)
            out[t.name] = array
        return out

    def user_embedding(self, inputs: Mapping[str, np.ndarray], **_: object) -> np.ndarray:
        """user_tower: a batch of users -> [batch, dim] embeddings."""
        out = self._runners[USER_TOWER](self._checked(USER_TOWER, inputs))
        return out[self.spec(USER_TOWER).outputs[0].name]

    def rank(self, inputs: Mapping[str, np.ndarray], **_: object) -> np.ndarray:
        """The rank ensemble's steps in order: one user and N candidates -> N scores."""
        tensors = self._checked(self.ensemble, inputs)
        for step in self._steps:
            feeds = {name: tensors[src] for name, src in step.inputs.items()}
            out = self._runners[step.model](feeds)
            tensors.update({dst: out[name] for name, dst in step.outputs.items()})
        return tensors[self.spec(self.ensemble).outputs[0].name].reshape(-1)

    def close(self) -> None:
        self._runners.clear()


# --------------------------------------------------------------------------- the service
def reference_release_id(settings: Settings, release_id: int | None) -> int:
    """``release_id``, else the release state's live release (what the orchestrator
    serves to every user when no A/B test is on)."""
    if release_id is not None:
        return int(release_id)
    from exporters.release_state import load_state

    state = load_state(settings)
    if state.live is None:
        raise UserError(f"no release to serve in {settings.releases_dir}")
    if len(state.serving) > 1:
        raise UserError(
            f"the release state serves {state.serving} (an A/B test): the reference serves "
            "one release; pass --release"
        )
    return int(state.live)


async def create_reference_service(
    settings: Settings, release_id: int | None = None
) -> RecommendService:
    """The orchestrator's :class:`RecommendService` (configured from ``settings`` as
    ``RecommendService.create`` does) over one release whose models run in process."""
    from orchestrator import metrics
    from orchestrator.breaker import BreakerConfig, Breakers
    from orchestrator.budget import BudgetConfig
    from orchestrator.event_log import EventLog
    from orchestrator.service import RecommendService, ServiceConfig
    from orchestrator.serving_release import ServingRelease

    rid = reference_release_id(settings, release_id)
    cfg = ServiceConfig(
        workers=settings.orchestrator_workers, budget=BudgetConfig.from_settings(settings)
    )
    breakers = Breakers(BreakerConfig.from_settings(settings), on_change=metrics.breaker_event)

    def load() -> ServingRelease:
        rel = ServingRelease.load(settings, rid, breakers)
        rel.triton.close()  # never called: the models run here
        rel.triton = InProcessModels.for_release(settings, rid)  # type: ignore[assignment]
        rel.warm_up(cfg.n_ranked)
        return rel

    rel = await asyncio.to_thread(load)
    log.info("reference: release %d, models in process %s", rid, rel.triton.versions)
    svc = RecommendService(rel, cfg, settings.max_clock_lead_days, EventLog.from_settings(settings))
    svc.start_refresh(settings.feature_refresh_s)
    return svc


def reference_settings(
    settings: Settings,
    port: int,
    http_port: int | None = None,
    metrics_port: int | None = None,
    admin_port: int | None = None,
) -> Settings:
    """``settings`` with the reference's own ports (gRPC ``port``, then HTTP, metrics and
    admin at +1, +2, +3 unless given) and its own event log folder
    (``<events_dir>/reference``): its answers must never reach the served-answer log that
    ``recstack data import-events`` trains on."""
    ports = {
        "orchestrator_grpc_port": port,
        "orchestrator_http_port": http_port or port + 1,
        "orchestrator_metrics_port": metrics_port or port + 2,
        "orchestrator_admin_port": admin_port or port + 3,
    }
    for name, value in ports.items():
        if not 0 < int(value) < 65536:
            raise UserError(f"{name.removeprefix('orchestrator_')} {value} is not a TCP port")
    if len(set(ports.values())) < len(ports):
        raise UserError(f"the reference's ports must differ: {ports}")
    return settings.model_copy(
        update={**ports, "events_dir_path": settings.events_dir / "reference"}
    )


NAME = "reference"


def start_reference(
    settings: Settings, release_id: int | None = None, timeout: float = 600.0
) -> ManagedProcess:
    """Start ``recstack bench reference`` on ``settings``' orchestrator ports (see
    :func:`reference_settings`) in the background; returns once gRPC health says SERVING."""
    from orchestrator.orchestrator_process import grpc_serving, settings_env
    from orchestrator.processes import start_process

    argv = [sys.executable, "-m", "recstack.cli", "bench", "reference"]
    argv += ["--port", str(settings.orchestrator_grpc_port)]
    argv += ["--http-port", str(settings.orchestrator_http_port)]
    argv += ["--metrics-port", str(settings.orchestrator_metrics_port)]
    argv += ["--admin-port", str(settings.orchestrator_admin_port)]
    if release_id is not None:
        argv += ["--release", str(release_id)]
    target = f"{settings.orchestrator_host}:{settings.orchestrator_grpc_port}"
    return start_process(
        NAME,
        argv,
        settings,
        ready=lambda: grpc_serving(target),
        timeout=timeout,
        env=settings_env(settings),
    )


def cli(args: argparse.Namespace) -> int:
    """``recstack bench reference --port P [--release R] [--detach]``."""
    settings = reference_settings(
        get_settings(), args.port, args.http_port, args.metrics_port, args.admin_port
    )
    if args.release is not None and args.release < 0:
        raise UserError(f"--release {args.release}: release ids are >= 0")
    if args.detach:
        proc = start_reference(settings, args.release, args.timeout)
        print(
            f"reference running (pid {proc.pid}) on grpc port "
            f"{settings.orchestrator_grpc_port}, metrics port "
            f"{settings.orchestrator_metrics_port}; log {proc.log_path}"
        )
        return 0
    from orchestrator.server import serve

    make = functools.partial(create_reference_service, release_id=args.release)
    asyncio.run(serve(settings, make_service=make))
    return 0

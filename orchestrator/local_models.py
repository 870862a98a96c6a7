"""The release's models run in this process, the way the embedded Triton's shims run them
(model_repository/_shims/): the ONNX models in onnxruntime with one intra-op thread, the
ranker's tl2cgen-compiled library with one thread; tensor names and the rank ensemble's
steps from config.pbtxt, versions from the release's pins.

Two users: the in-process reference of the benchmark (loadtest/reference.py, issue 13),
and the orchestrator's model fallback (``RECSTACK_MODEL_FALLBACK=in_process``): when
Triton cannot answer (down, hung, a breaker open, a model unloaded), a release that loaded
these answers with the same models instead of degrading to popular items or retrieval
order (docs/faults.md says when that is the right trade)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from exporters.model_config import load_config
from orchestrator.triton_client import (
    RANK,
    USER_TOWER,
    ModelSpec,
    TritonInvalidInput,
    TritonModelNotFound,
    checked_inputs,
    model_spec,
)
from recstack.settings import Settings

if TYPE_CHECKING:
    from tritonclient.grpc.model_config_pb2 import ModelConfig

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
        return checked_inputs(model, self.spec(model), inputs)

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

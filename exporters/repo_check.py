"""Check a Triton model repository against its artifacts by the rules of the backend that
will load it, before any server does: a config that NVIDIA's container would reject fails
here, in the release pipeline and in CI.

Rules, each read from the upstream source (cited at the function that applies it):

* ``platform: "onnxruntime_onnx"`` -- triton-inference-server/onnxruntime_backend
  ``src/onnxruntime.cc`` (``ValidateInputs``/``ValidateOutputs``) and
  ``src/onnxruntime_utils.cc`` (``CompareDimsSupported``): :func:`onnxruntime_backend_errors`.
* ``backend: "fil"`` -- triton-inference-server/fil_backend ``src/shared_state.h``,
  ``docs/model_config.md``, ``docs/model_support.md``: :func:`fil_errors`.
* ``platform: "ensemble"`` -- triton-inference-server/core
  ``src/ensemble_scheduler/ensemble_utils.cc`` (``ValidateTensorConsistency``):
  :func:`ensemble_errors`.
* ``backend: "python"`` (the embedded runtime's shims, ``model_repository/_shims/``): the
  shim hands every request tensor to onnxruntime, which rejects a fixed dim of another
  size at request time; so config and graph must agree on names, dtypes and rank, and on
  every dim that both fix: :func:`shim_errors`.

Every function returns a list of problems (empty = loads); :func:`check_repository` walks a
whole repository folder and :func:`require_loadable` raises :class:`UserError` with all of
them. Graph shapes are read as the backend reads them: onnxruntime reports a symbolic or
unknown dim as -1 (``GetDimensions``), so a named dynamic axis and an unnamed one are the
same wildcard here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from recstack.errors import UserError

log = logging.getLogger(__name__)

WILDCARD = -1
CONFIG = "config.pbtxt"

# onnxruntime's type strings -> the config.pbtxt data type the backend maps them to
# (onnxruntime_utils.cc, ConvertFromOnnxDataType).
ORT_TO_TRITON = {
    "tensor(float)": "TYPE_FP32",
    "tensor(double)": "TYPE_FP64",
    "tensor(float16)": "TYPE_FP16",
    "tensor(int64)": "TYPE_INT64",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int8)": "TYPE_INT8",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(bool)": "TYPE_BOOL",
    "tensor(string)": "TYPE_STRING",
}

# FIL parameters needed on every container version the docs name (docs/triton.md):
# before 25.09 `output_class` has no default (shared_state.h before commit e15438b:
# get_config_param<bool>("output_class")); from 25.09 `output_class`, when present, is
# read in place of `is_classifier` (with a deprecation warning), and `is_classifier` has
# no default when it is absent. Giving both with the same value loads on either side.
FIL_REQUIRED = ("model_type", "output_class", "is_classifier")


@dataclass(frozen=True)
class GraphTensor:
    """One input or output of an ONNX graph as the onnxruntime backend sees it."""

    name: str
    data_type: str  # config.pbtxt spelling, e.g. TYPE_FP32
    dims: tuple[int, ...]  # -1 for a symbolic or unknown dim


@dataclass(frozen=True)
class GraphSignature:
    inputs: dict[str, GraphTensor]
    outputs: dict[str, GraphTensor]


def _dims(shape: Sequence[object]) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else WILDCARD for d in shape)


def graph_signature(path: Path) -> GraphSignature:
    """Inputs and outputs of an ONNX file, read through an onnxruntime session (what the
    backend does) so that the names, types and dims are the runtime's, not the exporter's
    intent. Raises UserError when the file does not load."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # any load failure is an invalid artifact
        raise UserError(f"{path}: does not load in onnxruntime: {e}") from e

    def read(args: Iterable[object]) -> dict[str, GraphTensor]:
        out = {}
        for t in args:
            dtype = ORT_TO_TRITON.get(t.type, f"unsupported {t.type}")  # type: ignore[attr-defined]
            out[t.name] = GraphTensor(t.name, dtype, _dims(t.shape))  # type: ignore[attr-defined]
        return out

    return GraphSignature(read(session.get_inputs()), read(session.get_outputs()))


def data_type_name(value: int) -> str:
    return str(model_config_pb2.DataType.Name(value))


def _config_dims(tensor: model_config_pb2.ModelInput | model_config_pb2.ModelOutput) -> list[int]:
    # "If a reshape is provided ... then use that when validating that the model matches"
    # (onnxruntime.cc, ValidateInputs/ValidateOutputs).
    if tensor.HasField("reshape"):
        return list(tensor.reshape.shape)
    return list(tensor.dims)


def _shape(dims: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"


def compare_dims_supported(
    model: str,
    tensor: str,
    model_shape: Sequence[int],
    dims: Sequence[int],
    max_batch_size: int,
    compare_exact: bool,
) -> str | None:
    """onnxruntime_backend ``CompareDimsSupported`` (onnxruntime_utils.cc): with
    ``max_batch_size > 0`` the model's first dim must be -1 and the config's dims get a
    leading -1; then ranks must be equal and each model dim must equal the config dim --
    every dim when ``compare_exact`` (outputs), else only where the model dim is not -1
    (inputs: the *model's* -1 is the wildcard, a config -1 against a fixed model dim
    fails). Returns the backend's message, or None."""
    if max_batch_size > 0:
        if not model_shape or model_shape[0] != WILDCARD:
            return (
                f"model '{model}', tensor '{tensor}': for the model to support batching the "
                "shape should have at least 1 dimension and the first dimension must be -1; "
                f"but shape expected by the model is {_shape(model_shape)}"
            )
        full = [WILDCARD, *dims]
    else:
        full = list(dims)
    ok = len(model_shape) == len(full) and all(
        m == c for m, c in zip(model_shape, full, strict=False) if compare_exact or m != WILDCARD
    )
    if ok:
        return None
    batch = " (an initial batch dimension because max_batch_size > 0)" if max_batch_size else ""
    return (
        f"model '{model}', tensor '{tensor}': the model expects {len(model_shape)} dimensions "
        f"(shape {_shape(model_shape)}) but the model configuration specifies {len(full)} "
        f"dimensions{batch} (shape {_shape(full)})"
    )


def onnxruntime_backend_errors(
    config: model_config_pb2.ModelConfig, graph: GraphSignature
) -> list[str]:
    """Why the native onnxruntime backend would refuse ``config`` for this graph
    (onnxruntime.cc ``ValidateInputs``/``ValidateOutputs``): the input count must equal
    the config's (plus ``batch_input``); every config tensor must exist in the graph with
    the same data type; inputs compare dims with the model's -1 as wildcard, outputs
    exactly; a scalar model tensor takes config dims of 1 only."""
    name, mbs, errors = config.name, config.max_batch_size, []
    expected = len(config.input) + len(config.batch_input)
    if len(graph.inputs) != expected:
        errors.append(
            f"unable to load model '{name}', configuration expects {expected} inputs, "
            f"model provides {len(graph.inputs)} ({sorted(graph.inputs)})"
        )
    for kind, declared, actual, exact in (
        ("input", config.input, graph.inputs, False),
        ("output", config.output, graph.outputs, True),
    ):
        for tensor in declared:
            got = actual.get(tensor.name)
            if got is None:
                errors.append(
                    f"unable to load model '{name}': {kind} '{tensor.name}' of the "
                    f"configuration is not a model {kind} (model has {sorted(actual)})"
                )
                continue
            want_type = data_type_name(tensor.data_type)
            if got.data_type != want_type:
                errors.append(
                    f"unable to load model '{name}', configuration expects datatype "
                    f"{want_type} for {kind} '{tensor.name}', model provides {got.data_type}"
                )
            dims = _config_dims(tensor)
            if not got.dims:  # a scalar: only dims of 1 are allowed
                if any(d != 1 for d in dims):
                    errors.append(
                        f"unable to load model '{name}', scalar tensor '{tensor.name}' takes "
                        f"only 1 in the configuration, got {_shape(dims)}"
                    )
                continue
            problem = compare_dims_supported(name, tensor.name, got.dims, dims, mbs, exact)
            if problem:
                errors.append(problem)
    return errors


def _compatible(a: Sequence[int], b: Sequence[int]) -> bool:
    """Equal rank and equal dims where neither side is -1 (Triton's CompareDimsWithWildcard)."""
    return len(a) == len(b) and all(
        x == y for x, y in zip(a, b, strict=True) if WILDCARD not in (x, y)
    )


def shim_errors(config: model_config_pb2.ModelConfig, graph: GraphSignature) -> list[str]:
    """Why the embedded Python-backend shim would fail on this graph: it feeds exactly the
    config's inputs to ``session.run`` and asks for the config's outputs, so names and
    dtypes must match, ranks must match (``max_batch_size`` adds the batch dim), and dims
    fixed on both sides must be equal (onnxruntime rejects a request whose fixed dim
    differs; Triton rejects one that does not fit the config)."""
    name, errors = config.name, []
    batch = [WILDCARD] if config.max_batch_size > 0 else []
    if set(graph.inputs) != {t.name for t in config.input}:
        errors.append(
            f"{name}: config inputs {sorted(t.name for t in config.input)} != graph inputs "
            f"{sorted(graph.inputs)}"
        )
    for kind, declared, actual in (
        ("input", config.input, graph.inputs),
        ("output", config.output, graph.outputs),
    ):
        for tensor in declared:
            got = actual.get(tensor.name)
            if got is None:
                if kind == "output":
                    errors.append(f"{name}: output '{tensor.name}' is not in the graph")
                continue
            if got.data_type != data_type_name(tensor.data_type):
                errors.append(
                    f"{name}: {kind} '{tensor.name}' is {got.data_type} in the graph but "
                    f"{data_type_name(tensor.data_type)} in the config"
                )
            full = [*batch, *_config_dims(tensor)]
            if not _compatible(got.dims, full):
                errors.append(
                    f"{name}: {kind} '{tensor.name}' has shape {_shape(got.dims)} in the "
                    f"graph, the config allows {_shape(full)}"
                )
    return errors


def fil_errors(config: model_config_pb2.ModelConfig, checkpoint: Path) -> list[str]:
    """Why the FIL backend would refuse ``config`` or compute something other than what
    the parity gate checked: names ``input__0``/``output__0`` and TYPE_FP32 only, a
    batching config whose input dim is the number of features ("The dimensions ... do
    not include the batch dimension", docs/model_config.md), the parameters every named
    container needs (:data:`FIL_REQUIRED`), a regressor's output dim 1, a Treelite 4
    checkpoint (24.03+ read ">=4.0.0,<5.0.0", docs/model_support.md) and 32-bit
    parameters: FIL "exclusively uses 32-bit precision. 64-bit model parameters are
    rounded to 32-bit values", so a float64 checkpoint would not score as checked."""
    import treelite

    name, errors = config.name, []
    params = {k: v.string_value for k, v in config.parameters.items()}
    missing = [p for p in FIL_REQUIRED if p not in params]
    if missing:
        errors.append(f"{name}: FIL parameters {missing} missing")
    if params.get("model_type") != "treelite_checkpoint":
        errors.append(f"{name}: model_type {params.get('model_type')!r}, want treelite_checkpoint")
    if params.get("output_class", "false") != params.get("is_classifier", "false"):
        errors.append(f"{name}: output_class and is_classifier disagree")
    if config.max_batch_size <= 0:
        errors.append(f"{name}: FIL needs max_batch_size > 0 (rows are the batch)")
    io = [(t.name, data_type_name(t.data_type), list(t.dims)) for t in config.input]
    out = [(t.name, data_type_name(t.data_type), list(t.dims)) for t in config.output]
    try:
        model = treelite.Model.deserialize(str(checkpoint))
    except Exception as e:
        return [*errors, f"{name}: {checkpoint} is not a Treelite checkpoint: {e}"]
    want_in = [("input__0", "TYPE_FP32", [model.num_feature])]
    if io != want_in:
        errors.append(f"{name}: inputs {io}, FIL needs {want_in} for this checkpoint")
    classifier = params.get("is_classifier") == "true"
    if not classifier and out != [("output__0", "TYPE_FP32", [1])]:
        errors.append(f"{name}: outputs {out}, a FIL regressor/ranker returns output__0 FP32 [1]")
    header = checkpoint_types(model)
    if header != ("float32", "float32"):
        errors.append(
            f"{name}: checkpoint thresholds/leaves are {header}; FIL rounds 64-bit parameters "
            "to 32-bit, so export the float32 checkpoint the parity gate checks"
        )
    return errors


def checkpoint_types(model: object) -> tuple[str, str]:
    """(threshold_type, leaf_output_type) of a Treelite model."""
    return str(model.input_type), str(model.output_type)  # type: ignore[attr-defined]


def served_versions(config: model_config_pb2.ModelConfig, folder: Path) -> list[int]:
    """Versions Triton would serve from ``folder`` under the config's version_policy
    (model_config.proto: default ``latest { num_versions: 1 }``)."""
    present = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "specific":
        return sorted(v for v in config.version_policy.specific.versions if v in present)
    if policy == "all":
        return present
    n = config.version_policy.latest.num_versions if policy == "latest" else 1
    return present[-max(n, 1) :]


def ensemble_errors(
    ensemble: model_config_pb2.ModelConfig,
    configs: Mapping[str, model_config_pb2.ModelConfig],
    served: Mapping[str, Sequence[int]],
) -> list[str]:
    """An ensemble against its steps' configs (core ensemble_utils.cc): every step model
    exists and serves the version the step names; mapped tensors exist on the step; a
    tensor's data type is the same everywhere and its dims agree with -1 as a wildcard
    on either side, or do so with the batch dim added (``ValidateTensorConsistency``).
    A step on ``model_version: -1`` whose model serves several versions resolves to the
    latest, so it is an error here: a release's traffic would run another release's
    model."""
    name, errors = ensemble.name, []
    # tensor -> (data type, dims, full dims, where)
    seen: dict[str, tuple[str, list[int], list[int], str]] = {}

    def note(tensor: str, dtype: str, dims: list[int], mbs: int, where: str) -> None:
        full = [WILDCARD, *dims] if mbs > 0 else dims
        if tensor not in seen:
            seen[tensor] = (dtype, dims, full, where)
            return
        dtype0, dims0, full0, where0 = seen[tensor]
        if dtype != dtype0:
            errors.append(
                f"ensemble {name}: tensor '{tensor}' is {dtype} in {where}, {dtype0} in {where0}"
            )
        if not _compatible(dims, dims0) and not _compatible(full, full0):
            errors.append(
                f"ensemble {name}: tensor '{tensor}' inconsistent shape: {_shape(full)} in "
                f"{where}, {_shape(full0)} in {where0}"
            )

    for t in ensemble.input:
        note(t.name, data_type_name(t.data_type), list(t.dims), ensemble.max_batch_size, name)
    for step in ensemble.ensemble_scheduling.step:
        model = step.model_name
        config = configs.get(model)
        if config is None:
            errors.append(f"ensemble {name}: step model {model!r} is not in the repository")
            continue
        versions = list(served.get(model, []))
        if step.model_version == -1 and len(versions) > 1:
            errors.append(
                f"ensemble {name}: step {model} uses model_version -1 while versions "
                f"{versions} are served; pin the release's version"
            )
        elif step.model_version != -1 and step.model_version not in versions:
            errors.append(
                f"ensemble {name}: step {model} version {step.model_version} is not served "
                f"(served: {versions})"
            )
        inputs = {t.name: t for t in config.input}
        outputs = {t.name: t for t in config.output}
        unmapped = sorted(set(inputs) - set(step.input_map) - {
            t.name for t in config.input if t.optional
        })  # fmt: skip
        if unmapped:
            errors.append(f"ensemble {name}: step {model} leaves inputs {unmapped} unmapped")
        for kind, mapping, tensors in (
            ("input", step.input_map, inputs),
            ("output", step.output_map, outputs),
        ):
            for key, tensor in mapping.items():
                t = tensors.get(key)
                if t is None:
                    errors.append(f"ensemble {name}: step {model} has no {kind} '{key}'")
                    continue
                where = f"{model} {kind} '{key}'"
                note(tensor, data_type_name(t.data_type), list(t.dims), config.max_batch_size,
                     where)  # fmt: skip
    for t in ensemble.output:
        if t.name not in seen:
            errors.append(f"ensemble {name}: output '{t.name}' is produced by no step")
        else:
            note(t.name, data_type_name(t.data_type), list(t.dims), ensemble.max_batch_size, name)
    return errors


def fixed_widths(
    config: model_config_pb2.ModelConfig, graph: GraphSignature
) -> dict[str, list[int]]:
    """Tensor -> config dims (batch dim excluded) with each -1 of the config replaced by
    the size the graph fixes there; only tensors that change, and only where the ranks
    agree (a rank mismatch is left for the backend rule to report)."""
    skip = 1 if config.max_batch_size > 0 else 0
    out = {}
    for tensor in (*config.input, *config.output):
        got = graph.inputs.get(tensor.name) or graph.outputs.get(tensor.name)
        dims = list(tensor.dims)
        if got is None or len(got.dims) != len(dims) + skip:
            continue
        filled = [g if d == WILDCARD else d for d, g in zip(dims, got.dims[skip:], strict=True)]
        if filled != dims:
            out[tensor.name] = filled
    return out


def load_config_file(path: Path) -> model_config_pb2.ModelConfig:
    try:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as e:
        raise UserError(f"{path}: {e}") from e


def model_errors(
    config: model_config_pb2.ModelConfig, version_dir: Path
) -> list[str]:  # fmt: skip
    """One version folder against its model's config, by the rule of the backend the
    config names (see the module doc)."""
    where = f"{config.name}/{version_dir.name}"
    params = {k: v.string_value for k, v in config.parameters.items()}
    if config.platform == "onnxruntime_onnx":
        path = version_dir / (config.default_model_filename or "model.onnx")
        if not path.is_file():
            return [f"{where}: no {path.name}"]
        return [f"{where}: {e}" for e in onnxruntime_backend_errors(config, graph_signature(path))]
    if config.backend == "fil":
        path = version_dir / (config.default_model_filename or "checkpoint.tl")
        if not path.is_file():
            return [f"{where}: no {path.name}"]
        return [f"{where}: {e}" for e in fil_errors(config, path)]
    if config.backend == "python" and "artifact" in params and "compiled_artifact" not in params:
        path = version_dir / params["artifact"]
        if not path.is_file():
            return [f"{where}: no {path.name}"]
        return [f"{where}: {e}" for e in shim_errors(config, graph_signature(path))]
    return []  # the tl2cgen shim: checked by exporters.model_repo at publish time


def check_repository(
    folder: Path, versions: Mapping[str, Sequence[int]] | None = None
) -> list[str]:
    """Every model of a repository folder (configs and the versions they serve) against
    the rules of the backends its configs name, and every ensemble against its steps.
    ``versions`` replaces the configs' version policies for the models it names (the
    embedded runtime pins versions when it loads them). Returns the problems; empty
    means every backend would load it."""
    folder = Path(folder)
    if not folder.is_dir():
        return [f"{folder}: no such folder"]
    paths = sorted(folder.glob(f"*/{CONFIG}"))
    if not paths:
        # Nothing to load is not "loadable": Triton would start and serve no model.
        return [f"{folder}: no model folder with a {CONFIG} (prepare it: `recstack repo init`)"]
    configs: dict[str, model_config_pb2.ModelConfig] = {}
    served: dict[str, list[int]] = {}
    errors: list[str] = []
    for path in paths:
        config = load_config_file(path)
        model = path.parent.name
        if config.name and config.name != model:
            errors.append(f"{path}: name {config.name!r} is not its folder's {model!r}")
        configs[model] = config
        served[model] = (
            sorted(versions[model])
            if versions is not None and model in versions
            else served_versions(config, path.parent)
        )
        policy = config.version_policy
        if policy.WhichOneof("policy_choice") == "specific":
            absent = sorted(set(policy.specific.versions) - set(served[model]))
            if absent:
                errors.append(f"{model}: version_policy names versions {absent} with no folder")
        if not served[model]:
            errors.append(f"{model}: no version to serve in {path.parent}")
        for version in served[model]:
            errors.extend(model_errors(config, path.parent / str(version)))
    for config in configs.values():
        if config.platform == "ensemble":
            errors.extend(ensemble_errors(config, configs, served))
    return errors


def require_loadable(folder: Path) -> None:
    """:func:`check_repository`, raising UserError with every problem found."""
    errors = check_repository(folder)
    if errors:
        raise UserError(
            f"{folder}: {len(errors)} problem(s) the Triton backends would refuse:\n  "
            + "\n  ".join(errors)
        )
    log.info("%s: every model and ensemble passes the backends' load checks", folder)

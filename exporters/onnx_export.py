"""Export both towers to ONNX and prove parity with PyTorch (pipeline step ``onnx_export``).

Tensor names, dtypes and dims come from ``model_repository/{user,item}_tower/config.pbtxt``;
the batch axis is dynamic. Parity is checked on real rows (users as of the end of the train
split, the catalog as of the data end) and on random rows (unknown ids and codes, negative
ids, PAD-only histories), at batch 1 and a big batch. Any difference above ``TOLERANCE``
raises :class:`ParityError` and nothing is written; on success the two ``.onnx`` files and
``tower_parity.json`` replace the previous ones.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import torch
from torch import nn

from exporters.model_config import load_config
from exporters.raw_tables import read_meta, read_raw
from exporters.split import load_split
from exporters.tower_inputs import item_inputs, users_at
from exporters.two_tower import CHECKPOINT, TwoTower, load
from recstack.settings import Settings

log = logging.getLogger(__name__)

TOLERANCE = 1e-4
OPSET = 17  # legacy exporter only
DYNAMO = False
BIG_BATCH = 512
TOWERS = ("user_tower", "item_tower")
ARTIFACTS = {"user_tower": "user_tower.onnx", "item_tower": "item_tower.onnx"}
PARITY_FILE = "tower_parity.json"

_NP_TYPES = {"TYPE_INT64": np.int64, "TYPE_INT32": np.int32, "TYPE_FP32": np.float32}


class ParityError(RuntimeError):
    """An exported model disagrees with the model it was exported from."""

    def __init__(self, path: Path | str, case: str, max_abs_diff: float, tol: float) -> None:
        self.path, self.case, self.max_abs_diff, self.tol = path, case, max_abs_diff, tol
        super().__init__(
            f"{path}: ONNX output differs from PyTorch on {case}: "
            f"max abs diff {max_abs_diff:.3g} > {tol:.0e}"
        )


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a tower as config.pbtxt declares it (without the batch)."""

    name: str
    dtype: type
    dims: tuple[int, ...]


def tensor_specs(model: str, repository: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of ``model`` from its config.pbtxt, in config order."""
    from tritonclient.grpc import model_config_pb2

    cfg = load_config(model, repository)

    def spec(t: Any) -> TensorSpec:
        type_name = model_config_pb2.DataType.Name(t.data_type)
        if type_name not in _NP_TYPES:
            raise ValueError(f"{model}: tensor {t.name} has unsupported type {type_name}")
        return TensorSpec(t.name, _NP_TYPES[type_name], tuple(int(d) for d in t.dims))

    return [spec(t) for t in cfg.input], [spec(t) for t in cfg.output]


def tower_module(model: TwoTower, tower: str) -> nn.Module:
    """The PyTorch module exported as ``tower``."""
    return {"user_tower": model.user, "item_tower": model.item}[tower]


def _check_signature(module: nn.Module, inputs: list[TensorSpec], tower: str) -> None:
    """torch.onnx.export binds inputs by position: forward's parameters must be the
    config's inputs in config order."""
    params = list(inspect.signature(module.forward).parameters)
    names = [s.name for s in inputs]
    if params != names:
        raise ValueError(f"{tower}: forward{tuple(params)} != config.pbtxt inputs {names}")


def export_onnx(
    module: nn.Module, tower: str, repository: Path, path: Path, dynamo: bool = DYNAMO
) -> None:
    """Export one tower with config.pbtxt's names and a dynamic batch axis.

    Default: the legacy TorchScript exporter (``dynamo=False``): fast, quiet, opset 17.
    The torch.export path (``dynamo=True``, needs onnxscript) also passed the parity
    checks on these towers, at ~5x the export time and a newer opset."""
    inputs, outputs = tensor_specs(tower, repository)
    _check_signature(module, inputs, tower)
    example = tuple(
        torch.zeros((2, *s.dims), dtype=torch.from_numpy(np.zeros(0, s.dtype)).dtype)
        for s in inputs
    )
    in_names, out_names = [s.name for s in inputs], [s.name for s in outputs]
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy path's notice
        if dynamo:
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=in_names,
                output_names=out_names,
                dynamic_shapes={n: {0: batch} for n in in_names},
                dynamo=True,
                external_data=False,
            )
        else:
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=in_names,
                output_names=out_names,
                dynamic_axes={n: {0: "batch"} for n in in_names + out_names},
                opset_version=OPSET,
                dynamo=False,
            )
    declare_config_dims(path, tower, repository)


def declare_config_dims(path: Path, model: str, repository: Path) -> list[str]:
    """Write the sizes that ``model``'s config.pbtxt fixes into the graph's output shapes
    where the exporter left a symbolic dim (``F.normalize`` divides by an ``Expand`` whose
    shape is computed at run time, so the legacy exporter names the width
    ``Div_..._dim_1``). onnxruntime reports such a dim as -1, and NVIDIA's onnxruntime
    backend compares outputs exactly: ``[-1,-1]`` against the config's ``[-1,64]`` fails
    the load ("the model expects 2 dimensions (shape [-1,-1]) but the model configuration
    specifies ... [-1,64]", onnxruntime_backend ``CompareDimsSupported``). The batch axis
    stays dynamic. The parity checks that follow compare the real output shapes with
    PyTorch's. Returns the tensors changed."""
    import onnx

    config = load_config(model, repository)
    skip = 1 if config.max_batch_size > 0 else 0
    fixed = {t.name: list(t.dims) for t in config.output}
    graph = onnx.load(str(path))
    changed = []
    for value in graph.graph.output:
        dims = fixed.get(value.name)
        shape = value.type.tensor_type.shape.dim
        if dims is None or len(shape) != len(dims) + skip:
            continue  # a rank mismatch is the repository check's to report
        for dim, size in zip(list(shape)[skip:], dims, strict=True):
            if size >= 0 and not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_value = size
                changed.append(value.name)
    if changed:
        onnx.checker.check_model(graph)
        onnx.save(graph, str(path))
    return sorted(set(changed))


def session(path: Path | str) -> ort.InferenceSession:
    """A CPU onnxruntime session (deterministic, what the embedded Triton shim runs)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(
    model: ort.InferenceSession | Path | str,
    inputs: dict[str, np.ndarray],
    batch_size: int = 8192,
) -> np.ndarray:
    """Run a one-output tower over ``inputs`` in batches; returns ``[n, dim]`` float32."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model)
    names = [i.name for i in sess.get_inputs()]
    missing = set(names) - set(inputs)
    if missing:
        raise ValueError(f"missing tower inputs: {sorted(missing)}")
    n = len(next(iter(inputs.values())))
    if n == 0:
        dim = sess.get_outputs()[0].shape[-1]
        return np.zeros((0, int(dim) if isinstance(dim, int) else 0), dtype=np.float32)
    outs = []
    for s in range(0, n, batch_size):
        feed = {k: np.ascontiguousarray(inputs[k][s : s + batch_size]) for k in names}
        outs.append(sess.run(None, feed)[0])
    return np.concatenate(outs).astype(np.float32, copy=False)


@torch.no_grad()
def run_torch(module: nn.Module, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The PyTorch tower on the same inputs (CPU, eval mode)."""
    module.eval()
    params = list(inspect.signature(module.forward).parameters)
    out = module(*(torch.from_numpy(np.ascontiguousarray(inputs[p])) for p in params))
    return out.numpy()


def check_parity(
    onnx_path: Path | str,
    torch_model: nn.Module,
    inputs: dict[str, np.ndarray],
    tol: float | None = None,
    case: str = "inputs",
) -> float:
    """Max abs difference between the ONNX file and ``torch_model`` on ``inputs``;
    raises :class:`ParityError` above ``tol`` (default :data:`TOLERANCE`) or on NaN."""
    tol = TOLERANCE if tol is None else tol
    got = run_onnx(onnx_path, inputs)
    want = run_torch(torch_model, inputs)
    if got.shape != want.shape:
        raise ParityError(onnx_path, f"{case} (shape {got.shape} vs {want.shape})", np.inf, tol)
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    if not diff <= tol:  # also catches NaN
        raise ParityError(onnx_path, case, diff, tol)
    return diff


def random_rows(
    tower: str, model: TwoTower, repository: Path, n: int, seed: int
) -> dict[str, np.ndarray]:
    """Random inputs that reach every branch: ids far outside the training range (and
    negative), unknown codes, PAD-only and full histories, zero and huge prices/ages."""
    rng = np.random.default_rng(seed)
    inputs, _ = tensor_specs(tower, repository)
    v = model.vocab
    code_range = {
        "age_bucket": v.age_bucket,
        "country": v.country,
        "category": v.category,
        "brand": v.brand,
    }
    out: dict[str, np.ndarray] = {}
    for s in inputs:
        shape = (n, *s.dims)
        if s.name in code_range:
            out[s.name] = rng.integers(-2, code_range[s.name] + 3, shape, dtype=np.int64)
        elif s.dtype is np.float32:
            x = rng.lognormal(2.0, 2.0, shape)
            x[rng.random(shape) < 0.1] = 0.0
            out[s.name] = x.astype(np.float32)
        else:  # ids and id lists
            ids = rng.integers(-1000, 4 * max(v.item_buckets, v.user_buckets), shape)
            ids[rng.random(shape) < 0.05] = rng.integers(0, 1 << 40)
            if s.name == "recent_items":
                # Histories are PAD after their length (0 = empty).
                lengths = rng.integers(0, s.dims[0] + 1, n)
                ids[np.arange(s.dims[0])[None, :] >= lengths[:, None]] = -1
            out[s.name] = ids.astype(s.dtype)
    return out


def real_rows(settings: Settings, n: int, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Real rows: users as of the end of the train split, catalog items as of the data end."""
    tables = read_raw(settings)
    rng = np.random.default_rng(seed)
    split = load_split(settings)
    users = tables.interactions["user_id"].unique()
    users = rng.choice(users, min(n, len(users)), replace=False)
    items = rng.choice(tables.items["item_id"].to_numpy(), min(n, len(tables.items)), replace=False)
    return {
        "user_tower": users_at(tables, users, pd.Timestamp(split.train_end)),
        "item_tower": item_inputs(tables.items, items, reference_time(settings)),
    }


def reference_time(settings: Settings) -> pd.Timestamp:
    """The "now" of the current data (``meta.json`` end): item ages for the index."""
    return pd.Timestamp(str(read_meta(settings)["end"]))


def _rows(inputs: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in inputs.items()}


def parity_report(
    settings: Settings, model: TwoTower, folder: Path, big_batch: int = BIG_BATCH
) -> dict[str, Any]:
    """Check both exported towers in ``folder``; raise :class:`ParityError` on a mismatch."""
    real = real_rows(settings, big_batch, settings.seed)
    report: dict[str, Any] = {
        "tolerance": TOLERANCE,
        "exporter": "dynamo" if DYNAMO else f"torchscript (opset {OPSET})",
    }
    for k, tower in enumerate(TOWERS):
        path = folder / ARTIFACTS[tower]
        module = tower_module(model, tower)
        rnd = random_rows(tower, model, settings.model_repository, big_batch, settings.seed + k)
        cases = {}
        for label, inputs in (("real", real[tower]), ("random", rnd)):
            n = len(next(iter(inputs.values())))
            for b in sorted({1, min(big_batch, n)}):
                case = f"{label}_batch{b}"
                cases[case] = check_parity(path, module, _rows(inputs, b), case=f"{tower} {case}")
        report[tower] = {"max_abs_diff": max(cases.values()), "cases": cases}
        log.info("%s parity: max abs diff %.2e", tower, report[tower]["max_abs_diff"])
    return report


def export_towers(settings: Settings, work: Path | None = None) -> None:
    """Pipeline step ``onnx_export``: ``work/{user,item}_tower.onnx`` + ``tower_parity.json``.

    Exports into a temporary folder, checks parity there, and only then moves the files
    into ``work/`` (parity json last), so a failed check leaves the previous artifacts.
    ``work`` defaults to ``settings.work_dir`` (the refit step passes its own folder)."""
    t0 = time.perf_counter()
    work = work or settings.work_dir
    model, meta = load(work / CHECKPOINT)
    tmp = Path(tempfile.mkdtemp(prefix=".onnx-export-", dir=work))
    try:
        for tower in TOWERS:
            export_onnx(
                tower_module(model, tower), tower, settings.model_repository, tmp / ARTIFACTS[tower]
            )
        report = parity_report(settings, model, tmp)
        report["seconds"] = round(time.perf_counter() - t0, 3)
        report["checkpoint_metrics"] = meta.get("metrics")
        (tmp / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
        for name in (*ARTIFACTS.values(), PARITY_FILE):
            os.replace(tmp / name, work / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("exported towers to %s in %.1f s", work, time.perf_counter() - t0)

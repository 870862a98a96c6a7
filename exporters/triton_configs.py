"""Two Triton runtimes from one source of truth, the committed ``config.pbtxt`` files:

* **embedded** -- the committed configs themselves: Python-backend shims that run the
  artifacts with onnxruntime and the tl2cgen library (``model_repository/_shims/``). When
  CUDA is present, the ONNX models' instance groups become ``KIND_GPU`` (the shim then
  picks onnxruntime's CUDA provider if the Triton env has onnxruntime-gpu).
* **production** -- derived from them for the NVIDIA Triton container, for one or more
  releases (default: the newest): ``platform: "onnxruntime_onnx"`` for the ONNX models,
  ``backend: "fil"`` with ``model_type: treelite_checkpoint`` for the ranker, ``KIND_GPU``
  instance groups unless the device is ``cpu``; every model gets ``version_policy:
  { specific { versions: [...] } }`` with the releases' versions (Triton's default serves
  only the latest version), and the ensemble's steps name the releases' versions instead
  of -1 ("the latest version is used").

Tensor names and dtypes are never rewritten. Dims are, only where the committed config
leaves them open and the published artifacts fix them, because the native backends do not
accept a wildcard there: onnxruntime_backend requires every fixed model dim to equal the
config's (``CompareDimsSupported``, see ``exporters/repo_check.py``), so a ``-1`` in the
committed config becomes the graph's fixed width (e.g. ``user_features [1, 8]``); FIL needs
the ranker's input width, which only the checkpoint knows. Every served version must agree
on those widths (one config serves all versions of a model), and the written repository is
checked with :func:`exporters.repo_check.require_loadable` before the command succeeds."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from exporters.model_config import load_config
from exporters.model_repo import SHIMS_DIR, list_versions, require_committed
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

Runtime = Literal["embedded", "production"]
MODELS = ("user_tower", "item_tower", "rank_features", "ranker", "rank")
GPU = model_config_pb2.ModelInstanceGroup.Kind.KIND_GPU
CPU = model_config_pb2.ModelInstanceGroup.Kind.KIND_CPU

# FIL parameters (fil_backend docs/model_config.md, src/shared_state.h). A lambdarank
# model is not a classifier: FIL then returns the raw sum of leaf values, LightGBM's raw
# score. Containers before 25.09 read `output_class` and have no default for it; 25.09+
# read `output_class` in place of `is_classifier` when present (warning that it is
# deprecated) and otherwise require `is_classifier`. Both, equal, load on 24.03-26.06
# (docs/triton.md). `layout` is read from 25.09 on and ignored before.
FIL_PARAMETERS = {
    "model_type": "treelite_checkpoint",
    "output_class": "false",
    "is_classifier": "false",
    "layout": "depth_first",
}


def cuda_present() -> bool:
    """An NVIDIA driver is loaded (cheap check, no CUDA import)."""
    return Path("/proc/driver/nvidia/version").exists() or Path("/dev/nvidia0").exists()


def use_gpu(settings: Settings, runtime: Runtime) -> bool:
    """Embedded: CUDA when configured or (auto) detected here. Production targets GPU
    nodes, so only ``device=cpu`` keeps it on the CPU."""
    if settings.device == "cpu":
        return False
    if settings.device == "cuda" or runtime == "production":
        return True
    return cuda_present()


def release_versions(settings: Settings, releases: Sequence[int] | None) -> dict[str, list[int]]:
    """Model -> the versions the ``releases`` pin (default: the releases the release state
    serves, live and A/B arms), from the release manifests (``exporters.release``)."""
    from exporters import release
    from exporters.release_state import load_state

    ids = list(releases) if releases else load_state(settings).serving
    if not ids:
        raise UserError(
            f"no release in {settings.releases_dir}: a production repository serves the "
            "versions of releases; publish one first (recstack train)"
        )
    versions = release.union_versions(settings, ids)
    missing = [m for m in MODELS if m not in versions]
    if missing:
        raise UserError(f"release(s) {ids} name no version of {missing}")
    return versions


def _artifact(settings: Settings, model: str, version: int) -> Path:
    config = load_config(model, settings.model_repository)
    return (
        settings.model_repository / model / str(version)
        / config.parameters["artifact"].string_value
    )  # fmt: skip


def ranker_num_features(settings: Settings, versions: Sequence[int] | None = None) -> int:
    """Input width of the ranker ``versions`` (default: the newest published one), from
    their Treelite checkpoints; they must agree (one FIL config serves them all)."""
    import treelite

    versions = list(versions) if versions else list_versions(settings, "ranker")[-1:]
    if not versions:
        raise UserError(
            "the production ranker config needs the feature count of a published ranker "
            "version; publish one first (recstack train) or pass num_features"
        )
    widths = {
        v: int(treelite.Model.deserialize(str(_artifact(settings, "ranker", v))).num_feature)
        for v in versions
    }
    if len(set(widths.values())) > 1:
        raise UserError(
            f"ranker versions take different feature counts {widths}; one FIL config serves "
            "all versions of a model: serve them from separate production repositories"
        )
    return next(iter(widths.values()))


def graph_widths(settings: Settings, model: str, versions: Sequence[int]) -> dict[str, list[int]]:
    """Tensor -> dims (without the batch dim) for the inputs/outputs of ``model`` whose
    committed config says -1 where the versions' ONNX graphs fix a size
    (:func:`exporters.repo_check.fixed_widths`). The versions must agree."""
    from exporters.repo_check import fixed_widths, graph_signature

    config = load_config(model, settings.model_repository)
    per_version = {
        v: fixed_widths(config, graph_signature(_artifact(settings, model, v))) for v in versions
    }
    if len({repr(sorted(w.items())) for w in per_version.values()}) > 1:
        raise UserError(
            f"{model}: versions fix different tensor widths {per_version}; one config serves "
            "all versions of a model: serve them from separate production repositories"
        )
    return next(iter(per_version.values()), {})


def pin_ensemble(
    config: model_config_pb2.ModelConfig, versions: Mapping[str, Sequence[int]]
) -> model_config_pb2.ModelConfig:
    """The ensemble with each step on the one version its model serves. A Triton config
    belongs to the model, not to a version, so the steps of every version of the ensemble
    share it: releases that use different versions of a step's model cannot share one
    repository's ensemble."""
    out = model_config_pb2.ModelConfig()
    out.CopyFrom(config)
    for step in out.ensemble_scheduling.step:
        step_versions = list(versions.get(step.model_name, []))
        if len(step_versions) != 1:
            raise UserError(
                f"{config.name}: step {step.model_name} would serve versions {step_versions}, "
                "but an ensemble config pins one version per step for all its versions; "
                "generate one production repository per release (one Triton deployment each)"
            )
        step.model_version = step_versions[0]
    return out


def production_config(
    config: model_config_pb2.ModelConfig,
    *,
    gpu: bool,
    num_features: int | None,
    versions: Sequence[int] = (),
    widths: Mapping[str, Sequence[int]] | None = None,
) -> model_config_pb2.ModelConfig:
    """The native-backend config derived from an embedded one, serving ``versions``
    (``version_policy: specific``) with the ``widths`` of :func:`graph_widths`."""
    out = model_config_pb2.ModelConfig()
    out.CopyFrom(config)
    if versions:
        out.version_policy.specific.versions[:] = sorted(versions)
    if config.platform == "ensemble":
        return out
    params = {k: v.string_value for k, v in config.parameters.items()}
    out.ClearField("backend")
    out.ClearField("parameters")
    kind = GPU if gpu else CPU
    for group in out.instance_group:
        group.kind = kind
    if "compiled_artifact" in params:  # the ranker: FIL on the Treelite checkpoint
        out.backend = "fil"
        out.default_model_filename = params["artifact"]
        for key, value in FIL_PARAMETERS.items():
            out.parameters[key].string_value = value
        if num_features is None:
            raise UserError("the FIL ranker config needs num_features")
        (tensor,) = out.input
        del tensor.dims[:]
        tensor.dims.append(num_features)
    else:
        out.platform = "onnxruntime_onnx"
        out.default_model_filename = params.get("artifact", "model.onnx")
        for tensor in (*out.input, *out.output):
            if tensor.name in (widths or {}):
                tensor.dims[:] = list((widths or {})[tensor.name])
    return out


def _header(model: str, runtime: str, releases: Sequence[int] = ()) -> str:
    served = f" for release(s) {', '.join(map(str, releases))}" if releases else ""
    return (
        f"# Generated by `recstack repo configs --runtime {runtime}`{served} from the\n"
        f"# committed model_repository/{model}/config.pbtxt (the source of truth); do not edit.\n"
    )


def _copy_versions(
    settings: Settings, model: str, out: Path, only: str | None, versions: Sequence[int]
) -> None:
    """Copy (hard-link when possible) the ``versions`` folders into ``out``; with
    ``only``, just that file (a native backend needs its artifact, not the shim)."""
    for version in versions:
        source = settings.model_repository / model / str(version)
        target = out / model / str(version)
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for f in source.iterdir():
            if not f.is_file() or (only is not None and f.name != only):
                continue
            try:
                os.link(f, target / f.name)
            except OSError:
                shutil.copy2(f, target / f.name)


def write_configs(
    settings: Settings,
    runtime: Runtime,
    out: Path | None = None,
    *,
    gpu: bool | None = None,
    num_features: int | None = None,
    releases: Sequence[int] | None = None,
) -> list[Path]:
    """Write the ``runtime``'s config.pbtxt files into ``out`` (default: the repository
    itself, embedded only). Into another folder, the versions served are copied too, so
    ``out`` is a complete model repository: every published version for the embedded
    runtime, the ``releases``' versions (default: the served releases) for production,
    which is then checked by the backends' rules (``exporters.repo_check``) and raises
    UserError listing every problem. Returns the configs written."""
    from exporters.repo_check import require_loadable

    repo = settings.model_repository
    out = (out or repo).resolve()
    in_place = out == repo.resolve()
    if in_place and runtime == "production":
        raise UserError(
            "production configs cannot replace the committed embedded ones; pass --out DIR"
        )
    # Both runtimes derive from the committed configs; the embedded one copies the shims.
    require_committed(repo, shims=runtime == "embedded")
    gpu = use_gpu(settings, runtime) if gpu is None else gpu
    if runtime == "production":
        served = release_versions(settings, releases)
        if num_features is None:
            num_features = ranker_num_features(settings, served["ranker"])
    else:
        served = {m: list_versions(settings, m) for m in MODELS}
    written = []
    for model in MODELS:
        config = load_config(model, repo)
        target = out / model / "config.pbtxt"
        target.parent.mkdir(parents=True, exist_ok=True)
        only = None
        if runtime == "embedded":
            text = (repo / model / "config.pbtxt").read_text()
            is_onnx = config.backend == "python" and "compiled_artifact" not in config.parameters
            if is_onnx:
                # Text substitution keeps the committed file's comments.
                text = text.replace("KIND_GPU", "KIND_CPU")
                text = text.replace("KIND_CPU", "KIND_GPU") if gpu else text
            text_format.Parse(text, model_config_pb2.ModelConfig())  # still valid
        else:
            onnx = config.platform != "ensemble" and "compiled_artifact" not in config.parameters
            derived = production_config(
                pin_ensemble(config, served) if config.platform == "ensemble" else config,
                gpu=gpu,
                num_features=num_features,
                versions=served[model],
                widths=graph_widths(settings, model, served[model]) if onnx else None,
            )
            only = derived.default_model_filename or "-"  # ensemble: an empty folder
            text = _header(model, runtime, releases or ()) + text_format.MessageToString(derived)
        if not (target.exists() and target.read_text() == text):
            target.write_text(text)
        written.append(target)
        if not in_place:
            _copy_versions(settings, model, out, only, served[model])
    if runtime == "embedded" and not in_place:
        shutil.copytree(repo / SHIMS_DIR, out / SHIMS_DIR, dirs_exist_ok=True)
    if runtime == "production":
        require_loadable(out)
    log.info("wrote %s configs (%s) into %s", runtime, "GPU" if gpu else "CPU", out)
    return written


def cli(args: argparse.Namespace) -> int:
    """``recstack repo configs --runtime embedded|production [--out DIR] [--release ID]``."""
    settings = get_settings()
    out = Path(args.out) if args.out else None
    releases = [int(r) for r in getattr(args, "release", None) or []]
    written = write_configs(settings, args.runtime, out, releases=releases or None)
    for path in written:
        print(path)
    return 0


def cli_check(args: argparse.Namespace) -> int:
    """``recstack repo check [DIR]``: check a repository folder (default: the model
    repository, as each release loads it) by the backends' rules; exit 1 on problems."""
    from exporters import release
    from exporters.repo_check import check_repository

    settings = get_settings()
    if args.dir:
        errors = check_repository(Path(args.dir))
        folder = Path(args.dir)
    else:
        # The embedded runtime loads one release's versions at a time (pinned through the
        # load API): check the repository as each release loads it.
        folder = settings.model_repository
        ids = release.release_ids(settings)
        errors = []
        releases: list[dict[str, int] | None] = [release.model_versions(settings, r) for r in ids]
        for versions in releases or [None]:
            pinned = {m: [v] for m, v in versions.items()} if versions else None
            errors += [e for e in check_repository(folder, pinned) if e not in errors]
    for line in errors:
        print(line)
    print(f"{folder}: {f'{len(errors)} problem(s)' if errors else 'loadable'}")
    return 1 if errors else 0

"""Publish model versions into the Triton model repository without ever exposing a
half-written one: copy the artifacts (and, for the embedded runtime, the Python-backend
shim) into a staging folder outside the repository, validate them against the model's
committed ``config.pbtxt``, then ``os.rename`` the folder to ``<repo>/<model>/<version>/``.
A failed validation leaves the repository untouched.

Shims live once, in ``<repo>/_shims/``. Triton's Python backend loads
``<model>/<version>/<default_model_filename>``, so each version folder gets a copy of the
shim that its config's ``default_model_filename`` names (an ensemble has none). The
ranker's shim is not called ``model.py`` because Python would import ``model.so`` (the
compiled ranker) in its place."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from exporters.model_config import load_config
from recstack.errors import UserError
from recstack.settings import PROJECT_ROOT, Settings, get_settings

log = logging.getLogger(__name__)

SHIMS_DIR = "_shims"
COMMITTED_REPOSITORY = PROJECT_ROOT / "model_repository"
# The command that copies the committed configs and shims into a repository of one's own.
INIT_COMMAND = "recstack repo init"


def copy_committed_repository(dest: Path) -> Path:
    """A model repository of its own at ``dest`` (a test, a benchmark workspace): the
    committed configs and shims without version folders, which its runs then write.
    Left as it is when ``dest`` exists."""
    if not dest.exists():
        shutil.copytree(
            COMMITTED_REPOSITORY,
            dest,
            ignore=shutil.ignore_patterns("[0-9]*", "__pycache__"),
        )
    return dest


def committed_entries() -> list[str]:
    """What a model repository must hold before training publishes into it: each committed
    model's ``<model>/config.pbtxt`` and each shim ``_shims/<file>``, as relative paths
    (read from the committed repository, the one source of both)."""
    configs = sorted(
        p.relative_to(COMMITTED_REPOSITORY).as_posix()
        for p in COMMITTED_REPOSITORY.glob("*/config.pbtxt")
    )
    shims = sorted(
        p.relative_to(COMMITTED_REPOSITORY).as_posix()
        for p in (COMMITTED_REPOSITORY / SHIMS_DIR).glob("*.py")
    )
    return [*configs, *shims]


def missing_entries(repository: Path) -> list[str]:
    """The committed configs and shims (``committed_entries``) that ``repository`` lacks."""
    return [e for e in committed_entries() if not (repository / e).is_file()]


def require_committed(repository: Path, *, shims: bool = True) -> None:
    """Raise UserError naming the fix when ``repository`` lacks a committed config (or,
    with ``shims``, a shim): commands that read them would otherwise fail deep inside."""
    missing = [e for e in missing_entries(repository) if shims or not e.startswith(SHIMS_DIR)]
    if missing:
        raise UserError(
            f"model repository {repository} (RECSTACK_MODEL_REPOSITORY) lacks "
            f"{', '.join(missing)}; run `{INIT_COMMAND}` to copy the committed configs and "
            "shims into it (overwrites nothing)"
        )


def init_repository(repository: Path) -> list[str]:
    """Copy into ``repository`` the committed configs and shims it lacks (never overwriting
    a file there); returns the relative paths copied."""
    copied = missing_entries(repository)
    for entry in copied:
        (repository / entry).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(COMMITTED_REPOSITORY / entry, repository / entry)
    return copied


def prepare_repository(settings: Settings) -> list[str]:
    """Check, before training starts, that ``settings.model_repository`` can take the
    versions the pipeline publishes. A missing or empty folder is prepared (the committed
    configs and shims are copied in; returns what was copied); a folder that holds other
    things but lacks some of them is refused with the fix, since it may be another
    repository that should not be written into unasked."""
    repo = settings.model_repository
    if not repo.exists() or (repo.is_dir() and not any(repo.iterdir())):
        copied = init_repository(repo)
        log.info("prepared model repository %s: copied %s", repo, ", ".join(copied))
        return copied
    if not repo.is_dir():
        raise UserError(f"model repository {repo} (RECSTACK_MODEL_REPOSITORY) is not a folder")
    missing = missing_entries(repo)
    if missing:
        raise UserError(
            f"model repository {repo} (RECSTACK_MODEL_REPOSITORY) lacks {', '.join(missing)}; "
            f"training publishes model versions beside these committed configs. Fix: run "
            f"`{INIT_COMMAND}` (copies what is missing from {COMMITTED_REPOSITORY}, "
            "overwriting nothing), or point RECSTACK_MODEL_REPOSITORY at a new or empty "
            "folder, which `recstack train` prepares itself"
        )
    return []


def cli_init(args: argparse.Namespace) -> int:
    """``recstack repo init [DIR]``: copy the committed configs and shims a repository
    (default: settings.model_repository) lacks."""
    repo = Path(args.dir) if args.dir else get_settings().model_repository
    if repo.exists() and not repo.is_dir():
        raise UserError(f"{repo} is not a folder")
    copied = init_repository(repo)
    for entry in copied:
        print(repo / entry)
    print(f"{repo}: {f'copied {len(copied)} file(s)' if copied else 'nothing missing'}")
    return 0


def list_versions(settings: Settings, model: str) -> list[int]:
    """Published versions of ``model``, ascending (numeric folders only)."""
    folder = settings.model_repository / model
    if not folder.is_dir():
        raise UserError(
            f"unknown model {model!r}: no folder {folder}; run `{INIT_COMMAND}` to copy the "
            "committed configs into the model repository (RECSTACK_MODEL_REPOSITORY)"
        )
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def next_version(settings: Settings, model: str) -> int:
    """One more than the highest published version (Triton versions start at 1)."""
    versions = list_versions(settings, model)
    return (versions[-1] if versions else 0) + 1


def shim_for(settings: Settings, model: str) -> Path | None:
    """The embedded-runtime shim source for ``model`` (None for an ensemble)."""
    config = load_config(model, settings.model_repository)
    if config.platform == "ensemble":
        return None
    if config.backend != "python" or not config.default_model_filename:
        raise UserError(
            f"{model}: config.pbtxt is not an embedded-runtime config (backend python with "
            "default_model_filename naming a shim in _shims/)"
        )
    shim = settings.model_repository / SHIMS_DIR / config.default_model_filename
    if not shim.exists():
        raise UserError(f"{model}: no shim {shim}")
    return shim


def required_files(settings: Settings, model: str) -> list[str]:
    """Artifact file names a version of ``model`` must contain (from config parameters)."""
    config = load_config(model, settings.model_repository)
    return [
        config.parameters[key].string_value
        for key in ("artifact", "compiled_artifact")
        if key in config.parameters
    ]


def publish_version(
    settings: Settings, model: str, files: Mapping[str, Path], version: int | None = None
) -> int:
    """Stage, validate and atomically publish one version of ``model``.

    ``files`` maps the file name inside the version folder (e.g. ``model.onnx``) to its
    source path; an ensemble takes ``{}``. Returns the version number published."""
    if version is None:
        version = next_version(settings, model)
    if version < 1:
        raise UserError(f"{model}: version must be >= 1, got {version}")
    target = settings.model_repository / model / str(version)
    if target.exists():
        raise UserError(f"{model} version {version} already exists at {target}")
    missing = [name for name in required_files(settings, model) if name not in files]
    if missing:
        raise UserError(f"{model}: missing artifact(s) {missing}; config.pbtxt names them")

    staging_root = settings.releases_dir / ".staging"
    staging_root.mkdir(parents=True, exist_ok=True)
    staging = staging_root / f"{model}-{version}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        for name, source in files.items():
            if Path(name).name != name:
                raise UserError(f"{model}: artifact name {name!r} must be a plain file name")
            shutil.copy2(source, staging / name)
        shim = shim_for(settings, model)
        if shim is not None:
            shutil.copy2(shim, staging / shim.name)
        validate_version(settings, model, staging)
        try:
            os.rename(staging, target)
        except OSError as e:
            if e.errno == errno.EXDEV:
                raise UserError(
                    f"releases_dir {settings.releases_dir} and model_repository "
                    f"{settings.model_repository} must be on one filesystem (atomic rename)"
                ) from e
            if target.exists():
                raise UserError(f"{model} version {version} was published concurrently") from e
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("published %s version %d (%s)", model, version, ", ".join(sorted(files)) or "empty")
    return version


def validate_version(settings: Settings, model: str, folder: Path) -> None:
    """Check a (staged) version folder against the model's config; raise UserError."""
    config = load_config(model, settings.model_repository)
    if config.platform == "ensemble":
        extra = list(folder.iterdir())
        if extra:
            raise UserError(f"{model}: an ensemble version folder must be empty, has {extra}")
        return
    params = {k: v.string_value for k, v in config.parameters.items()}
    if "compiled_artifact" in params:
        _validate_ranker(
            model, config, folder / params["artifact"], folder / params["compiled_artifact"]
        )
    else:
        _validate_onnx(model, config, folder / params["artifact"])


def _validate_onnx(model: str, config, path: Path) -> None:  # type: ignore[no-untyped-def]
    """The graph against the committed config as the embedded shim runs it, and against
    the production config derived from it as NVIDIA's onnxruntime backend validates it
    (``exporters.repo_check``): a version that the container would refuse is not
    published."""
    from exporters.repo_check import (
        fixed_widths,
        graph_signature,
        onnxruntime_backend_errors,
        shim_errors,
    )
    from exporters.triton_configs import production_config

    graph = graph_signature(path)
    errors = shim_errors(config, graph)
    if not errors:
        native = production_config(
            config, gpu=False, num_features=None, widths=fixed_widths(config, graph)
        )
        errors = [f"production: {e}" for e in onnxruntime_backend_errors(native, graph)]
    if errors:
        raise UserError(f"{model}: {path.name} does not fit config.pbtxt: " + "; ".join(errors))


def _validate_ranker(model: str, config, checkpoint: Path, library: Path) -> None:  # type: ignore[no-untyped-def]
    import tl2cgen
    import treelite

    try:
        tree_model = treelite.Model.deserialize(str(checkpoint))
    except Exception as e:
        raise UserError(f"{model}: {checkpoint.name} is not a Treelite checkpoint: {e}") from e
    try:
        predictor = tl2cgen.Predictor(str(library), nthread=1)
    except Exception as e:
        raise UserError(f"{model}: {library.name} does not load in tl2cgen: {e}") from e
    if predictor.num_feature != tree_model.num_feature:
        raise UserError(
            f"{model}: {library.name} takes {predictor.num_feature} features, "
            f"{checkpoint.name} {tree_model.num_feature}: not compiled from this checkpoint"
        )
    # Production serves this checkpoint with FIL: its config (derived from this one) and
    # the checkpoint must pass FIL's rules, float32 parameters included.
    from exporters.repo_check import fil_errors
    from exporters.triton_configs import production_config

    native = production_config(config, gpu=False, num_features=tree_model.num_feature)
    errors = fil_errors(native, checkpoint)
    if errors:
        raise UserError(f"{model}: not servable by FIL: " + "; ".join(errors))
    (width,) = config.input[0].dims
    if width not in (-1, tree_model.num_feature):
        raise UserError(
            f"{model}: config.pbtxt input width {width} != checkpoint's {tree_model.num_feature}"
        )
    # The compiled library must score like the checkpoint it claims to come from.
    # Rows in the library's own type (tl2cgen 1.0.0 cannot convert under NumPy 2).
    rows = np.random.default_rng(0).normal(size=(64, tree_model.num_feature))
    rows = rows.astype(predictor.threshold_type)
    expected = treelite.gtil.predict(tree_model, rows, pred_margin=True).reshape(64, -1)
    got = predictor.predict(
        tl2cgen.DMatrix(rows, dtype=predictor.threshold_type), pred_margin=True
    ).reshape(64, -1)
    if not np.allclose(expected, got, rtol=1e-5, atol=1e-5):
        raise UserError(f"{model}: {library.name} and {checkpoint.name} disagree on scores")


def model_data_type(value: int) -> str:
    """``TYPE_FP32``-style name of a ModelConfig DataType enum value."""
    from tritonclient.grpc import model_config_pb2

    return str(model_config_pb2.DataType.Name(value))

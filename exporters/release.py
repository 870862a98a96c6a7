"""Releases: the unit of promotion. A release pins the version of every Triton model, the
FAISS index built with that item tower, the ranker's feature order, the data snapshot,
metrics and parity results — everything that must move together.

Layout: ``<releases_dir>/<id>/manifest.json`` beside ``index.faiss`` and
``index_item_ids.npy``. A release folder is staged under ``<releases_dir>/.staging``,
validated, then renamed into place, so a half-written release is never visible.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX_FILES = ("index.faiss", "index_item_ids.npy")
# The item-to-item and popular sources built from every event (exporters/candidates.py).
CANDIDATES_FILE = "candidates.npz"
# The ids of the users in the release's data (sorted int64): every one of them has a row
# in the online store once materialised, so the orchestrator can tell a user the store
# lost from a new one (the ``features_missing`` flag, orchestrator/serving_release.py).
USERS_FILE = "users.npy"
# Internal item id -> the client's key, for data imported with string item ids
# (exporters/raw_tables.py KEY_FILES); the orchestrator answers with the keys.
ITEM_KEYS_FILE = "item_keys.parquet"

# Triton model -> the work/ artifacts that make one version of it.
MODEL_ARTIFACTS: dict[str, tuple[str, ...]] = {
    "user_tower": ("user_tower.onnx",),
    "item_tower": ("item_tower.onnx",),
    "rank_features": ("rank_features.onnx",),
    "ranker": ("checkpoint.tl", "model.so"),
    "rank": (),  # the ensemble: an empty version folder
}
TOWER_FILES = ("user_tower.onnx", "item_tower.onnx")
REFIT_DIR = "refit"  # exporters/two_tower.py REFIT_DIR
# Name each artifact takes inside the version folder (what config.pbtxt names).
VERSION_FILE_NAMES = {
    "user_tower.onnx": "model.onnx",
    "item_tower.onnx": "model.onnx",
    "rank_features.onnx": "model.onnx",
    "checkpoint.tl": "checkpoint.tl",
    "model.so": "model.so",
}


def release_ids(settings: Settings) -> list[int]:
    """Ids of complete releases, oldest first."""
    if not settings.releases_dir.exists():
        return []
    return sorted(
        int(p.name)
        for p in settings.releases_dir.iterdir()
        if p.name.isdigit() and (p / MANIFEST).exists()
    )


def release_dir(settings: Settings, release_id: int) -> Path:
    return settings.releases_dir / str(release_id)


def load_manifest(settings: Settings, release_id: int | None = None) -> dict[str, Any]:
    """A release's manifest (the newest release when ``release_id`` is None)."""
    ids = release_ids(settings)
    if not ids:
        raise UserError(f"no release in {settings.releases_dir}: run `recstack train` first")
    rid = ids[-1] if release_id is None else int(release_id)
    path = release_dir(settings, rid) / MANIFEST
    if not path.exists():
        raise UserError(f"release {rid} does not exist; releases: {ids}")
    manifest: dict[str, Any] = json.loads(path.read_text())
    return manifest


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(f"{path} is missing: run the step that writes it (`recstack train`)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


class QualityGateFailed(UserError):
    """The evaluation says the pipeline does not beat the baselines: nothing is published."""


def check_gate(report: dict[str, Any], force_reason: str | None) -> dict[str, Any]:
    """The report's quality gate, or :class:`QualityGateFailed` when it failed and no
    ``force_reason`` is given. Returns what the manifest records about it."""
    gate = report.get("gate")
    if gate is None:
        raise UserError("the evaluation report has no quality gate: re-run `recstack evaluate`")
    record = {**gate, "forced": False}
    if gate["passed"]:
        return record
    summary = (
        f"pipeline NDCG@10 {gate['pipeline_ndcg@10']:.4f} does not beat the best baseline "
        f"({gate['best_baseline']}: {gate['best_baseline_ndcg@10']:.4f}, margin "
        f"{gate['margin']:.0%})"
    )
    if not force_reason:
        raise QualityGateFailed(
            f"release refused by the quality gate: {summary}. See the report "
            "(data/reports/report.md); publish anyway with `recstack release publish "
            "--force --reason '...'` (the reason is recorded in the manifest)."
        )
    log.warning("quality gate failed but forced (%s): %s", force_reason, summary)
    return {**record, "forced": True, "force_reason": force_reason}


def publish(settings: Settings, force_reason: str | None = None) -> int:
    """Publish the artifacts in ``work/`` as new model versions and a new release; return
    its id. Model versions are validated by ``exporters.model_repo`` before they appear.
    A release whose evaluation loses to the baselines is refused unless ``force_reason``
    (or ``RECSTACK_FORCE_RELEASE``) says why it should go out anyway."""
    from exporters.model_repo import publish_version
    from exporters.ranker_train import candidate_model_path

    force_reason = force_reason or settings.force_release or None
    work = settings.work_dir
    # The towers and index refit on every event (pipeline step refit) when present; the
    # ranker and the feature assembly come from work/ (they were chosen on validation).
    refit = work / REFIT_DIR
    towers = (
        refit
        if (refit / "tower_parity.json").exists() and (refit / "index.json").exists()
        else work
    )
    source = {
        name: (towers if name in TOWER_FILES else work)
        for names in MODEL_ARTIFACTS.values()
        for name in names
    }
    for name, folder in source.items():
        if not (folder / name).exists():
            raise UserError(f"{folder / name} is missing: run `recstack train` first")

    meta = _read_json(settings.raw_dir / "meta.json")
    index = _read_json(towers / "index.json")
    manifest: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        # Without the per-day hashes: a release names its data, it need not list every day.
        "data_snapshot": {k: v for k, v in meta.items() if k != "days"},
        "models": {},
        "index": {**index, "file": INDEX_FILES[0], "item_ids": INDEX_FILES[1]},
        "ranker": _read_json(work / "ranker.json"),
        "towers": {
            "from": "refit on all events" if towers == refit else "selection run",
            "training": _read_json(towers / "two_tower.json")
            if (towers / "two_tower.json").exists()
            else None,
        },
        "parity": {
            "towers": _read_json(towers / "tower_parity.json"),
            "ranker": _read_json(work / "ranker_parity.json"),
        },
        "metrics": _read_json(settings.reports_dir / "report.json"),
    }
    manifest["quality_gate"] = check_gate(manifest["metrics"], force_reason)
    # The post-processing the evaluation applied is the one the release serves with.
    manifest["postprocess"] = manifest["metrics"].get("postprocess")
    candidates_src = candidate_model_path(settings, "all")
    if not candidates_src.exists():
        raise UserError(f"{candidates_src} is missing: run `recstack train` first")
    manifest["candidates"] = {
        "file": CANDIDATES_FILE,
        "quotas": manifest["ranker"].get("quotas"),
        "ann_depth": manifest["ranker"].get("ann_depth"),
    }

    settings.releases_dir.mkdir(parents=True, exist_ok=True)
    staging_root = settings.releases_dir / ".staging"
    staging_root.mkdir(exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=staging_root))
    try:
        for name in INDEX_FILES:
            shutil.copy2(towers / name, staged / name)
        _validate_index(staged, manifest["index"])
        shutil.copy2(candidates_src, staged / CANDIDATES_FILE)
        manifest["candidates"].update(_validate_candidates(staged, manifest["index"]))
        manifest["users"] = _write_users(settings, staged / USERS_FILE)
        keys = _copy_item_keys(settings, staged / ITEM_KEYS_FILE)
        if keys is not None:
            manifest["item_keys"] = keys
        # Models last: once versions exist in the repository they are loadable, and the
        # release that names them must follow right away.
        for model, names in MODEL_ARTIFACTS.items():
            files = {VERSION_FILE_NAMES[n]: source[n] / n for n in names}
            manifest["models"][model] = publish_version(settings, model, files)
        release_id = max(release_ids(settings), default=0) + 1
        manifest["release_id"] = release_id
        manifest["checksums"] = _checksums(settings, manifest, staged)
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        staged.rename(release_dir(settings, release_id))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    log.info("release %d: %s", release_id, manifest["models"])
    return release_id


def _checksums(settings: Settings, manifest: dict[str, Any], staged: Path) -> dict[str, str]:
    """sha256 of every served artifact (``recstack release validate`` re-checks them)."""
    from exporters.release_validate import artifact_paths, sha256

    paths = artifact_paths(settings, manifest)
    folder = release_dir(settings, int(manifest["release_id"]))
    return {k: sha256(staged / p.name if p.parent == folder else p) for k, p in paths.items()}


def _write_users(settings: Settings, path: Path) -> dict[str, Any]:
    """The users table's ids, sorted and unique, as ``path``; returns the manifest entry.
    8 bytes a user (100k users: 0.8 MB), exact, and a binary search per request."""
    import numpy as np

    from exporters.raw_tables import read_table

    users = np.unique(read_table(settings, "users", ["user_id"])["user_id"].to_numpy(np.int64))
    np.save(path, users)
    return {"file": path.name, "n_users": len(users)}


def _copy_item_keys(settings: Settings, path: Path) -> dict[str, Any] | None:
    """The raw data's item key table as ``path`` (None: the items have integer ids)."""
    import pyarrow.parquet as pq

    from exporters.raw_tables import KEY_FILES

    src = settings.raw_dir / KEY_FILES["items"]
    if not src.exists():
        return None
    shutil.copy2(src, path)
    return {"file": path.name, "n_keys": pq.read_metadata(path).num_rows}


def _validate_index(folder: Path, index: dict[str, Any]) -> None:
    """The index loads, matches its recorded factory string and covers the item-id table."""
    import faiss
    import numpy as np

    idx = faiss.read_index(str(folder / INDEX_FILES[0]))
    ids = np.load(folder / INDEX_FILES[1])
    if idx.ntotal != len(ids) or idx.ntotal != int(index["n_items"]):
        raise ValueError(
            f"index has {idx.ntotal} vectors, item-id table {len(ids)}, "
            f"index.json says {index['n_items']}"
        )
    if idx.d != int(index["dim"]):
        raise ValueError(f"index dim {idx.d} != index.json dim {index['dim']}")


def _validate_candidates(folder: Path, index: dict[str, Any]) -> dict[str, Any]:
    """The candidate sources load and cover exactly the index's rows; returns their info."""
    import numpy as np

    from exporters.candidates import SourceModel

    model = SourceModel.load(folder / CANDIDATES_FILE)
    ids = np.load(folder / INDEX_FILES[1])
    if not np.array_equal(model.item_ids, ids):
        raise ValueError("candidate sources are not built over the index's item rows")
    if len(ids) != int(index["n_items"]):
        raise ValueError(f"candidate sources cover {len(ids)} items, index {index['n_items']}")
    return dict(model.info)


def cli_publish(args: argparse.Namespace) -> int:
    """``recstack release publish [--force --reason R]``."""
    if args.force and not args.reason:
        raise UserError("--force needs --reason: it is recorded in the release manifest")
    release_id = publish(get_settings(), force_reason=args.reason if args.force else None)
    print(f"published release {release_id}")
    return 0


def cli_show(args: argparse.Namespace) -> int:
    """``recstack release show ID``."""
    print(json.dumps(load_manifest(get_settings(), int(args.release_id)), indent=2))
    return 0


def union_versions(settings: Settings, release_ids: Sequence[int]) -> dict[str, list[int]]:
    """Triton model -> the sorted union of the versions ``release_ids`` pin (the set a
    Triton serving those releases side by side must hold)."""
    versions: dict[str, set[int]] = {}
    for rid in release_ids:
        for model, version in model_versions(settings, rid).items():
            versions.setdefault(model, set()).add(version)
    return {m: sorted(v) for m, v in sorted(versions.items())}


def model_versions(settings: Settings, release_id: int | str | None = None) -> dict[str, int]:
    """Triton model -> version pinned by a release (the newest release when None)."""
    manifest = load_manifest(settings, None if release_id is None else int(release_id))
    return {str(k): int(v) for k, v in manifest["models"].items()}

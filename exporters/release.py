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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
INDEX_FILES = ("index.faiss", "index_item_ids.npy")

# Triton model -> the work/ artifacts that make one version of it.
MODEL_ARTIFACTS: dict[str, tuple[str, ...]] = {
    "user_tower": ("user_tower.onnx",),
    "item_tower": ("item_tower.onnx",),
    "rank_features": ("rank_features.onnx",),
    "ranker": ("checkpoint.tl", "model.so"),
    "rank": (),  # the ensemble: an empty version folder
}
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


def publish(settings: Settings) -> int:
    """Publish the artifacts in ``work/`` as new model versions and a new release; return
    its id. Model versions are validated by ``exporters.model_repo`` before they appear."""
    from exporters.model_repo import publish_version

    work = settings.work_dir
    for names in MODEL_ARTIFACTS.values():
        for name in names:
            if not (work / name).exists():
                raise UserError(f"{work / name} is missing: run `recstack train` first")

    meta = _read_json(settings.raw_dir / "meta.json")
    index = _read_json(work / "index.json")
    manifest: dict[str, Any] = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "data_snapshot": meta,
        "models": {},
        "index": {**index, "file": INDEX_FILES[0], "item_ids": INDEX_FILES[1]},
        "ranker": _read_json(work / "ranker.json"),
        "parity": {
            "towers": _read_json(work / "tower_parity.json"),
            "ranker": _read_json(work / "ranker_parity.json"),
        },
        "metrics": _read_json(settings.reports_dir / "report.json"),
    }

    settings.releases_dir.mkdir(parents=True, exist_ok=True)
    staging_root = settings.releases_dir / ".staging"
    staging_root.mkdir(exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=staging_root))
    try:
        for name in INDEX_FILES:
            shutil.copy2(work / name, staged / name)
        _validate_index(staged, manifest["index"])
        # Models last: once versions exist in the repository they are loadable, and the
        # release that names them must follow right away.
        for model, names in MODEL_ARTIFACTS.items():
            files = {VERSION_FILE_NAMES[n]: work / n for n in names}
            manifest["models"][model] = publish_version(settings, model, files)
        release_id = max(release_ids(settings), default=0) + 1
        manifest["release_id"] = release_id
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        staged.rename(release_dir(settings, release_id))
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    log.info("release %d: %s", release_id, manifest["models"])
    return release_id


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


def cli_list(args: argparse.Namespace) -> int:
    """``recstack release list``."""
    settings = get_settings()
    ids = release_ids(settings)
    if not ids:
        print(f"no releases in {settings.releases_dir}")
        return 0
    for rid in ids:
        m = load_manifest(settings, rid)
        ndcg = m.get("metrics", {}).get("pipeline", {}).get("ndcg@10")
        models = " ".join(f"{k}:{v}" for k, v in m["models"].items())
        print(f"{rid:4d}  {m['created_at']}  ndcg@10={ndcg}  {models}")
    return 0


def cli_show(args: argparse.Namespace) -> int:
    """``recstack release show ID``."""
    print(json.dumps(load_manifest(get_settings(), int(args.release_id)), indent=2))
    return 0


def model_versions(settings: Settings, release_id: int | str | None = None) -> dict[str, int]:
    """Triton model -> version pinned by a release (the newest release when None)."""
    manifest = load_manifest(settings, None if release_id is None else int(release_id))
    return {str(k): int(v) for k, v in manifest["models"].items()}

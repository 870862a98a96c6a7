"""``recstack release validate R``: is release R fit to serve? Checked before every
promotion and A/B start, and written to ``<releases>/<R>/validation.json``.

Hard checks (never overridden): every artifact present and, where the manifest records
checksums, unchanged; the parity results within their tolerances; one embedding width
across the user tower, the index and the rank ensemble; a scratch Triton loads the
release's pinned versions and its ensemble. Soft checks (``--force --reason``
records the override): the index's recall against exact search, the release's quality
gate, and its offline NDCG@10 not worse than the live release's beyond a tolerance.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from exporters.model_config import load_config
from exporters.release import (
    CANDIDATES_FILE,
    INDEX_FILES,
    ITEM_KEYS_FILE,
    MODEL_ARTIFACTS,
    VERSION_FILE_NAMES,
    load_manifest,
    release_dir,
    release_ids,
)
from recstack.atomic_files import write_json_atomic
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation.json"
# Offline NDCG@10 may be this much lower (relative) than the live release's before a
# promotion needs --force: evaluations on different data windows are noisy.
METRIC_TOLERANCE = 0.02
MIN_INDEX_RECALL = 0.9
RECALL_QUERIES = 200
RECALL_K = 100
RELEASE_OVERHEAD_MB = 16.0


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    hard: bool = True
    skipped: bool = False


class ValidationFailed(UserError):
    """The release is not fit to serve; nothing was changed."""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def artifact_paths(settings: Settings, manifest: dict[str, Any]) -> dict[str, Path]:
    """Every file the release serves from, by a stable name (the checksums' keys)."""
    rid = int(manifest["release_id"])
    folder = release_dir(settings, rid)
    paths = {name: folder / name for name in INDEX_FILES}
    if "candidates" in manifest:
        paths[CANDIDATES_FILE] = folder / manifest["candidates"]["file"]
    if "item_keys" in manifest:  # data imported with string item ids
        paths[ITEM_KEYS_FILE] = folder / manifest["item_keys"]["file"]
    for model, files in MODEL_ARTIFACTS.items():
        version = manifest["models"][model]
        for name in files:
            target = VERSION_FILE_NAMES[name]
            paths[f"{model}/{version}/{target}"] = (
                settings.model_repository / model / str(version) / target
            )
    return paths


def checksums(settings: Settings, manifest: dict[str, Any]) -> dict[str, str]:
    """sha256 of every artifact (recorded in the manifest at publish time)."""
    return {k: sha256(p) for k, p in artifact_paths(settings, manifest).items()}


def release_memory_mb(settings: Settings, release_id: int) -> float:
    """Estimated orchestrator memory of one loaded release: the index file, the item
    vectors, the candidate sources (uncompressed) and the catalog + item snapshot. The
    estimate errs high (vectors counted even where they are a view of the index)."""
    manifest = load_manifest(settings, release_id)
    folder = release_dir(settings, release_id)
    n = int(manifest["index"]["n_items"])
    dim = int(manifest["index"]["dim"])
    total = sum((folder / name).stat().st_size for name in INDEX_FILES if (folder / name).exists())
    total += n * dim * 4  # item vectors
    cand = folder / manifest.get("candidates", {}).get("file", CANDIDATES_FILE)
    if cand.exists():
        with zipfile.ZipFile(cand) as z:
            total += sum(i.file_size for i in z.infolist())
    total += n * 512  # catalog arrays, item snapshot, id tables (measured ~0.3-0.5 kB/item)
    # Per release regardless of size: its Feast client and registry, clients, Python
    # objects (a second small-preset release grew the orchestrator's RSS by 5-9 MB).
    return total / 2**20 + RELEASE_OVERHEAD_MB


def available_memory_mb() -> float:
    """MemAvailable from /proc/meminfo (inf where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("inf")


def check_fits(settings: Settings, release_ids: list[int], copies: int = 1) -> tuple[float, float]:
    """(MB ``release_ids`` need, MB available after the headroom) on this machine; a
    :class:`UserError` when they do not fit beside what is loaded. ``copies``: how many
    orchestrators on this machine load them (replicas)."""
    need = copies * sum(release_memory_mb(settings, r) for r in release_ids)
    free = available_memory_mb() - settings.release_memory_headroom_mb
    if need > free:
        raise UserError(
            f"release(s) {release_ids} need ~{need:.0f} MB beside the served ones; "
            f"{max(free, 0):.0f} MB available after {settings.release_memory_headroom_mb} MB "
            "headroom. Refused, the current releases keep serving: free memory, or stop the "
            "A/B test first."
        )
    return need, free


def _parity(manifest: dict[str, Any]) -> Check:
    bad = []
    towers = manifest["parity"]["towers"]
    for tower in ("user_tower", "item_tower"):
        diff = float(towers[tower]["max_abs_diff"])
        if not diff <= float(towers["tolerance"]):
            bad.append(f"{tower} {diff:.2e} > {towers['tolerance']}")
    ranker = manifest["parity"]["ranker"]["ranker"]
    for part in ("checkpoint", "library"):
        diff = float(ranker[part]["max_abs_diff"])
        if not diff <= float(ranker["tolerance"]):
            bad.append(f"ranker {part} {diff:.2e} > {ranker['tolerance']:.2e}")
    return Check("parity", not bad, "; ".join(bad) or "towers and ranker within tolerance")


def _dims(settings: Settings, manifest: dict[str, Any], index: Any) -> Check:
    """One embedding width everywhere: the user tower's ONNX output, the index, the rank
    ensemble's ``user_embedding``/``item_embedding`` inputs (config.pbtxt)."""
    import onnx

    widths: dict[str, int] = {}
    tower = settings.model_repository / "user_tower" / str(manifest["models"]["user_tower"])
    graph = onnx.load(str(tower / "model.onnx"), load_external_data=False).graph
    widths["user_tower output"] = int(graph.output[0].type.tensor_type.shape.dim[-1].dim_value)
    widths["index"] = int(index.d)
    widths["manifest index.dim"] = int(manifest["index"]["dim"])
    for t in load_config("rank", settings.model_repository).input:
        if t.name in ("user_embedding", "item_embedding"):
            widths[f"rank {t.name}"] = int(t.dims[-1])
    ok = len(set(widths.values())) == 1
    detail = ", ".join(f"{k} {v}" for k, v in widths.items())
    return Check("embedding_dims", ok, detail if ok else f"widths differ: {detail}")


def _index_recall(settings: Settings, manifest: dict[str, Any], index: Any) -> Check:
    """Recall@100 of the index against exact inner-product search, item vectors as
    queries (the user tower's outputs live in the same space)."""
    import faiss

    from orchestrator.faiss_index import single_query_scan

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    params = manifest["index"].get("search_params") or ""
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)  # type: ignore[arg-type]
    single_query_scan(index)  # searched as serving searches it
    n = index.ntotal
    k = min(RECALL_K, n)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(n, size=min(RECALL_QUERIES, n), replace=False))
    queries = np.vstack([index.reconstruct(int(r)) for r in rows]).astype(np.float32)
    vectors = index.reconstruct_n(0, n) if n <= 2_000_000 else None
    if vectors is None:
        return Check("index_recall", True, "skipped: too large", hard=False, skipped=True)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
    _, got = index.search(queries, k)
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(exact, got, strict=True))
    recall = hits / exact.size
    return Check(
        "index_recall",
        recall >= MIN_INDEX_RECALL,
        f"recall@{k} {recall:.3f} vs exact ({manifest['index']['factory']}; "
        f"minimum {MIN_INDEX_RECALL})",
        hard=False,
    )


def _metrics(settings: Settings, manifest: dict[str, Any], live: int | None) -> list[Check]:
    gate = manifest.get("quality_gate") or {}
    checks = [
        Check(
            "quality_gate",
            bool(gate.get("passed")) or bool(gate.get("forced")),
            ("passed" if gate.get("passed") else f"forced: {gate.get('force_reason')}")
            if gate
            else "no quality gate recorded",
            hard=False,
        )
    ]
    ndcg = manifest.get("metrics", {}).get("pipeline", {}).get("ndcg@10")
    rid = int(manifest["release_id"])
    if live is None or live == rid:
        checks.append(Check("vs_live", True, "no other live release", hard=False, skipped=True))
        return checks
    live_ndcg = load_manifest(settings, live).get("metrics", {}).get("pipeline", {}).get("ndcg@10")
    if ndcg is None or live_ndcg is None:
        checks.append(Check("vs_live", True, "offline NDCG@10 missing", hard=False, skipped=True))
        return checks
    floor = float(live_ndcg) * (1 - METRIC_TOLERANCE)
    checks.append(
        Check(
            "vs_live",
            float(ndcg) >= floor,
            f"NDCG@10 {float(ndcg):.4f} vs live release {live} {float(live_ndcg):.4f} "
            f"(tolerance {METRIC_TOLERANCE:.0%})",
            hard=False,
        )
    )
    return checks


def _triton(settings: Settings, release_id: int) -> Check:
    """A scratch Triton (own ports and run folder, the same repository) loads the release's
    pinned versions and its ensemble. Never the serving Triton: a version that fails to
    load stays on its books as UNAVAILABLE, and with strict readiness the serving server
    would report not ready from then on."""
    from orchestrator.triton_server import missing_for, start_triton

    with tempfile.TemporaryDirectory(prefix="recstack-validate-") as tmp:
        http, grpc_port, metrics = _free_ports(3)
        scratch = settings.model_copy(
            update={
                "run_dir": Path(tmp),
                "triton_http_port": http,
                "triton_grpc_port": grpc_port,
                "triton_metrics_port": metrics,
            }
        )
        try:
            proc = start_triton(scratch, releases=[release_id], timeout=120, die_with_parent=True)
        except Exception as e:
            detail = str(e).split("; log ")[0]
            return Check("triton_load", False, f"Triton did not load it: {detail[:500]}")
        try:
            missing = missing_for(scratch, [release_id])
        finally:
            proc.stop()
    if missing:
        return Check("triton_load", False, f"Triton did not load: {'; '.join(missing)}")
    return Check("triton_load", True, "pinned versions and ensemble load in a scratch Triton")


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def validate(
    settings: Settings,
    release_id: int,
    live: int | None = None,
    force_reason: str | None = None,
    triton: bool = True,
    compare_live: bool = True,
) -> dict[str, Any]:
    """Run every check; write and return the report. Raises :class:`ValidationFailed`
    (naming each failure) when a hard check fails, or a soft one without a force reason."""
    if release_id not in release_ids(settings):
        raise ValidationFailed(
            f"release {release_id} does not exist; releases: {release_ids(settings)}"
        )
    manifest = load_manifest(settings, release_id)
    checks: list[Check] = []
    paths = artifact_paths(settings, manifest)
    missing = [k for k, p in paths.items() if not p.exists()]
    checks.append(
        Check("artifacts", not missing, f"missing: {missing}" if missing else f"{len(paths)} files")
    )
    if not missing:
        recorded = manifest.get("checksums")
        if recorded:
            changed = [k for k, p in paths.items() if k in recorded and sha256(p) != recorded[k]]
            checks.append(
                Check(
                    "checksums",
                    not changed,
                    f"changed since publish: {changed}" if changed else "all match the manifest",
                )
            )
        else:
            checks.append(Check("checksums", True, "none recorded (older release)", skipped=True))
        checks.append(_parity(manifest))
        try:  # read once for both checks (hundreds of MB at 1M items)
            import faiss

            index = faiss.read_index(str(release_dir(settings, release_id) / INDEX_FILES[0]))
        except Exception as e:  # an unreadable artifact is a hard failure
            checks.append(Check("index", False, f"{type(e).__name__}: {e}"))
        else:
            for check in (_dims, _index_recall):  # _dims first: recall changes search params
                try:
                    checks.append(check(settings, manifest, index))
                except Exception as e:  # an unreadable artifact is a hard failure
                    name = check.__name__.strip("_")
                    checks.append(Check(name, False, f"{type(e).__name__}: {e}"))
        checks += _metrics(settings, manifest, live if compare_live else None)
        hard_ok = all(c.ok for c in checks if c.hard)
        if triton and hard_ok:
            checks.append(_triton(settings, release_id))
    failed = [c for c in checks if not c.ok]
    hard = [c for c in failed if c.hard]
    forced = bool(failed) and not hard and bool(force_reason)
    report = {
        "release_id": release_id,
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
        "passed": not failed or forced,
        "forced": forced,
        **({"force_reason": force_reason} if forced else {}),
        "checks": [asdict(c) for c in checks],
    }
    write_json_atomic(release_dir(settings, release_id) / VALIDATION_FILE, report)
    if failed and not forced:
        lines = "; ".join(f"{c.name}: {c.detail}" for c in failed)
        hint = "" if hard else " (soft checks only: override with --force --reason '...', recorded)"
        raise ValidationFailed(f"release {release_id} refused, nothing changed: {lines}{hint}")
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [f"release {report['release_id']}: " + ("PASSED" if report["passed"] else "FAILED")]
    if report.get("forced"):
        lines[0] += f" (forced: {report['force_reason']})"
    for c in report["checks"]:
        mark = "skip" if c["skipped"] else ("ok" if c["ok"] else "FAIL")
        lines.append(f"  {mark:4s} {c['name']:15s} {c['detail']}")
    return "\n".join(lines)

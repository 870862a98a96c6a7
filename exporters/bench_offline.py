"""``recstack bench offline`` (``make bench-offline``): the offline pipeline with each
offline engine on one preset, timed per step, with the peak memory of each run.

Each engine runs ``recstack train --engine E`` in a subprocess on its own copy of the same
raw data (``<workspace>/<engine>``), so the two runs share nothing but the data. Step times
are the pipeline's own step markers; the peak is the largest resident set of the run's
process tree (the Spark JVM and its Python workers included), sampled every 0.2 s. The
offline report's gate numbers are printed beside them: the models trained from either
engine's tables should match within noise (docs/offline.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from exporters.data_generate import generate
from exporters.model_repo import copy_committed_repository
from exporters.pipeline import STEP_NAMES
from recstack.errors import UserError
from recstack.settings import ENGINES, PROJECT_ROOT, Settings, get_settings


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # ended between listing and reading
            total += p.memory_info().rss
    return total


def run_engine(base: Settings, engine: str, workspace: Path, timeout_s: float) -> dict[str, Any]:
    """``recstack train --engine`` on a copy of ``base``'s raw data; its timings and peak."""
    data = workspace / engine / "data"
    shutil.rmtree(workspace / engine, ignore_errors=True)
    shutil.copytree(base.raw_dir, data / "raw")
    repo = copy_committed_repository(workspace / engine / "model_repository")
    env = {
        **os.environ,
        "RECSTACK_DATA_DIR": str(data),
        "RECSTACK_MODEL_REPOSITORY": str(repo),
        "RECSTACK_RELEASES_DIR": str(workspace / engine / "releases"),
        "RECSTACK_RUN_DIR": str(workspace / engine / "run"),
    }
    command = [sys.executable, "-m", "recstack.cli", "train", "--engine", engine]
    command += ["--force-release", "bench-offline"]
    log = (workspace / f"{engine}.log").open("w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=log)
    ps, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        if time.perf_counter() - t0 > timeout_s:
            proc.kill()
            raise UserError(f"{engine}: over {timeout_s:.0f} s; see {log.name}")
        peak = max(peak, _tree_rss(ps))
        time.sleep(0.2)
    total = time.perf_counter() - t0
    if proc.returncode != 0:
        raise UserError(f"{engine}: recstack train exited {proc.returncode}; see {log.name}")
    steps = {}
    for name in STEP_NAMES:
        marker = data / "work" / ".steps" / f"{name}.json"
        if marker.exists():
            steps[name] = float(json.loads(marker.read_text())["seconds"])
    report = json.loads((data / "reports" / "report.json").read_text())
    return {"steps": steps, "total_s": total, "peak_mb": peak / 2**20, "gate": report["gate"]}


def markdown(preset: str, results: dict[str, dict[str, Any]]) -> str:
    engines = list(results)
    lines = [
        f"Offline pipeline, preset `{preset}`: seconds per step and peak memory.",
        "",
        "| step | " + " | ".join(engines) + " |",
        "|---|" + "---:|" * len(engines),
    ]
    for name in STEP_NAMES:
        cells = [f"{results[e]['steps'].get(name, float('nan')):.1f}" for e in engines]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append(
        "| **total** | " + " | ".join(f"{results[e]['total_s']:.0f}" for e in engines) + " |"
    )
    lines.append(
        "| peak RSS (MB) | " + " | ".join(f"{results[e]['peak_mb']:.0f}" for e in engines) + " |"
    )
    lines.append(
        "| pipeline NDCG@10 | "
        + " | ".join(f"{results[e]['gate']['pipeline_ndcg@10']:.4f}" for e in engines)
        + " |"
    )
    return "\n".join(lines) + "\n"


def cli(args: argparse.Namespace) -> int:
    """``recstack bench offline [--preset P] [--engines pandas,spark] [--workspace DIR]``."""
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown or not engines:
        raise UserError(f"--engines: {args.engines!r}; choose from {', '.join(ENGINES)}")
    settings = get_settings()
    workspace = Path(args.workspace or settings.root / ".bench-offline").resolve()
    source = workspace / f"source-{args.preset}-{args.seed}"
    base = settings.model_copy(update={"data_dir": source})
    if not (base.raw_dir / "meta.json").exists():
        generate(base, preset=args.preset, seed=args.seed)
    results = {e: run_engine(base, e, workspace, args.timeout) for e in engines}
    text = markdown(args.preset, results)
    (workspace / "bench-offline.md").write_text(text)
    (workspace / "bench-offline.json").write_text(json.dumps(results, indent=2) + "\n")
    print(text)
    return 0

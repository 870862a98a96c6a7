"""``recstack train``: the whole offline path as named, resumable steps.

Each step is a function ``step(settings) -> None`` owned by the module that does the work
(see docs/architecture.md). A finished step leaves a marker in ``work/.steps/`` holding the
data snapshot it ran on; a later run skips finished steps of the same snapshot, so an
interrupted run resumes where it stopped. New data (another snapshot) re-runs everything.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from exporters.model_repo import prepare_repository
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    name: str
    target: str  # "module:function", imported when the step runs
    what: str

    def function(self) -> Callable[[Settings], object]:
        module, _, func = self.target.partition(":")
        return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


STEPS: tuple[Step, ...] = (
    Step("split", "exporters.split:write_split", "time-based train/validation/test split"),
    Step("features", "exporters.feature_tables:build", "feature tables (Feast sources)"),
    Step("feast_apply", "exporters.feast_ops:apply", "feast apply"),
    Step("feast_materialize", "exporters.feast_ops:materialize", "load the online store"),
    Step("two_tower", "exporters.two_tower:train", "train the two-tower model"),
    Step("onnx_export", "exporters.onnx_export:export_towers", "towers to ONNX, parity"),
    Step("index", "exporters.index_build:build", "embed the catalog, FAISS index"),
    Step(
        "candidates",
        "exporters.ranker_train:build_candidate_models",
        "item-to-item and popular candidate sources",
    ),
    Step("ranker", "exporters.ranker_train:train", "LightGBM lambdarank on merged candidates"),
    Step("ranker_export", "exporters.ranker_export:export", "Treelite + tl2cgen, parity"),
    Step("evaluate", "exporters.evaluate:run", "offline report vs popular and item-to-item"),
    Step("refit", "exporters.two_tower:refit", "released towers + index on all events"),
    Step("release", "exporters.release:publish", "model versions + a release"),
)
STEP_NAMES = [s.name for s in STEPS]
# Steps whose output depends on the offline engine (the registry holds FileSources or
# SparkSources): done only if done with the same engine.
ENGINE_STEPS = ("features", "feast_apply", "feast_materialize")


def _snapshot(settings: Settings) -> str:
    meta = settings.raw_dir / "meta.json"
    if not meta.exists():
        raise UserError(
            f"no data in {settings.raw_dir}: run `recstack data generate` or `recstack data import`"
        )
    return str(json.loads(meta.read_text())["snapshot"])


def _fold_added_items(settings: Settings, snapshot: str, progress: Callable[[str], None]) -> str:
    """Items added to the served releases since their training (``recstack items add``)
    join the raw item table before the split, so the release built now indexes them
    (exporters/item_delta.py ``fold``); returns the snapshot to train on."""
    from exporters.item_delta import fold
    from exporters.release_state import load_state

    served = load_state(settings).serving
    n = sum(fold(settings, rid) for rid in served)
    if not n:
        return snapshot
    progress(f"folded {n:,} items added to releases {served} into the raw item table")
    return _snapshot(settings)


def _marker(settings: Settings, step: str) -> Path:
    return settings.work_dir / ".steps" / f"{step}.json"


def _done(settings: Settings, step: str, snapshot: str) -> bool:
    try:
        marker = json.loads(_marker(settings, step).read_text())
    except (OSError, ValueError):
        return False
    if step in ENGINE_STEPS and marker.get("engine", "pandas") != settings.offline_engine:
        return False
    return bool(marker.get("snapshot") == snapshot)


def run(
    settings: Settings,
    *,
    from_step: str | None = None,
    only: str | None = None,
    progress: Callable[[str], None] = print,
) -> list[str]:
    """Run the pipeline; return the names of the steps that ran (skipped ones excluded)."""
    for name in (from_step, only):
        if name is not None and name not in STEP_NAMES:
            raise UserError(f"unknown step {name!r}; steps: {', '.join(STEP_NAMES)}")
    snapshot = _snapshot(settings)
    if only in (None, STEP_NAMES[0]) and from_step in (None, STEP_NAMES[0]):
        snapshot = _fold_added_items(settings, snapshot, progress)
    # Preconditions of later steps, checked before the first one runs: the last step
    # publishes into the model repository, which must hold the committed configs.
    prepare_repository(settings)
    start = STEP_NAMES.index(from_step) if from_step else 0
    if from_step:
        for step in STEPS[start:]:
            _marker(settings, step.name).unlink(missing_ok=True)
    ran: list[str] = []
    total = len(STEPS)
    for i, step in enumerate(STEPS, 1):
        if only is not None and step.name != only:
            continue
        if only is None and _done(settings, step.name, snapshot):
            progress(f"[{i}/{total}] {step.name}: done earlier, skipped")
            continue
        progress(f"[{i}/{total}] {step.name}: {step.what} ...")
        t0 = time.perf_counter()
        step.function()(settings)
        seconds = time.perf_counter() - t0
        marker = _marker(settings, step.name)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(
            json.dumps(
                {
                    "snapshot": snapshot,
                    "seconds": round(seconds, 2),
                    "engine": settings.offline_engine,
                }
            )
        )
        progress(f"[{i}/{total}] {step.name}: finished in {seconds:.1f} s")
        ran.append(step.name)
    return ran


def cli(args: argparse.Namespace) -> int:
    """``recstack train [--from-step S] [--only S] [--list-steps]``."""
    if args.list_steps:
        for i, step in enumerate(STEPS, 1):
            print(f"{i:2d}. {step.name:18s} {step.what}")
        return 0
    t0 = time.perf_counter()
    settings = get_settings()
    overrides = {
        name: getattr(args, name)
        for name in (
            "force_release",
            "split_mode",
            "split_val_days",
            "split_test_days",
            "split_val_last",
            "split_test_last",
            "split_light_last",
            "split_windows",
            "ranker_prior",
            "offline_engine",
        )
        if getattr(args, name, None) is not None
    }
    if overrides:
        settings = settings.model_copy(update=overrides)
    if settings.offline_engine == "spark":
        from exporters.spark_engine import require_spark

        require_spark()  # before the first step, not after the split
    run(settings, from_step=args.from_step, only=args.only)
    print(f"offline pipeline finished in {time.perf_counter() - t0:.0f} s")
    return 0

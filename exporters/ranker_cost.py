"""``recstack bench ranker``: NDCG@10 against the ranker's serving cost.

The ranker is the largest item of the request budget (candidates × trees). This bench
takes the trained ranker of ``work/`` and the test-split requests of the evaluation, builds
the merged candidate rows once (the sources at their serving quotas, point-in-time
features, the shared assembly), then for every (first N merged candidates ranked, trees
used) pair reports NDCG@10 of the ranked top 10 and the single-threaded time to score
that many rows with that many trees — the numbers to choose the serving point from.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from exporters import metrics
from exporters.candidates import Quotas, SourceModel
from exporters.evaluate import TOP_K, test_requests, top_lists
from exporters.rank_layout import Layout
from exporters.ranker_train import (
    candidate_model_path,
    candidate_rows,
    load_booster,
    load_manifest,
    merged_candidates,
)
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

CANDIDATES: tuple[int, ...] = (25, 50, 100, 200, 300, 400)
TREE_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 1.0)


def _time_ms(fn: Any, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


def run(settings: Settings, max_users: int = 2000, repeats: int = 30) -> list[dict[str, Any]]:
    """The curve as rows of {candidates, trees, ndcg@10, recall@10, ms_per_request}."""
    at, users, relevant, _ = test_requests(settings, max_users)
    manifest = load_manifest(settings)
    layout = Layout.from_json(manifest["layout"])
    model = SourceModel.load(candidate_model_path(settings, "eval"))
    quotas = Quotas.from_json(manifest.get("quotas"))
    merged = merged_candidates(settings, users, at, model, quotas, int(manifest["ann_depth"]))
    cands = candidate_rows(settings, layout, users, at, merged)
    booster = load_booster(settings)
    n_trees = booster.num_trees()
    probe = cands.rows[cands.query == 0]

    out: list[dict[str, Any]] = []
    for trees in sorted({max(1, round(n_trees * f)) for f in TREE_FRACTIONS}):
        all_scores = booster.predict(cands.rows, raw_score=True, num_iteration=trees)
        for n in CANDIDATES:
            keep = cands.position < n
            sub_scores = np.where(keep, all_scores, -np.inf)
            lists = top_lists(cands, sub_scores, len(users))
            ndcg = metrics.ndcg_at_k(lists, relevant, TOP_K)
            recall = metrics.recall_at_k(lists, relevant, TOP_K)
            rows = np.resize(probe, (n, probe.shape[1])).astype(np.float32)
            ms = _time_ms(
                lambda r=rows, t=trees: booster.predict(
                    r, raw_score=True, num_iteration=t, num_threads=1
                ),
                repeats,
            )
            out.append(
                {
                    "candidates": n,
                    "trees": trees,
                    "ndcg@10": round(ndcg, 4),
                    "recall@10": round(recall, 4),
                    "ms_per_request": round(ms, 3),
                }
            )
            log.info("candidates %d trees %d: ndcg@10 %.4f, %.3f ms", n, trees, ndcg, ms)
    return out


def markdown(rows: list[dict[str, Any]], n_users: int) -> str:
    lines = [
        "# Ranker cost vs quality",
        "",
        f"Test-split requests ({n_users} users); NDCG@10 of the ranked top 10 when the "
        "first N merged candidates are ranked with T trees; "
        "cost = LightGBM single-thread time to score N rows (median).",
        "",
        "| candidates | trees | NDCG@10 | recall@10 | ms / request |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['candidates']} | {r['trees']} | {r['ndcg@10']:.4f} | {r['recall@10']:.4f} "
        f"| {r['ms_per_request']:.3f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def cli(args: argparse.Namespace) -> int:
    """``recstack bench ranker``: print the curve; write reports/ranker_cost.{md,json}."""
    settings = get_settings()
    rows = run(settings, max_users=args.users, repeats=args.repeats)
    out = Path(settings.reports_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ranker_cost.json").write_text(json.dumps(rows, indent=2))
    text = markdown(rows, args.users)
    (out / "ranker_cost.md").write_text(text)
    print(text)
    return 0

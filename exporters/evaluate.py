"""Offline evaluation on the test split (``recstack evaluate``, pipeline step ``evaluate``):
``<reports_dir>/report.md`` and ``report.json``.

Protocol (the same for any data set, generated or imported):

- Requests: every user with a click or purchase in the test window (``>= val_end``; a
  seeded sample of at most ``max_users``), each one request made at ``val_end``.
- Relevance: the user's best test-window event per item, graded (click 1, purchase 2);
  NDCG uses gain ``2^g - 1`` (exporters/metrics.py).
- Candidates: what serving merges (exporters/candidates.py): the ANN over the exported
  towers + the FAISS index, item-to-item neighbours of the user's seen items and popular
  items, the sources built from events before ``val_end`` only; every list excludes the
  user's seen items before ``val_end`` (exporters/seen.py) and items not yet created.
- Pipeline: those candidates ranked by the LightGBM ranker on features from Feast as of
  ``val_end`` through the shared feature assembly.
- Baselines on the same candidates and filters, each in its own order: most-popular
  (consumption count before ``val_end``), item-to-item (EASE or co-visitation scores of
  the user's seen items) and the two-tower retrieval alone.
- Gate: the pipeline's NDCG@10 must exceed both most-popular and item-to-item (by
  ``gate_margin``); ``exporters/release.py`` refuses to publish otherwise, unless forced.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from exporters import candidates, metrics
from exporters.labels import LABELS, graded_labels, relevance
from exporters.rank_layout import Layout
from exporters.ranker_prior import GATE_BASELINES, SOURCE_BASELINES
from exporters.ranker_train import (
    CandidateRows,
    candidate_model_path,
    candidate_rows,
    load_booster,
    load_manifest,
    merged_candidates,
    unix_seconds,
)
from exporters.raw_tables import read_meta, read_table
from exporters.split import load_split
from orchestrator.postprocess import Candidates, PostprocessConfig, select
from recstack.atomic_files import write_json_atomic, write_text_atomic
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

TOP_K = 10


@dataclass(frozen=True)
class EvalParams:
    max_users: int = 5000  # test users sampled (seeded) for the report
    # The pipeline's NDCG@10 must exceed the best baseline's by this fraction to pass.
    gate_margin: float = 0.0


def popularity_ranking(interactions: pd.DataFrame, before: pd.Timestamp, k: int) -> np.ndarray:
    """The ``k`` items with the most clicks and purchases before ``before`` (ties broken by
    item id), most popular first."""
    past = interactions[(interactions["timestamp"] < before)]
    past = past[past["event"].isin(list(LABELS))]
    counts = past.groupby("item_id").size().reset_index(name="n")
    counts = counts.sort_values(["n", "item_id"], ascending=[False, True], kind="stable")
    return counts["item_id"].to_numpy(np.int64)[:k]


def _list_metrics(
    lists: np.ndarray,
    relevant: list[dict[int, float]],
    categories: dict[int, int],
    n_catalog: int,
    recall_ks: tuple[int, ...] = (TOP_K,),
) -> tuple[dict[str, float], np.ndarray]:
    """The list's metrics (rounded) and its per-user NDCG@10 (unrounded, aligned across
    lists scored against the same ``relevant``: the bootstrap interval's input)."""
    out = {f"recall@{k}": metrics.recall_at_k(lists, relevant, k) for k in recall_ks}
    ndcg_users = metrics.ndcg_per_user(lists, relevant, TOP_K)
    out[f"ndcg@{TOP_K}"] = metrics.ndcg_mean(ndcg_users)
    out[f"coverage@{TOP_K}"] = metrics.catalog_coverage(lists, n_catalog, TOP_K)
    out[f"distinct_categories@{TOP_K}"] = metrics.category_diversity(lists, categories, TOP_K)
    out[f"category_entropy@{TOP_K}"] = metrics.category_entropy(lists, categories, TOP_K)
    return {k: round(v, 5) for k, v in out.items()}, ndcg_users


def top_lists(cands: CandidateRows, scores: np.ndarray, n_users: int) -> np.ndarray:
    """Top-10 item ids of each request [n_users, 10] from per-row scores (-1 padded);
    ties keep retrieval order."""
    ranked = np.full((n_users, TOP_K), -1, dtype=np.int64)
    order, rank_in_q = metrics.rank_within_query(cands.query, -scores, cands.position, n_users)
    keep = rank_in_q < TOP_K
    ranked[cands.query[order][keep], rank_in_q[keep]] = cands.row_items[order][keep]
    return ranked


def test_requests(
    settings: Settings, max_users: int, interactions: pd.DataFrame | None = None
) -> tuple[pd.DatetimeIndex, np.ndarray, list[dict[int, float]], int]:
    """The evaluation's requests: test users with a click or purchase, each as of the
    start of their test window (the validation end of a time split), at most
    ``max_users`` of them (seeded sample). Returns (request time of each user, user ids,
    graded relevant items per user, number of test users before sampling)."""
    split = load_split(settings)
    if interactions is None:
        interactions = read_table(settings, "interactions")
    labels = graded_labels(split.test(interactions))
    if labels.empty:
        raise UserError("no clicks or purchases in the test window: nothing to evaluate")
    users = np.sort(labels["user_id"].unique())
    n_test_users = len(users)
    if len(users) > max_users:
        rng = np.random.default_rng(settings.seed)
        users = np.sort(rng.choice(users, max_users, replace=False))
    return split.test_times(users), users, relevance(labels, users), n_test_users


def served_lists(
    cands: CandidateRows,
    scores: np.ndarray,
    times: pd.DatetimeIndex,
    post: PostprocessConfig,
    items: pd.DataFrame,
) -> np.ndarray:
    """Top-10 of each request after the release's post-processing (freshness boost,
    category cap: orchestrator/postprocess.py ``select``), exactly as the orchestrator
    answers."""
    row_items = cands.row_items
    category = items.set_index("item_id")["category"]
    row_cat = category.reindex(row_items).fillna(-1).to_numpy(np.int64)
    created = candidates.created_seconds(items)
    row_created = created.reindex(row_items).fillna(0.0).to_numpy(np.float64)
    now = unix_seconds(times)
    out = np.full((len(cands.user_ids), TOP_K), -1, dtype=np.int64)
    order = np.argsort(cands.query, kind="stable")
    bounds = np.searchsorted(cands.query[order], np.arange(len(cands.user_ids) + 1))
    for q in range(len(cands.user_ids)):
        rows = order[bounds[q] : bounds[q + 1]]
        if len(rows) == 0:
            continue
        c = Candidates(
            row_items[rows],
            scores[rows],
            row_cat[rows],
            row_created[rows],
            np.full(len(rows), "", dtype=object),
        )
        top, _ = select(c, TOP_K, float(now[q]), post)
        out[q, : len(top.item_ids)] = top.item_ids
    return out


def _ranked_lists(
    cands: CandidateRows,
    booster: Any,
    times: pd.DatetimeIndex,
    post: PostprocessConfig,
    items: pd.DataFrame,
) -> dict[str, np.ndarray]:
    """Top-10 of each request as served (ranker, then post-processing), by the ranker
    alone, and by each source alone (same candidates, same filters)."""
    n_users = len(cands.user_ids)
    scores = np.asarray(booster.predict(cands.rows, raw_score=True), dtype=np.float64)
    lists = {
        "pipeline": served_lists(cands, scores, times, post, items),
        "ranker_only": top_lists(cands, scores, n_users),
    }
    for name, feature in SOURCE_BASELINES.items():
        order = cands.source_order(feature).astype(np.float64)
        # Rows a source did not find sort last (ABSENT_RANK), in merged order.
        lists[name] = top_lists(cands, -order, n_users)
    return lists


def run(settings: Settings, out: Path | None = None, params: EvalParams | None = None) -> dict:
    """Evaluate the trained pipeline against most-popular and item-to-item on the test
    split; write ``report.md`` and ``report.json`` into ``out`` (default
    ``settings.reports_dir``) and return the report dict."""
    params = params or EvalParams()
    t0 = time.perf_counter()
    interactions = read_table(settings, "interactions")
    items = read_table(settings, "items", columns=["item_id", "category", "created_at"])
    at, users, relevant, n_test_users = test_requests(settings, params.max_users, interactions)
    post = PostprocessConfig.for_data(read_meta(settings))
    n_catalog = len(items)
    categories = dict(zip(items["item_id"].tolist(), items["category"].tolist(), strict=True))

    manifest = load_manifest(settings)
    layout = Layout.from_json(manifest["layout"])
    quotas = candidates.Quotas.from_json(manifest.get("quotas"))
    model = candidates.SourceModel.load(candidate_model_path(settings, "eval"))
    merged = merged_candidates(
        settings, users, at, model, quotas, int(manifest["ann_depth"]), interactions
    )
    cands = candidate_rows(settings, layout, users, at, merged)
    lists = _ranked_lists(cands, load_booster(settings), at, post, items)
    scored = {
        name: _list_metrics(top, relevant, categories, n_catalog) for name, top in lists.items()
    }
    report_lists = {name: m for name, (m, _) in scored.items()}
    ndcg_users = {name: u for name, (_, u) in scored.items()}
    width = merged[0].shape[1]
    recall_all = metrics.recall_at_k(merged[0], relevant, max(width, 1))
    report_lists["pipeline"][f"candidate_recall@{width}"] = round(recall_all, 5)

    key = f"ndcg@{TOP_K}"
    pipeline = report_lists["pipeline"][key]
    baselines = {n: report_lists[n][key] for n in GATE_BASELINES}
    best_name = max(baselines, key=lambda n: baselines[n])
    best = baselines[best_name]
    ratios = {
        f"{key}_vs_{n}": round(pipeline / v, 3) if v > 0 else None for n, v in baselines.items()
    }
    passed = pipeline > best * (1.0 + params.gate_margin)
    # How sure the pipeline-vs-best-baseline difference is on this sample of users (the
    # same users for both lists): reported beside the gate, which it does not change.
    lo, hi = metrics.paired_bootstrap_ci(
        ndcg_users["pipeline"], ndcg_users[best_name], seed=settings.seed
    )
    report: dict[str, Any] = {
        "request_time": at[0].isoformat()
        if at.nunique() == 1
        else f"each user's first test event ({load_split(settings).mode} split)",
        "test_users": n_test_users,
        "evaluated_users": len(users),
        "n_catalog": n_catalog,
        "relevance": {"click": LABELS["click"], "purchase": LABELS["purchase"]},
        "ranker_candidates": int(width),
        "quotas": quotas.to_json(),
        "postprocess": post.to_json(),
        "seen_filtered": True,
        "lists": report_lists,
        # Kept under their old names for readers of older reports.
        "pipeline": report_lists["pipeline"],
        "retrieval": report_lists["retrieval"],
        "popularity": report_lists["popularity"],
        "item_to_item": report_lists["item_to_item"],
        "pipeline_vs_popularity": {
            f"{key}_ratio": ratios[f"{key}_vs_popularity"],
            f"{key}_absolute": round(pipeline - baselines["popularity"], 5),
        },
        "gate": {
            "passed": bool(passed),
            "margin": params.gate_margin,
            "best_baseline": best_name,
            "best_baseline_ndcg@10": best,
            "pipeline_ndcg@10": pipeline,
            **ratios,
            f"{key}_diff_vs_best": round(pipeline - best, 5),
            f"{key}_diff_vs_best_ci95": [round(lo, 5), round(hi, 5)],
        },
        "warnings": _warnings(settings, manifest),
        "params": asdict(params),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(out) if out else settings.reports_dir
    _write(out, report)
    log.info("report: %s", json.dumps(report["gate"]))
    return report


def _warnings(settings: Settings, ranker_manifest: dict[str, Any]) -> list[str]:
    """Small-data and over-fitting warnings of the training steps, collected for the
    report and the release (each step also logged its own)."""
    out = list(ranker_manifest.get("stats", {}).get("warnings", []))
    path = settings.work_dir / "two_tower.json"
    if path.exists():
        out += list(json.loads(path.read_text()).get("warnings", []))
    return out


def _write(out: Path, report: dict[str, Any]) -> None:
    write_json_atomic(out / "report.json", report)
    write_text_atomic(out / "report.md", markdown(report))


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table, the pipeline beside each baseline."""
    key = f"ndcg@{TOP_K}"
    gate = report["gate"]
    verdict = "PASSES" if gate["passed"] else "FAILS"
    lists = report["lists"]
    columns = ["pipeline", "ranker_only", *SOURCE_BASELINES]
    lines = [
        "# recstack offline evaluation",
        "",
        f"Test split, requests as of {report['request_time']}: {report['evaluated_users']} "
        f"users with a click or purchase in the test window (of {report['test_users']}), "
        f"catalog of {report['n_catalog']} items. Relevance is graded (click 1, purchase 2); "
        "NDCG uses gain 2^g − 1. Every list excludes the user's already-seen items. The "
        f"pipeline ranks up to {report['ranker_candidates']} merged candidates (quotas "
        f"{report['quotas']}) and post-processes them as served "
        f"({report.get('postprocess')}); `ranker only` is the ranker's order before "
        "post-processing; each baseline orders the same candidates by its own score.",
        "",
        f"**Quality gate {verdict}: pipeline NDCG@10 {gate['pipeline_ndcg@10']:.4f}; "
        f"best baseline {gate['best_baseline']} {gate['best_baseline_ndcg@10']:.4f}; "
        + ", ".join(
            f"{k.removeprefix(key + '_')} {v:.2f}×"
            for k, v in gate.items()
            if k.startswith(f"{key}_vs_") and v is not None
        )
        + ".**",
        *_difference_line(gate, key, report.get("evaluated_users")),
        "",
        "| metric | " + " | ".join(c.replace("_", " ") for c in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    names: list[str] = []
    for c in columns:
        names += [n for n in lists[c] if n not in names]
    for name in names:
        cells = [lists.get(c, {}).get(name) for c in columns]
        text = ["—" if v is None else f"{v:.4f}" for v in cells]
        lines.append(f"| {name} | {' | '.join(text)} |")
    if report.get("warnings"):
        lines += ["", "Warnings:", *(f"- {w}" for w in report["warnings"])]
    lines += [
        "",
        "coverage@10: share of the catalog in anyone's top 10; distinct_categories@10: mean "
        "number of categories in a top 10; category_entropy@10: mean Shannon entropy (bits) "
        "of a top 10's categories. Formulas: exporters/metrics.py.",
        "",
    ]
    return "\n".join(lines)


def _difference_line(gate: dict[str, Any], key: str, users: object) -> list[str]:
    """The pipeline's lead over the best baseline with its bootstrap interval (reports
    written before it was added have none)."""
    ci = gate.get(f"{key}_diff_vs_best_ci95")
    if ci is None:
        return []
    diff = gate[f"{key}_diff_vs_best"]
    sure = "above 0" if ci[0] > 0 else "below 0" if ci[1] < 0 else "includes 0"
    return [
        "",
        f"Pipeline − {gate['best_baseline']}: NDCG@10 {diff:+.4f}, 95 % interval "
        f"{ci[0]:+.4f} … {ci[1]:+.4f} ({sure}; paired bootstrap over the {users} users).",
    ]


def cli(args: argparse.Namespace) -> int:
    """``recstack evaluate [--out DIR]``."""
    settings = get_settings()
    out = Path(args.out) if getattr(args, "out", None) else None
    report = run(settings, out)
    print(markdown(report))
    print(f"written to {out or settings.reports_dir}")
    return 0

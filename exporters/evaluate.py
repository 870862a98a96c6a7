"""Offline evaluation on the test split (``recstack evaluate``, pipeline step ``evaluate``):
``<reports_dir>/report.md`` and ``report.json``.

Protocol (the same for any data set, generated or imported):

- Requests: every user with a click or purchase in the test window (``>= val_end``; a
  seeded sample of at most ``max_users``), each one request made at ``val_end``.
- Relevance: the user's best test-window event per item, graded (click 1, purchase 2);
  NDCG uses gain ``2^g - 1`` (exporters/metrics.py).
- Pipeline: retrieval (the exported user tower + the FAISS index) → the top
  ``n_candidates`` (as the ranker was trained) ranked by the LightGBM ranker on features
  from Feast as of ``val_end`` through the shared feature assembly.
- Popularity baseline: the items with the most clicks and purchases before ``val_end``
  (train and validation windows), the same list for every user.
- Nothing is excluded from either list (no "seen item" filter), so both are judged alike.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from exporters import metrics, retrieval
from exporters.rank_layout import Layout
from exporters.ranker_train import (
    LABELS,
    CandidateRows,
    candidate_rows,
    existing_only,
    graded_labels,
    load_booster,
    load_manifest,
)
from exporters.raw_tables import read_table
from exporters.split import load_split
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

RETRIEVAL_KS: tuple[int, ...] = (10, 100, 500)
TOP_K = 10


@dataclass(frozen=True)
class EvalParams:
    max_users: int = 5000  # test users sampled (seeded) for the report
    retrieval_k: int = max(RETRIEVAL_KS)


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
) -> dict[str, float]:
    out = {f"recall@{k}": metrics.recall_at_k(lists, relevant, k) for k in recall_ks}
    out[f"ndcg@{TOP_K}"] = metrics.ndcg_at_k(lists, relevant, TOP_K)
    out[f"coverage@{TOP_K}"] = metrics.catalog_coverage(lists, n_catalog, TOP_K)
    out[f"distinct_categories@{TOP_K}"] = metrics.category_diversity(lists, categories, TOP_K)
    out[f"category_entropy@{TOP_K}"] = metrics.category_entropy(lists, categories, TOP_K)
    return {k: round(v, 5) for k, v in out.items()}


def top_lists(cands: CandidateRows, scores: np.ndarray, n_users: int) -> np.ndarray:
    """Top-10 item ids of each request [n_users, 10] from per-row scores (-1 padded);
    ties keep retrieval order."""
    ranked = np.full((n_users, TOP_K), -1, dtype=np.int64)
    # Sort rows by (query, -score); ties keep retrieval order (stable).
    order = np.lexsort((cands.position, -scores, cands.query))
    q_sorted = cands.query[order]
    starts = np.searchsorted(q_sorted, np.arange(n_users))
    rank_in_q = np.arange(len(order)) - starts[q_sorted]
    keep = rank_in_q < TOP_K
    ranked[q_sorted[keep], rank_in_q[keep]] = cands.row_items[order][keep]
    return ranked


def _rank(
    settings: Settings, users: np.ndarray, at: pd.Timestamp, retrieved: tuple[np.ndarray, ...]
) -> np.ndarray:
    """Top-10 of each user after ranking the first ``n_candidates`` retrieved items."""
    manifest = load_manifest(settings)
    layout = Layout.from_json(manifest["layout"])
    booster = load_booster(settings)
    k = int(manifest["n_candidates"])
    cands = candidate_rows(settings, layout, users, at, k, retrieved=(retrieved[0], retrieved[1]))
    scores = np.asarray(booster.predict(cands.rows, raw_score=True), dtype=np.float64)
    return top_lists(cands, scores, len(users))


def test_requests(
    settings: Settings, max_users: int, interactions: pd.DataFrame | None = None
) -> tuple[pd.Timestamp, np.ndarray, list[dict[int, float]], int]:
    """The evaluation's requests: test users with a click or purchase, as of the end of
    validation, at most ``max_users`` of them (seeded sample). Returns (request time, user
    ids, graded relevant items per user, number of test users before sampling)."""
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
    by_user = {
        u: dict(zip(g["item_id"], g["label"], strict=True)) for u, g in labels.groupby("user_id")
    }
    relevant = [{int(i): float(g) for i, g in by_user[u].items()} for u in users]
    return pd.Timestamp(split.val_end), users, relevant, n_test_users


def run(settings: Settings, out: Path | None = None, params: EvalParams | None = None) -> dict:
    """Evaluate the trained pipeline against popularity on the test split; write
    ``report.md`` and ``report.json`` into ``out`` (default ``settings.reports_dir``) and
    return the report dict."""
    params = params or EvalParams()
    t0 = time.perf_counter()
    interactions = read_table(settings, "interactions")
    items = read_table(settings, "items", columns=["item_id", "category"])
    at, users, relevant, n_test_users = test_requests(settings, params.max_users, interactions)
    n_catalog = len(items)
    categories = dict(zip(items["item_id"].tolist(), items["category"].tolist(), strict=True))

    k = min(params.retrieval_k, n_catalog)
    ret = retrieval.retrieve(settings, users, at, k)
    retrieved = existing_only(settings, np.asarray(ret[0], dtype=np.int64), ret[1], at)
    ret_items = retrieved[0]
    ks = tuple(x for x in RETRIEVAL_KS if x <= k) or (k,)
    retrieval_only = _list_metrics(ret_items, relevant, categories, n_catalog, ks)
    pipeline = _list_metrics(_rank(settings, users, at, retrieved), relevant, categories, n_catalog)
    popular = popularity_ranking(interactions, at, k)
    pop_lists = np.broadcast_to(popular, (len(users), len(popular)))
    popularity = _list_metrics(pop_lists, relevant, categories, n_catalog, ks)

    key = f"ndcg@{TOP_K}"
    ndcg_ratio = pipeline[key] / popularity[key] if popularity[key] > 0 else float("inf")
    report: dict[str, Any] = {
        "request_time": at.isoformat(),
        "test_users": n_test_users,
        "evaluated_users": len(users),
        "n_catalog": n_catalog,
        "relevance": {"click": LABELS["click"], "purchase": LABELS["purchase"]},
        "ranker_candidates": int(load_manifest(settings)["n_candidates"]),
        "retrieval": retrieval_only,
        "pipeline": pipeline,
        "popularity": popularity,
        "pipeline_vs_popularity": {
            f"{key}_ratio": round(ndcg_ratio, 3),
            f"{key}_absolute": round(pipeline[key] - popularity[key], 5),
        },
        "params": asdict(params),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out = Path(out) if out else settings.reports_dir
    _write(out, report)
    log.info("report: %s", json.dumps(report["pipeline_vs_popularity"]))
    return report


def _write(out: Path, report: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (
        ("report.json", json.dumps(report, indent=2) + "\n"),
        ("report.md", markdown(report)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: one table, each metric beside the popularity baseline."""
    key = f"ndcg@{TOP_K}"
    cmp = report["pipeline_vs_popularity"]
    lines = [
        "# recstack offline evaluation",
        "",
        f"Test split, requests as of {report['request_time']}: {report['evaluated_users']} "
        f"users with a click or purchase in the test window (of {report['test_users']}), "
        f"catalog of {report['n_catalog']} items. Relevance is graded (click 1, purchase 2); "
        f"NDCG uses gain 2^g − 1. The pipeline ranks the top {report['ranker_candidates']} "
        "retrieved items; the popularity baseline is the items with the most clicks and "
        "purchases before the request time, the same for every user. Nothing is excluded "
        "from either list.",
        "",
        f"**The pipeline's NDCG@10 is {cmp[f'{key}_ratio']:.2f}× popularity's "
        f"({report['pipeline'][key]:.4f} vs {report['popularity'][key]:.4f}, "
        f"{cmp[f'{key}_absolute']:+.4f} absolute).**",
        "",
        "| metric | retrieval + ranking | retrieval only | popularity |",
        "| --- | --- | --- | --- |",
    ]
    names = list(report["retrieval"])
    for name in [*names, *(n for n in report["pipeline"] if n not in names)]:
        cells = [report[s].get(name) for s in ("pipeline", "retrieval", "popularity")]
        text = ["—" if v is None else f"{v:.4f}" for v in cells]
        lines.append(f"| {name} | {' | '.join(text)} |")
    lines += [
        "",
        "coverage@10: share of the catalog in anyone's top 10; distinct_categories@10: mean "
        "number of categories in a top 10; category_entropy@10: mean Shannon entropy (bits) "
        "of a top 10's categories. Formulas: exporters/metrics.py.",
        "",
    ]
    return "\n".join(lines)


def cli(args: argparse.Namespace) -> int:
    """``recstack evaluate [--out DIR]``."""
    settings = get_settings()
    out = Path(args.out) if getattr(args, "out", None) else None
    report = run(settings, out)
    print(markdown(report))
    print(f"written to {out or settings.reports_dir}")
    return 0

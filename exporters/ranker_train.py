"""Train the LightGBM lambdarank ranker on the candidates the two-tower retrieves (pipeline
step ``ranker``), so training sees what serving sees.

Queries: users with a click or purchase in a ranker window (the validation window, and
the split's earlier windows: exporters/split.py), each a request made at the window's
start (the towers and the index were trained on data before the earliest window).
Candidates: the merged sources as serving merges them, as of that time, the non-ANN ones
built from the events before it. Labels: the user's best event on the item in the window
(click 1, purchase 2, else 0).
Model: boosted from a prior, the better gate baseline's order on the validation window's
training requests (``exporters/ranker_prior.py``; ``RECSTACK_RANKER_PRIOR``), so trees
that learn little leave that order, not noise.
Features: Feast ``get_historical_features`` point-in-time at the request time for the
``ranking`` service's user and item features, the user tower's embedding, the index's
item vectors, all put together by ``exporters.feature_assembly`` (the serving code).

Outputs in ``work/``: ``ranker.txt`` (LightGBM, best iteration only), ``ranker.json``
(:func:`load_manifest`: layout, ordered feature names, parameters, statistics) and
``ranker_sample.npy`` (real feature rows for the export's parity check).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightgbm as lgb
import numpy as np
import pandas as pd
from tqdm import tqdm

from exporters import candidates, ease_lambda, feature_assembly, ranker_prior, retrieval
from exporters.candidates import CANDIDATE_FEATURES
from exporters.index_build import ITEM_IDS_FILE
from exporters.labels import LABELS, graded_labels
from exporters.rank_layout import ITEM_KEY, USER_KEY, Layout
from exporters.raw_tables import read_meta, read_table
from exporters.seen import seen_events, seen_lists
from exporters.split import Split, load_split
from recstack.atomic_files import write_json_atomic
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

MODEL_FILE = "ranker.txt"
MANIFEST_FILE = "ranker.json"
SAMPLE_FILE = "ranker_sample.npy"
EASE_LAMBDA_FILE = "ease_lambda.json"  # the candidates step's λ choice
SERVICE = "ranking"


@dataclass(frozen=True)
class RankerParams:
    """Everything that shapes the ranker. Serving cost grows with candidates × trees ×
    depth (DESIGN.md: 500 rows × 300 trees of 63 leaves ≈ 10 ms single-threaded)."""

    ann_depth: int = 500  # retrieved from the index per query, as serving does
    quotas: candidates.Quotas = field(default_factory=candidates.Quotas)  # as serving merges
    max_queries: int = 3000  # sampled (seeded) from the validation users
    # Fewer queries with a positive candidate than this: the report warns (small data).
    min_queries_warning: int = 500
    holdout_fraction: float = 0.2  # queries held out for early stopping
    # Small trees, a slow rate and patient early stopping: on sparse data (a few hundred
    # queries) larger trees over-fit in a handful of rounds (docs/quality.md).
    num_trees: int = 400
    num_leaves: int = 7
    learning_rate: float = 0.05
    min_data_in_leaf: int = 100
    feature_fraction: float = 0.9
    bagging_fraction: float = 0.8
    lambda_l2: float = 1.0
    early_stopping_rounds: int = 50
    # Retrain on all queries (holdout included) with the early-stopped number of trees.
    refit_all_queries: bool = True
    # Rows LightGBM trains on, at most: beyond it every positive row stays and each
    # query keeps the same seeded share of its negatives (the early-stopping holdout keeps
    # whole lists, as serving ranks them). LightGBM's time grows with rows: 5 windows ×
    # 3,000 queries × ~330 candidates (a MovieLens-1M-sized file) is ~4.4M rows.
    max_train_rows: int = 1_500_000
    eval_at: int = 10
    num_threads: int = 2
    sample_rows: int = 2000  # saved for the export's parity check

    def lightgbm(self, seed: int) -> dict[str, Any]:
        return {
            "objective": "lambdarank",
            "metric": "ndcg",
            "eval_at": [self.eval_at],
            "num_leaves": self.num_leaves,
            "learning_rate": self.learning_rate,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1,
            "lambda_l2": self.lambda_l2,
            "num_threads": self.num_threads,
            "seed": seed,
            "deterministic": True,
            "force_row_wise": True,
            "verbosity": -1,
        }


# --- Feast point-in-time features -----------------------------------------------------------


def point_in_time_features(
    settings: Settings,
    key: str,
    ids: np.ndarray,
    at: pd.Timestamp | pd.DatetimeIndex,
    refs: Sequence[str],
) -> pd.DataFrame:
    """Feature values of entities ``ids`` (join key ``key``) as of ``at`` (one time, or
    one per row): ``feast_ops.point_in_time`` on the settings' offline store."""
    from exporters.feast_ops import offline_feature_store, point_in_time

    ids = np.asarray(ids, dtype=np.int64)
    if isinstance(at, pd.DatetimeIndex):
        times = at
    else:
        times = pd.DatetimeIndex(np.full(len(ids), pd.Timestamp(at).value)).tz_localize("UTC")
    return point_in_time(settings, offline_feature_store(settings), key, ids, times, refs)


def layout_for(settings: Settings, n_categories: int) -> Layout:
    """The assembly layout of the Feast ``ranking`` feature service (from the registry)."""
    from exporters.feast_ops import feature_store, service_features

    return feature_assembly.layout_from_service(
        service_features(feature_store(settings), SERVICE), n_categories, CANDIDATE_FEATURES
    )


def n_categories_of(settings: Settings) -> int:
    """Length of the category-affinity vectors: the number of category codes in the data
    (as exporters/feature_tables.py sizes them)."""
    meta = read_meta(settings)
    n = int(str(meta.get("n_categories") or 0))
    items = read_table(settings, "items", columns=["category"])
    if len(items):
        n = max(n, int(items["category"].max()) + 1)
    if n <= 0:
        raise UserError("the data has no item categories")
    return n


# --- candidates and their ranker rows ---------------------------------------------------------


@dataclass
class CandidateRows:
    """Merged candidates of Q requests and their ranker rows (only real candidates: lists
    are padded with -1)."""

    user_ids: np.ndarray  # [Q]
    items: np.ndarray  # [Q, K] item ids, merged order (ANN, item-to-item, popular), -1 padded
    source_features: np.ndarray  # [Q, K, S] candidates.CANDIDATE_FEATURES
    query: np.ndarray  # [R] request index of each row
    position: np.ndarray  # [R] position of each row in its merged list
    rows: np.ndarray  # [R, F] float32 ranker input

    @property
    def row_items(self) -> np.ndarray:
        return self.items[self.query, self.position]

    def source_order(self, feature: str) -> np.ndarray:
        """Per-row sort key that orders each request by one source (lower = better):
        ``c_ann_rank``, ``c_i2i_rank`` or ``c_pop_rank``."""
        j = CANDIDATE_FEATURES.index(feature)
        return self.source_features[self.query, self.position, j]


def candidate_model_path(settings: Settings, cut: str) -> Path:
    """The candidate-source model built from the events a split's requests may know:
    ``train`` (ranker training requests of the validation window), ``train_w<k>`` (those
    of ranker window k >= 1), ``eval`` (evaluation requests: all but the test window) or
    ``all`` (the release: every event)."""
    return settings.work_dir / f"candidates_{cut}.npz"


def window_cut(k: int) -> str:
    """The candidate-model cut of ranker window ``k``."""
    return "train" if k == 0 else f"train_w{k}"


def build_candidate_models(settings: Settings) -> None:
    """Pipeline step ``candidates``: the item-to-item, popularity and cold-start segment
    sources at each cut-off (see :func:`candidate_model_path`), over the index's catalog
    rows."""
    split = load_split(settings)
    interactions = read_table(settings, "interactions")
    item_ids = np.load(settings.work_dir / ITEM_IDS_FILE)
    events = seen_events(read_meta(settings), settings.seen_events)
    cuts = {
        **{window_cut(k): split.before_window(interactions, k) for k in range(split.windows)},
        "eval": split.not_test(interactions),
        "all": interactions,
    }
    items = read_table(settings, "items", columns=["item_id", "category", "created_at"])
    # The users' attributes (static: set at sign-up) define the cold-start segments.
    users = read_table(settings, "users", columns=["user_id", *candidates.SEGMENT_ATTRIBUTES])
    lam = _ease_lambda(settings, split, interactions, cuts[window_cut(0)], item_ids, events)
    for cut, events_known in cuts.items():
        model = candidates.build_model(
            events_known, item_ids, events, None, lam=lam, cut=cut, items=items, users=users
        )
        model.save(candidate_model_path(settings, cut))


def _ease_lambda(
    settings: Settings,
    split: Split,
    interactions: pd.DataFrame,
    known: pd.DataFrame,
    item_ids: np.ndarray,
    events: Sequence[str],
) -> float:
    """EASE's λ for every cut: the setting, or with ``ease_lambda_tune`` chosen on the
    validation window (exporters/ease_lambda.py); recorded in ``work/ease_lambda.json``."""
    if not settings.ease_lambda_tune:
        choice = ease_lambda.LambdaChoice(settings.ease_lambda, "setting", {}, 0)
    else:
        labels = graded_labels(split.window(interactions, 0))
        choice = ease_lambda.choose(
            known, labels, item_ids, events, settings.ease_lambda, seed=settings.seed
        )
    write_json_atomic(settings.work_dir / EASE_LAMBDA_FILE, choice.to_json())
    return choice.lam


def merged_candidates(
    settings: Settings,
    user_ids: np.ndarray,
    at: pd.Timestamp | pd.DatetimeIndex,
    model: candidates.SourceModel,
    quotas: candidates.Quotas,
    ann_depth: int,
    interactions: pd.DataFrame | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates serving would merge for each user at ``at``: ANN (``ann_depth``
    retrieved), item-to-item of the user's seen items before ``at`` and popular items,
    each without the user's seen items or items not created before ``at``, merged by
    :func:`exporters.candidates.gather`. Returns ``(items [Q, K] -1 padded,
    features [Q, K, S])``."""
    user_ids = np.asarray(user_ids, dtype=np.int64)
    times = _per_query(at, len(user_ids))
    if interactions is None:
        interactions = read_table(settings, "interactions")
    # Items not yet created at a request (the offline index holds the whole catalog) are
    # dropped by gather's filter, like every source's.
    ann_items, _ = retrieval.retrieve(settings, user_ids, times, ann_depth)
    ann_items = np.asarray(ann_items, dtype=np.int64)
    catalog = pd.Index(model.item_ids)
    born = _created_seconds(settings).reindex(model.item_ids).to_numpy(np.float64)
    seconds = unix_seconds(times)
    events = seen_events(read_meta(settings), settings.seen_events)
    seen = seen_lists(interactions, user_ids, events, before=times)
    out_rows: list[np.ndarray] = []
    out_feats: list[np.ndarray] = []
    for q in range(len(user_ids)):
        seen_rows = catalog.get_indexer(seen[q])
        blocked = seen_rows[seen_rows >= 0]
        # Strictly before: an import without creation times dates an item by its first
        # interaction, so an item "created" at the request's instant is one first met in
        # the very event the request is labelled by (candidates.exists_at).
        exists = candidates.exists_at(born, seconds[q])

        def allowed(
            rows: np.ndarray, blocked: np.ndarray = blocked, exists: np.ndarray = exists
        ) -> np.ndarray:
            return exists[rows] & ~np.isin(rows, blocked)

        ann = catalog.get_indexer(ann_items[q][ann_items[q] >= 0])
        rows, feats = candidates.gather(
            model, quotas, ann[ann >= 0], seen_rows, allowed, float(seconds[q])
        )
        out_rows.append(rows)
        out_feats.append(feats)
    width = max((len(r) for r in out_rows), default=0)
    items = np.full((len(user_ids), width), -1, dtype=np.int64)
    feats = np.zeros((len(user_ids), width, len(CANDIDATE_FEATURES)), dtype=np.float32)
    for q, (rows, f) in enumerate(zip(out_rows, out_feats, strict=True)):
        items[q, : len(rows)] = model.item_ids[rows]
        feats[q, : len(rows)] = f
    return items, feats


def candidate_rows(
    settings: Settings,
    layout: Layout,
    user_ids: np.ndarray,
    at: pd.Timestamp | pd.DatetimeIndex,
    merged: tuple[np.ndarray, np.ndarray],
) -> CandidateRows:
    """Ranker rows of merged candidates (``merged_candidates``' output) exactly as serving
    builds them: Feast features as of each request's time (``at``: one for all, or one per
    user), tower embeddings, source features, the shared assembly."""
    user_ids = np.asarray(user_ids, dtype=np.int64)
    times = _per_query(at, len(user_ids))
    items, source_feats = merged
    query, position = np.nonzero(items >= 0)
    row_items = items[query, position]
    uniq, inverse = np.unique(row_items, return_inverse=True)

    t0 = time.perf_counter()
    users_df = point_in_time_features(settings, USER_KEY, user_ids, times, layout.user_refs)
    if times.nunique() <= 1:  # one request time: each item once
        one = times[0] if len(times) else pd.Timestamp(0, tz="UTC")
        items_df = point_in_time_features(settings, ITEM_KEY, uniq, one, layout.item_refs)
        row_feature = inverse
    else:  # per-user times: each (item, request time) pair once
        row_us = times.as_unit("us").asi8[query]
        pairs, row_feature = np.unique(
            np.stack([row_items, row_us], axis=1), axis=0, return_inverse=True
        )
        pair_times = pd.DatetimeIndex(pairs[:, 1].astype("datetime64[us]")).tz_localize("UTC")
        items_df = point_in_time_features(
            settings, ITEM_KEY, pairs[:, 0], pair_times, layout.item_refs
        )
        row_feature = row_feature.reshape(-1)
    user_feats, affinity = feature_assembly.user_arrays(users_df, layout)
    item_feats, category, created = feature_assembly.item_arrays(items_df, layout)
    log.info("point-in-time features in %.1f s", time.perf_counter() - t0)

    user_emb = retrieval.embed_users(
        settings, retrieval.user_tower_inputs_at(settings, user_ids, at)
    )
    item_emb = retrieval.embed_items(settings, uniq, _index_items_at(settings))
    per_row = item_feats[row_feature]
    if layout.candidate_features:
        per_row = np.concatenate([per_row, source_feats[query, position]], axis=1)
    rows = feature_assembly.assemble(
        layout,
        user_features=user_feats,
        user_category_affinity=affinity,
        user_embedding=user_emb,
        request_time=unix_seconds(times),
        item_features=per_row,
        item_category=category[row_feature],
        item_created_at=created[row_feature],
        item_embedding=item_emb[inverse],
        query=query,
    )
    return CandidateRows(user_ids, items, source_feats, query, position, rows)


def _per_query(at: pd.Timestamp | pd.DatetimeIndex, n: int) -> pd.DatetimeIndex:
    """One UTC request time per query."""
    if isinstance(at, pd.DatetimeIndex):
        if len(at) != n:
            raise ValueError(f"{len(at)} request times for {n} queries")
        return at.tz_localize("UTC") if at.tz is None else at.tz_convert("UTC")
    t = pd.Timestamp(at)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return pd.DatetimeIndex([t] * n)


def unix_seconds(times: pd.DatetimeIndex) -> np.ndarray:
    """Unix seconds (float64) of each time."""
    return times.as_unit("us").asi8.astype(np.float64) / 1e6


def _created_seconds(settings: Settings) -> pd.Series:
    """Item id -> creation time (unix seconds)."""
    return candidates.created_seconds(
        read_table(settings, "items", columns=["item_id", "created_at"])
    )


def _index_items_at(settings: Settings) -> pd.Timestamp:
    """When the index's item vectors were computed: serving ranks with those vectors."""
    return pd.Timestamp(retrieval.index_meta(settings)["item_embeddings_at"])


def labels_for(cands: CandidateRows, labels: pd.DataFrame) -> np.ndarray:
    """Label of each candidate row (0 when the user did not click or buy it)."""
    lookup = labels.set_index(["user_id", "item_id"])["label"]
    idx = pd.MultiIndex.from_arrays([cands.user_ids[cands.query], cands.row_items])
    return lookup.reindex(idx).fillna(0).to_numpy(np.int64)


# --- training -------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar over boosting rounds that also shows the held-out NDCG."""

    def __init__(self, total: int) -> None:
        self.bar = tqdm(total=total, desc="ranker trees", disable=None)

    def __call__(self, env: lgb.callback.CallbackEnv) -> None:
        self.bar.update(1)
        if env.evaluation_result_list:
            _, metric, value, _ = env.evaluation_result_list[-1][:4]
            self.bar.set_postfix({metric: f"{value:.4f}"})


def sample_negatives(
    y: np.ndarray, rows: np.ndarray, budget: int, rng: np.random.Generator
) -> np.ndarray:
    """Mask over all rows: of the ``rows`` (a mask), at most about ``budget`` — every
    positive (``y > 0``) and each negative with the same seeded chance, so every query
    keeps its positives and the same share of its negatives. All of ``rows`` when they
    fit."""
    n = int(rows.sum())
    if n <= budget:
        return rows.copy()
    positive = rows & (y > 0)
    n_pos = int(positive.sum())
    share = max(budget - n_pos, 0) / max(n - n_pos, 1)
    return positive | (rows & (rng.random(len(y)) < share))


def _dataset(rows: np.ndarray, labels: np.ndarray, query: np.ndarray, names: list[str]) -> Any:
    order = np.argsort(query, kind="stable")  # LightGBM wants each query's rows together
    _, sizes = np.unique(query[order], return_counts=True)
    return lgb.Dataset(
        rows[order], labels[order], group=sizes, feature_name=names, free_raw_data=False
    )


@dataclass(frozen=True)
class _Window:
    """One ranker window's requests: users, their candidate rows and labels."""

    k: int
    cands: CandidateRows
    labels: pd.DataFrame
    y: np.ndarray


def _window_rows(
    settings: Settings,
    params: RankerParams,
    layout: Layout,
    split: Split,
    interactions: pd.DataFrame,
    k: int,
    rng: np.random.Generator,
) -> _Window | None:
    """Window ``k``'s requests (at most ``max_queries`` users, seeded), each at the
    window's start with the candidate sources of the events before it."""
    labels = graded_labels(split.window(interactions, k))
    if labels.empty:
        return None
    users = np.sort(labels["user_id"].unique())
    if len(users) > params.max_queries:
        users = np.sort(rng.choice(users, params.max_queries, replace=False))
    model = candidates.SourceModel.load(candidate_model_path(settings, window_cut(k)))
    at = split.window_times(users, k)
    merged = merged_candidates(
        settings, users, at, model, params.quotas, params.ann_depth, interactions
    )
    cands = candidate_rows(settings, layout, users, at, merged)
    return _Window(k, cands, labels[labels["user_id"].isin(users)], labels_for(cands, labels))


def train(settings: Settings, params: RankerParams | None = None) -> None:
    """Pipeline step ``ranker``: see the module docstring."""
    params = params or RankerParams()
    t_start = time.perf_counter()
    split = load_split(settings)
    interactions = read_table(settings, "interactions")
    rng = np.random.default_rng(settings.seed)
    layout = layout_for(settings, n_categories_of(settings))
    names = layout.names
    windows = [
        w
        for k in range(split.windows)
        if (w := _window_rows(settings, params, layout, split, interactions, k, rng)) is not None
    ]
    if not windows or windows[0].k != 0:
        raise UserError("no clicks or purchases in the validation window: cannot train a ranker")
    # One query per (window, user); the early-stopping holdout is drawn by user, so a
    # user's requests in different windows never sit on both sides.
    offsets = np.cumsum([0] + [len(w.cands.user_ids) for w in windows])
    query = np.concatenate([w.cands.query + o for w, o in zip(windows, offsets, strict=False)])
    query_user = np.concatenate([w.cands.user_ids for w in windows])
    rows = np.concatenate([w.cands.rows for w in windows])
    position = np.concatenate([w.cands.position for w in windows])
    y = np.concatenate([w.y for w in windows])
    n_queries = int(offsets[-1])

    # Queries without a positive candidate carry no ranking signal for lambdarank.
    positives = np.bincount(query, weights=(y > 0), minlength=n_queries)
    useful = np.flatnonzero(positives > 0)
    if len(useful) < 2:
        raise UserError(
            f"only {len(useful)} requests have a clicked/bought item among their "
            f"{params.quotas.total} candidates: too little to train a ranker"
        )
    useful_users = np.unique(query_user[useful])
    held_users = useful_users[rng.random(len(useful_users)) < params.holdout_fraction]
    holdout = np.isin(query_user[useful], held_users)
    if holdout.all() or not holdout.any():
        holdout[:] = False
        holdout[0] = True  # tiny data: one request, its user may sit on both sides
    hold_q = useful[holdout]
    train_q = useful[~holdout]
    in_train = np.isin(query, train_q)
    in_hold = np.isin(query, hold_q)
    # The baseline order the trees correct (exporters/ranker_prior.py), chosen on the
    # validation window's training requests (the holdout stays for early stopping): they
    # are the test's kind of request — every user with a last event, light users
    # included, candidates from the latest models. Earlier windows hold only users with
    # longer histories and older item-to-item models, and can favour another baseline
    # (docs/quality.md, "The ranker's prior"). All windows when it has no positive.
    choose_on = in_train & (query < offsets[1])
    if not y[choose_on].any():
        choose_on = in_train
    prior = ranker_prior.choose(
        settings.ranker_prior, names, rows, y, query, position, params.eval_at, where=choose_on
    )
    init = (
        ranker_prior.prior_booster(names, prior.feature, params.num_threads)
        if prior.feature
        else None
    )
    n_init = 1 if init is not None else 0
    negatives = int((in_train & (y == 0)).sum())
    in_train = sample_negatives(y, in_train, params.max_train_rows, rng)
    negative_share = int((in_train & (y == 0)).sum()) / max(negatives, 1)
    dtrain = _dataset(rows[in_train], y[in_train], query[in_train], names)
    dhold = _dataset(rows[in_hold], y[in_hold], query[in_hold], names)

    t0 = time.perf_counter()
    progress = _Progress(params.num_trees)
    booster = lgb.train(
        params.lightgbm(settings.seed),
        dtrain,
        num_boost_round=params.num_trees,
        valid_sets=[dhold],
        valid_names=["holdout"],
        callbacks=[progress, lgb.early_stopping(params.early_stopping_rounds, verbose=False)],
        init_model=init,
    )
    progress.bar.close()
    # Iterations count the prior's tree: best is the prior plus the residual trees kept.
    best = booster.best_iteration or n_init + params.num_trees
    holdout_ndcg = float(booster.best_score["holdout"][f"ndcg@{params.eval_at}"])
    if params.refit_all_queries:
        # The holdout chose the number of trees; the released ranker learns from every
        # query (on sparse data the held-out fifth is a fifth of the signal).
        in_all = np.isin(query, useful)
        in_all = sample_negatives(y, in_all, params.max_train_rows, rng)
        dall = _dataset(rows[in_all], y[in_all], query[in_all], names)
        rounds = max(1, round((best - n_init) * (1 + params.holdout_fraction)))
        booster = lgb.train(
            params.lightgbm(settings.seed), dall, num_boost_round=rounds, init_model=init
        )
        best = n_init + rounds
    train_seconds = time.perf_counter() - t0

    # Candidate recall: the share of the windows' positives the sources put in the lists.
    n_pos = sum(len(w.labels) for w in windows)
    warnings = []
    if len(useful) < params.min_queries_warning:
        warnings.append(
            f"the ranker learned from only {len(useful)} queries with a positive candidate "
            f"({len(train_q)} for training): small data, its ranking is noisy. Lengthen "
            "the validation window (recstack train --val-days), add ranker windows "
            "(--windows) or add data."
        )
    for warning in warnings:
        log.warning("ranker: %s", warning)
    # The lambdarank trees' gain (the prior tree's is a regression fit of its own column).
    gain = booster.feature_importance("gain", iteration=best)
    if init is not None:
        gain = gain - init.feature_importance("gain")
    top = sorted(zip(names, gain.tolist(), strict=True), key=lambda t: -t[1])[:10]
    stats = {
        "request_time": str(split.train_end) if not split.per_user else "per user",
        "split": split.to_json(),
        "queries": n_queries,
        "windows": [
            {"window": w.k, "queries": len(w.cands.user_ids), "positives": int((w.y > 0).sum())}
            for w in windows
        ],
        "queries_with_positive": len(useful),
        "train_queries": len(train_q),
        "holdout_queries": len(hold_q),
        "rows": int(in_train.sum() + in_hold.sum()),
        "train_negatives_kept": round(negative_share, 4),
        "positive_rows": int((y > 0).sum()),
        "candidate_recall": round(float((y > 0).sum()) / max(n_pos, 1), 4),
        "best_iteration": int(best),
        "prior": prior.to_json(),
        "refit_all_queries": params.refit_all_queries,
        f"holdout_ndcg@{params.eval_at}": round(holdout_ndcg, 4),
        "train_seconds": round(train_seconds, 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "top_features_by_gain": [[n, round(g, 1)] for n, g in top],
        "warnings": warnings,
    }
    manifest = {
        "feature_names": names,
        "layout": layout.to_json(),
        "n_candidates": params.quotas.total,
        "ann_depth": params.ann_depth,
        "quotas": params.quotas.to_json(),
        "labels": LABELS,
        "params": asdict(params),
        "lightgbm_params": params.lightgbm(settings.seed),
        "stats": stats,
    }
    work = settings.work_dir
    work.mkdir(parents=True, exist_ok=True)
    picked = rng.choice(len(rows), min(params.sample_rows, len(rows)), replace=False)
    sample = rows[np.sort(picked)]
    _write_outputs(work, booster, best, manifest, sample)
    log.info("ranker: %s", json.dumps(stats))


def _write_outputs(
    work: Path, booster: lgb.Booster, best: int, manifest: dict[str, Any], sample: np.ndarray
) -> None:
    """Write the three outputs atomically, the manifest last (its presence = complete)."""
    tmp_model = work / f".{MODEL_FILE}.tmp"
    booster.save_model(str(tmp_model), num_iteration=best)
    with (work / f".{SAMPLE_FILE}.tmp").open("wb") as f:
        np.save(f, np.ascontiguousarray(sample, dtype=np.float32))
    (work / f".{MANIFEST_FILE}.tmp").write_text(json.dumps(manifest, indent=2) + "\n")
    for name in (MODEL_FILE, SAMPLE_FILE, MANIFEST_FILE):
        os.replace(work / f".{name}.tmp", work / name)


def load_manifest(settings: Settings) -> dict[str, Any]:
    """The parsed ``work/ranker.json``."""
    path = settings.work_dir / MANIFEST_FILE
    if not path.exists():
        raise UserError(f"{path} not found: run the ranker step first (recstack train)")
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def load_booster(settings: Settings) -> lgb.Booster:
    """The trained ranker (``work/ranker.txt``)."""
    path = settings.work_dir / MODEL_FILE
    if not path.exists():
        raise UserError(f"{path} not found: run the ranker step first (recstack train)")
    return lgb.Booster(model_file=str(path))


def sample_rows_path(settings: Settings) -> Path:
    """Real ranker rows saved for parity checks."""
    return settings.work_dir / SAMPLE_FILE


def cli(args: argparse.Namespace) -> int:
    """Direct use; ``recstack train --only ranker`` is the usual way."""
    train(get_settings())
    return 0

"""``recstack bench quality``: how good the *served* recommendations are, against baselines.

The protocol (docs/quality.md), end to end in a workspace and ports of its own:

1. ratings: ``--ratings FILE`` (``user_id,item_id,rating[,timestamp]``, read, ids and
   timestamps as the importer takes them; without timestamps, the importer's synthetic
   ones) or, by default, the ``sparse`` preset written as CSV;
2. split: each user's last ``holdout`` ratings by time are held out (users with no more
   ratings than that stay whole in training and are not evaluated); the rest is written
   as CSV and imported with the real importer (``recstack data import``);
3. ``recstack train``, then ``recstack serve triton --detach`` and ``recstack serve
   orchestrator --detach`` — the real processes;
4. for every user with at least one held-out positive (rating ≥ ``positive_min``):
   ``GET /v1/recommendations?user_id=U&k=10`` over HTTP, once at the server's clock and
   once with ``timestamp=`` the user's first held-out rating (the replay the API allows);
5. NDCG@k (binary gain) and Recall@k = hits / min(k, |positives|) of the list *as
   served* — an already-rated item in it is simply a miss, and the share of such items
   is reported — beside most-popular and EASE (λ=250) on the same split, both excluding
   what the user already rated (exporters/baselines.py);
6. JSON + Markdown under ``<workspace>/data/reports/quality/<UTC stamp>/``; the servers
   are stopped at the end, also on error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from exporters.data_import import (
    TIME_ORDERS,
    _ids,
    _Keys,
    apply_column_map,
    parse_column_maps,
    parse_columns,
    rating_cut,
    read_source,
    synthetic_times,
)
from exporters.model_repo import copy_committed_repository
from recstack.errors import UserError
from recstack.ids import internal_id
from recstack.settings import EASE_LAMBDA, PROJECT_ROOT, Settings

RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
_STEP_LINE = re.compile(r"^\[\d+/\d+\] ")  # the pipeline's progress lines: "[3/11] ..."


@dataclass(frozen=True)
class QualityOptions:
    """What ``recstack bench quality`` runs (defaults = the issue-10 protocol)."""

    workspace: Path
    ratings: Path | None = None  # default: the sparse preset
    columns: list[str] | None = None  # the columns of a ratings file without a header line
    # A ratings file without timestamps: each user's ratings in this order (the importer's
    # synthetic_times, seeded with ``seed``), so "the last N" is a random N by default.
    time_order: str = "random"
    column_map: dict[str, str] = field(default_factory=dict)  # --map COLUMN=FIELD
    items: Path | None = None
    users: Path | None = None
    preset: str = "sparse"
    seed: int = 42
    holdout: int = 5
    k: int = 10
    # Held-out positives: ratings at or above this; None = the importer's purchase cut of
    # the training ratings (4 on a 5-star scale, exporters/data_import.py: rating_cut).
    positive_min: float | None = None
    ease_lambda: float = EASE_LAMBDA
    port_base: int = 31000
    time_limit_s: float = 3600.0
    timestamp_pass: bool = True
    # A served pass with this k (the API's maximum is 200) measures how many held-out
    # positives the served pipeline reaches at all — candidate coverage; 0 skips it.
    coverage_k: int = 200
    keep_up: bool = False
    max_users: int = 0  # 0 = every user with a held-out positive
    request_timeout_s: float = 10.0


# --- metrics -------------------------------------------------------------------------------


def ndcg_recall_at_k(
    ranked: Sequence[int], positives: set[int], k: int
) -> tuple[float, float, int]:
    """(NDCG@k with binary gain, Recall@k = hits / min(k, |positives|), hits) of one list.

    DCG = Σ_{r ≤ k, item_r ∈ positives} 1 / log2(r + 1); the ideal DCG puts min(k,
    |positives|) hits at the top. Duplicates in ``ranked`` count once.
    """
    if not positives:
        raise ValueError("no positives: the user cannot be scored")
    seen: set[int] = set()
    dcg, hits = 0.0, 0
    for r, item in enumerate(ranked[:k], start=1):
        if item in positives and item not in seen:
            dcg += 1.0 / math.log2(r + 1)
            hits += 1
        seen.add(item)
    n_ideal = min(k, len(positives))
    idcg = sum(1.0 / math.log2(r + 1) for r in range(1, n_ideal + 1))
    return dcg / idcg, hits / n_ideal, hits


@dataclass
class MethodResult:
    """Averages over the evaluated users of one method's lists."""

    name: str
    users: int = 0
    ndcg: float = 0.0
    recall: float = 0.0
    hits: int = 0
    mean_len: float = 0.0  # items per list (a short list cannot score)
    seen_share: float = 0.0  # served items the user had already rated in the imported data
    errors: int = 0  # users whose request failed (scored as empty lists)
    degraded: int = 0  # responses that said they were degraded
    sources: dict[str, int] = field(default_factory=dict)  # served items per `source`
    degraded_reasons: dict[str, int] = field(default_factory=dict)  # responses per reason


def score_lists(
    name: str,
    lists: Mapping[int, Sequence[int]],
    positives: Mapping[int, set[int]],
    rated: Mapping[int, set[int]],
    k: int,
) -> MethodResult:
    """Score ``lists`` (user → ranked items) against ``positives`` (user → held-out positive
    items) for every user of ``positives``; a user without a list scores 0."""
    res = MethodResult(name)
    nd, rc, lens, seen_n, total = [], [], [], 0, 0
    for u, pos in positives.items():
        ranked = list(lists.get(u, ()))[:k]
        n, r, h = ndcg_recall_at_k(ranked, pos, k)
        nd.append(n)
        rc.append(r)
        res.hits += h
        lens.append(len(ranked))
        mine = rated.get(u, set())
        seen_n += sum(1 for i in ranked if i in mine)
        total += len(ranked)
    res.users = len(nd)
    res.ndcg = float(np.mean(nd)) if nd else 0.0
    res.recall = float(np.mean(rc)) if rc else 0.0
    res.mean_len = float(np.mean(lens)) if lens else 0.0
    res.seen_share = seen_n / total if total else 0.0
    return res


# --- data ----------------------------------------------------------------------------------


def read_ratings(
    path: Path,
    columns: list[str] | None = None,
    time_order: str = "random",
    seed: int = 0,
    column_map: dict[str, str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """A ratings file, read as the importer reads it (text in any delimiter it sniffs, or
    parquet; ``columns`` for a text file without a header line; column names in any
    spelling), as (rows exactly as written, as strings; parsed columns; where the times
    come from). A file without a timestamp column gets the importer's
    :func:`synthetic_times` in ``time_order``, added to both frames, so the split and the
    import see the same times. ``column_map`` renames columns as the importer's ``--map
    interactions:COLUMN=FIELD`` does (Book-Crossing's ``ISBN`` as ``item_id``)."""
    src = read_source(path, "interactions", columns)
    apply_column_map(src, "interactions", column_map or {})
    missing = [c for c in RATING_COLUMNS if c != "timestamp" and not src.has(c)]
    if missing:
        raise UserError(
            f"{path}: missing column(s) {missing}; a ratings file has columns "
            f"{','.join(RATING_COLUMNS)} (found: {', '.join(src.table.column_names)})"
        )
    raw = src.table.to_pandas().fillna("").astype(str)
    parsed = pd.DataFrame(index=raw.index)
    for col in ("user_id", "item_id"):
        # The importer's rule (recstack.ids: digits their value, keys such as ISBNs their
        # hash), as the served answers' ids read back with internal_id.
        parsed[col] = _ids(src, col, keys=_Keys())
    rating = pd.to_numeric(raw["rating"], errors="coerce")
    if rating.isna().any():
        bad = raw["rating"][rating.isna()].iloc[0]
        raise UserError(f"{path}: column 'rating': {bad!r} is not a number")
    parsed["rating"] = rating.astype(np.float64)
    if not src.has("timestamp"):
        us = synthetic_times(
            parsed["user_id"].to_numpy(), time_order, seed, item_ids=parsed["item_id"].to_numpy()
        )
        parsed["timestamp"] = pd.to_datetime(us, unit="us", utc=True)
        raw["timestamp"] = parsed["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        return raw, parsed, f"synthesized ({time_order} order per user, seed {seed})"
    ts_raw = raw["timestamp"]
    secs = pd.to_numeric(ts_raw, errors="coerce")
    if secs.notna().all():
        ts = pd.to_datetime(secs * 1e6, unit="us", utc=True)
    else:
        ts = pd.to_datetime(ts_raw, utc=True, errors="coerce", format="mixed")
        if ts.isna().any():
            bad = ts_raw[ts.isna()].iloc[0]
            raise UserError(
                f"{path}: column 'timestamp': cannot parse {bad!r} (ISO-8601 or unix seconds)"
            )
    parsed["timestamp"] = ts
    return raw, parsed, "timestamp"


def leave_last_out(parsed: pd.DataFrame, n: int) -> np.ndarray:
    """Boolean mask of held-out rows: each user's last ``n`` ratings by time (ties keep
    file order). Users with ≤ n ratings keep everything (nothing to learn them from)."""
    if n < 1:
        raise UserError(f"--holdout must be >= 1, got {n}")
    when = parsed["timestamp"].astype("int64").to_numpy()  # tz-aware → comparable ints
    order = np.lexsort((np.arange(len(parsed)), when, parsed["user_id"].to_numpy()))
    users = parsed["user_id"].to_numpy()[order]
    from_end = pd.Series(users).groupby(users).cumcount(ascending=False).to_numpy()
    count = pd.Series(users).map(pd.Series(users).value_counts()).to_numpy()
    held = np.zeros(len(parsed), bool)
    held[order] = (from_end < n) & (count > n)
    return held


# --- the workspace, its servers and their environment --------------------------------------


def workspace_env(ws: Path, port_base: int) -> dict[str, str]:
    """RECSTACK_* variables that put every path and port of a run in ``ws`` and above
    ``port_base`` (Triton +0/+1/+2, orchestrator gRPC +51, HTTP +80, metrics +100, admin +101, Redis
    +90: the layout of loadtest/bench_large.sh)."""
    return {
        "RECSTACK_DATA_DIR": str(ws / "data"),
        "RECSTACK_MODEL_REPOSITORY": str(ws / "model_repository"),
        "RECSTACK_RELEASES_DIR": str(ws / "releases"),
        "RECSTACK_RUN_DIR": str(ws / "run"),
        "RECSTACK_TRITON_HTTP_PORT": str(port_base + 0),
        "RECSTACK_TRITON_GRPC_PORT": str(port_base + 1),
        "RECSTACK_TRITON_METRICS_PORT": str(port_base + 2),
        "RECSTACK_ORCHESTRATOR_GRPC_PORT": str(port_base + 51),
        "RECSTACK_ORCHESTRATOR_HTTP_PORT": str(port_base + 80),
        "RECSTACK_ORCHESTRATOR_METRICS_PORT": str(port_base + 100),
        "RECSTACK_ORCHESTRATOR_ADMIN_PORT": str(port_base + 101),
        "RECSTACK_REDIS_PORT": str(port_base + 90),
    }


def _model_repository(ws: Path) -> None:
    """The committed configs and shims, without version folders (those the run writes)."""
    copy_committed_repository(ws / "model_repository")


class _Run:
    """Runs ``recstack`` subcommands in the workspace; logs each under ``logs/``."""

    def __init__(self, opts: QualityOptions, deadline: float) -> None:
        self.opts = opts
        self.deadline = deadline
        self.env = {**os.environ, **workspace_env(opts.workspace, opts.port_base)}
        # The project on the path even when `recstack` is not installed from this checkout.
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        self.logs = opts.workspace / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def recstack(self, name: str, *args: str, echo: bool = False) -> str:
        """``recstack ARGS`` in the workspace; raises UserError with the log's tail on
        failure or when the run's time limit passes."""
        log_path = self.logs / f"{name}.log"
        cmd = [sys.executable, "-m", "recstack.cli", *args]
        left = self.left()
        if left <= 0:
            raise UserError(f"time limit ({self.opts.time_limit_s:.0f} s) reached before {name}")
        t0 = time.perf_counter()
        lines: list[str] = []
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(
                cmd,
                cwd=PROJECT_ROOT,
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
            assert proc.stdout is not None
            # A silent, stuck command is killed at the deadline too.
            killed = threading.Event()

            def _kill() -> None:
                killed.set()
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)

            timer = threading.Timer(left, _kill)
            timer.start()
            try:
                for line in proc.stdout:
                    logf.write(line)
                    lines.append(line)
                    if echo and _STEP_LINE.match(line):
                        _say(f"  {name}: {line.rstrip()}")
                rc = proc.wait()
            finally:
                timer.cancel()
            if killed.is_set():
                raise UserError(
                    f"`recstack {' '.join(args)}` passed the time limit "
                    f"({self.opts.time_limit_s:.0f} s); log: {log_path}"
                )
        if rc != 0:
            tail = "".join(lines[-25:])
            raise UserError(
                f"`recstack {' '.join(args)}` failed (exit {rc}); log: {log_path}\n{tail}"
            )
        _say(f"  {name}: done in {time.perf_counter() - t0:.1f} s")
        return "".join(lines)


def _say(msg: str) -> None:
    print(f"[bench-quality {datetime.now(UTC):%H:%M:%S}] {msg}", flush=True)


# --- asking the server --------------------------------------------------------------------


@dataclass
class _Served:
    lists: dict[int, list[int]] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)
    degraded: int = 0
    degraded_reasons: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)
    latency_ms: list[float] = field(default_factory=list)


def _get_json(url: str, timeout: float) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except ValueError:
            return e.code, {"error": {"message": body[:200].decode(errors="replace")}}


def wait_healthy(base: str, timeout_s: float) -> str:
    """Wait for the orchestrator's ``/healthz``; returns the release it serves. UserError
    when it does not answer in time."""
    t_end = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < t_end:
        try:
            status, body = _get_json(f"{base}/healthz", 2.0)
            if status == 200:
                return str(body.get("release", ""))
            last = f"HTTP {status} {body}"
        except OSError as e:
            last = str(e)
        time.sleep(0.5)
    raise UserError(f"orchestrator at {base} not healthy after {timeout_s:.0f} s: {last}")


def ask(
    base: str,
    users: Iterable[int],
    k: int,
    when: Mapping[int, pd.Timestamp] | None,
    timeout_s: float,
    deadline: float,
    label: str,
    keys: Mapping[int, str] | None = None,
) -> _Served:
    """``GET /v1/recommendations`` for each user (with ``timestamp=`` when ``when`` is
    given), one at a time: the quality of answers, not throughput, is measured here.
    ``keys``: the client's id of each user (string ids); answers' item ids are read back
    into internal ids."""
    out = _Served()
    users = list(users)
    t_last = time.monotonic()
    for n, u in enumerate(users, 1):
        if time.monotonic() > deadline:
            raise UserError(f"time limit reached while asking for {label} ({n - 1} users done)")
        params: dict[str, Any] = {"user_id": keys.get(u, u) if keys else u, "k": k}
        if when is not None:
            params["timestamp"] = when[u].isoformat()
        url = f"{base}/v1/recommendations?{urllib.parse.urlencode(params)}"
        t0 = time.perf_counter()
        try:
            status, body = _get_json(url, timeout_s)
        except OSError as e:
            status, body = 0, {"error": {"message": str(e)}}
        out.latency_ms.append((time.perf_counter() - t0) * 1000)
        if status != 200:
            out.errors[u] = f"HTTP {status}: {body.get('error', body)}"
            continue
        items = body.get("items", [])
        out.lists[u] = [internal_id(str(i["item_id"])) for i in items]
        out.sources.update(str(i.get("source", "")) for i in items)
        if body.get("degraded"):
            out.degraded += 1
            out.degraded_reasons.update(str(r) for r in body["degraded"])
        if time.monotonic() - t_last > 10 or n == len(users):
            _say(f"  {label}: {n}/{len(users)} users, {len(out.errors)} errors")
            t_last = time.monotonic()
    if out.errors and len(out.errors) == len(users):
        first = next(iter(out.errors.values()))
        raise UserError(f"every request failed ({label}); first: {first}")
    return out


# --- baselines -----------------------------------------------------------------------------


def ease_row(lam: float) -> str:
    """The report's name of EASE at ``lam``."""
    return f"EASE (λ={lam:g})"


def baseline_lists(
    train: pd.DataFrame,
    item_ids: np.ndarray,
    users: Sequence[int],
    k: int,
    lams: Sequence[float],
) -> dict[str, dict[int, list[int]]]:
    """Most-popular and EASE top-k at each λ of ``lams`` (:func:`ease_row`) for ``users``
    from the training ratings (every rated item counts as consumed), each excluding what
    the user already rated. The interaction matrices are built once for all."""
    from exporters.baselines import (
        EASE_MAX_ITEMS,
        ease_weights,
        interaction_matrix,
        popularity_scores,
        top_k_unseen,
    )

    X_all, _ = interaction_matrix(train, item_ids)
    X, _ = interaction_matrix(train, item_ids, user_ids=np.asarray(users, dtype=np.int64))

    def top_lists(S: np.ndarray) -> dict[int, list[int]]:
        top = top_k_unseen(S, X, k)
        return {
            int(u): [int(item_ids[i]) for i in row if i >= 0]
            for u, row in zip(users, top, strict=True)
        }

    out = {"most popular": top_lists(np.tile(popularity_scores(X_all), (len(users), 1)))}
    if item_ids.size > EASE_MAX_ITEMS:
        _say(f"  {item_ids.size:,} items: EASE is for catalogs <= {EASE_MAX_ITEMS:,}, skipped")
        return out
    for lam in dict.fromkeys(lams):  # each λ once, in the given order
        out[ease_row(lam)] = top_lists(np.asarray(X @ ease_weights(X_all, lam=lam)))
    return out


def ease_best_on_heldout(
    ease_lists: Mapping[float, dict[int, list[int]]],
    positives: Mapping[int, set[int]],
    rated: Mapping[int, set[int]],
    k: int,
) -> dict[str, dict[int, list[int]]]:
    """Of EASE's lists at several λ (the pipeline's grid, exporters/ease_lambda.py), those
    that score the best NDCG@k on these held-out ratings themselves: a baseline tuned on
    the test, stronger than any λ chosen without it, so "beats EASE" does not hang on one
    λ. Ties keep the first."""
    best: tuple[float, float, dict[int, list[int]]] | None = None
    for lam, lists in ease_lists.items():
        ndcg = score_lists("", lists, positives, rated, k).ndcg
        if best is None or ndcg > best[0]:
            best = (ndcg, lam, lists)
    if best is None:
        return {}
    return {f"EASE (λ={best[1]:g}, best on these held-out ratings)": best[2]}


def heldout_baselines(
    train: pd.DataFrame,
    item_ids: np.ndarray,
    users: Sequence[int],
    depth: int,
    positives: Mapping[int, set[int]],
    rated: Mapping[int, set[int]],
    k: int,
    lam: float,
) -> dict[str, dict[int, list[int]]]:
    """The bench's baselines: most popular, EASE at the fixed ``lam``, and EASE at the
    grid's λ best on the held-out ratings (:func:`ease_best_on_heldout`), swept only up to
    the grid's item limit (one dense fit per λ)."""
    from exporters.ease_lambda import GRID, TUNE_MAX_ITEMS

    sweep = item_ids.size <= TUNE_MAX_ITEMS
    if not sweep:
        _say(f"  {item_ids.size:,} items: the λ sweep of EASE is for <= {TUNE_MAX_ITEMS:,}")
    lists = baseline_lists(train, item_ids, users, depth, [lam, *(GRID if sweep else ())])
    out = {name: lists[name] for name in ("most popular", ease_row(lam)) if name in lists}
    grid = {g: lists[ease_row(g)] for g in GRID if ease_row(g) in lists} if sweep else {}
    out.update(ease_best_on_heldout(grid, positives, rated, k))
    return out


# --- the run -------------------------------------------------------------------------------


def run(opts: QualityOptions) -> dict[str, Any]:
    """The whole protocol (module docstring); returns the report (also written to disk)."""
    t_start = time.monotonic()
    deadline = t_start + opts.time_limit_s
    ws = opts.workspace
    ws.mkdir(parents=True, exist_ok=True)
    _model_repository(ws)
    runner = _Run(opts, deadline)
    settings = Settings(
        data_dir=ws / "data",
        model_repository=ws / "model_repository",
        releases_dir=ws / "releases",
        run_dir=ws / "run",
        orchestrator_http_port=opts.port_base + 80,
    )
    # 1. ratings
    inputs = ws / "input"
    items_file, users_file = opts.items, opts.users
    if opts.ratings is None:
        from exporters.data_generate import PRESETS, RatingsPreset, build_ratings, write_ratings_csv

        preset = PRESETS.get(opts.preset)
        if not isinstance(preset, RatingsPreset):
            names = [n for n, p in PRESETS.items() if isinstance(p, RatingsPreset)]
            raise UserError(f"--preset must be a ratings preset ({', '.join(names)})")
        files = write_ratings_csv(build_ratings(preset, opts.seed), inputs)
        ratings_file = files["interactions"]
        items_file, users_file = files["items"], files["users"]
        source = f"synthetic:preset={opts.preset},seed={opts.seed}"
    else:
        ratings_file = opts.ratings
        source = str(opts.ratings)
    _say(f"ratings: {source}")
    raw, parsed, times = read_ratings(
        ratings_file, opts.columns, opts.time_order, opts.seed, opts.column_map
    )
    if times != "timestamp":
        _say(f"no timestamp column: {times}")
    # 2. split and import
    held = leave_last_out(parsed, opts.holdout)
    split_dir = ws / "split"
    split_dir.mkdir(parents=True, exist_ok=True)
    train_csv = split_dir / "train.csv"
    raw[~held].to_csv(train_csv, index=False)
    raw[held].to_csv(split_dir / "heldout.csv", index=False)
    train, test = parsed[~held], parsed[held]
    if opts.positive_min is None:
        opts = replace(opts, positive_min=rating_cut(train["rating"].to_numpy()).positive)
    pos = test[test["rating"] >= opts.positive_min]
    positives = {int(u): set(map(int, g)) for u, g in pos.groupby("user_id")["item_id"]}
    eval_users = sorted(positives)
    if opts.max_users:
        eval_users = eval_users[: opts.max_users]
        positives = {u: positives[u] for u in eval_users}
    if not eval_users:
        raise UserError("no user has a held-out positive (rating >= --positive-min)")
    first_held = test.groupby("user_id")["timestamp"].min()
    # The client's id of each user, as the request names it (string ids: the key, not its
    # hash; "007" stays "007").
    named = pd.DataFrame({"u": parsed["user_id"], "key": raw["user_id"].str.strip()})
    user_keys = dict(named.drop_duplicates("u").itertuples(index=False, name=None))
    rated = {int(u): set(map(int, g)) for u, g in train.groupby("user_id")["item_id"]}
    _say(
        f"split: {len(train):,} ratings imported, {len(test):,} held out "
        f"(last {opts.holdout} per user), {len(eval_users)} users with a held-out positive"
    )
    import_args = ["data", "import", "--interactions", str(train_csv)]
    if items_file:
        import_args += ["--items", str(items_file)]
    if users_file:
        import_args += ["--users", str(users_file)]
    runner.recstack("stop_before", "stop")
    try:
        _say("recstack data import")
        runner.recstack("import", *import_args)
        _say(f"recstack train (log: {runner.logs / 'train.log'})")
        runner.recstack("train", "train", echo=True)
        # 3. servers
        _say("recstack serve triton --detach")
        runner.recstack("triton", "serve", "triton", "--detach")
        _say("recstack serve orchestrator --detach")
        runner.recstack("orchestrator", "serve", "orchestrator", "--detach")
        base = f"http://{settings.orchestrator_host}:{opts.port_base + 80}"
        release = wait_healthy(base, min(60.0, max(runner.left(), 1.0)))
        _say(f"orchestrator serves release {release!r} at {base}")
        # 4. ask
        passes: dict[str, _Served] = {}
        passes["served (server clock)"] = ask(
            base, eval_users, opts.k, None, opts.request_timeout_s, deadline, "served", user_keys
        )
        if opts.timestamp_pass:
            when = {u: first_held[u] for u in eval_users}
            passes["served (timestamp = first held-out rating)"] = ask(
                base,
                eval_users,
                opts.k,
                when,
                opts.request_timeout_s,
                deadline,
                "served+ts",
                user_keys,
            )
        coverage: _Served | None = None
        if opts.coverage_k:
            coverage = ask(
                base,
                eval_users,
                opts.coverage_k,
                None,
                opts.request_timeout_s,
                deadline,
                f"served k={opts.coverage_k}",
                user_keys,
            )
    finally:
        if not opts.keep_up:
            try:
                runner.deadline = time.monotonic() + 60
                runner.recstack("stop", "stop")
            except UserError as e:
                _say(f"stopping the servers failed: {e}")
    # 5. baselines and scores
    from exporters.raw_tables import read_table

    item_ids = np.sort(read_table(settings, "items", ["item_id"])["item_id"].to_numpy())
    deep = max(opts.k, opts.coverage_k)
    base_lists = heldout_baselines(
        train, item_ids, eval_users, deep, positives, rated, opts.k, opts.ease_lambda
    )
    results: list[MethodResult] = []
    for name, served in passes.items():
        res = score_lists(name, served.lists, positives, rated, opts.k)
        res.errors = len(served.errors)
        res.degraded = served.degraded
        res.degraded_reasons = dict(served.degraded_reasons.most_common())
        res.sources = dict(served.sources.most_common())
        results.append(res)
    for name, lists in base_lists.items():
        results.append(score_lists(name, lists, positives, rated, opts.k))
    report = _report(
        opts, source, times, settings, train, test, eval_users, results, passes, t_start
    )
    report["release"] = release
    if coverage is not None:
        kc = opts.coverage_k
        cov = [score_lists(f"served (k={kc})", coverage.lists, positives, rated, kc)]
        cov[0].errors = len(coverage.errors)
        cov += [score_lists(n, lists, positives, rated, kc) for n, lists in base_lists.items()]
        report["coverage"] = {"k": kc, "results": [asdict(r) for r in cov]}
    _write(report, settings)
    return report


def _report(
    opts: QualityOptions,
    source: str,
    times: str,
    settings: Settings,
    train: pd.DataFrame,
    test: pd.DataFrame,
    eval_users: list[int],
    results: list[MethodResult],
    passes: Mapping[str, _Served],
    t_start: float,
) -> dict[str, Any]:
    offline: Any = None
    rep = settings.reports_dir / "report.json"
    if rep.exists():
        try:
            offline = json.loads(rep.read_text())
        except ValueError:
            offline = None
    meta = settings.raw_dir / "meta.json"
    lat = {
        name: {
            "p50_ms": round(float(np.percentile(s.latency_ms, 50)), 2),
            "p99_ms": round(float(np.percentile(s.latency_ms, 99)), 2),
        }
        for name, s in passes.items()
        if s.latency_ms
    }
    errors = {name: dict(list(s.errors.items())[:5]) for name, s in passes.items() if s.errors}
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
        "protocol": {
            "holdout": f"each user's last {opts.holdout} ratings by time",
            "times": times,
            "positives": f"held-out ratings >= {opts.positive_min or 0:g}",
            "k": opts.k,
            "ndcg": "binary gain, IDCG over min(k, |positives|)",
            "recall": "hits / min(k, |positives|)",
            "served_lists": "scored as served: an already-rated item counts as a miss",
            "baselines": "exclude items the user rated in the imported data",
            "ease_lambda": opts.ease_lambda,
        },
        "data": {
            "imported_ratings": len(train),
            "held_out_ratings": len(test),
            "users": int(train["user_id"].nunique()),
            "items": int(train["item_id"].nunique()),
            "evaluated_users": len(eval_users),
            "raw_meta": json.loads(meta.read_text()) if meta.exists() else None,
        },
        "release": None,
        "results": [asdict(r) for r in results],
        "latency": lat,
        "errors_sample": errors,
        "offline_report": offline,
        "seconds": round(time.monotonic() - t_start, 1),
    }


def markdown(report: Mapping[str, Any]) -> str:
    """The results table and the protocol, as Markdown."""
    p = report["protocol"]
    d = report["data"]
    lines = [
        f"# Served quality vs baselines ({report['created']})",
        "",
        f"Data: {report['source']}; {d['imported_ratings']:,} ratings imported, "
        f"{d['held_out_ratings']:,} held out ({p['holdout']}); positives: {p['positives']}; "
        f"{d['evaluated_users']} users scored.",
        f"NDCG@{p['k']}: {p['ndcg']}. Recall@{p['k']}: {p['recall']}. Served lists: "
        f"{p['served_lists']}; baselines {p['baselines']}.",
        "",
        f"| method | NDCG@{p['k']} | Recall@{p['k']} | items/list | already rated | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['name']} | {r['ndcg']:.4f} | {r['recall']:.4f} | {r['mean_len']:.1f} | "
            f"{100 * r['seen_share']:.1f} % | {r['errors']} |"
        )
    cov = report.get("coverage")
    if cov:
        kc = cov["k"]
        lines += [
            "",
            f"Candidate coverage: Recall@{kc} (= hits / min({kc}, |positives|): the share of "
            f"held-out positives a list of {kc} reaches at all).",
            "",
            f"| method | Recall@{kc} | NDCG@{kc} | items/list | already rated |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in cov["results"]:
            lines.append(
                f"| {r['name']} | {r['recall']:.4f} | {r['ndcg']:.4f} | {r['mean_len']:.1f} | "
                f"{100 * r['seen_share']:.1f} % |"
            )
    served = [r for r in report["results"] if r["sources"]]
    if served:
        lines += ["", "Served items by source:"]
        for r in served:
            total = sum(r["sources"].values()) or 1
            parts = ", ".join(
                f"{k or '?'} {100 * v / total:.0f} %" for k, v in r["sources"].items()
            )
            why = ", ".join(f"{k} {v}" for k, v in r.get("degraded_reasons", {}).items())
            lines.append(
                f"- {r['name']}: {parts}; degraded responses: {r['degraded']}"
                + (f" ({why})" if why else "")
            )
    if report.get("latency"):
        lines += ["", "Latency (sequential HTTP calls, not a load test):"]
        for name, v in report["latency"].items():
            lines.append(f"- {name}: p50 {v['p50_ms']} ms, p99 {v['p99_ms']} ms")
    off = report.get("offline_report")
    if isinstance(off, dict) and "pipeline" in off and "popularity" in off:
        lines += [
            "",
            "The offline report of `recstack train` (its own test window and relevance "
            f"{off.get('relevance')}, {off.get('evaluated_users')} users, not comparable "
            "with the table above): NDCG@10 "
            f"retrieval {off.get('retrieval', {}).get('ndcg@10')}, "
            f"pipeline {off['pipeline'].get('ndcg@10')}, "
            f"popularity {off['popularity'].get('ndcg@10')} "
            f"(ratio {off.get('pipeline_vs_popularity', {}).get('ndcg@10_ratio')}).",
        ]
    lines += ["", f"Release: {report.get('release')}. Run time: {report['seconds']} s.", ""]
    return "\n".join(lines)


def _write(report: Mapping[str, Any], settings: Settings) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = settings.reports_dir / "quality" / stamp
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    md = markdown(report)
    (out / "quality.md").write_text(md)
    print()
    print(md)
    _say(f"written to {out}")
    return out


def cli(args: argparse.Namespace) -> int:
    """``recstack bench quality``."""
    ws = Path(args.workspace) if args.workspace else PROJECT_ROOT / ".bench-quality"
    opts = QualityOptions(
        workspace=ws.resolve(),
        ratings=Path(args.ratings) if args.ratings else None,
        columns=parse_columns(args.columns) if args.columns else None,
        time_order=args.time_order,
        column_map=parse_column_maps(
            [m if ":" in m else f"interactions:{m}" for m in args.map or []]
        ).get("interactions", {}),
        items=Path(args.items) if args.items else None,
        users=Path(args.users) if args.users else None,
        preset=args.preset,
        seed=args.seed,
        holdout=args.holdout,
        k=args.k,
        positive_min=args.positive_min,
        ease_lambda=args.ease_lambda,
        port_base=args.port_base,
        time_limit_s=args.time_limit,
        timestamp_pass=not args.no_timestamp_pass,
        coverage_k=args.coverage_k,
        keep_up=args.keep_up,
        max_users=args.max_users,
    )
    if opts.k < 1 or opts.coverage_k < 0:
        raise UserError("--k must be >= 1 and --coverage-k >= 0")
    if (opts.items or opts.users or opts.columns) and opts.ratings is None:
        raise UserError("--items/--users/--columns go with --ratings")
    if opts.time_order not in TIME_ORDERS:
        raise UserError(f"--time-order must be one of {', '.join(TIME_ORDERS)}")
    run(opts)
    return 0

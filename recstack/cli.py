"""The ``recstack`` command: one entry point, each subcommand implemented by the module
that owns the work. Modules are imported lazily so ``recstack --help`` stays fast and a
command does not pay for torch or Feast imports it does not use."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from recstack import logs
from recstack.errors import UserError
from recstack.lean_imports import lean_feast_imports

log = logging.getLogger("recstack")


def _engine_arg(p: argparse.ArgumentParser) -> None:
    from recstack.settings import ENGINES

    p.add_argument(
        "--engine",
        dest="offline_engine",
        choices=ENGINES,
        help="offline engine of the feature tables (default RECSTACK_OFFLINE_ENGINE, pandas); "
        "spark needs `make setup-spark` (docs/offline.md)",
    )


def _target(spec: str) -> Callable[[argparse.Namespace], int | None]:
    """Resolve ``"package.module:function"`` at run time."""
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func)  # type: ignore[no-any-return]


def _cmd(sub: Any, name: str, spec: str, help_: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    p.set_defaults(_run=spec)
    return p


def _force_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reason", help="why (recorded in the release history)")
    p.add_argument(
        "--force", action="store_true", help="override failed soft checks (needs --reason)"
    )


def build_parser() -> argparse.ArgumentParser:
    """All subcommands and their options."""
    # Choices are read from the settings, where each is named once (their Literal types).
    from recstack.settings import EASE_LAMBDA, RANKER_PRIORS, SPLIT_MODES

    parser = argparse.ArgumentParser(prog="recstack", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    groups = parser.add_subparsers(dest="group", required=True)

    # --- data ---------------------------------------------------------------------------
    data = groups.add_parser("data", help="generate or import raw data").add_subparsers(
        dest="cmd", required=True
    )
    p = _cmd(data, "generate", "exporters.data_generate:cli", "synthetic marketplace data")
    p.add_argument("--preset", choices=["small", "demo", "large", "sparse"], default="demo")
    p.add_argument("--seed", type=int, default=None, help="default: settings.seed")
    p.add_argument(
        "--string-ids",
        action="store_true",
        help='UUID users and SKU items, imported like a client\'s (docs/data.md "Ids")',
    )
    p = _cmd(
        data,
        "import",
        "exporters.data_import:cli",
        "import real data (CSV, TSV, ::-separated text or parquet)",
    )
    p.add_argument("--interactions", required=True, help="user_id,item_id,event|rating[,timestamp]")
    p.add_argument("--items", help="item_id[,category,brand,price,created_at]")
    p.add_argument("--users", help="user_id[,age_bucket,country,signup_at]")
    p.add_argument(
        "--map",
        action="append",
        metavar="FILE:COLUMN=FIELD",
        help="use an extra column as a schema field, e.g. users:occupation=country (repeatable)",
    )
    p.add_argument(
        "--columns",
        metavar="NAMES",
        help="the columns of an interactions file without a header line, comma-separated "
        "(MovieLens u.data: user_id,item_id,rating,timestamp)",
    )
    p.add_argument(
        "--rating-cut",
        metavar="PURCHASE,CLICK",
        help="ratings at or above PURCHASE become purchases, at or above CLICK clicks, the rest "
        "views (default: chosen from the ratings' scale, docs/data.md)",
    )
    p.add_argument(
        "--time-order",
        metavar="random|file",
        help="an interactions file without a timestamp column: each user's events in random "
        "(default) or file order, spread over the year before the import (docs/data.md)",
    )
    p = _cmd(
        data,
        "import-events",
        "exporters.event_import:cli",
        "append the event log's RecordEvents to the raw interactions (for `recstack train`)",
    )
    p.add_argument("--since", help="ISO-8601 time or a duration back from now (30m, 24h, 7d)")

    # --- features -----------------------------------------------------------------------
    feats = groups.add_parser("features", help="feature tables and Feast").add_subparsers(
        dest="cmd", required=True
    )
    p = _cmd(feats, "build", "exporters.feature_tables:cli", "write the feature parquet tables")
    _engine_arg(p)
    _cmd(feats, "apply", "exporters.feast_ops:cli_apply", "feast apply on feature_repo/")
    p = _cmd(
        groups,
        "feast",
        "exporters.feast_ops:cli_feast",
        "Feast's CLI on feature_repo/ with recstack's settings (e.g. feast feature-views list)",
    )
    p.add_argument(
        "--env",
        action="store_true",
        help='print the exports plain `feast` needs: eval "$(recstack feast --env)"',
    )
    p.add_argument(
        "feast_args", nargs=argparse.REMAINDER, metavar="ARGS", help="Feast CLI arguments"
    )
    p = _cmd(feats, "materialize", "exporters.feast_ops:cli_materialize", "load the online store")
    p.add_argument(
        "--incremental",
        action="store_true",
        help="write only the entities with rows from the first raw day changed since the last"
        " materialisation (a full one where that is not known to be enough; docs/offline.md)",
    )

    # --- offline pipeline -------------------------------------------------------------------
    p = _cmd(groups, "train", "exporters.pipeline:cli", "the whole offline path, resumable")
    p.add_argument("--from-step", help="re-run from this step (default: resume)")
    p.add_argument("--only", help="run just this step")
    p.add_argument("--list-steps", action="store_true")
    _engine_arg(p)
    p.add_argument(
        "--force-release",
        metavar="REASON",
        help="publish even if the evaluation loses to the baselines (recorded in the manifest)",
    )
    p.add_argument(
        "--split",
        dest="split_mode",
        choices=SPLIT_MODES,
        help="train/validation/test split (default auto: time, or per user when the "
        "time windows hold few users; docs/data.md)",
    )
    p.add_argument("--val-days", dest="split_val_days", type=float, help="time split")
    p.add_argument("--test-days", dest="split_test_days", type=float, help="time split")
    p.add_argument("--val-last", dest="split_val_last", type=int, help="per-user split")
    p.add_argument("--test-last", dest="split_test_last", type=int, help="per-user split")
    p.add_argument(
        "--light-last",
        dest="split_light_last",
        type=int,
        help="per-user split: events tested of users with too few for --val-last + "
        "--test-last (default 1; 0: they train only; the ranker never learns from them)",
    )
    p.add_argument(
        "--windows",
        dest="split_windows",
        type=int,
        help="ranker windows: requests per user the ranker learns from (default: 1 for a "
        "time split, 5 per user)",
    )
    p.add_argument(
        "--ranker-prior",
        dest="ranker_prior",
        choices=RANKER_PRIORS,
        help="the baseline order the ranker's trees correct (default auto: the better of "
        "most-popular and item-to-item on the validation window's training requests; none: "
        "boosted from zero)",
    )
    p = _cmd(groups, "evaluate", "exporters.evaluate:cli", "offline report on the test split")
    p.add_argument("--out", help="directory for report.md / report.json")

    # --- model repository and releases --------------------------------------------------
    repo = groups.add_parser("repo", help="Triton model repository").add_subparsers(
        dest="cmd", required=True
    )
    p = _cmd(
        repo,
        "init",
        "exporters.model_repo:cli_init",
        "copy the committed configs and shims a model repository lacks (overwrites nothing)",
    )
    p.add_argument("dir", nargs="?", help="repository folder (default: settings.model_repository)")
    p = _cmd(repo, "configs", "exporters.triton_configs:cli", "write config.pbtxt files")
    p.add_argument("--runtime", choices=["embedded", "production"], default="embedded")
    p.add_argument("--out", help="repository folder (default: settings.model_repository)")
    p.add_argument(
        "--release", action="append", help="production: release(s) to serve (default: the served)"
    )
    p = _cmd(repo, "check", "exporters.triton_configs:cli_check", "check configs vs artifacts")
    p.add_argument("dir", nargs="?", help="repository folder (default: settings.model_repository)")
    rel = groups.add_parser("release", help="model releases").add_subparsers(
        dest="cmd", required=True
    )
    _cmd(rel, "list", "exporters.release_ops:cli_list", "releases: status, metrics, validation")
    _cmd(rel, "show", "exporters.release:cli_show", "show a manifest").add_argument("release_id")
    p = _cmd(rel, "publish", "exporters.release:cli_publish", "publish work/ as a release")
    p.add_argument("--force", action="store_true", help="publish although the gate fails")
    p.add_argument("--reason", help="why (required with --force; kept in the manifest)")
    p = _cmd(rel, "validate", "exporters.release_ops:cli_validate", "is a release fit to serve")
    p.add_argument("release_id")
    p.add_argument("--no-triton", action="store_true", help="skip the Triton load check")
    _force_args(p)
    p = _cmd(rel, "promote", "exporters.release_ops:cli_promote", "make a release live")
    p.add_argument("release_id")
    _force_args(p)
    p = _cmd(rel, "rollback", "exporters.release_ops:cli_rollback", "back to the previous live")
    p.add_argument("--reason", help="why (recorded in the history)")
    p = _cmd(
        rel, "ab", "exporters.release_ops:cli_ab", "A/B: ab R1 R2 --split 90/10 | stop | report"
    )
    p.add_argument("args", nargs="+", help="two or more release ids, or `stop`, or `report`")
    p.add_argument("--split", default="50/50", help="percent per arm, e.g. 90/10")
    p.add_argument("--since", help="report: ISO-8601 time or a duration back (30m, 24h, 7d)")
    p.add_argument(
        "--arms", nargs=2, metavar=("A", "B"), help="report: releases (default: the A/B state's)"
    )
    p.add_argument("--min-impressions", type=int, help="report: per arm for a verdict (1000)")
    p.add_argument("--window-minutes", type=float, help="report: attribution without request_id")
    p.add_argument("--json", action="store_true", help="report: JSON instead of a table")
    _force_args(p)
    p = _cmd(rel, "history", "exporters.release_ops:cli_history", "who changed what, when, why")
    p.add_argument("--last", type=int, default=20)

    # --- items added between releases ---------------------------------------------------
    items = groups.add_parser(
        "items", help="add items to the served releases without retraining"
    ).add_subparsers(dest="cmd", required=True)
    p = _cmd(
        items,
        "add",
        "exporters.item_delta:cli_add",
        "check an item file like `data import --items`, embed it with each served release's "
        "item_tower on Triton, persist and apply it",
    )
    p.add_argument("file", help="CSV or parquet: item_id[,category,brand,price,created_at]")
    p = _cmd(
        items, "remove", "exporters.item_delta:cli_remove", "mark items unavailable (out of stock)"
    )
    p.add_argument("item_ids", nargs="+", help="item ids")
    p.add_argument("--available", action="store_true", help="back in stock instead")
    p = _cmd(
        items,
        "fold",
        "exporters.item_delta:cli_fold",
        "write the added items into the raw item table (run before `recstack train`)",
    )
    p.add_argument("--release", type=int, help="whose added items (default: the live release)")
    p = _cmd(
        items,
        "carry",
        "exporters.item_delta:cli_carry",
        "give the served releases the items added to another release (promotions do it)",
    )
    p.add_argument("--from", dest="source", type=int, required=True, help="release id")

    # --- servers --------------------------------------------------------------------------
    serve = groups.add_parser("serve", help="run a server").add_subparsers(
        dest="cmd", required=True
    )
    p = _cmd(serve, "triton", "orchestrator.triton_server:cli", "the embedded tritonserver")
    p.add_argument("--detach", action="store_true", help="start, wait for ready, return")
    p.add_argument("--release", help="serve just this release (default: the release state's)")
    p = _cmd(serve, "redis", "orchestrator.redis_server:cli", "redis-server on loopback")
    p.add_argument("--detach", action="store_true")
    p = _cmd(
        serve, "redis-cluster", "orchestrator.redis_cluster:cli", "a local 3-master Redis Cluster"
    )
    p.add_argument("--detach", action="store_true")
    p = _cmd(
        serve,
        "orchestrator",
        "orchestrator.server:cli",
        "the gRPC/HTTP recommender (RECSTACK_ORCHESTRATOR_REPLICAS > 1: replicas behind nginx)",
    )
    p.add_argument("--detach", action="store_true")
    p = _cmd(serve, "signal", "orchestrator.replicas:cli_signal", "signal one server (load tests)")
    p.add_argument("name", help="its pid file's name under the run dir, e.g. orchestrator-1")
    p.add_argument("--signal", choices=["TERM", "KILL"], default="TERM")
    p = _cmd(
        serve,
        "drain",
        "orchestrator.replicas:cli_drain",
        "stop one replica without failing a call (out of nginx, then SIGTERM)",
    )
    p.add_argument("name", help="the replica, e.g. orchestrator-1")
    _cmd(groups, "stop", "orchestrator.processes:cli_stop", "stop servers started --detach")

    # --- benchmarks (not tests) -----------------------------------------------------------
    bench = groups.add_parser("bench", help="benchmarks").add_subparsers(dest="cmd", required=True)
    p = _cmd(bench, "features", "loadtest.feature_bench:cli", "Feast SDK vs fast path")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument(
        "--stores",
        default="sqlite,redis",
        help="comma-separated online stores (sqlite, redis, redis_cluster)",
    )
    p = _cmd(bench, "triton", "loadtest.triton_bench:cli", "Triton gRPC vs in-process")
    p.add_argument("--repeats", type=int, default=300)

    p = _cmd(
        bench,
        "quality",
        "loadtest.quality_bench:cli",
        "served NDCG@10/Recall@10 vs most-popular and EASE (leave-last-N-out, docs/quality.md)",
    )
    p.add_argument("--workspace", help="own data/releases/run folder (default: .bench-quality)")
    p.add_argument(
        "--ratings", help="user_id,item_id,rating[,timestamp] file (default: sparse preset)"
    )
    p.add_argument("--columns", metavar="NAMES", help="the columns of --ratings without a header")
    p.add_argument(
        "--map",
        action="append",
        metavar="COLUMN=FIELD",
        help="a column of --ratings used as user_id/item_id/rating/timestamp, e.g. isbn=item_id",
    )
    p.add_argument(
        "--time-order",
        default="random",
        metavar="random|file",
        help="--ratings without timestamps: each user's order (the last --holdout are held out)",
    )
    p.add_argument("--items", help="items file to import with --ratings")
    p.add_argument("--users", help="users file to import with --ratings")
    p.add_argument("--preset", default="sparse", help="ratings preset when no --ratings")
    p.add_argument("--seed", type=int, default=42, help="preset seed")
    p.add_argument("--holdout", type=int, default=5, help="last N ratings per user held out")
    p.add_argument("--k", type=int, default=10)
    p.add_argument(
        "--positive-min",
        type=float,
        help="held-out positive rating (default: the importer's purchase cut, 4 on 1-5 stars)",
    )
    p.add_argument("--ease-lambda", type=float, default=EASE_LAMBDA)
    p.add_argument(
        "--port-base",
        type=int,
        default=31000,
        help="Triton +0..2, orch. +51/+80/+100 (keep below 32768)",
    )
    p.add_argument("--time-limit", type=float, default=3600.0, help="seconds for the whole run")
    p.add_argument("--max-users", type=int, default=0, help="score only the first N (0 = all)")
    p.add_argument("--no-timestamp-pass", action="store_true", help="skip the timestamp= pass")
    p.add_argument("--coverage-k", type=int, default=200, help="a k=N pass: coverage (0: off)")
    p.add_argument("--keep-up", action="store_true", help="leave the servers running")

    p = _cmd(bench, "candidates", "loadtest.candidates_bench:cli", "CPU of the non-ANN sources")
    p.add_argument("--items", type=int, nargs="+", default=[1_677, 10_000, 1_000_000])
    p.add_argument("--requests", type=int, default=2000)
    p = _cmd(
        bench,
        "reference",
        "loadtest.reference:cli",
        "the orchestrator's pipeline with the release's models in process, no Triton "
        "(a yardstick for the benchmark, not a serving mode)",
    )
    p.add_argument("--port", type=int, required=True, help="gRPC port")
    p.add_argument("--http-port", type=int, help="default: --port + 1")
    p.add_argument("--metrics-port", type=int, help="Prometheus; default: --port + 2")
    p.add_argument("--admin-port", type=int, help="default: --port + 3")
    p.add_argument("--release", type=int, help="default: the release state's live release")
    p.add_argument("--detach", action="store_true", help="start, wait until it serves, return")
    p.add_argument("--timeout", type=float, default=600.0, help="--detach: seconds to wait")
    p = _cmd(
        bench,
        "items",
        "loadtest.items_bench:cli",
        "new items: ingestion throughput and latency to first retrieval (running stack)",
    )
    p.add_argument("--items", type=int, default=1000, help="items to add")
    p.add_argument("--batch", type=int, default=100, help="items per POST /admin/items")
    p.add_argument("--first-id", type=int, help="default: above every id the catalog holds")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait per batch")
    p.add_argument("--throughput-items", type=int, default=10_000, help="items, 1,000 a call")
    p.add_argument(
        "--probe",
        choices=["user", "vector"],
        default="user",
        help="retrieved by: an active user's recommendations, or the item's own vector",
    )
    p = _cmd(
        bench,
        "offline",
        "exporters.bench_offline:cli",
        "recstack train per offline engine: seconds per step, peak memory (docs/offline.md)",
    )
    p.add_argument("--preset", choices=["small", "demo", "large"], default="small")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--engines", default="pandas,spark", help="comma-separated")
    p.add_argument("--workspace", help="own data folders (default: .bench-offline)")
    p.add_argument("--timeout", type=float, default=7200.0, help="seconds per engine")
    p = _cmd(
        bench,
        "pipeline",
        "loadtest.pipeline_bench:cli",
        "CPU per stage of the request path in one thread, models in process (issue 13)",
    )
    p.add_argument("--users", type=int, default=500, help="release users, each once a repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="draws the users")
    p.add_argument("--release", type=int, help="default: the release state's live release")
    p.add_argument("--record", help="write the answers (and numbers) to this JSON file")
    p.add_argument("--check", help="compare the answers with a --record file (exit 1: differ)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="--check: score difference")
    p.add_argument("--json", help="write the numbers to this JSON file")
    p = _cmd(bench, "ranker", "exporters.ranker_cost:cli", "NDCG@10 vs ranker cost")
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=30)

    # --- load tests -----------------------------------------------------------------------
    from loadtest.faults import FAULTS

    lt = groups.add_parser("loadtest", help="open-loop load tests").add_subparsers(
        dest="cmd", required=True
    )
    p = _cmd(lt, "run", "loadtest.cli:run", "run a scenario")
    p.add_argument("scenario", help="name in loadtest/scenarios/ or a path")
    p.add_argument("--out", help="output folder")
    p.add_argument("--rate", type=float, help="override load.rate (replaces stages)")
    p.add_argument("--duration", help="override load.duration, e.g. 30s")
    p.add_argument("--workers", type=int, help="generator processes (load.workers)")
    p.add_argument("--address", help="override target.address (host:port)")
    p.add_argument("--seed", type=int, help="override load.seed (another user/request sequence)")
    p.add_argument("--no-progress", action="store_true")
    p = _cmd(lt, "sweep", "loadtest.cli:sweep", "raise the rate until p99 breaks the SLO")
    p.add_argument("scenario")
    p.add_argument("--out")
    p.add_argument("--workers", type=int, help="generator processes (load.workers)")
    p.add_argument("--address", help="override target.address (host:port)")
    p.add_argument("--slo-p99-ms", type=float, help="override slo.p99_ms")
    p.add_argument("--no-progress", action="store_true")
    p = _cmd(lt, "compare", "loadtest.cli:compare", "ratios between two results")
    p.add_argument("a")
    p.add_argument("b")
    p = _cmd(lt, "fault", "loadtest.faults:cli", "hold a dependency fault (chaos actions)")
    p.add_argument("fault", choices=FAULTS)
    p.add_argument("--seconds", type=float, required=True, help="how long the fault lasts")
    p.add_argument("--model", default="rank", help="model-unload: the Triton model")
    p.add_argument("--node", type=int, help="redis-master-kill: the master's port (default: first)")
    p = _cmd(lt, "stub-server", "loadtest.cli:stub_server", "stand-in Recommender (calibration)")
    p.add_argument("--grpc-port", type=int, default=19080)
    p.add_argument("--http-port", type=int, default=19081)
    p.add_argument("--delay-ms", type=float, default=0.0, help="service time per request")
    p.add_argument("--concurrency", type=int, default=0, help="0 = unlimited, 1 = serialised")

    # --- the demo ---------------------------------------------------------------------------
    p = _cmd(groups, "demo", "recstack.demo:cli", "data -> train -> serve -> recommendations")
    p.add_argument("--preset", choices=["small", "demo", "large", "sparse"], default="demo")
    p.add_argument(
        "--string-ids", action="store_true", help="UUID users and SKU items (docs/data.md)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, configure logging, dispatch. Errors the user can fix exit 2 with a message."""
    lean_feast_imports()  # before any command's module imports Feast
    args = build_parser().parse_args(argv)
    logs.configure(verbose=args.verbose)
    try:
        rc = _target(args._run)(args)
    except UserError as e:
        print(f"recstack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

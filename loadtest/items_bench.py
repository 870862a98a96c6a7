"""``recstack bench items``: items added to a running stack without retraining — ingestion
throughput, and each item's latency to its first retrieval (docs/benchmark.md "New
items").

Against the stack of the current settings (Triton, the orchestrator and its admin API):

1. **Latency to first retrieval.** Items are added through ``POST /admin/items`` in
   batches; each batch copies the attributes (category, brand, price, creation time) of
   the best retrieved item of one active user, so the new items are ones that user's
   query can find. Once the call returns (the items are applied), that user's
   recommendations are polled on the public HTTP front (``include_categories`` = the
   batch's category, k = 200, as of the end of the data) until each item of the batch
   comes back with ``retrieval`` among its sources; then the batch is marked
   unavailable (which takes added items out of the search), so batches do not crowd
   each other out of the user's neighbours. An item's latency runs from the start of
   its ``POST`` to the first answer that retrieved it; items not retrieved within
   ``--timeout`` are counted apart (the user's top 500 neighbours did not reach them: a
   model question, not a delay).
   With ``--probe vector`` (large catalogs, where one user's 500 neighbours out of 1M
   rarely include a copy of their best item under a new id) the items copy random
   catalog items and "retrieved" means: ``POST /admin/items/probe`` finds the item in
   the live release's retrieval (its index and added items, searched as a request
   searches them) for a query equal to the item's own vector.
2. **Ingestion throughput.** ``--throughput-items`` more (10,000) in calls of 1,000
   (checked, embedded by every served release's item tower on Triton, written,
   applied), timed end to end.

The added items stay in the served releases' delta (bench ids start above every id the
catalog holds); run it on a workspace of its own.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np
import pandas as pd

from exporters.item_delta import _known, _served
from exporters.raw_tables import read_table
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

PROBE_K = 200  # the most a request may ask for (orchestrator/request.py K_MAX)
THROUGHPUT_BATCH = 1000


def _call(url: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # loopback
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise UserError(f"{url}: HTTP {e.code} {e.read()[:300]!r}") from e
    except (urllib.error.URLError, OSError) as e:
        raise UserError(f"{url}: {e} (is the stack running? recstack serve ...)") from e


def _active_users(settings: Settings, n: int) -> list[int]:
    inter = read_table(settings, "interactions", columns=["user_id", "event"])
    pos = inter[inter["event"].astype(str).isin(["click", "purchase"])]
    return [int(u) for u in pos["user_id"].value_counts().index[:n]]


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run(
    settings: Settings,
    n_items: int,
    batch: int,
    first_id: int | None,
    timeout: float,
    throughput_items: int = 10_000,
    probe: str = "user",
) -> dict[str, Any]:
    """Both measurements; returns the numbers (milliseconds, items per second)."""
    if probe not in ("user", "vector"):
        raise UserError(f"--probe must be user or vector, got {probe!r}")
    if n_items < 1 or batch < 1 or throughput_items < 1:
        raise UserError("--items, --batch and --throughput-items must be positive")
    admin = f"http://{settings.orchestrator_admin_host}:{settings.orchestrator_admin_port}"
    front = f"http://{settings.orchestrator_host}:{settings.orchestrator_http_port}"
    releases = _served(settings)
    known = np.concatenate([_known(settings, r) for r in releases])
    items = read_table(settings, "items").set_index("item_id")
    next_id = (
        int(first_id) if first_id is not None else int(max(known.max(), items.index.max())) + 1
    )

    def recommend(user: int, as_of: str, category: int | None = None) -> list[dict[str, Any]]:
        params = {"user_id": str(user), "k": str(PROBE_K), "timestamp": as_of}
        if category is not None:
            params["include_categories"] = str(category)
        doc = _call(f"{front}/v1/recommendations?{urllib.parse.urlencode(params)}", timeout=10)
        return list(doc["items"])

    latencies: list[float] = []
    missed = 0
    added = 0
    if probe == "vector":
        rng = np.random.default_rng(0)
        while added < n_items:
            size = min(batch, n_items - added)
            ids = list(range(next_id, next_id + size))
            next_id += size
            src = items.iloc[rng.integers(0, len(items), size)]
            rows = [
                {
                    "item_id": i,
                    "category": int(a.category),
                    "brand": int(a.brand),
                    "price": float(a.price),
                    "created_at": pd.Timestamp(a.created_at).isoformat(),
                }
                for i, a in zip(ids, src.itertuples(), strict=True)
            ]
            t0 = time.perf_counter()
            _call(f"{admin}/admin/items", {"items": rows})
            pending = set(ids)
            while pending and time.perf_counter() - t0 < timeout:
                doc = _call(f"{admin}/admin/items/probe", {"item_ids": sorted(pending)})
                now = time.perf_counter()
                for i in doc["retrieved"][str(releases[0])]:
                    pending.discard(i)
                    latencies.append((now - t0) * 1000)
                if pending:
                    time.sleep(0.02)
            missed += len(pending)
            added += size
    else:
        users = _active_users(settings, 4 * -(-n_items // batch))
        end = read_table(settings, "interactions", columns=["timestamp"])["timestamp"].max()
        as_of = pd.Timestamp(end).isoformat().replace("+00:00", "Z")
        for user in users:
            if added >= n_items:
                break
            best = next(
                (i for i in recommend(user, as_of) if "retrieval" in i.get("sources", [])), None
            )
            if best is None or int(best["item_id"]) not in items.index:
                continue
            attrs = items.loc[int(best["item_id"])]
            size = min(batch, n_items - added)
            ids = list(range(next_id, next_id + size))
            next_id += size
            rows = [
                {
                    "item_id": i,
                    "category": int(attrs["category"]),
                    "brand": int(attrs["brand"]),
                    "price": float(attrs["price"]),
                    "created_at": pd.Timestamp(attrs["created_at"]).isoformat(),
                }
                for i in ids
            ]
            t0 = time.perf_counter()
            _call(f"{admin}/admin/items", {"items": rows})
            pending = set(ids)
            while pending and time.perf_counter() - t0 < timeout:
                answer = recommend(user, as_of, int(attrs["category"]))
                now = time.perf_counter()
                for item in answer:
                    if item["item_id"] in pending and "retrieval" in item.get("sources", []):
                        pending.discard(item["item_id"])
                        latencies.append((now - t0) * 1000)
                time.sleep(0.02)
            missed += len(pending)
            added += size
            # Out of stock once measured: an unavailable added item leaves the search, so
            # the next batch competes with the catalog, not with copies of earlier ones.
            _call(f"{admin}/admin/items/unavailable", {"item_ids": ids})

    start = next_id
    t0 = time.perf_counter()
    for lo in range(0, throughput_items, THROUGHPUT_BATCH):
        ids = list(range(start + lo, start + min(lo + THROUGHPUT_BATCH, throughput_items)))
        rows = [
            {"item_id": i, "category": int(items["category"].iloc[i % len(items)])} for i in ids
        ]
        _call(f"{admin}/admin/items", {"items": rows})
    seconds = time.perf_counter() - t0
    return {
        "releases": releases,
        "catalog_items": len(known),
        "probe": probe,
        "latency_items": added,
        "latency_batch": batch,
        "retrieved": len(latencies),
        "not_retrieved": missed,
        "latency_p50_ms": round(_percentile(latencies, 50), 1),
        "latency_p99_ms": round(_percentile(latencies, 99), 1),
        "latency_max_ms": round(max(latencies, default=float("nan")), 1),
        "throughput_items": throughput_items,
        "throughput_seconds": round(seconds, 2),
        "items_per_second": round(throughput_items / seconds, 1),
    }


def cli(args: argparse.Namespace) -> int:
    result = run(
        get_settings(),
        args.items,
        args.batch,
        args.first_id,
        args.timeout,
        args.throughput_items,
        args.probe,
    )
    print(json.dumps(result, indent=2))
    return 0

"""``recstack bench candidates``: the CPU the non-ANN candidate sources add to a request.

Issue 10 allows the item-to-item and popular sources, with their merge and the seen-item
filter, at most 1 ms of CPU per request at 1M items. This bench builds a catalog of
``--items`` rows with the release's artifact shapes (neighbour lists of the width
``exporters.candidates.default_top_n`` picks, or a dense EASE matrix at small sizes),
random users with histories drawn from a heavy-tailed distribution, and times
``exporters.candidates.gather`` — the function serving runs — in one thread (process CPU
time, median and p99 over ``--requests`` calls), next to the ANN-only path it replaces
(filter the ANN list, cut to the ranked count).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from exporters.candidates import (
    DENSE_MAX_ITEMS,
    Quotas,
    SourceModel,
    default_top_n,
    exists_at,
    gather,
)
from orchestrator.catalog import Catalog
from orchestrator.request import Filters


def _model(n: int, rng: np.random.Generator) -> SourceModel:
    top_n = default_top_n(n)
    # Neighbours lean to popular items (Zipf), as co-visitation lists do.
    pop = rng.zipf(1.3, size=n).astype(np.float64)
    p = pop / pop.sum()
    neighbours = rng.choice(n, size=(n, top_n), p=p).astype(np.int32)
    weights = np.sort(rng.random((n, top_n)).astype(np.float32), axis=1)[:, ::-1]
    dense = rng.random((n, n)).astype(np.float32) if n <= DENSE_MAX_ITEMS else None
    return SourceModel.from_arrays(
        np.arange(n, dtype=np.int64),
        neighbours,
        np.ascontiguousarray(weights),
        pop,
        {},
        dense=dense,
        category=rng.integers(0, 50, n),
        created_at=rng.uniform(0.0, 1.0, n),
    )


def _cpu_ms(fn: object, repeats: int) -> tuple[float, float]:
    samples = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()  # type: ignore[operator]
        samples.append((time.thread_time() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * (len(samples) - 1))]


def run(n_items: int, n_requests: int, seed: int = 0) -> dict[str, float]:
    """Median and p99 CPU ms per request of the merged sources vs the ANN-only path."""
    rng = np.random.default_rng(seed)
    model = _model(n_items, rng)
    catalog = Catalog.build(
        item_ids=np.arange(n_items, dtype=np.int64),
        category=rng.integers(0, 50, n_items),
        price=rng.gamma(2.0, 10.0, n_items),
        created_at=np.zeros(n_items),
        popularity=model.pop_count.astype(np.float64),
        embeddings=np.zeros((n_items, 1), np.float32),
    )
    quotas = Quotas()
    filters = Filters()
    requests = []
    for _ in range(n_requests):
        n_hist = int(min(rng.lognormal(3.5, 1.2), 5000))  # median ~33, heavy tail
        seen = rng.integers(0, n_items, size=n_hist)
        ann = rng.permutation(n_items)[:500] if n_items < 50_000 else rng.integers(0, n_items, 500)
        requests.append((seen, ann))
    it = iter(requests * 2)

    def merged() -> None:
        seen, ann = next(it)

        passes = catalog.request_filter(filters, seen)  # as the service does

        def allowed(rows: np.ndarray) -> np.ndarray:
            return passes(rows) & exists_at(catalog.created_at[rows], 1.0)

        seen_rows, known = catalog.rows(seen)
        gather(model, quotas, ann, np.where(known, seen_rows, -1), allowed, 1.0)

    def ann_only() -> None:
        seen, ann = next(it)
        keep = catalog.request_filter(filters, seen)(ann) & exists_at(catalog.created_at[ann], 1.0)
        _ = ann[keep][:300]

    m50, m99 = _cpu_ms(merged, n_requests)
    it = iter(requests * 2)
    a50, a99 = _cpu_ms(ann_only, n_requests)
    return {
        "items": n_items,
        "neighbours_per_item": model.n_neighbours,
        "dense": model.dense is not None,
        "merged_cpu_ms_p50": round(m50, 3),
        "merged_cpu_ms_p99": round(m99, 3),
        "ann_only_cpu_ms_p50": round(a50, 3),
        "ann_only_cpu_ms_p99": round(a99, 3),
        "added_cpu_ms_p50": round(m50 - a50, 3),
    }


def cli(args: argparse.Namespace) -> int:
    """Print one line of results per catalog size."""
    for n in args.items:
        print(run(n, args.requests))
    return 0

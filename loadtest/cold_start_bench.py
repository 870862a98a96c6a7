"""Cold-start segment lists vs the global popular list, offline (docs/architecture.md
"Cold start"): a generated world is cut ``days`` before its end; the lists are built from
the seen events before the cut exactly as the release builds them
(:func:`exporters.candidates.segment_lists`, :func:`~exporters.candidates.context_lists`),
and scored on the users with no seen event before the cut and some after (the cold starts
of that moment): NDCG@10 and Recall@10 of the items each consumed after the cut. Each
cold user's request context is that of their first event after the cut; four lists:
global, the user's attribute segment, the context's list as an anonymous visitor would
get it, and both in serving's order.

``PYTHONPATH=. .venv/bin/python -m loadtest.cold_start_bench --preset demo --seed 7``
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from exporters import baselines, candidates, metrics
from exporters.data_generate import PRESETS, build
from exporters.schema import CONTEXT_COLUMNS
from exporters.seen import DEFAULT_SEEN_EVENTS

K = 10


def run(preset: str, seed: int, days: float) -> dict[str, Any]:
    """The two lists' NDCG@10 / Recall@10 over the cold users, and which segments served."""
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if days <= 0:
        raise SystemExit("--days must be positive")
    raw, _, end = build(PRESETS[preset], seed)
    inter = raw.interactions
    seen = inter[inter["event"].astype(str).isin(DEFAULT_SEEN_EVENTS)]
    cut = end - pd.Timedelta(days=days)
    before, after = seen[seen["timestamp"] < cut], seen[seen["timestamp"] >= cut]
    item_ids = np.sort(raw.items["item_id"].to_numpy(np.int64))
    X, row_users = baselines.interaction_matrix(before, item_ids)
    pop = baselines.popularity_scores(X)
    segments, info = candidates.segment_lists(X, row_users, raw.users, pop)
    by_context, info["context"] = candidates.context_lists(
        before, item_ids, DEFAULT_SEEN_EVENTS, pop
    )
    n = len(item_ids)
    no_neighbours = np.full((n, 1), -1, np.int32)
    model = candidates.SourceModel.from_arrays(
        item_ids,
        no_neighbours,
        np.zeros((n, 1), np.float32),
        pop,
        {},
        segments=candidates.join_segments(segments, by_context),
    )
    cold = np.setdiff1d(after["user_id"].unique(), before["user_id"].unique())
    mine = after[after["user_id"].isin(cold)]
    relevant = [set(g) for _, g in mine.groupby("user_id")["item_id"]]
    attrs = raw.users.set_index("user_id").loc[cold, list(candidates.SEGMENT_ATTRIBUTES)]
    first = mine.sort_values("timestamp").drop_duplicates("user_id").set_index("user_id")
    contexts = first.loc[cold, list(CONTEXT_COLUMNS)].astype(str).to_dict("records")
    global_top = item_ids[model.popular_rows[:K]]
    served: Counter[str] = Counter()

    def top_of(found: tuple[str, np.ndarray] | None, count: bool = False) -> np.ndarray:
        name = found[0] if found is not None else "global"
        if count:
            served["+".join(part.split("=")[0] for part in name.split(","))] += 1
        if found is None:
            return global_top
        top = item_ids[found[1][:K]]
        # Topped up from the global list, as serving does under filters.
        return np.concatenate([top, global_top[~np.isin(global_top, top)]])[:K]

    people = [
        dict(zip(attrs.columns, map(int, row), strict=True))
        for row in attrs.itertuples(index=False)
    ]
    lists = {
        "global": np.tile(global_top, (len(cold), 1)),
        "segment": np.stack([top_of(model.segment_popular(a)) for a in people]),
        "context": np.stack([top_of(model.segment_popular({}, c)) for c in contexts]),
        "both": np.stack(
            [
                top_of(model.segment_popular(a, c), True)
                for a, c in zip(people, contexts, strict=True)
            ]
        ),
    }
    return {
        "preset": preset,
        "seed": seed,
        "cut": str(cut.date()),
        "cold_users": len(cold),
        "segments": info,
        "served_by": dict(served),
        **{
            name: (metrics.ndcg_at_k(x, relevant, K), metrics.recall_at_k(x, relevant, K))
            for name, x in lists.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--days", type=float, default=30.0, help="the cut, days before the end")
    args = ap.parse_args(argv)
    r = run(args.preset, args.seed, args.days)
    print(
        f"{r['preset']} seed {r['seed']}, cut {r['cut']}: {r['cold_users']} cold users; "
        f"segments {r['segments']}; served by {r['served_by']}"
    )
    for name in ("global", "segment", "context", "both"):
        ndcg, recall = r[name]
        print(f"  {name:8s} NDCG@10 {ndcg:.4f}  Recall@10 {recall:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`recstack bench quality`: the metric definitions by hand, the split, input errors and
the baseline lists (no servers here; the command itself is run by `make bench-quality`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from exporters import ease_lambda
from loadtest.quality_bench import (
    baseline_lists,
    heldout_baselines,
    leave_last_out,
    markdown,
    ndcg_recall_at_k,
    read_ratings,
    score_lists,
    workspace_env,
)
from recstack.cli import build_parser
from recstack.errors import UserError
from recstack.ids import key_hash


def test_ndcg_and_recall_by_hand() -> None:
    # Hits at ranks 1 and 3 of 3 positives, k = 10.
    ndcg, recall, hits = ndcg_recall_at_k([5, 9, 7, 1], {5, 7, 8}, k=10)
    dcg = 1 + 1 / math.log2(4)
    idcg = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg == pytest.approx(dcg / idcg)
    assert recall == pytest.approx(2 / 3) and hits == 2
    # More positives than k: recall is over k, and a perfect list scores 1.
    pos = set(range(20))
    assert ndcg_recall_at_k(list(range(10)), pos, k=10)[:2] == (pytest.approx(1.0), 1.0)
    # Only the first k count; a repeated item counts once.
    assert ndcg_recall_at_k([1, 2, 3], {3}, k=2) == (0.0, 0.0, 0)
    assert ndcg_recall_at_k([3, 3], {3, 4}, k=2)[2] == 1
    with pytest.raises(ValueError):
        ndcg_recall_at_k([1], set(), k=10)


def test_score_lists_counts_seen_items_as_misses_and_reports_their_share() -> None:
    positives = {1: {10}, 2: {20}, 3: {30}}
    rated = {1: {11, 12}, 2: set()}
    lists = {1: [11, 10], 2: [21, 22]}  # user 3 got nothing (a failed request)
    res = score_lists("x", lists, positives, rated, k=10)
    assert res.users == 3
    assert res.ndcg == pytest.approx((1 / math.log2(3)) / 3)
    assert res.recall == pytest.approx(1 / 3)
    assert res.seen_share == pytest.approx(1 / 4)
    assert res.mean_len == pytest.approx(4 / 3)


def _ratings(rows: list[tuple[int, int, float, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def test_leave_last_out_by_time_per_user(tmp_path: Path) -> None:
    # User 1 has 4 ratings (file order is not time order), user 2 only 2.
    df = _ratings([(1, 10, 5, 400), (1, 11, 4, 100), (2, 20, 5, 50), (1, 12, 1, 300)])
    df = pd.concat([df, _ratings([(1, 13, 3, 200), (2, 21, 4, 60)])], ignore_index=True)
    path = tmp_path / "r.csv"
    df.to_csv(path, index=False)
    raw, parsed, times = read_ratings(path)
    assert times == "timestamp"
    assert parsed["timestamp"].iloc[0] == pd.Timestamp(400, unit="s", tz="UTC")
    held = leave_last_out(parsed, 2)
    # User 1's two latest (t=400, t=300); user 2 has no more than 2 ratings: kept whole.
    assert sorted(parsed.loc[held, "item_id"]) == [10, 12]
    assert raw.loc[held, "timestamp"].tolist() == ["400", "300"]  # rows kept verbatim
    with pytest.raises(UserError, match="holdout"):
        leave_last_out(parsed, 0)


def test_read_ratings_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        read_ratings(tmp_path / "missing.csv")
    p = tmp_path / "a.csv"
    p.write_text("user_id,item_id,value,timestamp\n1,2,3,4\n")
    with pytest.raises(UserError, match=r"missing column\(s\) \['rating'\]"):
        read_ratings(p)
    p.write_text("User_ID,item_id,rating,timestamp\nu 1,2,3,4\n")
    with pytest.raises(UserError, match="line 2, column 'user_id': 'u 1' is not a valid id"):
        read_ratings(p)
    # String ids (ISBNs, UUIDs) by the importer's rule, as served answers carry them.
    p.write_text("user_id,item_id,rating,timestamp\nu-7,034545104X,3,4\n007,0155061224,5,4\n")
    parsed = read_ratings(p)[1]
    assert parsed["user_id"].tolist() == [key_hash("u-7"), 7]
    assert parsed["item_id"].tolist() == [key_hash("034545104X"), 155061224]
    p.write_text("user_id,item_id,rating,timestamp\n1,2,3,yesterday\n")
    with pytest.raises(UserError, match="cannot parse 'yesterday'"):
        read_ratings(p)
    p.write_text("user_id,item_id,rating,timestamp\n1,2,3,1998-01-01T00:00:00Z\n")
    assert read_ratings(p)[1]["timestamp"].iloc[0] == pd.Timestamp("1998-01-01", tz="UTC")


def test_ratings_without_timestamps_are_split_in_the_chosen_order(tmp_path: Path) -> None:
    """A header-less "::" file without times (read as the importer reads it): the times are
    synthesized once, written into the rows that are imported, and "the last N" follows
    them — the file's order with ``file``, a seeded shuffle with ``random``."""
    rows = [(1, 10, 5), (1, 11, 4), (2, 20, 5), (1, 12, 1), (1, 13, 3), (2, 21, 4), (2, 22, 2)]
    path = tmp_path / "ratings.dat"
    path.write_text("".join(f"{u}::{i}::{r}\n" for u, i, r in rows))
    cols = ["user_id", "item_id", "rating"]
    # No header line, 3 numbers: user, item, rating (--columns would say the same).
    assert read_ratings(path, None, "file", seed=7)[1].equals(
        read_ratings(path, cols, "file", seed=7)[1]
    )
    raw, parsed, times = read_ratings(path, cols, "file", seed=7)
    assert times == "synthesized (file order per user, seed 7)"
    held = leave_last_out(parsed, 2)
    assert sorted(parsed.loc[held, "item_id"]) == [12, 13, 21, 22]  # each user's last two lines
    # The imported rows carry the same times (µs), which the importer reads back exactly.
    again = pd.to_datetime(raw["timestamp"], utc=True, format="ISO8601")
    assert (again == parsed["timestamp"]).all()
    assert list(raw.columns) == [*cols, "timestamp"]

    shuffles = [leave_last_out(read_ratings(path, cols, "random", seed=s)[1], 2) for s in range(8)]
    assert len({tuple(h) for h in shuffles}) > 1  # the seed chooses which ratings are last
    assert all(h.sum() == 4 for h in shuffles)


def test_a_book_crossing_file_is_read_with_the_importers_map(tmp_path: Path) -> None:
    """Quoted ";"-separated, its own column names, ISBN keys, no timestamps: read as
    ``recstack data import`` reads it (ISBN and Book-Rating taken by their names, or named
    with --map); the rows to import carry schema names."""
    p = tmp_path / "BX-Book-Ratings.csv"
    p.write_text(
        '"User-ID";"ISBN";"Book-Rating"\n"276725";"034545104X";"0"\n'
        '"276726";"0155061224";"5"\n"276725";"0446520802";"10"\n'
    )
    assert read_ratings(p)[1]["rating"].tolist() == [0.0, 5.0, 10.0]
    p.write_text(p.read_text().replace("Book-Rating", "Value"))
    with pytest.raises(UserError, match=r"missing column\(s\) \['rating'\]"):
        read_ratings(p)
    args = build_parser().parse_args(
        [
            "bench",
            "quality",
            "--ratings",
            str(p),
            "--map",
            "isbn=item_id",
            "--map",
            "book_rating=rating",
        ]
    )
    assert args.map == ["isbn=item_id", "book_rating=rating"]
    raw, parsed, times = read_ratings(p, column_map={"isbn": "item_id", "value": "rating"})
    assert parsed["item_id"].tolist() == [key_hash("034545104X"), 155061224, 446520802]
    assert parsed["rating"].tolist() == [0.0, 5.0, 10.0]
    assert list(raw.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert times.startswith("synthesized")


def test_baselines_exclude_rated_items() -> None:
    train = _ratings(
        [(1, 10, 5, 0), (2, 10, 5, 0), (3, 10, 5, 0), (2, 11, 5, 0), (3, 11, 5, 0), (3, 12, 5, 0)]
    )
    lists = baseline_lists(train, np.array([10, 11, 12, 13]), [1, 2], k=2, lams=[1.0])
    pop = lists["most popular"]
    assert pop[1] == [11, 12] and pop[2] == [12, 13]
    ease = lists["EASE (λ=1)"]
    assert 10 not in ease[1] and not {10, 11} & set(ease[2])


def test_ease_tuned_on_the_held_out_ratings_is_the_grids_best(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The test-tuned EASE row: the grid's λ whose lists score the best NDCG@k on the
    held-out positives, named by it, its lists those of EASE at that λ."""
    rng = np.random.default_rng(0)
    rows = [(u, int(i), 5, 0) for u in range(1, 41) for i in rng.choice(30, 6, replace=False)]
    train = _ratings(rows)
    items = np.arange(30)
    users = list(range(1, 41))
    rated = {u: set(train.loc[train["user_id"] == u, "item_id"]) for u in users}
    unrated = {u: [int(i) for i in items if i not in rated[u]] for u in users}
    positives = {u: set(rng.choice(unrated[u], 2, replace=False).tolist()) for u in users}
    grid = (0.1, 10.0, 1000.0)
    monkeypatch.setattr(ease_lambda, "GRID", grid)
    ease = baseline_lists(train, items, users, 5, grid)
    assert list(ease) == ["most popular", *(f"EASE (λ={lam:g})" for lam in grid)]
    scores = {
        lam: score_lists("", ease[f"EASE (λ={lam:g})"], positives, rated, 5).ndcg for lam in grid
    }
    best = max(grid, key=lambda lam: scores[lam])
    assert len(set(scores.values())) > 1  # the grid's λ do differ here
    # One matrix build for all λ: the same lists as one λ at a time.
    assert ease["EASE (λ=10)"] == baseline_lists(train, items, users, 5, [10.0])["EASE (λ=10)"]
    got = heldout_baselines(train, items, users, 5, positives, rated, 5, lam=250.0)
    assert list(got) == [
        "most popular",
        "EASE (λ=250)",
        f"EASE (λ={best:g}, best on these held-out ratings)",
    ]
    assert got[f"EASE (λ={best:g}, best on these held-out ratings)"] == ease[f"EASE (λ={best:g})"]
    assert got["most popular"] == ease["most popular"]
    monkeypatch.setattr(ease_lambda, "TUNE_MAX_ITEMS", 10)  # too many items: not swept
    assert list(heldout_baselines(train, items, users, 5, positives, rated, 5, 250.0)) == [
        "most popular",
        "EASE (λ=250)",
    ]


def test_workspace_env_and_cli_wiring(tmp_path: Path) -> None:
    env = workspace_env(tmp_path, 39000)
    assert env["RECSTACK_DATA_DIR"] == str(tmp_path / "data")
    assert env["RECSTACK_ORCHESTRATOR_HTTP_PORT"] == "39080"
    ports = [v for k, v in env.items() if k.endswith("_PORT")]
    assert len(set(ports)) == len(ports)
    args = build_parser().parse_args(["bench", "quality", "--holdout", "3", "--max-users", "5"])
    assert args._run == "loadtest.quality_bench:cli"
    assert args.holdout == 3 and args.k == 10 and args.ease_lambda == 250.0
    assert args.positive_min is None  # the importer's purchase cut of the ratings
    assert args.time_order == "random" and args.columns is None


def test_markdown_has_the_table() -> None:
    report = {
        "created": "2026-11-30T08:00:00+00:00",
        "source": "x",
        "protocol": {
            "holdout": "last 5",
            "positives": ">= 4",
            "k": 10,
            "ndcg": "binary",
            "recall": "hits / min(k, |P|)",
            "served_lists": "as served",
            "baselines": "exclude rated",
        },
        "data": {"imported_ratings": 10, "held_out_ratings": 5, "evaluated_users": 1},
        "results": [
            {
                "name": "most popular",
                "ndcg": 0.06,
                "recall": 0.08,
                "mean_len": 10.0,
                "seen_share": 0.0,
                "errors": 0,
                "sources": {},
            },
            {
                "name": "served",
                "ndcg": 0.07,
                "recall": 0.09,
                "mean_len": 10.0,
                "seen_share": 0.0,
                "errors": 0,
                "degraded": 3,
                "degraded_reasons": {"ranking_skipped": 2, "no_retrieval_candidates": 1},
                "sources": {"retrieval": 25, "popular": 5},
            },
        ],
        "seconds": 1.0,
    }
    md = markdown(report)
    assert "| most popular | 0.0600 | 0.0800 | 10.0 | 0.0 % | 0 |" in md
    # Why answers were degraded, by reason, beside how many.
    assert (
        "- served: retrieval 83 %, popular 17 %; degraded responses: 3 "
        "(ranking_skipped 2, no_retrieval_candidates 1)"
    ) in md

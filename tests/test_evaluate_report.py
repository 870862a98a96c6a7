"""The evaluation report: unit checks of its parts, and on the whole small pipeline
(`trained_settings`, shared with the other end-to-end tests) the pipeline must beat the
popularity baseline on NDCG@10."""

from __future__ import annotations

import json

import lightgbm as lgb
import numpy as np
import pandas as pd
import pytest

from exporters import evaluate
from exporters.labels import graded_labels, relevance
from recstack.settings import Settings


def _events(rows: list[tuple[int, int, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [r[0] for r in rows],
            "item_id": [r[1] for r in rows],
            "event": [r[2] for r in rows],
            "timestamp": pd.to_datetime([r[3] for r in rows], utc=True),
        }
    )


def test_popularity_counts_clicks_and_purchases_before_the_request() -> None:
    ev = _events(
        [
            (1, 10, "click", "2026-01-01"),
            (2, 10, "purchase", "2026-01-02"),
            (1, 11, "click", "2026-01-02"),
            (3, 12, "view", "2026-01-02"),  # views do not count
            (3, 13, "click", "2026-01-02"),
            (3, 11, "click", "2026-01-05"),  # after the request time
            (4, 11, "click", "2026-01-06"),
        ]
    )
    top = evaluate.popularity_ranking(ev, pd.Timestamp("2026-01-03", tz="UTC"), 5)
    assert top.tolist() == [10, 11, 13]  # ties (11, 13) by item id


def test_graded_labels_keep_the_best_event() -> None:
    ev = _events(
        [
            (1, 10, "click", "2026-01-01"),
            (1, 10, "purchase", "2026-01-02"),
            (1, 11, "view", "2026-01-02"),
            (2, 11, "click", "2026-01-02"),
        ]
    )
    got = graded_labels(ev).sort_values(["user_id", "item_id"]).values.tolist()
    assert got == [[1, 10, 2], [2, 11, 1]]
    # Each asked-for user's {item: grade}, in the order asked, as the metrics take them.
    ev2 = pd.concat([ev, _events([(1, 12, "click", "2026-01-03")])])
    assert relevance(graded_labels(ev2), [2, 1]) == [{11: 1.0}, {10: 2.0, 12: 1.0}]


def _lists(pipeline: float, pop: float, i2i: float) -> dict[str, dict[str, float]]:
    return {
        "pipeline": {"recall@10": 0.3, "ndcg@10": pipeline},
        "ranker_only": {"recall@10": 0.31, "ndcg@10": pipeline + 0.01},
        "retrieval": {"recall@10": 0.25, "ndcg@10": 0.15},
        "item_to_item": {"recall@10": 0.2, "ndcg@10": i2i},
        "popularity": {"recall@10": 0.1, "ndcg@10": pop},
    }


def test_markdown_states_the_gate_and_every_baseline() -> None:
    report = {
        "request_time": "2026-01-01T00:00:00+00:00",
        "evaluated_users": 3,
        "test_users": 3,
        "n_catalog": 9,
        "ranker_candidates": 50,
        "quotas": {"ann": 30, "i2i": 15, "popular": 5},
        "lists": _lists(0.2, 0.05, 0.25),
        "gate": {
            "passed": False,
            "margin": 0.0,
            "best_baseline": "item_to_item",
            "best_baseline_ndcg@10": 0.25,
            "pipeline_ndcg@10": 0.2,
            "ndcg@10_vs_popularity": 4.0,
            "ndcg@10_vs_item_to_item": 0.8,
            "ndcg@10_diff_vs_best": -0.05,
            "ndcg@10_diff_vs_best_ci95": [-0.09, -0.01],
        },
        "warnings": ["the ranker learned from only 12 queries"],
    }
    text = evaluate.markdown(report)
    assert "Quality gate FAILS" in text
    lead = "Pipeline − item_to_item: NDCG@10 -0.0500, 95 % interval -0.0900 … -0.0100 (below 0"
    assert lead in text
    assert "vs_item_to_item 0.80×" in text and "vs_popularity 4.00×" in text
    assert "| ndcg@10 | 0.2000 | 0.2100 | 0.1500 | 0.2500 | 0.0500 |" in text
    assert "- the ranker learned from only 12 queries" in text


@pytest.mark.slow
def test_small_pipeline_beats_popularity(trained_settings: Settings) -> None:
    """On the small synthetic preset the pipeline beats both gate baselines, so the
    release was published with a passing gate."""
    report = json.loads((trained_settings.reports_dir / "report.json").read_text())
    pipe = report["pipeline"]["ndcg@10"]
    for name in ("popularity", "item_to_item"):
        assert pipe > report["lists"][name]["ndcg@10"], (name, report["lists"])
    assert report["gate"]["passed"] is True
    gate = report["gate"]
    lo, hi = gate["ndcg@10_diff_vs_best_ci95"]
    diff = gate["ndcg@10_diff_vs_best"]
    assert diff == pytest.approx(gate["pipeline_ndcg@10"] - gate["best_baseline_ndcg@10"], abs=1e-4)
    assert lo <= diff <= hi and hi - lo < 0.2, gate  # an interval around the lead
    # The ranker only reorders the merged candidates: its top 10 cannot hold more relevant
    # items than all of them. A ranking path that leaked other items, or a recall computed
    # differently, breaks it.
    width = report["ranker_candidates"]
    candidate_recall = report["pipeline"][f"candidate_recall@{width}"]
    assert report["pipeline"]["recall@10"] <= candidate_recall + 1e-9, report["pipeline"]
    # Retrieval alone is far from random: a random 10-item list has expected recall
    # 10/n_catalog; tower embeddings misaligned with item ids fall to about that.
    random_recall = 10 / report["n_catalog"]
    assert report["lists"]["retrieval"]["recall@10"] > 1.5 * random_recall, report["lists"]
    assert (trained_settings.reports_dir / "report.md").read_text().startswith("# recstack")


@pytest.mark.slow
def test_small_pipeline_ranker_artifacts_agree(trained_settings: Settings) -> None:
    """ranker.json's feature order, the booster and the exported assembly have one width,
    and the recorded parity is within tolerance."""
    import onnxruntime as ort

    from exporters import feature_assembly as fa

    work = trained_settings.work_dir
    manifest = json.loads((work / "ranker.json").read_text())
    layout = fa.Layout.from_json(manifest["layout"])
    booster = lgb.Booster(model_file=str(work / "ranker.txt"))
    assert booster.feature_name() == manifest["feature_names"] == layout.names
    sess = ort.InferenceSession(str(work / "rank_features.onnx"))
    out = sess.run(None, fa.example_inputs(layout, 5))[0]
    assert out.shape == (5, booster.num_feature())
    parity = json.loads((work / "ranker_parity.json").read_text())
    # The float64 conversion matches LightGBM to 1e-5; the float32 checkpoint that FIL and
    # the library serve stays within the stated float32 bound, on the same branches.
    assert parity["ranker"]["float64_checkpoint"]["max_abs_diff"] < 1e-5
    tolerance = parity["ranker"]["float32"]["tolerance"]
    assert parity["ranker"]["checkpoint"]["max_abs_diff"] < tolerance
    assert parity["ranker"]["library"]["max_abs_diff"] < tolerance
    assert np.isfinite(list(parity["timings_ms"].values())).all()

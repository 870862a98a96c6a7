"""The offline pipeline on imported data: a ratings-only CSV (no item or user metadata),
as real exports often are, goes through every step and the report still beats popularity."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from exporters import pipeline, release
from exporters.data_generate import PRESETS, build
from exporters.data_import import import_data
from recstack.settings import Settings

pytestmark = pytest.mark.slow


def test_ratings_csv_runs_the_whole_pipeline(settings: Settings, tmp_path: Path) -> None:
    tables, *_ = build(PRESETS["small"], 5)
    inter = tables.interactions
    ratings = pd.DataFrame(
        {
            "user_id": inter["user_id"],
            "item_id": inter["item_id"],
            "timestamp": (inter["timestamp"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta("1s"),
            "rating": inter["event"].map({"view": 2, "click": 3, "purchase": 5}),
        }
    )
    csv = tmp_path / "ratings.csv"
    ratings.to_csv(csv, index=False)
    import_data(settings, csv)

    assert pipeline.run(settings, progress=lambda _: None) == pipeline.STEP_NAMES
    report = json.loads((settings.reports_dir / "report.json").read_text())
    assert report["pipeline"]["ndcg@10"] > 1.5 * report["popularity"]["ndcg@10"]
    assert set(release.model_versions(settings)) == {
        "user_tower",
        "item_tower",
        "rank_features",
        "ranker",
        "rank",
    }

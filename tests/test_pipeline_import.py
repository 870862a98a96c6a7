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
from exporters.raw_tables import read_meta
from recstack.settings import Settings

pytestmark = pytest.mark.slow


# The generator's events written as ratings on other scales than 1-5 stars. The 1-10 file
# also has no timestamp column (goodbooks-10k's shape): the importer synthesizes the times.
SCALES = {
    "1-10, no timestamps": {"view": 4, "click": 6, "purchase": 10},
    "one value (implicit feedback)": {"view": 1, "click": 1, "purchase": 1},
}


@pytest.mark.parametrize("scale", SCALES)
def test_ratings_csv_runs_the_whole_pipeline(
    scale: str, settings: Settings, tmp_path: Path
) -> None:
    tables, *_ = build(PRESETS["small"], 5)
    inter = tables.interactions
    ratings = pd.DataFrame(
        {
            "user_id": inter["user_id"],
            "item_id": inter["item_id"],
            "timestamp": (inter["timestamp"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta("1s"),
            "rating": inter["event"].map(SCALES[scale]),
        }
    )
    if "no timestamps" in scale:
        ratings = ratings.drop(columns="timestamp")
    csv = tmp_path / "ratings.csv"
    ratings.to_csv(csv, index=False)
    import_data(settings, csv)
    synthesized = read_meta(settings)["timestamps"]["source"] == "synthesized"  # type: ignore[index]
    assert synthesized == ("no timestamps" in scale)
    # The importer reads the scale: 1-10 gives the generator's events back; a single value
    # makes every row a click (on the fixed 1-5 cut every row was a view: no positives).
    got = read_meta(settings)["events"]
    if len(set(SCALES[scale].values())) == 3:
        assert got == inter["event"].astype(str).value_counts().to_dict()
    else:
        assert got == {"view": 0, "click": len(inter), "purchase": 0}

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

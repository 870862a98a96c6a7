"""The release quality gate: a release whose evaluation loses to most-popular or
item-to-item is not published unless forced, and a forced one records why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightgbm as lgb
import numpy as np
import pytest
from conftest import make_settings

from exporters import evaluate, release
from exporters.ranker_train import load_manifest
from recstack.settings import Settings


def _failing_report() -> dict:
    return {
        "gate": {
            "passed": False,
            "margin": 0.0,
            "best_baseline": "popularity",
            "best_baseline_ndcg@10": 0.1,
            "pipeline_ndcg@10": 0.05,
        }
    }


def test_gate_refuses_without_a_reason_and_records_one() -> None:
    with pytest.raises(release.QualityGateFailed, match="popularity"):
        release.check_gate(_failing_report(), None)
    record = release.check_gate(_failing_report(), "hotfix for a broken feature")
    assert record["forced"] is True and record["force_reason"] == "hotfix for a broken feature"
    passing = {"gate": {**_failing_report()["gate"], "passed": True}}
    assert release.check_gate(passing, None)["forced"] is False


@pytest.mark.slow
def test_a_deliberately_bad_ranker_is_not_published(
    trained_settings: Settings, tmp_path: Path
) -> None:
    """Copy the trained small workspace, swap in a ranker that prefers the least
    popular candidates, evaluate: the gate fails and publish refuses, changing nothing;
    forced with a reason, the release goes out and says so."""
    s: Settings = make_settings(tmp_path)
    shutil.copytree(trained_settings.data_dir, s.data_dir)
    shutil.copytree(trained_settings.model_repository, s.model_repository, dirs_exist_ok=True)
    manifest = load_manifest(s)
    names = manifest["feature_names"]
    sample = np.load(s.work_dir / "ranker_sample.npy")
    target = -sample[:, names.index("c_pop_log_count")]  # least popular first
    bad = lgb.train(
        {"objective": "regression", "verbosity": -1, "num_leaves": 7},
        lgb.Dataset(sample, target, feature_name=names),
        num_boost_round=20,
    )
    bad.save_model(str(s.work_dir / "ranker.txt"))

    report = evaluate.run(s)
    assert report["gate"]["passed"] is False
    lists = report["lists"]
    assert lists["pipeline"]["ndcg@10"] < lists["popularity"]["ndcg@10"]
    with pytest.raises(release.QualityGateFailed):
        release.publish(s)
    assert release.release_ids(s) == []  # nothing half-published

    rid = release.publish(s, force_reason="testing the gate")
    gate = json.loads((release.release_dir(s, rid) / release.MANIFEST).read_text())["quality_gate"]
    assert gate["forced"] is True and gate["force_reason"] == "testing the gate"

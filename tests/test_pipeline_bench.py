"""`recstack bench pipeline` without a release: its argument checks, the parity
comparison it judges changes by, and the summary of its repeats."""

from __future__ import annotations

import argparse

import pytest

from loadtest.pipeline_bench import Answer, cli, differences, summarise
from recstack.errors import UserError


def _answer(**changes: object) -> Answer:
    base = {
        "user_id": 7,
        "item_ids": [3, 1, 2],
        "scores": [0.9, 0.5, 0.1],
        "sources": ["retrieval", "popular", "fresh"],
        "reasons": ["a", "b", "c"],
        "found": [["retrieval"], ["popular"], ["fresh"]],
        "degraded": [],
        "cold_start": False,
    }
    return Answer(**{**base, **changes})  # type: ignore[arg-type]


def test_differences_name_what_changed() -> None:
    want = _answer()
    assert differences(want, _answer(), 1e-5) == []
    assert differences(want, _answer(scores=[0.9, 0.5, 0.100001]), 1e-5) == []
    assert "scores" in differences(want, _answer(scores=[0.9, 0.5, 0.2]), 1e-5)[0]
    assert differences(want, _answer(item_ids=[1, 3, 2]), 1e-5)[0].startswith("item_ids")
    assert differences(want, _answer(degraded=["ranking_skipped"]), 1e-5)[0].startswith("degraded")
    assert differences(want, _answer(reasons=["a", "b", "x"]), 1e-5)[0].startswith("reasons")


def test_summary_is_median_and_range_of_repeat_means() -> None:
    repeats = [
        [{"filter": 1.0, "worker_total": 4.0}, {"filter": 3.0, "worker_total": 6.0}],
        [{"filter": 4.0, "worker_total": 5.0}, {"worker_total": 5.0}],  # a stage not run: 0
        [{"filter": 3.0, "worker_total": 7.0}, {"filter": 3.0, "worker_total": 7.0}],
    ]
    out = summarise(repeats)
    assert out["filter"] == {"median": 2.0, "min": 2.0, "max": 3.0}
    assert out["worker_total"] == {"median": 5.0, "min": 5.0, "max": 7.0}


@pytest.mark.parametrize(
    ("changes", "needle"),
    [({"users": 0}, "--users"), ({"repeats": 0}, "--repeats"), ({"tolerance": -1.0}, "tolerance")],
)
def test_bad_arguments_are_refused(changes: dict[str, object], needle: str) -> None:
    args = {"users": 10, "repeats": 1, "tolerance": 1e-5, "release": None, "seed": 0}
    args |= {"record": None, "check": None, "json": None}
    with pytest.raises(UserError, match=needle):
        cli(argparse.Namespace(**{**args, **changes}))

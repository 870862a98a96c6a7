"""The A/B report on hand-made logs whose answers are known: counts, attribution by
request_id and by window, one click per impression, Wilson intervals and the z-test
against textbook values, each verdict, and the CLI over a log written by the real writer."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from exporters.ab_report import (
    build_report,
    parse_since,
    two_proportion_z,
    wilson,
)
from recstack.cli import main
from recstack.errors import UserError

S = 1_000_000  # µs per second


def served(rid: str, user: int, release: str, items: list[int], at_s: float) -> dict[str, Any]:
    return {
        "kind": "served",
        "at_us": int(at_s * S),
        "request_id": rid,
        "user_id": user,
        "release": release,
        "surface": "",
        "items": [[i, r + 1, "retrieval"] for r, i in enumerate(items)],
        "degraded": [],
        "cold_start": False,
    }


def event(user: int, item: int, kind: str, at_s: float, rid: str = "") -> dict[str, Any]:
    return {
        "kind": "event",
        "at_us": int(at_s * S),
        "ts_us": int(at_s * S),
        "user_id": user,
        "item_id": item,
        "event": kind,
        "request_id": rid,
    }


def arm_log(release: str, lists: int, items: int, clicks: int, purchases: int, base: int) -> list:
    """``lists`` served lists of ``items`` items to distinct users, ``clicks`` clicks and
    ``purchases`` purchases on distinct impressions, all by request_id."""
    recs: list[dict[str, Any]] = []
    slots = [(n, i) for n in range(lists) for i in range(items)]
    for n in range(lists):
        recs.append(served(f"{release}-{n}", base + n, release, list(range(items)), 100.0))
    for kind, count in (("click", clicks), ("purchase", purchases)):
        for n, i in slots[:count]:
            recs.append(event(base + n, i, kind, 110.0, f"{release}-{n}"))
    return recs


def test_counts_and_attribution() -> None:
    recs = [
        served("r1", 1, "A", [10, 11, 12], 100),
        served("r2", 2, "B", [10, 20], 100),
        served("r3", 1, "A", [30, 31], 500),  # user 1's later list
        event(1, 11, "click", 120, "r1"),  # by id
        event(1, 11, "click", 121, "r1"),  # the same impression again: counted once
        event(1, 12, "click", 600),  # no id: user 1's latest list holding 12 is r1 (500 s)
        event(1, 31, "purchase", 600),  # no id: r3
        event(2, 20, "click", 130, "r-unknown"),  # id not in the log: falls back to r2
        event(2, 99, "click", 130, "r2"),  # an item the list did not hold: unattributed
        event(1, 10, "click", 100 + 3600),  # past the 30 min window: unattributed
        event(2, 10, "view", 140, "r2"),  # views are not counted
        event(3, 10, "click", 140, "r1"),  # another user's list: unattributed
    ]
    r = build_report(recs, min_impressions=1)
    arms = {a.release: a for a in r.arms}
    assert (arms["A"].requests, arms["A"].impressions) == (2, 5)
    assert (arms["A"].clicks, arms["A"].purchases) == (2, 1)
    assert (arms["B"].requests, arms["B"].impressions, arms["B"].clicks) == (1, 2, 1)
    assert (r.a, r.b) == ("A", "B")  # A: the arm with more impressions
    assert r.attributed == {"request_id": 1, "window": 3}
    assert r.unattributed == 3
    assert arms["A"].ctr == pytest.approx(2 / 5)
    assert arms["A"].conversion == pytest.approx(1 / 5)


def test_wilson_and_z_test_match_textbook_values() -> None:
    # Wilson 95 % for 10/100: [0.0552, 0.1744] (e.g. Newcombe 1998, method 3)
    lo, hi = wilson(10, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.0552, 0.1744)
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(0, 50)
    assert lo == 0.0 and 0 < hi < 0.08
    # 200/1000 vs 250/1000: pooled p 0.225, se 0.018674, z 2.6775, p 0.00742
    z, p = two_proportion_z(200, 1000, 250, 1000)
    assert z == pytest.approx(2.6775, abs=1e-3)
    assert p == pytest.approx(0.00742, abs=1e-4)
    assert two_proportion_z(0, 100, 0, 100) == (0.0, 1.0)  # no clicks anywhere: no evidence
    assert two_proportion_z(5, 0, 1, 10) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("b_clicks", "verdict"),
    [
        (250, "B better"),
        (150, "B worse"),
        (205, "no significant difference"),
    ],
)
def test_verdicts(b_clicks: int, verdict: str) -> None:
    recs = arm_log("A", 100, 10, 200, 20, 0) + arm_log("B", 100, 10, b_clicks, 20, 10_000)
    r = build_report(recs, arms=("A", "B"), min_impressions=1000)
    assert r.verdict == verdict
    ctr, conv = r.comparisons
    assert (ctr.metric, ctr.a, ctr.b) == ("ctr", 0.2, b_clicks / 1000)
    assert conv.verdict == "no significant difference"  # 20 vs 20 purchases
    z, p = two_proportion_z(200, 1000, b_clicks, 1000)
    assert (ctr.z, ctr.p_value) == (z, p)


def test_not_enough_data() -> None:
    # a big difference, but 999 impressions in one arm
    recs = arm_log("A", 100, 10, 100, 0, 0) + arm_log("B", 111, 9, 500, 0, 10_000)
    r = build_report(recs, arms=("A", "B"), min_impressions=1000)
    assert r.verdict == "not enough data (fewer than 1000 impressions per arm)"
    assert r.comparisons[0].p_value < 1e-6  # the test says "different"; the verdict waits
    assert build_report(recs[:5], min_impressions=1).verdict.startswith("not enough data")
    # an arm named but absent from the log
    r = build_report(recs, arms=("A", "C"), min_impressions=1)
    assert r.verdict.startswith("not enough data") and {a.release for a in r.arms} >= {"C"}


def test_bad_options_are_refused() -> None:
    with pytest.raises(UserError, match="min_impressions"):
        build_report([], min_impressions=0)
    with pytest.raises(UserError, match="--since"):
        parse_since("yesterday")
    now = datetime(2026, 11, 30, 12, tzinfo=UTC)
    assert parse_since("90m", now) == datetime(2026, 11, 30, 10, 30, tzinfo=UTC)
    assert parse_since("2026-11-29T00:00", now) == datetime(2026, 11, 29, tzinfo=UTC)


def test_cli_reads_the_log_written_by_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from recstack import settings as settings_mod

    # a closed segment, named and laid out as the orchestrator's writer leaves it
    (tmp_path / "events").mkdir()
    seg = tmp_path / "events" / "seg-20261130T000000.000000Z-1.jsonl"
    recs = arm_log("7", 120, 10, 300, 30, 0) + arm_log("8", 120, 10, 200, 30, 10_000)
    seg.write_text("".join(json.dumps(r) + "\n" for r in recs))
    monkeypatch.setenv("RECSTACK_EVENTS_DIR", str(tmp_path / "events"))
    settings_mod.get_settings.cache_clear()
    try:
        assert main(["release", "ab", "report", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["a"], out["b"], out["verdict"]) == ("7", "8", "B worse")
        assert main(["release", "ab", "report", "--since", "1h"]) == 0  # records from 1970
        assert "not enough data (fewer than two arms" in capsys.readouterr().out
        assert main(["release", "ab", "report", "--min-impressions", "0"]) == 2
    finally:
        settings_mod.get_settings.cache_clear()
    assert math.isfinite(out["comparisons"][0]["z"])

"""The release state file and the A/B arm hash (no servers)."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import Counter

import pytest

from exporters.release_state import (
    Arm,
    ReleaseState,
    ensure_state,
    load_state,
    locked_state,
    parse_split,
    pick_arm,
    save_state,
    state_path,
)
from recstack.errors import UserError
from recstack.settings import Settings


def test_split_follows_the_shares_and_is_stable_per_user() -> None:
    arms = [Arm(3, 0.9), Arm(4, 0.1)]
    picks = [pick_arm(arms, "s1", str(u)) for u in range(20_000)]
    share = Counter(picks)[4] / len(picks)
    assert abs(share - 0.1) < 0.01, share
    assert picks == [pick_arm(arms, "s1", str(u)) for u in range(20_000)]  # stable
    # A new salt re-deals the users (not always the same people in arm B).
    other = [pick_arm(arms, "s2", str(u)) for u in range(20_000)]
    moved = sum(a != b for a, b in zip(picks, other, strict=True)) / len(picks)
    assert 0.1 < moved < 0.3, moved


def test_three_arms_and_rounding() -> None:
    arms = [Arm(1, 0.5), Arm(2, 0.3), Arm(3, 0.2)]
    counts = Counter(pick_arm(arms, "x", str(u)) for u in range(30_000))
    for arm in arms:
        assert abs(counts[arm.release] / 30_000 - arm.share) < 0.012, counts


@pytest.mark.parametrize("text", ["90/20", "100/0", "a/b", "50", "30/30/40"])
def test_bad_splits_are_refused(text: str) -> None:
    with pytest.raises(UserError, match="--split"):
        parse_split(text, 2)


def test_parse_split() -> None:
    assert parse_split("90/10", 2) == [0.9, 0.1]


def test_state_round_trip_history_and_status(settings: Settings) -> None:
    state = ReleaseState(live=2, previous=[1])
    state.arms = [Arm(2, 0.5), Arm(3, 0.5)]
    state.salt = "abc"
    state.record("ab_start", "try 3", arms=[[2, 0.5], [3, 0.5]])
    save_state(settings, state)
    back = load_state(settings)
    assert back == state and back.revision == 1
    assert back.history[0]["action"] == "ab_start" and back.history[0]["reason"] == "try 3"
    assert back.status(2) == "live, A/B arm 50%" and back.status(3) == "A/B arm 50%"
    assert back.status(1) == "retired" and back.status(9) == "candidate"
    assert back.serving == [2, 3]
    # No temporary files left beside it.
    assert sorted(p.name for p in settings.releases_dir.iterdir()) == ["state.json"]


def test_a_broken_state_file_is_a_clear_error(settings: Settings) -> None:
    state_path(settings).parent.mkdir(parents=True)
    state_path(settings).write_text("{not json")
    with pytest.raises(UserError, match="not a valid release state"):
        load_state(settings)


def test_without_a_file_the_newest_release_is_live_and_bootstrap_records_it(
    settings: Settings,
) -> None:
    for rid in (1, 2):
        (settings.releases_dir / str(rid)).mkdir(parents=True)
        (settings.releases_dir / str(rid) / "manifest.json").write_text("{}")
    assert load_state(settings).live == 2 and not state_path(settings).exists()
    state = ensure_state(settings)
    assert state.live == 2 and state.history[0]["action"] == "bootstrap"
    assert json.loads(state_path(settings).read_text())["live"] == 2
    # A later release does not change what serves until it is promoted.
    (settings.releases_dir / "3").mkdir()
    (settings.releases_dir / "3" / "manifest.json").write_text("{}")
    assert ensure_state(settings).live == 2 and load_state(settings).status(3) == "candidate"


def _hold_lock(path: str, seconds: float) -> None:
    s = Settings(releases_dir=path)
    with locked_state(s):
        time.sleep(seconds)


def test_two_changes_at_once_are_refused(settings: Settings) -> None:
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_hold_lock, args=(str(settings.releases_dir), 3.0))
    p.start()
    try:
        deadline = time.time() + 20
        while not (settings.releases_dir / "state.lock").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # the child has the lock
        with pytest.raises(UserError, match="in progress"), locked_state(settings):
            pass
    finally:
        p.join()
    with locked_state(settings) as state:  # free again once the holder is gone
        assert state.live is None

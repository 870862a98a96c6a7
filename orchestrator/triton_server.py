"""Start the embedded ``tritonserver`` (from the Triton environment's nvidia-pytriton
wheel) on the project's model repository, and stop it cleanly.

The binary needs three things the wheel does not arrange by itself: its bundled shared
libraries on ``LD_LIBRARY_PATH``; a backend folder in which the Python backend's stub for
the running Python minor sits beside ``libtriton_python.so`` (we build one under
``<run_dir>/triton_backends`` from symlinks, never editing site-packages); and the Triton
environment's ``bin`` first on ``PATH``, because the stub runs the first ``python3`` there.

Models are loaded in explicit mode through the repository API with each model's config
plus a ``version_policy`` that pins the release's versions, so a release can be loaded
and unloaded while the server runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from google.protobuf import json_format

from exporters.model_config import load_config
from exporters.model_repo import list_versions
from orchestrator.processes import ManagedProcess, read_pid, start_process, stop_process
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

NAME = "triton"
STUB = "triton_python_backend_stub"
ENSEMBLE = "rank"


def _triton_python(settings: Settings) -> Path:
    python = settings.triton_venv / "bin" / "python3"
    if not python.exists():
        raise UserError(f"no Triton environment at {settings.triton_venv}; run `make setup`")
    return python


def _triton_layout(settings: Settings) -> tuple[Path, str]:
    """(site-packages of the Triton env, its Python minor "3.X"), asked from its python."""
    out = subprocess.run(
        [
            str(_triton_python(settings)),
            "-c",
            "import sysconfig, sys; print(sysconfig.get_paths()['purelib']); "
            "print('%d.%d' % sys.version_info[:2])",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return Path(out[0]), out[1]


def tritonserver_binary(site_packages: Path) -> Path:
    return site_packages / "pytriton" / "tritonserver" / "bin" / "tritonserver"


def build_backend_dir(settings: Settings) -> tuple[Path, dict[str, str]]:
    """Our backend folder ``<run_dir>/triton_backends/python`` (symlinks into the wheel)
    and the environment the server needs. Returns (backend_dir, env)."""
    site, minor = _triton_layout(settings)
    tritondir = site / "pytriton" / "tritonserver"
    stub = tritondir / "python_backend_stubs" / minor / STUB
    if not stub.exists():
        raise UserError(f"no Python-backend stub for Python {minor} in {stub.parent.parent}")
    backends = settings.run_dir / "triton_backends"
    python_backend = backends / "python"
    python_backend.mkdir(parents=True, exist_ok=True)
    sources = [p for p in (tritondir / "backends" / "python").iterdir() if p.is_file()]
    for source in [*sources, stub]:
        link = python_backend / source.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    env = dict(os.environ)
    libs = str(site / "nvidia_pytriton.libs")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libs, env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(settings.triton_venv / "bin"), env.get("PATH", "")])
    # Stubs must not write __pycache__ into version folders (they are release artifacts).
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    # The app env's variables must not leak into the stubs' interpreter.
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env.pop("PYTHONHOME", None)
    return backends, env


def composing_models(settings: Settings, model: str) -> list[str]:
    """The models an ensemble's steps call (empty for a non-ensemble)."""
    config = load_config(model, settings.model_repository)
    return [step.model_name for step in config.ensemble_scheduling.step]


def default_models(settings: Settings) -> dict[str, int]:
    """The newest published version of every model that has one (used until a release
    names its own versions)."""
    models = {}
    for folder in sorted(settings.model_repository.iterdir()):
        if (folder / "config.pbtxt").exists():
            versions = list_versions(settings, folder.name)
            if versions:
                models[folder.name] = versions[-1]
    return models


def _http(
    settings: Settings, method: str, path: str, body: dict | None = None, timeout: float = 5.0
) -> tuple[int, str]:
    url = f"http://{settings.triton_host}:{settings.triton_http_port}{path}"
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # loopback only
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
        return 0, str(e)


def server_live(settings: Settings) -> bool:
    return _http(settings, "GET", "/v2/health/live", timeout=1.0)[0] == 200


def server_ready(settings: Settings) -> bool:
    return _http(settings, "GET", "/v2/health/ready", timeout=1.0)[0] == 200


def model_config_dict(settings: Settings, model: str) -> dict:
    """The repository's config of ``model`` as the JSON dict Triton's load API takes."""
    return json_format.MessageToDict(
        load_config(model, settings.model_repository), preserving_proto_field_name=True
    )


def load_model(
    settings: Settings,
    model: str,
    versions: int | Sequence[int],
    timeout: float = 120.0,
    config: dict | None = None,
) -> None:
    """Load ``model`` with exactly ``versions`` (a pinned version_policy over ``config``,
    default the repository's); raise RuntimeError with Triton's message if it fails."""
    pinned = [versions] if isinstance(versions, int) else list(versions)
    config = dict(config) if config is not None else model_config_dict(settings, model)
    config["version_policy"] = {"specific": {"versions": pinned}}
    status, text = _http(
        settings,
        "POST",
        f"/v2/repository/models/{model}/load",
        {"parameters": {"config": json.dumps(config)}},
        timeout=timeout,
    )
    if status != 200:
        raise RuntimeError(f"Triton could not load {model} versions {pinned}: {text}")
    log.info("loaded %s versions %s", model, pinned)


def unload_model(settings: Settings, model: str) -> None:
    status, text = _http(settings, "POST", f"/v2/repository/models/{model}/unload", {})
    if status != 200:
        raise RuntimeError(f"Triton could not unload {model}: {text}")


def load_models(settings: Settings, models: Mapping[str, int | Sequence[int]]) -> None:
    """Load ``models`` at their pinned versions.

    Triton (2.51, explicit mode) loads an ensemble's composing models with their on-disk
    configs whenever the ensemble is loaded, replacing pinned ones. So ensembles go first
    and their composing models are then reloaded with the pinned version policy; the
    ensemble's steps (``model_version: -1``) then resolve to the pinned versions."""
    ensembles = [m for m in models if composing_models(settings, m)]
    for model in ensembles:
        missing = [m for m in composing_models(settings, model) if m not in models]
        if missing:
            raise UserError(f"ensemble {model} needs {missing}, which the release does not name")
    for model in ensembles:
        load_model(settings, model, models[model])
    for model, versions in models.items():
        if model not in ensembles:
            load_model(settings, model, versions)


def triton_argv(settings: Settings, backend_dir: Path, site_packages: Path) -> list[str]:
    return [
        str(tritonserver_binary(site_packages)),
        f"--model-repository={settings.model_repository}",
        "--model-control-mode=explicit",
        f"--backend-directory={backend_dir}",
        f"--http-address={settings.triton_host}",
        f"--grpc-address={settings.triton_host}",
        f"--metrics-address={settings.triton_host}",
        f"--http-port={settings.triton_http_port}",
        f"--grpc-port={settings.triton_grpc_port}",
        f"--metrics-port={settings.triton_metrics_port}",
        "--log-verbose=0",
        "--strict-readiness=true",
        # Shorter than ManagedProcess.stop's SIGKILL deadline, so Triton unloads models
        # (and ends its stubs) itself.
        "--exit-timeout-secs=8",
    ]


def start_triton(
    settings: Settings,
    models: Mapping[str, int | Sequence[int]] | None = None,
    timeout: float = 60.0,
) -> ManagedProcess:
    """Start tritonserver, load ``models`` (model -> version(s); default: the newest
    version of every published model) and return once every one of them is ready."""
    if models is None:
        models = default_models(settings)
        if not models:
            raise UserError(
                f"no model versions in {settings.model_repository}; run `recstack train` first"
            )
    for model, versions in models.items():
        pinned = [versions] if isinstance(versions, int) else list(versions)
        missing = sorted(set(pinned) - set(list_versions(settings, model)))
        if missing:
            raise UserError(f"{model} has no version(s) {missing} in {settings.model_repository}")
    backend_dir, env = build_backend_dir(settings)
    site, _ = _triton_layout(settings)
    proc = start_process(
        NAME,
        triton_argv(settings, backend_dir, site),
        settings,
        ready=lambda: server_ready(settings),
        timeout=timeout,  # for the server itself; each model load has its own deadline
        env=env,
        cwd=settings.run_dir,
    )
    try:
        load_models(settings, models)
    except BaseException:
        proc.stop()
        raise
    log.info("triton serves %s; log %s", dict(models), proc.log_path)
    return proc


def stub_pids(settings: Settings) -> list[int]:
    """Pids of Python-backend stubs serving ``settings.model_repository`` (orphan check)."""
    repo = str(settings.model_repository)
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            cmdline
            and cmdline[0].endswith(STUB.encode())
            and any(repo.encode() in arg for arg in cmdline)
        ):
            pids.append(int(proc.name))
    return pids


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def release_models(settings: Settings, release_id: str) -> dict[str, int]:
    """The model -> version map of a release (owned by ``exporters.release``)."""
    try:
        from exporters import release
    except ImportError as e:
        raise UserError(f"releases are not available yet ({e})") from e
    versions = getattr(release, "model_versions", None)
    if versions is None:
        raise UserError("exporters.release has no model_versions(settings, release_id)")
    return dict(versions(settings, release_id))


def cli(args: argparse.Namespace) -> int:
    """``recstack serve triton [--detach] [--release ID]``: foreground mode serves until
    SIGINT/SIGTERM, then stops Triton and its stubs."""
    settings = get_settings()
    models = release_models(settings, args.release) if args.release else None
    # SIGTERM behaves like Ctrl-C, also while the server is still starting.
    signal.signal(signal.SIGTERM, _interrupt)
    running_before = read_pid(settings, NAME)
    try:
        proc = start_triton(settings, models)
    except BaseException:
        if running_before is None:
            stop_process(settings, NAME)  # interrupted mid-start: leave nothing behind
        raise
    print(
        f"tritonserver ready: http {settings.triton_http_port}, grpc {settings.triton_grpc_port}, "
        f"metrics {settings.triton_metrics_port}; log {proc.log_path}",
        flush=True,
    )
    if args.detach:
        return 0
    try:
        while proc.alive():
            time.sleep(0.5)
        print(f"tritonserver exited by itself; log {proc.log_path}", flush=True)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        proc.stop()
        left = stub_pids(settings)
        if left:
            log.warning("Python-backend stubs left after stop: %s", left)
    print("tritonserver stopped", flush=True)
    return 0

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
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from google.protobuf import json_format

from exporters.model_config import load_config
from exporters.model_repo import list_versions
from orchestrator.processes import (
    ManagedProcess,
    Port,
    port_holder,
    read_pid,
    start_process,
    stop_process,
)
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


def newest_versions(settings: Settings) -> dict[str, int]:
    """The newest published version of every model that has one."""
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
    if path.startswith("/v2/repository"):
        key = repository_key(settings)
        if key:
            request.add_header(REPOSITORY_KEY_HEADER, key)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # loopback only
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        if e.code == 403 and path.startswith("/v2/repository"):
            raise UserError(_foreign_triton(settings, text)) from e
        return e.code, text
    except (urllib.error.URLError, OSError) as e:  # refused, reset, timed out
        return 0, str(e)


def _foreign_triton(settings: Settings, refusal: str) -> str:
    """Why a Triton refuses this run dir's repository key, and the ways out: it is most
    likely another checkout's (a previous ``make demo``) on the same ports."""
    holder = port_holder(settings.triton_http_port)
    by = f" ({holder})" if holder else ""
    return (
        f"the Triton on {settings.triton_host}:{settings.triton_http_port}{by} refuses this "
        f"run dir's repository key ({refusal.strip()!r}): another recstack's Triton seems to "
        "run there (another checkout or RECSTACK_RUN_DIR, a previous `make demo`?), or one "
        "started with another RECSTACK_TRITON_REPOSITORY_KEY. Run `recstack stop` in that "
        "checkout, or move this one's ports (RECSTACK_TRITON_HTTP_PORT, "
        "RECSTACK_TRITON_GRPC_PORT, RECSTACK_TRITON_METRICS_PORT)"
    )


# Triton's model-repository API (load, unload, index) answers only requests carrying this
# header with the key (Triton's restricted-API options): one stray local `curl .../unload`
# must not take a pinned model away. The key is settings.triton_repository_key, else a
# random one written (0600) to <run_dir>/triton_repository.key when Triton starts here.
REPOSITORY_KEY_HEADER = "recstack-repository-key"
REPOSITORY_KEY_FILE = "triton_repository.key"


def repository_key(settings: Settings) -> str:
    if settings.triton_repository_key:
        return settings.triton_repository_key
    path = settings.run_dir / REPOSITORY_KEY_FILE
    return path.read_text().strip() if path.exists() else ""


def _ensure_repository_key(settings: Settings) -> str:
    key = repository_key(settings)
    if not key:
        import secrets

        path = settings.run_dir / REPOSITORY_KEY_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(16))
        key = repository_key(settings)
    return key


def server_live(settings: Settings) -> bool:
    return _http(settings, "GET", "/v2/health/live", timeout=1.0)[0] == 200


def server_ready(settings: Settings) -> bool:
    return _http(settings, "GET", "/v2/health/ready", timeout=1.0)[0] == 200


def model_config_dict(settings: Settings, model: str) -> dict:
    """The repository's config of ``model`` as the JSON dict Triton's load API takes."""
    return json_format.MessageToDict(
        load_config(model, settings.model_repository), preserving_proto_field_name=True
    )


def _repository(
    settings: Settings,
    action: str,
    model: str,
    parameters: Mapping[str, str | bytes] | None = None,
    timeout: float = 120.0,
) -> None:
    """Triton's model-repository ``load`` or ``unload`` of ``model``, over gRPC; raise
    RuntimeError with Triton's message if it fails.

    Not over HTTP: Triton's HTTP server runs a load on one of its worker threads until the
    load ends, and every request of the connections that thread serves waits with it —
    the orchestrator's kept-alive inference connections included. Measured on a fresh
    server (user_tower called back to back over HTTP during a load): one call held for the
    whole load, 1.5-2.3 s, with the load sent over HTTP in 11 runs of 11; none with it sent
    over gRPC, 6 of 6 (docs/releases.md)."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    request: service_pb2.RepositoryModelLoadRequest | service_pb2.RepositoryModelUnloadRequest
    if action == "load":
        request = service_pb2.RepositoryModelLoadRequest(model_name=model)
    elif action == "unload":
        request = service_pb2.RepositoryModelUnloadRequest(model_name=model)
    else:
        raise ValueError(f"repository action {action!r}: expected 'load' or 'unload'")
    for name, value in (parameters or {}).items():
        if isinstance(value, bytes):
            request.parameters[name].bytes_param = value
        else:
            request.parameters[name].string_param = value
    # Triton's restricted-protocol header over gRPC: its prefix, then the HTTP header name.
    metadata = [(f"triton-grpc-protocol-{REPOSITORY_KEY_HEADER}", repository_key(settings))]
    address = f"{settings.triton_host}:{settings.triton_grpc_port}"
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        call = stub.RepositoryModelLoad if action == "load" else stub.RepositoryModelUnload
        try:
            call(request, metadata=metadata, timeout=timeout)
        except grpc.RpcError as e:
            details = e.details() or e.code().name
            if "restricted" in details:
                raise UserError(_foreign_triton(settings, details)) from e
            raise RuntimeError(f"Triton could not {action} {model}: {details}") from e


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
    try:
        _repository(settings, "load", model, {"config": json.dumps(config)}, timeout)
    except RuntimeError as e:
        raise RuntimeError(f"{e} (versions {pinned})") from e
    log.info("loaded %s versions %s", model, pinned)


def unload_model(settings: Settings, model: str) -> None:
    _repository(settings, "unload", model, timeout=30.0)


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


# --------------------------------------------------------------------------- releases
# Every request is served by one release end to end, so each release gets its own rank
# ensemble, loaded through the repository API from rank/config.pbtxt (the contract) with
# its steps pinned to the release's rank_features and ranker versions. One model config
# holds for all versions of a model in Triton, so "a version of `rank` per release" cannot
# pin different steps; a model per release can, and two releases' ensembles then serve
# side by side. The plain `rank` model is never loaded for releases: its steps'
# `model_version: -1` would follow whichever version of the ranker is newest.
ENSEMBLE_VERSION = 1


def ensemble_name(release_id: int) -> str:
    return f"{ENSEMBLE}_r{int(release_id)}"


def release_pins(settings: Settings, release_ids: Sequence[int]) -> dict[str, list[int]]:
    """Non-ensemble model -> the sorted union of the versions ``release_ids`` pin (the
    ensemble is loaded per release instead, see ``ensemble_name``)."""
    from exporters.release import union_versions

    return {m: v for m, v in union_versions(settings, release_ids).items() if m != ENSEMBLE}


def ensemble_config(settings: Settings, release_id: int) -> dict:
    """rank/config.pbtxt as a load-API config named for the release, steps pinned."""
    from exporters.release import model_versions

    versions = model_versions(settings, release_id)
    config = model_config_dict(settings, ENSEMBLE)
    config["name"] = ensemble_name(release_id)
    for step in config["ensemble_scheduling"]["step"]:
        step["model_version"] = str(versions[step["model_name"]])
    config["version_policy"] = {"specific": {"versions": [ENSEMBLE_VERSION]}}
    return config


def load_release_ensemble(settings: Settings, release_id: int, timeout: float = 60.0) -> None:
    """Load ``rank_r<id>`` with its steps pinned (its composing models must be loaded)."""
    config = ensemble_config(settings, release_id)
    note = f"ensemble of release {release_id}; config from {ENSEMBLE}/config.pbtxt\n"
    parameters: dict[str, str | bytes] = {
        "config": json.dumps(config),
        # Files given with the request replace the repository folder; an ensemble needs a
        # version folder, this file makes one (raw bytes over gRPC, base64 only over HTTP).
        f"file:{ENSEMBLE_VERSION}/README": note.encode(),
    }
    _repository(settings, "load", config["name"], parameters, timeout)
    log.info("loaded %s (steps %s)", config["name"], _steps(config))


def _steps(config: dict) -> dict[str, str]:
    return {s["model_name"]: s["model_version"] for s in config["ensemble_scheduling"]["step"]}


def loaded_models(settings: Settings) -> set[tuple[str, int]]:
    """(model, version) pairs Triton has ready, ensembles loaded by request included (the
    repository index does not list those; the statistics endpoint does)."""
    status, text = _http(settings, "GET", "/v2/models/stats", timeout=5.0)
    if status != 200:
        raise RuntimeError(f"Triton statistics unavailable: {status} {text[:200]}")
    out = set()
    for m in json.loads(text).get("model_stats", []):
        with contextlib.suppress(ValueError):
            out.add((m["name"], int(m["version"])))
    return out


def missing_for(settings: Settings, release_ids: Sequence[int]) -> list[str]:
    """What ``release_ids`` need that Triton does not have ready ("model vN"); raises
    RuntimeError when Triton cannot be asked."""
    loaded = loaded_models(settings)
    need = [(m, v) for m, vs in release_pins(settings, release_ids).items() for v in vs]
    need += [(ensemble_name(r), ENSEMBLE_VERSION) for r in release_ids]
    return [f"{m} v{v}" for m, v in need if (m, v) not in loaded]


def load_releases(settings: Settings, release_ids: Sequence[int], keep: bool = True) -> None:
    """Make Triton serve ``release_ids`` side by side: every model with the union of the
    versions they pin, then each release's ensemble. With ``keep`` (a transition), the
    versions loaded now stay too, so requests of the current releases never miss a
    model; call :func:`prune_releases` once nothing uses them. Idempotent."""
    pins = release_pins(settings, release_ids)
    loaded = loaded_models(settings) if keep else set()
    final: dict[str, list[int]] = {}
    todo: dict[str, list[int]] = {}
    for model, versions in pins.items():
        wanted = sorted(set(versions) | ({v for m, v in loaded if m == model} if keep else set()))
        final[model] = wanted
        if all((model, v) in loaded for v in wanted) and keep:
            continue  # already served exactly as needed
        missing = sorted(set(versions) - set(list_versions(settings, model)))
        if missing:
            raise UserError(f"{model} has no version(s) {missing} in {settings.model_repository}")
        todo[model] = wanted
    # Models load in parallel (Triton loads with several threads; each Python-backend
    # version starts its own stub process, seconds each).
    with ThreadPoolExecutor(max(1, len(todo))) as pool:
        for future in [pool.submit(load_model, settings, m, v) for m, v in todo.items()]:
            future.result()
    for rid in release_ids:
        if (ensemble_name(rid), ENSEMBLE_VERSION) not in loaded:
            _load_ensemble_pinned(settings, rid, final)


def _load_ensemble_pinned(
    settings: Settings, release_id: int, final: Mapping[str, Sequence[int]], attempts: int = 3
) -> None:
    """Load a release's ensemble, then make sure its steps still hold ``final`` versions.

    Triton 2.51 sometimes reloads an ensemble's composing models from their on-disk
    configs (version policy "latest") while it loads the ensemble — seen on a fresh
    server, not reproducible at will — which drops the pinned versions and fails the
    ensemble ("required version N is not loaded"). Then the pins are loaded again and the
    ensemble retried."""
    steps = composing_models(settings, ENSEMBLE)
    for attempt in range(1, attempts + 1):
        error: RuntimeError | None = None
        try:
            load_release_ensemble(settings, release_id)
        except RuntimeError as e:
            if "is not loaded" not in str(e) or attempt == attempts:
                raise
            error = e
        loaded = loaded_models(settings)
        drifted = [m for m in steps if {v for n, v in loaded if n == m} != set(final[m])]
        if error is None and not drifted:
            return
        log.warning(
            "Triton replaced the pinned versions of %s while loading %s (%s); re-pinning",
            drifted or steps,
            ensemble_name(release_id),
            error or "loaded",
        )
        for model in drifted or steps:
            load_model(settings, model, list(final[model]))
        if error is None:
            return


def prune_releases(settings: Settings, release_ids: Sequence[int]) -> list[str]:
    """Unload what no release in ``release_ids`` needs (older ensembles, and model versions
    beyond the union); returns what was unloaded."""
    pins = release_pins(settings, release_ids)
    keep_ensembles = {ensemble_name(r) for r in release_ids}
    loaded = loaded_models(settings)
    dropped = []
    for name in sorted({m for m, _ in loaded}):
        if name.startswith(f"{ENSEMBLE}_r") and name not in keep_ensembles:
            unload_model(settings, name)
            dropped.append(name)
        elif name == ENSEMBLE:
            unload_model(settings, name)  # never used by releases (see above)
            dropped.append(name)
    for model, versions in pins.items():
        extra = sorted(v for m, v in loaded if m == model and v not in versions)
        if extra:
            load_model(settings, model, versions)  # Triton unloads the versions not named
            dropped += [f"{model} v{v}" for v in extra]
    if dropped:
        log.info("unloaded from Triton: %s", dropped)
    return dropped


def triton_ports(settings: Settings) -> list[Port]:
    """The ports tritonserver listens on."""
    fields = ("triton_http_port", "triton_grpc_port", "triton_metrics_port")
    return [Port.of(settings, f, settings.triton_host) for f in fields]


def triton_argv(settings: Settings, backend_dir: Path, site_packages: Path) -> list[str]:
    key = _ensure_repository_key(settings)
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
        f"--http-restricted-api=model-repository:{REPOSITORY_KEY_HEADER}={key}",
        f"--grpc-restricted-protocol=model-repository:{REPOSITORY_KEY_HEADER}={key}",
        # Shorter than ManagedProcess.stop's SIGKILL deadline, so Triton unloads models
        # (and ends its stubs) itself.
        "--exit-timeout-secs=8",
    ]


def start_triton(
    settings: Settings,
    models: Mapping[str, int | Sequence[int]] | None = None,
    timeout: float = 60.0,
    releases: Sequence[int] | None = None,
    die_with_parent: bool = False,
) -> ManagedProcess:
    """Start tritonserver and return once what it must serve is ready: ``models`` (model ->
    pinned version(s)) when given, else ``releases`` side by side (each with its own rank
    ensemble), by default the releases the release state serves (live and A/B arms)."""
    if models is None and releases is None:
        from exporters.release_state import ensure_state

        releases = ensure_state(settings).serving
        if not releases:
            # A repository without releases (model versions published by hand, the
            # repository tests): the newest version of every model, with a warning.
            models = newest_versions(settings)
            releases = None
            if not models:
                raise UserError(
                    f"no release in {settings.releases_dir} and no model version in "
                    f"{settings.model_repository}; run `recstack train` first"
                )
            log.warning("no release: serving the newest version of every model %s", models)
    check = dict(models) if models is not None else release_pins(settings, releases or [])
    for model, versions in check.items():
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
        die_with_parent=die_with_parent,
        ports=triton_ports(settings),
    )
    try:
        if models is not None:
            load_models(settings, models)
        else:
            load_releases(settings, list(releases or []), keep=False)
    except RuntimeError as e:  # Triton refused a model: its message, no traceback
        proc.stop()
        raise UserError(f"{e}; log {proc.log_path}") from e
    except BaseException:
        proc.stop()
        raise
    what = dict(models) if models is not None else {"releases": list(releases or [])}
    log.info("triton serves %s; log %s", what, proc.log_path)
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


def cli(args: argparse.Namespace) -> int:
    """``recstack serve triton [--detach] [--release ID]``: serves the release state's
    releases (or just ``--release``); foreground mode serves until SIGINT/SIGTERM, then
    stops Triton and its stubs."""
    settings = get_settings()
    releases = [int(args.release)] if args.release else None
    # SIGTERM behaves like Ctrl-C, also while the server is still starting.
    signal.signal(signal.SIGTERM, _interrupt)
    running_before = read_pid(settings, NAME)
    try:
        proc = start_triton(settings, releases=releases)
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

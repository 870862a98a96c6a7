"""Start, watch and stop the servers the project runs itself (tritonserver, redis-server,
the orchestrator): a log file and a pid file per server under ``<run_dir>``, readiness
polling with a deadline, and SIGTERM-then-SIGKILL of the whole process group on stop so
no child (e.g. a Triton Python-backend stub) is left behind."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)


@dataclass
class ManagedProcess:
    """A server started by :func:`start_process`."""

    name: str
    pid: int
    log_path: Path
    pid_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def alive(self) -> bool:
        """True while the process exists (and is not a zombie of ours)."""
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the process group, wait, then SIGKILL what is left."""
        _terminate_group(self.pid, timeout, self.popen)
        self.pid_path.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as stopped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as stopped.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _terminate_group(pid: int, timeout: float, popen: subprocess.Popen[bytes] | None) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            if popen.poll() is not None:
                break
        elif not pid_alive(pid):
            break
        time.sleep(0.05)
    # Children (Python-backend stubs) may outlive the leader; the group kill reaches them.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    if popen is not None:
        popen.wait(timeout=5)


def pid_path(settings: Settings, name: str) -> Path:
    """Where the pid of server ``name`` is recorded."""
    return settings.run_dir / f"{name}.pid"


def log_path(settings: Settings, name: str) -> Path:
    """Where server ``name`` writes its stdout and stderr."""
    return settings.run_dir / "logs" / f"{name}.log"


def start_process(
    name: str,
    argv: Sequence[str],
    settings: Settings,
    *,
    ready: Callable[[], bool],
    timeout: float = 60.0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = False,
) -> ManagedProcess:
    """Start ``argv`` in its own process group, logging to a file; return once ``ready()``
    is true. Raises RuntimeError (with the log's tail) if it exits or is not ready in time.
    ``die_with_parent``: the kernel sends it SIGTERM when this process dies (a scratch
    server must not outlive a killed CLI)."""
    logfile = log_path(settings, name)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    existing = read_pid(settings, name)
    if existing is not None:
        raise UserError(f"{name} already runs (pid {existing}); `recstack stop` first")
    with logfile.open("ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_term_with_parent if die_with_parent else None,
        )
    proc = ManagedProcess(name, popen.pid, logfile, pid_path(settings, name), popen)
    proc.pid_path.write_text(str(popen.pid))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            proc.pid_path.unlink(missing_ok=True)
            raise RuntimeError(
                f"{name} exited with {popen.returncode}; log {logfile}:\n{tail(logfile)}"
            )
        try:
            if ready():
                log.info("%s ready (pid %d, log %s)", name, popen.pid, logfile)
                return proc
        except Exception:  # not ready yet (connection refused etc.)
            pass
        time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"{name} not ready after {timeout:.0f} s; log {logfile}:\n{tail(logfile)}")


def _term_with_parent() -> None:
    """In the child before exec: PR_SET_PDEATHSIG = SIGTERM (Linux)."""
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def read_pid(settings: Settings, name: str) -> int | None:
    """The pid of a running server started by us, or None (stale pid files are removed)."""
    path = pid_path(settings, name)
    try:
        pid = int(path.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid_alive(pid):
        return pid
    path.unlink(missing_ok=True)
    return None


def stop_process(settings: Settings, name: str, timeout: float = 15.0) -> bool:
    """Stop server ``name`` if it runs; True if something was stopped."""
    pid = read_pid(settings, name)
    if pid is None:
        return False
    _terminate_group(pid, timeout, None)
    pid_path(settings, name).unlink(missing_ok=True)
    log.info("stopped %s (pid %d)", name, pid)
    return True


def hold(procs: Sequence[ManagedProcess], started: str, detach: bool) -> int:
    """A ``recstack serve ...`` command's end: say what runs; with ``detach`` leave it
    running, else keep it in the foreground until SIGTERM, Ctrl-C or one of ``procs``
    exits, then stop them all."""
    if detach:
        print(f"{started}; `recstack stop` stops it")
        return 0
    print(f"{started}; Ctrl-C stops it")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(1.0) and all(p.alive() for p in procs):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        for p in procs:
            p.stop()
    return 0


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def cli_stop(args: argparse.Namespace) -> int:
    """``recstack stop``: stop every server started with --detach."""
    settings = get_settings()
    names = sorted(p.stem for p in settings.run_dir.glob("*.pid"))
    for name in names:
        stop_process(settings, name)
    print("stopped: " + (", ".join(names) if names else "nothing was running"))
    return 0

"""Start, watch and stop the servers the project runs itself (tritonserver, redis-server,
the orchestrator): a log file and a pid file per server under ``<run_dir>``, readiness
polling with a deadline, and SIGTERM-then-SIGKILL of the whole process group on stop so
no child (e.g. a Triton Python-backend stub) is left behind."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
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


@dataclass(frozen=True)
class Port:
    """A port a server listens on, and the setting that moves it (for messages)."""

    host: str
    port: int
    setting: str

    @classmethod
    def of(cls, settings: Settings, field: str, host: str) -> Port:
        """The port in Settings field ``field`` (its variable: RECSTACK_<FIELD>)."""
        return cls(host, int(getattr(settings, field)), f"RECSTACK_{field.upper()}")


def port_taken(host: str, port: int) -> bool:
    """Whether something listens on ``host:port`` already (a bind test: SO_REUSEADDR, as
    the servers set it, so a closed socket in TIME_WAIT does not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            return e.errno == errno.EADDRINUSE
    return False


def port_holder(port: int) -> str:
    """``pid N `command` (working directory D)`` of the process listening on TCP ``port``
    (from /proc; "" when it is not visible to this user), so the user can tell whose it
    is: Triton's working directory is its run dir, an orchestrator's its checkout."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                    inodes.add(f"socket:[{f[9]}]")
    if not inodes:
        return ""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                continue
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            command = " ".join(command.split())  # one line, whatever the arguments hold
            if len(command) > 160:
                command = command[:157] + "..."
            return f"pid {proc.name} `{command}` (working directory {os.readlink(proc / 'cwd')})"
        except OSError:  # gone, or not ours to read
            continue
    return ""


def require_free(ports: Sequence[Port], what: str) -> None:
    """Raise UserError naming the taken ports, who holds them and the two ways out, before
    ``what`` starts: a server of another checkout (a previous ``make demo``) on the same
    ports would otherwise answer our readiness checks and requests in our server's place."""
    taken = [p for p in ports if port_taken(p.host, p.port)]
    if not taken:
        return
    listed = ", ".join(f"{p.host}:{p.port} ({p.setting})" for p in taken)
    holders = sorted({h for h in (port_holder(p.port) for p in taken) if h})
    by = f", held by {'; '.join(holders)}" if holders else ""
    variables = ", ".join(sorted({p.setting for p in ports}))
    raise UserError(
        f"cannot start {what}: port(s) {listed} already in use{by}. Another recstack's "
        "servers or another Triton seem to run there (a previous `make demo`?): run "
        f"`recstack stop` in that checkout, or move this one's ports ({variables})"
    )


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
    ports: Sequence[Port] = (),
) -> ManagedProcess:
    """Start ``argv`` in its own process group, logging to a file; return once ``ready()``
    is true. Raises RuntimeError (with the log's tail) if it exits or is not ready in time.
    ``die_with_parent``: the kernel sends it SIGTERM when this process dies (a scratch
    server must not outlive a killed CLI). ``ports``: where it will listen; UserError if
    one is taken (``require_free``)."""
    logfile = log_path(settings, name)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    existing = read_pid(settings, name)
    if existing is not None:
        raise UserError(f"{name} already runs (pid {existing}); `recstack stop` first")
    require_free(ports, name)
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


def require_pid(settings: Settings, name: str) -> int:
    """The pid of running server ``name``; UserError saying so when it does not run."""
    pid = read_pid(settings, name)
    if pid is None:
        raise UserError(f"{name} does not run (no live pid file in {settings.run_dir})")
    return pid


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
        stop_all(procs)
    return 0


def stop_all(procs: Iterable[ManagedProcess]) -> None:
    """Stop servers in the reverse of their start order, so clients go before the servers
    they call: a Triton stopped while the orchestrator still holds its kept-alive HTTP
    connections waits its whole exit timeout (8 s) for them."""
    for p in reversed(list(procs)):
        p.stop()


def tail(path: Path, lines: int = 30) -> str:
    """The last lines of a log file (for error messages)."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ``recstack stop`` stops clients before the servers they call (name prefixes, front to
# back): a server stopped first makes its clients fail calls and hold connections to it.
STOP_ORDER = ("nginx", "orchestrator", "reference", "triton", "redis")


def stop_order(names: Iterable[str]) -> list[str]:
    """``names`` in STOP_ORDER; a name of no listed kind goes before the online stores."""

    def rank(name: str) -> tuple[float, str]:
        kind = next((i for i, k in enumerate(STOP_ORDER) if name.startswith(k)), None)
        return (len(STOP_ORDER) - 1.5 if kind is None else kind, name)

    return sorted(names, key=rank)


def cli_stop(args: argparse.Namespace) -> int:
    """``recstack stop``: stop every server started with --detach (clients first)."""
    settings = get_settings()
    names = stop_order(p.stem for p in settings.run_dir.glob("*.pid"))
    for name in names:
        stop_process(settings, name)
    print("stopped: " + (", ".join(names) if names else "nothing was running"))
    return 0

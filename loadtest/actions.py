"""Timed actions: commands started at a fixed offset into a run (e.g. a model promotion),
without waiting for them, so the load keeps its schedule. Each gets a log file, and its
start, end and exit code are recorded for the report and the plot."""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loadtest.scenario import Action

log = logging.getLogger(__name__)


@dataclass
class ActionRecord:
    """What happened to one action (offsets in seconds from the run start)."""

    label: str
    run: str
    at_s: float
    started_s: float | None = None
    ended_s: float | None = None
    returncode: int | None = None
    log: str | None = None
    error: str | None = None


class ActionRunner:
    """Starts each action on its own timer thread; :meth:`finish` collects the outcomes."""

    def __init__(self, actions: list[Action], log_dir: Path | None) -> None:
        self.records = [
            ActionRecord(label=a.label or a.run.split()[0], run=a.run, at_s=a.at) for a in actions
        ]
        self.log_dir = log_dir
        self._threads: list[threading.Thread] = []
        self._timers: list[threading.Timer] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._start_at = 0.0
        self._lock = threading.Lock()

    def start(self, start_at: float) -> None:
        """Arm the timers relative to the run's wall-clock start."""
        self._start_at = start_at
        for i, rec in enumerate(self.records):
            delay = max(0.0, start_at + rec.at_s - time.time())
            t = threading.Timer(delay, self._launch, args=(i,))
            t.daemon = True
            t.start()
            self._timers.append(t)

    def _launch(self, i: int) -> None:
        rec = self.records[i]
        rec.started_s = time.time() - self._start_at
        out: Any = subprocess.DEVNULL
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / f"action-{i}-{_slug(rec.label)}.log"
            rec.log = str(path)
            out = path.open("wb")
        log.info("action %r at %.1fs: %s", rec.label, rec.started_s, rec.run)
        try:
            # A shell command line from the user's own scenario file.
            proc = subprocess.Popen(rec.run, shell=True, stdout=out, stderr=subprocess.STDOUT)
        except OSError as e:
            rec.error = str(e)
            return
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        with self._lock:
            self._procs.append(proc)
        rec.returncode = proc.wait()
        rec.ended_s = time.time() - self._start_at

    def finish(self, wait_s: float = 0.0) -> list[dict[str, Any]]:
        """Stop timers not yet fired, wait up to ``wait_s`` for running commands (they are
        left running after that), and return the records."""
        for t in self._timers:
            t.cancel()
        deadline = time.time() + wait_s
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                log.warning("action pid %d still running after the run", p.pid)
        # Timer threads record returncode after wait(); give them a moment to do so.
        for t in self._timers:
            t.join(timeout=0.2)
        return [asdict(r) for r in self.records]


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in s)[:40]

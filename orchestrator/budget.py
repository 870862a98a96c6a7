"""A request's deadline and its split into per-stage budgets.

The deadline is the gRPC deadline when the client sets one (else ``default_ms``). Each stage
gets at most its share of the whole deadline and never more than what remains, so one slow
stage leaves time for the fallback that follows it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

# Share of the deadline each stage may use. They add up to more than 1 on purpose: a stage
# that finishes early leaves its time to the next, and `remaining()` caps every stage.
DEFAULT_SHARES: dict[str, float] = {
    "user_features": 0.15,
    "user_tower": 0.25,
    "retrieval": 0.25,
    "item_features": 0.15,
    "ranking": 0.5,
    "postprocess": 0.15,
}


@dataclass(frozen=True)
class BudgetConfig:
    default_ms: float = 80.0
    shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))
    # Keep this much for post-processing and the response whatever happens before.
    reserve_ms: float = 2.0


class RequestClock:
    """Times the stages of one request and hands out their budgets."""

    def __init__(self, deadline_s: float | None, cfg: BudgetConfig) -> None:
        self.cfg = cfg
        self.start = time.perf_counter()
        total = cfg.default_ms / 1000 if deadline_s is None else max(deadline_s, 0.0)
        self.total_s = total
        self.end = self.start + total
        self.timings: dict[str, float] = {}
        self.cpu_timings: dict[str, float] = {}
        # perf_counter() when a worker thread picked the request up; None while it waits
        # in the queue (tells a shed request from one whose work overran the deadline).
        self.worker_started: float | None = None

    def remaining(self) -> float:
        """Seconds left before the deadline, less the reserve."""
        return self.end - time.perf_counter() - self.cfg.reserve_ms / 1000

    def budget(self, stage: str) -> float:
        """Seconds stage ``stage`` may take (may be <= 0: skip it)."""
        share = self.cfg.shares.get(stage, 0.1) * self.total_s
        return min(share, self.remaining())

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Record the stage's wall time and this thread's CPU time in milliseconds (also
        when it raises). Wall far above CPU means the stage waited: on Triton, for the
        GIL, or for a core."""
        t0 = time.perf_counter()
        c0 = time.thread_time()
        try:
            yield
        finally:
            self.timings[name] = (time.perf_counter() - t0) * 1000
            self.cpu_timings[name] = (time.thread_time() - c0) * 1000

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.start) * 1000

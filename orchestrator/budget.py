"""A request's deadline and its split into per-stage budgets.

The deadline is the gRPC deadline when the client sets one, less a margin for the way
back (else ``default_ms``), never more than the service's ``ceiling_ms``: a client that
allows 30 s still gets its answer within the ceiling. Each stage gets at most its share
of that deadline, at most its absolute cap (``caps_ms``: a 1 s deadline must not let every
worker wait 250 ms on a hung Triton) and never more than what remains, so one slow stage
leaves time for the fallback that follows it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

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


# Absolute caps of the stages that wait on another process: the setting of each stage.
CAP_SETTINGS: dict[str, str] = {"user_tower": "user_tower_cap_ms", "ranking": "ranking_cap_ms"}


def _default(name: str) -> float:
    """A setting's default (recstack/settings.py is the one place the numbers live)."""
    from recstack.settings import Settings

    return float(Settings.model_fields[name].default)


@dataclass(frozen=True)
class BudgetConfig:
    default_ms: float = 80.0
    shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SHARES))
    # Keep this much for post-processing and the response whatever happens before.
    reserve_ms: float = 2.0
    # A client's deadline is when its answer must have *arrived*: the service aims this
    # much earlier (a share of the deadline, at least margin_min_ms), for the reply's
    # serialisation, the event loop's lag and the way back. Answering at the deadline
    # itself turned fallbacks into DEADLINE_EXCEEDED at the client on a busy host.
    margin_share: float = 0.1
    margin_min_ms: float = 5.0
    caps_ms: dict[str, float] = field(
        default_factory=lambda: {stage: _default(name) for stage, name in CAP_SETTINGS.items()}
    )
    ceiling_ms: float = field(default_factory=lambda: _default("latency_ceiling_ms"))

    @classmethod
    def from_settings(cls, settings: Any) -> BudgetConfig:
        """The ceiling and caps of ``settings`` (recstack/settings.py)."""
        return cls(
            caps_ms={stage: float(getattr(settings, name)) for stage, name in CAP_SETTINGS.items()},
            ceiling_ms=settings.latency_ceiling_ms,
        )


def answer_within(deadline_s: float | None, cfg: BudgetConfig, default_s: float) -> float:
    """Seconds the service may take to answer a call with the client's ``deadline_s``
    (None: no deadline, ``default_s``): the deadline less the margin for the way back,
    never more than the ceiling."""
    if deadline_s is None:
        total = default_s
    else:
        margin = max(cfg.margin_share * deadline_s, cfg.margin_min_ms / 1000)
        total = max(deadline_s - margin, 0.0)
    return min(total, cfg.ceiling_ms / 1000)


class RequestClock:
    """Times the stages of one request and hands out their budgets."""

    def __init__(self, deadline_s: float | None, cfg: BudgetConfig) -> None:
        self.cfg = cfg
        self.start = time.perf_counter()
        total = answer_within(deadline_s, cfg, cfg.default_ms / 1000)
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
        cap = self.cfg.caps_ms.get(stage, float("inf")) / 1000
        return min(share, cap, self.remaining())

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

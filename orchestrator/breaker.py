"""A circuit breaker per dependency (a Triton model, the online store), so that a dead or
hung dependency costs a request microseconds instead of its stage budget.

- **closed**: calls go through; each outcome is recorded. ``failures`` consecutive
  failures, or a failure rate of ``failure_rate`` over the last ``window`` calls (once
  ``window`` calls were seen), open it. A call that answered but took longer than its
  slow limit counts as a failure: a store that answers in 2 s is as unusable as one that
  is down.
- **open**: calls fail at once with :class:`CircuitOpen` (the caller degrades), for
  ``cooldown_s``.
- **half-open**: after the cool-down, up to ``probes`` calls at a time go through as
  probes; the others still fail fast. A probe that succeeds closes the breaker, one that
  fails opens it for another cool-down. Any answer of the dependency is a success (an
  input it refused says it is up); only what ``is_failure`` names, and slowness, fail.

The clock is injectable (tests use a fake one); every state change happens under one
lock, so one breaker serves all worker threads (and every release that calls the same
dependency: :class:`Breakers` hands out one per dependency name).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CLOSED, HALF_OPEN, OPEN = "closed", "half_open", "open"
# Gauge values of recstack_dependency_breaker_state (orchestrator/metrics.py).
STATE_VALUE = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


class CircuitOpen(Exception):
    """The dependency's breaker is open: the call was not made."""

    def __init__(self, name: str) -> None:
        super().__init__(f"circuit breaker {name!r} is open: not called")
        self.name = name


@dataclass(frozen=True)
class BreakerConfig:
    failures: int = 5  # consecutive failures that open the breaker
    failure_rate: float = 0.5  # ... or this share of failures over the last `window` calls
    window: int = 20
    cooldown_s: float = 1.0  # open this long before a probe is let through
    probes: int = 1  # calls let through at once while half-open

    def __post_init__(self) -> None:
        if self.failures < 1 or self.window < 1 or self.probes < 1:
            raise ValueError(f"failures, window and probes must be >= 1: {self}")
        if not 0 < self.failure_rate <= 1:
            raise ValueError(f"failure_rate must be in (0, 1]: {self.failure_rate}")
        if self.cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0: {self.cooldown_s}")

    @classmethod
    def from_settings(cls, settings: Any) -> BreakerConfig:
        return cls(
            failures=settings.breaker_failures,
            failure_rate=settings.breaker_failure_rate,
            window=settings.breaker_window,
            cooldown_s=settings.breaker_cooldown_s,
        )


Listener = Callable[[str, str], None]  # (breaker name, new state, "created" or "rejected")
CREATED, REJECTED = "created", "rejected"


class CircuitBreaker:
    """One dependency's breaker; thread-safe."""

    def __init__(
        self,
        name: str,
        cfg: BreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Listener | None = None,
    ) -> None:
        """``on_change(name, what)`` is called (under the breaker's lock: keep it cheap)
        with each new state, and with ``"rejected"`` for each call refused."""
        self.name = name
        self.cfg = cfg or BreakerConfig()
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = CLOSED
        self._since = clock()
        self._consecutive = 0
        self._recent: deque[bool] = deque(maxlen=self.cfg.window)  # True: a failure
        self._probing = 0
        self.rejected = 0  # calls refused while open (or beyond the half-open probes)
        self.opened = 0  # times it opened

    @property
    def state(self) -> str:
        """The current state (an open breaker past its cool-down reads half-open)."""
        with self._lock:
            if self._state == OPEN and self._clock() - self._since >= self.cfg.cooldown_s:
                return HALF_OPEN
            return self._state

    def _admit(self) -> bool | None:
        """None: refused; False: a normal call (closed); True: a half-open probe."""
        with self._lock:
            if self._state == CLOSED:
                return False
            if self._state == OPEN:
                if self._clock() - self._since < self.cfg.cooldown_s:
                    self._reject()
                    return None
                self._set(HALF_OPEN)
            if self._probing < self.cfg.probes:
                self._probing += 1
                return True
            self._reject()
            return None

    def _record(self, failed: bool, probe: bool) -> None:
        with self._lock:
            if probe:
                self._probing = max(0, self._probing - 1)
                if self._state != HALF_OPEN:
                    return  # another probe decided already
                if failed:
                    self._open()
                else:
                    self._reset()
                    self._set(CLOSED)
            elif self._state == CLOSED:
                # (A call let through before the breaker opened reports into OPEN or
                # HALF_OPEN: too late to count, the probes decide.)
                self._consecutive = self._consecutive + 1 if failed else 0
                self._recent.append(failed)
                rate_hit = (
                    len(self._recent) == self.cfg.window
                    and sum(self._recent) >= self.cfg.failure_rate * self.cfg.window
                )
                if failed and (self._consecutive >= self.cfg.failures or rate_hit):
                    self._open()

    @contextmanager
    def call(
        self, is_failure: Callable[[BaseException], bool], slow_s: float | None = None
    ) -> Iterator[None]:
        """Guard one call: raises :class:`CircuitOpen` when it may not go; records an
        exception for which ``is_failure`` holds, or a run longer than ``slow_s``, as a
        failure and anything else as a success (the dependency answered)."""
        probe = self._admit()
        if probe is None:
            raise CircuitOpen(self.name)
        t0 = self._clock()
        try:
            yield
        except BaseException as e:
            self._record(is_failure(e), probe)
            raise
        self._record(slow_s is not None and self._clock() - t0 > slow_s, probe)

    def snapshot(self) -> dict[str, Any]:
        """State for health details: state, seconds in it, recent failure share."""
        state = self.state
        with self._lock:
            recent = list(self._recent)
            return {
                "state": state,
                "for_s": round(self._clock() - self._since, 3),
                "consecutive_failures": self._consecutive,
                "recent_failure_share": round(sum(recent) / len(recent), 3) if recent else 0.0,
                "opened": self.opened,
                "rejected": self.rejected,
            }

    # --- under the lock ------------------------------------------------------------------
    def _open(self) -> None:
        self.opened += 1
        self._set(OPEN)

    def _reject(self) -> None:
        self.rejected += 1
        if self._on_change is not None:
            self._on_change(self.name, REJECTED)

    def _reset(self) -> None:
        self._consecutive = 0
        self._recent.clear()

    def _set(self, state: str) -> None:
        if state == self._state:
            return
        self._state = state
        self._since = self._clock()
        # One line per change: the requests it refuses are not logged one by one.
        level = logging.WARNING if state == OPEN else logging.INFO
        log.log(level, "circuit breaker %s: %s", self.name, state.replace("_", "-"))
        if self._on_change is not None:
            self._on_change(self.name, state)


class Breakers:
    """One breaker per dependency name, created on first use with one config; shared by
    every release the service holds (one Triton, one online store)."""

    def __init__(
        self,
        cfg: BreakerConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Listener | None = None,
    ) -> None:
        self.cfg = cfg or BreakerConfig()
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._by_name: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        with self._lock:
            breaker = self._by_name.get(name)
            if breaker is None:
                breaker = CircuitBreaker(name, self.cfg, self._clock, self._on_change)
                self._by_name[name] = breaker
                if self._on_change is not None:
                    self._on_change(name, CREATED)
            return breaker

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every breaker's :meth:`CircuitBreaker.snapshot`, by name."""
        with self._lock:
            breakers = list(self._by_name.values())
        return {b.name: b.snapshot() for b in sorted(breakers, key=lambda b: b.name)}

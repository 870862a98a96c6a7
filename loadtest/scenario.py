"""Scenario files: what to call, at which rate, for how long, with which traffic mix, and
which commands to run during the run. YAML in ``loadtest/scenarios/`` (or any path),
validated strictly (unknown keys and bad values fail with the file name and the key)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from recstack.errors import UserError

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """Seconds from ``30``, ``"30s"``, ``"500ms"``, ``"2m"``; rejects negatives and junk."""
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 500ms, 2m)")
        seconds = float(m.group(1)) * _UNIT_S[m.group(2)]
    if seconds < 0:
        raise ValueError(f"negative duration: {value!r}")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]
Rate = Annotated[float, Field(gt=0, le=1_000_000, description="requests per second")]
Share = Annotated[float, Field(ge=0, le=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Strict):
    """Where requests go. ``address`` defaults to the port in Settings for the kind."""

    kind: Literal["grpc", "http", "triton"] = "grpc"
    address: str | None = None
    timeout: Duration = 1.0
    # Client deadlines drawn per call, uniformly (e.g. [50ms, 100ms, 1s, 30s]): the report
    # then breaks errors and latency down by deadline. Empty: every call gets ``timeout``.
    deadlines: list[Duration] = Field(default_factory=list, max_length=16)
    connections: int = Field(default=1, ge=1, le=64)
    # http only: polled before the run when set (the orchestrator's health endpoint).
    health_path: str | None = None
    # triton only: the model, its version ("" = server's policy), the batch size, and
    # sizes for variable (-1) dims by input name; names and dtypes come from config.pbtxt.
    model: str = "user_tower"
    model_version: str = ""
    batch_size: int = Field(default=1, ge=1)
    dims: dict[str, list[int]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Target:
        if self.timeout <= 0:
            raise ValueError("timeout must be > 0")
        if any(d <= 0 for d in self.deadlines):
            raise ValueError("deadlines must be > 0")
        if self.deadlines and self.kind == "triton":
            raise ValueError("deadlines: per-call deadlines are for the orchestrator's fronts")
        return self

    @property
    def longest_deadline(self) -> float:
        """The longest deadline any call can get (the generator's safety net waits it)."""
        return max(self.deadlines) if self.deadlines else self.timeout


class Stage(_Strict):
    """A stretch of the run at one rate (spikes are stages)."""

    duration: Duration
    rate: Rate


class Load(_Strict):
    """The arrival process: open loop, on a schedule fixed before the run starts."""

    arrival: Literal["constant", "poisson"] = "poisson"
    rate: Rate | None = None
    duration: Duration | None = None
    stages: list[Stage] | None = None
    warmup: Duration = 2.0
    # Requests in flight beyond this are not sent and count as errors ("DROPPED"): the
    # generator never waits for the server to catch up.
    max_in_flight: int = Field(default=2000, ge=1)
    workers: int = Field(default=1, ge=1, le=16)
    # auto = uvloop when installed (it is, through the lock file), else asyncio.
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    seed: int = 1

    @model_validator(mode="after")
    def _check(self) -> Load:
        if self.stages is not None:
            if self.rate is not None or self.duration is not None:
                raise ValueError("give either rate + duration or stages, not both")
            if not self.stages:
                raise ValueError("stages is empty")
        elif self.rate is None or self.duration is None:
            raise ValueError("rate and duration are required (or stages)")
        if self.warmup >= self.total_duration:
            raise ValueError(
                f"warmup ({self.warmup:g}s) must be shorter than the run ({self.total_duration:g}s)"
            )
        return self

    @property
    def total_duration(self) -> float:
        """Seconds from the first to the last scheduled arrival."""
        if self.stages is not None:
            return sum(s.duration for s in self.stages)
        return float(self.duration or 0.0)

    def phases(self) -> list[Stage]:
        """The run as stages (a single one for rate + duration)."""
        if self.stages is not None:
            return list(self.stages)
        return [Stage(duration=self.duration, rate=self.rate)]  # type: ignore[arg-type]


class Traffic(_Strict):
    """The request mix. User ids come from ``<data_dir>/raw/users.parquet`` unless
    ``user_range`` gives ``[first, last]``."""

    zipf_s: float = Field(default=1.1, gt=0, le=5)
    cold_start_share: Share = 0.05
    user_range: tuple[int, int] | None = None
    k: dict[int, float] = Field(default_factory=lambda: {10: 0.7, 50: 0.2, 200: 0.1})
    filters_share: Share = 0.2
    event_share: Share = 0.1
    surfaces: list[str] = Field(default_factory=lambda: ["home", "pdp", "cart"], min_length=1)
    devices: list[str] = Field(default_factory=lambda: ["ios", "android", "web"], min_length=1)

    @model_validator(mode="after")
    def _check(self) -> Traffic:
        if not self.k or any(k < 1 or k > 200 for k in self.k) or min(self.k.values()) < 0:
            raise ValueError("k: give {k: weight} with 1 <= k <= 200 and weights >= 0")
        if sum(self.k.values()) <= 0:
            raise ValueError("k: weights sum to 0")
        if self.user_range is not None and self.user_range[0] > self.user_range[1]:
            raise ValueError("user_range: first > last")
        return self


class Slo(_Strict):
    """What "sustainable" means for a sweep (and the pass/fail line in reports)."""

    p99_ms: float = Field(default=15.0, gt=0)
    p50_ms: float | None = Field(default=None, gt=0)
    max_error_share: Share = 0.01
    # Degraded answers are answers, but a rate that only holds by shedding or skipping
    # stages is not sustainable: None = not part of the verdict.
    max_degraded_share: Share | None = None


class Sweep(_Strict):
    """Rates to step through: ``start``, then ``+step`` (or ``*factor``) up to ``max``."""

    start: Rate = 50
    step: float | None = Field(default=None, gt=0)
    factor: float | None = Field(default=None, gt=1)
    max: Rate = 5000
    step_duration: Duration = 15.0
    warmup: Duration = 3.0
    # Stop after this many consecutive failing steps (1 = at the first break).
    stop_after_failures: int = Field(default=1, ge=1)

    @model_validator(mode="after")
    def _check(self) -> Sweep:
        if (self.step is None) == (self.factor is None):
            raise ValueError("give exactly one of step or factor")
        if self.max < self.start:
            raise ValueError("max < start")
        if self.warmup >= self.step_duration:
            raise ValueError("warmup must be shorter than step_duration")
        return self

    def rates(self) -> list[float]:
        """The offered rates in order."""
        out, r = [], float(self.start)
        while r <= self.max + 1e-9:
            out.append(round(r, 6))
            r = r + self.step if self.step else r * float(self.factor or 2)
        return out


class Action(_Strict):
    """A command started (not awaited) at ``at`` seconds into the run, marked on the plot."""

    at: Duration
    run: str = Field(min_length=1)
    label: str | None = None


class Scenario(_Strict):
    """One load test."""

    name: str
    description: str = ""
    target: Target = Field(default_factory=lambda: Target())
    load: Load
    traffic: Traffic = Field(default_factory=lambda: Traffic())
    slo: Slo = Field(default_factory=lambda: Slo())
    sweep: Sweep | None = None
    actions: list[Action] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        for a in self.actions:
            if a.at > self.load.total_duration:
                raise ValueError(
                    f"action {a.label or a.run!r} at {a.at:g}s is after the end of the run "
                    f"({self.load.total_duration:g}s)"
                )
        return self

    def with_load(self, **changes: Any) -> Scenario:
        """A copy with ``load`` fields replaced (None = keep), re-validated. A rate given
        for a staged scenario replaces the stages with one stage of the same length."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if "duration" in changes and "rate" not in changes and self.load.stages is not None:
            raise UserError(f"{self.name} is made of stages: give a rate with the duration")
        data = self.model_dump()
        load = data["load"]
        if "rate" in changes and load["stages"] is not None:
            load["duration"] = changes.get("duration", self.load.total_duration)
            load["stages"] = None
        load.update(changes)
        return validate_scenario(data, source=f"{self.name} (with command-line overrides)")


def _format_errors(e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def validate_scenario(data: Any, source: str = "<scenario>") -> Scenario:
    """A Scenario from parsed YAML; UserError naming ``source`` and each bad key."""
    if not isinstance(data, dict):
        raise UserError(f"{source}: a scenario is a mapping, got {type(data).__name__}")
    try:
        return Scenario.model_validate(data)
    except ValidationError as e:
        raise UserError(f"{source}: invalid scenario\n{_format_errors(e)}") from None


def resolve_path(name_or_path: str | Path) -> Path:
    """``steady`` -> ``loadtest/scenarios/steady.yaml``; an existing path is used as is."""
    p = Path(name_or_path)
    if p.exists():
        return p
    for ext in (".yaml", ".yml"):
        cand = SCENARIO_DIR / f"{name_or_path}{ext}"
        if cand.exists():
            return cand
    known = ", ".join(sorted(x.stem for x in SCENARIO_DIR.glob("*.y*ml")))
    raise UserError(f"no scenario {str(name_or_path)!r} (a path, or one of: {known})")


def load_scenario(name_or_path: str | Path) -> Scenario:
    """Read and validate a scenario file."""
    path = resolve_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML: {e}") from None
    if isinstance(data, dict):
        data.setdefault("name", path.stem)
    return validate_scenario(data, source=str(path))

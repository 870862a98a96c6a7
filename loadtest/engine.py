"""The open-loop send loop of one process: requests leave at their scheduled times whether
or not earlier ones have answered, and each latency is measured from the INTENDED send
time, so a server that queues cannot hide it (no coordinated omission). At most
``max_in_flight`` requests are outstanding; an arrival beyond that is not sent and counts
as ``DROPPED`` rather than being delayed. The loop also measures itself (send lag, event
loop lag, CPU) so a report can say when the generator, not the server, was the limit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from loadtest.scenario import Scenario
from loadtest.schedule import arrival_times
from loadtest.targets import OK, Target, make_target
from loadtest.traffic import build_plan, load_catalog
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

DROPPED = "DROPPED"
PROGRESS_EVERY_S = 0.5
LOOP_PROBE_S = 0.01
# After this many back-to-back sends without sleeping, yield so answers get processed.
BURST = 64

ProgressFn = Callable[[dict[str, Any]], None]


@dataclass
class WorkerSpec:
    """What one generator process runs: its share of the scenario's load."""

    scenario: Scenario
    settings: Settings
    worker: int = 0
    workers: int = 1
    seed: int = 1


@dataclass
class WorkerResult:
    """Per-request arrays (one row per scheduled arrival) and the self-check numbers."""

    intended: np.ndarray  # s from run start
    latency: np.ndarray  # s from intended send time to answer; NaN = not sent
    send_lag: np.ndarray  # s from intended to actual send; NaN = not sent
    status: np.ndarray  # int16 index into codes
    kind: np.ndarray  # int8 (traffic.RECOMMEND / EVENT)
    cold: np.ndarray  # bool
    degraded: np.ndarray  # bool
    release: np.ndarray  # int16 index into releases
    deadline: np.ndarray  # float64: the call's client deadline, s
    codes: list[str]
    releases: list[str]
    degraded_reasons: dict[str, int]  # counted after warm-up
    loop_lag: np.ndarray  # s, event-loop probe overshoots
    loop_lag_t: np.ndarray  # s from run start, when each probe ran
    cpu_s: float  # process CPU time during the schedule
    wall_s: float  # wall time of the schedule
    max_in_flight_seen: int
    address: str = ""
    event_loop: str = "asyncio"
    extra: dict[str, Any] = field(default_factory=dict)


def event_loop_name(choice: str = "auto") -> str:
    """The loop to use: ``uvloop`` for ``auto`` when it is installed, else ``asyncio``."""
    if choice != "auto":
        return choice
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_loop(coro: Any, choice: str = "auto") -> Any:
    """Run a coroutine on the chosen event loop."""
    if event_loop_name(choice) == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise UserError("load.event_loop is uvloop, but uvloop is not installed") from None
        return uvloop.run(coro)
    return asyncio.run(coro)


class Engine:
    """Prepares a worker's schedule, plan and target; :meth:`run` sends."""

    def __init__(self, spec: WorkerSpec) -> None:
        sc = spec.scenario
        self.spec = spec
        rng = np.random.default_rng([sc.load.seed, spec.seed, spec.worker])
        phase = spec.worker / spec.workers if sc.load.arrival == "constant" else 0.0
        self.times = arrival_times(
            sc.load.phases(), sc.load.arrival, rng, share=1.0 / spec.workers, phase=phase
        )
        catalog = load_catalog(spec.settings.raw_dir, sc.traffic)
        deadlines = tuple(sc.target.deadlines) or (sc.target.timeout,)
        self.plan = build_plan(len(self.times), sc.traffic, catalog, rng, deadlines)
        self.target: Target = make_target(sc.target, spec.settings)

    async def open(self) -> None:
        """Connect and check the target (raises UserError when it is not up)."""
        await self.target.open(self.plan)

    async def run(self, start_at: float, on_progress: ProgressFn | None = None) -> WorkerResult:
        """Send the schedule with t=0 at wall-clock ``start_at`` (``time.time()``)."""
        try:
            return await self._run(start_at, on_progress)
        finally:
            await self.target.close()

    async def _run(self, start_at: float, on_progress: ProgressFn | None) -> WorkerResult:
        sc = self.spec.scenario
        loop = asyncio.get_running_loop()
        # All timestamps use perf_counter: uvloop's loop.time() has 1 ms resolution and is
        # cached per loop iteration, too coarse for latencies.
        clock = time.perf_counter
        t0 = clock() + (start_at - time.time())
        times, plan, target = self.times, self.plan, self.target
        n = len(times)
        warmup = sc.load.warmup
        latency = np.full(n, np.nan)
        send_lag = np.full(n, np.nan)
        status = np.zeros(n, dtype=np.int16)
        degraded = np.zeros(n, dtype=bool)
        release = np.zeros(n, dtype=np.int16)
        codes: dict[str, int] = {OK: 0, DROPPED: 1}
        releases: dict[str, int] = {"": 0}
        reasons: dict[str, int] = {}
        st = {"sent": 0, "done": 0, "errors": 0, "dropped": 0, "in_flight": 0, "max_if": 0}
        recent: list[float] = []
        max_in_flight = sc.load.max_in_flight

        async def one(i: int, t_int: float) -> None:
            send_lag[i] = clock() - t_int
            try:
                code, deg, rel = await target.send(plan, i)
            except asyncio.CancelledError:
                code, deg, rel = "TIMEOUT", (), ""
            except Exception as e:  # a client-side bug must show up, not stop the run
                log.debug("request %d failed in the client", i, exc_info=True)
                code, deg, rel = f"CLIENT_{type(e).__name__}", (), ""
            lat = clock() - t_int
            latency[i] = lat
            recent.append(lat)
            status[i] = codes.setdefault(code, len(codes))
            if code != OK:
                st["errors"] += 1
            if deg:
                degraded[i] = True
                if times[i] >= warmup:
                    for r in deg:
                        reasons[r] = reasons.get(r, 0) + 1
            if rel:
                release[i] = releases.setdefault(rel, len(releases))
            st["done"] += 1
            st["in_flight"] -= 1

        lag_samples: list[float] = []
        lag_t: list[float] = []
        stop = asyncio.Event()

        async def probe_loop() -> None:
            # A timer that should fire every LOOP_PROBE_S: its overshoot is the loop's lag.
            while not stop.is_set():
                t = clock()
                await asyncio.sleep(LOOP_PROBE_S)
                now = clock()
                lag_samples.append(now - t - LOOP_PROBE_S)
                lag_t.append(now - t0)

        def progress(p99_ms: float | None) -> dict[str, Any]:
            """One progress report of this worker (p99 of the last interval, if any)."""
            return {
                "worker": self.spec.worker,
                "elapsed": clock() - t0,
                **{key: st[key] for key in ("sent", "done", "errors", "dropped", "in_flight")},
                "p99_ms": p99_ms,
            }

        async def report_progress() -> None:
            while not stop.is_set():
                await asyncio.sleep(PROGRESS_EVERY_S)
                window = np.array(recent) if recent else None
                recent.clear()
                if on_progress is None:
                    continue
                on_progress(
                    progress(float(np.percentile(window, 99) * 1e3) if window is not None else None)
                )

        side = [loop.create_task(probe_loop()), loop.create_task(report_progress())]
        tasks: set[asyncio.Task[None]] = set()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        burst = 0
        for i in range(n):
            t_int = t0 + float(times[i])
            delay = t_int - clock()
            if delay > 0:
                burst = 0
                await asyncio.sleep(delay)
            else:
                burst += 1
                if burst >= BURST:
                    burst = 0
                    await asyncio.sleep(0)
            if st["in_flight"] >= max_in_flight:
                status[i] = 1
                st["dropped"] += 1
                st["errors"] += 1
                continue
            st["in_flight"] += 1
            st["sent"] += 1
            st["max_if"] = max(st["max_if"], st["in_flight"])
            task = loop.create_task(one(i, t_int))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        cpu1, wall1 = time.process_time(), time.perf_counter()
        # Every target call has its own timeout; this is only a safety net.
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=sc.target.longest_deadline + 2.0)
            for t in pending:
                t.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        stop.set()
        for t in side:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if on_progress is not None:
            on_progress(progress(None))
        return WorkerResult(
            intended=times,
            latency=latency,
            send_lag=send_lag,
            status=status,
            kind=plan.kind,
            cold=plan.cold,
            degraded=degraded,
            release=release,
            deadline=plan.deadline,
            codes=list(codes),
            releases=list(releases),
            degraded_reasons=reasons,
            loop_lag=np.array(lag_samples),
            loop_lag_t=np.array(lag_t),
            cpu_s=cpu1 - cpu0,
            wall_s=wall1 - wall0,
            max_in_flight_seen=st["max_if"],
            address=target.address,
            event_loop=event_loop_name(sc.load.event_loop),
        )


async def run_single(
    spec: WorkerSpec,
    on_progress: ProgressFn | None = None,
    on_start: Callable[[float], None] | None = None,
) -> WorkerResult:
    """Prepare, open and run one worker in the current process."""
    eng = Engine(spec)
    await eng.open()
    start_at = time.time() + 0.05
    if on_start is not None:
        on_start(start_at)
    return await eng.run(start_at, on_progress)

"""The circuit breaker (orchestrator/breaker.py) on a fake clock: when it opens, how fast it
refuses, when it probes, what closes it, and that threads sharing it keep it consistent."""

from __future__ import annotations

import threading
import time

import pytest

from orchestrator.breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    Breakers,
    CircuitBreaker,
    CircuitOpen,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Down(Exception):
    """A failure of the dependency."""


class Refused(Exception):
    """The dependency answered, refusing the input: not its failure."""


def is_down(e: BaseException) -> bool:
    return isinstance(e, Down)


def fail(b: CircuitBreaker) -> None:
    with pytest.raises(Down), b.call(is_down):
        raise Down()


def succeed(b: CircuitBreaker, clock: FakeClock | None = None, takes_s: float = 0.0) -> None:
    with b.call(is_down, slow_s=0.05):
        if clock is not None:
            clock.now += takes_s


def refused(b: CircuitBreaker) -> bool:
    try:
        with b.call(is_down):
            pass
    except CircuitOpen:
        return True
    return False


def breaker(**cfg: float) -> tuple[CircuitBreaker, FakeClock, list[tuple[str, str]]]:
    clock = FakeClock()
    events: list[tuple[str, str]] = []
    b = CircuitBreaker(
        "dep",
        BreakerConfig(**cfg),  # type: ignore[arg-type]
        clock,
        on_change=lambda n, s: events.append((n, s)),
    )
    return b, clock, events


def test_opens_after_n_consecutive_failures_and_refuses_in_microseconds() -> None:
    b, _, events = breaker(failures=3, window=100)
    for _ in range(2):
        fail(b)
    succeed(b)  # a success in between starts the count again
    fail(b)
    fail(b)
    assert b.state == CLOSED
    fail(b)
    assert b.state == OPEN and events == [("dep", OPEN)]
    t0 = time.perf_counter()
    for _ in range(1000):
        assert refused(b)
    per_call = (time.perf_counter() - t0) / 1000
    assert per_call < 100e-6, per_call  # microseconds, not a timeout
    assert b.rejected == 1000 and events.count(("dep", "rejected")) == 1000


def test_opens_on_the_failure_rate_over_the_window() -> None:
    """Alternating failures never make 3 in a row, but half of the last 10 calls failed."""
    b, _, _ = breaker(failures=3, window=10, failure_rate=0.5)
    for i in range(9):
        fail(b) if i % 2 else succeed(b)
    assert b.state == CLOSED  # 9 calls: the window is not full yet
    fail(b)
    assert b.state == OPEN


def test_slow_answers_count_as_failures() -> None:
    b, clock, _ = breaker(failures=2, window=100)
    succeed(b, clock, takes_s=0.01)
    succeed(b, clock, takes_s=0.2)
    assert b.state == CLOSED
    succeed(b, clock, takes_s=0.2)
    assert b.state == OPEN


def test_an_answer_that_refuses_the_input_is_not_a_failure() -> None:
    b, _, _ = breaker(failures=1, window=100)
    with pytest.raises(Refused), b.call(is_down):
        raise Refused()
    assert b.state == CLOSED and b.snapshot()["consecutive_failures"] == 0


def test_half_open_lets_one_probe_through_after_the_cooldown() -> None:
    b, clock, events = breaker(failures=1, cooldown_s=1.0)
    fail(b)
    clock.now += 0.99
    assert refused(b)
    clock.now += 0.02
    assert b.state == HALF_OPEN
    # The probe is in flight: every other call still fails fast.
    with b.call(is_down):
        assert refused(b) and refused(b)
    assert b.state == CLOSED
    assert [s for _, s in events if s != "rejected"] == [OPEN, HALF_OPEN, CLOSED]
    assert not refused(b)


def test_a_failed_probe_opens_it_for_another_cooldown() -> None:
    b, clock, _ = breaker(failures=1, cooldown_s=1.0)
    fail(b)
    clock.now += 1.0
    fail(b)  # the probe
    assert b.state == OPEN and b.opened == 2
    clock.now += 0.5
    assert refused(b)
    clock.now += 0.5
    succeed(b)
    assert b.state == CLOSED


def test_a_late_answer_from_before_the_opening_does_not_decide() -> None:
    """A call let through while closed that fails after the breaker opened (and went
    half-open) is not the probe: only the probe's own outcome closes or reopens."""
    b, clock, _ = breaker(failures=1, cooldown_s=1.0)
    late = b.call(is_down)
    late.__enter__()
    fail(b)  # opens
    clock.now += 1.0
    probe = b.call(is_down)
    probe.__enter__()  # half-open, probing
    late.__exit__(Down, Down(), None)  # the old call fails now
    assert b.state == HALF_OPEN
    probe.__exit__(None, None, None)
    assert b.state == CLOSED


def test_snapshot_reports_state_and_failures() -> None:
    b, clock, _ = breaker(failures=2, window=4)
    fail(b)
    succeed(b)
    snap = b.snapshot()
    assert snap["state"] == CLOSED and snap["recent_failure_share"] == 0.5
    fail(b)
    fail(b)
    clock.now += 0.25
    snap = b.snapshot()
    assert snap["state"] == OPEN and snap["for_s"] == 0.25 and snap["opened"] == 1


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="failure_rate"):
        BreakerConfig(failure_rate=0)
    with pytest.raises(ValueError, match=">= 1"):
        BreakerConfig(failures=0)
    with pytest.raises(ValueError, match="cooldown"):
        BreakerConfig(cooldown_s=-1)


def test_breakers_hand_out_one_per_dependency() -> None:
    board = Breakers(BreakerConfig(failures=1))
    assert board.get("triton:rank:1") is board.get("triton:rank:1")
    assert board.get("triton:rank:1") is not board.get("triton:user_tower:1")
    fail(board.get("triton:rank:1"))
    snap = board.snapshot()
    assert snap["triton:rank:1"]["state"] == OPEN
    assert snap["triton:user_tower:1"]["state"] == CLOSED


def test_threads_sharing_a_breaker_let_exactly_one_probe_through() -> None:
    b, clock, _ = breaker(failures=1, cooldown_s=1.0, probes=1)
    fail(b)
    clock.now += 1.0
    gate = threading.Event()
    admitted: list[int] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            with b.call(is_down):
                with lock:
                    admitted.append(i)
                gate.wait(5)
        except CircuitOpen:
            pass

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while b.rejected < 15 and time.monotonic() < deadline:
        time.sleep(0.001)
    gate.set()
    for t in threads:
        t.join()
    assert len(admitted) == 1 and b.rejected == 15
    assert b.state == CLOSED

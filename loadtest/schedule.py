"""Arrival schedules, fixed before the run: the generator sends at these times whatever the
server does, which is what makes the test open-loop."""

from __future__ import annotations

import numpy as np

from loadtest.scenario import Stage


def arrival_times(
    stages: list[Stage],
    arrival: str,
    rng: np.random.Generator,
    share: float = 1.0,
    phase: float = 0.0,
) -> np.ndarray:
    """Intended send offsets in seconds from the run start, ascending.

    ``share`` scales every stage's rate (a worker's part of the load); ``phase`` in [0, 1)
    shifts constant arrivals so that several workers interleave instead of colliding.
    """
    out: list[np.ndarray] = []
    start = 0.0
    for st in stages:
        rate = st.rate * share
        end = start + st.duration
        if arrival == "constant":
            n = int(np.ceil(st.duration * rate - phase - 1e-9))
            t = start + (np.arange(max(n, 0)) + phase) / rate
        else:
            # Poisson: exponential gaps; draw a few more than expected, then cut at the end.
            n_guess = int(st.duration * rate * 1.2 + 10 * np.sqrt(st.duration * rate + 1) + 10)
            t = start + np.cumsum(rng.exponential(1.0 / rate, size=n_guess))
            while t.size and t[-1] < end:
                more = t[-1] + np.cumsum(rng.exponential(1.0 / rate, size=n_guess))
                t = np.concatenate([t, more])
        out.append(t[t < end])
        start = end
    return np.concatenate(out) if out else np.empty(0)


def rate_at(stages: list[Stage], t: float) -> float:
    """The offered rate at offset ``t`` (for plots and summaries)."""
    start = 0.0
    for st in stages:
        if t < start + st.duration:
            return st.rate
        start += st.duration
    return stages[-1].rate if stages else 0.0

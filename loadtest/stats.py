"""From per-request arrays to the numbers in a report: HDR-histogram percentiles, rates,
errors by code, degraded share, a per-second time series, the SLO verdict, and the
generator's self-check (was the generator, not the server, the limit?)."""

from __future__ import annotations

from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

from loadtest.engine import DROPPED, WorkerResult
from loadtest.scenario import Scenario, Slo
from loadtest.schedule import rate_at
from loadtest.targets import OK
from loadtest.traffic import KINDS

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p95", 95.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
)
# Self-check thresholds: beyond these the generator's own delay is in the numbers. They sit
# above the scheduling noise of a shared 2-core machine (loop lag p99 of 2-5 ms at idle).
SEND_LAG_WARN_MS = 10.0
LOOP_LAG_WARN_MS = 10.0
CPU_WARN_SHARE = 0.85
SEND_RATE_WARN = 0.95
HDR_MAX_US = 3_600_000_000  # one hour, in microseconds
HDR_DIGITS = 3


def hdr_summary(seconds: np.ndarray) -> dict[str, float | int | None]:
    """Percentiles (ms) of latencies given in seconds, through an HDR histogram
    (3 significant digits, 1 µs .. 1 h)."""
    x = seconds[~np.isnan(seconds)]
    out: dict[str, float | int | None] = {"count": int(x.size)}
    if x.size == 0:
        out.update({name: None for name, _ in PERCENTILES})
        out.update({"max": None, "mean": None})
        return out
    h = HdrHistogram(1, HDR_MAX_US, HDR_DIGITS)
    us = np.clip(np.rint(x * 1e6), 1, HDR_MAX_US).astype(np.int64)
    vals, counts = np.unique(us, return_counts=True)
    for v, c in zip(vals.tolist(), counts.tolist(), strict=True):
        h.record_value(v, c)
    for name, p in PERCENTILES:
        out[name] = h.get_value_at_percentile(p) / 1e3
    out["max"] = float(x.max() * 1e3)
    out["mean"] = float(x.mean() * 1e3)
    return out


def _lag_summary(seconds: np.ndarray) -> dict[str, float | None]:
    x = seconds[~np.isnan(seconds)] * 1e3
    if x.size == 0:
        return {"p50": None, "p99": None, "max": None}
    return {
        "p50": float(np.percentile(x, 50)),
        "p99": float(np.percentile(x, 99)),
        "max": float(x.max()),
    }


class Merged:
    """All workers' arrays concatenated, with status and release codes unified."""

    def __init__(self, results: list[WorkerResult]) -> None:
        self.codes: list[str] = [OK, DROPPED]
        self.releases: list[str] = [""]

        def remap(local: np.ndarray, names: list[str], table: list[str]) -> np.ndarray:
            ids = []
            for name in names:
                if name not in table:
                    table.append(name)
                ids.append(table.index(name))
            return np.asarray(ids, dtype=np.int16)[local] if len(local) else local

        cat = np.concatenate
        self.intended = cat([r.intended for r in results])
        order = np.argsort(self.intended, kind="stable")
        self.intended = self.intended[order]
        self.latency = cat([r.latency for r in results])[order]
        self.send_lag = cat([r.send_lag for r in results])[order]
        self.status = cat([remap(r.status, r.codes, self.codes) for r in results])[order]
        self.release = cat([remap(r.release, r.releases, self.releases) for r in results])[order]
        self.kind = cat([r.kind for r in results])[order]
        self.cold = cat([r.cold for r in results])[order]
        self.degraded = cat([r.degraded for r in results])[order]
        self.deadline = cat([r.deadline for r in results])[order]
        self.reasons: dict[str, int] = {}
        for r in results:
            for k, v in r.degraded_reasons.items():
                self.reasons[k] = self.reasons.get(k, 0) + v
        self.loop_lag = cat([r.loop_lag for r in results])
        self.loop_lag_t = cat([r.loop_lag_t for r in results])
        self.results = results


def slo_verdict(
    slo: Slo, latency_ms: dict[str, Any], error_share: float, degraded_share: float = 0.0
) -> tuple[bool, str]:
    """Whether a run met the SLO, and why not."""
    p99, p50 = latency_ms.get("p99"), latency_ms.get("p50")
    if p99 is None:
        return False, "no answers"
    if error_share > slo.max_error_share:
        return False, f"error share {error_share:.2%} > {slo.max_error_share:.2%}"
    if slo.max_degraded_share is not None and degraded_share > slo.max_degraded_share:
        return False, f"degraded share {degraded_share:.2%} > {slo.max_degraded_share:.2%}"
    if p99 > slo.p99_ms:
        return False, f"p99 {p99:.1f} ms > {slo.p99_ms:g} ms"
    if slo.p50_ms is not None and p50 is not None and p50 > slo.p50_ms:
        return False, f"p50 {p50:.1f} ms > {slo.p50_ms:g} ms"
    return True, "met"


# After an action ends, it has recovered at the first full answer from which on the next
# RECOVERY_WINDOW_S seconds hold at most RECOVERY_MAX_DEGRADED degraded answers.
RECOVERY_WINDOW_S = 2.0
RECOVERY_MAX_DEGRADED = 0.05


def action_windows(m: Merged, actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per timed action, the calls scheduled while it ran (a fault from the ``chaos``
    scenario, a promotion): errors by code and kind, the degraded share and latency of
    the Recommend answers, and the recovery time after it ended (None: not within the
    run)."""
    ok = m.status == m.codes.index(OK)
    rec = m.kind == KINDS.index("recommend")
    out = []
    for a in actions:
        start, end = a.get("started_s"), a.get("ended_s")
        if start is None:
            continue
        stop = end if end is not None else float("inf")
        sel = (m.intended >= start) & (m.intended < stop)
        errors: dict[str, dict[str, int]] = {}
        for k, name in enumerate(KINDS):
            bad = sel & (m.kind == k) & ~ok
            codes, counts = np.unique(m.status[bad], return_counts=True)
            if len(codes):
                errors[name] = {m.codes[int(c)]: int(n) for c, n in zip(codes, counts, strict=True)}
        answered = sel & rec & ok
        lat = hdr_summary(m.latency[sel & rec & ~np.isnan(m.latency)])
        out.append(
            {
                "label": a["label"],
                "start_s": start,
                "end_s": end,
                "recommend": int((sel & rec).sum()),
                "errors": errors,
                "degraded_share": _degraded_share(m, answered),
                "latency_ms": {k: lat[k] for k in ("p50", "p99", "max")},
                "recovery_s": None if end is None else _recovery(m, ok & rec, end),
                "by_deadline": by_deadline(m, sel),
            }
        )
    return out


def _degraded_share(m: Merged, answered: np.ndarray) -> float | None:
    """Share of the ``answered`` Recommend calls that came back degraded; None without any."""
    return float((m.degraded & answered).sum() / answered.sum()) if answered.any() else None


def by_deadline(m: Merged, sel: np.ndarray) -> list[dict[str, Any]]:
    """Per client deadline among ``sel``'s calls (one row unless the scenario draws
    ``target.deadlines``): calls, errors by code, the Recommend answers' degraded share and
    latency."""
    ok = m.status == m.codes.index(OK)
    rec = m.kind == KINDS.index("recommend")
    out = []
    for d in np.unique(m.deadline[sel]):
        mine = sel & (m.deadline == d)
        codes, counts = np.unique(m.status[mine & ~ok], return_counts=True)
        answered = mine & rec & ok
        lat = hdr_summary(m.latency[mine & rec & ~np.isnan(m.latency)])
        out.append(
            {
                "deadline_s": float(d),
                "calls": int(mine.sum()),
                "errors": {m.codes[int(c)]: int(n) for c, n in zip(codes, counts, strict=True)},
                "degraded_share": _degraded_share(m, answered),
                "latency_ms": {k: lat[k] for k in ("p50", "p99", "max")},
            }
        )
    return out


def _recovery(m: Merged, answered: np.ndarray, end: float) -> float | None:
    """Seconds from ``end`` to the first full Recommend answer that stays (see
    RECOVERY_WINDOW_S); None if the run ended first."""
    idx = np.flatnonzero(answered & (m.intended >= end))
    t, degraded = m.intended[idx], m.degraded[idx]
    for j in np.flatnonzero(~degraded):
        ahead = (t >= t[j]) & (t < t[j] + RECOVERY_WINDOW_S)
        if t[-1] < t[j] + RECOVERY_WINDOW_S:
            return None  # not enough run left to tell
        if degraded[ahead].mean() <= RECOVERY_MAX_DEGRADED:
            return float(t[j] - end)
    return None


def summarize(
    results: list[WorkerResult], scenario: Scenario, actions: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The run's result document (without scenario echo and actions; see runner), with
    :func:`action_windows` of ``actions``' records."""
    m = Merged(results)
    load = scenario.load
    total, warmup = load.total_duration, load.warmup
    window = total - warmup
    meas = m.intended >= warmup
    ok_code = m.codes.index(OK)
    drop_code = m.codes.index(DROPPED)
    sent = meas & (m.status != drop_code)
    ok = meas & (m.status == ok_code)
    dropped = meas & (m.status == drop_code)
    errors = meas & (m.status != ok_code)
    scheduled = int(meas.sum())
    actual_send = m.intended + np.nan_to_num(m.send_lag, nan=np.inf)
    done = m.intended + np.nan_to_num(m.latency, nan=np.inf)
    sent_in_window = int(((actual_send >= warmup) & (actual_send < total)).sum())
    phases = load.phases()
    nominal = float(
        np.mean([rate_at(phases, t) for t in np.linspace(warmup, total, 200, endpoint=False)])
    )

    err_counts: dict[str, int] = {}
    for code_idx, count in zip(*np.unique(m.status[errors], return_counts=True), strict=True):
        err_counts[m.codes[int(code_idx)]] = int(count)
    error_share = float(errors.sum() / scheduled) if scheduled else 0.0
    latency = hdr_summary(m.latency[sent])
    rec_ok = ok & (m.kind == 0)

    by_kind: dict[str, Any] = {}
    for k, name in enumerate(KINDS):
        sel = meas & (m.kind == k)
        if sel.any():
            by_kind[name] = {
                "scheduled": int(sel.sum()),
                "errors": int((sel & errors).sum()),
                "latency_ms": hdr_summary(m.latency[sel & sent]),
            }

    releases: dict[str, int] = {}
    for idx, count in zip(*np.unique(m.release[ok], return_counts=True), strict=True):
        if m.releases[int(idx)]:
            releases[m.releases[int(idx)]] = int(count)

    degraded_share = _degraded_share(m, rec_ok) or 0.0  # no answers: nothing degraded
    passed, reason = slo_verdict(scenario.slo, latency, error_share, degraded_share)
    return {
        "target_rate": nominal,
        "duration_s": total,
        "warmup_s": warmup,
        "window_s": window,
        "requests": {
            "scheduled": scheduled,
            "sent": int(sent.sum()),
            "ok": int(ok.sum()),
            "errors": int(errors.sum()),
            "dropped": int(dropped.sum()),
        },
        "offered_rate": scheduled / window,
        "send_rate": sent_in_window / window,
        # Throughput: OK answers that arrived within the window (whenever they were sent).
        "achieved_rate": int(((done >= warmup) & (done < total) & (m.status == ok_code)).sum())
        / window,
        "latency_ms": latency,
        "latency_ok_ms": hdr_summary(m.latency[ok]),
        # Diagnostic: from the actual send; the gap to latency_ms is the generator's lag.
        "latency_from_send_ms": hdr_summary(m.latency[sent] - m.send_lag[sent]),
        "by_kind": by_kind,
        "by_deadline": by_deadline(m, meas),
        "errors": err_counts,
        "error_share": error_share,
        "degraded_share": degraded_share,
        "degraded_reasons": m.reasons,
        "cold_start_share": float((m.cold & meas).sum() / max(1, (meas & (m.kind == 0)).sum())),
        "releases": releases,
        "slo": {**scenario.slo.model_dump(), "passed": passed, "reason": reason},
        "self_check": self_check(m, warmup, total, scheduled / window if window else 0.0),
        "timeseries": timeseries(m, total, warmup, phases),
        "action_windows": action_windows(m, actions or []),
    }


def self_check(m: Merged, warmup: float, total: float, offered: float) -> dict[str, Any]:
    """Is the generator keeping its schedule? Warnings name what to change."""
    meas = m.intended >= warmup
    send_lag = _lag_summary(m.send_lag[meas])
    loop_lag = _lag_summary(m.loop_lag[m.loop_lag_t >= warmup])
    cpu = max((r.cpu_s / r.wall_s if r.wall_s > 0 else 0.0) for r in m.results)
    actual_send = m.intended + np.nan_to_num(m.send_lag, nan=np.inf)
    window = total - warmup
    attempted = int((meas & ~np.isnan(m.send_lag)).sum()) + int(
        (meas & (m.status == m.codes.index(DROPPED))).sum()
    )
    on_time_rate = (
        int(((actual_send >= warmup) & (actual_send < total)).sum())
        + int((meas & (m.status == m.codes.index(DROPPED))).sum())
    ) / window
    warnings: list[str] = []
    # Saturated: the generator could not keep up on average (not just noise in the tail
    # from a busy shared machine). A sweep stops at a saturated step.
    saturated = False
    if send_lag["p50"] is not None and send_lag["p50"] > SEND_LAG_WARN_MS / 2:
        saturated = True
        warnings.append(
            f"send lag p50 {send_lag['p50']:.1f} ms > {SEND_LAG_WARN_MS / 2:g} ms: "
            "most requests left late"
        )
    if send_lag["p99"] is not None and send_lag["p99"] > SEND_LAG_WARN_MS:
        warnings.append(
            f"send lag p99 {send_lag['p99']:.1f} ms > {SEND_LAG_WARN_MS:g} ms: requests left "
            "late, so latencies include the generator's own delay"
        )
    if loop_lag["p99"] is not None and loop_lag["p99"] > LOOP_LAG_WARN_MS:
        warnings.append(
            f"event-loop lag p99 {loop_lag['p99']:.1f} ms > {LOOP_LAG_WARN_MS:g} ms: "
            "the generator's loop is overloaded"
        )
    if cpu > CPU_WARN_SHARE:
        saturated = True
        warnings.append(f"a generator process used {cpu:.0%} of a core")
    if offered > 0 and attempted and on_time_rate < SEND_RATE_WARN * offered:
        saturated = True
        warnings.append(f"sent {on_time_rate:.1f}/s within the window for {offered:.1f}/s offered")
    if warnings:
        warnings.append(
            "the generator, not the server, may be the bottleneck: raise load.workers "
            "or lower the rate"
        )
    return {
        "ok": not warnings,
        "saturated": saturated,
        "warnings": warnings,
        "send_lag_ms": send_lag,
        "loop_lag_ms": loop_lag,
        "cpu_share": cpu,
        "workers": len(m.results),
        "event_loop": m.results[0].event_loop if m.results else "asyncio",
        "max_in_flight_seen": max((r.max_in_flight_seen for r in m.results), default=0),
    }


def timeseries(m: Merged, total: float, warmup: float, phases: list[Any]) -> dict[str, Any]:
    """Per-second buckets by intended send time (warm-up included, flagged)."""
    n_b = max(1, int(np.ceil(total)))
    b = np.minimum((m.intended).astype(np.int64), n_b - 1)
    ok_code, drop_code = m.codes.index(OK), m.codes.index(DROPPED)
    ok = m.status == ok_code
    p50: list[float | None] = []
    p99: list[float | None] = []
    mx: list[float | None] = []
    for i in range(n_b):
        lat = m.latency[(b == i) & ~np.isnan(m.latency)]
        if lat.size:
            p50.append(float(np.percentile(lat, 50) * 1e3))
            p99.append(float(np.percentile(lat, 99) * 1e3))
            mx.append(float(lat.max() * 1e3))
        else:
            p50.append(None)
            p99.append(None)
            mx.append(None)

    def count(mask: np.ndarray, at: np.ndarray = b) -> list[int]:
        return np.bincount(at[mask], minlength=n_b)[:n_b].tolist()

    # Answers are counted when they arrive (throughput); everything else by intended time.
    done = m.intended + np.nan_to_num(m.latency, nan=np.inf)
    answered = ok & (done < n_b)
    b_done = np.where(answered, done, 0).astype(np.int64)

    by_release = {name: count(m.release == idx) for idx, name in enumerate(m.releases) if name}
    return {
        "t": list(range(n_b)),
        "target_rate": [rate_at(phases, i + 0.5) for i in range(n_b)],
        "offered": count(np.ones_like(ok)),
        "ok": count(answered, b_done),
        "errors": count(~ok & (m.status != drop_code)),
        "dropped": count(m.status == drop_code),
        "degraded": count(m.degraded),
        "p50_ms": p50,
        "p99_ms": p99,
        "max_ms": mx,
        "releases": by_release,
        "warmup_s": warmup,
    }

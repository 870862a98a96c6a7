"""``recstack release ab-report``: per release (A/B arm), what was served and what users did
with it, joined from the event log (orchestrator/event_log.py), with a significance test.

- requests: served records of the arm; impressions: items in them.
- clicks / purchases are counted per impression (a served item), at most once each:
  an event is attributed to the served list named by its ``request_id`` when the client
  sent one and that list holds the item; otherwise (no id, or a list the log no longer
  holds) to the same user's latest served list within ``window_s`` before the event's
  timestamp that holds the item. Events that match no list are reported as unattributed.
  Views are not counted (a view of a served item is not a choice the list caused).
- CTR = clicked impressions / impressions, conversion = purchased impressions /
  impressions, each with a 95 % Wilson interval.
- B against A: a two-sided two-proportion z-test (pooled) per metric. The verdict is about
  CTR: "B better" / "B worse" at p < alpha, else "no significant difference", and "not
  enough data" while either arm has fewer than ``min_impressions`` impressions.
  Impressions of one list are not independent draws, so the p-value is optimistic when
  lists are long; docs/events.md says more.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from recstack.errors import UserError
from recstack.settings import Settings, get_settings

Z95 = 1.959963984540054
MIN_IMPRESSIONS = 1_000
WINDOW_S = 1_800.0
ALPHA = 0.05
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])", re.ASCII)
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials ((0, 1) when n == 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exactly 0 / 1 at the edges (the formula leaves rounding crumbs there).
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def two_proportion_z(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """(z, two-sided p-value) of H0: p1 == p2, pooled standard error; (0, 1) when the
    test has no information (an empty arm, or no successes or no failures at all)."""
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (k2 / n2 - k1 / n1) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


@dataclass
class ArmStats:
    release: str
    requests: int = 0
    impressions: int = 0
    clicks: int = 0
    purchases: int = 0
    ctr: float = 0.0
    ctr_ci: tuple[float, float] = (0.0, 1.0)
    conversion: float = 0.0
    conversion_ci: tuple[float, float] = (0.0, 1.0)

    def finish(self) -> None:
        n = self.impressions
        self.ctr = self.clicks / n if n else 0.0
        self.conversion = self.purchases / n if n else 0.0
        self.ctr_ci = wilson(self.clicks, n)
        self.conversion_ci = wilson(self.purchases, n)


@dataclass
class Comparison:
    metric: str
    a: float
    b: float
    z: float
    p_value: float
    verdict: str


@dataclass
class AbReport:
    arms: list[ArmStats]
    a: str | None
    b: str | None
    comparisons: list[Comparison] = field(default_factory=list)
    verdict: str = ""
    attributed: dict[str, int] = field(default_factory=dict)  # by request_id / window
    unattributed: int = 0
    window_s: float = WINDOW_S
    min_impressions: int = MIN_IMPRESSIONS

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _verdict(p_a: float, p_b: float, p_value: float, alpha: float) -> str:
    if p_value >= alpha:
        return "no significant difference"
    return "B better" if p_b > p_a else "B worse"


def build_report(
    records: Iterable[dict[str, Any]],
    arms: tuple[str, str] | None = None,
    min_impressions: int = MIN_IMPRESSIONS,
    window_s: float = WINDOW_S,
    alpha: float = ALPHA,
) -> AbReport:
    """The report from event-log records (served and event, any order). ``arms``: (A, B);
    default the two releases with the most impressions, A the larger (the control)."""
    if min_impressions < 1:
        raise UserError("min_impressions must be at least 1")
    if window_s < 0:
        raise UserError("the attribution window must be >= 0 seconds")
    served: dict[str, tuple[str, int, int, frozenset[int]]] = {}  # id -> release,user,at,items
    by_user: dict[int, list[tuple[int, str]]] = defaultdict(list)
    events: list[dict[str, Any]] = []
    stats: dict[str, ArmStats] = {}
    for rec in records:
        if rec["kind"] == "served":
            items = frozenset(int(i[0]) for i in rec["items"])
            rid, release = str(rec["request_id"]), str(rec["release"])
            served[rid] = (release, int(rec["user_id"]), int(rec["at_us"]), items)
            by_user[int(rec["user_id"])].append((int(rec["at_us"]), rid))
            arm = stats.setdefault(release, ArmStats(release))
            arm.requests += 1
            arm.impressions += len(items)
        elif rec["kind"] == "event" and rec["event"] in ("click", "purchase"):
            events.append(rec)
    for lists in by_user.values():
        lists.sort()
    window_us = int(window_s * 1e6)
    seen: set[tuple[str, int, str]] = set()
    attributed = {"request_id": 0, "window": 0}
    unattributed = 0
    for e in events:
        item, user, when = int(e["item_id"]), int(e["user_id"]), int(e["ts_us"])
        rid, how = str(e.get("request_id") or ""), "request_id"
        hit = served.get(rid) if rid else None
        if hit is None or item not in hit[3] or hit[1] != user:
            rid, how = "", "window"
            for at, cand in reversed(by_user.get(user, [])):
                if at > when:
                    continue
                if when - at > window_us:
                    break
                if item in served[cand][3]:
                    rid = cand
                    break
        if not rid:
            unattributed += 1
            continue
        key = (rid, item, str(e["event"]))
        if key in seen:  # one click / purchase per impression
            continue
        seen.add(key)
        attributed[how] += 1
        arm = stats[served[rid][0]]
        if e["event"] == "click":
            arm.clicks += 1
        else:
            arm.purchases += 1
    for arm in stats.values():
        arm.finish()
    ordered = sorted(stats.values(), key=lambda s: (-s.impressions, s.release))
    a: str | None
    b: str | None
    if arms is not None:
        missing = [r for r in arms if r not in stats]
        for r in missing:
            stats[r] = ArmStats(r)
            ordered.append(stats[r])
        a, b = arms
    elif len(ordered) >= 2:
        a, b = ordered[0].release, ordered[1].release
    else:
        a = ordered[0].release if ordered else None
        b = None
    report = AbReport(
        ordered,
        a,
        b,
        attributed=attributed,
        unattributed=unattributed,
        window_s=window_s,
        min_impressions=min_impressions,
    )
    if a is None or b is None:
        report.verdict = "not enough data (fewer than two arms in the log)"
        return report
    sa, sb = stats[a], stats[b]
    for metric, ka, kb in (
        ("ctr", sa.clicks, sb.clicks),
        ("conversion", sa.purchases, sb.purchases),
    ):
        z, p = two_proportion_z(ka, sa.impressions, kb, sb.impressions)
        pa = ka / sa.impressions if sa.impressions else 0.0
        pb = kb / sb.impressions if sb.impressions else 0.0
        report.comparisons.append(Comparison(metric, pa, pb, z, p, _verdict(pa, pb, p, alpha)))
    if min(sa.impressions, sb.impressions) < min_impressions:
        report.verdict = f"not enough data (fewer than {min_impressions} impressions per arm)"
        for c in report.comparisons:
            c.verdict = report.verdict
    else:
        report.verdict = report.comparisons[0].verdict
    return report


def parse_since(raw: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO-8601 time (naive = UTC) or a duration back from now (30m, 24h,
    7d)."""
    now = now or datetime.now(UTC)
    m = _DURATION.fullmatch(raw.strip())
    if m:
        return now - timedelta(seconds=float(m.group(1)) * _UNIT_S[m.group(2)])
    try:
        when = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise UserError(
            f"--since {raw!r}: expected ISO-8601 (2026-11-30T12:00) or a duration (30m, 24h, 7d)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def report_from_log(
    settings: Settings,
    since: datetime | None = None,
    arms: tuple[str, str] | None = None,
    min_impressions: int = MIN_IMPRESSIONS,
    window_s: float = WINDOW_S,
) -> AbReport:
    """The report over the log in ``settings.events_dir`` (records made since ``since``)."""
    from orchestrator.event_log import read_records

    folder = settings.events_dir
    if not folder.is_dir():
        raise UserError(
            f"no event log in {folder} (RECSTACK_EVENTS_DIR; is RECSTACK_EVENT_LOG on?)"
        )
    since_us = None if since is None else int(since.timestamp() * 1_000_000)
    return build_report(read_records(folder, since_us), arms, min_impressions, window_s)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def format_report(r: AbReport) -> str:
    lines = [
        f"{'release':>10} {'requests':>9} {'impressions':>12} {'clicks':>7} {'CTR (95% CI)':>26}"
        f" {'purchases':>9} {'conversion (95% CI)':>26}",
    ]
    for s in r.arms:
        tag = " (A)" if s.release == r.a else " (B)" if s.release == r.b else ""
        ctr = f"{_pct(s.ctr)} [{_pct(s.ctr_ci[0])}, {_pct(s.ctr_ci[1])}]"
        conv = f"{_pct(s.conversion)} [{_pct(s.conversion_ci[0])}, {_pct(s.conversion_ci[1])}]"
        lines.append(
            f"{s.release + tag:>10} {s.requests:>9,} {s.impressions:>12,} {s.clicks:>7,}"
            f" {ctr:>26} {s.purchases:>9,} {conv:>26}"
        )
    for c in r.comparisons:
        lines.append(
            f"{c.metric}: A {_pct(c.a)} vs B {_pct(c.b)}, z = {c.z:+.2f}, p = {c.p_value:.3g}"
            f" -> {c.verdict}"
        )
    lines.append(
        f"attributed: {r.attributed.get('request_id', 0):,} by request_id,"
        f" {r.attributed.get('window', 0):,} by the user's latest list within"
        f" {r.window_s / 60:g} min; unattributed: {r.unattributed:,}"
    )
    lines.append(f"verdict: {r.verdict}")
    return "\n".join(lines)


def cli(args: argparse.Namespace) -> int:
    """``recstack release ab-report [--since S] [--arms A B] [--json]``."""
    settings = get_settings()
    since = parse_since(args.since) if args.since else None
    if args.min_impressions is not None and args.min_impressions < 1:
        raise UserError("--min-impressions must be at least 1")
    if args.window_minutes is not None and args.window_minutes < 0:
        raise UserError("--window-minutes must be >= 0")
    report = report_from_log(
        settings,
        since,
        tuple(args.arms) if args.arms else None,  # type: ignore[arg-type]
        args.min_impressions or MIN_IMPRESSIONS,
        WINDOW_S if args.window_minutes is None else args.window_minutes * 60,
    )
    print(json.dumps(report.as_dict(), indent=2) if args.json else format_report(report))
    return 0

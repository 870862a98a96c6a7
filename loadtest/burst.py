"""A burst of concurrent Recommend calls, all sent at once from one client: how long the
last answer takes (docs/faults.md, "Short deadlines and bursts"). Open-loop load
(``recstack loadtest run``) spreads calls over time; a burst asks what a queue of N calls
arriving together costs, which is where the orchestrator's front is the limit.

``python -m loadtest.burst --address HOST:PORT --users-from DATA_DIR`` (default 500 calls,
1 s deadline, 3 bursts 2 s apart); prints one line per burst and, with ``--json``, the
summaries as JSON. Latency is measured at the client from each call's send."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc
import numpy as np

from orchestrator import recommender_pb2 as pb
from orchestrator import recommender_pb2_grpc as pb_grpc


@dataclass(frozen=True)
class BurstSummary:
    """One burst: counts by outcome and the client-side latency of the answered calls."""

    calls: int
    errors: dict[str, int]  # gRPC code name -> count
    degraded: int  # OK answers with a degraded flag
    reasons: dict[str, int]  # degraded flag -> count
    send_ms: float  # from the first call's send to the last's
    p50_ms: float
    p99_ms: float
    max_ms: float
    over_ms: dict[str, int]  # "300": answered calls slower than 300 ms


def summarize(
    outcomes: list[tuple[str, tuple[str, ...], float]], send_ms: float, marks: tuple[int, ...]
) -> BurstSummary:
    """``outcomes``: (code, degraded flags, latency s) per call."""
    ok = [(flags, s) for code, flags, s in outcomes if code == "OK"]
    ms = np.array([s * 1000 for _, s in ok] or [float("nan")])
    return BurstSummary(
        calls=len(outcomes),
        errors=dict(Counter(code for code, _, _ in outcomes if code != "OK")),
        degraded=sum(1 for flags, _ in ok if flags),
        reasons=dict(Counter(f for flags, _ in ok for f in flags).most_common()),
        send_ms=round(send_ms, 1),
        p50_ms=round(float(np.percentile(ms, 50)), 1),
        p99_ms=round(float(np.percentile(ms, 99)), 1),
        max_ms=round(float(ms.max()), 1),
        over_ms={str(m): int((ms > m).sum()) for m in marks},
    )


async def burst(
    address: str, users: list[str], calls: int, deadline_s: float, marks: tuple[int, ...]
) -> BurstSummary:
    """``calls`` Recommend calls (users in turn) started together on one channel."""
    async with grpc.aio.insecure_channel(address) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=10)
        stub = pb_grpc.RecommenderStub(channel)

        async def one(i: int) -> tuple[str, tuple[str, ...], float]:
            request = pb.RecommendRequest(user_id=users[i % len(users)], k=10)
            t0 = time.perf_counter()
            try:
                reply = await stub.Recommend(request, timeout=deadline_s)
            except grpc.aio.AioRpcError as e:
                return e.code().name, (), time.perf_counter() - t0
            return "OK", tuple(reply.degraded), time.perf_counter() - t0

        t0 = time.perf_counter()
        tasks = []
        for i in range(calls):
            tasks.append(asyncio.ensure_future(one(i)))
            if i % 50 == 49:
                await asyncio.sleep(0)  # let the started calls go out, as a client would
        send_ms = (time.perf_counter() - t0) * 1000
        return summarize(list(await asyncio.gather(*tasks)), send_ms, marks)


def active_users(data_dir: Path, n: int = 400) -> list[str]:
    """The ``n`` users with the most clicks and purchases in ``data_dir``'s raw data."""
    from exporters.raw_tables import read_table

    inter = read_table(data_dir / "raw", "interactions")
    pos = inter[inter["event"].isin(["click", "purchase"])]
    return [str(int(u)) for u in pos["user_id"].value_counts().index[:n]]


def main(argv: list[str] | None = None) -> int:
    """Run the bursts and print them."""
    p = argparse.ArgumentParser(prog="python -m loadtest.burst", description=__doc__)
    p.add_argument("--address", required=True, help="the orchestrator's gRPC host:port")
    p.add_argument("--users-from", type=Path, required=True, help="a data dir (raw/ inside)")
    p.add_argument("--calls", type=int, default=500)
    p.add_argument("--deadline", type=float, default=1.0, help="seconds per call")
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--pause", type=float, default=2.0, help="seconds between bursts")
    p.add_argument("--mark", type=int, action="append", help="count answers slower (ms)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.calls < 1 or args.bursts < 1 or args.deadline <= 0 or args.pause < 0:
        p.error("--calls and --bursts must be >= 1, --deadline > 0, --pause >= 0")
    if not (args.users_from / "raw" / "meta.json").is_file():
        p.error(f"no raw data (raw/meta.json) in {args.users_from}")
    users = active_users(args.users_from)
    marks = tuple(args.mark or (300, 500))
    out = []
    for n in range(args.bursts):
        if n:
            time.sleep(args.pause)
        s = asyncio.run(burst(args.address, users, args.calls, args.deadline, marks))
        out.append(s)
        print(
            f"burst {n + 1}: {s.calls} calls sent in {s.send_ms:.0f} ms; errors {s.errors or 0}; "
            f"degraded {s.degraded}; p50/p99/max {s.p50_ms:.0f}/{s.p99_ms:.0f}/{s.max_ms:.0f} "
            f"ms; slower than {s.over_ms}; {s.reasons}",
            flush=True,
        )
    if args.json:
        print(json.dumps([asdict(s) for s in out]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

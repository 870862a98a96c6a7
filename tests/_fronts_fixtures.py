"""The orchestrator's gRPC and HTTP fronts, in-process, in front of a small fake service:
the real servicer, HTTP app, runner limits and error mapping, on loopback ports, served by
an event loop of their own in a background thread (so tests call them with ordinary
blocking clients, as the e2e tests do)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from orchestrator import server as srv
from orchestrator.breaker import Breakers
from orchestrator.request import EventQuery, RecommendQuery
from orchestrator.service import RecItem, RecommendResult
from recstack.settings import Settings


@dataclass
class FakeService:
    """What the fronts use of RecommendService; ``fail`` makes the next calls raise."""

    release_name: str = "test-release"
    fail: BaseException | None = None
    queries: list[Any] = field(default_factory=list)
    deadlines: list[float | None] = field(default_factory=list)  # as each call passed it
    breakers: Breakers = field(default_factory=Breakers)

    def dependencies(self) -> dict[str, dict[str, Any]]:
        return self.breakers.snapshot()

    async def recommend(self, q: RecommendQuery, deadline_s: float | None) -> RecommendResult:
        self.queries.append(q)
        self.deadlines.append(deadline_s)
        if self.fail is not None:
            raise self.fail
        items = [RecItem(i, 1.0 / (i + 1), i + 1, "popular", "popular") for i in range(q.k)]
        return RecommendResult(items=items, release=self.release_name)

    async def record_event(self, e: EventQuery, deadline_s: float | None) -> None:
        self.queries.append(e)
        self.deadlines.append(deadline_s)
        if self.fail is not None:
            raise self.fail

    def health_detail(self) -> dict[str, Any]:
        return {"online_store": {"release_users": None, "checked": False}}

    def releases(self) -> dict[str, Any]:
        return {"live": self.release_name}


@dataclass
class Fronts:
    service: FakeService
    settings: Settings
    drain: srv.Drain
    grpc_port: int
    http_port: int

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


@contextmanager
def running_fronts(settings: Settings | None = None) -> Iterator[Fronts]:
    """Start both fronts (ports chosen by the OS) and stop them afterwards."""
    settings = settings or Settings()
    service = FakeService()
    drain = srv.Drain()
    loop = asyncio.new_event_loop()
    started: dict[str, Any] = {}
    stop = asyncio.Event()

    async def main() -> None:
        server, grpc_port = await srv.create_server(service, "127.0.0.1:0", settings)  # type: ignore[arg-type]
        runner = srv.http_runner(service, settings, drain)  # type: ignore[arg-type]
        await runner.setup()
        from aiohttp import web

        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        http_port = runner.addresses[0][1]
        started["ports"] = (grpc_port, http_port)
        ready.set()
        await stop.wait()
        await server.stop(grace=None)
        await runner.cleanup()

    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(main())
        except BaseException as e:  # surfaced to the test below
            started["error"] = e
            ready.set()
        finally:  # connection handlers still open: cancel them before the loop closes
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    thread = threading.Thread(target=run, name="fronts", daemon=True)
    thread.start()
    ready.wait(30)
    if "error" in started or "ports" not in started:
        raise RuntimeError(f"fronts did not start: {started.get('error')!r}")
    grpc_port, http_port = started["ports"]
    try:
        yield Fronts(service, settings, drain, grpc_port, http_port)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()

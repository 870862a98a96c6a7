"""A stand-in ``recstack.v1.Recommender`` (gRPC, plus the HTTP/JSON front) with a known
service time and capacity. It calibrates the generator (how fast can one process send?)
and is the server in the generator's own tests; it is not a mock of the orchestrator in
any end-to-end test.

``delay_ms`` is the service time of one request; ``concurrency`` > 0 limits how many are
served at once (1 = serialised), so capacity = concurrency / delay."""

from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StubConfig:
    """Behaviour of the stand-in server."""

    delay_ms: float = 0.0
    concurrency: int = 0
    degraded_every: int = 0  # every n-th Recommend answer is flagged degraded (0 = never)
    fail_every: int = 0  # every n-th Recommend fails with UNAVAILABLE / HTTP 503 (0 = never)
    release: str = "stub-1"


class StubServer:
    """Runs the stub on its own thread and event loop; ``start`` returns once it listens.
    Port 0 picks a free port (read ``grpc_port`` / ``http_port`` afterwards)."""

    def __init__(
        self, config: StubConfig, grpc_port: int = 0, http_port: int | None = None
    ) -> None:
        self.config = config
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.served = 0
        self.events = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._sem: asyncio.Semaphore | None = None
        self._pool = ThreadPoolExecutor(max_workers=256, thread_name_prefix="stub-delay")

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> StubServer:
        """Start serving; raises if the ports cannot be bound."""
        self._thread = threading.Thread(target=self._main, name="stub-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # surfaced to start()
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def handle(self) -> None:
        """The service time, under the concurrency limit."""
        if self._sem is not None:
            async with self._sem:
                await self._sleep()
        elif self.config.delay_ms > 0:
            await self._sleep()

    async def _sleep(self) -> None:
        # time.sleep on a thread is exact to ~0.1 ms; asyncio timers round up to whole
        # milliseconds, which would blur the known delay the tests compare against.
        if self.config.delay_ms > 0:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pool, time.sleep, self.config.delay_ms / 1e3)

    def next_answer(self) -> tuple[bool, list[str]]:
        """(fail?, degraded flags) for the next Recommend answer."""
        self.served += 1
        c = self.config
        fail = bool(c.fail_every and self.served % c.fail_every == 0)
        return fail, [
            "ranking_skipped"
        ] if c.degraded_every and self.served % c.degraded_every == 0 else []

    async def _serve(self) -> None:
        import grpc
        from grpc_health.v1 import _async as health_async
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from orchestrator import recommender_pb2 as pb
        from orchestrator import recommender_pb2_grpc as pb_grpc

        self._stop = asyncio.Event()
        c = self.config
        self._sem = asyncio.Semaphore(c.concurrency) if c.concurrency > 0 else None
        stub = self

        class Servicer(pb_grpc.RecommenderServicer):
            async def Recommend(self, request: Any, context: Any) -> Any:
                if request.k < 1 or request.k > 200:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "k must be 1..200")
                await stub.handle()
                fail, degraded = stub.next_answer()
                if fail:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "injected failure")
                items = [pb.Item(item_id=i, score=1.0 / (i + 1), rank=i + 1) for i in range(3)]
                return pb.RecommendResponse(items=items, release=c.release, degraded=degraded)

            async def RecordEvent(self, request: Any, context: Any) -> Any:
                await stub.handle()
                stub.events += 1
                return pb.RecordEventResponse(accepted=True)

        server = grpc.aio.server()
        pb_grpc.add_RecommenderServicer_to_server(Servicer(), server)
        health = health_async.HealthServicer()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        self.grpc_port = server.add_insecure_port(f"127.0.0.1:{self.grpc_port}")
        await server.start()
        runner = await self._start_http() if self.http_port is not None else None
        self._ready.set()
        await self._stop.wait()
        await server.stop(1)
        if runner is not None:
            await runner.cleanup()

    async def _start_http(self) -> Any:
        from aiohttp import web

        c = self.config

        async def recommend(request: web.Request) -> web.Response:
            try:
                k = int(request.query.get("k", "10"))
            except ValueError:
                k = 0
            if not request.query.get("user_id") or not 1 <= k <= 200:
                return web.json_response({"error": "bad user_id or k"}, status=400)
            await self.handle()
            fail, degraded = self.next_answer()
            if fail:
                return web.json_response({"error": "injected failure"}, status=503)
            return web.json_response({"items": [], "release": c.release, "degraded": degraded})

        async def event(request: web.Request) -> web.Response:
            await request.json()
            await self.handle()
            self.events += 1
            return web.json_response({"accepted": True})

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"status": "SERVING"})

        app = web.Application()
        app.router.add_get("/v1/recommendations", recommend)
        app.router.add_post("/v1/events", event)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.http_port)
        await site.start()
        self.http_port = runner.addresses[0][1]
        return runner


def cli(args: argparse.Namespace) -> int:
    """``recstack loadtest stub-server``: serve until Ctrl-C."""
    cfg = StubConfig(delay_ms=args.delay_ms, concurrency=args.concurrency)
    server = StubServer(cfg, grpc_port=args.grpc_port, http_port=args.http_port).start()
    print(
        f"stub Recommender: gRPC 127.0.0.1:{server.grpc_port}, HTTP 127.0.0.1:{server.http_port}"
        f" (delay {cfg.delay_ms:g} ms, concurrency {cfg.concurrency or 'unlimited'})",
        flush=True,
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0

"""``recstack serve orchestrator``: the Recommender over gRPC (with standard health checking
and reflection), an HTTP/JSON front for clients that do not speak gRPC, and Prometheus
metrics. All three share one asyncio loop and one :class:`RecommendService`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from exporters.item_delta import MAX_ITEMS_PER_CALL, items_from_json, parse_ids
from orchestrator import metrics
from orchestrator import recommender_pb2 as pb
from orchestrator import recommender_pb2_grpc as pb_grpc
from orchestrator.request import (
    ID_MAX_DIGITS,
    MAX_CATEGORIES,
    MAX_EVENT_BODY_BYTES,
    MAX_EXCLUDE_ITEMS,
    EventWindow,
    InvalidRequest,
    PayloadTooLarge,
    deadline_from_headers,
    event_from_grpc,
    event_from_http,
    from_grpc,
    from_http,
    parse_json_body,
)
from orchestrator.service import (
    RecommendResult,
    RecommendService,
    ServiceUnavailable,
    UnknownItem,
)
from orchestrator.triton_client import TritonError
from recstack.errors import UserError
from recstack.settings import Settings, get_settings

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name


def to_proto(result: RecommendResult) -> pb.RecommendResponse:
    """The typed result as the .proto's response message."""
    response = pb.RecommendResponse(
        release=result.release,
        degraded=result.degraded,
        cold_start=result.cold_start,
        request_id=result.request_id,
        fallback_segment=result.fallback_segment,
    )
    # add() builds each item in place: ~25 % cheaper than Item(...) objects copied in.
    add_item = response.items.add
    for i in result.items:
        add_item(**i.served())
    add_timing = response.timings.add
    for s, ms in result.timings.items():
        add_timing(stage=s, ms=ms)
    return response


def to_json(result: RecommendResult) -> dict[str, Any]:
    """The same response for the HTTP front (field names from the .proto)."""
    return {
        "items": [{**i.served(), "score": round(i.score, 6)} for i in result.items],
        "release": result.release,
        "timings": [{"stage": s, "ms": round(ms, 3)} for s, ms in result.timings.items()],
        "degraded": result.degraded,
        "cold_start": result.cold_start,
        "request_id": result.request_id,
        "fallback_segment": result.fallback_segment,
    }


_in_flight = [0]  # calls being handled right now (for the drain on shutdown)
# When a call last started or ended (perf_counter): the drain's idle test reads this, not
# _in_flight alone, since a poll every 20 ms misses most calls of a few ms each.
_last_call = [0.0]


@contextlib.asynccontextmanager
async def _observed(method: str) -> AsyncIterator[list[str]]:
    """Count the call by status code and time it; the handler sets code[0]."""
    code = ["OK"]
    t0 = _last_call[0] = time.perf_counter()
    _in_flight[0] += 1
    try:
        yield code
    except asyncio.CancelledError:
        code[0] = "CANCELLED"  # the client went away or its deadline passed
        raise
    except BaseException:
        if code[0] == "OK":
            code[0] = "INTERNAL"
        raise
    finally:
        _in_flight[0] -= 1
        _last_call[0] = t1 = time.perf_counter()
        metrics.REQUEST_SECONDS.labels(method).observe(t1 - t0)
        metrics.REQUESTS.labels(method, code[0]).inc()


class Drain:
    """Set at the start of a drain (SIGTERM): both health endpoints then say NOT_SERVING,
    so load balancers stop sending before the listeners close."""

    def __init__(self) -> None:
        self.started = False


class BodyTimeout(Exception):
    """An HTTP request body that did not arrive in time (408)."""


def _status_of(method: str, err: Exception) -> tuple[grpc.StatusCode, int, str]:
    """The one mapping of failures to (gRPC code, HTTP status, message) for both fronts.
    Anything unexpected is INTERNAL with a generic message and one log line: no traceback
    reaches the client, and none floods the log."""
    if isinstance(err, PayloadTooLarge):
        return grpc.StatusCode.INVALID_ARGUMENT, 413, str(err)
    if isinstance(err, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, 400, str(err)
    if isinstance(err, UnknownItem):
        return grpc.StatusCode.NOT_FOUND, 404, str(err)
    if isinstance(err, ServiceUnavailable):
        return grpc.StatusCode.UNAVAILABLE, 503, str(err)
    if isinstance(err, BodyTimeout):
        return grpc.StatusCode.DEADLINE_EXCEEDED, 408, str(err)
    log.error(
        "%s failed: %s: %s",
        method,
        type(err).__name__,
        str(err)[:200],
        exc_info=log.isEnabledFor(logging.DEBUG),  # the traceback only when asked for
    )
    return grpc.StatusCode.INTERNAL, 500, "internal error"


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not a valid message of its type (corrupt wire format,
    invalid UTF-8 in a string): answered INVALID_ARGUMENT by the handler."""

    error: str


def _lenient(message: Any) -> Callable[[bytes], Any]:
    """A request deserializer that cannot raise: gRPC would answer UNKNOWN with the
    parser's exception text."""

    def decode(raw: bytes) -> Any:
        try:
            return message.FromString(raw)
        except DecodeError as e:
            return Undecodable(str(e))

    return decode


def add_recommender(servicer: RecommenderServicer, server: grpc.aio.Server) -> None:
    """The generated ``add_RecommenderServicer_to_server``, built from the same descriptor,
    with :func:`_lenient` request decoding."""
    service = pb.DESCRIPTOR.services_by_name["Recommender"]
    handlers = {
        m.name: grpc.unary_unary_rpc_method_handler(
            getattr(servicer, m.name),
            request_deserializer=_lenient(getattr(pb, m.input_type.name)),
            response_serializer=getattr(pb, m.output_type.name).SerializeToString,
        )
        for m in service.methods
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


class RecommenderServicer(pb_grpc.RecommenderServicer):
    """gRPC handlers: validate, call the service, map failures to status codes."""

    def __init__(self, service: RecommendService, settings: Settings) -> None:
        self.service = service
        self.window = EventWindow.from_settings(settings)
        self.retry_after = str(settings.event_retry_after_s)

    async def _handle(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        parse: Callable[[Any], Any],
        call: Callable[[Any], Awaitable[Any]],
    ) -> Any:
        """Validate, call, and map failures to status codes (never UNKNOWN, never a
        traceback)."""
        async with _observed(method) as code:
            try:
                if isinstance(request, Undecodable):
                    raise InvalidRequest(f"the request is not a valid message: {request.error}")
                return await call(parse(request))
            except Exception as e:
                status, _, message = _status_of(method, e)
            code[0] = status.name
            trailers: tuple[tuple[str, str], ...] = ()
            if status == grpc.StatusCode.UNAVAILABLE:
                trailers = (("retry-after", self.retry_after),)
            await context.abort(status, message, trailing_metadata=trailers)

    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        async def call(query: Any) -> pb.RecommendResponse:
            return to_proto(await self.service.recommend(query, context.time_remaining()))

        reply: pb.RecommendResponse = await self._handle(
            "Recommend", request, context, lambda r: from_grpc(r), call
        )
        return reply

    async def RecordEvent(
        self, request: pb.RecordEventRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordEventResponse:
        async def call(event: Any) -> pb.RecordEventResponse:
            await self.service.record_event(event, context.time_remaining())
            return pb.RecordEventResponse(accepted=True)

        reply: pb.RecordEventResponse = await self._handle(
            "RecordEvent", request, context, lambda r: event_from_grpc(r, self.window), call
        )
        return reply


def _json_errors(admin: bool) -> Any:
    """The HTTP fronts' middleware: every error is a JSON body, never aiohttp's plain
    text. Unexpected failures: the public front maps them like gRPC does
    (:func:`_status_of`: a generic message, one log line); the admin port, reached only by
    operators, answers with the exception and logs its traceback."""

    @web.middleware
    async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            response: web.StreamResponse = await handler(request)
            return response
        except web.HTTPException as e:  # 404/405/413 as JSON too
            return _error(e.status, e.reason.upper().replace(" ", "_"), e.text or e.reason)
        except Exception as e:
            if admin:
                log.exception("admin %s %s failed", request.method, request.path)
                return _error(500, "INTERNAL", f"{type(e).__name__}: {e}")
            _, http_status, message = _status_of(f"http {request.method} {request.path}", e)
            return _error(http_status, "INTERNAL", message)

    return json_errors


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"code": code, "message": message}}, status=status, headers=headers
    )


async def _read_body(request: web.Request, limit: int, timeout_s: float) -> bytes:
    """The request body, refused early when it is (or says it is) larger than ``limit``
    and cut off when it does not arrive within ``timeout_s`` (a slow sender would
    otherwise hold a handler as long as it likes)."""
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.read(limit + 1 - size):
                chunks.append(chunk)
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body is larger than {limit} bytes")
    except TimeoutError:
        raise BodyTimeout(f"the request body did not arrive within {timeout_s:g} s") from None
    return b"".join(chunks)


def http_app(
    service: RecommendService, settings: Settings | None = None, drain: Drain | None = None
) -> web.Application:
    """The HTTP/JSON front: same validation, same service, JSON errors (never a traceback).
    ``drain``, once started, turns ``/healthz`` into 503 NOT_SERVING."""
    settings = settings or get_settings()
    drain = drain or Drain()
    window = EventWindow.from_settings(settings)
    retry_after = {"Retry-After": str(settings.event_retry_after_s)}

    async def handle(
        method: str,
        parse: Callable[[], Awaitable[Any]],
        call: Callable[[Any], Awaitable[web.Response]],
    ) -> web.Response:
        async with _observed(method) as code:
            try:
                return await call(await parse())
            except Exception as e:
                status, http_status, message = _status_of(method, e)
            code[0] = status.name
            response = _error(
                http_status,
                status.name,
                message,
                retry_after if status == grpc.StatusCode.UNAVAILABLE else None,
            )
            if http_status in (408, 413):
                response.force_close()  # the rest of the body is not read
            return response

    async def recommendations(request: web.Request) -> web.Response:
        async def parse() -> Any:
            return from_http(request.query.items()), deadline_from_headers(request.headers)

        async def call(parsed: Any) -> web.Response:
            q, deadline = parsed
            return web.json_response(to_json(await service.recommend(q, deadline)))

        return await handle("http.Recommend", parse, call)

    async def events(request: web.Request) -> web.Response:
        async def parse() -> Any:
            if request.query:
                raise InvalidRequest(f"unknown query parameter {next(iter(request.query))!r}")
            deadline, t0 = deadline_from_headers(request.headers), time.perf_counter()
            raw = await _read_body(request, MAX_EVENT_BODY_BYTES, settings.http_body_timeout_s)
            if deadline is not None:  # the body's time counts against it
                deadline -= time.perf_counter() - t0
            return event_from_http(parse_json_body(raw), window), deadline

        async def call(parsed: Any) -> web.Response:
            e, deadline = parsed
            await service.record_event(e, deadline)
            return web.json_response({"accepted": True})

        return await handle("http.RecordEvent", parse, call)

    async def health(request: web.Request) -> web.Response:
        """SERVING while answers are possible, degraded ones included: ``dependencies``
        says which circuit breakers are open (those requests degrade at once)."""
        body = {
            "status": "NOT_SERVING" if drain.started else "SERVING",
            "release": service.release_name,
            "releases": service.releases(),
            "detail": service.health_detail(),
            "dependencies": service.dependencies(),
        }
        return web.json_response(body, status=503 if drain.started else 200)

    app = web.Application(
        middlewares=[_json_errors(admin=False)], client_max_size=settings.request_max_bytes
    )
    app.router.add_get("/v1/recommendations", recommendations)
    app.router.add_post("/v1/events", events)
    app.router.add_get("/healthz", health)
    return app


def admin_app(service: RecommendService) -> web.Application:
    """The admin API (its own port, loopback by default; never the public one):
    ``GET /admin/releases`` — what serves (revision, arms, loaded releases, requests in
    flight per release, the last change and its outcome); ``POST /admin/reload`` — apply
    the release state now and answer with the same document once the change is done or
    refused (the `recstack release` commands call it; the state file is watched anyway).

    Items added between releases (exporters/item_delta.py, docs/data.md "New items"):
    ``POST /admin/items`` ``{"items": [{"item_id": .., "category": .., ...}]}`` — checked
    like an imported item file, embedded by each served release's item tower, persisted,
    applied before the answer; ``POST /admin/items/unavailable`` and
    ``/admin/items/available`` ``{"item_ids": [..]}`` — out of stock and back (ids or
    the catalog's keys);
    ``POST /admin/items/reload`` — apply segments other writers left (`recstack items`
    calls it); ``POST /admin/items/probe`` ``{"item_ids": [..]}`` — which of them each
    served release's retrieval finds for their own vectors (`recstack bench items`).
    Bad input answers 400 with a JSON error naming the row and column."""

    async def releases(request: web.Request) -> web.Response:
        return web.json_response(service.releases())

    async def reload(request: web.Request) -> web.Response:
        await service.sync_releases()
        return web.json_response(service.releases())

    async def body(request: web.Request, key: str) -> Any:
        try:
            doc = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"request body is not JSON: {e}") from None
        if not isinstance(doc, dict) or set(doc) != {key}:
            raise UserError(f"request body must be a JSON object with exactly {key!r}")
        return doc[key]

    async def admin_call(request: web.Request, work: Callable[[], Awaitable[Any]]) -> web.Response:
        try:
            return web.json_response(await work())
        except UserError as e:
            return _error(400, "INVALID_ARGUMENT", str(e))
        except TritonError as e:  # the item tower could not answer: nothing was written
            return _error(503, "UNAVAILABLE", f"item_tower on Triton: {e}")

    async def add_items(request: web.Request) -> web.Response:
        async def work() -> Any:
            items = items_from_json(await body(request, "items"))
            return await asyncio.to_thread(service.add_items, items)

        return await admin_call(request, work)

    def marker(kind: str) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(request: web.Request) -> web.Response:
            async def work() -> Any:
                given = await body(request, "item_ids")
                ids = parse_ids(given)
                return await asyncio.to_thread(service.mark_items, ids, kind, given)

            return await admin_call(request, work)

        return handler

    async def probe_items(request: web.Request) -> web.Response:
        async def work() -> Any:
            ids = parse_ids(await body(request, "item_ids"))
            return {"retrieved": await asyncio.to_thread(service.probe_items, ids)}

        return await admin_call(request, work)

    async def reload_items(request: web.Request) -> web.Response:
        return web.json_response({"applied": await asyncio.to_thread(service.apply_new_items)})

    # A full batch of new items as JSON (~150 bytes an item) fits.
    app = web.Application(
        middlewares=[_json_errors(admin=True)], client_max_size=MAX_ITEMS_PER_CALL * 256
    )
    app.router.add_get("/admin/releases", releases)
    app.router.add_post("/admin/reload", reload)
    app.router.add_post("/admin/items", add_items)
    app.router.add_post("/admin/items/unavailable", marker("unavailable"))
    app.router.add_post("/admin/items/available", marker("available"))
    app.router.add_post("/admin/items/reload", reload_items)
    app.router.add_post("/admin/items/probe", probe_items)
    return app


# The longest request line a valid GET /v1/recommendations needs: every list at its limit,
# ids of 19 digits, commas percent-encoded, plus room for the other parameters. Longer lines
# are refused by aiohttp's parser (400, text/plain, connection closed).
HTTP_MAX_LINE = (MAX_EXCLUDE_ITEMS + 2 * MAX_CATEGORIES) * (ID_MAX_DIGITS + 3) + 4096


def http_runner(service: RecommendService, settings: Settings, drain: Drain) -> web.AppRunner:
    """The HTTP front as served: :func:`http_app` with the connection limits."""
    return web.AppRunner(
        http_app(service, settings, drain),
        access_log=None,
        # aiohttp closes a connection that has not sent complete request headers this long
        # after it opened (or after the previous response): the header-read timeout, and
        # the idle keep-alive limit. Bodies have their own timeout (_read_body).
        keepalive_timeout=settings.http_header_timeout_s,
        max_line_size=HTTP_MAX_LINE,
    )


async def create_server(
    service: RecommendService, address: str, settings: Settings | None = None
) -> tuple[grpc.aio.Server, int]:
    """The gRPC server with the Recommender, health checking and reflection; returns the bound
    port (tests bind ``127.0.0.1:0``)."""
    settings = settings or get_settings()
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            # Larger messages are refused (RESOURCE_EXHAUSTED) before they are parsed.
            ("grpc.max_receive_message_length", settings.request_max_bytes),
        ]
    )
    add_recommender(RecommenderServicer(service, settings), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"cannot bind gRPC to {address}")
    await server.start()
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    server._recstack_health = health  # type: ignore[attr-defined]  # for graceful shutdown
    return server, port


# After SIGTERM the server reports NOT_SERVING but keeps answering for up to this long, so
# calls already on the wire (and clients that have not seen the health change yet) are
# served instead of cancelled; it stops early once it has been idle for DRAIN_IDLE_SECONDS.
DRAIN_SECONDS = 2.0
DRAIN_IDLE_SECONDS = 0.25


async def _drain(limit: float) -> None:
    """Return after ``limit`` seconds, or once no call has started or ended (and none is in
    flight) for DRAIN_IDLE_SECONDS, counted from the drain's start at the earliest."""
    start = time.perf_counter()
    while (now := time.perf_counter()) < start + limit:
        if not _in_flight[0] and now - max(start, _last_call[0]) >= DRAIN_IDLE_SECONDS:
            return
        await asyncio.sleep(0.02)


async def serve(
    settings: Settings,
    ready: asyncio.Event | None = None,
    make_service: Callable[[Settings], Awaitable[RecommendService]] | None = None,
) -> None:
    """Run until SIGTERM/SIGINT, then drain: health NOT_SERVING, in-flight calls finish.
    ``make_service`` builds the service (default ``RecommendService.create``; the
    benchmark's in-process reference, loadtest/reference.py, passes its own)."""
    service = await (make_service or RecommendService.create)(settings)
    host = settings.orchestrator_host
    server, port = await create_server(
        service, f"{host}:{settings.orchestrator_grpc_port}", settings
    )
    drain = Drain()
    runner = http_runner(service, settings, drain)
    await runner.setup()
    site = web.TCPSite(runner, host, settings.orchestrator_http_port)
    await site.start()
    start_http_server(settings.orchestrator_metrics_port, addr=host)
    admin = web.AppRunner(admin_app(service), access_log=None)
    await admin.setup()
    await web.TCPSite(
        admin, settings.orchestrator_admin_host, settings.orchestrator_admin_port
    ).start()
    # Start-up garbage (Feast, FAISS, the release) is long-lived: freeze it so the collector
    # does not walk it on every request (DESIGN.md: most p99 spikes came from GC).
    gc.collect()
    gc.freeze()
    # Each request allocates a few thousand short-lived objects (protos, arrays, dicts):
    # collect the young generation every 50k allocations instead of 700.
    gc.set_threshold(50_000, 20, 100)
    log.info(
        "orchestrator ready: grpc %s:%d, http %s:%d, metrics %s:%d, release %s",
        host,
        port,
        host,
        settings.orchestrator_http_port,
        host,
        settings.orchestrator_metrics_port,
        service.release_name,
    )
    print(
        f"orchestrator ready on grpc {host}:{port} http {host}:{settings.orchestrator_http_port}",
        flush=True,
    )
    if ready is not None:
        ready.set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("draining")
    drain.started = True  # HTTP /healthz answers 503 from now on
    await server._recstack_health.enter_graceful_shutdown()  # type: ignore[attr-defined]
    await _drain(DRAIN_SECONDS)
    await server.stop(grace=5)
    await runner.cleanup()
    await admin.cleanup()
    await service.close()


def run_loop(main: Coroutine[Any, Any, None], settings: Settings) -> None:
    """Run a server coroutine to its end on the loop ``settings.event_loop`` names (the
    orchestrator and the in-process reference share it, so that they compare fairly)."""
    log.info("event loop: %s", settings.event_loop)
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def cli(args: argparse.Namespace) -> int:
    """``recstack serve orchestrator [--detach]``: one orchestrator, or with
    ``RECSTACK_ORCHESTRATOR_REPLICAS`` > 1 that many behind nginx (orchestrator/replicas.py)."""
    settings = get_settings()
    if settings.orchestrator_replicas > 1:
        from orchestrator.replicas import serve as serve_replicas

        return serve_replicas(settings, args.detach)
    if args.detach:
        from orchestrator.orchestrator_process import start_orchestrator

        proc = start_orchestrator(settings)
        print(f"orchestrator running (pid {proc.pid}); log {proc.log_path}")
        return 0
    from orchestrator.orchestrator_process import orchestrator_ports
    from orchestrator.processes import require_free

    require_free(orchestrator_ports(settings), "the orchestrator")  # before minutes of loading
    run_loop(serve(settings), settings)
    return 0

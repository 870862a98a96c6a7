"""What the generator calls: the orchestrator over gRPC or HTTP/JSON, or a Triton model
directly over KServe v2 gRPC. Each target turns row ``i`` of an :class:`OpPlan` into one
call and returns ``(status, degraded, release)``; ``status`` is ``"OK"`` or an error code
(gRPC code name, ``HTTP_<n>``, ``TIMEOUT``, ``CONNECTION_ERROR``)."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from typing import Any

import numpy as np

from loadtest.scenario import Target as TargetSpec
from loadtest.traffic import EVENT, EVENT_NAMES, OpPlan
from recstack.errors import UserError
from recstack.settings import Settings

log = logging.getLogger(__name__)

Outcome = tuple[str, tuple[str, ...], str]
OK = "OK"
READY_TIMEOUT_S = 10.0


class Target(ABC):
    """One kind of endpoint. ``open`` checks that it is up (UserError if not)."""

    address: str

    @abstractmethod
    async def open(self, plan: OpPlan) -> None:
        """Connect, check readiness, and pre-build what requests need from ``plan``."""

    @abstractmethod
    async def send(self, plan: OpPlan, i: int) -> Outcome:
        """Make call ``i`` of the plan; never raises for server-side failures."""

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


def default_address(spec: TargetSpec, settings: Settings) -> str:
    """``host:port`` from Settings for the target kind, unless the scenario names one."""
    if spec.address:
        return spec.address
    if spec.kind == "grpc":
        return f"{settings.orchestrator_host}:{settings.orchestrator_grpc_port}"
    if spec.kind == "http":
        return f"{settings.orchestrator_host}:{settings.orchestrator_http_port}"
    return f"{settings.triton_host}:{settings.triton_grpc_port}"


def make_target(spec: TargetSpec, settings: Settings) -> Target:
    """The target for a scenario."""
    address = default_address(spec, settings)
    if spec.kind == "grpc":
        return GrpcRecommender(address, spec)
    if spec.kind == "http":
        return HttpRecommender(address, spec)
    return TritonModel(address, spec, settings)


class GrpcRecommender(Target):
    """``recstack.v1.Recommender`` over gRPC (grpc.aio), ``connections`` channels."""

    def __init__(self, address: str, spec: TargetSpec) -> None:
        self.address = address
        self.spec = spec
        self._channels: list[Any] = []
        self._stubs: list[Any] = []
        self._filters: list[Any] = []
        self._n = 0

    async def open(self, plan: OpPlan) -> None:
        import grpc

        from orchestrator import recommender_pb2 as pb
        from orchestrator import recommender_pb2_grpc as pb_grpc

        self._pb = pb
        # A local subchannel pool per channel: otherwise grpc shares one TCP connection
        # among all channels to an address, and ``connections`` would mean nothing.
        options = [("grpc.use_local_subchannel_pool", 1)]
        self._channels = [
            grpc.aio.insecure_channel(self.address, options=options)
            for _ in range(self.spec.connections)
        ]
        self._stubs = [pb_grpc.RecommenderStub(c) for c in self._channels]
        try:
            for c in self._channels:
                await asyncio.wait_for(c.channel_ready(), READY_TIMEOUT_S)
        except TimeoutError:
            await self.close()
            raise UserError(f"gRPC target {self.address} is not reachable") from None
        await self._check_health()
        self._filters = [_filters_pb(pb, f) for f in plan.filter_variants]
        self._contexts = {
            (s, d): pb.Context(surface=plan.surfaces[s], device=plan.devices[d])
            for s in range(len(plan.surfaces))
            for d in range(len(plan.devices))
        }

    async def _check_health(self) -> None:
        """Standard gRPC health check when the server offers it (the orchestrator must)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channels[0])
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                log.warning("%s offers no gRPC health service; skipping the check", self.address)
                return
            raise UserError(f"health check of {self.address} failed: {e.code().name}") from None
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            raise UserError(f"{self.address} reports {name}")

    async def send(self, plan: OpPlan, i: int) -> Outcome:
        import grpc

        pb = self._pb
        self._n += 1
        stub = self._stubs[self._n % len(self._stubs)]
        try:
            if plan.kind[i] == EVENT:
                await stub.RecordEvent(
                    pb.RecordEventRequest(
                        user_id=str(plan.user_id[i]),
                        item_id=int(plan.item_id[i]),
                        event=EVENT_NAMES[plan.event[i]],
                    ),
                    timeout=float(plan.deadline[i]),
                )
                return OK, (), ""
            f = int(plan.filters[i])
            req = pb.RecommendRequest(
                user_id=str(plan.user_id[i]),
                k=int(plan.k[i]),
                context=self._contexts[(int(plan.surface[i]), int(plan.device[i]))],
                filters=self._filters[f] if f >= 0 else None,
            )
            resp = await stub.Recommend(req, timeout=float(plan.deadline[i]))
            return OK, tuple(resp.degraded), resp.release
        except grpc.aio.AioRpcError as e:
            return e.code().name, (), ""

    async def close(self) -> None:
        for c in self._channels:
            await c.close()
        self._channels = []


def _filters_pb(pb: Any, f: dict[str, Any]) -> Any:
    price = f.get("price")
    return pb.Filters(
        include_categories=f.get("include_categories", []),
        exclude_categories=f.get("exclude_categories", []),
        exclude_item_ids=f.get("exclude_item_ids", []),
        price=pb.PriceRange(**price) if price else None,
    )


class HttpRecommender(Target):
    """The orchestrator's HTTP/JSON front: ``GET /v1/recommendations?user_id=&k=`` and
    ``POST /v1/events`` (JSON field names as in the .proto)."""

    def __init__(self, address: str, spec: TargetSpec) -> None:
        self.address = address
        self.spec = spec
        base = address if address.startswith("http") else f"http://{address}"
        self.base = base.rstrip("/")
        self._session: Any = None

    async def open(self, plan: OpPlan) -> None:
        import aiohttp

        # The in-flight cap lives in the engine; the connector must not add a hidden queue.
        conn = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        self._session = aiohttp.ClientSession(
            connector=conn, timeout=aiohttp.ClientTimeout(total=self.spec.timeout)
        )
        url = self.base + (self.spec.health_path or "/")
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                await r.read()
                if self.spec.health_path and r.status != 200:
                    raise UserError(f"health check {url} answered HTTP {r.status}")
        except (aiohttp.ClientError, TimeoutError) as e:
            await self.close()
            raise UserError(f"HTTP target {self.base} is not reachable: {e}") from None

    async def send(self, plan: OpPlan, i: int) -> Outcome:
        import aiohttp

        # The client's deadline, told to the server as the orchestrator's HTTP front reads
        # it (orchestrator/request.py DEADLINE_HEADERS), and kept by the client.
        deadline = float(plan.deadline[i])
        headers = {"X-Request-Timeout-Ms": str(max(1, round(deadline * 1000)))}
        timeout = aiohttp.ClientTimeout(total=deadline)
        try:
            if plan.kind[i] == EVENT:
                body = {
                    "user_id": str(plan.user_id[i]),
                    "item_id": int(plan.item_id[i]),
                    "event": EVENT_NAMES[plan.event[i]],
                }
                url = self.base + "/v1/events"
                async with self._session.post(
                    url, json=body, headers=headers, timeout=timeout
                ) as r:
                    await r.read()
                    return (OK if r.status < 400 else f"HTTP_{r.status}"), (), ""
            params = {"user_id": str(plan.user_id[i]), "k": str(int(plan.k[i]))}
            url = self.base + "/v1/recommendations"
            async with self._session.get(url, params=params, headers=headers, timeout=timeout) as r:
                if r.status >= 400:
                    await r.read()
                    return f"HTTP_{r.status}", (), ""
                data = await r.json(content_type=None)
            return OK, tuple(data.get("degraded") or ()), str(data.get("release") or "")
        except TimeoutError:
            return "TIMEOUT", (), ""
        except aiohttp.ClientConnectionError:
            return "CONNECTION_ERROR", (), ""
        except (aiohttp.ClientError, ValueError):
            return "BAD_RESPONSE", (), ""

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class TritonModel(Target):
    """One Triton model (or ensemble) over KServe v2 gRPC. Inputs are built from the
    model's committed config.pbtxt: names, dtypes and dims; ``-1`` dims take their size
    from ``target.dims``; an input named ``user_id`` takes the plan's user ids."""

    POOL = 16  # distinct random tensors per input, reused round-robin

    def __init__(self, address: str, spec: TargetSpec, settings: Settings) -> None:
        self.address = address
        self.spec = spec
        self.settings = settings
        self._client: Any = None
        self._pool: list[list[Any]] = []
        self._user_input: tuple[str, list[int], str] | None = None
        self._user_dtype: np.dtype[Any] = np.dtype(np.int64)

    def input_arrays(self, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, str]]:
        """One random request: ``{name: (array, triton dtype)}`` (user_id included)."""
        from tritonclient.grpc import model_config_pb2
        from tritonclient.utils import triton_to_np_dtype

        from exporters.model_config import load_config

        try:
            cfg = load_config(self.spec.model, self.settings.model_repository)
        except ValueError as e:
            raise UserError(str(e)) from None
        out: dict[str, tuple[np.ndarray, str]] = {}
        for t in cfg.input:
            dtype = model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_")
            dims = list(t.dims)
            if any(d < 0 for d in dims):
                if t.name not in self.spec.dims or len(self.spec.dims[t.name]) != len(dims):
                    raise UserError(
                        f"{self.spec.model}.{t.name} has variable dims {dims}: give "
                        f"target.dims.{t.name} with {len(dims)} sizes in the scenario"
                    )
                dims = [
                    g if d < 0 else d for d, g in zip(dims, self.spec.dims[t.name], strict=True)
                ]
            if cfg.max_batch_size > 0:
                dims = [self.spec.batch_size, *dims]
            np_dtype = triton_to_np_dtype(dtype)
            if dtype == "BYTES":
                arr = np.full(dims, b"0", dtype=np.object_)
            elif np.issubdtype(np_dtype, np.floating):
                arr = rng.standard_normal(dims).astype(np_dtype)
            else:
                # Integer inputs are codes and ids; 0 is valid for every table (padding).
                arr = np.zeros(dims, dtype=np_dtype)
            out[t.name] = (arr, dtype)
        return out

    async def open(self, plan: OpPlan) -> None:
        import tritonclient.grpc.aio as tc
        from tritonclient.utils import InferenceServerException

        rng = np.random.default_rng(0)
        for _ in range(self.POOL):
            arrays = self.input_arrays(rng)
            inputs = []
            for name, (arr, dtype) in arrays.items():
                if name == "user_id":
                    self._user_input = (name, list(arr.shape), dtype)
                    self._user_dtype = arr.dtype
                    continue
                x = tc.InferInput(name, list(arr.shape), dtype)
                x.set_data_from_numpy(arr)
                inputs.append(x)
            self._pool.append(inputs)
        self._client = tc.InferenceServerClient(url=self.address)
        try:
            ready = await self._client.is_model_ready(
                self.spec.model, self.spec.model_version, client_timeout=READY_TIMEOUT_S
            )
        except InferenceServerException as e:
            await self.close()
            raise UserError(f"Triton at {self.address} is not reachable: {e.message()}") from None
        if not ready:
            await self.close()
            v = self.spec.model_version or "(default)"
            raise UserError(f"Triton at {self.address}: model {self.spec.model} {v} not ready")

    async def send(self, plan: OpPlan, i: int) -> Outcome:
        import tritonclient.grpc.aio as tc
        from tritonclient.utils import InferenceServerException

        inputs = self._pool[i % len(self._pool)]
        if self._user_input is not None:
            name, shape, dtype = self._user_input
            n = int(np.prod(shape))
            ids = plan.user_id[(i + np.arange(n)) % len(plan)].reshape(shape)
            x = tc.InferInput(name, shape, dtype)
            x.set_data_from_numpy(ids.astype(self._user_dtype))
            inputs = [*inputs, x]
        try:
            await self._client.infer(
                self.spec.model,
                inputs,
                model_version=self.spec.model_version,
                client_timeout=self.spec.timeout,
            )
            return OK, (), ""
        except InferenceServerException as e:
            status = (e.status() or "TRITON_ERROR").removeprefix("StatusCode.")
            return status, (), ""

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

"""A thin typed client for the models the orchestrator calls on Triton (KServe v2 gRPC):
versions pinned per release, a deadline on every call, inputs built and checked from the
tensor names and dtypes of ``config.pbtxt``, and Triton's failures mapped to a few
exception types the caller can branch on.

Two transports, the same calls, answers and errors (``RECSTACK_TRITON_PROTOCOL``):
``http`` (the default) — KServe v2 over kept-alive HTTP/1.1 connections with binary
tensors (orchestrator/triton_http.py), the cheaper one here; ``grpc`` — the request
built as a ``ModelInferRequest`` (raw tensor bytes, the protos that ship with
``tritonclient``) on the generated stub (``tritonclient.grpc``'s ``InferInput``/
``InferResult`` wrappers cost ~0.2 ms more per 300-row rank call), for deployments that
reach Triton through a gRPC proxy. Readiness uses the same transport.

With :class:`~orchestrator.breaker.Breakers`, each model (at its pinned version) has a
circuit breaker: per model rather than per server, because models fail one at a time too
(a model unloaded through the repository API, a backend stub that died) and a missing
ranker must not cost the user tower; a hung server opens each model's breaker after its
own few failures. An open breaker raises :class:`TritonUnavailable` (its cause a
:class:`~orchestrator.breaker.CircuitOpen`) without a call."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from tritonclient.grpc import service_pb2, service_pb2_grpc

from exporters.model_config import load_config
from orchestrator.breaker import Breakers, CircuitOpen
from orchestrator.triton_http import HttpCallError, HttpInference, RawTensor
from recstack.settings import Settings

log = logging.getLogger(__name__)

USER_TOWER = "user_tower"
ITEM_TOWER = "item_tower"
RANK = "rank"
PROTOCOLS = ("http", "grpc")

_NUMPY: dict[str, np.dtype] = {
    "TYPE_FP32": np.dtype(np.float32),
    "TYPE_FP64": np.dtype(np.float64),
    "TYPE_INT64": np.dtype(np.int64),
    "TYPE_INT32": np.dtype(np.int32),
    "TYPE_BOOL": np.dtype(np.bool_),
}


class TritonError(Exception):
    """Any failure of a Triton call."""


class TritonUnavailable(TritonError):
    """The server cannot be reached, is not ready, or the deadline passed."""


class TritonTimeout(TritonUnavailable):
    """The call's deadline passed before Triton answered."""


class TritonInvalidInput(TritonError):
    """Triton (or this client, before sending) rejected the inputs."""


class TritonModelNotFound(TritonError):
    """The model or the pinned version is not loaded."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]  # without the batch dimension
    triton_type: str  # "FP32", "INT64", ...


@dataclass(frozen=True)
class ModelSpec:
    name: str
    batching: bool
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # The most rows one request may carry (None: no limit in the configs), and where that
    # limit comes from; see :func:`row_limit`.
    max_rows: int | None = None
    max_rows_from: str = ""


def row_limit(model: str, repository: Path) -> tuple[int | None, str]:
    """The most rows a request to ``model`` may carry, read from the configs: a batching
    model's ``max_batch_size``; for an ensemble, the smallest ``max_batch_size`` of its
    batching steps — the rows of its variable leading dimension (the rank ensemble's
    candidates) become their batch (``rank_input`` [N, F] is the ranker's batch of N).
    Triton checks a step's limit only when that step runs, after the steps before it
    (``rank_features``) did the work; checked here, before anything is sent."""
    config = load_config(model, repository)
    if config.max_batch_size > 0:
        return int(config.max_batch_size), f"{model} max_batch_size"
    if config.platform != "ensemble":
        return None, ""
    limits = []
    for step in config.ensemble_scheduling.step:
        limit, _ = row_limit(step.model_name, repository)
        if limit is not None:
            limits.append((limit, f"{step.model_name} max_batch_size, a step of {model}"))
    return min(limits) if limits else (None, "")


def model_spec(model: str, repository: Path) -> ModelSpec:
    """Tensor names, dtypes and dims of ``model`` from its config.pbtxt."""
    from tritonclient.grpc import model_config_pb2

    config = load_config(model, repository)
    max_rows, max_rows_from = row_limit(model, repository)

    def spec(t) -> TensorSpec:  # type: ignore[no-untyped-def]
        name = model_config_pb2.DataType.Name(t.data_type)
        return TensorSpec(t.name, _NUMPY[name], tuple(t.dims), name.removeprefix("TYPE_"))

    return ModelSpec(
        model,
        config.max_batch_size > 0,
        tuple(spec(t) for t in config.input),
        tuple(spec(t) for t in config.output),
        max_rows,
        max_rows_from,
    )


def _check_rows(model: str, spec: ModelSpec, t: TensorSpec, shape: tuple[int, ...]) -> None:
    """Refuse more rows than the configs allow: the batch dimension of a batching model,
    the variable leading dimension (-1) of an ensemble's inputs."""
    if spec.max_rows is None or not shape:
        return
    if (spec.batching or (t.dims and t.dims[0] == -1)) and shape[0] > spec.max_rows:
        raise TritonInvalidInput(
            f"{model}: input {t.name!r} has {shape[0]} rows; config.pbtxt allows at most "
            f"{spec.max_rows} ({spec.max_rows_from})"
        )


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], batching: bool) -> None:
    dims = spec.dims
    got = shape[1:] if batching else shape
    if batching and len(shape) == 0:
        raise TritonInvalidInput(f"input {spec.name!r} needs a batch dimension")
    if len(got) != len(dims) or any(d != -1 and d != g for d, g in zip(dims, got, strict=True)):
        want = ["batch", *dims] if batching else list(dims)
        raise TritonInvalidInput(f"input {spec.name!r} has shape {list(shape)}, expected {want}")


def checked_inputs(
    model: str, spec: ModelSpec, inputs: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """``inputs`` as ``model``'s config takes them: exactly its input names, each cast to
    its dtype where numpy can do so safely, with its shape and row limit checked; raises
    :class:`TritonInvalidInput` naming what is wrong. Whoever runs the model (Triton, or
    orchestrator/local_models.py in process) gets the same inputs and the same refusals."""
    expected = {t.name for t in spec.inputs}
    unknown = sorted(set(inputs) - expected)
    missing = sorted(expected - set(inputs))
    if unknown or missing:
        raise TritonInvalidInput(
            f"{model}: unknown inputs {unknown}, missing inputs {missing}; "
            f"config.pbtxt names {sorted(expected)}"
        )
    out = {}
    for t in spec.inputs:
        array = np.asarray(inputs[t.name])
        if array.dtype != t.dtype:
            if not np.can_cast(array.dtype, t.dtype, "same_kind"):
                raise TritonInvalidInput(
                    f"{model}: input {t.name!r} is {array.dtype}, expected {t.dtype}"
                )
            array = array.astype(t.dtype)
        _check_shape(t, array.shape, spec.batching)
        _check_rows(model, spec, t, array.shape)
        out[t.name] = array
    return out


class TritonClient:
    """Typed calls to one Triton server. Not thread-safe for changing ``versions``; the
    underlying gRPC channel is shared by calls from several threads."""

    def __init__(
        self,
        url: str,
        repository: Path,
        versions: Mapping[str, int] | None = None,
        timeout_s: float = 1.0,
        ensemble: str = RANK,
        breakers: Breakers | None = None,
        protocol: str = "grpc",
    ) -> None:
        """``url``: ``host:port`` of Triton's endpoint for ``protocol`` (its HTTP port
        for ``http``, its gRPC port for ``grpc``)."""
        if protocol not in PROTOCOLS:
            raise ValueError(f"Triton protocol {protocol!r}: expected one of {PROTOCOLS}")
        self.url = url
        self.protocol = protocol
        self.breakers = breakers
        self.repository = repository
        self.versions = dict(versions or {})
        # The rank ensemble this client calls: a release's own (``rank_r<id>``, loaded from
        # rank/config.pbtxt with pinned steps) has rank's tensors.
        self.ensemble = ensemble
        self.timeout_s = timeout_s
        self._channel: grpc.Channel | None = None
        self._http: HttpInference | None = None
        if protocol == "http":
            host, _, port = url.rpartition(":")
            self._http = HttpInference(host, int(port))
        else:
            # Unlimited message sizes, as tritonclient sets them: 500 candidates x 64 floats.
            self._channel = grpc.insecure_channel(
                url,
                options=[
                    ("grpc.max_send_message_length", -1),
                    ("grpc.max_receive_message_length", -1),
                ],
            )
            self._stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        self._specs: dict[str, ModelSpec] = {}

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        versions: Mapping[str, int] | None = None,
        timeout_s: float = 1.0,
        ensemble: str = RANK,
        breakers: Breakers | None = None,
    ) -> TritonClient:
        protocol = settings.triton_protocol
        port = settings.triton_http_port if protocol == "http" else settings.triton_grpc_port
        return cls(
            f"{settings.triton_host}:{port}",
            settings.model_repository,
            versions,
            timeout_s,
            ensemble,
            breakers,
            protocol,
        )

    def spec(self, model: str) -> ModelSpec:
        if model not in self._specs:
            try:
                config = RANK if model == self.ensemble else model
                self._specs[model] = model_spec(config, self.repository)
            except ValueError as e:
                raise TritonModelNotFound(f"no config for model {model!r}: {e}") from e
        return self._specs[model]

    def ready(self, model: str | None = None) -> bool:
        """Server ready (or ``model`` at its pinned version ready); never raises."""
        if self._http is not None:
            version = "" if model is None else str(self.versions.get(model, ""))
            return self._http.ready(model, version, self.timeout_s)
        try:
            if model is None:
                reply = self._stub.ServerReady(
                    service_pb2.ServerReadyRequest(), timeout=self.timeout_s
                )
            else:
                version = str(self.versions.get(model, ""))
                reply = self._stub.ModelReady(
                    service_pb2.ModelReadyRequest(name=model, version=version),
                    timeout=self.timeout_s,
                )
            return bool(reply.ready)
        except grpc.RpcError:
            return False

    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        *,
        version: int | None = None,
        timeout_s: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run ``model`` (at ``version``, else the pinned one, else Triton's choice) on
        named inputs; returns every output of the config by name."""
        spec = self.spec(model)
        checked = checked_inputs(model, spec, inputs)
        pinned = version if version is not None else self.versions.get(model)
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        if self.breakers is None:
            return self._send(model, spec, checked, pinned, timeout)
        name = f"triton:{model}:{'-' if pinned is None else pinned}"
        try:
            with self.breakers.get(name).call(_is_failure):
                return self._send(model, spec, checked, pinned, timeout)
        except CircuitOpen as e:
            raise TritonUnavailable(f"{model}: {e}") from e

    def _send(
        self,
        model: str,
        spec: ModelSpec,
        checked: Mapping[str, np.ndarray],
        pinned: int | None,
        timeout: float,
    ) -> dict[str, np.ndarray]:
        """One call over this client's transport: every output of the config by name."""
        version = "" if pinned is None else str(pinned)
        if self._http is not None:
            try:
                got = self._http.infer(
                    model,
                    version,
                    [(t.name, t.triton_type, checked[t.name]) for t in spec.inputs],
                    [t.name for t in spec.outputs],
                    timeout,
                )
            except HttpCallError as e:
                raise _typed(model, pinned, e.status, e.detail) from e
        else:
            got = self._grpc_infer(model, spec, checked, version, pinned, timeout)
        return _decode(model, spec, got)

    def _grpc_infer(
        self,
        model: str,
        spec: ModelSpec,
        checked: Mapping[str, np.ndarray],
        version: str,
        pinned: int | None,
        timeout: float,
    ) -> dict[str, RawTensor]:
        request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
        for t in spec.inputs:
            array = checked[t.name]
            request.inputs.add(name=t.name, datatype=t.triton_type, shape=array.shape)
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
        for t in spec.outputs:
            request.outputs.add(name=t.name)
        response = self._call(model, pinned, request, timeout)
        if len(response.raw_output_contents) != len(response.outputs):
            raise TritonError(f"{model}: Triton's answer does not carry raw output tensors")
        return {
            o.name: (o.datatype, tuple(o.shape), memoryview(raw))
            for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
        }

    def _call(
        self, model: str, pinned: int | None, request: service_pb2.ModelInferRequest, timeout: float
    ) -> service_pb2.ModelInferResponse:
        try:
            return self._stub.ModelInfer(request, timeout=timeout)
        except grpc.RpcError as e:
            raise _typed(model, pinned, e.code().name, e.details() or "") from e

    def user_embedding(self, inputs: Mapping[str, np.ndarray], **kw: object) -> np.ndarray:
        """user_tower: a batch of users -> [batch, dim] embeddings."""
        out = self.infer(USER_TOWER, inputs, **kw)  # type: ignore[arg-type]
        return out[self.spec(USER_TOWER).outputs[0].name]

    def item_embedding(self, inputs: Mapping[str, np.ndarray], **kw: object) -> np.ndarray:
        """item_tower: a batch of items -> [batch, dim] embeddings (new items between
        releases, exporters/item_delta.py)."""
        out = self.infer(ITEM_TOWER, inputs, **kw)  # type: ignore[arg-type]
        return out[self.spec(ITEM_TOWER).outputs[0].name]

    def item_batch(self) -> int:
        """The most items one item_tower request may carry (its config's batch limit)."""
        return self.max_rows(ITEM_TOWER) or 1024

    def max_rows(self, model: str) -> int | None:
        """The most rows one request to ``model`` may carry (:func:`row_limit`)."""
        return self.spec(model).max_rows

    def rank(self, inputs: Mapping[str, np.ndarray], **kw: object) -> np.ndarray:
        """rank ensemble: one user and N candidates -> N scores (1-D)."""
        out = self.infer(self.ensemble, inputs, **kw)  # type: ignore[arg-type]
        return out[self.spec(self.ensemble).outputs[0].name].reshape(-1)

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        if self._http is not None:
            self._http.close()

    def __enter__(self) -> TritonClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(model: str, spec: ModelSpec, got: Mapping[str, RawTensor]) -> dict[str, np.ndarray]:
    """Every output of ``spec`` by name, from the answer's raw tensors (either transport):
    the datatype Triton names must be the config's, the bytes must fill the shape."""
    out = {}
    for t in spec.outputs:
        if t.name not in got:
            raise TritonError(f"{model}: Triton's answer has no output {t.name!r}")
        datatype, shape, raw = got[t.name]
        if datatype != t.triton_type:
            raise TritonError(f"{model}: output {t.name!r} is {datatype}, expected {t.triton_type}")
        try:
            out[t.name] = np.frombuffer(raw, dtype=t.dtype).reshape(shape)
        except ValueError as e:
            raise TritonError(f"{model}: output {t.name!r} does not fill {list(shape)}: {e}") from e
    return out


def _is_failure(err: BaseException) -> bool:
    """Failures of the model or server (for its breaker); an input Triton refused means
    the model is up."""
    return isinstance(err, TritonError) and not isinstance(err, TritonInvalidInput)


def _typed(model: str, version: int | None, status: str, detail: str) -> TritonError:
    """Triton's gRPC status (``NOT_FOUND``, ...) and message as one of our error types."""
    message = f"{model}" + (f" v{version}" if version is not None else "") + f": {detail}"
    text = detail.lower()
    # Triton answers UNAVAILABLE for a known model whose version is not loaded; that is a
    # release/pinning problem, not an unreachable server.
    if "NOT_FOUND" in status or "unknown model" in text:
        return TritonModelNotFound(message)
    if "DEADLINE_EXCEEDED" in status:
        return TritonTimeout(message)
    if "UNAVAILABLE" in status:
        return TritonUnavailable(message)
    if "INVALID_ARGUMENT" in status:
        return TritonInvalidInput(message)
    return TritonError(f"{message} ({status})")

"""Triton's KServe v2 HTTP/REST inference with the binary tensor extension, for
:class:`~orchestrator.triton_client.TritonClient`.

Why a second transport beside gRPC: on this host a 300-row rank call plus a user_tower
call cost 0.68 ms of the orchestrator's CPU over gRPC (0.50 ms in the calling thread,
the rest in gRPC's event-engine threads, which wake for every call) and 0.49 ms over a
kept-alive HTTP/1.1 connection, where the calling thread does its own socket I/O;
Triton's side was cheaper too (1.59 vs 1.74 ms per pair). Same scores, bit for bit
(docs/benchmark.md, session 10).

The wire format is Triton's binary data extension (docs: protocol/extension_binary_data):
the body is the JSON inference header followed by each input's raw bytes, the header's
length in ``Inference-Header-Content-Length``; outputs asked with ``binary_data: true``
come back the same way. One persistent connection per calling thread (``http.client``
connections are not thread-safe); a connection that failed or timed out is dropped, as
its late answer would otherwise be read by the next call."""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Sequence

import numpy as np

# One output of an answer as it came: (KServe v2 datatype, shape, its bytes). The caller
# (TritonClient) decodes it against the config, the same way for both transports.
RawTensor = tuple[str, tuple[int, ...], memoryview]

# Triton's HTTP status for each error code (http_server.cc), as gRPC status names so that
# both transports share one mapping to our exception types.
_STATUS_NAME = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    409: "ALREADY_EXISTS",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
}
_HEADER_LENGTH = "Inference-Header-Content-Length"
# A kept-alive connection the server closed since its last use fails like this on the
# next request; it is retried once on a fresh connection (inference is idempotent).
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


class HttpCallError(Exception):
    """A failed call: ``status`` is a gRPC status name (``NOT_FOUND``, ``UNAVAILABLE``,
    ``DEADLINE_EXCEEDED`` ...), ``detail`` Triton's message or the socket error."""

    def __init__(self, status: str, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class HttpInference:
    """Inference and readiness calls to one Triton HTTP endpoint."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: set[http.client.HTTPConnection] = set()

    # ------------------------------------------------------------------ connections
    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it was used before (may be stale)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        conn = http.client.HTTPConnection(self.host, self.port)
        self._local.conn = conn
        with self._lock:
            self._open.add(conn)
        return conn, False

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        conn.close()
        self._local.conn = None
        with self._lock:
            self._open.discard(conn)

    def close(self) -> None:
        """Close every thread's connection (a later call opens a new one)."""
        with self._lock:
            conns, self._open = self._open, set()
        for conn in conns:
            conn.close()

    def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str], timeout: float
    ) -> tuple[int, http.client.HTTPResponse, bytes]:
        for attempt in (0, 1):
            conn, reused = self._connection()
            conn.timeout = timeout  # used when it connects
            try:
                if conn.sock is not None:
                    conn.sock.settimeout(timeout)
                conn.request(method, path, body, headers)
                response = conn.getresponse()
                data = response.read()
            except TimeoutError as e:
                self._drop(conn)
                raise HttpCallError("DEADLINE_EXCEEDED", f"no answer within {timeout:.3f} s") from e
            except _STALE as e:
                self._drop(conn)
                if reused and attempt == 0:
                    continue
                raise HttpCallError("UNAVAILABLE", f"{type(e).__name__}: {e}") from e
            except (OSError, http.client.HTTPException) as e:
                self._drop(conn)
                raise HttpCallError("UNAVAILABLE", f"{type(e).__name__}: {e}") from e
            if response.will_close:
                self._drop(conn)
            return response.status, response, data
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ calls
    def infer(
        self,
        model: str,
        version: str,
        inputs: Sequence[tuple[str, str, np.ndarray]],
        outputs: Sequence[str],
        timeout: float,
    ) -> dict[str, RawTensor]:
        """Run ``model`` (``version`` "" = Triton's choice) on ``(name, datatype,
        array)`` inputs; returns each output as Triton sent it (views of the answer's
        bytes, not copies)."""
        parts: list[bytes] = []
        meta = []
        for name, datatype, array in inputs:
            raw = np.ascontiguousarray(array).tobytes()
            parts.append(raw)
            meta.append(
                {
                    "name": name,
                    "shape": list(array.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(raw)},
                }
            )
        header = json.dumps(
            {
                "inputs": meta,
                "outputs": [{"name": n, "parameters": {"binary_data": True}} for n in outputs],
            },
            separators=(",", ":"),
        ).encode()
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
        status, response, data = self._request(
            "POST",
            path,
            b"".join((header, *parts)),
            {_HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"},
            timeout,
        )
        if status != 200:
            raise HttpCallError(_STATUS_NAME.get(status, f"HTTP_{status}"), _error_text(data))
        length = response.getheader(_HEADER_LENGTH)
        try:
            head_len = int(length) if length is not None else len(data)
            head = json.loads(data[:head_len])
            out: dict[str, RawTensor] = {}
            offset = head_len
            body = memoryview(data)
            for o in head.get("outputs", []):
                size = o.get("parameters", {}).get("binary_data_size")
                if size is None:
                    raise ValueError(f"output {o.get('name')!r} is not binary")
                shape = tuple(int(d) for d in o["shape"])
                out[o["name"]] = (o["datatype"], shape, body[offset : offset + size])
                offset += size
        except (ValueError, KeyError, TypeError) as e:
            raise HttpCallError("INTERNAL", f"unreadable answer: {e}") from e
        return out

    def ready(self, model: str | None, version: str, timeout: float) -> bool:
        """Server ready, or ``model`` (at ``version``) ready; never raises."""
        if model is None:
            path = "/v2/health/ready"
        else:
            path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
        try:
            status, _, _ = self._request("GET", path, None, {}, timeout)
        except HttpCallError:
            return False
        return status == 200


def _error_text(data: bytes) -> str:
    """Triton's ``{"error": "..."}`` body, else the raw text (a proxy's page)."""
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", "replace")

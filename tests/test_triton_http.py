"""The HTTP transport's own failure handling, against small local servers that misbehave
on purpose (Triton itself is exercised in tests/test_triton_server.py and the e2e tests):
a server that accepts and never answers (a hung Triton), one that closes a kept-alive
connection between calls (a restarted Triton or a proxy's idle timeout), error bodies,
and answers that are not Triton's."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest

from orchestrator.triton_http import HttpCallError, HttpInference, RawTensor


def _answer(handler: BaseHTTPRequestHandler, status: int, head: dict, raw: bytes = b"") -> None:
    body = json.dumps(head).encode()
    handler.send_response(status)
    if status == 200:
        handler.send_header("Inference-Header-Content-Length", str(len(body)))
    handler.send_header("Content-Length", str(len(body) + len(raw)))
    handler.end_headers()
    handler.wfile.write(body + raw)


class _Echo(BaseHTTPRequestHandler):
    """Answers ``out`` = the input ``x`` doubled (binary), counts connections; the model
    ``gone`` is unknown (404), ``close`` closes the connection after answering."""

    protocol_version = "HTTP/1.1"
    connections: ClassVar[list[int]] = []

    def setup(self) -> None:
        super().setup()
        type(self).connections.append(1)

    def log_message(self, *args: object) -> None:
        pass

    def do_POST(self) -> None:
        data = self.rfile.read(int(self.headers["Content-Length"]))
        if "/gone/" in self.path:
            _answer(self, 404, {"error": "Request for unknown model: 'gone' is not found"})
            return
        if "/broken/" in self.path:
            _answer(self, 200, {"outputs": [{"name": "out", "datatype": "FP32", "shape": [2]}]})
            return
        head_len = int(self.headers["Inference-Header-Content-Length"])
        head = json.loads(data[:head_len])
        (inp,) = head["inputs"]
        x = np.frombuffer(data[head_len:], dtype=np.float32).reshape(inp["shape"])
        raw = (x * 2).tobytes()
        meta = {"name": "out", "datatype": "FP32", "shape": list(x.shape)}
        meta["parameters"] = {"binary_data_size": len(raw)}
        _answer(self, 200, {"outputs": [meta]}, raw)
        if "/close/" in self.path:
            self.close_connection = True

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/v2/health/ready" else 400)
        self.send_header("Content-Length", "0")
        self.end_headers()


@pytest.fixture
def echo() -> Iterator[tuple[str, int]]:
    _Echo.connections = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address  # type: ignore[misc]
    server.shutdown()
    server.server_close()


def _floats(raw: RawTensor) -> np.ndarray:
    """An FP32 output as TritonClient decodes it."""
    datatype, shape, data = raw
    assert datatype == "FP32"
    return np.frombuffer(data, dtype=np.float32).reshape(shape)


def _x(n: int = 3) -> list[tuple[str, str, np.ndarray]]:
    return [("x", "FP32", np.arange(n, dtype=np.float32))]


def test_answers_reuse_one_connection_per_thread(echo: tuple[str, int]) -> None:
    client = HttpInference(*echo)
    for n in (1, 3, 300):
        out = client.infer("m", "1", _x(n), ["out"], timeout=5)
        np.testing.assert_array_equal(_floats(out["out"]), np.arange(n, dtype=np.float32) * 2)
    assert len(_Echo.connections) == 1
    other = threading.Thread(target=lambda: client.infer("m", "", _x(), ["out"], timeout=5))
    other.start()
    other.join()
    assert len(_Echo.connections) == 2
    assert client.ready(None, "", timeout=5) and not client.ready("m", "1", timeout=5)
    client.close()


def test_a_connection_closed_by_the_server_is_retried_once(echo: tuple[str, int]) -> None:
    client = HttpInference(*echo)
    client.infer("close", "", _x(), ["out"], timeout=5)  # the server then closes it
    time.sleep(0.1)
    out = client.infer("m", "", _x(), ["out"], timeout=5)
    np.testing.assert_array_equal(_floats(out["out"]), np.arange(3, dtype=np.float32) * 2)
    assert len(_Echo.connections) == 2
    client.close()


def test_errors_carry_triton_status_and_message(echo: tuple[str, int]) -> None:
    client = HttpInference(*echo)
    with pytest.raises(HttpCallError) as info:
        client.infer("gone", "", _x(), ["out"], timeout=5)
    assert info.value.status == "NOT_FOUND" and "unknown model" in info.value.detail
    with pytest.raises(HttpCallError) as info:
        client.infer("broken", "", _x(), ["out"], timeout=5)  # no binary output
    assert info.value.status == "INTERNAL"
    # ... and the connection goes on serving.
    assert _floats(client.infer("m", "", _x(), ["out"], timeout=5)["out"]).shape == (3,)
    client.close()


def test_a_server_that_never_answers_times_out_and_the_connection_is_dropped() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepted by the kernel, never read: a hung server
    client = HttpInference(*listener.getsockname())
    for _ in range(2):
        t0 = time.monotonic()
        with pytest.raises(HttpCallError) as info:
            client.infer("m", "", _x(), ["out"], timeout=0.3)
        assert info.value.status == "DEADLINE_EXCEEDED"
        assert 0.25 < time.monotonic() - t0 < 2
    assert client._local.conn is None  # a late answer must not reach the next call
    assert not client.ready(None, "", timeout=0.2)
    listener.close()


def test_nothing_listening_is_unavailable() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    sock.close()
    client = HttpInference(host, port)
    with pytest.raises(HttpCallError) as info:
        client.infer("m", "", _x(), ["out"], timeout=1)
    assert info.value.status == "UNAVAILABLE"
    assert not client.ready(None, "", timeout=1)

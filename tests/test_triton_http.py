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


def _canned(answers: list[bytes]) -> tuple[tuple[str, int], threading.Thread]:
    """A server that reads one request per answer in ``answers`` on one connection, sends
    the answer's bytes as they are, and closes the connection after the last."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            buf = b""
            for answer in answers:
                while b"\r\n\r\n" not in buf:
                    buf += conn.recv(65536)
                head, _, buf = buf.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(buf) < length:
                    buf += conn.recv(65536)
                buf = buf[length:]
                try:
                    for i in range(0, len(answer), 7):  # in small pieces, as a slow network
                        conn.sendall(answer[i : i + 7])
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client gave up on an answer it could not read

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname(), thread


def _binary_answer(x: np.ndarray, framing: str) -> bytes:
    raw = x.tobytes()
    meta = {"name": "out", "datatype": "FP32", "shape": list(x.shape)}
    head = json.dumps({"outputs": [{**meta, "parameters": {"binary_data_size": len(raw)}}]})
    body = head.encode() + raw
    lines = [b"HTTP/1.1 200 OK", b"inference-header-content-length: %d" % len(head)]
    if framing == "chunked":  # three chunks, an extension and a trailer
        cut = [body[:5], body[5:40], body[40:]]
        chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in cut)
        return b"\r\n".join(
            [*lines, b"Transfer-Encoding: chunked", b"", chunks + b"0\r\nX-T: 1\r\n\r\n"]
        )
    if framing == "until-close":  # HTTP/1.0 style: no length, the end of the connection
        return b"\r\n".join([b"HTTP/1.0 200 OK", *lines[1:], b"", body])
    return b"\r\n".join([*lines, b"Content-Length: %d" % len(body), b"", body])


@pytest.mark.parametrize("framing", ["length", "chunked", "until-close"])
def test_answers_framed_every_way_http_allows_are_read(framing: str) -> None:
    """Triton answers with a Content-Length; a proxy in between may re-frame the body as
    chunks or, speaking HTTP/1.0, up to the end of the connection. Each way reads the same
    tensor; a connection the answer said would close is not used again."""
    x = np.arange(20, dtype=np.float32)
    address, thread = _canned([_binary_answer(x, framing)] * (1 if framing == "until-close" else 2))
    client = HttpInference(*address)
    out = client.infer("m", "", _x(), ["out"], timeout=5)
    np.testing.assert_array_equal(_floats(out["out"]), x)
    if framing == "until-close":
        assert client._local.conn is None
    else:  # kept alive: the second answer comes on the same connection
        np.testing.assert_array_equal(_floats(client.infer("m", "", _x(), ["out"], 5)["out"]), x)
    thread.join(5)
    client.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"SSH-2.0-OpenSSH_9.2\r\n\r\n",  # not HTTP at all
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{}",  # closed before its length
        b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 20_000,  # a head without end
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
)
def test_answers_that_are_not_http_are_unavailable_and_drop_the_connection(answer: bytes) -> None:
    address, thread = _canned([answer])
    client = HttpInference(*address)
    with pytest.raises(HttpCallError) as info:
        client.infer("m", "", _x(), ["out"], timeout=5)
    assert info.value.status == "UNAVAILABLE"
    assert client._local.conn is None
    thread.join(5)


def test_a_path_that_would_change_the_request_line_is_refused(echo: tuple[str, int]) -> None:
    client = HttpInference(*echo)
    with pytest.raises(HttpCallError) as info:
        client.infer("m HTTP/1.1\r\nX-Evil: 1\r\n", "", _x(), ["out"], timeout=5)
    assert info.value.status == "INVALID_ARGUMENT"
    assert not _Echo.connections  # nothing was sent

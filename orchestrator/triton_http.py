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
come back the same way. One persistent connection per calling thread; a connection that
failed or timed out is dropped, as its late answer would otherwise be read by the next
call.

HTTP/1.1 is spoken on the socket directly (:class:`_Connection`), not through
``http.client``: the request goes out in one ``sendall`` and the answer's head is parsed
with a few ``bytes`` operations, where ``http.client`` sent the head and the body in two
writes, validated every header and parsed the answer's headers with ``email.parser``. Only
what Triton's server sends is needed (a status line, headers, a ``Content-Length`` or a
chunked body); anything else is an error of the call."""

from __future__ import annotations

import json
import socket
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
_HEADER_KEY = _HEADER_LENGTH.lower().encode()
# The most header bytes an answer may have before its body (Triton sends a few lines).
_MAX_HEAD = 64 * 1024


class _Closed(ConnectionError):
    """The server closed the connection before the answer's first byte: on a kept-alive
    connection, the server closed it since its last use (a restarted Triton, a proxy's
    idle timeout); retried once on a fresh connection (inference is idempotent)."""


class _BadAnswer(Exception):
    """Bytes that are not an HTTP/1.1 answer we can read."""


# What a stale kept-alive connection fails with on the next request.
_STALE = (_Closed, ConnectionResetError, BrokenPipeError)


class _Connection:
    """One HTTP/1.1 connection to the server, used by one thread at a time."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        # The request goes out in one write: nothing for Nagle's algorithm to hold back.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def exchange(self, request: bytes, timeout: float) -> tuple[int, dict[bytes, bytes], bytes]:
        """Send ``request`` (head and body), read the answer: ``(status, headers with
        lower-case names, body)``; the headers also say whether the server closes."""
        sock = self.sock
        sock.settimeout(timeout)
        sock.sendall(request)
        buf = b""
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if len(buf) > _MAX_HEAD:
                raise _BadAnswer(f"no end of the answer's head in {len(buf)} bytes")
            chunk = sock.recv(65536)
            if not chunk:
                if buf:
                    raise _BadAnswer("the server closed the connection inside the answer's head")
                raise _Closed("the server closed the connection")
            buf += chunk
        lines = buf[:end].split(b"\r\n")
        version, _, rest = lines[0].partition(b" ")
        try:
            status = int(rest[:3])
        except ValueError:
            raise _BadAnswer(f"not an HTTP status line: {lines[0][:80]!r}") from None
        if not version.startswith(b"HTTP/1."):
            raise _BadAnswer(f"not an HTTP/1.x answer: {lines[0][:80]!r}")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if version == b"HTTP/1.0" and headers.get(b"connection", b"").lower() != b"keep-alive":
            headers[b"connection"] = b"close"
        body = buf[end + 4 :]
        if status in (204, 304) or status < 200:  # never a body (RFC 9112 6.3)
            return status, headers, b""
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            return status, headers, self._chunked(body)
        length = headers.get(b"content-length")
        if length is None:  # the body runs to the end of the connection
            headers[b"connection"] = b"close"
            return status, headers, body + self._until_closed()
        try:
            n = int(length)
        except ValueError:
            raise _BadAnswer(f"Content-Length {length[:40]!r}") from None
        if len(body) >= n:
            if len(body) > n:
                raise _BadAnswer("more bytes than the answer's Content-Length")
            return status, headers, body
        out = bytearray(n)
        out[: len(body)] = body
        view, got = memoryview(out), len(body)
        while got < n:
            k = sock.recv_into(view[got:])
            if k == 0:
                raise _BadAnswer(f"the server closed the connection after {got} of {n} bytes")
            got += k
        return status, headers, bytes(out)

    def _until_closed(self) -> bytes:
        parts: list[bytes] = []
        while chunk := self.sock.recv(65536):
            parts.append(chunk)
        return b"".join(parts)

    def _chunked(self, buf: bytes) -> bytes:
        """A chunked body (RFC 9112 7.1), ``buf`` its first bytes; trailers are skipped."""
        parts: list[bytes] = []
        while True:
            while (eol := buf.find(b"\r\n")) < 0:
                buf += self._more()
            try:
                size = int(buf[:eol].split(b";")[0], 16)
            except ValueError:
                raise _BadAnswer(f"chunk size {buf[:eol][:40]!r}") from None
            buf = buf[eol + 2 :]
            if size == 0:  # trailers up to an empty line
                while not buf.startswith(b"\r\n") and b"\r\n\r\n" not in buf:
                    buf += self._more()
                return b"".join(parts)
            while len(buf) < size + 2:
                buf += self._more()
            parts.append(buf[:size])
            buf = buf[size + 2 :]

    def _more(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise _BadAnswer("the server closed the connection inside a chunked body")
        return chunk


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
        self._open: set[_Connection] = set()

    # ------------------------------------------------------------------ connections
    def _connection(self, timeout: float) -> tuple[_Connection, bool]:
        """This thread's connection, and whether it was used before (may be stale)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        conn = _Connection(self.host, self.port, timeout)
        self._local.conn = conn
        with self._lock:
            self._open.add(conn)
        return conn, False

    def _drop(self, conn: _Connection) -> None:
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
        self, method: str, path: str, body: Sequence[bytes], headers: str, timeout: float
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        """``(status, headers, body)`` of one call; ``body``: its parts, joined once with
        the request's head; ``headers``: extra header lines, each ending in CRLF. Failures
        are :class:`HttpCallError`."""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Length: {sum(len(b) for b in body)}\r\n{headers}\r\n"
        ).encode("latin-1")
        request = b"".join((head, *body))
        for attempt in (0, 1):
            conn: _Connection | None = None
            try:
                conn, reused = self._connection(timeout)
                status, answer_headers, data = conn.exchange(request, timeout)
            except (OSError, _BadAnswer) as e:  # timeouts and stale connections included
                if conn is None:  # could not connect
                    reused = False
                else:  # its late or partial answer must not reach the next call
                    self._drop(conn)
                if isinstance(e, TimeoutError):
                    raise HttpCallError(
                        "DEADLINE_EXCEEDED", f"no answer within {timeout:.3f} s"
                    ) from e
                if isinstance(e, _STALE) and reused and attempt == 0:
                    continue
                raise HttpCallError("UNAVAILABLE", f"{type(e).__name__}: {e}") from e
            if answer_headers.get(b"connection", b"").lower() == b"close":
                self._drop(conn)
            return status, answer_headers, data
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
        status, headers, data = self._request(
            "POST",
            _checked(path),
            (header, *parts),
            f"{_HEADER_LENGTH}: {len(header)}\r\nContent-Type: application/octet-stream\r\n",
            timeout,
        )
        if status != 200:
            raise HttpCallError(_STATUS_NAME.get(status, f"HTTP_{status}"), _error_text(data))
        length = headers.get(_HEADER_KEY)
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
            status, _, _ = self._request("GET", _checked(path), (), "", timeout)
        except HttpCallError:
            return False
        return status == 200


def _checked(path: str) -> str:
    """``path`` if it can go on a request line as it is (model names come from the
    release, but a space or a line break would change the request)."""
    if not path.isascii() or any(c in path for c in " \r\n\t"):
        raise HttpCallError("INVALID_ARGUMENT", f"not a usable request path: {path!r}")
    return path


def _error_text(data: bytes) -> str:
    """Triton's ``{"error": "..."}`` body, else the raw text (a proxy's page)."""
    try:
        return str(json.loads(data)["error"])
    except (ValueError, KeyError, TypeError):
        return data[:200].decode("utf-8", "replace")

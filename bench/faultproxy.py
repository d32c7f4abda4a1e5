"""A small fault-injecting HTTP proxy for S3 on 127.0.0.1, in front of moto's server (or MinIO).

Each request draws, from a seeded generator, whether it meets a fault, and which:

    slowdown     503 SlowDown, the answer real S3 gives under load
    internal     500 InternalError
    reset        the connection closed before any response
    reset_body   the status and headers sent, then the connection closed mid-body
    lost_reply   the request forwarded (a write lands), then the connection closed
    stall        no answer for ``stall_s`` seconds, then the connection closed
    forbidden    403 AccessDenied (permanent: meant for chosen keys, see ``forbid``)

``FaultProxy(upstream, rates={"slowdown": 0.1}, seed=1)`` starts on a free port; ``.endpoint`` is
its URL, for ``AWS_ENDPOINT_URL``. ``forbid`` is a set of substrings: any request whose path
contains one gets 403 every time. ``counts`` tells what happened. Used by ``tests/`` and by
``bench.run`` (the ``batchinf-s3-503`` pipeline).

Distance: ``latency_s`` (with ``jitter_s``, uniform either side) delays every answer, as a
store tens of milliseconds away does; ``remember`` (path prefixes, e.g. ``("/bench/images/",)``)
keeps each whole GET answer of an object under them and serves it again from memory, so the
server on this machine costs little CPU, as remote S3 costs the client's machine none
(``bench.run``'s ``batchinf-s3-30ms`` pipeline). Listings and other objects always go upstream.
"""

from __future__ import annotations

import contextlib
import http.client
import random
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

FAULTS = ("slowdown", "internal", "reset", "reset_body", "lost_reply", "stall")
ERROR_XML = ('<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
             "<Message>{message}</Message></Error>")


class FaultProxy:
    def __init__(self, upstream: str, rates: dict[str, float] | None = None, seed: int = 0,
                 stall_s: float = 5.0, forbid: set[str] | None = None, port: int = 0,
                 methods: tuple[str, ...] = ("GET", "PUT", "HEAD", "POST", "DELETE"),
                 latency_s: float = 0.0, jitter_s: float = 0.0, remember: tuple[str, ...] = ()) -> None:
        unknown = set(rates or {}) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {FAULTS}")
        self.upstream = urlsplit(upstream)
        self.rates = dict(rates or {})
        self.stall_s = stall_s
        self.forbid = set(forbid or ())
        self.methods = methods
        self.counts: Counter[str] = Counter()
        self.latency_s, self.jitter_s = latency_s, jitter_s
        self.remember = remember
        self.remembered: dict[str, tuple[int, list[tuple[str, str]], bytes]] = {}
        self._delays = random.Random(seed + 1)  # its own stream: the faults drawn stay the same
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", port), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def draw(self, method: str, path: str) -> str | None:
        """The fault this request meets, if any (seeded, so a run can be repeated)."""
        if any(part in path for part in self.forbid):
            return "forbidden"
        with self._lock:
            roll = self._random.random()
            self.counts["requests"] += 1
        if method not in self.methods:
            return None
        for fault in FAULTS:
            rate = self.rates.get(fault, 0.0)
            if roll < rate:
                return fault
            roll -= rate
        return None

    def delay(self) -> float:
        """How long this answer waits, as if the store were ``latency_s`` away."""
        if not self.latency_s:
            return 0.0
        with self._lock:
            return max(0.0, self._delays.uniform(self.latency_s - self.jitter_s,
                                                 self.latency_s + self.jitter_s))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up on a pooled connection is normal for a proxy; say nothing."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _any(self) -> None:
            body = self._read_body()
            fault = proxy.draw(self.command, self.path)
            if fault:
                with proxy._lock:
                    proxy.counts[fault] += 1
            if fault in ("slowdown", "internal", "forbidden"):
                code, status, text = {"slowdown": ("SlowDown", 503, "Please reduce your request rate."),
                                      "internal": ("InternalError", 500, "We encountered an internal error."),
                                      "forbidden": ("AccessDenied", 403, "Access Denied")}[fault]
                return self._send(status, ERROR_XML.format(code=code, message=text).encode(),
                                  {"Content-Type": "application/xml"})
            if fault == "reset":
                return self._drop()
            if fault == "stall":
                time.sleep(proxy.stall_s)
                return self._drop()
            time.sleep(proxy.delay())
            status, headers, answer = self._forward_or_remembered(body)
            if fault == "lost_reply":
                return self._drop()
            if fault == "reset_body" and len(answer) > 1:
                self.send_response(status)
                for key, value in headers:
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(answer[: len(answer) // 2])
                self.wfile.flush()
                return self._drop()
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(answer)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().strip().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _forward_or_remembered(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            """The upstream's answer; with ``remember``, a whole GET's answer is kept and given
            again (writes go on to the upstream, so nothing read back is stale there)."""
            memory = proxy.remembered
            path, _, query = self.path.partition("?")
            # A whole object: no operation in the query (a presigned URL carries only its
            # signature's X-Amz-* fields there) and no Range.
            signature_only = all(field.startswith("X-Amz-") for field in query.split("&") if field)
            whole_get = self.command == "GET" and "Range" not in self.headers and signature_only
            if not (whole_get and path.startswith(proxy.remember or ("\0",))):
                return self._forward(body)
            kept = memory.get(path)
            if kept is None:
                kept = self._forward(body)
                if kept[0] == 200:
                    memory[path] = kept
            return kept

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                  timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("transfer-encoding", "connection")}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                answer = response.read()
                kept = [(k, v) for k, v in response.getheaders()
                        if k.lower() not in ("transfer-encoding", "connection", "content-length")]
                kept.append(("Content-Length", response.getheader("Content-Length") or str(len(answer))))
                return response.status, kept, answer
            finally:
                upstream.close()

        def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _drop(self) -> None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)

    return Handler

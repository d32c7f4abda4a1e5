"""The chaos run's proxies: launch refusals in time windows at the Jobs API, and a TCP relay.

``LaunchGate`` stands in front of a Ray head's dashboard port; the dispatcher is given its
address instead of the head's. Every request passes through unchanged, except ``POST /api/jobs/``
(a launch, ``submit_job``) during a refusal window, which gets ``500`` as a Jobs API that is
overloaded or restarting would answer. ``arm`` makes the next launch open a window, so a window
always refuses at least one launch; ``refused`` holds the time and submission id of each
refusal. The upstream can be moved (``upstream = ...``) when a new cluster replaces the old
one, so the dispatcher keeps its address across a whole-cluster loss. (``bench/jobsproxy.py``
refuses a number of launches instead, for the dispatcher's tests.)

``Relay`` is a plain TCP relay: a port on one address that forwards to another, so that nodes in
network namespaces (``bench/netns.py``) reach a server that listens on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

_HOP = ("transfer-encoding", "connection", "content-length", "keep-alive")


class LaunchGate:
    """``LaunchGate("http://127.0.0.1:8265")``; ``.address`` is what the dispatcher is given."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.refuse_until = 0.0  # time.monotonic(); launches before it are refused
        self.armed_s = 0.0  # above 0: the next launch opens a window this long
        self.refused: list[tuple[float, str]] = []  # time.time() and submission id of each
        self.launches = 0  # launches passed through
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def arm(self, seconds: float) -> None:
        self.armed_s = seconds

    def refuses(self, body: bytes) -> bool:
        """Whether this launch is refused (and noted), opening an armed window first."""
        with self._lock:
            if self.armed_s:
                self.refuse_until = time.monotonic() + self.armed_s
                self.armed_s = 0.0
            if time.monotonic() >= self.refuse_until:
                self.launches += 1
                return False
            self.refused.append((time.time(), _submission_id(body)))
            return True

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-answer is normal for a proxy


def _handler(gate: LaunchGate) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def _any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            launch = self.command == "POST" and self.path.rstrip("/") == "/api/jobs"
            if launch and gate.refuses(body):
                return self._send(500, b"Jobs API unavailable (batchinf chaos run)", [])
            self._send(*self._forward(body))

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _any

        def _forward(self, body: bytes) -> tuple[int, bytes, list[tuple[str, str]]]:
            target = urlsplit(gate.upstream)
            upstream = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port,
                                                  timeout=120)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                answer = response.read()
                kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _HOP]
                return response.status, answer, kept
            except OSError as exc:  # the head is gone: what a client would see from it
                return 502, f"upstream unreachable: {exc}".encode(), []
            finally:
                upstream.close()

        def _send(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

    return Handler


def _submission_id(body: bytes) -> str:
    try:
        return str(json.loads(body).get("submission_id") or "")
    except (ValueError, AttributeError):
        return ""


class Relay:
    """Forward TCP connections from ``host``:(free port) to ``target`` (``host:port``)."""

    def __init__(self, host: str, target: str) -> None:
        name, port = target.rsplit(":", 1)
        self.target = (name, int(port))
        self._listener = socket.create_server((host, 0))
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        host, port = self._listener.getsockname()[:2]
        return f"{host}:{port}"

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._pair, args=(client,), daemon=True).start()

    def _pair(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=30)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()
        _pipe(client, upstream)


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    """Copy until either side closes, then close both."""
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

"""An HTTP proxy for a Ray head's dashboard and Jobs API on 127.0.0.1 that refuses launches.

Everything passes through to the head unchanged except ``POST /api/jobs/`` (a job submission),
which, while ``refusing`` is above zero (each refusal counts it down; ``-1`` refuses for ever),

    refuse   answers HTTP 500 without passing it on: the cluster refused the launch
    lose     passes it on (the job is launched), then answers HTTP 500: the answer was lost

Used by the dispatcher's tests and the chaos run (``bench.chaos``). ``counts`` tells what it did.
"""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}


class JobsProxy:
    def __init__(self, upstream: str, *, refusing: int = 0, mode: str = "refuse") -> None:
        if mode not in ("refuse", "lose"):
            raise ValueError(f"mode is refuse or lose, got {mode!r}")
        self.upstream = urlsplit(upstream)
        self.refusing, self.mode = refusing, mode
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def refuse(self, count: int = -1, mode: str = "refuse") -> None:
        """Refuse the next ``count`` submissions (-1: all, until ``accept``)."""
        with self._lock:
            self.refusing, self.mode = count, mode

    def accept(self) -> None:
        self.refuse(0)

    def _take_refusal(self) -> str | None:
        with self._lock:
            if self.refusing == 0:
                return None
            if self.refusing > 0:
                self.refusing -= 1
            self.counts[self.mode] += 1
            return self.mode

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> JobsProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler(proxy: JobsProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            launch = self.command == "POST" and self.path.rstrip("/") == "/api/jobs"
            refusal = proxy._take_refusal() if launch else None
            if refusal == "refuse":
                return self._answer(500, b'{"message": "launch refused by the test proxy"}')
            upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port,
                                                  timeout=60)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                reply = upstream.getresponse()
                data = reply.read()
            except OSError as exc:
                return self._answer(502, str(exc).encode())
            finally:
                upstream.close()
            if refusal == "lose":
                return self._answer(500, b'{"message": "answer lost by the test proxy"}')
            self._answer(reply.status, data, [(k, v) for k, v in reply.getheaders()
                                              if k.lower() not in _HOP_BY_HOP])

        def _answer(self, status: int, data: bytes,
                    headers: list[tuple[str, str]] | None = None) -> None:
            self.send_response(status)
            for key, value in headers or [("Content-Type", "application/json")]:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _forward

    return Handler

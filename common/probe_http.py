"""A small HTTP server in a thread of its own, for health probes and metric scrapes.

It answers while the process's event loop is busy (so ``/health`` can say the loop has stalled) and
whatever happens on the service's own port (a flood of idle connections there does not reach it).
Each route is a function returning ``(status, content type, body)``; it runs in the server's thread.
A connection silent for ``timeout_s`` is closed, so the probe port itself cannot be held open.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

log = logging.getLogger("mgpu.probe")

Route = Callable[[], tuple[int, str, bytes]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], routes: Mapping[str, Route], timeout_s: float,
                 reuse_port: bool) -> None:
        self.routes = routes
        self.timeout_s = timeout_s
        self.reuse_port = reuse_port
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.reuse_port:  # several gateway processes on one host share the probe port
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def setup(self) -> None:
        self.request.settimeout(self.server.timeout_s)
        super().setup()

    def do_GET(self) -> None:
        route = self.server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            code, ctype, body = 404, "text/plain", b"not found\n"
        else:
            try:
                code, ctype, body = route()
            except Exception:
                log.exception("probe route %s failed", self.path)
                code, ctype, body = 500, "text/plain", b"probe failed\n"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class ProbeServer:
    def __init__(self, routes: Mapping[str, Route], *, timeout_s: float = 5.0) -> None:
        self.routes = dict(routes)
        self.timeout_s = timeout_s
        self.server: _Server | None = None
        self.port = 0

    def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0: a free port) and serve from a daemon thread; returns the port."""
        self.server = _Server((host, port), self.routes, self.timeout_s, reuse_port)
        self.port = int(self.server.server_address[1])
        threading.Thread(target=self.server.serve_forever, name="mgpu-probe-http", daemon=True).start()
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

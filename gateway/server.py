"""The gateway's HTTP server: uvicorn with its httptools protocol, guarded against slow and idle clients.

uvicorn has a keep-alive timeout between requests but none for receiving a request: a connection
that opens and sends nothing, or half a request line, holds its socket for ever, and enough of them
exhaust the process's file descriptors.  :class:`GuardedHttpToolsProtocol` adds two limits:

* **read timeout**: a request's headers must arrive within ``http_read_timeout_s`` of the connection
  opening (or of the previous response); otherwise the server answers 408 and closes.  (The body has
  the same limit, enforced where the handler reads it: ``gateway.serving.read_json``.)
* **connection limit**: past ``max_connections`` open connections, a request gets an OpenAI-style
  503 with ``Retry-After`` and the connection is closed, instead of the socket being refused.

``/health``, ``/ready`` and ``/metrics`` are also served on a listener of their own
(:mod:`common.probe_http`), which answers however many connections the main port holds.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("mgpu.gateway.server")

ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


@dataclass
class Limits:
    read_timeout_s: float = 10.0
    max_connections: int = 10_000
    retry_after_s: int = 1


def _overloaded(retry_after_s: int) -> ASGIApp:
    body = orjson.dumps({"error": {"message": "the gateway is at its connection limit; retry later",
                                   "type": "service_unavailable", "param": None, "code": "too_many_connections"}})

    async def app(_scope: Any, _receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"retry-after", str(retry_after_s).encode()),
            (b"connection", b"close"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                b"content-length: %d\r\n\r\n")
_TIMEOUT_BODY = orjson.dumps({"error": {"message": "the request's headers did not arrive in time",
                                        "type": "invalid_request_error", "param": None, "code": "read_timeout"}})


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header read timeout and a connection limit (see the module)."""

    limits = Limits()  # set once per process by :func:`configure`, before the server starts

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._read_timer: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._read_timer = self.loop.call_later(self.limits.read_timeout_s, self._read_timed_out)

    def _disarm(self) -> None:
        timer = getattr(self, "_read_timer", None)
        if timer is not None:
            timer.cancel()
            self._read_timer = None

    def _read_timed_out(self) -> None:
        self._read_timer = None
        if not self.transport.is_closing():
            self.transport.write(_TIMEOUT_408 % len(_TIMEOUT_BODY) + _TIMEOUT_BODY)
            self.transport.close()

    def on_headers_complete(self) -> None:
        self._disarm()
        if len(self.connections) > self.limits.max_connections:
            app, self.app = self.app, _overloaded(self.limits.retry_after_s)
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:
            self._arm()  # the next request's headers get the same time (keep-alive's own timeout is shorter)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


def configure(read_timeout_s: float, max_connections: int, retry_after_s: int) -> None:
    """Set this process's limits, and raise its open-file limit so that ``max_connections`` fit."""
    GuardedHttpToolsProtocol.limits = Limits(read_timeout_s, max_connections, retry_after_s)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + 1024  # Redis pools, the probe listener, logs
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open-file limit %d is below max_connections + 1024 (%d): connections past it are refused",
                        new, want)

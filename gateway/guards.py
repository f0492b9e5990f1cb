"""Browser safety: the gateway answers only requests whose ``Host`` header names it, so that a web page a
user opens cannot reach a local gateway through DNS rebinding.  (Bodies must be ``application/json``, which
a page cannot send across origins without a CORS preflight: ``gateway.admission``; CORS itself is off unless
origins are configured: ``gateway.app``.)"""

from __future__ import annotations

from typing import Any

from common import errors
from common.settings import LOOPBACK_HOSTS, GatewaySettings
from gateway.http import error_response


def allowed_hosts(s: GatewaySettings) -> frozenset[str] | None:
    """The Host names the gateway answers to (None: any): as configured, else the loopback names when it
    listens on loopback."""
    if s.allowed_hosts:
        return frozenset(h.lower() for h in s.allowed_hosts)
    return frozenset(LOOPBACK_HOSTS) if s.on_loopback else None


def host_name(header: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class HostGuard:
    """ASGI: a request whose Host header is not an allowed name gets 400 (HTTP only; lifespan passes)."""

    def __init__(self, app: Any, hosts: frozenset[str] | None) -> None:
        self.app = app
        self.hosts = hosts
        self.fastapi = getattr(app, "fastapi", getattr(app, "app", app))

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.hosts is not None and scope["type"] == "http":
            header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
            if host_name(header) not in self.hosts:
                err = errors.InvalidRequest(f"the Host header {header[:100]!r} is not a name this gateway answers "
                                            "to (its allowed_hosts)", param="Host")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)

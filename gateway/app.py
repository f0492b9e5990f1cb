"""The HTTP gateway's app: the lifespan that owns Redis, the reply router, the registry view, the
metrics, the probe listener and the background tasks, and hands them to every request as a
:class:`gateway.state.GatewayState`; the routes (:mod:`gateway.routes`), the errors' HTTP shape
(:mod:`gateway.http`) and the OpenAPI document (:mod:`gateway.openapi`).

A request is admitted (``gateway.admission``), appended to its model's Redis stream and answered
(``gateway.serving``).  The gateway holds no Redis connection per request: a bounded pool serves the
enqueues and one connection reads every reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from common import errors
from common.probe_http import ProbeServer
from common.redis_conn import make_client, redacted
from common.scripts import Scripts
from common.settings import GatewaySettings
from gateway import file_expiry
from gateway.auth import KeyCache, bootstrap_key
from gateway.batches_api import router as batches_routes
from gateway.feeder import Feeder
from gateway.files_api import router as files_routes
from gateway.guards import HostGuard, allowed_hosts
from gateway.http import allowed_methods, error_response, http_exception_error, unexpected_error_response
from gateway.metrics import GatewayMetrics
from gateway.openapi import install_openapi
from gateway.registry import RegistryView
from gateway.replies import ReplyRouter
from gateway.routes import GenerationFastPath, readiness
from gateway.routes import router as routes
from gateway.routing import Balancer
from gateway.state import GatewayState

log = logging.getLogger("mgpu.gateway")


def create_asgi(settings: GatewaySettings | None = None) -> Any:
    """What uvicorn serves: the FastAPI app behind the generation fast path, behind the browser guards (the
    Host header; CORS only for the origins configured)."""
    settings = settings or GatewaySettings.load()
    guarded = HostGuard(GenerationFastPath(create_app(settings)), allowed_hosts(settings))
    if not settings.cors_origins:
        return guarded
    app = CORSMiddleware(guarded, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"],
                         allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "X-Request-Id"])
    app.fastapi = guarded.fastapi  # type: ignore[attr-defined]
    return app


def _probe_routes(state: GatewayState) -> dict[str, Any]:
    """/health (the event loop ticks), /ready and /metrics for the probe listener, answered from its thread."""
    stall = state.settings.loop_stall_s

    def health() -> tuple[int, str, bytes]:
        lag = state.loop_lag_s
        ok = lag < stall
        return (200 if ok else 503), "application/json", orjson.dumps(
            {"status": "ok" if ok else "event loop stalled", "loop_lag_s": round(lag, 3)})

    def ready() -> tuple[int, str, bytes]:
        code, body = readiness(state)
        return code, "application/json", orjson.dumps(body)

    return {"/health": health, "/ready": ready,
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, state.metrics.exposition())}


async def _tick(state: GatewayState, closed: list[bool]) -> None:
    while not closed[0]:
        state.loop_tick = time.monotonic()
        await asyncio.sleep(0.1)


def _lifespan(settings: GatewaySettings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """The app's lifespan: it builds the state every request reads, starts the background tasks and
    the probe listener, and stops them all, bounded, at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = make_client(settings.redis_dsn, max_connections=settings.redis_pool_size,
                             name=f"gateway:{settings.gateway_id}")
        listener = make_client(settings.redis_dsn, max_connections=2, block_ms=1000,
                               name=f"gateway:{settings.gateway_id}:replies")
        replies = ReplyRouter(listener, settings.keys, settings.gateway_id)
        registry = RegistryView(settings.keys, memory_high_water=settings.redis_memory_high_water)
        with contextlib.suppress(redis.RedisError, OSError):
            await registry.refresh(client)
        metrics = GatewayMetrics(view=registry)
        state = GatewayState(settings=settings, redis=client, router=replies, registry=registry,
                             metrics=metrics, scripts=Scripts(client, settings.keys, enqueue_wait=(
                                 settings.enqueue_wait_replicas, settings.enqueue_wait_timeout_ms)
                                 if settings.enqueue_wait_replicas else None),
                             balancer=Balancer(settings.strategy, settings.gateway_id,
                                               settings.affinity_prefix_chars, settings.affinity_vnodes),
                             api_keys=KeyCache(client, settings.keys, settings.key_cache_s))
        if settings.bootstrap_api_key:
            await bootstrap_key(client, settings.keys, settings.bootstrap_api_key)
        app.state.gw = state
        probe = ProbeServer(_probe_routes(state))
        port = probe.start(settings.host, settings.probe_port, reuse_port=settings.gateway_procs > 1)
        closed = [False]
        feeder = Feeder(state)
        tasks = [asyncio.create_task(replies.run(), name="replies"),
                 asyncio.create_task(feeder.run(), name="batch-feeder"),
                 asyncio.create_task(file_expiry.run(state, closed), name="file-expiry"),
                 asyncio.create_task(registry.run(client, settings.registry_refresh_s), name="registry"),
                 asyncio.create_task(metrics.run_monitor(client, settings.keys, settings.queue_metrics_interval_s),
                                     name="queue-metrics"),
                 asyncio.create_task(_tick(state, closed), name="tick")]
        log.info("gateway %s ready on redis %s; probes on http://%s:%d/health", settings.gateway_id,
                 redacted(settings.redis_url), settings.host, port)
        try:
            yield
        finally:
            log.info("gateway %s shutting down", settings.gateway_id)
            replies.closed = registry.closed = metrics.closed = closed[0] = True
            probe.close()
            await feeder.close()
            for t in tasks:
                t.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=3.0)
            for t in stuck:
                log.error("background task %s did not stop: %s", t.get_name(), t.get_stack(limit=5))
            state.scripts.close()
            replies.close()
            await _close_pools(client, listener)
            metrics.close()
            log.info("gateway %s stopped", settings.gateway_id)

    return lifespan


async def _close_pools(*clients: aioredis.Redis) -> None:
    for c in clients:
        try:
            await asyncio.wait_for(c.aclose(), 3.0)
        except (TimeoutError, redis.RedisError, OSError) as exc:
            log.warning("closing a Redis pool failed: %r", exc)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings.load()
    app = FastAPI(title="mgpu", version="0.1.0", lifespan=_lifespan(settings), docs_url=None, redoc_url=None,
                  redirect_slashes=False)  # a redirect would build its Location from the client's Host header

    @app.exception_handler(errors.MgpuError)
    async def _mgpu_error(_request: Request, exc: errors.MgpuError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:  # every route of the path, not only the first one the router tried
            exc.headers = {**(exc.headers or {}), "Allow": allowed_methods(request)}
        return error_response(http_exception_error(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        return unexpected_error_response(exc)

    app.include_router(routes)
    app.include_router(files_routes)
    app.include_router(batches_routes)
    install_openapi(app, lambda: app.state.gw.registry.live_models() if hasattr(app.state, "gw") else [])
    return app

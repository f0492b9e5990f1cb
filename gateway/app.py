"""The HTTP gateway: app factory, lifespan, routes, and the one place errors become HTTP.

A request is admitted (``gateway.serving``: read, validated, turned into a WorkItem), appended to its
model's Redis stream (one Lua call, which also enforces the queue limits and idempotency keys), and
awaited through the gateway's reply stream.  The gateway holds no Redis connection per request: a
bounded pool serves the enqueues and one connection reads every reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import errors
from common.logs import set_request_id
from common.outcomes import outcome_of
from common.probe_http import ProbeServer
from common.protocol import StreamFormatter, error_body, full_response
from common.redis_conn import make_client
from common.schemas import ANONYMOUS, Kind, Result
from common.scripts import Duplicate, Scripts
from common.settings import GatewaySettings, Settings
from gateway import serving
from gateway.metrics import GatewayMetrics
from gateway.openapi import install_openapi
from gateway.registry import RegistryView
from gateway.replies import Event, ReplyRouter, Waiter
from gateway.routing import Balancer, affinity_key
from gateway.state import GatewayState

log = logging.getLogger("mgpu.gateway")

_ENDPOINTS: dict[Kind, str] = {"chat": "chat", "completion": "completions"}


def _state(request: Request) -> GatewayState:
    return request.app.state.gw  # type: ignore[no-any-return]


def _orjson(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


# ----------------------------------------------------------------------------- accounting


@dataclass
class Access:
    """One request's access-log line and metrics."""

    endpoint: str
    started: float
    model: str = "-"  # a bounded label: a served model, or "unknown"
    request_id: str = "-"
    trace: str | None = None
    outcome: str = "success"
    status: int = 200


def _account(state: GatewayState, a: Access, ended: float | None = None) -> None:
    duration = (ended or time.perf_counter()) - a.started
    state.metrics.observe(a.model, a.endpoint, a.outcome, a.status, duration)
    if state.settings.log_requests:
        extra: dict[str, Any] = {"request_id": a.request_id, "model": a.model, "endpoint": a.endpoint,
                                 "outcome": a.outcome, "code": a.status, "duration_ms": round(duration * 1000, 1)}
        if a.trace is not None:
            extra["trace_id"] = a.trace
        log.info("request done", extra=extra)


# ----------------------------------------------------------------------------- generation


async def _generate(request: Request, kind: Kind) -> Response:
    state = _state(request)
    s = state.settings
    a = Access(endpoint=_ENDPOINTS[kind], started=time.perf_counter())
    streamed = False
    try:
        trace = a.trace = serving.trace_id(request)
        key = serving.idempotency_key(request)
        body = await serving.read_json(request, s.max_body_bytes, s.http_read_timeout_s)
        model = body.get("model")
        a.model = state.model_label(model if isinstance(model, str) else None)
        adm = serving.admit(state, kind, body, trace, key, ANONYMOUS)
        item = adm.item
        a.request_id = item.id
        set_request_id(item.id)
        route = state.balancer.plan(state.registry, s.keys, item.model, lambda: affinity_key(
            adm.req.user, request.headers.get("x-session-id"), item.prompt, item.messages, s.affinity_prefix_chars))
        w = state.router.register(item.id, item.stream)
        try:
            queued = await serving.enqueue(state, adm, route)
        except BaseException:
            state.router.unregister(w)
            raise
        deadline = item.deadline or time.time()
        if isinstance(queued, Duplicate):  # a retry: answer with the original, do not generate again
            state.router.unregister(w)
            serving.check_reuse(adm, queued.first)
            rid = a.request_id = queued.first.request_id
            headers = {"X-Request-Id": trace or rid}
            events = serving.follow(state, rid, item.stream, deadline)
            if item.stream:
                streamed = True
                return _streaming(state, events, adm, rid, queued.first.created, a, headers, None, cancel=False)
            result = await serving.final_result(events, rid)
            return _orjson(serving.json_answer(result, item.model), headers=headers)
        target = None if queued.fell_back else route.target
        state.balancer.count(target)
        state.metrics.routed.labels(target or "shared", route.strategy).inc()
        w.future.add_done_callback(lambda _f: state.balancer.done(route))
        headers = {"X-Request-Id": trace or item.id}
        if item.stream:
            streamed = True  # the stream accounts for itself when it ends
            return _streaming(state, serving.waiter_events(w, deadline), adm, item.id, item.created, a, headers, w,
                              cancel=adm.idem_key is None)
        state.metrics.in_flight.inc()
        try:
            result = await serving.until_result_or_disconnect(state, request, w, item,
                                                              keep_on_disconnect=adm.idem_key is not None)
        finally:
            state.metrics.in_flight.dec()
            state.router.unregister(w)
        return _orjson(serving.json_answer(result, item.model), headers=headers)
    except errors.MgpuError as exc:
        a.status, a.outcome = exc.status, outcome_of(exc)
        raise
    except Exception:
        a.status, a.outcome = 500, "failed"
        raise
    finally:
        if not streamed:  # accounted for after the response is on its way, off the latency path
            asyncio.get_running_loop().call_soon(_account, state, a, time.perf_counter())


def _streaming(state: GatewayState, events: AsyncIterator[Event], adm: serving.Admission, request_id: str,
               created: int, a: Access, headers: dict[str, str], w: Waiter | None, *, cancel: bool) -> Response:
    """The SSE response of a stream; when it ends without its result (the client went away, the deadline
    passed) the request is cancelled, unless ``cancel`` is off (an idempotent request's client comes back)."""
    item = adm.item
    include_usage = bool(adm.req.stream_options and adm.req.stream_options.include_usage)
    fmt = StreamFormatter(request_id, item.kind, created, item.model, item.params.n, include_usage)
    end = serving.StreamEnd()

    async def body() -> AsyncIterator[bytes]:
        state.metrics.in_flight.inc()
        try:
            async for part in serving.sse(events, fmt, request_id, end):
                yield part
        finally:
            state.metrics.in_flight.dec()
            if w is not None:
                state.router.unregister(w)
            if end.first_token_at is not None:
                state.metrics.ttft.labels(a.model).observe(end.first_token_at - a.started)
            a.outcome, a.status = end.outcome, end.status
            _account(state, a)
            if not end.got_result and cancel:
                await asyncio.shield(state.cancel(request_id))

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})


# ----------------------------------------------------------------------------- errors -> HTTP


def error_response(exc: errors.MgpuError) -> Response:
    """The one place an mgpu error becomes an HTTP response (status, OpenAI body, Retry-After, headers)."""
    headers = dict(exc.headers or {})
    if exc.retry_after:
        headers["Retry-After"] = str(int(exc.retry_after))
    return _orjson(error_body(exc), status=exc.status, headers=headers or None)


def unexpected_error_response(exc: Exception) -> Response:
    log.error("unexpected error", exc_info=exc)
    return _orjson(error_body(errors.MgpuError("internal error")), status=500)


def http_exception_error(exc: StarletteHTTPException) -> errors.MgpuError:
    """The framework's own errors (no such route, wrong method) as mgpu errors, headers kept."""
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        return errors.NotFound("no such route", headers=headers)
    if exc.status_code == 405:
        return errors.MethodNotAllowed(f"method not allowed; allowed: {headers.get('Allow', '?')}", headers=headers)
    err = errors.RequestError(str(exc.detail), headers=headers)
    err.status = exc.status_code  # type: ignore[misc]
    return err


# ----------------------------------------------------------------------------- app

_FAST_ROUTES: dict[str, Kind] = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}


class GenerationFastPath:
    """ASGI wrapper that serves the two generation endpoints directly, skipping the framework's
    per-request middleware and dependency layers (a third of the gateway's CPU per request);
    everything else, the lifespan included, goes to the FastAPI app.  Same handler, same errors."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = _FAST_ROUTES.get(scope.get("path", "")) if scope["type"] == "http" else None
        if kind is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        scope["app"] = self.app
        request = Request(scope, receive, send)
        try:
            response = await _generate(request, kind)
        except errors.MgpuError as exc:
            response = error_response(exc)
        except Exception as exc:
            response = unexpected_error_response(exc)
        await response(scope, receive, send)


def create_asgi(settings: GatewaySettings | None = None) -> GenerationFastPath:
    """What uvicorn serves: the FastAPI app behind the generation fast path."""
    return GenerationFastPath(create_app(settings))


def _probe_routes(state: GatewayState) -> dict[str, Any]:
    """/health (the event loop ticks), /ready and /metrics for the probe listener, answered from its thread."""
    stall = state.settings.loop_stall_s

    def health() -> tuple[int, str, bytes]:
        lag = state.loop_lag_s
        ok = lag < stall
        return (200 if ok else 503), "application/json", orjson.dumps(
            {"status": "ok" if ok else "event loop stalled", "loop_lag_s": round(lag, 3)})

    def ready() -> tuple[int, str, bytes]:
        code, body = _readiness(state)
        return code, "application/json", orjson.dumps(body)

    return {"/health": health, "/ready": ready,
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, state.metrics.exposition())}


def _readiness(state: GatewayState) -> tuple[int, dict[str, Any]]:
    live = len(state.registry.live_workers())
    ok = state.ready and live > 0
    return (200 if ok else 503), {"status": "ready" if ok else "not ready", "redis": state.registry.redis_ok,
                                  "live_workers": live}


async def _tick(state: GatewayState, closed: list[bool]) -> None:
    while not closed[0]:
        state.loop_tick = time.monotonic()
        await asyncio.sleep(0.1)


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or Settings.load()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = make_client(settings.redis_url, max_connections=settings.redis_pool_size,
                             name=f"gateway:{settings.gateway_id}")
        listener = make_client(settings.redis_url, max_connections=2, block_ms=1000,
                               name=f"gateway:{settings.gateway_id}:replies")
        router = ReplyRouter(listener, settings.keys, settings.gateway_id)
        registry = RegistryView(settings.keys, memory_high_water=settings.redis_memory_high_water)
        with contextlib.suppress(redis.RedisError, OSError):
            await registry.refresh(client)
        metrics = GatewayMetrics(view=registry)
        state = GatewayState(settings=settings, redis=client, router=router, registry=registry,
                             metrics=metrics, scripts=Scripts(client, settings.keys),
                             balancer=Balancer(settings.strategy, settings.gateway_id,
                                               settings.affinity_prefix_chars, settings.affinity_vnodes))
        app.state.gw = state
        probe = ProbeServer(_probe_routes(state))
        port = probe.start(settings.host, settings.probe_port, reuse_port=settings.gateway_procs > 1)
        closed = [False]
        tasks = [asyncio.create_task(router.run(), name="replies"),
                 asyncio.create_task(registry.run(client, settings.registry_refresh_s), name="registry"),
                 asyncio.create_task(metrics.run_monitor(client, settings.keys, settings.queue_metrics_interval_s),
                                     name="queue-metrics"),
                 asyncio.create_task(_tick(state, closed), name="tick")]
        log.info("gateway %s ready on redis %s; probes on http://%s:%d/health", settings.gateway_id,
                 settings.redis_url, settings.host, port)
        try:
            yield
        finally:
            log.info("gateway %s shutting down", settings.gateway_id)
            router.closed = registry.closed = metrics.closed = closed[0] = True
            probe.close()
            for t in tasks:
                t.cancel()
            _, stuck = await asyncio.wait(tasks, timeout=3.0)
            for t in stuck:
                log.error("background task %s did not stop: %s", t.get_name(), t.get_stack(limit=5))
            for c in (client, listener):
                try:
                    await asyncio.wait_for(c.aclose(), 3.0)
                except (TimeoutError, redis.RedisError, OSError) as exc:
                    log.warning("closing a Redis pool failed: %r", exc)
            metrics.close()
            log.info("gateway %s stopped", settings.gateway_id)

    app = FastAPI(title="mgpu", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  redirect_slashes=False)  # a redirect would build its Location from the client's Host header

    @app.exception_handler(errors.MgpuError)
    async def _mgpu_error(_request: Request, exc: errors.MgpuError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        return error_response(http_exception_error(exc))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        return unexpected_error_response(exc)

    @app.post("/v1/completions", name="completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, "completion")

    @app.post("/v1/chat/completions", name="chat_completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, "chat")

    @app.get("/v1/models", name="models")
    async def models(request: Request) -> Response:
        reg = _state(request).registry
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "mgpu"} for m in reg.live_models()]
        return _orjson({"object": "list", "data": data})

    @app.get("/v1/requests/{request_id}", name="get_request")
    async def get_request(request: Request, request_id: str) -> Response:
        state = _state(request)
        with errors.redis_unavailable(retry_after=state.settings.retry_after_s):
            raw = await state.redis.get(state.settings.keys.result(request_id))
        result: Result | None = None if raw is None else serving.read_result(request_id, raw)
        if result is None or (result.scope or ANONYMOUS) != ANONYMOUS:  # another caller's: as if absent
            raise errors.NotFound(f"no finished request '{request_id}'")
        if result.error is not None:
            return _orjson({"id": result.id, **error_body(errors.from_info(result.error))},
                           status=result.error.status)
        return _orjson(full_response(result, result.model))

    @app.get("/health", name="health")
    async def health() -> Response:
        return _orjson({"status": "ok"})

    @app.get("/ready", name="ready")
    async def ready(request: Request) -> Response:
        code, body = _readiness(_state(request))
        return _orjson(body, status=code)

    @app.get("/workers", name="workers")
    async def workers(request: Request) -> Response:
        state = _state(request)
        reg, bal = state.registry, state.balancer
        return _orjson({"strategy": bal.strategy(reg.control), "shared_routed": bal.pushed.get("shared", 0),
                        "workers": [{**w.as_dict(), "pushed": bal.pushed.get(w.id, 0)} for w in reg.workers.values()]})

    @app.get("/metrics", name="metrics")
    async def metrics(request: Request) -> Response:
        body = await asyncio.to_thread(_state(request).metrics.exposition)  # off the event loop
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    install_openapi(app, lambda: app.state.gw.registry.live_models() if hasattr(app.state, "gw") else [])
    return app

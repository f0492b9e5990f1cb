"""The HTTP gateway: FastAPI app factory, lifespan, routes and the one place errors become HTTP.

A request is validated, appended to its model's Redis stream (one Lua call, which also enforces
the queue limit and idempotency keys), and awaited through the gateway's reply stream.  The
gateway holds no Redis connection per request: a bounded pool serves the enqueues and one
connection reads every reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import errors
from common.batching import ScriptBatcher
from common.logs import set_request_id
from common.outcomes import outcome_of
from common.redis_conn import make_client
from common.schemas import (
    ChatCompletionRequest,
    Chunk,
    CompletionRequest,
    Kind,
    Result,
    SamplingParams,
    WorkItem,
    new_request_id,
)
from common.scripts import ENQUEUE
from common.settings import Settings
from gateway.metrics import GatewayMetrics
from gateway.protocol import StreamFormatter, error_body, full_response
from gateway.registry import RegistryView
from gateway.replies import ReplyRouter, Waiter
from gateway.routing import Balancer, affinity_key
from gateway.tokens import PromptCounter

log = logging.getLogger("mgpu.gateway")


@dataclass
class GatewayState:
    settings: Settings
    redis: aioredis.Redis
    router: ReplyRouter
    registry: RegistryView
    metrics: GatewayMetrics
    enqueue: Any
    balancer: Balancer
    prompts: PromptCounter = field(default_factory=PromptCounter)

    @property
    def ready(self) -> bool:
        return self.registry.redis_ok and self.router.healthy

    async def cancel(self, request_id: str) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            await self.redis.xadd(self.settings.keys.cancels, {"r": request_id}, maxlen=10_000, approximate=True)


def _state(request: Request) -> GatewayState:
    return request.app.state.gw  # type: ignore[no-any-return]


def _orjson(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


# ----------------------------------------------------------------------------- validation


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise errors.PayloadTooLarge(f"the request body is over the {limit}-byte limit")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise errors.PayloadTooLarge(f"the request body is over the {limit}-byte limit")
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidRequest(f"could not parse the JSON body: {exc}") from None
    if not isinstance(obj, dict):
        raise errors.InvalidRequest("the request body must be a JSON object")
    return obj


def _validation_error(exc: ValidationError) -> errors.InvalidRequest:
    e = exc.errors()[0]
    param = ".".join(str(p) for p in e["loc"]) or None
    msg = e["msg"] if not param else f"{param}: {e['msg']}"
    return errors.InvalidRequest(msg, param=param)


def _build_item(state: GatewayState, kind: Kind, body: dict[str, Any], request_id: str) -> tuple[WorkItem, Any]:
    s = state.settings
    try:
        req: CompletionRequest | ChatCompletionRequest = (
            ChatCompletionRequest.model_validate(body) if kind == "chat" else CompletionRequest.model_validate(body))
    except ValidationError as exc:
        raise _validation_error(exc) from None
    reg = state.registry
    if not reg.redis_ok:
        raise errors.ServiceUnavailable("the queue (Redis) is unreachable", retry_after=s.retry_after_s)
    live = reg.live_workers(req.model)
    info = reg.models.get(req.model)
    if not live:
        if info is None:
            raise errors.ModelNotFound(f"the model '{req.model}' does not exist", param="model")
        raise errors.ServiceUnavailable(f"no live worker serves '{req.model}' right now",
                                        retry_after=s.retry_after_s)
    max_len = info.max_model_len if info is not None else 0
    if isinstance(req, ChatCompletionRequest):
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        prompt = None
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
    else:
        messages = None
        prompt = req.prompt_text()
        logprobs = req.logprobs
    max_tokens = req.max_tokens if req.max_tokens is not None else (16 if kind == "completion" else None)
    if max_len and max_tokens is not None and max_tokens >= max_len:
        raise errors.InvalidRequest(
            f"max_tokens ({max_tokens}) must be below the model's context length ({max_len})", param="max_tokens")
    n_prompt = state.prompts.count(info.tokenizer, prompt, messages) if max_len and info is not None else None
    if n_prompt is not None and n_prompt + (max_tokens or 1) > max_len:
        raise errors.InvalidRequest(
            f"this model's maximum context length is {max_len} tokens; the prompt has {n_prompt} tokens "
            f"and {max_tokens or 1} completion tokens were asked for", param="messages" if messages else "prompt")
    timeout = req.timeout or s.request_timeout_s
    params = SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, stop=req.stop_list(), seed=req.seed, n=req.n,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logprobs=logprobs)
    item = WorkItem(id=request_id, kind=kind, model=req.model, prompt=prompt, messages=messages, params=params,
                    stream=req.stream, deadline=time.time() + timeout, reply_to=s.gateway_id)
    return item, req


# ----------------------------------------------------------------------------- waiting


async def _wait_disconnect(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


async def _await_result(state: GatewayState, request: Request, w: Waiter, item: WorkItem,
                        keep_on_disconnect: bool) -> Result:
    timeout = max(0.0, (item.deadline or time.time()) - time.time())
    # A request with an idempotency key outlives its connection: the client will come back for it.
    watcher = None if keep_on_disconnect else asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        waiting = (w.future,) if watcher is None else (w.future, watcher)
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if watcher is not None:
            watcher.cancel()
    if w.future in done:
        _kind, payload = w.future.result()
        return Result.model_validate_json(payload)
    await state.cancel(item.id)
    if watcher is not None and watcher in done:
        raise errors.RequestCancelled("the client disconnected")
    raise errors.RequestTimeout(f"no result within the request's {timeout:.1f}s deadline")


async def _await_existing(state: GatewayState, request_id: str, timeout: float) -> Result:
    """Idempotent retry: the original request may live on another gateway; poll its result key."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    key = state.settings.keys.result(request_id)
    while True:
        raw = await state.redis.get(key)
        if raw is not None:
            return Result.model_validate_json(raw)
        if time.monotonic() >= deadline:
            raise errors.RequestTimeout("the original request has not finished within the deadline")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)


# ----------------------------------------------------------------------------- handlers


async def _generate(request: Request, kind: Kind) -> Response:
    state = _state(request)
    s = state.settings
    started = time.perf_counter()
    endpoint = "chat" if kind == "chat" else "completions"
    model_label = "-"
    status = 200
    outcome = "success"
    request_id = "-"
    streamed = False
    try:
        body = await _read_json(request, s.max_body_bytes)
        model_label = str(body.get("model") or "-")[:64]
        idem = request.headers.get("idempotency-key") or request.headers.get("x-request-id")
        request_id = idem if idem and len(idem) <= 200 else new_request_id(kind)
        set_request_id(request_id)
        item, req = _build_item(state, kind, body, request_id)
        model_label = item.model
        route = state.balancer.plan(state.registry, s.keys, item.model, lambda: affinity_key(
            req.user, request.headers.get("x-session-id"), item.prompt, item.messages, s.affinity_prefix_chars))
        w = state.router.register(item.id, item.stream)
        try:
            rc, val, *fell = await state.enqueue(
                keys=route.enqueue_keys(s.keys.idempotency(idem or "-")),
                args=[s.max_queue_len, item.to_fields()["p"], item.id, s.result_ttl_s, "1" if idem else "0"])
        except (redis.RedisError, OSError) as exc:
            state.router.unregister(w)
            raise errors.ServiceUnavailable(f"could not enqueue: {exc}", retry_after=s.retry_after_s) from None
        if rc == 0:
            state.router.unregister(w)
            raise errors.QueueFull(f"the queue for '{item.model}' is full", retry_after=s.retry_after_s)
        if rc == 1:
            target = None if fell and fell[0] == 1 else route.target
            state.balancer.count(target)
            state.metrics.routed.labels(target or "shared", route.strategy).inc()
            w.future.add_done_callback(lambda _f: state.balancer.done(route))
        if rc == 2:  # a retry of an accepted request: answer with the original result
            state.router.unregister(w)
            result = await _await_existing(state, val.decode(), max(0.0, (item.deadline or 0) - time.time()))
            if result.error is not None:
                raise errors.from_info(result.error)
            return _orjson(full_response(result, item.model))
        if item.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            fmt = StreamFormatter(item.id, kind, item.created, item.model, item.params.n, include_usage)
            streamed = True  # _sse accounts for it when the stream ends
            return StreamingResponse(_sse(state, w, item, fmt, started, cancel_on_close=idem is None),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Request-Id": item.id})
        state.metrics.in_flight.inc()
        try:
            result = await _await_result(state, request, w, item, keep_on_disconnect=idem is not None)
        finally:
            state.metrics.in_flight.dec()
            state.router.unregister(w)
        if result.error is not None:
            raise errors.from_info(result.error)
        return _orjson(full_response(result, item.model), headers={"X-Request-Id": item.id})
    except errors.MgpuError as exc:
        status, outcome = exc.status, outcome_of(exc)
        raise
    except Exception:
        status, outcome = 500, "failed"
        raise
    finally:
        if not streamed:  # accounted for after the response is on its way, off the latency path
            asyncio.get_running_loop().call_soon(_account, state, model_label, endpoint, outcome, status, started,
                                                 request_id, time.perf_counter())


def _account(state: GatewayState, model: str, endpoint: str, outcome: str, status: int, started: float,
             request_id: str, ended: float | None = None) -> None:
    """Metrics and the access log line of one finished request."""
    duration = (ended or time.perf_counter()) - started
    state.metrics.observe(model, endpoint, outcome, status, duration)
    if state.settings.log_requests:
        log.info("request done", extra={"request_id": request_id, "model": model, "endpoint": endpoint,
                                        "outcome": outcome, "code": status, "duration_ms": round(duration * 1000, 1)})


def _sse_line(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


async def _sse(state: GatewayState, w: Waiter, item: WorkItem, fmt: StreamFormatter,
               started: float, cancel_on_close: bool = True) -> AsyncIterator[bytes]:
    assert w.queue is not None
    finished = False
    first = True
    outcome, status = "cancelled", 499  # the client went away unless the stream ends otherwise
    state.metrics.in_flight.inc()
    try:
        for obj in fmt.role_chunks():
            yield _sse_line(obj)
        while True:
            remaining = max(0.0, (item.deadline or time.time()) - time.time())
            try:
                kind, payload = await asyncio.wait_for(w.queue.get(), remaining)
            except TimeoutError:
                outcome, status = "timeout", 504
                yield _sse_line(error_body(errors.RequestTimeout("the request's deadline passed")))
                yield b"data: [DONE]\n\n"
                return
            if kind == "c":
                chunk = Chunk.model_validate_json(payload)
                if first:
                    first = False
                    state.metrics.ttft.labels(item.model).observe(time.perf_counter() - started)
                for obj in fmt.delta_chunks(chunk.choices):
                    yield _sse_line(obj)
                continue
            finished = True
            result = Result.model_validate_json(payload)
            outcome = outcome_of(result.error)
            status = 200 if result.error is None else result.error.status
            if result.error is not None:
                yield _sse_line(error_body(errors.from_info(result.error)))
            else:
                usage = fmt.usage_chunk(result.usage)
                if usage is not None:
                    yield _sse_line(usage)
            yield b"data: [DONE]\n\n"
            return
    finally:
        state.metrics.in_flight.dec()
        state.router.unregister(w)
        _account(state, item.model, "chat" if item.kind == "chat" else "completions", outcome, status, started,
                 item.id)
        if not finished and cancel_on_close:
            await asyncio.shield(state.cancel(item.id))


# ----------------------------------------------------------------------------- errors -> HTTP


def error_response(exc: errors.MgpuError) -> Response:
    """The one place an mgpu error becomes an HTTP response (status, OpenAI body, Retry-After)."""
    headers = {"Retry-After": str(int(exc.retry_after))} if exc.retry_after else None
    return _orjson(error_body(exc), status=exc.status, headers=headers)


def unexpected_error_response(exc: Exception) -> Response:
    log.error("unexpected error", exc_info=exc)
    return _orjson(error_body(errors.MgpuError("internal error")), status=500)


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


def create_asgi(settings: Settings | None = None) -> GenerationFastPath:
    """What uvicorn serves: the FastAPI app behind the generation fast path."""
    return GenerationFastPath(create_app(settings))



def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.load()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = make_client(settings.redis_url, max_connections=settings.redis_pool_size,
                             name=f"gateway:{settings.gateway_id}")
        listener = make_client(settings.redis_url, max_connections=2, block_ms=1000,
                               name=f"gateway:{settings.gateway_id}:replies")
        router = ReplyRouter(listener, settings.keys, settings.gateway_id)
        registry = RegistryView(settings.keys)
        with contextlib.suppress(redis.RedisError, OSError):
            await registry.refresh(client)
        metrics = GatewayMetrics(view=registry)
        state = GatewayState(settings=settings, redis=client, router=router, registry=registry,
                             metrics=metrics, enqueue=ScriptBatcher(client, ENQUEUE),
                             balancer=Balancer(settings.strategy, settings.gateway_id,
                                               settings.affinity_prefix_chars, settings.affinity_vnodes))
        app.state.gw = state
        tasks = [asyncio.create_task(router.run(), name="replies"),
                 asyncio.create_task(registry.run(client, settings.registry_refresh_s), name="registry"),
                 asyncio.create_task(metrics.run_monitor(client, settings.keys, settings.queue_metrics_interval_s),
                                     name="queue-metrics")]
        log.info("gateway %s ready on redis %s", settings.gateway_id, settings.redis_url)
        try:
            yield
        finally:
            log.info("gateway %s shutting down", settings.gateway_id)
            router.closed = registry.closed = metrics.closed = True
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

    app = FastAPI(title="mgpu", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(errors.MgpuError)
    async def _mgpu_error(_request: Request, exc: errors.MgpuError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        err = errors.RequestError(str(exc.detail))
        body = error_body(err)
        body["error"]["code"] = exc.status_code
        return _orjson(body, status=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> Response:
        return unexpected_error_response(exc)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, "chat")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        reg = _state(request).registry
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "mgpu"} for m in reg.live_models()]
        return _orjson({"object": "list", "data": data})

    @app.get("/v1/requests/{request_id}")
    async def get_request(request: Request, request_id: str) -> Response:
        state = _state(request)
        try:
            raw = await state.redis.get(state.settings.keys.result(request_id))
        except (redis.RedisError, OSError) as exc:
            raise errors.ServiceUnavailable(f"Redis is unreachable: {exc}") from None
        if raw is None:
            raise errors.NotFound(f"no finished request '{request_id}'")
        result = Result.model_validate_json(raw)
        if result.error is not None:
            return _orjson({"id": result.id, **error_body(errors.from_info(result.error))},
                           status=result.error.status)
        return _orjson(full_response(result, result.model))

    @app.get("/health")
    async def health() -> Response:
        return _orjson({"status": "ok"})

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        state = _state(request)
        live = len(state.registry.live_workers())
        ok = state.ready and live > 0
        body = {"status": "ready" if ok else "not ready", "redis": state.registry.redis_ok, "live_workers": live}
        return _orjson(body, status=200 if ok else 503)

    @app.get("/workers")
    async def workers(request: Request) -> Response:
        state = _state(request)
        reg, bal = state.registry, state.balancer
        return _orjson({"strategy": bal.strategy(reg.control), "shared_routed": bal.pushed.get("shared", 0),
                        "workers": [{**w.as_dict(), "pushed": bal.pushed.get(w.id, 0)} for w in reg.workers.values()]})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(_state(request).metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    return app

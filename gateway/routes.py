"""The gateway's routes, thin: each reads the lifespan's state and hands the work to
:mod:`gateway.serving` (the endpoints workers answer: chat, completions, embeddings, tokenize,
detokenize, responses) or answers from the state (models, stored requests, probes, workers, metrics).
The worker endpoints are also served by :class:`GenerationFastPath`, an ASGI layer in front of FastAPI
that calls the same handler directly: measured in one run on one fleet against plain Starlette and
FastAPI routes (docs/benchmarks.md, "Routing the generation endpoints"), it needs the least gateway
CPU per request at saturation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from common import errors
from common.responses import error_body
from common.schemas import ANONYMOUS, PATHS, Kind, Result
from gateway import serving
from gateway.auth import Caller, authenticate
from gateway.http import error_response, json_response, unexpected_error_response
from gateway.state import GatewayState

router = APIRouter()


def _state(request: Request) -> GatewayState:
    return request.app.state.gw  # type: ignore[no-any-return]


def readiness(state: GatewayState) -> tuple[int, dict[str, Any]]:
    live = len(state.registry.live_workers())
    ok = state.ready and (live > 0 or state.settings.scale_from_zero)  # scaled to zero: queue, an autoscaler acts
    return (200 if ok else 503), {"status": "ready" if ok else "not ready", "redis": state.registry.redis_ok,
                                  "live_workers": live}


def _worker_endpoint(kind: Kind) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await serving.handle(request, kind)

    return endpoint


for _kind, _path in PATHS.items():  # the endpoints a worker answers: chat, completions, embeddings, ...
    router.add_api_route(_path, _worker_endpoint(_kind), methods=["POST"], name=_kind)


async def _caller(request: Request) -> Caller:
    state = _state(request)
    return await authenticate(request, state.settings.auth, state.api_keys, state.settings.retry_after_s)


@router.get("/v1/models", name="models")
async def models(request: Request) -> Response:
    """What live workers serve, models and adapters, in vLLM's shape (``root``, ``parent``, ``max_model_len``);
    with API keys, those the caller's key may use."""
    caller = await _caller(request)
    reg = _state(request).registry
    data = []
    for name in reg.live_models():
        if caller.key is not None and not caller.key.allows(name):
            continue
        f = reg.models.get(name)
        data.append({"id": name, "object": "model", "created": f.created if f else 0,
                     "owned_by": f.owned_by if f else "mgpu", "root": (f.root or None) if f else None,
                     "parent": f.parent if f else None, "max_model_len": (f.max_model_len or None) if f else None})
    return json_response({"object": "list", "data": data})


@router.get("/v1/requests/{request_id}", name="get_request")
async def get_request(request: Request, request_id: str) -> Response:
    state = _state(request)
    caller = await _caller(request)
    keys, models = state.settings.keys, sorted(state.registry.models)  # results are kept per model
    with errors.redis_unavailable(retry_after=state.settings.retry_after_s):
        names = [keys.result(m, request_id) for m in models]
        # on a Redis Cluster the models' results are on different slots: one MGET per slot (redis-py's)
        raws = (await (state.redis.mget_nonatomic(names) if keys.cluster  # type: ignore[attr-defined]
                       else state.redis.mget(names))) if names else []
    found = next(((m, raw) for m, raw in zip(models, raws, strict=True) if raw is not None), None)
    result: Result | None = None if found is None else serving.read_result(request_id, found[1])
    if result is None or (result.scope or ANONYMOUS) != caller.scope:  # another caller's: as if absent
        raise errors.NotFound(f"no finished request '{request_id}'")
    if result.error is not None:
        return json_response({"id": result.id, **error_body(errors.from_info(result.error))},
                             status=result.error.status)
    if result.body is None:  # a stream: its events again, from the request's chunk stream
        with errors.redis_unavailable(retry_after=state.settings.retry_after_s):
            entries = await state.redis.xrange(keys.chunks(result.model, request_id))
        sse = "".join(serving.chunk_sse(request_id, f[b"c"]) for _id, f in entries)
        return Response(sse.encode(), media_type="text/event-stream")
    return json_response(result.body, status=result.status)


@router.get("/health", name="health")
async def health() -> Response:
    return json_response({"status": "ok"})


@router.get("/ready", name="ready")
async def ready(request: Request) -> Response:
    code, body = readiness(_state(request))
    return json_response(body, status=code)


@router.get("/workers", name="workers")
async def workers(request: Request) -> Response:
    """The registry as this gateway sees it (hosts, pids, ports): with API keys, for an admin key only."""
    (await _caller(request)).check_admin()
    state = _state(request)
    reg, bal = state.registry, state.balancer
    return json_response({"strategy": bal.strategy(reg.control), "shared_routed": bal.pushed.get("shared", 0),
                          "workers": [{**w.as_dict(), "pushed": bal.pushed.get(w.id, 0)}
                                      for w in reg.workers.values()]})


@router.get("/metrics", name="metrics")
async def metrics(request: Request) -> Response:
    """Prometheus metrics; with API keys, for an admin key only on the API port (they name the keys).  The
    probe listener (port + 1, not published) serves them to Prometheus without a key."""
    (await _caller(request)).check_admin()
    body = await asyncio.to_thread(_state(request).metrics.exposition)  # off the event loop
    return Response(body, media_type=CONTENT_TYPE_LATEST)


_FAST_ROUTES: dict[str, Kind] = {path: kind for kind, path in PATHS.items()}


class GenerationFastPath:
    """ASGI wrapper that serves the worker endpoints directly, skipping the framework's
    per-request middleware and dependency layers; everything else, the lifespan included, goes to the
    FastAPI app.  Same handler, same errors (see the module docstring for the measurement)."""

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
            response = await serving.handle(request, kind)
        except errors.MgpuError as exc:
            response = error_response(exc)
        except Exception as exc:
            response = unexpected_error_response(exc)
        await response(scope, receive, send)

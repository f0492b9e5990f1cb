"""``mgpu sim-server``: the sim engine alone behind an OpenAI-compatible HTTP server.

No Redis and no gateway: one process, one :class:`SimEngine`, requests go straight to the engine
(which queues what exceeds its slots, as a vLLM server does).  It exists so that a push router
(nginx, a Kubernetes Service, ...) can be put in front of the same simulated fleet that mgpu's
workers run, for a like-for-like comparison.  ``/v1/completions`` and ``/v1/chat/completions``,
streaming or not: the same OpenAI layer as a sim worker's (:mod:`gpu_worker.serving.sim`).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from common import errors
from common.responses import error_body
from common.schemas import Kind, WorkItem, new_request_id
from common.settings import SimServerSettings
from gpu_worker.engine.sim import SimEngine
from gpu_worker.serving.base import Call, Piece, Reply
from gpu_worker.serving.sim import SimServer


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


class _SimApi:
    """The server's endpoints over one :class:`SimServer`: the same OpenAI layer a sim worker runs."""

    def __init__(self, settings: SimServerSettings, server: SimServer) -> None:
        self.s = settings
        self.server = server

    async def handle(self, request: Request, kind: Kind) -> Response:
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise errors.InvalidRequest(f"could not parse the JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise errors.InvalidRequest("the request body must be a JSON object")
        model = body.get("model", self.s.model)
        if model != self.s.model:
            raise errors.ModelNotFound(f"The model `{model}` does not exist.", param="model")
        n = body.get("n", 1)
        stream = body.get("stream") is True
        item = WorkItem(id=new_request_id(kind), kind=kind, model=self.s.model, body=body, stream=stream,
                        n=n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1)
        outs = self.server.serve(Call(item=item, attempt_id=uuid.uuid4().hex))
        first = await anext(outs)
        if isinstance(first, Reply):
            await outs.aclose()
            if first.error is not None:
                raise errors.from_info(first.error)
            return _json(first.body or {}, status=first.status)
        return StreamingResponse(self._events(first, outs), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @staticmethod
    async def _events(first: Piece, outs: AsyncGenerator[Piece | Reply, None]) -> AsyncIterator[bytes]:
        async with contextlib.aclosing(outs):
            if first.sse:
                yield first.sse.encode()
            async for out in outs:
                if isinstance(out, Piece) and out.sse:
                    yield out.sse.encode()


def create_sim_app(settings: SimServerSettings) -> FastAPI:
    s = settings
    engine = SimEngine(slots=s.slots, max_model_len=s.max_model_len, prefill_ms_per_token=s.sim_prefill_ms_per_token,
                       decode_ms=s.sim_decode_ms, decode_ms_per_seq=s.sim_decode_ms_per_seq)
    api = _SimApi(s, SimServer(engine, s.model))

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown()

    app = FastAPI(title="mgpu sim-server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine = engine

    @app.exception_handler(errors.MgpuError)
    async def _err(_request: Request, exc: errors.MgpuError) -> Response:
        return _json(error_body(exc), status=exc.status)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await api.handle(request, "chat")

    @app.get("/v1/models")
    async def models() -> Response:
        return _json({"object": "list", "data": [{"id": s.model, "object": "model", "created": 0,
                                                  "owned_by": "mgpu-sim"}]})

    @app.get("/health")
    async def health() -> Response:
        return _json({"status": "ok", "load": engine.load, "slots": engine.slots})

    return app


def run_sim_server(s: SimServerSettings) -> int:
    import uvicorn

    uvicorn.run(create_sim_app(s), host=s.host, port=s.port, log_level="warning", access_log=False,
                loop="uvloop", http="httptools", timeout_graceful_shutdown=5)
    return 0

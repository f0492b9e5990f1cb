"""``mgpu sim-server``: the sim engine alone behind an OpenAI-compatible HTTP server.

No Redis and no gateway: one process, one :class:`SimEngine`, requests go straight to the engine
(which queues what exceeds its slots, as a vLLM server does).  It exists so that a push router
(nginx, a Kubernetes Service, ...) can be put in front of the same simulated fleet that mgpu's
workers run, for a like-for-like comparison.  ``/v1/completions`` and ``/v1/chat/completions``,
streaming or not, with usage; ``n`` must be 1.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from common import errors
from common.protocol import OpenAIRequest, StreamFormatter, error_body, full_response, parse_request
from common.schemas import Choice, ChoiceDelta, Kind, Result, Usage, new_request_id
from common.settings import SimServerSettings
from gpu_worker.engine.base import EngineRequest, InvalidEngineRequest
from gpu_worker.engine.sim import SimEngine


def _json(obj: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json")


def _sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


class _SimApi:
    """The server's endpoints over one engine: parse a request, then answer it whole or as a stream."""

    def __init__(self, settings: SimServerSettings, engine: SimEngine) -> None:
        self.s = settings
        self.engine = engine

    async def parse(self, request: Request, kind: Kind) -> tuple[EngineRequest, OpenAIRequest]:
        s, engine = self.s, self.engine
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as exc:
            raise errors.InvalidRequest(f"could not parse the JSON body: {exc}") from None
        if not isinstance(body, dict):
            raise errors.InvalidRequest("the request body must be a JSON object")
        req = parse_request(kind, body)
        if req.model != s.model:
            raise errors.ModelNotFound(f"the model '{req.model}' does not exist", param="model")
        if req.n != 1:
            raise errors.InvalidRequest("sim-server supports n=1 only", param="n")
        prompt, messages = req.inputs()
        n_prompt = engine.count_prompt_tokens(prompt, messages)
        max_tokens = req.max_tokens or (16 if kind == "completion" else s.max_model_len - n_prompt)
        params = req.sampling(max_tokens, req.logprobs_n())
        return EngineRequest(request_id=uuid.uuid4().hex, prompt=prompt, messages=messages, params=params), req

    async def generate(self, request: Request, kind: Kind) -> Response:
        ereq, req = await self.parse(request, kind)
        rid, created = new_request_id(kind), int(time.time())
        if not req.stream:
            return await self._whole(ereq, rid, kind, created)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        fmt = StreamFormatter(rid, kind, created, self.s.model, 1, include_usage)
        return StreamingResponse(self._events(ereq, fmt), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _whole(self, ereq: EngineRequest, rid: str, kind: Kind, created: int) -> Response:
        text, finish, usage = "", "stop", Usage()
        try:
            async with contextlib.aclosing(self.engine.generate(ereq)) as outs:
                async for out in outs:
                    text += out.text
                    finish = out.finish_reason or finish
                    usage = Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                                  total_tokens=out.prompt_tokens + out.completion_tokens)
        except InvalidEngineRequest as exc:
            raise errors.InvalidRequest(str(exc)) from None
        result = Result(id=rid, kind=kind, model=self.s.model, created=created,
                        choices=[Choice(index=0, text=text, finish_reason=finish)], usage=usage)
        return _json(full_response(result, self.s.model))

    async def _events(self, ereq: EngineRequest, fmt: StreamFormatter) -> AsyncIterator[bytes]:
        for obj in fmt.role_chunks():
            yield _sse(obj)
        usage = Usage()
        try:
            async with contextlib.aclosing(self.engine.generate(ereq)) as outs:
                async for out in outs:
                    for obj in fmt.delta_chunks([ChoiceDelta(index=0, text=out.text,
                                                             finish_reason=out.finish_reason)]):
                        yield _sse(obj)
                    usage = Usage(prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
                                  total_tokens=out.prompt_tokens + out.completion_tokens)
        except InvalidEngineRequest as exc:
            yield _sse(error_body(errors.InvalidRequest(str(exc))))
        else:
            u = fmt.usage_chunk(usage)
            if u is not None:
                yield _sse(u)
        yield b"data: [DONE]\n\n"


def create_sim_app(settings: SimServerSettings) -> FastAPI:
    s = settings
    engine = SimEngine(slots=s.slots, max_model_len=s.max_model_len, prefill_ms_per_token=s.sim_prefill_ms_per_token,
                       decode_ms=s.sim_decode_ms, decode_ms_per_seq=s.sim_decode_ms_per_seq)
    api = _SimApi(s, engine)

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
        return await api.generate(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await api.generate(request, "chat")

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

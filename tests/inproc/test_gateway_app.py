"""The gateway app in the test's event loop (``httpx.ASGITransport``, its lifespan run by the test)
and a sim worker in the same loop, both on a real redis-server: a failure shows a traceback, not a
log tail.  The same behaviours have process-level tests in tests/e2e."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from common.redis_conn import make_client
from common.schemas import Chunk
from common.settings import GatewaySettings, WorkerSettings
from gateway.app import create_asgi
from gpu_worker.engine.sim import SimEngine, expected_text
from gpu_worker.serving.sim import SimServer
from gpu_worker.worker import Worker
from ops.procs import RedisServer

MODEL = "m"


@dataclass
class InProc:
    client: httpx.AsyncClient
    worker: Worker


@pytest.fixture
async def inproc(redis_server: RedisServer) -> AsyncIterator[InProc]:
    ns = "t" + uuid.uuid4().hex[:8]
    base = {"redis_url": redis_server.url, "namespace": ns, "log_requests": False}
    ws = WorkerSettings.load({**base, "engine": "sim", "model": MODEL, "slots": 8, "worker_id": "inproc-w",
                        "sim_decode_ms": 5, "sim_decode_ms_per_seq": 0, "sim_prefill_ms_per_token": 0}, env={})
    gs = GatewaySettings.load({**base, "health_port": 0, "registry_refresh_s": 0.1, "auth": "off"}, env={})
    redis = make_client(ws.redis_url)
    engine = SimEngine(slots=8, decode_ms=5, decode_ms_per_seq=0, prefill_ms_per_token=0)
    worker = Worker(ws, SimServer(engine, MODEL), redis)
    await engine.start()
    await worker.announce()
    run = asyncio.create_task(worker.run())
    asgi = create_asgi(gs)
    async with asgi.fastapi.router.lifespan_context(asgi.fastapi):
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://127.0.0.1")
        async with client:
            for _ in range(100):  # the gateway's registry view sees the worker ready
                if (await client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.05)
            yield InProc(client, worker)
    worker.request_drain()
    await asyncio.wait_for(run, 30)
    await engine.shutdown()
    await redis.aclose()


async def _counted(worker: Worker, served: int) -> None:
    """The worker counts a request once FINISH returns, which may be just after the client has its answer."""
    for _ in range(100):
        if worker.stats.served >= served:
            break
        await asyncio.sleep(0.01)
    assert worker.stats.served == served


async def test_completion_round_trip(inproc: InProc) -> None:
    r = await inproc.client.post("/v1/completions", json={"model": MODEL, "prompt": "a b c", "max_tokens": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["choices"][0]["text"] == expected_text("a b c", max_tokens=5)
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert r.headers["x-request-id"] == body["id"]
    await _counted(inproc.worker, 1)


async def test_chat_stream_in_process(inproc: InProc) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}
    r = await inproc.client.post("/v1/chat/completions", json=body)
    lines = [ln for ln in r.text.splitlines() if ln]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]"
    objs = [json.loads(ln[6:]) for ln in lines[:-1]]
    text = "".join(o["choices"][0]["delta"].get("content") or "" for o in objs if o["choices"])
    assert text == expected_text(messages=[{"role": "user", "content": "hi"}], max_tokens=6)
    assert objs[-1]["usage"]["completion_tokens"] == 6


async def test_errors_are_openai_bodies_naming_the_field(inproc: InProc) -> None:
    c = inproc.client
    r = await c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": "5"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"  # refused by the gateway
    r = await c.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
    r = await c.get("/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    # refused by the worker's OpenAI layer, after the queue: the same 4xx body, for a stream too (as JSON)
    for stream in (False, True):
        r = await c.post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "wizard"}],
                                                       "stream": stream})
        assert r.status_code == 400 and r.headers["content-type"] == "application/json", r.text
        assert r.json()["error"]["param"] == "messages.0.role"


async def test_the_first_chunk_leaves_with_the_first_token(inproc: InProc) -> None:
    """vllm serve's TTFT: nothing but the response's start (an empty chunk: its status and headers) is sent
    before the engine's first token: the first data a worker writes carries the role event together with the
    first token's event (no early role chunk)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    r = await inproc.client.post("/v1/chat/completions", json=body)
    rid = r.headers["x-request-id"]
    stored = await inproc.worker.r.xrange(inproc.worker.keys.chunks(MODEL, rid))
    chunks = [Chunk.model_validate_json(f[b"c"]) for _id, f in stored]
    first = next(c for c in chunks if c.sse)  # (an empty chunk before it, if any, starts the response)
    events = [json.loads(e[6:]) for e in first.sse.split("\n\n") if e]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[1]["choices"][0]["delta"]["content"]


async def test_retry_follows_the_running_original(inproc: InProc) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": "pay once", "max_tokens": 40}
    headers = {"Idempotency-Key": "k-1"}
    original = asyncio.create_task(inproc.client.post("/v1/completions", json=body, headers=headers))
    for _ in range(200):
        if inproc.worker.in_flight:
            break
        await asyncio.sleep(0.01)
    retry = await inproc.client.post("/v1/completions", json=body, headers=headers)
    first = await original
    assert first.status_code == retry.status_code == 200 and first.json() == retry.json()
    await _counted(inproc.worker, 1)  # generated once
    other = await inproc.client.post("/v1/completions", json={**body, "stream": True}, headers=headers)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"

"""Cancellation, deadlines, backpressure, malformed producer entries and connection economy."""

from __future__ import annotations

import asyncio
import json
import threading

import aiohttp
import httpx
import pytest

from common.keys import GROUP
from common.schemas import Result
from ops.procs import wait_until
from tests.conftest import Stack

SLOW = {"model": "slow", "sim_decode_ms": 50, "sim_decode_ms_per_seq": 0, "slots": 4}


def _result(stack: Stack, rid: str) -> Result | None:
    raw = stack.result_raw(rid)
    return None if raw is None else Result.model_validate_json(raw)


def _wait_result(stack: Stack, rid: str, timeout: float = 15) -> Result:
    wait_until(lambda: _result(stack, rid) is not None, timeout, f"result of {rid}")
    r = _result(stack, rid)
    assert r is not None
    return r


def _single_result(stack: Stack, timeout: float = 15) -> Result:
    """The one request of a test that sent no id of its own (an id would make it idempotent,
    and idempotent requests are kept, not cancelled, when their client goes away)."""
    pattern = stack.keys.result("*", "*")
    wait_until(lambda: len(stack.r.keys(pattern)) == 1, timeout, "one result")
    raw = stack.r.get(stack.r.keys(pattern)[0])
    assert raw is not None
    return Result.model_validate_json(raw)


def _field(stack: Stack, wid: str, name: str) -> int:
    return int(stack.r.hget(stack.keys.worker(wid), name) or 0)


def test_stream_disconnect_aborts_in_engine(stack: Stack) -> None:
    w = stack.start_worker(**SLOW)
    stack.start_gateway()
    body = {"model": "slow", "messages": [{"role": "user", "content": "tell me"}], "max_tokens": 200, "stream": True}
    with httpx.stream("POST", stack.base_url + "/v1/chat/completions", json=body, timeout=10) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk + a couple of tokens
        assert any('"content":" ' in ln for ln in got)
    # the client is gone: the gateway cancels, the worker aborts the sequence in the engine
    res = _single_result(stack)
    assert res.error is not None and res.error.code == "cancelled"
    assert w.worker_id
    wait_until(lambda: _field(stack, w.worker_id, "engine_aborts") == 1, 5, "engine abort")  # type: ignore[arg-type]
    wait_until(lambda: _field(stack, w.worker_id, "cancelled") == 1, 5, "cancel counted")  # type: ignore[arg-type]


def test_non_stream_disconnect_aborts_in_engine(stack: Stack) -> None:
    w = stack.start_worker(**SLOW)
    stack.start_gateway()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.base_url + "/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 200},
                   timeout=httpx.Timeout(10, read=0.5))
    res = _single_result(stack)
    assert res.error is not None and res.error.code == "cancelled"
    wait_until(lambda: _field(stack, w.worker_id, "engine_aborts") == 1, 5, "engine abort")  # type: ignore[arg-type]


def test_queued_request_cancelled_is_skipped(stack: Stack) -> None:
    w = stack.start_worker(**{**SLOW, "slots": 1})
    stack.start_gateway()
    first: dict[str, int] = {}

    def occupy() -> None:
        r = httpx.post(stack.base_url + "/v1/completions", json={"model": "slow", "prompt": "x", "max_tokens": 30},
                       timeout=30)
        first["status"] = r.status_code

    t = threading.Thread(target=occupy)
    t.start()
    wait_until(lambda: _field(stack, w.worker_id, "in_flight") == 1, 10, "slot taken")  # type: ignore[arg-type]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.base_url + "/v1/completions", json={"model": "slow", "prompt": "y", "max_tokens": 5},
                   timeout=httpx.Timeout(10, read=0.3))
    t.join()
    assert first["status"] == 200
    pattern = stack.keys.result("*", "*")
    wait_until(lambda: len(stack.r.keys(pattern)) == 2, 10, "both results")
    results = [Result.model_validate_json(stack.r.get(k) or b"") for k in stack.r.keys(pattern)]
    res = next(r for r in results if r.error is not None)
    assert sum(r.error is None for r in results) == 1
    assert res.error is not None and res.error.code == "cancelled"
    wait_until(lambda: _field(stack, w.worker_id, "skipped") == 1, 5, "skip counted")  # type: ignore[arg-type]
    assert _field(stack, w.worker_id, "engine_aborts") == 0  # type: ignore[arg-type]  # never reached the engine


def test_deadline_returns_504_and_aborts(stack: Stack) -> None:
    w = stack.start_worker(**SLOW)
    stack.start_gateway()
    r = httpx.post(stack.base_url + "/v1/completions", timeout=10,
                   json={"model": "slow", "prompt": "x", "max_tokens": 500, "timeout": 0.5})
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "deadline_exceeded"
    res = _single_result(stack)
    assert res.error is not None and res.error.code in ("cancelled", "deadline_exceeded")
    wait_until(lambda: _field(stack, w.worker_id, "engine_aborts") == 1, 5, "engine abort")  # type: ignore[arg-type]


def test_gateway_default_deadline(stack: Stack) -> None:
    stack.start_worker(**SLOW)
    stack.start_gateway(request_timeout_s=0.4)
    r = httpx.post(stack.base_url + "/v1/chat/completions", timeout=10,
                   json={"model": "slow", "messages": [{"role": "user", "content": "x"}], "max_tokens": 500})
    assert r.status_code == 504


def test_no_live_worker_503(stack: Stack) -> None:
    w = stack.start_worker(**SLOW)
    stack.start_gateway()
    w.proc.terminate()  # drains, deregisters, exits
    assert w.proc.wait(15) == 0
    wait_until(lambda: httpx.get(stack.base_url + "/v1/models").json()["data"] == [], 5, "model gone")
    before = int(stack.r.xinfo_stream(stack.keys.stream("slow"))["entries-added"])
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": "slow", "prompt": "x"}, timeout=5)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "service_unavailable"
    assert httpx.get(stack.base_url + "/ready").status_code == 503
    assert int(stack.r.xinfo_stream(stack.keys.stream("slow"))["entries-added"]) == before


def test_queue_full_429(stack: Stack) -> None:
    stack.start_worker(**{**SLOW, "slots": 1})
    stack.start_gateway(max_queue_len=2)
    body = {"model": "slow", "prompt": "x", "max_tokens": 40, "stream": True}
    streams: list[bytes] = []

    def stream() -> None:
        with httpx.stream("POST", stack.base_url + "/v1/completions", json=body, timeout=30) as r:
            streams.append(r.read())

    first = threading.Thread(target=stream)
    first.start()
    wait_until(lambda: stack.r.xpending(stack.keys.stream("slow"), GROUP)["pending"] == 1, 10, "one running")
    second = threading.Thread(target=stream)  # waits in the queue (one slot): its headers wait with it
    second.start()
    wait_until(lambda: stack.r.xlen(stack.keys.stream("slow")) == 2, 10, "one queued")
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": "slow", "prompt": "x"}, timeout=10)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    assert stack.r.xlen(stack.keys.stream("slow")) == 2  # the rejected one was not enqueued
    first.join(30)
    second.join(30)
    assert len(streams) == 2 and all(s.endswith(b"data: [DONE]\n\n") for s in streams)


@pytest.mark.parametrize("which", ["stream", "batch_stream"])
def test_malformed_producer_entries_answered_and_acked(stack: Stack, which: str) -> None:
    w = stack.start_worker(model="sim-model", sim_decode_ms=1)
    stack.start_gateway()
    s = getattr(stack.keys, which)("sim-model")  # the interactive stream, or the batch stream
    stack.r.xadd(s, {"p": "not json at all"})
    stack.r.xadd(s, {"unexpected": "field"})
    stack.r.xadd(s, {"p": json.dumps({"id": "bad-1", "kind": "chat", "model": "sim-model"})})  # no messages
    wait_until(lambda: stack.r.xlen(s) == 0, 10, "malformed entries acknowledged")
    assert stack.r.xpending(s, GROUP)["pending"] == 0
    res = _wait_result(stack, "bad-1")
    assert res.error is not None and res.error.status == 400 and res.error.code == "malformed_entry"
    assert stack.r.xlen(stack.keys.dlq("sim-model")) == 3
    assert w.proc.poll() is None  # the worker survived and still serves
    r = stack.openai().completions.create(model="sim-model", prompt="still alive", max_tokens=2)
    assert r.usage is not None and r.usage.completion_tokens == 2


async def test_5000_in_flight_on_bounded_pool(stack: Stack) -> None:
    stack.start_worker(model="sim-model", slots=6000, sim_decode_ms=1500, sim_decode_ms_per_seq=0,
                       sim_prefill_ms_per_token=0)
    stack.start_gateway(redis_pool_size=16)
    n = 5000
    peak = {"in_flight": 0.0, "conns": 0}
    done = asyncio.Event()

    async def watch(session: aiohttp.ClientSession) -> None:
        while not done.is_set():
            async with session.get(stack.base_url + "/metrics") as r:
                for line in (await r.text()).splitlines():
                    if line.startswith("mgpu_gateway_in_flight_requests "):
                        peak["in_flight"] = max(peak["in_flight"], float(line.split()[1]))
            clients = stack.r.client_list()
            conns = sum(1 for c in clients if c.get("name", "").startswith("gateway:"))
            peak["conns"] = max(peak["conns"], conns)
            await asyncio.sleep(0.2)

    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as session:
        watcher = asyncio.create_task(watch(session))

        async def one(i: int) -> int:
            async with session.post(stack.base_url + "/v1/completions",
                                    json={"model": "sim-model", "prompt": f"p {i}", "max_tokens": 2}) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(i) for i in range(n)))
        done.set()
        await watcher
    assert statuses.count(200) == n
    assert peak["in_flight"] >= n * 0.95, peak
    assert peak["conns"] <= 16 + 2, peak  # the pool bound plus the reply reader

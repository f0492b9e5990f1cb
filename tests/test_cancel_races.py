"""Cancellation races (defects issue, item 1): a cancel that lands before a job's first step, at the
moment of pickup, or mid-stream never leaks a worker slot, never leaves an entry pending, and
never keeps a drain waiting for its grace."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
import uuid
from typing import Any

import httpx
import orjson
import pytest

from common.keys import GROUP, Keys
from common.redis_conn import make_client
from common.schemas import Result, SamplingParams, WorkItem
from common.settings import Settings
from gpu_worker.engine.sim import SimEngine
from gpu_worker.worker import Worker
from ops.procs import RedisServer, wait_until
from tests.conftest import Stack


async def _until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_cancel_before_first_step_answers_and_frees_the_slot(redis_server: RedisServer) -> None:
    """Deterministic: the job is started and cancelled in the same event-loop turn, before its
    task takes its first step (where ``task.cancel()`` would skip the body and its clean-up)."""
    ns = "t" + uuid.uuid4().hex[:8]
    keys = Keys(ns)
    s = Settings.load({"redis_url": redis_server.url, "namespace": ns, "engine": "sim", "model": "m",
                       "slots": 4, "worker_id": "wz"}, env={})
    client = make_client(s.redis_url)
    engine = SimEngine(slots=4, decode_ms=1)
    worker = Worker(s, engine, client)
    await worker._ensure_groups()
    await engine.start()
    try:
        items = [WorkItem(id=f"r{i}", kind="completion", model="m", prompt="a b c",
                          params=SamplingParams(max_tokens=50)) for i in range(3)]
        for item in items:
            await client.xadd(keys.stream("m"), item.to_fields())
        resp = await client.xreadgroup(GROUP, worker.id, {keys.stream("m"): ">"}, count=3)
        (stream_b, entries), = resp
        for entry_id, fields in entries:
            worker._start(stream_b.decode(), entry_id.decode(), fields, deliveries=1)
        assert worker.in_flight == 3
        # no await since _start: the tasks have not run yet.  A cancel, and a lease loss, land now.
        worker.on_cancel("r0", time.monotonic())
        worker._on_lost([(keys.stream("m"), entries[1][0].decode())])
        await _until(lambda: worker.in_flight == 1, 5, "the cancelled and the lost job to end")
        res = Result.model_validate_json(await client.get(keys.result("r0")))
        assert res.error is not None and res.error.code == "cancelled"
        assert worker.stats.cancelled == 1 and worker.stats.fenced == 1
        assert engine.aborts == 0  # neither reached the engine
        await _until(lambda: worker.jobs and all(j.running for j in worker.jobs.values()), 5, "r2 running")
        worker.on_cancel("r2", time.monotonic())  # and once it runs, the cancel reaches the engine
        await _until(lambda: worker.in_flight == 0, 5, "r2 to end")
        assert engine.aborts == 1
        pending = await client.xpending(keys.stream("m"), GROUP)
        assert pending["pending"] == 1  # r1's entry: its lease was lost, a live worker reclaims it
    finally:
        await engine.shutdown()
        await client.aclose()


def _registry(stack: Stack, wid: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in stack.r.hgetall(stack.keys.worker(wid)).items()}


def test_cancel_pipelined_with_its_request_never_leaks(stack: Stack) -> None:
    """The issue's reproduction: the cancel and the request in one pipeline, 100 times."""
    w = stack.start_worker(model="simz", worker_id="wz", slots=128, sim_decode_ms=2, sim_decode_ms_per_seq=0)
    r, keys = stack.r, stack.keys
    ids = []
    for i in range(100):
        item = WorkItem(id=f"pz-{i}", kind="completion", model="simz", prompt="one two",
                        params=SamplingParams(max_tokens=400))
        with r.pipeline(transaction=False) as p:
            p.xadd(keys.cancels, {"r": item.id})
            p.xadd(keys.stream("simz"), item.to_fields())
            p.execute()
        ids.append(item.id)
        time.sleep(0.01)

    def settled() -> bool:
        return (_registry(stack, "wz").get("in_flight") == "0"
                and r.xpending(keys.stream("simz"), GROUP)["pending"] == 0)

    wait_until(settled, 15, "every slot free and nothing pending")
    results = [Result.model_validate_json(raw) for raw in r.mget([keys.result(i) for i in ids]) if raw]
    assert len(results) == 100 and all(x.error and x.error.code == "cancelled" for x in results)
    t0 = time.monotonic()
    w.proc.terminate()
    assert w.proc.wait(30) == 0
    assert time.monotonic() - t0 < 10  # nothing holds the drain (its grace is 60 s)


# ----------------------------------------------------------------------------- stress


def _request_bytes(port: int, body: dict[str, Any]) -> bytes:
    data = orjson.dumps(body)
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def _one(port: int, rng: random.Random, stats: dict[str, int]) -> None:
    """One client: it sends a request, then resets the connection (RST) at a random moment:
    before or around the pickup, after the first chunk, mid-stream, or never (reads to the end)."""
    stream = rng.random() < 0.7
    body = {"model": "m", "messages": [{"role": "user", "content": f"tell me {rng.random()}"}],
            "max_tokens": rng.choice([5, 40, 200]), "stream": stream}
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sock = writer.get_extra_info("socket")
    mode = rng.choice(["pickup", "pickup", "first_chunk", "mid", "complete"])
    try:
        writer.write(_request_bytes(port, body))
        await writer.drain()
        if mode == "pickup":
            await asyncio.sleep(rng.uniform(0, 0.012))
        elif mode in ("first_chunk", "mid"):
            want = 2 if mode == "first_chunk" else rng.randint(3, 30)
            got = 0
            while got < want:
                line = await asyncio.wait_for(reader.readline(), 30)
                if not line:
                    break
                got += line.startswith(b"data: ")
        else:
            while await asyncio.wait_for(reader.read(65536), 60):
                pass
        stats[mode] = stats.get(mode, 0) + 1
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.close()


async def _flood(port: int, n: int, concurrency: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    stats: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)

    async def run() -> None:
        async with sem:
            await _one(port, rng, stats)

    await asyncio.gather(*(run() for _ in range(n)))
    return stats


@pytest.mark.slow
def test_thousands_of_disconnects_at_random_moments_leave_nothing_behind(stack: Stack) -> None:
    workers = [stack.start_worker(model="m", slots=32, sim_decode_ms=3, sim_decode_ms_per_seq=0.02,
                                  drain_grace_s=60) for _ in range(2)]
    stack.start_gateway(max_queue_len=100_000)
    assert stack.gateway_port
    stats = asyncio.run(_flood(stack.gateway_port, 3000, 96, seed=9))
    assert sum(stats.values()) == 3000 and min(stats.values()) > 300, stats
    r, keys = stack.r, stack.keys

    def settled() -> bool:
        regs = [_registry(stack, w.worker_id or "") for w in workers]
        return (all(x.get("in_flight") == "0" for x in regs) and r.xlen(keys.stream("m")) == 0
                and r.xpending(keys.stream("m"), GROUP)["pending"] == 0)

    wait_until(settled, 30, "every slot free, nothing queued or pending")
    regs = [_registry(stack, w.worker_id or "") for w in workers]
    # no live worker lost a lease: nothing was taken over, nothing fenced
    assert [(x["reclaimed"], x["fenced"]) for x in regs] == [("0", "0")] * 2, regs
    # every accepted request ended with a result (cancelled, or served for the clients that read to the end)
    added = int(r.xinfo_stream(keys.stream("m"))["entries-added"])
    ended = sum(int(x["served"]) + int(x["cancelled"]) + int(x["skipped"]) for x in regs)
    assert ended == added, (added, regs)
    metrics = httpx.get(stack.base_url + "/metrics").text
    assert "mgpu_gateway_in_flight_requests 0.0" in metrics  # no request left waiting in the gateway
    for w in workers:
        t0 = time.monotonic()
        w.proc.terminate()
        assert w.proc.wait(30) == 0
        assert time.monotonic() - t0 < 10  # seconds, not the 60 s grace

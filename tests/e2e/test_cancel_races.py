"""Cancellation races (defects issue, item 1) through real processes: a cancel that lands with its
request, at the moment of pickup, or mid-stream never leaks a worker slot, never leaves an entry
pending, and never keeps a drain waiting for its grace.  The same-turn race, deterministically:
tests/inproc/test_cancel.py."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from typing import Any

import httpx
import orjson
import pytest

from common.keys import GROUP
from common.schemas import Result, WorkItem
from ops.procs import wait_until
from tests.conftest import Stack


def _registry(stack: Stack, wid: str) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in stack.r.hgetall(stack.keys.worker(wid)).items()}


def test_cancel_pipelined_with_its_request_never_leaks(stack: Stack) -> None:
    """The issue's reproduction: the cancel and the request in one pipeline, 100 times."""
    w = stack.start_worker(model="simz", worker_id="wz", slots=128, sim_decode_ms=2, sim_decode_ms_per_seq=0)
    r, keys = stack.r, stack.keys
    ids = []
    for i in range(100):
        item = WorkItem(id=f"pz-{i}", kind="completion", model="simz",
                        body={"model": "simz", "prompt": "one two", "max_tokens": 400})
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
    results = [Result.model_validate_json(raw) for raw in r.mget([keys.result("simz", i) for i in ids]) if raw]
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

"""A cancel that lands before a job's first step (defects issue, item 1), deterministically: the job is
started and cancelled in the same event-loop turn, in a Worker driven by the test against a real
redis-server.  The process-level races are tests/e2e/test_cancel_races.py."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

from common.keys import GROUP, Keys
from common.redis_conn import make_client
from common.schemas import Result, WorkItem
from common.settings import WorkerSettings
from gpu_worker.engine.sim import SimEngine
from gpu_worker.serving.sim import SimServer
from gpu_worker.worker import Worker
from ops.procs import RedisServer


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
    s = WorkerSettings.load({"redis_url": redis_server.url, "namespace": ns, "engine": "sim", "model": "m",
                       "slots": 4, "worker_id": "wz"}, env={})
    client = make_client(s.redis_url)
    engine = SimEngine(slots=4, decode_ms=1)
    worker = Worker(s, SimServer(engine, "m"), client)
    await worker._ensure_groups()
    await engine.start()
    try:
        items = [WorkItem(id=f"r{i}", kind="completion", model="m",
                          body={"model": "m", "prompt": "a b c", "max_tokens": 50}) for i in range(3)]
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
        res = Result.model_validate_json(await client.get(keys.result("m", "r0")))
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


class _CancelAtTheEnd(SimEngine):
    """A sim engine whose last output schedules a cancel of the request: it lands in the event-loop turn
    in which the job starts storing its result (before the shielded store has taken its first step)."""

    def __init__(self, worker_cancel: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.worker_cancel = worker_cancel

    async def generate(self, req: Any) -> Any:  # type: ignore[override]
        async for out in super().generate(req):
            yield out
        asyncio.get_running_loop().call_soon(self.worker_cancel, req.request_id.split("/")[0], time.monotonic())


async def test_cancel_while_the_result_is_stored_is_ignored(redis_server: RedisServer) -> None:
    """Found by the disconnect stress test: a cancel that landed as the result was being stored cancelled
    the job into a second, error, result that was fenced (counted as a zombie write on a live worker)."""
    ns = "t" + uuid.uuid4().hex[:8]
    keys = Keys(ns)
    s = WorkerSettings.load({"redis_url": redis_server.url, "namespace": ns, "engine": "sim", "model": "m",
                       "slots": 4, "worker_id": "wz"}, env={})
    client = make_client(s.redis_url)
    holder: list[Worker] = []
    engine = _CancelAtTheEnd(lambda rid, now: holder[0].on_cancel(rid, now), slots=4, decode_ms=1)
    worker = Worker(s, SimServer(engine, "m"), client)
    holder.append(worker)
    await worker._ensure_groups()
    await engine.start()
    try:
        item = WorkItem(id="r0", kind="completion", model="m", body={"model": "m", "prompt": "a b c", "max_tokens": 3})
        await client.xadd(keys.stream("m"), item.to_fields())
        resp = await client.xreadgroup(GROUP, worker.id, {keys.stream("m"): ">"}, count=1)
        (stream_b, entries), = resp
        worker._start(stream_b.decode(), entries[0][0].decode(), entries[0][1], deliveries=1)
        await _until(lambda: worker.in_flight == 0, 5, "the job to end")
        res = Result.model_validate_json(await client.get(keys.result("m", "r0")))
        assert res.error is None and res.body is not None and res.body["choices"][0]["finish_reason"] == "length"
        assert (worker.stats.served, worker.stats.cancelled, worker.stats.fenced) == (1, 0, 0)
    finally:
        await engine.shutdown()
        await client.aclose()

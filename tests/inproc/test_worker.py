"""A :class:`gpu_worker.worker.Worker` on the sim engine, driven in the test's event loop against a
real redis-server: the intake loops, jobs, drain, reclaim and the keeper's heartbeat, observed
from Redis and from the worker's stats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest
import redis

from common.keys import GROUP, Keys
from common.records import WorkerState
from common.redis_conn import make_client
from common.schemas import Chunk, Result, SamplingParams, WorkItem
from common.scripts import renew_script
from common.settings import Settings
from gpu_worker.engine.base import EngineRequest
from gpu_worker.engine.sim import SimEngine, expected_text
from gpu_worker.liveness import Beat, Keeper, LoopHooks
from gpu_worker.serving.sim import SimServer
from gpu_worker.worker import Worker
from ops.procs import RedisServer

MODEL = "m"


async def until(pred: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@dataclass
class Rig:
    worker: Worker
    engine: SimEngine
    client: Any  # redis.asyncio.Redis
    keys: Keys

    @property
    def stream(self) -> str:
        return self.keys.stream(MODEL)

    async def add(self, item: WorkItem, stream: str | None = None) -> str:
        return (await self.client.xadd(stream or self.stream, item.to_fields())).decode()

    async def result(self, rid: str, timeout: float = 10) -> Result:
        raw: list[bytes | None] = [None]

        async def poll() -> None:
            deadline = time.monotonic() + timeout
            while raw[0] is None:
                assert time.monotonic() < deadline, f"no result for {rid}"
                raw[0] = await self.client.get(self.keys.result(MODEL, rid))
                await asyncio.sleep(0.01)

        await poll()
        assert raw[0] is not None
        return Result.model_validate_json(raw[0])


def item(rid: str, *, max_tokens: int = 8, stream: bool = False, prompt: str = "one two three", n: int = 1,
         **body: Any) -> WorkItem:
    return WorkItem(id=rid, kind="completion", model=MODEL, stream=stream, n=n,
                    body={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": stream, "n": n, **body})


def texts(res: Result) -> list[str]:
    assert res.body is not None, res
    return [c["text"] for c in res.body["choices"]]


def stream_events(chunks: list[Chunk]) -> list[dict[str, Any]]:
    return [e for c in chunks for raw in c.sse.split("\n\n") if raw.startswith("data: {")
            for e in [orjson.loads(raw[6:])]]


def stream_text(chunks: list[Chunk], index: int = 0) -> str:
    return "".join(ch["text"] for e in stream_events(chunks) for ch in e["choices"] if ch["index"] == index)


def settings(url: str, ns: str, **kw: Any) -> Settings:
    base = {"redis_url": url, "namespace": ns, "engine": "sim", "model": MODEL, "slots": 4, "worker_id": "w-in",
            "heartbeat_interval_s": 0.1, "reclaim_interval_s": 0.1, "log_requests": False}
    return Settings.load({**base, **kw}, env={})


@contextlib.asynccontextmanager
async def rig(redis_server: RedisServer, *, run: bool = True, decode_ms: float = 1.0,
              **kw: Any) -> AsyncIterator[Rig]:
    """A worker with its own namespace; with ``run`` it serves (``Worker.run`` as a task) until
    the block ends, then it is drained and must have stopped."""
    ns = "t" + uuid.uuid4().hex[:8]
    s = settings(redis_server.url, ns, **kw)
    client = make_client(s.redis_url)
    engine = SimEngine(slots=s.slots, decode_ms=decode_ms, decode_ms_per_seq=0)
    worker = Worker(s, SimServer(engine, MODEL), client)
    await engine.start()
    task: asyncio.Task[int] | None = None
    try:
        if run:
            task = asyncio.create_task(worker.run())
            await until(lambda: worker.stats.state in (WorkerState.READY, WorkerState.CANARY), 10, "ready")
        else:
            await worker._ensure_groups()
        yield Rig(worker, engine, client, s.keys)
    finally:
        if task is not None:
            worker.request_drain()
            assert await asyncio.wait_for(task, 30) in (0, 3)
        await worker.close()
        await engine.shutdown()
        await client.aclose()


# ----------------------------------------------------------------------------- serving


async def test_pull_to_result(redis_server: RedisServer) -> None:
    async with rig(redis_server) as r:
        await r.add(item("r1", max_tokens=12))
        res = await r.result("r1")
        assert res.error is None and res.worker == "w-in" and res.attempts == 1
        assert texts(res) == [expected_text("one two three", max_tokens=12)]
        assert res.usage.completion_tokens == 12 and res.usage.prompt_tokens == 3
        await until(lambda: r.worker.in_flight == 0, 5, "slot freed")
        assert r.worker.stats.served == 1 and r.worker.stats.requests == 0
        assert (await r.client.xpending(r.stream, GROUP))["pending"] == 0  # acknowledged
        assert await r.client.xlen(r.stream) == 0  # and deleted


async def test_n_choices_run_together_and_take_n_slots(redis_server: RedisServer) -> None:
    async with rig(redis_server, decode_ms=5) as r:
        await r.add(item("rn", max_tokens=20, n=3, seed=4))
        await until(lambda: r.worker.in_flight == 3, 5, "three slots busy")
        res = await r.result("rn")
        assert res.body is not None and [c["index"] for c in res.body["choices"]] == [0, 1, 2]
        assert texts(res) == [expected_text("one two three", max_tokens=20, seed=4 + i) for i in range(3)]
        assert res.usage.completion_tokens == 60


async def test_streaming_chunks_arrive_in_order(redis_server: RedisServer) -> None:
    async with rig(redis_server, decode_ms=2) as r:
        await r.add(item("rs", max_tokens=30, stream=True))
        res = await r.result("rs")
        chunks = [Chunk.model_validate_json(f[b"c"]) for _id, f in await r.client.xrange(r.keys.chunks(MODEL, "rs"))]
        assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))
        assert stream_text(chunks) == expected_text("one two three", max_tokens=30)
        assert stream_events(chunks)[-1]["choices"][-1]["finish_reason"] == "length"
        assert chunks[-1].sse.endswith("data: [DONE]\n\n") and res.body is None and res.error is None
        assert res.usage.completion_tokens == 30


async def test_a_migrated_stream_resumes_after_what_was_sent(redis_server: RedisServer) -> None:
    """An entry's second delivery, after a first attempt streamed 5 tokens: the new attempt goes on
    from there, and the client's one stream reads as an uninterrupted run."""
    async with rig(redis_server, run=False) as r:
        probe = EngineRequest(request_id="probe", prompt="one two three", params=SamplingParams(max_tokens=5))
        outs = [o async for o in r.engine.generate(probe)]
        event = {"id": "rm", "object": "text_completion", "created": 7, "model": MODEL,
                 "choices": [{"index": 0, "text": "".join(o.text for o in outs), "logprobs": None,
                              "finish_reason": None}]}
        sent = Chunk(seq=1, sse="data: " + orjson.dumps(event).decode() + "\n\n",
                     tokens={0: [t for o in outs for t in o.token_ids]})
        await r.client.xadd(r.keys.chunks(MODEL, "rm"), {"c": sent.model_dump_json()})
        entry_id = await r.add(item("rm", max_tokens=12, stream=True))
        resp = await r.client.xreadgroup(GROUP, r.worker.id, {r.stream: ">"}, count=1)
        r.worker._start(r.stream, entry_id, resp[0][1][0][1], deliveries=2)
        res = await r.result("rm")
        full = expected_text("one two three", max_tokens=12)
        assert res.attempts == 2 and res.usage.completion_tokens == 12 and res.error is None
        chunks = [Chunk.model_validate_json(f[b"c"]) for _id, f in await r.client.xrange(r.keys.chunks(MODEL, "rm"))]
        assert [c.seq for c in chunks] == list(range(1, len(chunks) + 1))  # numbering goes on after the first's
        assert stream_text(chunks) == full  # the client's one stream reads as an uninterrupted run


async def test_a_stream_that_cannot_continue_ends_with_an_explicit_error(redis_server: RedisServer) -> None:
    """Another worker sent part of a stream whose state cannot be carried over (its chunks hold no token
    ids): the stream is neither continued nor started again; it ends with stream_interrupted."""
    async with rig(redis_server, run=False) as r:
        await r.client.xadd(r.keys.chunks(MODEL, "ri"), {"c": Chunk(seq=1, sse="data: {}\n\n").model_dump_json()})
        entry_id = await r.add(item("ri", max_tokens=12, stream=True))
        resp = await r.client.xreadgroup(GROUP, r.worker.id, {r.stream: ">"}, count=1)
        r.worker._start(r.stream, entry_id, resp[0][1][0][1], deliveries=2)
        res = await r.result("ri")
        assert res.error is not None and (res.error.code, res.error.status) == ("stream_interrupted", 502)
        assert await r.client.xlen(r.keys.chunks(MODEL, "ri")) == 1  # nothing more was sent


# ----------------------------------------------------------------------------- cancels


async def test_cancel_before_the_first_step_answers_without_the_engine(redis_server: RedisServer) -> None:
    async with rig(redis_server, run=False) as r:
        entry_id = await r.add(item("rc0", max_tokens=50))
        resp = await r.client.xreadgroup(GROUP, r.worker.id, {r.stream: ">"}, count=1)
        r.worker._start(r.stream, entry_id, resp[0][1][0][1], deliveries=1)
        job = r.worker.jobs[r.stream, entry_id]
        r.worker.on_cancel("rc0", time.monotonic())  # same loop turn: the task has not run yet
        assert job.stop_reason == "cancelled" and not job.running and job.task is not None
        assert not job.task.cancelled()  # a task cancelled before its first step would skip its body
        res = await r.result("rc0")
        assert res.error is not None and res.error.code == "cancelled"
        await until(lambda: r.worker.in_flight == 0, 5, "slot freed")
        assert r.worker.stats.cancelled == 1 and r.engine.aborts == 0
        assert (await r.client.xpending(r.stream, GROUP))["pending"] == 0


async def test_cancel_while_running_aborts_in_the_engine(redis_server: RedisServer) -> None:
    async with rig(redis_server, decode_ms=20) as r:
        await r.add(item("rc1", max_tokens=500, stream=True))
        await until(lambda: r.worker.jobs and all(j.running for j in r.worker.jobs.values()), 5, "running")
        await asyncio.sleep(0.1)  # a few steps
        await r.client.xadd(r.keys.cancels, {"r": "rc1"})
        res = await r.result("rc1")
        assert res.error is not None and res.error.code == "cancelled"
        await until(lambda: r.worker.in_flight == 0, 5, "slot freed")
        assert r.worker.stats.cancelled == 1 and r.engine.aborts == 1
        await r.add(item("rc1"))  # arriving again after its cancel: skipped, never run
        res = await r.result("rc1", timeout=5)
        assert res.error is not None and res.error.code == "cancelled"
        await until(lambda: r.worker.stats.skipped == 1, 5, "skipped")
        assert r.engine.aborts == 1


async def test_a_backlog_never_takes_the_worker_past_its_slots(redis_server: RedisServer) -> None:
    """Ten requests at once (one transaction: every read sees them all) for 4 slots: the worker holds 4 at
    most, the rest wait in Redis where any worker may take them, and each is answered once."""
    async with rig(redis_server, decode_ms=5) as r:
        busiest = [0]
        started = r.worker.stats.job_started

        def job_started(slots: int) -> None:
            started(slots)
            busiest[0] = max(busiest[0], r.worker.stats.busy_slots)

        r.worker.stats.job_started = job_started  # type: ignore[method-assign]
        async with r.client.pipeline(transaction=True) as p:
            for i in range(10):
                p.xadd(r.stream, item(f"ra{i}", max_tokens=30).to_fields())
            await p.execute()
        for i in range(10):
            res = await r.result(f"ra{i}")
            assert res.error is None and res.attempts == 1
            assert texts(res) == [expected_text("one two three", max_tokens=30)]
        assert busiest[0] == 4
        await until(lambda: r.worker.in_flight == 0, 5, "slots freed")
        assert r.worker.stats.served == 10 and (await r.client.xpending(r.stream, GROUP))["pending"] == 0


# ----------------------------------------------------------------------------- drain and reclaim


async def test_drain_hands_back_what_is_left(redis_server: RedisServer) -> None:
    async with rig(redis_server, run=False, decode_ms=20, drain_grace_s=0.3) as r:
        task = asyncio.create_task(r.worker.run())
        await until(lambda: r.worker.stats.state == WorkerState.READY, 10, "ready")
        ids = [await r.add(item(f"rd{i}", max_tokens=1000)) for i in range(2)]
        await until(lambda: r.worker.in_flight == 2, 5, "both running")
        t0 = time.monotonic()
        r.worker.request_drain()
        assert await asyncio.wait_for(task, 10) == 0
        assert time.monotonic() - t0 < 3  # the grace, then the hand-back: no waiting for the jobs
        assert r.worker.stats.state == WorkerState.GONE and r.worker.stats.drains == 1
        assert not await r.client.exists(r.keys.worker(r.worker.id))  # deregistered
        assert await r.client.get(r.keys.result(MODEL, "rd0")) is None  # not answered: handed back
        pending = await r.client.xpending_range(r.stream, GROUP, "-", "+", 10)
        assert sorted(p["message_id"].decode() for p in pending) == sorted(ids)
        assert all(p["time_since_delivered"] > 10**9 for p in pending)  # idle past any lease
        _cursor, claimed = await r.worker.scripts.reclaim(r.stream, "heir", r.worker.s.lease_ms, "-", 10)
        assert sorted(c.entry_id for c in claimed) == sorted(ids)  # reclaimable at once
        assert all(c.deliveries == 1 and c.previous_owner == "w-in" for c in claimed)  # no delivery spent
        assert r.engine.aborts == 2


async def test_reclaim_takes_over_a_lapsed_lease_and_names_its_owner(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    async with rig(redis_server, run=False, lease_ms=300) as r:
        entry_id = await r.add(item("rr", max_tokens=6))
        await r.client.xreadgroup(GROUP, "dead-worker", {r.stream: ">"}, count=1)  # taken, never renewed
        with caplog.at_level(logging.INFO, logger="mgpu.worker"):
            task = asyncio.create_task(r.worker.run())
            res = await r.result("rr")
            r.worker.request_drain()
            assert await asyncio.wait_for(task, 10) == 0
        assert res.error is None and res.attempts == 2 and res.worker == "w-in"
        assert r.worker.stats.reclaimed == 1
        (rec,) = [x for x in caplog.records if x.getMessage() == "reclaimed entry"]
        assert (rec.__dict__["entry"], rec.__dict__["deliveries"], rec.__dict__["from"]) == (entry_id, 2,
                                                                                             "dead-worker")


async def test_past_max_deliveries_is_dead_lettered(redis_server: RedisServer) -> None:
    async with rig(redis_server, run=False, lease_ms=100, max_deliveries=1) as r:
        await r.add(item("rx"))
        await r.client.xreadgroup(GROUP, "dead-worker", {r.stream: ">"}, count=1)
        task = asyncio.create_task(r.worker.run())
        res = await r.result("rx")
        r.worker.request_drain()
        await asyncio.wait_for(task, 10)
        assert res.error is not None and res.error.code == "dead_lettered" and res.attempts == 2
        assert r.worker.stats.dead_lettered == 1 and await r.client.xlen(r.keys.dlq(MODEL)) == 1


# ----------------------------------------------------------------------------- the keeper


def _quiet_keeper(w: Worker, loop: asyncio.AbstractEventLoop, seen: list[tuple[str, Any]]) -> Keeper:
    """A keeper of ``w`` that is never started: the test calls its heartbeat itself."""
    return Keeper(w.s, w.registry, w.stats, w.gpu, leases=w._leases, own_stream=w.own.own, loop=loop,
                  hooks=LoopHooks(drain=lambda: seen.append(("drain", None)), admit=lambda: seen.append(("admit", 0)),
                                  lost=lambda lost: seen.append(("lost", lost)),
                                  unhealthy=lambda why: seen.append(("unhealthy", why))))


async def test_keeper_beat_reads_drain_admit_length_and_lost_leases(redis_server: RedisServer) -> None:
    async with rig(redis_server, run=False, decode_ms=50) as r:
        w = r.worker
        seen: list[tuple[str, Any]] = []
        keeper = _quiet_keeper(w, asyncio.get_running_loop(), seen)
        sync = redis.Redis.from_url(redis_server.url)
        lua = renew_script(sync)
        try:
            beat = await asyncio.to_thread(keeper.beat, sync, lua, w._leases())
            assert beat == Beat(drain=False, admit=False, own_length=0, lost=[])
            assert await r.client.hget(r.keys.worker(w.id), "state") == b"starting"  # the record was written
            ids = [await r.add(item(f"rk{i}", max_tokens=1000)) for i in range(2)]
            await r.add(item("queued"), stream=w.own.own)
            resp = await r.client.xreadgroup(GROUP, w.id, {r.stream: ">"}, count=2)
            for entry_id, fields in resp[0][1]:
                w._start(r.stream, entry_id.decode(), fields, deliveries=1)
            await until(lambda: all(j.running for j in w.jobs.values()), 5, "running")
            await r.client.xclaim(r.stream, GROUP, "thief", 0, [ids[1]])  # another worker took one
            await r.client.set(r.keys.drain(w.id), 1)
            await r.client.set(r.keys.admit(w.id), 1)
            leases = w._leases()
            beat = await asyncio.to_thread(keeper.beat, sync, lua, leases)
            assert beat == Beat(drain=True, admit=True, own_length=1, lost=[(r.stream, ids[1])])
            await asyncio.to_thread(keeper._act, sync, beat, leases)
            await asyncio.sleep(0)
            assert seen == [("drain", None), ("admit", 0), ("lost", [(r.stream, ids[1])])]
            assert w.stats.own_queued == 1
            assert not await r.client.exists(r.keys.drain(w.id), r.keys.admit(w.id))  # each flag taken once
            w._on_lost(beat.lost)  # what the hook does: the job lets its entry go, writing nothing
            await until(lambda: w.in_flight == 1, 5, "the lost job ended")
            assert w.stats.fenced == 1 and await r.client.get(r.keys.result(MODEL, "rk1")) is None
        finally:
            sync.close()


async def test_keeper_flags_drive_the_running_worker(redis_server: RedisServer) -> None:
    """The real keeper thread: a canary is admitted by its admit key, then drained by its drain key."""
    async with rig(redis_server, run=False, canary_gate=True) as r:
        w = r.worker
        task = asyncio.create_task(w.run())
        await until(lambda: w.stats.state == WorkerState.CANARY, 10, "canary")
        await r.add(item("shared"))  # the shared stream is not read by a canary
        await asyncio.sleep(0.3)
        assert w.stats.served == 0
        await r.client.set(r.keys.admit(w.id), 1)
        await until(lambda: w.stats.state == WorkerState.READY, 5, "admitted")
        assert (await r.result("shared")).error is None
        await r.client.set(r.keys.drain(w.id), 1)
        assert await asyncio.wait_for(task, 10) == 0
        assert w.stats.drains == 1 and w.stats.state == WorkerState.GONE


# ----------------------------------------------------------------------------- an intake loop that dies


async def test_a_dead_intake_loop_takes_the_worker_out_and_exits_non_zero(redis_server: RedisServer) -> None:
    async with rig(redis_server, run=False) as r:
        w = r.worker

        async def broken(resp: Any, free: int) -> None:
            raise RuntimeError("a bug in intake")

        w._take = broken  # type: ignore[method-assign]
        task = asyncio.create_task(w.run())
        await r.add(item("dies-1"))
        assert await asyncio.wait_for(task, 20) == 3  # not a worker that heartbeats as ready and pulls nothing
        assert not w.stats.healthy
        assert await r.client.exists(r.keys.worker(w.id)) == 0  # it left the registry


async def test_a_failed_hand_back_does_not_end_the_pull_loop(redis_server: RedisServer,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    async with rig(redis_server, run=False) as r:
        w = r.worker

        async def unreachable(*_a: Any, **_k: Any) -> int:
            raise redis.ConnectionError("gone")

        w.scripts.release = unreachable  # type: ignore[method-assign]
        with caplog.at_level(logging.WARNING):
            # more than its free slots came back: the rest cannot be handed back now
            await w._take([(r.stream.encode(), [(b"1-1", {b"p": item("x").to_fields()["p"].encode()})])], 0)
        assert "could not hand back 1 entries" in caplog.text  # logged; they stay pending for the reclaim


async def test_a_generation_that_raises_is_one_failure_and_an_explicit_error(redis_server: RedisServer) -> None:
    async with rig(redis_server) as r:
        async def broken(req: EngineRequest) -> Any:
            raise RuntimeError("CUDA error: an illegal memory access")
            yield  # an async generator, as the engine's

        r.engine.generate = broken  # type: ignore[method-assign,assignment]
        await r.add(item("boom-1"))
        res = await r.result("boom-1")
        assert res.error is not None and res.error.code == "generation_failed" and res.error.status == 500
        assert r.worker.stats.failed == 1  # counted once (it was counted twice)

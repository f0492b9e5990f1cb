"""Batch work on the model's batch stream (``Keys.batch_stream``: what batch producers write) runs only in the
slots that interactive work leaves free beyond a reserve, so that an interactive request starts at once while
a batch backlog keeps the rest busy.  A real redis-server, a worker on the sim engine in the test's loop."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from common.keys import GROUP
from gpu_worker.engine.sim import expected_text
from ops.procs import RedisServer
from tests.inproc.test_worker import MODEL, item, rig, texts, until


async def _lag(r, stream: str) -> int:  # type: ignore[no-untyped-def]
    (g,) = await r.client.xinfo_groups(stream)
    return int(g["lag"])


async def test_batch_fills_the_slots_beyond_the_reserve_and_interactive_starts_at_once(
        redis_server: RedisServer) -> None:
    async with rig(redis_server, decode_ms=20, slots=4, batch_reserve_slots=1) as r:
        batch = r.keys.batch_stream(MODEL)
        for i in range(9):
            await r.add(item(f"b{i}", max_tokens=40), stream=batch)
        await until(lambda: r.worker.in_flight == 3, 5, "batch work in 3 of 4 slots")
        assert (await r.client.xpending(batch, GROUP))["pending"] == 3  # the reserve slot stays free
        await r.add(item("online", max_tokens=4))
        res = await r.result("online")
        # it ran in the reserve slot beside the batch (4 steps against their 40): no batch request ended first
        assert res.error is None
        assert [await r.client.exists(r.keys.result(MODEL, f"b{i}")) for i in range(9)] == [0] * 9
        for i in range(9):  # then the backlog drains, every one answered
            assert texts(await r.result(f"b{i}", timeout=30)) == [expected_text("one two three", max_tokens=40)]
        await until(lambda: r.worker.in_flight == 0, 5, "idle")
        assert await r.client.xlen(batch) == 0


async def test_batch_work_waits_while_interactive_work_leaves_only_the_reserve(redis_server: RedisServer) -> None:
    async with rig(redis_server, decode_ms=20, slots=4, batch_reserve_slots=1) as r:
        for i in range(3):
            await r.add(item(f"i{i}", max_tokens=200))  # 4 s: long past the probe, even on a loaded machine
        await until(lambda: r.worker.in_flight == 3, 5, "interactive work in 3 slots")
        batch = r.keys.batch_stream(MODEL)
        await r.add(item("b", max_tokens=4), stream=batch)
        await r.add(item("probe", max_tokens=2))  # taken into the free slot; the worker reads again meanwhile
        assert (await r.result("probe")).error is None
        assert await _lag(r, batch) == 1  # one slot free, and it is the reserve: batch work stays unread
        assert (await r.result("b", timeout=30)).error is None  # once interactive work leaves room
        for i in range(3):
            assert (await r.client.exists(r.keys.result(MODEL, f"i{i}"))) == 1


async def test_an_interactive_request_takes_a_batch_slot_when_every_slot_is_taken(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    """batch_preempt (the default): the batch request started last goes back to its stream and runs again later;
    the interactive request ends before any batch request; every batch request is answered once.  The request
    log says which request preempted, and how long it took from the enqueue to its start and first token."""
    caplog.set_level(logging.INFO, "mgpu.worker")
    async with rig(redis_server, decode_ms=20, slots=2, batch_reserve_slots=0, log_requests=True) as r:
        batch = r.keys.batch_stream(MODEL)
        for i in range(3):
            await r.add(item(f"b{i}", max_tokens=100), stream=batch)  # 2 s each
        await until(lambda: r.worker.in_flight == 2, 5, "batch work in both slots")
        await r.add(item("online", max_tokens=4))
        assert (await r.result("online")).error is None
        # it did not wait for a slot: one batch request was handed back for it before any had ended
        ended = [await r.client.exists(r.keys.result(MODEL, f"b{i}")) for i in range(3)]
        assert (r.worker.stats.preempted, ended) == (1, [0] * 3), r.worker.jobs
        logged = {x.request_id: x for x in caplog.records if x.getMessage() == "request finished"}  # type: ignore[attr-defined]
        online = logged["online"]
        assert (online.preempted, online.stream) == (1, r.stream)  # type: ignore[attr-defined]
        assert 0 <= online.queue_ms <= online.ttft_ms <= online.total_ms  # type: ignore[attr-defined]
        for i in range(3):
            assert texts(await r.result(f"b{i}", timeout=30)) == [expected_text("one two three", max_tokens=100)]
        await until(lambda: r.worker.in_flight == 0, 5, "idle")
        assert (await r.client.xpending(batch, GROUP))["pending"] == 0 and await r.client.xlen(batch) == 0
        logged = {x.request_id: x for x in caplog.records if x.getMessage() == "request finished"}  # type: ignore[attr-defined]
        assert [getattr(logged[f"b{i}"], "preempted", 0) for i in range(3)] == [0] * 3  # none of them preempted
        assert {logged[f"b{i}"].stream for i in range(3)} == {batch}  # type: ignore[attr-defined]


async def test_entries_of_two_streams_with_the_same_id_both_run(redis_server: RedisServer) -> None:
    """Entry ids are unique per stream only: a batch entry and an interactive one added in the same millisecond
    both get "<ms>-0".  The worker once keyed its jobs by id alone and took the second for the first ("runs
    already"): it waited for the lease to lapse and the reclaim (seen as the preemption test's rare failure)."""
    async with rig(redis_server, decode_ms=20, slots=2, batch_reserve_slots=0) as r:
        batch = r.keys.batch_stream(MODEL)
        await r.client.xadd(batch, item("b", max_tokens=100).to_fields(), id="5-0")  # 2 s
        await until(lambda: r.worker.in_flight == 1, 5, "the batch request running")
        await r.client.xadd(r.stream, item("online", max_tokens=4).to_fields(), id="5-0")
        assert (await r.result("online")).error is None
        assert await r.client.exists(r.keys.result(MODEL, "b")) == 0  # it ran beside the batch request
        assert (r.worker.stats.reclaimed, r.worker.stats.preempted) == (0, 0)
        assert (await r.result("b", timeout=30)).error is None


async def test_without_preemption_an_interactive_request_waits_for_a_batch_slot(redis_server: RedisServer) -> None:
    async with rig(redis_server, decode_ms=20, slots=2, batch_reserve_slots=0, batch_preempt=False) as r:
        batch = r.keys.batch_stream(MODEL)
        for i in range(2):
            await r.add(item(f"b{i}", max_tokens=40), stream=batch)
        await until(lambda: r.worker.in_flight == 2, 5, "batch work in both slots")
        await r.add(item("online", max_tokens=4))
        assert (await r.result("online", timeout=30)).error is None
        assert sum([await r.client.exists(r.keys.result(MODEL, f"b{i}")) for i in range(2)]) >= 1
        assert r.worker.stats.preempted == 0


async def test_a_freed_slot_takes_batch_work_at_once_while_an_interactive_read_waits(
        redis_server: RedisServer) -> None:
    """With the room beyond the reserve taken, the interactive read waits in a task of its own: a batch request
    that ends hands its slot to the next one at once, not after the read's BLOCK time (here 20 s)."""
    async with rig(redis_server, decode_ms=10, slots=2, batch_reserve_slots=1, read_block_ms=20_000) as r:
        batch = r.keys.batch_stream(MODEL)
        for i in range(4):
            await r.add(item(f"b{i}", max_tokens=10), stream=batch)  # 0.1 s each, one at a time (room 1)
        for i in range(4):
            assert (await r.result(f"b{i}", timeout=15)).error is None


async def test_a_malformed_entry_on_the_batch_stream_is_answered_and_acknowledged(redis_server: RedisServer) -> None:
    """As on the interactive stream: an entry that is not a WorkItem is answered with an error result when it
    names a request id, moved to the dead-letter stream, acknowledged; the batch work behind it runs."""
    async with rig(redis_server, decode_ms=1, slots=4, batch_reserve_slots=0) as r:
        batch = r.keys.batch_stream(MODEL)
        await r.client.xadd(batch, {"p": '{"id": "bad-1", "kind": "completion", "model": 5}'})
        await r.client.xadd(batch, {"p": "not json at all"})
        await r.add(item("good", max_tokens=3), stream=batch)
        assert texts(await r.result("good")) == [expected_text("one two three", max_tokens=3)]
        bad = await r.result("bad-1")
        assert bad.error is not None and bad.error.status == 400
        await until(lambda: r.worker.stats.dead_lettered == 2, 5, "both dead-lettered")
        assert await r.client.xlen(r.keys.dlq(MODEL)) == 2
        assert (await r.client.xpending(batch, GROUP))["pending"] == 0


async def test_batch_read_beside_a_pending_interactive_read_counts_the_slots_it_started(
        redis_server: RedisServer) -> None:
    """The pull loop reads batch work while the interactive read waits in a task of its own; if that task starts a
    request meanwhile, the batch entries read must fit the slots free after it, not before.  (It once used the
    count from before its read: a worker ran more requests than its slots, the engine queued the excess, and an
    interactive request that preempted next could wait for a batch request to end: 150-270 ms in bench runs.)"""
    async with rig(redis_server, decode_ms=20, slots=2, batch_reserve_slots=0) as r:
        batch = r.keys.batch_stream(MODEL)
        worker = r.worker
        real_read = worker.r.xreadgroup
        raced = asyncio.Event()

        async def read(*a: Any, **kw: Any) -> Any:  # a batch read while the interactive read is pending
            streams = a[2] if len(a) > 2 else kw.get("streams", {})
            if (kw.get("block") is None and batch in streams and not raced.is_set()
                    and worker._iread is not None and not worker._iread.done()):
                raced.set()
                await r.add(item("online", max_tokens=100))  # the interactive task takes it now, into the free slot
                await until(lambda: any(j.stream == r.stream for j in worker.jobs.values()), 5, "online started")
            return await real_read(*a, **kw)

        worker.r.xreadgroup = read  # type: ignore[method-assign]
        await r.add(item("short", max_tokens=5), stream=batch)  # ends first, freeing a slot beside the long one
        for i in range(4):
            await r.add(item(f"b{i}", max_tokens=100), stream=batch)
        await until(raced.is_set, 10, "a batch read beside the pending interactive read")
        await until(lambda: r.worker.in_flight >= 2, 5, "both slots taken")
        running = [j for j in worker.jobs.values() if j.stop_reason is None]
        assert len(running) <= 2, [(j.stream, j.item.id if j.item else None) for j in running]
        assert (await r.result("online", timeout=30)).error is None
        for i in range(4):
            assert (await r.result(f"b{i}", timeout=30)).error is None

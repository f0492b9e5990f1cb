"""Fair sharing between API keys (gpu_worker.intake, lua.ENQUEUE's lanes, lua.PULL), against a real
redis-server: each key's requests wait in a lane of their own, a worker takes from the lanes in turn and keeps
slots for a lane with nothing running, a key may hold only its share of the queue, and every request is
counted out of the lanes when it ends."""

from __future__ import annotations

import asyncio
from collections import Counter

import redis

from common.keys import GROUP, LANES, Keys
from common.records import ReplyKind
from common.redis_conn import make_client
from common.schemas import Result, WorkItem
from common.scripts import Charge, Entry, Limits, Queued, QueueFull, Scripts, Target
from common.settings import WorkerSettings
from gpu_worker.engine.sim import SimEngine
from gpu_worker.intake import SHORT_BLOCK_MS, FairIntake
from gpu_worker.serving.sim import SimServer
from gpu_worker.worker import Worker
from ops.keys import KeyStore
from ops.procs import RedisServer

MODEL = "m"


def _setup(redis_server: RedisServer, ns: str) -> tuple[redis.Redis, Keys, Scripts, dict[str, str]]:
    r = redis.Redis.from_url(redis_server.url)
    k = Keys(ns)
    store = KeyStore(r, k)
    ids = {name: store.create(name)[0].id for name in ("flood", "light", "third")}
    for lane in k.lanes(MODEL):
        r.xgroup_create(lane, GROUP, id="0", mkstream=True)
    return r, k, Scripts(make_client(redis_server.url), k), ids


async def test_each_key_gets_a_lane_and_keeps_it_while_it_has_requests(redis_server: RedisServer) -> None:
    r, k, scripts, ids = _setup(redis_server, "f1")
    shared = k.stream(MODEL)
    target = Target(shared, "", shared)
    lim = Limits(1000, 1 << 30, 1 << 30, key_share=30)

    async def put(key: str) -> str:
        out = await scripts.enqueue(MODEL, target, "x", lim, charge=Charge(ids[key], 1))
        assert isinstance(out, Queued), out
        return out.entry_id

    for _ in range(30):
        await put("flood")
    lanes = k.lanes(MODEL)
    flood_lane = next(s for s in lanes if r.xlen(s))
    assert r.xlen(flood_lane) == 30  # one key, one lane
    await put("light")
    await put("third")
    assert sorted(r.xlen(s) for s in lanes) == [0] * (LANES - 3) + [1, 1, 30]  # each its own lane
    # the key's share of the queue: 30 in flight in the lanes, the 31st is refused
    out = await scripts.enqueue(MODEL, target, "x", lim, charge=Charge(ids["flood"], 1))
    assert out == QueueFull("key_share")
    # without fair lanes (or without a key) everything goes to the shared stream
    n = r.xlen(shared)
    assert isinstance(await scripts.enqueue(MODEL, target, "x", Limits(1000, 1 << 30, 1 << 30, fair=False),
                                            charge=Charge(ids["light"], 1)), Queued)
    assert isinstance(await scripts.enqueue(MODEL, target, "x", lim), Queued)
    assert r.xlen(shared) == n + 2
    # the worker's read takes the lanes in turn: flood, light, third, flood... from where it left off
    free = [0] * LANES
    nxt, got = await scripts.pull(lanes, "w", 4, before=0, lanes=LANES, first=0, keep=0, running=free,
                                  share=[99] * LANES)
    by_lane = Counter(p.stream for p in got)
    assert len(got) == 4 and by_lane[flood_lane] <= 2 and len(by_lane) >= 3
    # a lane at its share may not take the last `keep` free slots; below its share it may
    running = [5 if s == flood_lane else 0 for s in lanes]
    nxt, got = await scripts.pull(lanes, "w", 5, before=0, lanes=LANES, first=nxt, keep=3, running=running,
                                  share=[4] * LANES)
    assert [p.stream for p in got] == [flood_lane] * 2  # 5 free, 3 kept: 2 for the flood (the others are empty)
    # finishing a request counts it out; the key's last one frees its lane
    for p in got:
        if p.stream == flood_lane:
            assert await scripts.finish(Entry(p.stream, p.entry_id, "w", MODEL), Result(id=p.entry_id),
                                        ReplyKind.FINAL, None, 60)
    assert int(r.hget(k.lane_map(MODEL), f"n:{ids['flood']}") or 0) == 28
    light = [s for s in lanes if s != flood_lane and s != shared and r.xlen(s)]
    for s in light:
        for eid, _f in r.xrange(s):
            r.xreadgroup(GROUP, "w", {s: ">"})
            await scripts.finish(Entry(s, eid.decode(), "w", MODEL), Result(id=eid.decode()), ReplyKind.FINAL,
                                 None, 60)
    lane_map = {f.decode(): v.decode() for f, v in r.hgetall(k.lane_map(MODEL)).items()}
    assert set(lane_map) == {f"k:{ids['flood']}", f"n:{ids['flood']}", f"l:{lanes.index(flood_lane)}"}


def test_intake_keeps_slots_for_lanes_below_their_share() -> None:
    fair = FairIntake("own", ["a", "b", "c"], reserve=1, window_s=10, slots=8)
    fair.taken("a", now=100)
    plan = fair.plan(Counter({"a": 7}), now=100)
    assert plan.share == [8, 8, 4, 4]  # one active lane: its share is every slot; another would halve it
    assert plan.keep == 1 and not plan.capped(1)
    fair.taken("b", now=101)
    plan = fair.plan(Counter({"a": 5, "b": 2}), now=102)
    assert plan.share == [8, 4, 4, 2] and plan.capped(1) and not plan.capped(2)
    assert plan.keep == 3  # b had 2 running: keep one more than that
    assert fair.blocking_read(plan, 4, 1000) == (["own", "a", "b", "c"], 1, 1000)
    assert fair.blocking_read(plan, 3, 1000) == (["own", "b", "c"], 1, SHORT_BLOCK_MS)  # a may not take them
    assert fair.plan(Counter({"a": 5}), now=115).keep == 1  # b's demand is past the window
    assert FairIntake("own", ["a"], reserve=0, window_s=10, slots=8).plan(Counter({"a": 8})).keep == 0


async def test_a_light_key_is_served_through_a_flood(redis_server: RedisServer) -> None:
    """One worker with 4 slots; a key floods it with 24 requests, then another key sends one: under first
    come first served it would wait for 20; it is taken at the next free slot.  Its second request, while
    both lanes are active, finds a slot kept for it."""
    r, k, scripts, ids = _setup(redis_server, "f2")
    ws = WorkerSettings.load({"redis_url": redis_server.url, "namespace": "f2", "engine": "sim", "model": MODEL,
                              "slots": 4, "worker_id": "w", "sim_decode_ms": 10, "sim_decode_ms_per_seq": 0,
                              "log_requests": False}, env={})
    w = Worker(ws, SimServer(SimEngine(slots=4, decode_ms=10, decode_ms_per_seq=0), MODEL),
               make_client(redis_server.url))
    await w.server.start()
    task = asyncio.create_task(w.run())
    shared = k.stream(MODEL)
    target = Target(shared, "", shared)
    lim = Limits(1000, 1 << 30, 1 << 30)

    async def put(key: str, rid: str) -> None:
        body = WorkItem(id=rid, kind="completion", model=MODEL,
                        body={"model": MODEL, "prompt": "a b", "max_tokens": 10}).to_fields()["p"]
        assert isinstance(await scripts.enqueue(MODEL, target, body, lim, charge=Charge(ids[key], 12)), Queued)

    def finished(rid: str) -> float | None:
        raw = r.get(k.result(MODEL, rid))
        return Result.model_validate_json(raw).finished_at if raw else None

    async def wait(rid: str) -> float:
        while (t := finished(rid)) is None:
            await asyncio.sleep(0.01)
        return t

    try:
        for i in range(24):
            await put("flood", f"f{i}")
        while len(w.jobs) < 4:
            await asyncio.sleep(0.005)
        await put("light", "l0")
        t_light = await wait("l0")
        later = [i for i in range(24) if (t := await wait(f"f{i}")) is not None and t > t_light]
        assert len(later) >= 16, later  # it overtook the flood's backlog (FIFO: 0)
        for i in range(24, 48):
            await put("flood", f"f{i}")
        await put("light", "l1")
        flood_lane = k.lanes(MODEL)[int(r.hget(k.lane_map(MODEL), f"k:{ids['flood']}") or 0)]
        while finished("l1") is None:
            assert sum(1 for j in w.jobs.values() if j.stream == flood_lane) <= 3  # a slot kept for the light lane
            await asyncio.sleep(0.005)
        assert sum(finished(f"f{i}") is None for i in range(24, 48)) >= 16  # ahead of the flood's backlog
    finally:
        w.request_drain()
        await asyncio.wait_for(task, 30)
        await w.server.shutdown()

"""The Lua scripts through their typed calls (common.scripts), against a real redis-server: fencing by
owner, first result wins, hand-back without spending a delivery, reclaim naming the previous owner,
dead-lettering, the enqueue's fallback and limits, the sweep of a gone worker's own stream."""

from __future__ import annotations

import pytest
import redis

from common.keys import GROUP, Keys
from common.records import ReplyKind
from common.redis_conn import make_client
from common.schemas import Result
from common.scripts import Duplicate, Entry, Finish, Limits, Queued, QueueFull, Scripts, Target, renew, renew_script
from ops.procs import RedisServer


@pytest.fixture
def r(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


async def test_fencing_scripts(r: redis.Redis, redis_server: RedisServer) -> None:
    k = Keys("u")
    s = k.stream("m")
    client = make_client(redis_server.url)
    scripts = Scripts(client, k)
    r.xgroup_create(s, GROUP, id="0", mkstream=True)
    eid = r.xadd(s, {"p": "{}"}).decode()
    r.xreadgroup(GROUP, "a", {s: ">"}, count=1)
    lua_renew = renew_script(r)

    def renewed(consumer: str) -> list[bytes]:
        p = r.pipeline(transaction=False)
        renew(p, lua_renew, s, consumer, [eid])
        return p.execute()[0]  # type: ignore[no-any-return]

    assert renewed("a") == []  # a owns it
    assert renewed("b") == [eid.encode()]  # b does not
    # a releases it: immediately claimable, without spending a delivery
    assert await scripts.release(s, "a", [eid]) == 1
    cursor, claimed = await scripts.reclaim(s, "b", 3000, "-", 10)
    assert [(c.entry_id, c.previous_owner) for c in claimed] == [(eid, "a")] and cursor == "0-0"
    assert claimed[0].deliveries == 1  # the hand-back spent no delivery
    # the zombie a can neither store a result nor acknowledge
    res = Result(id="req")
    assert await scripts.finish(Entry(s, eid, "a", "m"), res, ReplyKind.FINAL, "gw", 60) == Finish.FENCED
    assert r.get(k.result("m", "req")) is None and r.xlen(s) == 1
    # the owner b can, once; a second result for the same request does not overwrite the first
    assert await scripts.finish(Entry(s, eid, "b", "m"), res, ReplyKind.FINAL, "gw", 60) == Finish.STORED
    assert r.xlen(s) == 0 and r.xpending(s, GROUP)["pending"] == 0 and r.xlen(k.replies("gw", "")) == 1
    eid2 = r.xadd(s, {"p": "{}"}).decode()
    r.xreadgroup(GROUP, "c", {s: ">"}, count=1)
    other = Result(id="req", model="other")
    assert await scripts.finish(Entry(s, eid2, "c", "m"), other, ReplyKind.FINAL, "gw", 60) == Finish.DUPLICATE
    assert Result.model_validate_json(r.get(k.result("m", "req")) or b"").model == ""
    # dead-lettering keeps the payload and answers the client
    eid3 = r.xadd(s, {"p": '{"id":"poison"}'}).decode()
    r.xreadgroup(GROUP, "c", {s: ">"}, count=1)
    assert await scripts.dead_letter(Entry(s, eid3, "c", "m"), '{"id":"poison"}', Result(id="poison"), "gw",
                                     reason="max", deliveries=4, ttl_s=60, max_dead_letters=100, request_id="poison")
    entry = r.xrange(k.dlq("m"))[0][1]
    assert entry[b"p"] == b'{"id":"poison"}' and entry[b"deliveries"] == b"4"
    assert r.get(k.result("m", "poison")) is not None and r.xlen(s) == 0
    await client.aclose()


async def test_enqueue_push_falls_back_to_shared_unless_target_ready(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    k = Keys("t")
    scripts = Scripts(make_client(redis_server.url), k)
    own, shared = k.worker_stream("m", "w1"), k.stream("m")
    target = Target(own, k.worker("w1"), shared)
    limits = Limits(100, 1 << 30, 1 << 30)

    async def enqueue(payload: str, t: Target = target, lim: Limits = limits) -> Queued | QueueFull:
        out = await scripts.enqueue("m", t, payload, lim)
        assert not isinstance(out, Duplicate)
        return out

    q = await enqueue("a")
    assert isinstance(q, Queued) and q.fell_back and r.xlen(shared) == 1 and not r.exists(own)  # no registry hash
    r.hset(k.worker("w1"), "state", "draining")
    q = await enqueue("b")
    assert isinstance(q, Queued) and q.fell_back and r.xlen(shared) == 2
    r.hset(k.worker("w1"), "state", "ready")
    q = await enqueue("c")
    assert isinstance(q, Queued) and not q.fell_back and r.xlen(own) == 1
    # the queue limit counts the model's requests accepted and not answered, wherever they wait, in one
    # counter (the work does not grow with the workers); an entry a producer adds straight to a stream is not
    # one the gateway accepted
    assert int(r.get(k.queue_len("m")) or 0) == 3
    r.xadd(k.worker_stream("m", "w2"), {"p": "x"})
    r.sadd(k.worker_streams("m"), "w1")  # w1's own stream is registered (the recount at the limit reads it)
    wide = target
    assert await enqueue("d", wide, Limits(3, 1 << 30, 1 << 30)) == QueueFull("entries")
    assert isinstance(await enqueue("d", wide, Limits(4, 1 << 30, 1 << 30)), Queued)
    # a counter that drifted high (an upgrade from a version that did not keep it) is recounted at the limit
    # from the streams (shared, lanes, every worker's own: 5 entries, the producer's one included) and heals
    r.sadd(k.worker_streams("m"), "w2")
    r.set(k.queue_len("m"), 1000)
    assert isinstance(await enqueue("d2", wide, Limits(100, 1 << 30, 1 << 30)), Queued)
    assert int(r.get(k.queue_len("m")) or 0) == 6
    r.set(k.queue_len("m"), 1000)
    assert await enqueue("d3", wide, Limits(6, 1 << 30, 1 << 30)) == QueueFull("entries")
    assert int(r.get(k.queue_len("m")) or 0) == 6
    # and the bytes: every entry carries its size, counted per model and in all
    assert int(r.get(k.queue_bytes("m")) or 0) == 6 == int(r.get(k.queue_bytes_total("m")) or 0)  # a b c d d2
    assert await enqueue("e" * 100, wide, Limits(100, 50, 1 << 30)) == QueueFull("bytes")
    assert await enqueue("e" * 100, wide, Limits(100, 1 << 30, 50)) == QueueFull("total_bytes")


async def test_move_undelivered_keeps_payloads_and_leaves_pending(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    k = Keys("t")
    scripts = Scripts(make_client(redis_server.url), k)
    own, shared, wset = k.worker_stream("m", "dead"), k.stream("m"), k.worker_streams("m")
    r.xgroup_create(own, GROUP, id="0", mkstream=True)
    r.sadd(wset, "dead")
    for i in range(5):
        r.xadd(own, {"p": f"payload-{i}", "extra": "kept"})
    r.xreadgroup(GROUP, "dead", {own: ">"}, count=2)  # two were delivered to the dead worker
    r.hset(k.worker("dead"), "state", "ready")
    assert await scripts.move_undelivered("m", "dead", "sweeper", force=False, batch=100) is None  # alive
    r.delete(k.worker("dead"))
    assert await scripts.move_undelivered("m", "dead", "sweeper", force=False, batch=100) == (3, 2)
    got = [(f[b"p"], f[b"extra"]) for _, f in r.xrange(shared)]
    assert got == [(f"payload-{i}".encode(), b"kept") for i in (2, 3, 4)]
    assert r.xpending(own, GROUP)["pending"] == 2  # delivered ones wait for the reclaim
    for eid, _ in r.xrange(own):
        r.xack(own, GROUP, eid)
        r.xdel(own, eid)
    assert await scripts.move_undelivered("m", "dead", "sweeper", force=False, batch=100) == (0, 0)
    assert not r.exists(own) and not r.sismember(wset, "dead")


async def test_reclaim_many_takes_over_several_streams_in_one_call_within_count(redis_server: RedisServer) -> None:
    r = redis.Redis.from_url(redis_server.url)
    k = Keys("rm")
    scripts = Scripts(make_client(redis_server.url), k)
    a, b, nogroup = k.stream("m"), k.worker_stream("m", "w1"), k.worker_stream("m", "w2")
    ids: dict[str, list[str]] = {}
    for s in (a, b):
        r.xgroup_create(s, GROUP, id="0", mkstream=True)
        ids[s] = [r.xadd(s, {"p": f"{s}-{i}"}).decode() for i in range(3)]
        r.xreadgroup(GROUP, "dead", {s: ">"}, count=3)
    r.xadd(nogroup, {"p": "x"})
    # idle past 0 ms: all six are reclaimable; 4 slots: a's three, then one of b's, and b's cursor says more
    pages = await scripts.reclaim_many([a, nogroup, b], "heir", 0, ["-", "-", "-"], 4)
    (ca, got_a), (cn, got_n), (cb, got_b) = pages
    assert [c.entry_id for c in got_a] == ids[a] and ca == "0-0"
    assert got_n == [] and cn == "0-0"  # no group there: nothing to take, done
    assert [c.entry_id for c in got_b] == ids[b][:1] and cb == f"({ids[b][0]}"
    assert all(c.previous_owner == "dead" and c.deliveries == 2 for c in got_a + got_b)
    # following b's cursor takes the rest; a stream past the count keeps its cursor
    (cb2, rest), = await scripts.reclaim_many([b], "heir", 60_000, [cb], 10)
    assert rest == [] and cb2 == "0-0"  # not idle for a minute: nothing
    (ca3, none), (cb3, rest) = await scripts.reclaim_many([a, b], "heir2", 0, ["-", cb], 0)
    assert none == [] and rest == [] and ca3 == "-" and cb3 == cb  # no slot: cursors unchanged
    (cb4, rest), = await scripts.reclaim_many([b], "heir2", 0, [cb], 10)
    assert [c.entry_id for c in rest] == ids[b][1:] and cb4 == "0-0"


async def test_sweep_looks_at_other_workers_once_per_fleet_turn(redis_server: RedisServer) -> None:
    from gpu_worker.orphans import OwnStreams
    r = redis.Redis.from_url(redis_server.url)
    k = Keys("sw")
    scripts = Scripts(make_client(redis_server.url), k)
    own = OwnStreams(make_client(redis_server.url), scripts, k, "m", "me")
    for wid in ("me", "a", "b", "c", "d"):
        r.sadd(k.worker_streams("m"), wid)
        r.xgroup_create(k.worker_stream("m", wid), GROUP, id="0", mkstream=True)
    for wid in ("me", "a", "b", "c"):
        r.hset(k.worker(wid), "state", "ready")
    r.xadd(k.worker_stream("m", "d"), {"p": "unread"})  # d is gone and left an unread entry
    assert await own.sweep(0.5) == []
    assert r.xlen(k.stream("m")) == 1 and not r.exists(k.worker_stream("m", "d"))  # moved at the first look
    # four other workers: the next look comes after about three more reclaim intervals, not at the next call
    r.delete(k.worker("c"))
    r.xadd(k.worker_stream("m", "c"), {"p": "unread"})
    assert await own.sweep(0.5) == [] and r.xlen(k.stream("m")) == 1  # not looked yet
    own._next_look = 0.0  # the turn came
    assert await own.sweep(0.5) == [] and r.xlen(k.stream("m")) == 2

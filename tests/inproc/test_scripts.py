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
    assert r.xlen(s) == 0 and r.xpending(s, GROUP)["pending"] == 0 and r.xlen(k.replies("gw")) == 1
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
    # the queue limit counts the model's whole backlog: shared + own + the other own streams
    other = k.worker_stream("m", "w2")
    r.xadd(other, {"p": "x"})
    wide = Target(own, k.worker("w1"), shared, (other,))
    assert await enqueue("d", wide, Limits(4, 1 << 30, 1 << 30)) == QueueFull("entries")
    assert isinstance(await enqueue("d", wide, Limits(5, 1 << 30, 1 << 30)), Queued)
    # and the bytes: every entry carries its size, counted per model and in all
    assert int(r.get(k.queue_bytes("m")) or 0) == 4 == int(r.get(k.queue_bytes_total) or 0)
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

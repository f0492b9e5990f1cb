"""KEDA scales workers on ``XINFO GROUPS`` lag (deploy/k8s, redis-streams trigger, lagCount).  Redis answers
no lag (NULL) once a deleted id lies at or after the group's last-delivered id, and KEDA would read that as 0
and scale in while work waits.  After every mgpu operation on a request stream the lag must stay an integer
equal to the entries nobody has read yet: enqueue, pull, finish, reclaim, the drain hand-back, dead-lettering
(with the dead-letter stream's trimming), and the rescue of a dead worker's own stream.  Real redis-server."""

from __future__ import annotations

import random

import pytest
import redis

from common.keys import GROUP, Keys
from common.queues import read_queues
from common.records import ReplyKind
from common.redis_conn import make_client
from common.schemas import Result
from common.scripts import Entry, Finish, Limits, Queued, QueueFull, Scripts, Target
from ops.procs import RedisServer

LIMITS = Limits(10_000, 1 << 30, 1 << 30)


def lag(r: redis.Redis, stream: str) -> int:
    """The group's lag as KEDA reads it; fails on NULL."""
    (g,) = [g for g in r.xinfo_groups(stream) if g["name"] in (GROUP, GROUP.encode())]
    assert g["lag"] is not None, f"lag is NULL on {stream}: {g}"
    return int(g["lag"])


def unread(r: redis.Redis, stream: str) -> int:
    """The entries after the group's last-delivered id, counted directly."""
    (g,) = [g for g in r.xinfo_groups(stream) if g["name"] in (GROUP, GROUP.encode())]
    last = g["last-delivered-id"]
    return len(r.xrange(stream, min=b"(" + (last if isinstance(last, bytes) else last.encode()), max="+"))


def check(r: redis.Redis, *streams: str) -> None:
    for s in streams:
        assert lag(r, s) == unread(r, s), s


@pytest.fixture
def r(redis_server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(redis_server.url)


async def _enqueue(scripts: Scripts, k: Keys, model: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        q = await scripts.enqueue(model, Target(k.stream(model), "", k.stream(model)), f'{{"i":{i}}}', LIMITS)
        assert isinstance(q, Queued)
        ids.append(q.entry_id)
    return ids


async def _pull(scripts: Scripts, stream: str, consumer: str, n: int) -> list[str]:
    _, got = await scripts.pull([stream], consumer, n, before=0, lanes=1, first=0, keep=0, running=[0],
                                share=[n])
    return [p.entry_id for p in got]


async def test_lag_stays_true_through_every_operation(r: redis.Redis, redis_server: RedisServer) -> None:
    k = Keys("kl")
    s = k.stream("m")
    scripts = Scripts(make_client(redis_server.url), k)
    r.xgroup_create(s, GROUP, id="0", mkstream=True)  # as the worker creates it
    await _enqueue(scripts, k, "m", 6)
    assert lag(r, s) == 6
    a1, a2, a3 = await _pull(scripts, s, "a", 3)
    assert lag(r, s) == 3
    # the newest delivered entry answered while 3 wait behind it: a plain XDEL would make the lag NULL
    assert await scripts.finish(Entry(s, a3, "a", "m"), Result(id="r3"), ReplyKind.FINAL, None, 60) == Finish.STORED
    check(r, s)
    assert r.smembers(s + ":gc") == {a3.encode()} and r.xpending(s, GROUP)["pending"] == 2
    (mq,) = await read_queues(scripts.r, k, ["m"])  # what metrics and mgpu status show: the kept one is no work
    (q,) = [q for q in mq.streams if q.stream == s]
    assert (q.length, q.lag, q.pending) == (5, 3, 2) and r.xlen(s) == 6
    assert await scripts.finish(Entry(s, a1, "a", "m"), Result(id="r1"), ReplyKind.FINAL, None, 60) == Finish.STORED
    check(r, s)
    # the drain hand-back, then the reclaim by another worker
    assert await scripts.release(s, "a", [a2]) == 1
    check(r, s)
    _, claimed = await scripts.reclaim(s, "b", 0, "-", 10)
    assert [c.entry_id for c in claimed] == [a2]
    check(r, s)
    # dead-lettering
    assert await scripts.dead_letter(Entry(s, a2, "b", "m"), '{"i":1}', Result(id="r2"), None, reason="max",
                                     deliveries=4, ttl_s=60, max_dead_letters=100)
    check(r, s)
    # the group reads past the kept entry: the next delete removes it
    b4, = await _pull(scripts, s, "b", 1)
    check(r, s)
    assert await scripts.finish(Entry(s, b4, "b", "m"), Result(id="r4"), ReplyKind.FINAL, None, 60) == Finish.STORED
    check(r, s)
    assert not r.sismember(s + ":gc", a3) and r.xrange(s, a3, a3) == []
    rest = await _pull(scripts, s, "b", 10)
    assert len(rest) == 2 and lag(r, s) == 0
    for i, e in enumerate(rest):
        await scripts.finish(Entry(s, e, "b", "m"), Result(id=f"x{i}"), ReplyKind.FINAL, None, 60)
        check(r, s)
    assert r.xlen(s) == 0 and not r.exists(s + ":gc")
    assert int(r.get(k.queue_len("m")) or 0) == 0


async def test_lag_stays_true_when_a_dead_workers_stream_is_rescued(r: redis.Redis,
                                                                    redis_server: RedisServer) -> None:
    k = Keys("kr")
    own, shared = k.worker_stream("m", "dead"), k.stream("m")
    scripts = Scripts(make_client(redis_server.url), k)
    for st in (own, shared):
        r.xgroup_create(st, GROUP, id="0", mkstream=True)
    r.sadd(k.worker_streams("m"), "dead")
    for i in range(7):
        r.xadd(own, {"p": f"p{i}"})
    r.xreadgroup(GROUP, "dead", {own: ">"}, count=2)  # two were running on the dead worker
    check(r, own, shared)
    # moved in batches of 2: each batch is read, re-added to the shared stream and deleted
    assert await scripts.move_undelivered("m", "dead", "sweeper", force=False, batch=2) == (2, 5)
    check(r, own, shared)
    assert await scripts.move_undelivered("m", "dead", "sweeper", force=False, batch=2) == (2, 3)
    check(r, own, shared)
    assert await scripts.move_undelivered("m", "dead", "sweeper", force=False, batch=2) == (1, 2)
    check(r, own, shared)
    assert lag(r, own) == 0 and lag(r, shared) == 5
    assert r.xpending(own, GROUP)["pending"] == 2  # the running ones wait for the reclaim


async def test_dead_letter_trimming_keeps_an_operators_group_lag_true(r: redis.Redis,
                                                                      redis_server: RedisServer) -> None:
    k = Keys("kd")
    s, dlq = k.stream("m"), k.dlq("m")
    scripts = Scripts(make_client(redis_server.url), k)
    r.xgroup_create(s, GROUP, id="0", mkstream=True)
    r.xgroup_create(dlq, "ops", id="0", mkstream=True)  # an operator's tool reading the dead letters
    await _enqueue(scripts, k, "m", 8)
    ids = await _pull(scripts, s, "a", 8)
    for e in ids[:4]:
        await scripts.dead_letter(Entry(s, e, "a", "m"), "{}", Result(id=e), None, reason="max", deliveries=4,
                                  ttl_s=60, max_dead_letters=3)
    r.xreadgroup("ops", "tool", {dlq: ">"}, count=2)
    for e in ids[4:]:
        await scripts.dead_letter(Entry(s, e, "a", "m"), "{}", Result(id=e), None, reason="max", deliveries=4,
                                  ttl_s=60, max_dead_letters=3)
        g = r.xinfo_groups(dlq)[0]
        assert g["lag"] is not None
        assert int(g["lag"]) == len(r.xrange(dlq, min=b"(" + g["last-delivered-id"], max="+"))
        check(r, s)


async def test_lag_stays_true_under_random_interleavings(r: redis.Redis, redis_server: RedisServer) -> None:
    """Property: whatever order requests are enqueued, pulled, answered, handed back and reclaimed in, the
    lag stays an integer equal to the unread entries, and every answered entry is gone once the group has
    read past it."""
    k = Keys("kp")
    s = k.stream("m")
    scripts = Scripts(make_client(redis_server.url), k)
    r.xgroup_create(s, GROUP, id="0", mkstream=True)
    rng = random.Random(14)
    running: dict[str, str] = {}  # entry id -> consumer
    answered = 0
    for step in range(400):
        op = rng.random()
        if op < 0.3:
            await _enqueue(scripts, k, "m", rng.randint(1, 3))
        elif op < 0.55:
            c = rng.choice("abc")
            for e in await _pull(scripts, s, c, rng.randint(1, 3)):
                running[e] = c
        elif op < 0.85 and running:
            e = rng.choice(sorted(running))
            out = await scripts.finish(Entry(s, e, running.pop(e), "m"), Result(id=f"q{step}"), ReplyKind.FINAL,
                                       None, 60)
            assert out == Finish.STORED
            answered += 1
        elif running:  # a drain hands one back; another worker reclaims it
            e = rng.choice(sorted(running))
            await scripts.release(s, running.pop(e), [e])
            c = rng.choice("abc")
            _, claimed = await scripts.reclaim(s, c, 0, "-", 100)
            for cl in claimed:
                running[cl.entry_id] = c
        check(r, s)
        kept = r.scard(s + ":gc")
        assert kept <= 1  # only the newest delivered entry is ever kept
        assert r.xlen(s) == lag(r, s) + len(running) + kept
        if not running and lag(r, s) == 0:  # all answered: nothing is left behind
            assert r.xlen(s) == 0 and kept == 0, step
    assert answered > 50


async def test_the_queue_limit_recount_does_not_count_kept_entries(r: redis.Redis,
                                                                   redis_server: RedisServer) -> None:
    k = Keys("kc")
    s = k.stream("m")
    scripts = Scripts(make_client(redis_server.url), k)
    r.xgroup_create(s, GROUP, id="0", mkstream=True)
    await _enqueue(scripts, k, "m", 5)
    _a1, a2 = await _pull(scripts, s, "a", 2)
    await scripts.finish(Entry(s, a2, "a", "m"), Result(id="r2"), ReplyKind.FINAL, None, 60)
    assert r.scard(s + ":gc") == 1 and r.xlen(s) == 5  # a2 kept: a1 running, 3 unread
    r.set(k.queue_len("m"), 1000)  # a counter that drifted: the enqueue at the limit recounts the streams
    target = Target(s, "", s)
    assert await scripts.enqueue("m", target, "{}", Limits(4, 1 << 30, 1 << 30)) == QueueFull("entries")
    assert int(r.get(k.queue_len("m")) or 0) == 4  # a1 and 3 unread, not the kept a2
    assert isinstance(await scripts.enqueue("m", target, "{}", Limits(5, 1 << 30, 1 << 30)), Queued)

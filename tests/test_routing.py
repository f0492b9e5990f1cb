"""The pure pickers of gateway/routing.py, and the Lua scripts they rely on against a real redis-server."""

from __future__ import annotations

from collections import Counter

import redis

from common.keys import GROUP, Keys
from common.records import WorkerRecord
from common.redis_conn import make_client
from common.scripts import Duplicate, Limits, Queued, QueueFull, Scripts, Target
from gateway.registry import RegistryView
from gateway.routing import (
    Balancer,
    Candidate,
    HashRing,
    affinity_key,
    pick_affinity,
    pick_least_loaded,
    pick_round_robin,
    pick_weighted,
)
from ops.procs import RedisServer


def _c(wid: str, slots: int = 4, in_flight: int = 0, queued: int = 0, weight: float = 0.0) -> Candidate:
    return Candidate(wid, slots, in_flight, queued, weight)


def test_round_robin_cycles_exactly_and_skips_a_gone_worker() -> None:
    cands = [_c("c"), _c("a"), _c("b")]
    last = None
    seq = []
    for _ in range(9):
        last = pick_round_robin(cands, last)
        seq.append(last)
    assert seq == ["a", "b", "c"] * 3
    # "b" is gone: the cycle goes on from where it was without it
    alive = [_c("a"), _c("c")]
    assert [pick_round_robin(alive, x) for x in ("a", "b", "c")] == ["c", "c", "a"]


def test_weighted_shares_match_weights_over_10000_picks() -> None:
    weights = {"w1": 1.0, "w2": 2.0, "w3": 3.0, "w4": 10.0}
    cands = [_c(k, weight=v) for k, v in weights.items()]
    state: dict[str, float] = {}
    got = Counter(pick_weighted(cands, state) for _ in range(10_000))
    total = sum(weights.values())
    for k, v in weights.items():
        expected = 10_000 * v / total
        assert abs(got[k] - expected) <= 0.05 * expected, (k, got[k], expected)
    # smooth: the heaviest worker is never picked many times in a row while others wait
    state = {}
    seq = [pick_weighted([_c("a", weight=1), _c("b", weight=1)], state) for _ in range(6)]
    assert seq in (["a", "b"] * 3, ["b", "a"] * 3)


def test_weighted_defaults_to_slots() -> None:
    state: dict[str, float] = {}
    got = Counter(pick_weighted([_c("a", slots=8), _c("b", slots=24)], state) for _ in range(3200))
    assert got == {"a": 800, "b": 2400}


def test_least_loaded_picks_the_idle_worker_and_spreads_bursts() -> None:
    cands = [_c("busy", slots=4, in_flight=4), _c("idle", slots=4), _c("half", slots=8, in_flight=4)]
    assert pick_least_loaded(cands, {}) == "idle"
    # queued entries in an own stream count as load too
    assert pick_least_loaded([_c("a", in_flight=1), _c("b", queued=2)], {}) == "a"
    # a burst between two refreshes: local counts spread it instead of piling on one worker
    b = Balancer("least_loaded")
    two = [_c("x", slots=4), _c("y", slots=4)]
    b.on_refresh(1.0)
    picks = Counter(b.route("least_loaded", "m", two) for _ in range(8))
    assert picks == {"x": 4, "y": 4}
    # requests that finished before the next refresh no longer count
    b.on_refresh(2.0)  # a fresh registry view restarts the local counts
    assert b.local == {}
    view = RegistryView(Keys("t"), refreshed_at=3.0, control={"strategy": "least_loaded"})
    view.workers = {w: WorkerRecord(id=w, model="m", state="ready", slots=4) for w in ("x", "y")}
    routes = [b.plan(view, Keys("t"), "m", lambda: "") for _ in range(2)]
    assert sorted(r.target or "" for r in routes) == ["x", "y"] and b.local == {"x": 1, "y": 1}
    for r in routes:
        b.done(r)
    assert b.local == {"x": 0, "y": 0}
    again = b.plan(view, Keys("t"), "m", lambda: "")
    other = "y" if again.target == "x" else "x"
    assert again.destination == Target(f"t:q:m:w:{again.target}", f"t:worker:{again.target}", "t:q:m",
                                       (f"t:q:m:w:{other}",))


def test_affinity_is_sticky_bounded_and_consistent() -> None:
    ids = [f"w{i}" for i in range(4)]
    ring = HashRing.build(ids, 64)
    keys = [f"user-{i}" for i in range(2000)]
    owners = {k: ring.owner(k) for k in keys}
    # every worker owns a fair part of the key space (virtual nodes)
    shares = Counter(owners.values())
    assert all(300 < n < 700 for n in shares.values()), shares
    # adding a fifth worker moves only the keys the new worker takes (about 1/5)
    ring5 = HashRing.build([*ids, "w4"], 64)
    moved = [k for k in keys if ring5.owner(k) != owners[k]]
    assert all(ring5.owner(k) == "w4" for k in moved)
    assert 0.1 < len(moved) / len(keys) < 0.32
    # bounded load: the owner while it has a free slot, the shared stream (None) when full
    k = keys[0]
    owner = owners[k]
    free = [_c(i, slots=2) for i in ids]
    assert pick_affinity(free, ring, k, {}) == owner
    assert pick_affinity(free, ring, k, {owner: 1}) == owner
    assert pick_affinity(free, ring, k, {owner: 2}) is None
    full = [_c(i, slots=2, in_flight=2 if i == owner else 0) for i in ids]
    assert pick_affinity(full, ring, k, {}) is None


def test_affinity_key_prefers_user_then_session_then_prefix() -> None:
    assert affinity_key("alice", "s1", "p", None, 8) == "u:alice"
    assert affinity_key(None, "s1", "p", None, 8) == "s:s1"
    assert affinity_key(None, None, "0123456789abc", None, 8) == "p:01234567"
    msgs = [{"role": "system", "content": "long shared system prompt"}, {"role": "user", "content": "x"}]
    assert affinity_key(None, None, None, msgs, 12) == "p:system: long"


def test_strategy_resolution_from_the_control_hash() -> None:
    b = Balancer("pull", gateway_id="g1")
    assert b.strategy({}) == "pull"
    assert b.strategy({"strategy": "weighted"}) == "weighted"
    assert b.strategy({"strategy": "weighted", "strategy:g1": "round_robin"}) == "round_robin"
    assert b.strategy({"strategy": "weighted", "strategy:g2": "round_robin"}) == "weighted"
    assert b.strategy({"strategy": "nonsense"}) == "pull"


# ----------------------------------------------------------------------------- Lua, real redis-server


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

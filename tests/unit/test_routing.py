"""The pure pickers of gateway/routing.py (the Lua scripts they rely on: tests/inproc/test_scripts.py)."""

from __future__ import annotations

from collections import Counter

from common.keys import Keys
from common.records import WorkerRecord
from common.scripts import Target
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
    assert again.destination == Target(f"t:q:m:w:{again.target}", f"t:worker:{again.target}", "t:q:m")


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
    assert affinity_key("alice", "s1", "p", 8) == "u:alice"
    assert affinity_key(None, "s1", "p", 8) == "s:s1"
    assert affinity_key(None, None, "0123456789abc", 8) == "p:01234567"


def test_strategy_resolution_from_the_control_hash() -> None:
    b = Balancer("pull", gateway_id="g1")
    assert b.strategy({}) == "pull"
    assert b.strategy({"strategy": "weighted"}) == "weighted"
    assert b.strategy({"strategy": "weighted", "strategy:g1": "round_robin"}) == "round_robin"
    assert b.strategy({"strategy": "weighted", "strategy:g2": "round_robin"}) == "weighted"
    assert b.strategy({"strategy": "nonsense"}) == "pull"





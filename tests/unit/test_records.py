"""The typed Redis records, written and parsed in one place: a worker's registry hash round-trips, a
hash missing fields or holding junk parses to defaults or to None (never an exception in a reader),
and the readers built on them (the Prometheus targets, the gateway's routing view) see the same
worker.  fakeredis: pure logic on Redis's data types, no server behaviour under test."""

from __future__ import annotations

import fakeredis

from common.keys import Keys
from common.records import ModelFacts, WorkerRecord, WorkerState
from gateway.registry import RegistryView
from gateway.routing import Balancer
from ops.targets import read_worker_addresses


def _record(**kw: object) -> WorkerRecord:
    base: dict[str, object] = dict(id="w1", state=WorkerState.READY, model="m", host="h1", pid=42, gpu="0",
                                   slots=8, in_flight=3, queued=1, weight=0.0, heartbeat=1.5,
                                   metrics_host="10.0.0.7", metrics_port=9400, served=11)
    base.update(kw)
    return WorkerRecord.model_validate(base)


def test_worker_record_round_trips_through_a_redis_hash() -> None:
    r = fakeredis.FakeRedis()
    rec = _record()
    r.hset("k", mapping=rec.to_hash())
    back = WorkerRecord.from_hash("w1", r.hgetall("k"))
    assert back == rec and back.ready and back.share == 8.0  # weight unset: its slots
    assert "exits" not in rec.to_hash()  # crash-loop fields only when set
    crash = WorkerRecord(id="w2", state=WorkerState.CRASHLOOP, exits=5, log="/x.log")
    assert WorkerRecord.from_hash("w2", crash.to_hash()) == crash


def test_unreadable_or_partial_hashes_never_raise() -> None:
    assert WorkerRecord.from_hash("w", {}) is None  # expired
    assert WorkerRecord.from_hash("w", {b"slots": b"many"}) is None  # junk: treated as gone
    partial = WorkerRecord.from_hash("w", {b"state": b"ready", b"model": b"m", b"gpu": b""})
    assert partial is not None and partial.slots == 0 and partial.gpu == "" and partial.ready
    odd = WorkerRecord.from_hash("w", {b"state": b"migrating"})  # a state from a newer worker
    assert odd is not None and odd.state == "migrating" and not odd.ready
    assert ModelFacts.parse(b"not json") == ModelFacts()
    assert ModelFacts.parse(ModelFacts(max_model_len=2048, tokenizer="sim").model_dump_json()).max_model_len == 2048


def test_prometheus_targets_read_the_record() -> None:
    r = fakeredis.FakeRedis()
    k = Keys("t")
    for rec in (_record(), _record(id="w2", metrics_host="", host="h2", metrics_port=9500),
                _record(id="w3", metrics_port=0)):
        r.hset(k.worker(rec.id), mapping=rec.to_hash())
        r.sadd(k.workers, rec.id)
    assert read_worker_addresses(r, k) == {"w1": "10.0.0.7:9400", "w2": "h2:9500"}  # w3 has no metrics port


def test_the_routing_view_uses_the_records() -> None:
    view = RegistryView(Keys("t"))
    view.workers = {"a": _record(id="a", in_flight=0), "b": _record(id="b", in_flight=8),
                    "c": _record(id="c", state=WorkerState.DRAINING)}
    assert [w.id for w in view.live_workers("m")] == ["a", "b"]
    route = Balancer("least_loaded").plan(view, Keys("t"), "m", lambda: "")
    assert route.target == "a" and route.destination.stream == "t:q:m:w:a"

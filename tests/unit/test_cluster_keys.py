"""Redis Cluster key layout (common/keys.py): every key a model's scripts touch shares the model's slot, every
other key the namespace's, and the layout without a cluster is unchanged."""

from __future__ import annotations

from redis.crc import key_slot

from common.keys import LANES, Keys


def _model_keys(k: Keys, m: str) -> list[str]:
    return [k.stream(m), *k.lanes(m), k.lane_map(m), k.batch_stream(m), k.worker_stream(m, "w1"), k.worker_streams(m),
            k.dlq(m), k.result(m, "r1"), k.chunks(m, "r1"), k.idempotency("scope", "key", m), k.queue_bytes(m),
            k.queue_len(m), k.queue_bytes_total(m), k.replies("gw", m), k.worker_live(m, "w1"), k.none_for(m),
            k.stream(m) + ":gc", k.lane_prefix(m) + "3", k.worker_stream_prefix(m) + "w2"]


def test_a_models_keys_share_one_slot_and_models_spread() -> None:
    k = Keys("mgpu", cluster=True)
    slots = {m: {key_slot(x.encode()) for x in _model_keys(k, m)} for m in ("llama-3-8b", "qwen", "a}b", "{x")}
    assert all(len(s) == 1 for s in slots.values()), slots
    assert len({next(iter(s)) for s in slots.values()}) == 4  # different models, different slots (here)


def test_every_other_key_is_in_the_namespaces_slot() -> None:
    k = Keys("mgpu", cluster=True)
    rest = [k.none, k.api_key("id"), k.api_key_names, k.rate("id"), k.usage("id"), k.cancels, k.worker("w"),
            k.workers, k.models, k.drain("w"), k.control, k.worker_starts, k.admit("w"), k.supervisor("s"),
            k.supervisors, k.rollout, k.rollout_lock, k.rollout_history, k.rollout_abort]
    assert {key_slot(x.encode()) for x in rest} == {key_slot(b"{mgpu}")}


def test_without_a_cluster_the_names_are_unchanged() -> None:
    k = Keys("mgpu")
    assert k.stream("m") == "mgpu:q:m" and k.lanes("m")[1] == "mgpu:q:m:lane:1" and len(k.lanes("m")) == LANES
    assert k.result("m", "r") == "mgpu:res:m:r" and k.worker("w") == "mgpu:worker:w" == k.worker_live("m", "w")
    assert k.replies("gw", "m") == "mgpu:replies:gw" and k.queue_bytes_total("m") == "mgpu:qbytes"
    assert k.none_for("m") == k.none == "mgpu:-" and k.idempotency("s", "key", "m").startswith("mgpu:idem:s:")

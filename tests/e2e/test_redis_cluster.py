"""Redis Cluster with real processes: three primaries (``redis-server --cluster-enabled yes``, slots assigned by
``redis-cli --cluster create``), a gateway and sim workers that know Redis only by a ``redis+cluster://`` URL.

Keys are hash-tagged per model (common/keys.py), so each model's streams, results and scripts live in one slot
and the three models of these tests sit on three different shards.  Every request must be answered, also when a
worker is killed in the middle of its work (its entries are reclaimed by the other worker of its model), and an
API key's limits, checked on the key's own slot, must hold and be settled when the work ends."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import redis

from common.keys import GROUP, Keys
from ops.keys import KeyStore
from ops.procs import ClusterServers, wait_until
from tests.conftest import Stack

pytestmark = [pytest.mark.slow]


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[ClusterServers]:
    c = ClusterServers(tmp_path / "cluster").start()
    yield c
    c.stop()


def _one_model_per_shard(cluster: ClusterServers, keys: Keys) -> list[str]:
    """Model names whose keys fall on each of the cluster's primaries, in node order."""
    found: dict[int, str] = {}
    for i in range(10_000):
        found.setdefault(cluster.node_of(keys.stream(f"sim-{i}")).port, f"sim-{i}")
        if len(found) == len(cluster.nodes):
            return [found[n.port] for n in cluster.nodes]
    raise AssertionError("no model name for every shard")


def _chat(client: openai.OpenAI, model: str, i: int, *, stream: bool, max_tokens: int = 8) -> tuple[str, str]:
    """(the answer's model, its text), streaming or not."""
    msgs = [{"role": "user", "content": f"request {i} for {model}"}]
    if not stream:
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens)  # type: ignore[arg-type]
        return r.model, r.choices[0].message.content or ""
    text, seen = "", ""
    for chunk in client.chat.completions.create(model=model, messages=msgs, max_tokens=max_tokens,  # type: ignore[arg-type]
                                                stream=True):
        seen = chunk.model
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
    return seen, text


def _report(report: dict[str, object]) -> None:
    print(json.dumps(report))
    if os.environ.get("MGPU_CLUSTER_REPORT"):
        with open(os.environ["MGPU_CLUSTER_REPORT"], "a") as f:
            f.write(json.dumps(report) + "\n")


def test_three_models_on_three_shards_answer_everything_and_a_killed_worker_loses_nothing(
        cluster: ClusterServers, tmp_path: Path) -> None:
    stack = Stack(tmp_path, cluster.nodes[0], redis_url=cluster.url)
    keys, r = stack.keys, stack.r
    models = _one_model_per_shard(cluster, keys)
    assert len({cluster.node_of(keys.stream(m)).port for m in models}) == 3
    a, b, c = models
    try:
        # model a: two slow workers (the chaos target and its peer); b and c: one fast worker each
        wa = [stack.start_worker(model=a, slots=4, sim_decode_ms=25, sim_decode_ms_per_seq=0) for _ in range(2)]
        for m in (b, c):
            stack.start_worker(model=m, slots=16, sim_decode_ms=1, sim_decode_ms_per_seq=0)
        stack.start_gateway(request_timeout_s=60)
        stack.wait_routable()
        client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)

        # every model answers, streaming and not, from its own shard
        jobs = [(m, i, i % 2 == 0) for m in models for i in range(20)]
        with ThreadPoolExecutor(8) as pool:
            out = list(pool.map(lambda j: (j[0], *_chat(client, j[0], j[1], stream=j[2])), jobs))
        assert all(got == m and text for m, got, text in out), out[:3]
        for m in models:  # the model's keys are where its tag says, and nowhere else
            home = cluster.node_of(keys.stream(m))
            for n in cluster.nodes:
                with redis.Redis(port=n.port) as direct:
                    held = int(direct.execute_command("CLUSTER", "COUNTKEYSINSLOT",
                                                      direct.execute_command("CLUSTER", "KEYSLOT", keys.stream(m))))
                    assert (held > 0) == (n is home), (m, n.port, held)

        # chaos: kill one of model a's workers while it runs requests; its entries finish on the other
        victim, peer = wa
        assert victim.worker_id is not None and peer.worker_id is not None
        results: list[tuple[str, str] | BaseException] = []
        lock = threading.Lock()

        def one(i: int) -> None:
            try:
                res: tuple[str, str] | BaseException = _chat(client, a, 1000 + i, stream=i % 2 == 1, max_tokens=24)
            except Exception as exc:  # every outcome is counted below
                res = exc
            with lock:
                results.append(res)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        wait_until(lambda: int(r.hget(keys.worker(victim.worker_id), "in_flight") or 0) >= 2, 30,
                   "the victim to run requests", interval=0.01)
        victim.proc.kill()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), "a client hung"
        failed = [x for x in results if isinstance(x, BaseException)]
        assert failed == [] and len(results) == 32
        assert all(got == a and text for got, text in results)  # type: ignore[misc]
        reclaimed = int(r.hget(keys.worker(peer.worker_id), "reclaimed") or 0)
        assert reclaimed >= 1  # the kill hit work in flight, and the peer finished it
        wait_until(lambda: r.xpending(keys.stream(a), GROUP)["pending"] == 0, 30, "nothing pending on a's stream")
        wait_until(lambda: all(r.get(keys.queue_len(m)) is None for m in models), 30, "every request counted out")
        _report({"cluster": "3 primaries", "models": models, "answered": len(out) + len(results), "lost": 0,
                 "chaos_requests": len(results), "reclaimed_by_peer": reclaimed})
    finally:
        stack.stop_all()


def test_api_key_limits_hold_on_a_cluster_and_are_settled_when_work_ends(
        cluster: ClusterServers, tmp_path: Path) -> None:
    stack = Stack(tmp_path, cluster.nodes[0], redis_url=cluster.url)
    keys, r = stack.keys, stack.r
    models = _one_model_per_shard(cluster, keys)
    assert cluster.node_of(keys.rate("x")).port != cluster.node_of(keys.stream(models[0])).port or \
        cluster.node_of(keys.rate("x")).port != cluster.node_of(keys.stream(models[1])).port
    rec, secret = KeyStore(r, keys).create("team", rpm=4)
    try:
        for m in models[:2]:
            stack.start_worker(model=m, slots=8, sim_decode_ms=1, sim_decode_ms_per_seq=0)
        stack.start_gateway(auth="keys")
        client = openai.OpenAI(base_url=stack.base_url + "/v1", api_key=secret, max_retries=0, timeout=60)
        wait_until(lambda: {m.id for m in client.models.list()} >= set(models[:2]), 30, "both models routable",
                   interval=0.1)
        for i in range(4):  # four requests in the minute, over two models (two shards), are allowed
            got, text = _chat(client, models[i % 2], i, stream=i == 3)
            assert got == models[i % 2] and text
        with pytest.raises(openai.RateLimitError) as refused:
            _chat(client, models[0], 99, stream=False)
        assert refused.value.response.headers.get("retry-after")
        # the workers settled each request on the key's slot: none in flight, four counted in its usage
        wait_until(lambda: int(r.hget(keys.rate(rec.id), "inflight") or 0) == 0, 10, "in flight back to 0")
        usage = {k.decode(): int(v) for k, v in r.hgetall(keys.usage(rec.id)).items()}
        assert usage["requests"] == 4 and usage["completion_tokens"] > 0
        # a key without a secret is refused (401), and an Idempotency-Key retry follows its original
        assert httpx.post(stack.base_url + "/v1/chat/completions", json={}).status_code == 401
        body = {"model": models[1], "max_tokens": 4, "messages": [{"role": "user", "content": "once"}]}
        r.hset(keys.api_key(rec.id), "rpm", 0)  # no limit now (the gateway reads the record at admission)
        h = {"Authorization": f"Bearer {secret}", "Idempotency-Key": "k-1"}
        first = httpx.post(stack.base_url + "/v1/chat/completions", json=body, headers=h, timeout=30)
        again = httpx.post(stack.base_url + "/v1/chat/completions", json=body, headers=h, timeout=30)
        assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
        assert r.exists(keys.idempotency(rec.id, "k-1", models[1])) == 1  # in the model's slot
    finally:
        stack.stop_all()


def test_a_models_slot_moved_to_another_shard_under_load_loses_nothing(cluster: ClusterServers,
                                                                       tmp_path: Path) -> None:
    """The model's slot migrates (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE) while requests run: redis-py
    follows ASK/MOVED, multi-key scripts that meet a half-moved slot get TRYAGAIN and are retried, blocked
    reads are woken (UNBLOCKED) and read again.  Every request ends in an answer or an explicit 503."""
    stack = Stack(tmp_path, cluster.nodes[0], redis_url=cluster.url)
    keys = stack.keys
    model = _one_model_per_shard(cluster, keys)[0]
    home = cluster.node_of(keys.stream(model))
    try:
        for _ in range(2):
            stack.start_worker(model=model, slots=8, sim_decode_ms=5, sim_decode_ms_per_seq=0)
        stack.start_gateway(request_timeout_s=60)
        stack.wait_routable()
        statuses: list[int] = []
        stop = threading.Event()
        lock = threading.Lock()

        def client_loop(n: int) -> None:
            with httpx.Client(base_url=stack.base_url, timeout=60) as c:
                i = 0
                while not stop.is_set():
                    i += 1
                    try:
                        code = c.post("/v1/chat/completions", json={
                            "model": model, "max_tokens": 8, "stream": i % 3 == 0,
                            "messages": [{"role": "user", "content": f"{n} {i}"}]}).status_code
                    except httpx.HTTPError:
                        code = 0
                    with lock:
                        statuses.append(code)

        threads = [threading.Thread(target=client_loop, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        wait_until(lambda: statuses.count(200) >= 50, 30, "50 answers before the move")
        target = next(n for n in cluster.nodes if n is not home)
        moved = cluster.move_slot(keys.stream(model), target)
        before = len(statuses)
        wait_until(lambda: statuses[before:].count(200) >= 50, 60, "50 answers after the move")
        stop.set()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads), "a client hung"
        assert cluster.node_of(keys.stream(model)) is target and moved > 0
        with redis.Redis(port=target.port) as direct:
            assert direct.exists(keys.stream(model)) == 1
        counts = {code: statuses.count(code) for code in set(statuses)}
        _report({"slot_move": True, "keys_moved": moved, "outcomes": counts})
        assert set(counts) <= {200, 503}, counts  # no 500, no lost request (504 or no answer)
    finally:
        stack.stop_all()

"""A request's ``priority`` (vLLM's field: an integer, lower runs sooner) maps onto mgpu's two classes of work:
above 0 it waits on the model's batch stream, runs in the slots beyond the reserve, and gives its slot up to an
interactive request that finds none free (then runs again).  An API key's default priority does the same."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from common.keys import GROUP
from ops.keys import KeyStore
from ops.procs import wait_until
from tests.conftest import Stack

pytestmark = [pytest.mark.slow]


def _read(stack: Stack, stream: str) -> int:
    """Entries the workers' group has read from ``stream``."""
    groups = [g for g in stack.r.xinfo_groups(stream) if g["name"].decode() == GROUP]
    return int(groups[0]["entries-read"] or 0) if groups else 0


def _chat(base: str, max_tokens: int, headers: dict[str, str] | None = None, **extra: object) -> httpx.Response:
    return httpx.post(base + "/v1/chat/completions", timeout=60, headers=headers or {}, json={
        "model": "sim-model", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}], **extra})


def test_priority_above_zero_is_batch_work_that_gives_way_to_interactive_requests(stack: Stack) -> None:
    w = stack.start_worker(slots=2, batch_reserve_slots=0, sim_decode_ms=20, sim_decode_ms_per_seq=0)
    stack.start_gateway()
    k = stack.keys
    shared, batch = k.stream("sim-model"), k.batch_stream("sim-model")
    r = _chat(stack.base_url, 4, priority=5)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    assert (_read(stack, batch), _read(stack, shared)) == (1, 0)
    assert _chat(stack.base_url, 4, priority=0).status_code == 200 and _read(stack, shared) == 1

    # two long background requests take both slots; an interactive one takes one of them and ends first
    done: dict[str, tuple[int, float]] = {}

    def background(name: str) -> None:
        resp = _chat(stack.base_url, 150, priority=1)  # 3 s
        done[name] = (resp.status_code, time.monotonic())

    threads = [threading.Thread(target=background, args=(f"bg{i}",)) for i in range(2)]
    for t in threads:
        t.start()
    assert w.worker_id is not None
    wait_until(lambda: int(stack.r.hget(k.worker(w.worker_id), "in_flight") or 0) == 2, 20, "both slots taken")
    t0 = time.monotonic()
    assert _chat(stack.base_url, 4).status_code == 200
    answered = time.monotonic()
    for t in threads:
        t.join(60)
    assert sorted(done) == ["bg0", "bg1"] and all(code == 200 for code, _ in done.values())
    assert all(at > answered for _, at in done.values())  # no background request ended first
    wait_until(lambda: int(stack.r.hget(k.worker(w.worker_id), "preempted") or 0) == 1, 10, "one preemption")
    assert answered - t0 < min(at for _, at in done.values()) - t0


def test_a_keys_default_priority_and_a_bad_priority(stack: Stack) -> None:
    stack.start_worker(slots=2)
    keys = KeyStore(stack.r, stack.keys)
    _rec, batch_secret = keys.create("nightly", priority="batch")
    _rec2, online_secret = keys.create("online")
    stack.start_gateway(auth="keys")
    batch = stack.keys.batch_stream("sim-model")
    wait_until(lambda: _chat(stack.base_url, 2, {"Authorization": f"Bearer {online_secret}"}).status_code == 200,
               20, "the gateway to route")
    before = _read(stack, batch)
    assert _chat(stack.base_url, 2, {"Authorization": f"Bearer {batch_secret}"}).status_code == 200
    assert _read(stack, batch) == before + 1  # the key's default
    assert _chat(stack.base_url, 2, {"Authorization": f"Bearer {batch_secret}"}, priority=0).status_code == 200
    assert _read(stack, batch) == before + 1  # an explicit priority wins over the key's default
    bad = _chat(stack.base_url, 2, {"Authorization": f"Bearer {online_secret}"}, priority="high")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"

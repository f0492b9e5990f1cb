"""Scale to zero and back, as KEDA drives it (deploy/k8s): with ``scale_from_zero`` the gateway stays ready
with no live worker and queues requests for a model served before; the queue's lag (what KEDA's
redis-streams trigger reads) shows them; a worker that starts later answers them."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from common.keys import GROUP
from ops.procs import wait_until
from tests.conftest import Stack

pytestmark = [pytest.mark.slow]


def _lag(stack: Stack) -> int | None:
    g = [g for g in stack.r.xinfo_groups(stack.keys.stream("sim-model")) if g["name"] == GROUP.encode()]
    return g[0]["lag"] if g else None


def test_requests_wait_for_the_first_worker_when_scaled_to_zero(stack: Stack, tmp_path: Path) -> None:
    w = stack.start_worker()
    stack.start_gateway(scale_from_zero=True)
    w.proc.terminate()  # scaled in: SIGTERM, drained, gone
    stack.wait_worker_state(w, None)
    assert httpx.get(stack.base_url + "/ready").status_code == 200  # still in the Service
    answers: list[httpx.Response] = []
    body = {"model": "sim-model", "max_tokens": 4, "messages": [{"role": "user", "content": "wake up"}]}
    t = threading.Thread(target=lambda: answers.append(
        httpx.post(stack.base_url + "/v1/chat/completions", json=body, timeout=60)))
    t.start()
    wait_until(lambda: _lag(stack) == 1, 10, "the request to wait in the queue (lag 1: KEDA activates)")
    stack.start_worker()  # what KEDA's activation does
    t.join(60)
    assert [a.status_code for a in answers] == [200]
    assert _lag(stack) == 0
    # a model no worker ever served is still unknown: 404, not queued
    r = httpx.post(stack.base_url + "/v1/chat/completions", json={**body, "model": "never-served"}, timeout=10)
    assert r.status_code == 404


def test_without_scale_from_zero_no_live_worker_is_a_503(stack: Stack) -> None:
    w = stack.start_worker()
    stack.start_gateway()
    w.proc.terminate()
    stack.wait_worker_state(w, None)
    wait_until(lambda: httpx.get(stack.base_url + "/ready").status_code == 503, 10,
               "the gateway to see no live worker")
    r = httpx.post(stack.base_url + "/v1/chat/completions", timeout=10, json={
        "model": "sim-model", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503 and "no live worker" in r.json()["error"]["message"]

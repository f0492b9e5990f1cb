"""Fault tolerance with real processes and a real redis-server: dead, frozen and poisoned
workers, drains, Redis crashes and idempotent retries.  Default liveness settings throughout
(heartbeat 0.5 s, registry TTL 2 s, lease 3 s): the 5 s detection bound is the product's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from typing import Any

import httpx
import pytest

from common.keys import GROUP
from common.schemas import Result
from gpu_worker.engine.sim import expected_text
from ops.procs import mgpu_cmd, wait_until
from tests.conftest import ROOT, Proc, Stack

SLOW = {"model": "m", "sim_decode_ms": 20, "sim_decode_ms_per_seq": 0, "slots": 8}
DETECT_S = 5.0


def _field(stack: Stack, p: Proc, name: str) -> int:
    assert p.worker_id
    return int(stack.r.hget(stack.keys.worker(p.worker_id), name) or 0)


def _owner(stack: Stack, model: str = "m") -> str | None:
    pend = stack.r.xpending_range(stack.keys.stream(model), GROUP, "-", "+", 10)
    return pend[0]["consumer"].decode() if pend else None


def _result(stack: Stack, rid: str) -> Result | None:
    raw = stack.result_raw(rid)
    return None if raw is None else Result.model_validate_json(raw)


class Call(threading.Thread):
    """A request run in the background; ``.status`` / ``.body`` / ``.lines`` once joined."""

    def __init__(self, stack: Stack, body: dict[str, Any], path: str = "/v1/completions",
                 headers: dict[str, str] | None = None, timeout: float = 60) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.headers, self.timeout = stack.base_url + path, body, headers or {}, timeout
        self.status = 0
        self.payload: Any = None
        self.lines: list[str] = []
        self.got_content = threading.Event()
        self.start()

    def run(self) -> None:
        if self.body.get("stream"):
            with httpx.stream("POST", self.url, json=self.body, headers=self.headers, timeout=self.timeout) as r:
                self.status = r.status_code
                for ln in r.iter_lines():
                    if ln:
                        self.lines.append(ln)
                        if sum('"content":" ' in x or '"text":" ' in x for x in self.lines) >= 10:
                            self.got_content.set()
            return
        r = httpx.post(self.url, json=self.body, headers=self.headers, timeout=self.timeout)
        self.status, self.payload = r.status_code, r.json()

    def text(self) -> str:
        out = []
        for ln in self.lines:
            if ln == "data: [DONE]":
                break
            obj = json.loads(ln[6:])
            assert "error" not in obj, obj
            for c in obj["choices"]:
                out.append(c.get("text") or (c.get("delta") or {}).get("content") or "")
        return "".join(out)


def test_sigkill_mid_generation_completes_elsewhere(stack: Stack) -> None:
    a = stack.start_worker(**SLOW)
    stack.start_gateway()
    call = Call(stack, {"model": "m", "prompt": "long job", "max_tokens": 150})
    wait_until(lambda: _owner(stack) == a.worker_id, 10, "request running on a")
    b = stack.start_worker(**SLOW)
    killed = time.monotonic()
    a.proc.send_signal(signal.SIGKILL)
    # detection: a's registry entry lapses, and its entry is reclaimed by b
    wait_until(lambda: stack.worker_state(a.worker_id or "") is None, DETECT_S, "a detected dead")
    wait_until(lambda: _owner(stack) == b.worker_id, DETECT_S - (time.monotonic() - killed), "entry reclaimed")
    call.join(30)
    assert call.status == 200, call.payload
    res = _result(stack, call.payload["id"])
    assert res is not None and res.worker == b.worker_id and res.attempts == 2
    assert call.payload["usage"]["completion_tokens"] == 150


def test_midstream_worker_death_continues_one_stream(stack: Stack) -> None:
    a = stack.start_worker(**SLOW)
    stack.start_gateway()
    body = {"model": "m", "messages": [{"role": "user", "content": "stream please"}], "max_tokens": 120,
            "seed": 7, "stream": True, "stream_options": {"include_usage": True}}
    call = Call(stack, body, path="/v1/chat/completions")
    assert call.got_content.wait(10)
    b = stack.start_worker(**SLOW)
    a.proc.send_signal(signal.SIGKILL)
    call.join(30)
    assert call.status == 200 and call.lines[-1] == "data: [DONE]"
    streamed = call.text()
    usage = json.loads(call.lines[-2][6:])["usage"]
    assert usage["completion_tokens"] == 120
    # the same request, uninterrupted, on the surviving worker: the text must be identical
    again = stack.openai().chat.completions.create(**{k: v for k, v in body.items()
                                                      if k not in ("stream", "stream_options")})
    assert streamed == again.choices[0].message.content
    assert len(streamed.split()) == 120  # nothing repeated, nothing missing
    assert b.proc.poll() is None


def test_frozen_zombie_is_fenced(stack: Stack) -> None:
    a = stack.start_worker(**SLOW)
    stack.start_gateway()
    body = {"model": "m", "prompt": "zombie", "max_tokens": 150, "seed": 1, "stream": True}
    call = Call(stack, body)
    assert call.got_content.wait(10)
    b = stack.start_worker(**SLOW)
    a.proc.send_signal(signal.SIGSTOP)  # frozen past its lease
    try:
        wait_until(lambda: _owner(stack) == b.worker_id, DETECT_S, "entry reclaimed from the frozen worker")
    finally:
        a.proc.send_signal(signal.SIGCONT)  # the zombie wakes up and tries to carry on
    call.join(30)
    assert call.status == 200
    wait_until(lambda: _field(stack, a, "fenced") >= 1, 10, "zombie fenced")
    rid = json.loads(call.lines[0][6:])["id"]
    res = _result(stack, rid)
    assert res is not None and res.worker == b.worker_id
    # one answer: the chunk log has strictly increasing seqs and matches what the client saw
    chunks = [json.loads(f[b"c"]) for _, f in stack.r.xrange(stack.keys.chunks("m", rid))]
    assert [c["seq"] for c in chunks] == list(range(1, len(chunks) + 1))
    assert "".join(c["sse"] for c in chunks) == "".join(ln + "\n\n" for ln in call.lines)  # exactly what was sent
    assert call.text() == expected_text("zombie", max_tokens=150, seed=1)  # as one uninterrupted run
    assert res.usage.completion_tokens == 150
    assert _field(stack, a, "served") == 0 and a.proc.poll() is None


def test_poison_request_is_dead_lettered(stack: Stack) -> None:
    workers = [stack.start_worker(wait=False, MGPU_SIM_FAULTS="1", **SLOW) for _ in range(4)]
    for w in workers:
        stack.wait_worker_state(w, "ready")
    stack.start_gateway()
    r = httpx.post(stack.base_url + "/v1/completions", timeout=60,
                   json={"model": "m", "prompt": "please __mgpu_sim_crash__", "max_tokens": 5})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "dead_lettered"
    dead = [w for w in workers if w.proc.poll() is not None]
    assert len(dead) == 3 and all(w.proc.returncode == 17 for w in dead)  # three deliveries, no more
    dlq = stack.r.xrange(stack.keys.dlq("m"))
    assert len(dlq) == 1
    entry = {k.decode(): v.decode() for k, v in dlq[0][1].items()}
    assert entry["reason"] == "max_deliveries" and int(entry["deliveries"]) == 4
    assert json.loads(entry["p"])["body"]["prompt"] == "please __mgpu_sim_crash__"  # the payload is kept
    assert stack.r.xlen(stack.keys.stream("m")) == 0


def test_sigterm_drain_finishes_in_flight(stack: Stack) -> None:
    a = stack.start_worker(**SLOW)
    stack.start_gateway()
    calls = [Call(stack, {"model": "m", "prompt": f"job {i}", "max_tokens": 60}) for i in range(4)]
    wait_until(lambda: _field(stack, a, "in_flight") == 4, 10, "four in flight")
    a.proc.send_signal(signal.SIGTERM)
    for c in calls:
        c.join(30)
    assert [c.status for c in calls] == [200] * 4
    assert all(c.payload["usage"]["completion_tokens"] == 60 for c in calls)
    assert a.proc.wait(10) == 0
    assert stack.worker_state(a.worker_id or "") is None  # deregistered


def test_drain_past_grace_hands_work_over_at_once(stack: Stack) -> None:
    a = stack.start_worker(drain_grace_s=0.3, **SLOW)
    stack.start_gateway()
    call = Call(stack, {"model": "m", "prompt": "long", "max_tokens": 200})
    wait_until(lambda: _owner(stack) == a.worker_id, 10, "running on a")
    b = stack.start_worker(**SLOW)
    subprocess.run(mgpu_cmd("drain", a.worker_id or ""), check=True, cwd=ROOT, capture_output=True,
                   env={**os.environ, "MGPU_REDIS_URL": stack.redis_server.url, "MGPU_NAMESPACE": stack.ns})
    assert a.proc.wait(10) == 0
    # released, not abandoned: b takes it well before a lease would have expired
    wait_until(lambda: _owner(stack) == b.worker_id, 2.0, "taken over by b")
    call.join(30)
    assert call.status == 200 and call.payload["usage"]["completion_tokens"] == 200


def test_hung_engine_leaves_rotation(stack: Stack) -> None:
    a = stack.start_worker(MGPU_SIM_FAULTS="1", **SLOW)
    stack.start_gateway()
    call = Call(stack, {"model": "m", "prompt": "__mgpu_sim_hang__", "max_tokens": 5, "timeout": 30})
    wait_until(lambda: _owner(stack) == a.worker_id, 10, "the hanging request reached a")
    # the health check fails: a leaves rotation (and the registry) within the detection bound ...
    wait_until(lambda: stack.worker_state(a.worker_id or "") is None, DETECT_S, "a out of rotation")
    assert a.proc.wait(30) == 3  # ... and exits with the engine-dead code, for its supervisor
    b = stack.start_worker(**SLOW)  # a healthy worker (faults off) picks the released request up
    call.join(30)
    assert call.status == 200
    res = _result(stack, call.payload["id"])
    assert res is not None and res.worker == b.worker_id


def test_redis_sigkill_and_restart_loses_nothing(stack: Stack) -> None:
    stack.start_worker(**{**SLOW, "slots": 16})
    stack.start_gateway()
    calls = [Call(stack, {"model": "m", "prompt": f"r {i}", "max_tokens": 150, "timeout": 60}) for i in range(24)]
    calls += [Call(stack, {"model": "m", "prompt": f"s {i}", "max_tokens": 150, "stream": True, "timeout": 60})
              for i in range(4)]
    # every request accepted (none can finish this fast: 150 tokens take 3 s)
    wait_until(lambda: stack.r.xinfo_stream(stack.keys.stream("m"))["entries-added"] == 28, 10, "all accepted")
    stack.redis_server.kill()
    # while Redis is down: not ready, and new requests are refused at once
    wait_until(lambda: httpx.get(stack.base_url + "/ready").status_code == 503, 5, "gateway not ready")
    t0 = time.monotonic()
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": "m", "prompt": "x"}, timeout=10)
    assert r.status_code == 503 and time.monotonic() - t0 < 2.0
    time.sleep(1.0)  # the outage lasts a while
    stack.redis_server.start()
    for c in calls:
        c.join(90)
    assert all(not c.is_alive() for c in calls)  # nothing hangs
    assert [c.status for c in calls] == [200] * len(calls), [(c.status, c.payload) for c in calls]
    assert all(c.payload["usage"]["completion_tokens"] == 150 for c in calls if c.payload)
    assert all(c.lines[-1] == "data: [DONE]" and len(c.text().split()) == 150 for c in calls if c.lines)
    wait_until(lambda: httpx.get(stack.base_url + "/ready").status_code == 200, 10, "ready again")


def test_idempotent_retry_returns_original(stack: Stack) -> None:
    a = stack.start_worker(**SLOW)
    gw = stack.start_gateway()
    body = {"model": "m", "prompt": "once only", "max_tokens": 60, "temperature": 0.9}
    headers = {"Idempotency-Key": "order-123"}
    # the client gives up mid-request (its connection died) ...
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(stack.base_url + "/v1/completions", json=body, headers=headers, timeout=httpx.Timeout(5, read=0.3))
    # ... and the gateway dies too; the retry goes to a new gateway
    gw.proc.send_signal(signal.SIGKILL)
    stack.gateway_port = None
    stack.start_gateway()
    r2 = httpx.post(stack.base_url + "/v1/completions", json=body, headers=headers, timeout=30)
    assert r2.status_code == 200 and r2.json()["id"].startswith("cmpl-")  # the gateway's id, not the key
    r3 = httpx.post(stack.base_url + "/v1/completions", json=body, headers=headers, timeout=30)
    assert r3.json() == r2.json()
    rid = r2.json()["id"]
    assert httpx.get(f"{stack.base_url}/v1/requests/{rid}").json()["choices"] == r2.json()["choices"]
    assert httpx.get(f"{stack.base_url}/v1/requests/order-123").status_code == 404  # a key is not an id
    wait_until(lambda: _field(stack, a, "served") == 1, 5, "served counted")
    assert int(stack.r.xinfo_stream(stack.keys.stream("m"))["entries-added"]) == 1  # generated once

"""The defects found by probing the gateway and the workers (defects issue, items 2 to 10), each
shown against a real redis-server and real gateway and worker processes.  Item 1 (cancel races)
is tests/e2e/test_cancel_races.py and tests/inproc/test_cancel.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from common.keys import GROUP
from common.schemas import Result, WorkItem
from gpu_worker.engine.sim import expected_text
from ops.procs import wait_until
from tests.conftest import Proc, Stack

SLOW = {"model": "m", "sim_decode_ms": 50, "sim_decode_ms_per_seq": 0, "sim_prefill_ms_per_token": 0, "slots": 8}
FAST = {**SLOW, "sim_decode_ms": 1}


def _field(stack: Stack, p: Proc, name: str) -> int:
    return int(stack.r.hget(stack.keys.worker(p.worker_id or ""), name) or 0)


class Call(threading.Thread):
    """One request in a thread of its own; the response (status, JSON or SSE lines, timing) when done."""

    def __init__(self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.headers = url, body, headers or {}
        self.status = 0
        self.payload: Any = None
        self.lines: list[str] = []
        self.ctype = ""
        self.took = 0.0
        self.start()

    def run(self) -> None:
        t0 = time.monotonic()
        with httpx.stream("POST", self.url, json=self.body, headers=self.headers, timeout=60) as r:
            self.status, self.ctype = r.status_code, r.headers.get("content-type", "")
            if self.ctype.startswith("text/event-stream"):
                self.lines = [ln for ln in r.iter_lines() if ln]
            else:
                self.payload = json.loads(r.read())
        self.took = time.monotonic() - t0

    def text(self) -> str:
        objs = [json.loads(ln[6:]) for ln in self.lines if ln.startswith("data: {")]
        return "".join(o["choices"][0].get("text", "") for o in objs if o.get("choices"))


# ----------------------------------------------------------------------------- 2: retry while in flight


def test_idempotent_retry_while_the_original_runs_answers_both(stack: Stack) -> None:
    w = stack.start_worker(**SLOW)
    stack.start_gateway()
    url = stack.base_url + "/v1/completions"
    body = {"model": "m", "prompt": "pay once", "max_tokens": 40, "timeout": 12}
    headers = {"Idempotency-Key": "pay-77"}
    original = Call(url, body, headers)
    wait_until(lambda: _field(stack, w, "in_flight") == 1, 10, "the original running")
    retry = Call(url, body, headers)
    original.join(30)
    retry.join(30)
    assert (original.status, retry.status) == (200, 200), (original.payload, retry.payload)
    assert original.payload == retry.payload
    assert original.took < 8  # the original was not left to its 12 s deadline
    assert int(stack.r.xinfo_stream(stack.keys.stream("m"))["entries-added"]) == 1  # generated once


def test_streaming_retry_replays_the_stream_as_a_stream(stack: Stack) -> None:
    w = stack.start_worker(**SLOW)
    stack.start_gateway()
    url = stack.base_url + "/v1/completions"
    body = {"model": "m", "prompt": "stream once", "max_tokens": 30, "stream": True, "timeout": 12}
    headers = {"Idempotency-Key": "st-1"}
    original = Call(url, body, headers)
    wait_until(lambda: _field(stack, w, "in_flight") == 1, 10, "the original running")
    time.sleep(0.3)  # a few chunks out before the retry comes: it must replay them
    retry = Call(url, body, headers)
    original.join(30)
    retry.join(30)
    assert retry.ctype.startswith("text/event-stream")  # the shape the client asked for, not JSON
    want = expected_text("stream once", max_tokens=30)
    assert original.text() == want and retry.text() == want
    assert original.lines[-1] == retry.lines[-1] == "data: [DONE]"
    ids = {json.loads(ln[6:])["id"] for ln in original.lines + retry.lines if ln.startswith("data: {")}
    assert len(ids) == 1


def test_same_x_request_id_from_two_clients_gets_each_its_own_answer(stack: Stack) -> None:
    stack.start_worker(**FAST)
    stack.start_gateway()
    url = stack.base_url + "/v1/completions"
    a = httpx.post(url, json={"model": "m", "prompt": "alpha", "max_tokens": 6}, headers={"X-Request-Id": "42"})
    b = httpx.post(url, json={"model": "m", "prompt": "bravo", "max_tokens": 6}, headers={"X-Request-Id": "42"})
    assert a.status_code == b.status_code == 200
    assert a.headers["x-request-id"] == b.headers["x-request-id"] == "42"  # echoed for tracing
    assert a.json()["id"] != b.json()["id"]
    assert a.json()["choices"][0]["text"] == expected_text("alpha", max_tokens=6)
    assert b.json()["choices"][0]["text"] == expected_text("bravo", max_tokens=6)


# ----------------------------------------------------------------------------- 3: ids and scopes


def test_idempotency_key_reused_for_another_request_is_refused(stack: Stack) -> None:
    stack.start_worker(**FAST)
    stack.start_gateway()
    base = stack.base_url
    body = {"model": "m", "prompt": "one", "max_tokens": 4}
    key = {"Idempotency-Key": "k-1"}
    first = httpx.post(base + "/v1/completions", json=body, headers=key)
    assert first.status_code == 200
    rid = first.json()["id"]
    assert len(rid) == len("cmpl-") + 32 and rid.startswith("cmpl-")  # generated, unguessable
    same = httpx.post(base + "/v1/completions", json=dict(reversed(list(body.items()))), headers=key)
    assert same.status_code == 200 and same.json() == first.json()  # key order does not matter
    cases = [("/v1/completions", {**body, "prompt": "two"}, "a different request body"),
             ("/v1/completions", {**body, "stream": True}, "stream=false"),
             ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "one"}]},
              "/v1/completions endpoint")]
    for path, other, why in cases:
        r = httpx.post(base + path, json=other, headers=key)
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["code"] == "idempotency_key_reused" and err["param"] == "Idempotency-Key" and why in err["message"]
    assert int(stack.r.xinfo_stream(stack.keys.stream("m"))["entries-added"]) == 1


def test_results_are_read_by_server_id_and_only_in_their_scope(stack: Stack) -> None:
    stack.start_worker(**FAST)
    stack.start_gateway()
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2},
                   headers={"Idempotency-Key": "guessable"})
    rid = r.json()["id"]
    assert httpx.get(f"{stack.base_url}/v1/requests/{rid}").json()["choices"] == r.json()["choices"]
    assert httpx.get(f"{stack.base_url}/v1/requests/guessable").status_code == 404
    other = Result(id="cmpl-someone-else", model="m", scope="key:other-tenant")
    stack.r.set(stack.keys.result("m", other.id), other.model_dump_json(), ex=60)
    assert httpx.get(f"{stack.base_url}/v1/requests/{other.id}").status_code == 404  # not this caller's


# ----------------------------------------------------------------------------- 4: slow clients and floods


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    return s


def _read_all(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    out = b""
    while True:
        part = s.recv(65536)
        if not part:
            return out
        out += part


def test_partial_headers_and_slow_bodies_are_cut_off(stack: Stack) -> None:
    stack.start_worker(**FAST)
    gw = stack.start_gateway(http_read_timeout_s=1)
    assert gw.port
    s = _connect(gw.port)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n")  # ... and nothing more
    t0 = time.monotonic()
    answer = _read_all(s, 10)  # the server closes it; recv returns b"" (not a timeout here)
    assert answer.startswith(b"HTTP/1.1 408") and b'"read_timeout"' in answer
    assert time.monotonic() - t0 < 5
    s = _connect(gw.port)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: 100\r\n\r\n{\"model\": ")  # the body stalls
    answer = _read_all(s, 10)
    assert b" 408 " in answer.split(b"\r\n", 1)[0] and b'"read_timeout"' in answer
    s.close()
    # a connection that sends nothing at all is closed too
    s = _connect(gw.port)
    assert _read_all(s, 10).startswith(b"HTTP/1.1 408")


def test_health_answers_and_excess_connections_get_503_under_a_flood(stack: Stack) -> None:
    stack.start_worker(**FAST)
    gw = stack.start_gateway(http_read_timeout_s=3, max_connections=200)
    assert gw.port and gw.probe_port
    idle = [_connect(gw.port) for _ in range(1000)]  # open, say nothing
    try:
        t0 = time.monotonic()
        assert httpx.get(f"http://127.0.0.1:{gw.probe_port}/health", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{gw.probe_port}/ready", timeout=5).json()["live_workers"] == 1
        assert time.monotonic() - t0 < 2
        r = httpx.post(stack.base_url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2},
                       timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "too_many_connections"
        assert r.headers["retry-after"] == "1"
        # past the read timeout the idle connections are closed, and service resumes
        assert _read_all(idle[0], 10).startswith(b"HTTP/1.1 408")
        wait_until(lambda: httpx.post(stack.base_url + "/v1/completions", timeout=10, json={
            "model": "m", "prompt": "x", "max_tokens": 2}).status_code == 200, 15, "service after the flood")
    finally:
        for s in idle:
            s.close()


# ----------------------------------------------------------------------------- 5, 6: labels and logs


def test_unknown_models_do_not_grow_metric_labels(stack: Stack) -> None:
    stack.start_worker(**FAST)
    stack.start_gateway()
    for i in range(30):
        r = httpx.post(stack.base_url + "/v1/completions", json={"model": f"nope-{i}", "prompt": "x"})
        assert r.status_code == 404
    text = httpx.get(stack.base_url + "/metrics").text
    assert "nope-" not in text
    assert 'mgpu_gateway_requests_total{code="404",endpoint="completions",model="unknown",status="client_error"}' \
           ' 30.0' in text


def test_untrusted_values_cannot_forge_log_lines(stack: Stack) -> None:
    stack.start_worker(**FAST)
    gw = stack.start_gateway()
    evil = "m\nFORGED gateway: request done  outcome=success\x00\x1b[2J"
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": evil, "prompt": "x"})
    assert r.status_code == 404
    bad = httpx.post(stack.base_url + "/v1/completions", json={"model": "m", "prompt": "x"},
                     headers={"X-Request-Id": "a b=c"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "X-Request-Id"
    wait_until(lambda: "code=400" in gw.output(), 5, "both requests logged")
    text = gw.output()
    assert "code=404" in text and "model=unknown" in text
    assert "\x00" not in text and "\x1b" not in text
    assert not any(ln.startswith("FORGED") for ln in text.splitlines())


# ----------------------------------------------------------------------------- 7: memory bounds


def test_queue_byte_limit_answers_429_and_the_count_returns_to_zero(stack: Stack) -> None:
    w = stack.start_worker(**{**SLOW, "slots": 1, "max_model_len": 400_000})
    stack.start_gateway(max_queue_bytes=1 << 20)
    prompt = "a " * 150_000  # ~300 KB each
    calls = [Call(stack.base_url + "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 20})
             for _ in range(6)]
    for c in calls:
        c.join(60)
    statuses = sorted(c.status for c in calls)
    assert statuses.count(200) >= 3 and statuses.count(429) >= 1, statuses
    full = next(c.payload for c in calls if c.status == 429)["error"]
    assert full["code"] == "queue_full" and "byte limit" in full["message"]
    wait_until(lambda: _field(stack, w, "in_flight") == 0, 10, "idle")
    assert stack.r.get(stack.keys.queue_bytes("m")) is None and stack.r.get(stack.keys.queue_bytes_total("m")) is None
    assert stack.r.get(stack.keys.queue_len("m")) is None


def test_redis_near_maxmemory_refuses_new_work_with_503(stack: Stack) -> None:
    stack.start_worker(**FAST)
    stack.start_gateway()
    stack.r.set("filler", b"x" * (20 << 20))  # a Redis that holds something: 7 % headroom is then ~1.5 MB
    used = int(stack.r.info("memory")["used_memory"])
    stack.r.config_set("maxmemory", str(int(used / 0.93)))  # 93 % of it is used: past the 90 % high-water mark
    seen: list[Any] = []
    try:
        def refused() -> bool:
            r = httpx.post(stack.base_url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2})
            seen.append((r.status_code, r.text))
            return r.status_code == 503 and "near its memory limit" in r.json()["error"]["message"]

        wait_until(refused, 5, f"503 near maxmemory (last: {seen[-1:]})")
        assert stack.r.set("still-writable", "1")  # refused by mgpu before Redis itself refuses writes
    finally:
        stack.r.config_set("maxmemory", "0")
    wait_until(lambda: httpx.post(stack.base_url + "/v1/completions", json={
        "model": "m", "prompt": "x", "max_tokens": 2}).status_code == 200, 5, "accepted again")


def test_dead_letter_stream_is_bounded_but_keeps_unacknowledged_entries(stack: Stack) -> None:
    stack.start_worker(**FAST, max_dead_letters=5)
    r, keys = stack.r, stack.keys
    dlq = keys.dlq("m")
    for i in range(3):
        r.xadd(keys.stream("m"), {"p": f"not json {i}"})
    wait_until(lambda: r.xlen(dlq) == 3, 10, "3 dead letters")
    r.xgroup_create(dlq, "ops", id="0")
    held = r.xreadgroup("ops", "operator", {dlq: ">"}, count=2)[0][1]  # read, not acknowledged
    for i in range(3, 12):
        r.xadd(keys.stream("m"), {"p": f"not json {i}"})
    wait_until(lambda: r.xinfo_stream(dlq)["entries-added"] == 12, 10, "12 dead letters")
    ids = [e[0] for e in r.xrange(dlq)]
    assert [e[0] for e in held] == ids[:2]  # the unacknowledged ones stay
    # the unread one after them bounds the trim too: entries the group has not seen are kept
    r.xack(dlq, "ops", *[e[0] for e in held])
    r.xreadgroup("ops", "operator", {dlq: ">"})  # reads everything: nothing unread any more
    r.xack(dlq, "ops", *[e[0] for e in r.xrange(dlq)])
    r.xadd(keys.stream("m"), {"p": "not json last"})
    wait_until(lambda: r.xinfo_stream(dlq)["entries-added"] == 13, 10, "13 dead letters")
    assert r.xlen(dlq) == 5


def test_timeout_over_the_maximum_is_refused(stack: Stack) -> None:
    stack.start_worker(**FAST)
    stack.start_gateway(max_request_timeout_s=60)
    r = httpx.post(stack.base_url + "/v1/completions", json={"model": "m", "prompt": "x", "timeout": 86_400})
    assert r.status_code == 400 and r.json()["error"]["param"] == "timeout"


# ----------------------------------------------------------------------------- 8: strict validation


@pytest.mark.parametrize(("path", "extra", "param"), [
    ("/v1/completions", {"max_tokens": "5"}, "max_tokens"),
    ("/v1/completions", {"max_tokens": True}, "max_tokens"),
    ("/v1/completions", {"max_tokens": 3.0}, "max_tokens"),
    ("/v1/completions", {"stream": "yes"}, "stream"),
    ("/v1/completions", {"stream": 1}, "stream"),
    ("/v1/completions", {"logprobs": True}, "logprobs"),
    ("/v1/completions", {"echo": 0}, "echo"),
    ("/v1/completions", {"timeout": 5e-324}, "timeout"),
    ("/v1/chat/completions", {"logprobs": "yes"}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": False}, "top_logprobs"),
    ("/v1/chat/completions", {"n": 2.0}, "n"),
    # the simulator's own OpenAI layer (after the queue), as strict
    ("/v1/completions", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"response_format": {"type": "json_object"}}, "response_format"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools.0.function.name"),
    ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice"),
])
def test_lax_values_are_refused_naming_the_field(shared_stack: Stack, path: str, extra: dict[str, Any],
                                                 param: str) -> None:
    body: dict[str, Any] = {"model": "sim-model", "max_tokens": 2}
    body.update({"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]})
    body.update(extra)
    r = httpx.post(shared_stack.base_url + path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "BadRequestError"  # vLLM's type for a bad request
    assert err["message"].startswith(param)


def test_neutral_values_of_unsupported_fields_are_accepted(shared_stack: Stack) -> None:
    body = {"model": "sim-model", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}],
            "tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "logit_bias": {},
            "top_k": -1, "repetition_penalty": 1.0, "some_future_field": 1}
    assert httpx.post(shared_stack.base_url + "/v1/chat/completions", json=body).status_code == 200


def test_an_image_part_gets_a_message_that_says_what_is_wrong(shared_stack: Stack) -> None:
    body = {"model": "sim-model", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "data:,"}}]}]}
    r = httpx.post(shared_stack.base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["param"] == "messages.0.content" and "image_url part needs a multimodal model" in err["message"]


# ----------------------------------------------------------------------------- 9: OpenAPI and HTTP


def test_openapi_documents_bodies_responses_and_metrics(shared_stack: Stack) -> None:
    doc = httpx.get(shared_stack.base_url + "/openapi.json").json()
    schemas = doc["components"]["schemas"]
    for path, req in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/" + req)
        assert req in schemas and schemas[req]["properties"]["max_tokens"]["anyOf"][0]["type"] == "integer"
        assert {"200", "400", "404", "413", "429", "503", "504"} <= set(op["responses"])
        assert set(op["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    # the Files and Batches API, its objects' schemas those the answers are built from (common/batch_api.py)
    files, batches = doc["paths"]["/v1/files"], doc["paths"]["/v1/batches"]
    assert set(files["post"]["requestBody"]["content"]) == {"multipart/form-data"}
    assert files["post"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/FileObject")
    assert batches["post"]["requestBody"]["content"]["application/json"]["schema"]["additionalProperties"] is False
    assert {"Batch", "BatchList", "FileObject", "FileList", "FileDeleted"} <= set(schemas)
    assert "409" in doc["paths"]["/v1/batches/{batch_id}/cancel"]["post"]["responses"]
    assert set(doc["paths"]["/v1/files/{file_id}"]) == {"get", "delete"}


def test_405_names_the_allowed_methods_and_no_redirect_uses_the_host_header(shared_stack: Stack) -> None:
    r = httpx.get(shared_stack.base_url + "/v1/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["code"] == "method_not_allowed"
    r = httpx.put(shared_stack.base_url + "/v1/files")  # two routes (GET, POST) on one path: both named
    assert r.status_code == 405 and r.headers["allow"] == "GET, POST"
    r = httpx.get(shared_stack.base_url + "/v1/models/")
    assert r.status_code == 404 and "location" not in r.headers
    assert r.json()["error"]["code"] == "not_found"
    r = httpx.get(shared_stack.base_url + "/v1/models/", headers={"Host": "evil.example"})
    assert r.status_code == 400 and "location" not in r.headers  # a name it does not answer to (rebinding)
    assert r.json()["error"]["param"] == "Host"


# ----------------------------------------------------------------------------- 10: miscounted errors


def test_a_client_gone_while_sending_its_body_is_a_cancel_not_a_500(stack: Stack) -> None:
    stack.start_worker(**FAST)
    gw = stack.start_gateway()
    assert gw.port
    s = _connect(gw.port)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: 1000\r\n\r\n{\"model\"")
    time.sleep(0.2)  # the handler is reading the body
    s.close()

    def counted() -> bool:
        return 'code="499",endpoint="completions",model="-",status="cancelled"} 1.0' in \
            httpx.get(stack.base_url + "/metrics").text

    wait_until(counted, 5, "a cancel counted")
    text = httpx.get(stack.base_url + "/metrics").text
    assert 'code="500"' not in text
    assert "unexpected error" not in gw.output()


def test_an_unreadable_stored_result_is_an_explicit_error(stack: Stack) -> None:
    stack.start_worker(**FAST)
    stack.start_gateway()
    stack.r.set(stack.keys.result("m", "cmpl-corrupt"), b"{not json", ex=60)
    r = httpx.get(stack.base_url + "/v1/requests/cmpl-corrupt")
    assert r.status_code == 502 and r.json()["error"]["code"] == "bad_result"


def test_reclaim_log_names_the_worker_it_took_over_from(stack: Stack) -> None:
    a = stack.start_worker(**SLOW, worker_id="dies")
    r, keys = stack.r, stack.keys
    item = WorkItem(id="rc-1", kind="completion", model="m", body={"model": "m", "prompt": "p", "max_tokens": 80})
    r.xadd(keys.stream("m"), item.to_fields())
    wait_until(lambda: _field(stack, a, "in_flight") == 1, 10, "taken")
    a.proc.kill()
    b = stack.start_worker(**SLOW, worker_id="lives")
    wait_until(lambda: "reclaimed entry" in b.output(), 15, "the reclaim")
    line = next(ln for ln in b.output().splitlines() if "reclaimed entry" in ln)
    assert "from=dies" in line and "deliveries=2" in line
    wait_until(lambda: r.get(keys.result("m", "rc-1")) is not None, 15, "finished elsewhere")
    assert r.xpending(keys.stream("m"), GROUP)["pending"] == 0


def test_redis_gone_while_a_retry_follows_its_original_is_a_503(stack: Stack) -> None:
    w = stack.start_worker(**SLOW)
    stack.start_gateway()
    url = stack.base_url + "/v1/completions"
    body = {"model": "m", "prompt": "follow me", "max_tokens": 100}
    headers = {"Idempotency-Key": "follow-1"}
    Call(url, body, headers)
    wait_until(lambda: _field(stack, w, "in_flight") == 1, 10, "the original running")
    retry = Call(url, body, headers)
    time.sleep(0.5)  # the retry polls the original's result
    stack.redis_server.kill()
    retry.join(30)
    stack.redis_server.start()
    assert retry.status == 503, retry.payload
    assert retry.payload["error"]["code"] == "service_unavailable"

"""The serving path end to end: gateway and sim workers as processes, a real redis-server,
the official openai client."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from common.prompts import render_chat
from tests.conftest import Stack

MODEL = "sim-model"


def test_completion(shared_stack: Stack) -> None:
    c = shared_stack.openai()
    r = c.completions.create(model=MODEL, prompt="the quick brown fox", max_tokens=7)
    assert r.object == "text_completion" and r.model == MODEL and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert len(r.choices[0].text.split()) == 7
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 7, 11)


def test_chat(shared_stack: Stack) -> None:
    c = shared_stack.openai()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5)  # type: ignore[arg-type]
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content and len(msg.content.split()) == 5
    assert r.usage is not None and r.usage.prompt_tokens == len(render_chat(msgs).split())
    assert r.usage.completion_tokens == 5


def test_chat_stream_matches_non_stream(shared_stack: Stack) -> None:
    c = shared_stack.openai()
    msgs = [{"role": "user", "content": "count with me"}]
    full = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, seed=3)  # type: ignore[arg-type]
    stream = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=12, seed=3, stream=True,  # type: ignore[arg-type]
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert all(ch.usage is None for ch in chunks[:-1])


def test_completion_stream_raw_sse(shared_stack: Stack) -> None:
    body = {"model": MODEL, "prompt": "a b c", "max_tokens": 6, "stream": True}
    with httpx.stream("POST", shared_stack.base_url + "/v1/completions", json=body, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    objs = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert len(objs) >= 2  # streamed, not one blob
    assert all(o["object"] == "text_completion" and o["id"] == objs[0]["id"] for o in objs)
    assert "usage" not in objs[0]  # only with stream_options.include_usage
    assert objs[-1]["choices"][0]["finish_reason"] == "length"
    assert len("".join(o["choices"][0]["text"] for o in objs).split()) == 6


def test_sampling_params_pass_through(shared_stack: Stack) -> None:
    c = shared_stack.openai()
    a = c.completions.create(model=MODEL, prompt="x y", max_tokens=8, seed=1, n=2)
    b = c.completions.create(model=MODEL, prompt="x y", max_tokens=8, seed=1, n=2)
    assert [ch.index for ch in a.choices] == [0, 1]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # seeded: reproducible
    assert a.choices[0].text != a.choices[1].text  # each choice its own sample
    assert a.usage is not None and a.usage.completion_tokens == 16
    words = a.choices[0].text.split()
    k = next(i for i in range(1, len(words)) if words[i] not in words[:i])  # first new word
    stopped = c.completions.create(model=MODEL, prompt="x y", max_tokens=8, seed=1, stop=[" " + words[k]])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == " " + " ".join(words[:k])
    lp = c.completions.create(model=MODEL, prompt="x y", max_tokens=3, logprobs=2)
    assert lp.choices[0].logprobs is not None and len(lp.choices[0].logprobs.tokens or []) == 3


def test_unknown_fields_ignored(shared_stack: Stack) -> None:
    r = httpx.post(shared_stack.base_url + "/v1/completions", timeout=10,
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 2, "best_of_future_field": {"x": 1}})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_models_health_ready_workers(shared_stack: Stack) -> None:
    c = shared_stack.openai()
    assert {m.id for m in c.models.list()} == {MODEL, "slow-model"}
    assert httpx.get(shared_stack.base_url + "/health").json() == {"status": "ok"}
    ready = httpx.get(shared_stack.base_url + "/ready")
    assert ready.status_code == 200 and ready.json()["live_workers"] == 2
    workers = httpx.get(shared_stack.base_url + "/workers").json()["workers"]
    assert {w["model"] for w in workers} == {MODEL, "slow-model"}
    assert all(w["state"] == "ready" and w["heartbeat_age_s"] < 2 for w in workers)
    metrics = httpx.get(shared_stack.base_url + "/metrics").text
    assert "mgpu_gateway_requests_total" in metrics


# refused by the gateway: what it reads to place a request (nothing is enqueued)
BAD_AT_THE_GATEWAY = [
    ("chat", b"{not json", 400, None),
    ("chat", b"[1, 2]", 400, None),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 256}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "w " * 300, "max_tokens": 4}, 400, "prompt"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "w " * 300}]}, 400, "messages"),
    ("completions", {"model": MODEL, "prompt": "x", "n": 0}, 400, "n"),
    ("completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("completions", {"model": 7, "prompt": "x"}, 400, "model"),
    ("completions", {"model": "no-such-model", "prompt": "x"}, 404, "model"),
]
# refused by the worker's OpenAI layer (vLLM's, or here the simulator's): enqueued, answered with a 4xx
BAD_AT_THE_WORKER = [
    ("chat", {"model": MODEL}, 400, "messages"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("chat", {"model": MODEL, "messages": []}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": "hello"}, 400, "messages"),
    ("chat", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}, 400, "messages.0.content"),
    ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
     400, "tool_choice"),
    ("completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("completions", {"model": MODEL, "prompt": "x", "top_k": 5}, 400, "top_k"),  # the simulator has no top-k
]


def _post(s: Stack, endpoint: str, body: object) -> httpx.Response:
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(f"{s.base_url}/v1/{'chat/completions' if endpoint == 'chat' else 'completions'}",
                      timeout=10, headers={"content-type": "application/json"}, **kw)  # type: ignore[arg-type]


def _error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


@pytest.mark.parametrize(("endpoint", "body", "status", "param"), BAD_AT_THE_GATEWAY)
def test_bad_input_refused_at_the_gateway(shared_stack: Stack, endpoint: str, body: object, status: int,
                                          param: str | None) -> None:
    s = shared_stack
    before = int(s.r.xinfo_stream(s.keys.stream(MODEL))["entries-added"])
    _error(_post(s, endpoint, body), status, param)
    assert int(s.r.xinfo_stream(s.keys.stream(MODEL))["entries-added"]) == before  # nothing enqueued


@pytest.mark.parametrize(("endpoint", "body", "status", "param"), BAD_AT_THE_WORKER)
def test_bad_input_refused_by_the_worker(shared_stack: Stack, endpoint: str, body: object, status: int,
                                         param: str | None) -> None:
    s = shared_stack
    _error(_post(s, endpoint, body), status, param)
    assert isinstance(body, dict)
    _error(_post(s, endpoint, {**body, "stream": True}), status, param)  # a stream's refusal: the same JSON 4xx
    assert s.r.xlen(s.keys.stream(MODEL)) == 0 and s.r.xpending(s.keys.stream(MODEL), "workers")["pending"] == 0


def test_body_too_large(shared_stack: Stack) -> None:
    big = {"model": MODEL, "prompt": "x" * (1 << 20)}
    r = httpx.post(shared_stack.base_url + "/v1/completions", json=big, timeout=10)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_openai_client_raises_typed_errors(shared_stack: Stack) -> None:
    c = shared_stack.openai()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model=MODEL, messages=[], max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="x", max_tokens=1000)


def test_get_request_by_id(shared_stack: Stack) -> None:
    c = shared_stack.openai()
    r = c.completions.create(model=MODEL, prompt="remember me", max_tokens=3)
    got = httpx.get(f"{shared_stack.base_url}/v1/requests/{r.id}").json()
    assert got["id"] == r.id and got["choices"][0]["text"] == r.choices[0].text
    assert httpx.get(f"{shared_stack.base_url}/v1/requests/cmpl-unknown").status_code == 404
    with httpx.stream("POST", shared_stack.base_url + "/v1/completions", timeout=10,
                      json={"model": MODEL, "prompt": "stream me", "max_tokens": 3, "stream": True}) as s:
        sent = s.read()
        rid = s.headers["x-request-id"]
    again = httpx.get(f"{shared_stack.base_url}/v1/requests/{rid}")  # a stream: its events again
    assert again.headers["content-type"].startswith("text/event-stream") and again.content == sent

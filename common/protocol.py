"""The OpenAI protocol as mgpu speaks it: what clients send (the request models), what they get
back (the response models, and the builders that make those shapes from a worker's Result and
Chunks), shared by the gateway and ``mgpu sim-server``.

Requests are strict where OpenAI is strict: ``"5"``, ``true`` and ``3.0`` are not integers, ``"yes"``
and ``1`` are not booleans (an integer is a valid number, as in JSON).  Unknown fields are ignored, as
vLLM does; fields of the OpenAI and vLLM APIs that mgpu does not honour yet are refused with a 400
that names them when they ask for anything but their neutral value (``UNSUPPORTED``), never silently
dropped.  The builders return plain dicts (serialized with orjson on the hot path); the response
models describe the same shapes for the OpenAPI document, and a test checks that they agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from common.errors import InvalidRequest, MgpuError
from common.schemas import ChoiceDelta, Kind, Result, SamplingParams, TokenLogprob, Usage

# ----------------------------------------------------------------------------- requests

# field -> the values that mean "off" (accepted; anything else is a 400 naming the field)
_OFF: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}), "response_format": (None, {"type": "text"}), "best_of": (None, 1),
    "use_beam_search": (None, False), "top_k": (None, 0, -1), "min_p": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0), "length_penalty": (None, 1, 1.0), "stop_token_ids": (None, []),
    "include_stop_str_in_output": (None, False), "ignore_eos": (None, False), "min_tokens": (None, 0),
    "skip_special_tokens": (None, True), "spaces_between_special_tokens": (None, True),
    "truncate_prompt_tokens": (None,), "prompt_logprobs": (None,), "allowed_token_ids": (None,),
    "bad_words": (None, []), "structured_outputs": (None,), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,), "guided_decoding_backend": (None,),
    "logits_processors": (None,), "return_tokens_as_token_ids": (None, False), "return_token_ids": (None, False),
    "vllm_xargs": (None,), "kv_transfer_params": (None,), "priority": (None, 0), "cache_salt": (None,),
    "echo": (None, False), "prompt_embeds": (None,),
}
_OFF_CHAT: dict[str, tuple[Any, ...]] = {
    **_OFF, "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "function_call": (None, "none"), "reasoning_effort": (None,), "chat_template": (None,),
    "chat_template_kwargs": (None, {}), "add_generation_prompt": (None, True), "continue_final_message": (None, False),
    "documents": (None,), "mm_processor_kwargs": (None,), "audio": (None,), "modalities": (None, ["text"]),
    "prediction": (None,),
}
_OFF_COMPLETION: dict[str, tuple[Any, ...]] = {**_OFF, "suffix": (None, "")}
UNSUPPORTED: dict[str, dict[str, tuple[Any, ...]]] = {"chat": _OFF_CHAT, "completion": _OFF_COMPLETION}


class UnsupportedField(ValueError):
    """A field the client set that mgpu cannot honour yet (a 400 naming it, never a silent drop)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_supported(kind: Kind, body: dict[str, Any]) -> None:
    """Raise :class:`UnsupportedField` for the first field asking for something mgpu does not do."""
    for name, off in UNSUPPORTED[kind].items():
        if name in body and not any(_same(body[name], v) for v in off):
            raise UnsupportedField(name, f"{name}: not supported by this server yet (it was set to "
                                         f"{_short(body[name])}); leave it out or send its default")


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same JSON type (1 and 1.0 are the same number; True is not 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return type(a) is type(b) and a == b


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


class _Request(BaseModel):
    """Unknown fields are ignored, as OpenAI-compatible servers do; known ones are checked strictly."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False

    @field_validator("continuous_usage_stats")
    @classmethod
    def _no_continuous(cls, v: bool) -> bool:
        if v:
            raise ValueError("continuous_usage_stats is not supported by this server yet")
        return v


_SEED = 2**63


class _SamplingRequest(_Request):
    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(default=None, ge=-_SEED, lt=_SEED)
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=512)
    # mgpu extension: a per-request deadline in seconds (the gateway's default applies otherwise; the
    # gateway caps it at its max_request_timeout_s)
    timeout: float | None = Field(default=None, ge=0.1)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v: Any) -> Any:
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences are allowed")
            if not all(isinstance(x, str) for x in v):
                raise ValueError("stop sequences must be strings")
        elif v is not None and not isinstance(v, str):
            raise ValueError("must be a string or a list of strings")
        return v

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def sampling(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The sampling parameters of this request (OpenAI defaults where it sets none)."""
        return SamplingParams(
            max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, stop=self.stop_list(), seed=self.seed, n=self.n,
            presence_penalty=self.presence_penalty or 0.0, frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs)


class CompletionRequest(_SamplingRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v: Any) -> Any:
        if isinstance(v, list):
            if v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ValueError("a prompt of token ids is not supported by this server yet; send text")
            if len(v) != 1:
                raise ValueError("exactly one prompt is supported per request")
            if not isinstance(v[0], str):
                raise ValueError("must be a string (a list of one string is accepted too)")
        elif not isinstance(v, str):
            raise ValueError("must be a string")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def inputs(self) -> tuple[str | None, list[dict[str, str]] | None]:
        """(prompt, messages) as the work item carries them."""
        return self.prompt_text(), None

    def logprobs_n(self) -> int | None:
        """How many top logprobs per token (None: no logprobs)."""
        return self.logprobs


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]  # "tool" needs tool calling (not yet)
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)

    @field_validator("content", mode="before")
    @classmethod
    def _parts(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if not isinstance(v, list):
            raise ValueError("must be a string or a list of content parts")
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                what = f"type {kind!r}" if isinstance(kind, str) else "a part without a 'type'"
                raise ValueError(f"part {i}: {what} is not supported: this server takes text parts "
                                 "({'type': 'text', 'text': ...}) only")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i}: 'text' must be a string")
        return v

    @model_validator(mode="before")
    @classmethod
    def _no_tool_calls(cls, v: Any) -> Any:
        if isinstance(v, dict):
            if v.get("tool_calls") or v.get("function_call"):
                raise ValueError("assistant tool calls are not supported by this server yet")
            if v.get("role") == "tool":
                raise ValueError("tool messages are not supported by this server yet (no tool calling)")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, str]:
        d = {"role": self.role, "content": self.text()}
        if self.name is not None:
            d["name"] = self.name
        return d


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("only allowed when logprobs is true")
        return v

    @model_validator(mode="after")
    def _max_tokens(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None and self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def inputs(self) -> tuple[str | None, list[dict[str, str]] | None]:
        """(prompt, messages) as the work item carries them."""
        return None, [m.as_dict() for m in self.messages]

    def logprobs_n(self) -> int | None:
        """How many top logprobs per token (None: no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


OpenAIRequest = CompletionRequest | ChatCompletionRequest


def validation_error(exc: ValidationError) -> InvalidRequest:
    """The first problem, naming the field (``messages.0.content``) and the reason."""
    e = exc.errors()[0]
    param = ".".join(str(p) for p in e["loc"]) or None
    msg = str(e["msg"]).removeprefix("Value error, ")
    return InvalidRequest(f"{param}: {msg}" if param else msg, param=param)


def parse_request(kind: Kind, body: dict[str, Any]) -> OpenAIRequest:
    """A request body as its model; :class:`InvalidRequest` (400, naming the field) when it is not one,
    or when it asks for something this server does not do yet."""
    try:
        req: OpenAIRequest = (ChatCompletionRequest.model_validate(body) if kind == "chat"
                              else CompletionRequest.model_validate(body))
        check_supported(kind, body)
    except ValidationError as exc:
        raise validation_error(exc) from None
    except UnsupportedField as exc:
        raise InvalidRequest(str(exc), param=exc.field) from None
    return req


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


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None


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


def full_response(r: Result, model: str) -> dict[str, Any]:
    if r.kind == "chat":
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": _chat_logprobs(c.logprobs), "finish_reason": c.finish_reason} for c in r.choices]
        obj = "chat.completion"
    else:
        choices = [{"index": c.index, "text": c.text, "logprobs": _completion_logprobs(c.logprobs),
                    "finish_reason": c.finish_reason} for c in r.choices]
        obj = "text_completion"
    return {"id": r.id, "object": obj, "created": r.created, "model": model, "choices": choices,
            "usage": usage_dict(r.usage)}


@dataclass
class StreamFormatter:
    """Builds the SSE chunk objects of one streaming request, exactly as OpenAI sends them."""

    id: str  # the request's
    kind: str
    created: int
    model: str
    n: int
    include_usage: bool

    def __post_init__(self) -> None:
        self.object = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        self._offsets = [0] * self.n

    def _envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        env: dict[str, Any] = {"id": self.id, "object": self.object, "created": self.created,
                               "model": self.model, "choices": choices}
        if self.include_usage:
            env["usage"] = None
        return env

    def role_chunks(self) -> list[dict[str, Any]]:
        if self.kind != "chat":
            return []
        return [self._envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]) for i in range(self.n)]

    def delta_chunks(self, deltas: list[ChoiceDelta]) -> list[dict[str, Any]]:
        out = []
        for d in deltas:
            if self.kind == "chat":
                if d.text or d.finish_reason is None:
                    out.append(self._envelope([{"index": d.index, "delta": {"content": d.text},
                                                "logprobs": _chat_logprobs(d.logprobs), "finish_reason": None}]))
                if d.finish_reason is not None:
                    out.append(self._envelope([{"index": d.index, "delta": {}, "logprobs": None,
                                                "finish_reason": d.finish_reason}]))
            else:
                off = self._offsets[d.index] if d.index < self.n else 0
                out.append(self._envelope([{"index": d.index, "text": d.text,
                                            "logprobs": _completion_logprobs(d.logprobs, off),
                                            "finish_reason": d.finish_reason}]))
                if d.index < self.n:
                    self._offsets[d.index] += len(d.text)
        return out

    def usage_chunk(self, u: Usage) -> dict[str, Any] | None:
        if not self.include_usage:
            return None
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [], "usage": usage_dict(u)}

"""One schema module shared by the gateway, the GPU workers and batch producers.

* OpenAI request bodies (``CompletionRequest``, ``ChatCompletionRequest``): what clients send.
* ``WorkItem``: what travels on a model's Redis stream (field ``p``: its JSON).  Batch producers
  that write straight to Redis build one of these and call :func:`WorkItem.to_fields`.
* ``Chunk`` and ``Result``: what a worker writes back (per-request chunk stream, result key and
  the gateway's reply stream).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

# ----------------------------------------------------------------------------- OpenAI requests
#
# Strict where OpenAI is strict: ``"5"``, ``true`` and ``3.0`` are not integers, ``"yes"`` and ``1`` are
# not booleans (an integer is a valid number, as in JSON).  Unknown fields are ignored, as vLLM does;
# fields of the OpenAI and vLLM APIs that mgpu does not honour yet are refused with a 400 that names
# them when they ask for anything but their neutral value (``UNSUPPORTED``), never silently dropped.

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


# ----------------------------------------------------------------------------- internal


class SamplingParams(BaseModel):
    max_tokens: int | None = None  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None


class ErrorInfo(BaseModel):
    message: str
    type: str = "server_error"
    param: str | None = None
    code: str | None = None
    status: int = 500


Kind = Literal["completion", "chat"]


def new_request_id(kind: Kind) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


class WorkItem(BaseModel):
    """One request on a model's stream."""

    id: str
    kind: Kind
    model: str
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    params: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = False
    created: int = Field(default_factory=lambda: int(time.time()))
    enqueued_at: float = Field(default_factory=time.time)
    deadline: float | None = None  # unix seconds; None: no deadline
    reply_to: str | None = None  # gateway id whose reply stream gets events; None for batch jobs
    # who may read the result (GET /v1/requests/{id}): the caller's scope (``ANONYMOUS`` until API keys
    # exist); None (batch producers) reads as ``ANONYMOUS``
    scope: str | None = None
    trace_id: str | None = None  # the client's X-Request-Id, for the worker's log lines

    @model_validator(mode="after")
    def _has_input(self) -> WorkItem:
        if self.kind == "completion" and self.prompt is None:
            raise ValueError("a completion needs a prompt")
        if self.kind == "chat" and not self.messages:
            raise ValueError("a chat completion needs messages")
        return self

    def to_fields(self) -> dict[str, str]:
        return {"p": self.model_dump_json(exclude_defaults=True)}

    @classmethod
    def from_fields(cls, fields: dict[Any, Any]) -> WorkItem:
        raw = fields.get(b"p", fields.get("p"))
        if raw is None:
            raise ValueError("stream entry has no 'p' field")
        return cls.model_validate_json(raw)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChoiceDelta(BaseModel):
    index: int = 0
    text: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None  # [{token, logprob, top_logprobs:{tok: lp}}]


class Chunk(BaseModel):
    """A streaming delta; ``seq`` counts from 1 for each request, across retries and migrations."""

    seq: int
    choices: list[ChoiceDelta]


class Choice(BaseModel):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[dict[str, Any]] | None = None


class Result(BaseModel):
    """The final answer for a request: choices and usage, or an error."""

    id: str
    kind: Kind = "completion"
    model: str = ""
    created: int = 0
    choices: list[Choice] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    error: ErrorInfo | None = None
    worker: str | None = None
    attempts: int = 1
    finished_at: float = Field(default_factory=time.time)
    scope: str | None = None  # the request's WorkItem.scope


ANONYMOUS = "anon"  # the scope of every caller while the gateway has no API keys


class IdempotencyRecord(BaseModel):
    """What an ``Idempotency-Key`` stands for (``Keys.idempotency``): the request it started, and what
    that request was, so that a reuse with another endpoint, stream flag or body is refused (422)."""

    request_id: str
    endpoint: Kind
    stream: bool
    body_sha256: str
    created: int = 0  # the original's ``created`` (a replayed stream carries it)

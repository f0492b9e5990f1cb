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
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# ----------------------------------------------------------------------------- OpenAI requests


class _Lenient(BaseModel):
    """Unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingRequest(_Lenient):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=16)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # mgpu extension: a per-request deadline in seconds (the gateway's default applies otherwise)
    timeout: float | None = Field(default=None, gt=0.0, le=86400.0)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt is supported per request")
        return v

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

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

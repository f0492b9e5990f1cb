"""The records that travel between the gateway, the GPU workers and batch producers.

* ``WorkItem``: what travels on a model's Redis stream (field ``p``: its JSON).  Batch producers
  that write straight to Redis build one of these and call :func:`WorkItem.to_fields`.
* ``Chunk`` and ``Result``: what a worker writes back (per-request chunk stream, result key and
  the gateway's reply stream), with ``TokenLogprob`` for logprobs.
* ``IdempotencyRecord``: what an ``Idempotency-Key`` stands for.

What clients send and get back (the OpenAI protocol) is :mod:`common.protocol`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

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


class TokenLogprob(BaseModel):
    """One generated token's log-probability, and the top alternatives at its position."""

    token: str
    logprob: float
    top_logprobs: dict[str, float] = Field(default_factory=dict)


class ChoiceDelta(BaseModel):
    index: int = 0
    text: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


class Chunk(BaseModel):
    """A streaming delta; ``seq`` counts from 1 for each request, across retries and migrations."""

    seq: int
    choices: list[ChoiceDelta]


class Choice(BaseModel):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None


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

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

from pydantic import BaseModel, Field

# ----------------------------------------------------------------------------- internal


class SamplingParams(BaseModel):
    """What the simulator's OpenAI layer (``gpu_worker.serving.sim``) reads of a request: the sampling
    parameters of one choice.  A vLLM worker reads the request body with vLLM's own protocol models."""

    max_tokens: int | None = None  # None: up to the context length
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0


class ErrorInfo(BaseModel):
    message: str
    type: str = "server_error"
    param: str | None = None
    code: str | None = None
    status: int = 500


# What a request asks for: the endpoint it came on.  The HTTP paths, and the prefix of a response's id
# (the one vLLM gives it: the worker passes the rest of mgpu's id to vLLM as X-Request-Id).
Kind = Literal["chat", "completion", "embedding", "tokenize", "detokenize", "responses"]
PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions",
                          "embedding": "/v1/embeddings", "tokenize": "/tokenize", "detokenize": "/detokenize",
                          "responses": "/v1/responses"}
_ID_PREFIX: dict[Kind, str] = {"chat": "chatcmpl-", "completion": "cmpl-", "embedding": "embd-",
                               "tokenize": "tokenize-", "detokenize": "tokenize-", "responses": "resp_"}
GENERATIVE: frozenset[Kind] = frozenset({"chat", "completion", "responses"})  # may stream, take slots per choice


def new_request_id(kind: Kind) -> str:
    return _ID_PREFIX[kind] + uuid.uuid4().hex


def base_request_id(kind: Kind, request_id: str) -> str:
    """The part of mgpu's request id after its prefix: the X-Request-Id a vLLM worker passes to vLLM,
    which gives the response the same id."""
    return request_id.removeprefix(_ID_PREFIX[kind])


class WorkItem(BaseModel):
    """One request on a model's stream: the request body as the client sent it, and how to answer it.

    ``body`` is the OpenAI / vLLM request body, unchanged but for the mgpu-only fields the gateway takes
    out (``timeout``).  A vLLM worker hands it to vLLM's own OpenAI layer; the simulator reads it with
    :mod:`common.protocol`.  ``n`` is how many engine slots it takes (choices)."""

    id: str
    kind: Kind
    model: str
    body: dict[str, Any]
    stream: bool = False
    n: int = Field(default=1, ge=1)
    created: int = Field(default_factory=lambda: int(time.time()))
    enqueued_at: float = Field(default_factory=time.time)
    deadline: float | None = None  # unix seconds; None: no deadline
    reply_to: str | None = None  # gateway id whose reply stream gets events; None for batch jobs
    # who may read the result (GET /v1/requests/{id}): the caller's scope (``ANONYMOUS`` until API keys
    # exist); None (batch producers) reads as ``ANONYMOUS``
    scope: str | None = None
    trace_id: str | None = None  # the client's X-Request-Id, for the worker's log lines

    @property
    def path(self) -> str:
        return PATHS[self.kind]

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
    """What one engine step added to one choice (the simulator's OpenAI layer builds chunks of these)."""

    index: int = 0
    text: str = ""
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    tool_calls: list[dict[str, Any]] | None = None  # streamed tool-call deltas (OpenAI's shape)


class Chunk(BaseModel):
    """A piece of a streamed response, as the client gets it: ``sse`` is one or more server-sent events,
    each ending in a blank line (``data: {...}\n\n``), the terminating ``data: [DONE]`` included.
    ``seq`` counts from 1 for each request, across retries and migrations.  ``tokens`` (per choice
    index) are the token ids that these events carry, so that another worker can continue the stream
    after them if this one dies; absent where a stream cannot be continued."""

    seq: int
    sse: str
    tokens: dict[int, list[int]] | None = None


class Result(BaseModel):
    """The end of a request.  For a JSON response: its ``status`` and ``body``, or its ``error``.  For a
    stream (whose events were Chunks): ``error`` when the stream was cut short by mgpu (a deadline, a
    dead letter), which the gateway sends as a last error event.  ``usage`` is for accounting."""

    id: str
    kind: Kind = "completion"
    model: str = ""
    created: int = 0
    status: int = 200
    body: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    usage: Usage = Field(default_factory=Usage)
    worker: str | None = None
    attempts: int = 1
    finished_at: float = Field(default_factory=time.time)
    scope: str | None = None  # the request's WorkItem.scope
    queue_s: float | None = None  # from the gateway's enqueue to the start of the attempt that answered


ANONYMOUS = "anon"  # the scope of every caller while the gateway has no API keys


class IdempotencyRecord(BaseModel):
    """What an ``Idempotency-Key`` stands for (``Keys.idempotency``): the request it started, and what
    that request was, so that a reuse with another endpoint, stream flag or body is refused (422)."""

    request_id: str
    endpoint: Kind
    stream: bool
    body_sha256: str
    created: int = 0  # the original's ``created`` (a replayed stream carries it)

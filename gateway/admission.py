"""Admitting one request: its body read within limits, the few fields the gateway needs checked, the
request checked against the fleet (a live worker for its model, the endpoint served, the context length,
Redis memory), and turned into a WorkItem; with an ``Idempotency-Key``, the record of what the key
stands for.

The gateway stays thin: it reads only what it needs to place the request (``model``, ``stream``, ``n``,
``max_tokens``, the prompt's length, mgpu's ``timeout``) and the fields whose types OpenAI is strict
about; everything else goes to the worker untouched, where vLLM's own protocol models validate it (or
the simulator's, :mod:`common.protocol`).  A request a worker refuses comes back as an explicit 4xx.

The request id is always generated here (unguessable); a client's ``X-Request-Id`` is a tracing id,
echoed back and logged, never an identity.  An ``Idempotency-Key`` is scoped to the caller (the API key
once there are keys, :data:`common.schemas.ANONYMOUS` until then) and bound to what it first asked for:
the same key with another endpoint, stream flag or body is refused with 422 (:func:`check_reuse`).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect, Request

from common import errors
from common.prompts import context_overflow
from common.schemas import GENERATIVE, PATHS, IdempotencyRecord, Kind, WorkItem, new_request_id
from common.scripts import Charge
from gateway.auth import ANONYMOUS_CALLER, Caller
from gateway.state import GatewayState

_TRACE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
_IDEM_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")
# mgpu's own request fields: read here, not passed on to the engine.  ``priority`` is vLLM's (an integer, lower
# runs sooner, 0 by default); mgpu honours it with its queues instead of the engine's scheduler: above 0, the
# request waits on the model's batch stream (docs/batch.md, "Priority")
MGPU_FIELDS = ("timeout", "priority")


async def read_json(request: Request, limit: int, timeout_s: float) -> dict[str, Any]:
    """The JSON object body: 413 past ``limit`` bytes, 408 when it does not arrive within ``timeout_s``,
    499 (counted as cancelled, not as a server error) when the client goes away meanwhile."""
    ctype = request.headers.get("content-type", "")
    if ctype.split(";", 1)[0].strip().lower() != "application/json":
        raise errors.UnsupportedMediaType("the request body must be JSON, sent as Content-Type: application/json")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise errors.PayloadTooLarge(f"the request body is over the {limit}-byte limit")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                body += part
                if len(body) > limit:
                    raise errors.PayloadTooLarge(f"the request body is over the {limit}-byte limit")
    except TimeoutError:
        raise errors.ReadTimeout(f"the request body did not arrive within {timeout_s:g}s",
                                 headers={"Connection": "close"}) from None
    except ClientDisconnect:
        raise errors.RequestCancelled("the client disconnected while sending the request") from None
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidRequest(f"could not parse the JSON body: {exc}") from None
    if not isinstance(obj, dict):
        raise errors.InvalidRequest("the request body must be a JSON object")
    return obj


def trace_id(request: Request) -> str | None:
    """The client's ``X-Request-Id`` (tracing only), checked so that it cannot forge log lines."""
    v = request.headers.get("x-request-id")
    if v is not None and not _TRACE_ID.match(v):
        raise errors.InvalidRequest("the X-Request-Id header must be 1-128 printable ASCII characters "
                                    "without spaces", param="X-Request-Id")
    return v


def idempotency_key(request: Request) -> str | None:
    v = request.headers.get("idempotency-key")
    if v is not None and not _IDEM_KEY.match(v):
        raise errors.InvalidRequest("the Idempotency-Key header must be 1-255 printable ASCII characters",
                                    param="Idempotency-Key")
    return v


# ----------------------------------------------------------------------------- what the gateway reads


class _Fields(BaseModel):
    """The fields of a body that the gateway reads, strict where OpenAI is strict (``"5"``, ``true`` and
    ``3.0`` are not integers; ``"yes"`` and ``1`` are not booleans).  Everything else passes untouched."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: str | None = Field(default=None, min_length=1, max_length=256)
    stream: bool = False
    n: int = Field(default=1, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    timeout: float | None = Field(default=None, ge=0.1)  # mgpu: this request's deadline, in seconds
    user: str | None = None
    priority: int | None = None


class _ChatFields(_Fields):
    logprobs: bool | None = None
    top_logprobs: int | None = None


class _CompletionFields(_Fields):
    logprobs: int | None = None
    echo: bool | None = None


_FIELDS: dict[Kind, type[_Fields]] = {"chat": _ChatFields, "completion": _CompletionFields}


def read_fields(kind: Kind, body: dict[str, Any]) -> _Fields:
    try:
        return _FIELDS.get(kind, _Fields).model_validate(body)
    except ValidationError as exc:
        e = exc.errors()[0]
        param = ".".join(str(p) for p in e["loc"]) or None
        msg = str(e["msg"]).removeprefix("Value error, ")
        raise errors.InvalidRequest(f"{param}: {msg}" if param else msg, param=param) from None


def prompt_texts(kind: Kind, body: dict[str, Any]) -> tuple[list[str], list[int]]:
    """The prompt's texts (every text part of every message; each prompt of a completion) and the lengths
    of prompts given as token ids: what the gateway can count cheaply (a lower bound of the prompt)."""
    if kind == "chat":
        texts: list[str] = []
        for m in body.get("messages") or () if isinstance(body.get("messages"), list) else ():
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                texts += [p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return texts, []
    prompt = body.get("prompt") if kind == "completion" else body.get("input")
    if isinstance(prompt, str):
        return [prompt], []
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [], [len(prompt)]
    if isinstance(prompt, list):
        return [p for p in prompt if isinstance(p, str)], [len(p) for p in prompt if isinstance(p, list)]
    return [], []


@dataclass
class Admission:
    kind: Kind
    fields: _Fields
    item: WorkItem
    trace: str | None  # the client's X-Request-Id
    idem_key: str | None  # the Redis key of the caller's Idempotency-Key
    record: IdempotencyRecord | None
    caller: Caller = ANONYMOUS_CALLER
    reserve: int = 0  # tokens the request reserves against its key's tokens per minute

    @property
    def background(self) -> bool:
        """Batch class: ``priority`` above 0, or (no priority given) a key whose default priority is batch."""
        if self.fields.priority is not None:
            return self.fields.priority > 0
        return self.caller.key is not None and self.caller.key.priority == "batch"

    @property
    def charge(self) -> Charge | None:
        return Charge(self.caller.scope, self.reserve) if self.caller.key is not None else None

    @property
    def include_usage(self) -> bool:
        opts = self.item.body.get("stream_options")
        return isinstance(opts, dict) and opts.get("include_usage") is True

    def affinity_text(self) -> str:
        """What prefix_affinity hashes when the request names no user or session: the prompt's start."""
        texts, _ = prompt_texts(self.kind, self.item.body)
        return "\n".join(texts)


def _model(state: GatewayState, f: _Fields) -> str:
    """The model asked for; without one, the fleet's only model (as ``vllm serve`` takes its own)."""
    if f.model is not None:
        return f.model
    names = state.registry.live_models()
    if not names and state.settings.scale_from_zero:  # scaled to zero: the models served before
        names = sorted(state.registry.models)
    if len(names) == 1:
        return names[0]
    raise errors.InvalidRequest("model: required (this service serves " + (", ".join(names) or "no model") + ")",
                                param="model")


def build_item(state: GatewayState, kind: Kind, body: dict[str, Any], f: _Fields, request_id: str, caller: Caller,
               trace: str | None = None) -> tuple[WorkItem, int]:
    """Check what needs the fleet's state (live workers, the endpoint, context length, memory) and the caller's
    key (the model), and build the WorkItem; with the tokens it reserves."""
    s = state.settings
    reg = state.registry
    if not reg.redis_ok:
        raise errors.ServiceUnavailable("the queue (Redis) is unreachable", retry_after=s.retry_after_s)
    if reg.memory_pressure is not None:
        raise errors.ServiceUnavailable(reg.memory_pressure, retry_after=s.retry_after_s)
    model = _model(state, f)
    caller.check_model(model)
    info = reg.models.get(model)
    if not reg.live_workers(model):
        if info is None:
            raise errors.ModelNotFound(f"The model `{model}` does not exist.", param="model")
        if not s.scale_from_zero:
            raise errors.ServiceUnavailable(f"no live worker serves '{model}' right now",
                                            retry_after=s.retry_after_s)
    if info is not None and kind not in info.kinds:
        raise errors.NotFound(f"the model '{model}' is not served on {PATHS[kind]} (it is served on "
                              f"{', '.join(PATHS[k] for k in info.kinds if k in PATHS)})", param="model")
    if f.timeout is not None and f.timeout > s.max_request_timeout_s:
        raise errors.InvalidRequest(f"timeout: at most {s.max_request_timeout_s:g} seconds", param="timeout")
    prompt = _check_length(state, kind, body, f, info.max_model_len if info is not None else 0,
                           info.tokenizer if info is not None else "")
    stream = f.stream and kind in GENERATIVE
    n = f.n if kind in GENERATIVE else 1
    item = WorkItem(id=request_id, kind=kind, model=model,
                    body={k: v for k, v in body.items() if k not in MGPU_FIELDS}, stream=stream, n=n,
                    deadline=time.time() + (f.timeout or s.request_timeout_s), reply_to=s.gateway_id,
                    scope=caller.scope, trace_id=trace)
    max_tokens = f.max_completion_tokens if f.max_completion_tokens is not None else f.max_tokens
    completion = (max_tokens if max_tokens is not None else s.default_reserve_tokens) if kind in GENERATIVE else 0
    return item, prompt + n * completion


def _check_length(state: GatewayState, kind: Kind, body: dict[str, Any], f: _Fields, max_len: int,
                  tokenizer: str) -> int:
    """Refuse what cannot fit the context before it is queued (the prompt counted as a lower bound, so
    nothing the engine would take is refused; the worker checks exactly); the prompt tokens counted."""
    texts, id_lengths = prompt_texts(kind, body)
    counted = state.prompts.count(tokenizer, texts, chat=kind == "chat")
    lengths = [*id_lengths, *([counted] if counted is not None else [])]
    if not max_len or kind not in ("chat", "completion"):
        return sum(lengths)
    max_tokens = f.max_completion_tokens if f.max_completion_tokens is not None else f.max_tokens
    if max_tokens is not None and max_tokens >= max_len:
        raise errors.InvalidRequest(f"max_tokens ({max_tokens}) must be below the model's context length "
                                    f"({max_len})", param="max_tokens")
    if lengths and (why := context_overflow(max_len, max(lengths), max_tokens if max_tokens else None)):
        raise errors.InvalidRequest(why, param="messages" if kind == "chat" else "prompt")
    return sum(lengths)


def admit(state: GatewayState, kind: Kind, body: dict[str, Any], trace: str | None, key: str | None,
          caller: Caller) -> Admission:
    """A request body as a WorkItem (with a new request id) and, with an ``Idempotency-Key``, its record."""
    f = read_fields(kind, body)
    item, reserve = build_item(state, kind, body, f, new_request_id(kind), caller, trace)
    scope = caller.scope
    record = None
    if key is not None:
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        record = IdempotencyRecord(request_id=item.id, endpoint=kind, stream=item.stream, body_sha256=digest,
                                   created=item.created)
    idem_key = None if key is None else state.settings.keys.idempotency(scope, key, item.model)
    return Admission(kind, f, item, trace, idem_key, record, caller, reserve)


def check_reuse(adm: Admission, first: IdempotencyRecord) -> None:
    """A retry must ask for what the key first asked for."""
    rec = adm.record
    assert rec is not None
    what = None
    if first.endpoint != rec.endpoint:
        what = f"it was first used on the {PATHS[first.endpoint]} endpoint"
    elif first.stream != rec.stream:
        what = f"it was first used with stream={str(first.stream).lower()}"
    elif first.body_sha256 != rec.body_sha256:
        what = "it was first used with a different request body"
    if what is not None:
        raise errors.IdempotencyMismatch(f"this Idempotency-Key belongs to another request: {what}",
                                         param="Idempotency-Key")

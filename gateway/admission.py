"""Admitting one generation request: its body read within limits, validated strictly, checked against
the fleet (a live worker, the context length, Redis memory), and turned into a WorkItem; with an
``Idempotency-Key``, the record of what the key stands for.

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
from starlette.requests import ClientDisconnect, Request

from common import errors
from common.prompts import context_overflow
from common.protocol import OpenAIRequest, parse_request
from common.schemas import IdempotencyRecord, Kind, WorkItem, new_request_id
from gateway.state import GatewayState

_TRACE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
_IDEM_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")


async def read_json(request: Request, limit: int, timeout_s: float) -> dict[str, Any]:
    """The JSON object body: 413 past ``limit`` bytes, 408 when it does not arrive within ``timeout_s``,
    499 (counted as cancelled, not as a server error) when the client goes away meanwhile."""
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


@dataclass
class Admission:
    kind: Kind
    req: OpenAIRequest
    item: WorkItem
    trace: str | None  # the client's X-Request-Id
    idem_key: str | None  # the Redis key of the caller's Idempotency-Key
    record: IdempotencyRecord | None


def build_item(state: GatewayState, kind: Kind, req: OpenAIRequest, request_id: str, scope: str,
               trace: str | None = None) -> WorkItem:
    """Check what needs the fleet's state (live workers, context length, memory) and build the WorkItem."""
    s = state.settings
    reg = state.registry
    if not reg.redis_ok:
        raise errors.ServiceUnavailable("the queue (Redis) is unreachable", retry_after=s.retry_after_s)
    if reg.memory_pressure is not None:
        raise errors.ServiceUnavailable(reg.memory_pressure, retry_after=s.retry_after_s)
    live = reg.live_workers(req.model)
    info = reg.models.get(req.model)
    if not live:
        if info is None:
            raise errors.ModelNotFound(f"the model '{req.model}' does not exist", param="model")
        raise errors.ServiceUnavailable(f"no live worker serves '{req.model}' right now",
                                        retry_after=s.retry_after_s)
    if req.timeout is not None and req.timeout > s.max_request_timeout_s:
        raise errors.InvalidRequest(f"timeout: at most {s.max_request_timeout_s:g} seconds", param="timeout")
    max_len = info.max_model_len if info is not None else 0
    prompt, messages = req.inputs()
    max_tokens = req.max_tokens if req.max_tokens is not None else (16 if kind == "completion" else None)
    if max_len and max_tokens is not None and max_tokens >= max_len:
        raise errors.InvalidRequest(
            f"max_tokens ({max_tokens}) must be below the model's context length ({max_len})", param="max_tokens")
    n_prompt = state.prompts.count(info.tokenizer, prompt, messages) if max_len and info is not None else None
    if n_prompt is not None and (why := context_overflow(max_len, n_prompt, max_tokens)):
        raise errors.InvalidRequest(why, param="messages" if messages else "prompt")
    timeout = req.timeout or s.request_timeout_s
    return WorkItem(id=request_id, kind=kind, model=req.model, prompt=prompt, messages=messages,
                    params=req.sampling(max_tokens, req.logprobs_n()), stream=req.stream,
                    deadline=time.time() + timeout, reply_to=s.gateway_id, scope=scope, trace_id=trace)


def admit(state: GatewayState, kind: Kind, body: dict[str, Any], trace: str | None, key: str | None,
          scope: str) -> Admission:
    """A request body as a WorkItem (with a new request id) and, with an ``Idempotency-Key``, its record."""
    req = parse_request(kind, body)
    item = build_item(state, kind, req, new_request_id(kind), scope, trace)
    record = None
    if key is not None:
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()
        record = IdempotencyRecord(request_id=item.id, endpoint=kind, stream=item.stream, body_sha256=digest,
                                   created=item.created)
    return Admission(kind, req, item, trace, None if key is None else state.settings.keys.idempotency(scope, key),
                     record)


def check_reuse(adm: Admission, first: IdempotencyRecord) -> None:
    """A retry must ask for what the key first asked for."""
    rec = adm.record
    assert rec is not None
    what = None
    if first.endpoint != rec.endpoint:
        what = f"it was first used on the {_ENDPOINT[first.endpoint]} endpoint"
    elif first.stream != rec.stream:
        what = f"it was first used with stream={str(first.stream).lower()}"
    elif first.body_sha256 != rec.body_sha256:
        what = "it was first used with a different request body"
    if what is not None:
        raise errors.IdempotencyMismatch(f"this Idempotency-Key belongs to another request: {what}",
                                         param="Idempotency-Key")


_ENDPOINT = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}

"""Serving one generation request: admit it, enqueue it, then answer it.

    admit()     read the body (size and time limits), validate it strictly, build the WorkItem, and the
                idempotency record when the client sent an ``Idempotency-Key``
    enqueue()   one ENQUEUE call: queued | queue full (entries or bytes) | that key was used before
    answer      JSON after the final event, or SSE as chunks arrive (``respond``); a retry of a request
                accepted earlier, here or on another gateway, follows the original (``follow``) instead
                of generating again: its chunks and result are read from their durable keys

The request id is always generated here (unguessable); a client's ``X-Request-Id`` is a tracing id,
echoed back and logged, never an identity.  An ``Idempotency-Key`` is scoped to the caller (the API key
once there are keys, :data:`common.schemas.ANONYMOUS` until then) and bound to what it first asked for:
the same key with another endpoint, stream flag or body is refused with 422.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from common import errors
from common.outcomes import outcome_of
from common.protocol import OpenAIRequest, StreamFormatter, error_body, full_response, parse_request
from common.records import ReplyKind
from common.schemas import Chunk, IdempotencyRecord, Kind, Result, WorkItem, new_request_id
from common.scripts import Duplicate, Limits, Queued, QueueFull
from gateway.replies import Event, Waiter
from gateway.routing import Route
from gateway.state import GatewayState

_TRACE_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces
_IDEM_KEY = re.compile(r"^[\x20-\x7e]{1,255}$")


# ----------------------------------------------------------------------------- admission


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
    if n_prompt is not None and n_prompt + (max_tokens or 1) > max_len:
        raise errors.InvalidRequest(
            f"this model's maximum context length is {max_len} tokens; the prompt has {n_prompt} tokens "
            f"and {max_tokens or 1} completion tokens were asked for", param="messages" if messages else "prompt")
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


# ----------------------------------------------------------------------------- enqueue


async def enqueue(state: GatewayState, adm: Admission, route: Route) -> Queued | Duplicate:
    """Append the request to its stream; QueueFull (429) past a limit, ServiceUnavailable without Redis."""
    s = state.settings
    model = adm.item.model
    try:
        with errors.redis_unavailable("could not enqueue", retry_after=s.retry_after_s):
            out = await state.scripts.enqueue(
                model, route.destination, adm.item.to_fields()["p"],
                Limits(s.max_queue_len, s.max_queue_bytes, s.max_queue_bytes_total),
                idempotency_key=adm.idem_key, record=adm.record, idem_ttl_s=s.result_ttl_s)
    except ValidationError:
        raise errors.BadResult("the stored idempotency record is unreadable") from None
    if isinstance(out, QueueFull):
        why = {"entries": "its backlog is at its limit", "bytes": "its backlog is at its byte limit",
               "total_bytes": "the gateway's backlog over all models is at its byte limit"}.get(out.limit, "it is full")
        raise errors.QueueFull(f"the queue for '{model}' is full: {why}", retry_after=s.retry_after_s)
    return out


# ----------------------------------------------------------------------------- events


def read_result(request_id: str, payload: bytes) -> Result:
    try:
        return Result.model_validate_json(payload)
    except ValidationError:
        raise errors.BadResult(f"the stored result of request {request_id} is unreadable") from None


async def waiter_events(w: Waiter, deadline: float) -> AsyncIterator[Event]:
    """The events of a request this process enqueued, until the final one; RequestTimeout at the deadline."""
    assert w.queue is not None
    while True:
        try:
            async with asyncio.timeout(max(0.0, deadline - time.time())):
                kind, payload = await w.queue.get()
        except TimeoutError:
            raise errors.RequestTimeout("the request's deadline passed") from None
        yield kind, payload
        if kind != ReplyKind.CHUNK:
            return


async def follow(state: GatewayState, request_id: str, streaming: bool, deadline: float) -> AsyncIterator[Event]:
    """The events of a request accepted earlier, maybe by another gateway: its chunks (streaming) and its
    result, read from their durable keys.  A waiter registered here wakes the reader at once when this
    process gets the events; otherwise it polls, from 20 ms up to 250 ms apart."""
    k = state.settings.keys
    w = state.router.register(request_id, streaming=False)
    after, last_seq, delay = "-", 0, 0.02
    try:
        while True:
            w.changed.clear()
            try:
                async with state.redis.pipeline(transaction=False) as p:
                    if streaming:
                        p.xrange(k.chunks(request_id), min=after)
                    p.get(k.result(request_id))
                    out = await p.execute()
            except (redis.RedisError, OSError) as exc:
                raise errors.unavailable(exc, retry_after=state.settings.retry_after_s) from None
            for entry_id, fields in out[0] if streaming else ():
                after = "(" + entry_id.decode()
                payload = fields[b"c"]
                seq = Chunk.model_validate_json(payload).seq
                if seq > last_seq:
                    last_seq = seq
                    yield ReplyKind.CHUNK, payload
            if out[-1] is not None:
                yield ReplyKind.FINAL, out[-1]
                return
            if time.time() >= deadline:
                raise errors.RequestTimeout("the original request has not finished within the deadline")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(delay, max(0.0, deadline - time.time()))):
                    await w.changed.wait()
            delay = min(delay * 2, 0.25)
    finally:
        state.router.unregister(w)


async def final_result(events: AsyncIterator[Event], request_id: str) -> Result:
    async for kind, payload in events:
        if kind != ReplyKind.CHUNK:
            return read_result(request_id, payload)
    raise errors.BadResult(f"request {request_id} ended without a result")


async def _wait_disconnect(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            return


async def until_result_or_disconnect(state: GatewayState, request: Request, w: Waiter, item: WorkItem,
                                     keep_on_disconnect: bool) -> Result:
    """A non-streaming request's result; a client that goes away cancels it (unless it is idempotent:
    that client will come back for it)."""
    timeout = max(0.0, (item.deadline or time.time()) - time.time())
    watcher = None if keep_on_disconnect else asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        waiting = (w.future,) if watcher is None else (w.future, watcher)
        done, _ = await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if watcher is not None:
            watcher.cancel()
    if w.future in done:
        return read_result(item.id, w.future.result()[1])
    await state.cancel(item.id)
    if watcher is not None and watcher in done:
        raise errors.RequestCancelled("the client disconnected")
    raise errors.RequestTimeout(f"no result within the request's {timeout:.1f}s deadline")


def json_answer(result: Result, model: str) -> dict[str, Any]:
    if result.error is not None:
        raise errors.from_info(result.error)
    return full_response(result, model)


def _sse_line(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass
class StreamEnd:
    """How a stream ended, for the access log and metrics (the client went away unless it says otherwise)."""

    outcome: str = "cancelled"
    status: int = 499
    first_token_at: float | None = None
    got_result: bool = False  # the final event came (a result, or the worker's error)


async def sse(events: AsyncIterator[Event], fmt: StreamFormatter, request_id: str,
              end: StreamEnd) -> AsyncIterator[bytes]:
    """The SSE body of a stream: role chunks, deltas as they come, then usage (if asked) and ``[DONE]``;
    an error (the deadline, a worker's error result) is one error event before ``[DONE]``."""
    for obj in fmt.role_chunks():
        yield _sse_line(obj)
    try:
        async for kind, payload in events:
            if kind == ReplyKind.CHUNK:
                if end.first_token_at is None:
                    end.first_token_at = time.perf_counter()
                for obj in fmt.delta_chunks(Chunk.model_validate_json(payload).choices):
                    yield _sse_line(obj)
                continue
            end.got_result = True
            result = read_result(request_id, payload)
            if result.error is not None:
                end.outcome, end.status = _outcome(result), result.error.status
                yield _sse_line(error_body(errors.from_info(result.error)))
            else:
                end.outcome, end.status = "success", 200
                usage = fmt.usage_chunk(result.usage)
                if usage is not None:
                    yield _sse_line(usage)
            yield b"data: [DONE]\n\n"
            return
    except errors.MgpuError as exc:  # the deadline passed, Redis went away, a result was unreadable
        end.outcome, end.status = _outcome(exc), exc.status
        yield _sse_line(error_body(exc))
        yield b"data: [DONE]\n\n"


def _outcome(x: Result | errors.MgpuError) -> str:
    return outcome_of(x.error if isinstance(x, Result) else x)

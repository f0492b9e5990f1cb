"""Serving one generation request once it is admitted (:mod:`gateway.admission`): enqueue it, then
answer it.

    enqueue()   one ENQUEUE call: queued | queue full (entries or bytes) | that key was used before
    answer      JSON after the final event, or SSE as chunks arrive (:func:`generate`); a retry of a
                request accepted earlier, here or on another gateway, follows the original (:func:`follow`)
                instead of generating again: its chunks and result are read from their durable keys

Every request ends with one access-log line and its metrics (:class:`Access`), after the response
is on its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
import redis
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from common import errors
from common.backoff import Backoff
from common.logs import set_request_id
from common.outcomes import outcome_of
from common.protocol import StreamFormatter, error_body, full_response
from common.records import ReplyKind
from common.schemas import ANONYMOUS, Chunk, IdempotencyRecord, Kind, Result, WorkItem
from common.scripts import Duplicate, Limits, Queued, QueueFull
from gateway import admission
from gateway.admission import Admission
from gateway.http import json_response
from gateway.replies import Event, Waiter
from gateway.routing import Route, affinity_key
from gateway.state import GatewayState

log = logging.getLogger("mgpu.gateway")

_ENDPOINTS: dict[Kind, str] = {"chat": "chat", "completion": "completions"}  # the metric label

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
    after, last_seq, poll = "-", 0, Backoff(0.02, 0.25)
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
                async with asyncio.timeout(min(poll.step(), max(0.0, deadline - time.time()))):
                    await w.changed.wait()
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

# ----------------------------------------------------------------------------- accounting


@dataclass
class Access:
    """One request's access-log line and metrics."""

    endpoint: str
    started: float
    model: str = "-"  # a bounded label: a served model, or "unknown"
    request_id: str = "-"
    trace: str | None = None
    outcome: str = "success"
    status: int = 200


def _account(state: GatewayState, a: Access, ended: float | None = None) -> None:
    duration = (ended or time.perf_counter()) - a.started
    state.metrics.observe(a.model, a.endpoint, a.outcome, a.status, duration)
    if state.settings.log_requests:
        extra: dict[str, Any] = {"request_id": a.request_id, "model": a.model, "endpoint": a.endpoint,
                                 "outcome": a.outcome, "code": a.status, "duration_ms": round(duration * 1000, 1)}
        if a.trace is not None:
            extra["trace_id"] = a.trace
        log.info("request done", extra=extra)


# ----------------------------------------------------------------------------- generation


async def generate(request: Request, kind: Kind) -> Response:
    """One generation request, end to end (the routes' and the fast path's handler)."""
    state: GatewayState = request.app.state.gw
    a = Access(endpoint=_ENDPOINTS[kind], started=time.perf_counter())
    streamed = False
    try:
        adm = await _admit(state, request, kind, a)
        item = adm.item
        s = state.settings
        route = state.balancer.plan(state.registry, s.keys, item.model, lambda: affinity_key(
            adm.req.user, request.headers.get("x-session-id"), item.prompt, item.messages, s.affinity_prefix_chars))
        w = state.router.register(item.id, item.stream)
        try:
            queued = await enqueue(state, adm, route)
        except BaseException:
            state.router.unregister(w)
            raise
        streamed = item.stream  # a stream accounts for itself when it ends
        if isinstance(queued, Duplicate):  # a retry: answer with the original, do not generate again
            state.router.unregister(w)
            return await _answer_retry(state, adm, queued.first, a)
        return await _answer(state, request, adm, route, queued, w, a)
    except errors.MgpuError as exc:
        a.status, a.outcome = exc.status, outcome_of(exc)
        raise
    except Exception:
        a.status, a.outcome = 500, "failed"
        raise
    finally:
        if not streamed:  # accounted for after the response is on its way, off the latency path
            asyncio.get_running_loop().call_soon(_account, state, a, time.perf_counter())


async def _admit(state: GatewayState, request: Request, kind: Kind, a: Access) -> Admission:
    s = state.settings
    trace = a.trace = admission.trace_id(request)
    key = admission.idempotency_key(request)
    body = await admission.read_json(request, s.max_body_bytes, s.http_read_timeout_s)
    model = body.get("model")
    a.model = state.model_label(model if isinstance(model, str) else None)
    adm = admission.admit(state, kind, body, trace, key, ANONYMOUS)
    a.request_id = adm.item.id
    set_request_id(adm.item.id)
    return adm


async def _answer(state: GatewayState, request: Request, adm: Admission, route: Route, queued: Queued, w: Waiter,
                  a: Access) -> Response:
    """A request this gateway enqueued: streamed as its chunks come, or JSON once its result is in."""
    item = adm.item
    target = None if queued.fell_back else route.target
    state.balancer.count(target)
    state.metrics.routed.labels(target or "shared", route.strategy).inc()
    w.future.add_done_callback(lambda _f: state.balancer.done(route))
    headers = {"X-Request-Id": adm.trace or item.id}
    if item.stream:
        return _streaming(state, waiter_events(w, item.deadline or time.time()), adm, item.id, item.created, a,
                          headers, w, cancel=adm.idem_key is None)
    state.metrics.in_flight.inc()
    try:
        result = await until_result_or_disconnect(state, request, w, item, keep_on_disconnect=adm.idem_key is not None)
    finally:
        state.metrics.in_flight.dec()
        state.router.unregister(w)
    return json_response(json_answer(result, item.model), headers=headers)


async def _answer_retry(state: GatewayState, adm: Admission, first: IdempotencyRecord, a: Access) -> Response:
    """A retry of the request ``first`` (an Idempotency-Key used before): its answer, in the retry's shape."""
    admission.check_reuse(adm, first)
    rid = a.request_id = first.request_id
    headers = {"X-Request-Id": adm.trace or rid}
    events = follow(state, rid, adm.item.stream, adm.item.deadline or time.time())
    if adm.item.stream:
        return _streaming(state, events, adm, rid, first.created, a, headers, None, cancel=False)
    result = await final_result(events, rid)
    return json_response(json_answer(result, adm.item.model), headers=headers)


def _streaming(state: GatewayState, events: AsyncIterator[Event], adm: Admission, request_id: str,
               created: int, a: Access, headers: dict[str, str], w: Waiter | None, *, cancel: bool) -> Response:
    """The SSE response of a stream; when it ends without its result (the client went away, the deadline
    passed) the request is cancelled, unless ``cancel`` is off (an idempotent request's client comes back)."""
    item = adm.item
    include_usage = bool(adm.req.stream_options and adm.req.stream_options.include_usage)
    fmt = StreamFormatter(request_id, item.kind, created, item.model, item.params.n, include_usage)
    end = StreamEnd()

    async def body() -> AsyncIterator[bytes]:
        state.metrics.in_flight.inc()
        try:
            async for part in sse(events, fmt, request_id, end):
                yield part
        finally:
            state.metrics.in_flight.dec()
            if w is not None:
                state.router.unregister(w)
            if end.first_token_at is not None:
                state.metrics.ttft.labels(a.model).observe(end.first_token_at - a.started)
            a.outcome, a.status = end.outcome, end.status
            _account(state, a)
            if not end.got_result and cancel:
                await asyncio.shield(state.cancel(request_id))

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})



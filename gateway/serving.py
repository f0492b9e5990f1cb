"""Serving one request once it is admitted (:mod:`gateway.admission`): enqueue it, then relay its answer.

    enqueue()   one ENQUEUE call: queued | queue full (entries or bytes) | that key was used before
    answer      the worker's answer, relayed (:func:`handle`): a JSON body with its status, or server-sent
                events as they come, byte for byte as the worker's OpenAI server wrote them.  A stream's
                status waits for its first event: a request the worker refuses gets its 4xx as JSON, as
                ``vllm serve`` answers it (with ``stream_keepalive_s`` set, a stream that waits longer in the
                queue starts at once, with SSE comments, and a refusal comes as an error event).  A retry of a
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
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping
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
from common.records import ReplyKind
from common.responses import error_body
from common.schemas import Chunk, IdempotencyRecord, Kind, Result, Usage, WorkItem
from common.scripts import Duplicate, KeyRefused, KeyUsage, Queued, QueueFull, RateLimited, Target
from gateway import admission
from gateway.admission import Admission
from gateway.auth import authenticate, rate_headers
from gateway.http import json_response
from gateway.replies import Event, Waiter
from gateway.routing import Route, affinity_key
from gateway.state import GatewayState

log = logging.getLogger("mgpu.gateway")

_ENDPOINTS: dict[Kind, str] = {"chat": "chat", "completion": "completions", "embedding": "embeddings",
                               "tokenize": "tokenize", "detokenize": "detokenize",
                               "responses": "responses"}  # the metric label

# ----------------------------------------------------------------------------- enqueue


async def enqueue(state: GatewayState, adm: Admission, route: Route) -> Queued | Duplicate:
    """Append the request to its stream; QueueFull (429) past a limit, ServiceUnavailable without Redis."""
    s = state.settings
    model = adm.item.model
    try:
        with errors.redis_unavailable("could not enqueue", retry_after=s.retry_after_s):
            out = await state.scripts.enqueue(
                model, route.destination, adm.item.to_fields()["p"], state.limits,
                idempotency_key=adm.idem_key, record=adm.record, idem_ttl_s=s.result_ttl_s, charge=adm.charge)
    except ValidationError:
        raise errors.BadResult("the stored idempotency record is unreadable") from None
    if isinstance(out, QueueFull):
        why = {"entries": "its backlog is at its limit", "bytes": "its backlog is at its byte limit",
               "total_bytes": "the gateway's backlog over all models is at its byte limit",
               "key_share": f"this API key holds its share of it ({s.max_key_share:.0%} of {s.max_queue_len} "
                            "entries)"}.get(out.limit, "it is full")
        raise errors.QueueFull(f"the queue for '{model}' is full: {why}", retry_after=s.retry_after_s)
    if isinstance(out, KeyRefused):  # revoked or expired since this gateway last read the key
        raise errors.Unauthorized(f"this API key {'is not known' if out.reason == 'unknown' else 'was ' + out.reason}")
    if isinstance(out, RateLimited):
        raise _rate_limited(adm, out)
    if isinstance(out, Queued) and out.replicas is not None and out.replicas < s.enqueue_wait_replicas:
        # on the primary only: a failover now could lose it, so it is not accepted (and not run); a retry with
        # the same Idempotency-Key must start afresh, not follow this cancelled one
        await state.cancel(adm.item.id)
        await state.forget_idempotency(adm.idem_key, adm.item.id)
        log.warning("enqueue not confirmed by replicas", extra={"request_id": adm.item.id,
                                                                "replicas": out.replicas})
        raise errors.ServiceUnavailable(
            f"the request was not confirmed by {s.enqueue_wait_replicas} Redis replica(s) within "
            f"{s.enqueue_wait_timeout_ms} ms, so it was not accepted", retry_after=s.retry_after_s)
    return out


def _rate_limited(adm: Admission, out: RateLimited) -> errors.RateLimited:
    what = {"requests": "requests per minute", "tokens": "tokens per minute", "inflight": "requests in flight"}
    key = adm.caller.key
    headers = rate_headers(key, KeyUsage(out.used if out.dimension == "requests" else 0,
                                         out.used if out.dimension == "tokens" else 0, 0, out.reset_s))
    for name in ("requests", "tokens"):
        if out.dimension == name:
            headers[f"x-ratelimit-remaining-{name}"] = "0"
    msg = f"this API key is at its limit of {out.limit} {what.get(out.dimension, out.dimension)}"
    if out.dimension == "tokens" and adm.reserve > out.limit:
        msg += f" (this request alone reserves {adm.reserve}: prompt + max_tokens)"
    return errors.RateLimited(msg, retry_after=max(1, out.reset_s), headers=headers)


# ----------------------------------------------------------------------------- events


def chunk_sse(request_id: str, payload: bytes) -> str:
    """The server-sent events a stored chunk carries."""
    try:
        return Chunk.model_validate_json(payload).sse
    except ValidationError:
        raise errors.BadResult(f"a stored chunk of request {request_id} is unreadable") from None


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


async def follow(state: GatewayState, model: str, request_id: str, streaming: bool,
                 deadline: float) -> AsyncIterator[Event]:
    """The events of a request accepted earlier, maybe by another gateway: its chunks (streaming) and its
    result, read from their durable keys.  A waiter registered here wakes the reader at once when this
    process gets the events; otherwise it polls, from 20 ms up to 250 ms apart."""
    k = state.settings.keys
    w = state.router.register(request_id, False, model)
    after, last_seq, poll = "-", 0, Backoff(0.02, 0.25)
    try:
        while True:
            w.changed.clear()
            try:
                async with state.redis.pipeline(transaction=False) as p:
                    if streaming:
                        p.xrange(k.chunks(model, request_id), min=after)
                    p.get(k.result(model, request_id))
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


def answer(result: Result, headers: dict[str, str]) -> Response:
    """A JSON request's answer: the worker's body and status, or its error (raised, for the one place that
    turns errors into HTTP)."""
    if result.error is not None:
        raise errors.from_info(result.error)
    return json_response(result.body if result.body is not None else {}, status=result.status, headers=headers)


_DONE = b"data: [DONE]\n\n"


def _error_event(exc: errors.MgpuError) -> bytes:
    return b"data: " + orjson.dumps(error_body(exc)) + b"\n\ndata: [DONE]\n\n"


@dataclass
class StreamEnd:
    """How a stream ended, for the access log and metrics (the client went away unless it says otherwise)."""

    outcome: str = "cancelled"
    status: int = 499
    first_token_at: float | None = None
    got_result: bool = False  # the final event came (a result, or the worker's error)
    usage: Usage | None = None


class Feed:
    """A request's events, one at a time.  ``wait`` may give up (a keep-alive's interval, a client that left)
    without losing its place: the pending read carries on and the next ``wait`` takes it."""

    def __init__(self, events: AsyncIterator[Event]) -> None:
        self._it = aiter(events)
        self._next: asyncio.Future[Event] | None = None

    def pending(self) -> asyncio.Future[Event]:
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._it))
        return self._next

    async def wait(self, timeout: float | None = None) -> Event | None:
        """The next event (raising what the events raise); None when ``timeout`` passed first."""
        if timeout is None and self._next is None:  # the hot path: no task of its own
            return await anext(self._it)
        fut = self.pending()
        if timeout is not None:
            done, _ = await asyncio.wait({fut}, timeout=timeout)
            if not done:
                return None
        self._next = None
        return await fut

    async def aclose(self) -> None:
        """Stop reading: the pending read is cancelled and the events' generator closed (its waiter leaves)."""
        if self._next is not None and not self._next.done():
            self._next.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._next
        close = getattr(self._it, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


async def sse(feed: Feed, first: Event | None, request_id: str, end: StreamEnd,
              keepalive_s: float = 0.0) -> AsyncGenerator[bytes, None]:
    """The SSE body of a stream: the worker's events, byte for byte, as they come (``first``: one taken
    already); a stream cut short by mgpu (the deadline, a dead letter, a worker's error) ends with one error
    event and ``[DONE]``.  With ``keepalive_s``, an SSE comment whenever nothing came for that long.

    A worker's ``data: [DONE]`` is held back until its result is in: a client that leaves at ``[DONE]``
    leaves a finished request (not one to cancel), and its end is counted as a success."""
    event: Event | None = first
    done = b""
    try:
        while True:
            if event is None:
                event = await feed.wait(keepalive_s or None)
                if event is None:
                    yield b": keep-alive\n\n"
                    continue
            kind, payload = event
            event = None
            if kind == ReplyKind.CHUNK:
                data = Chunk.model_validate_json(payload).sse.encode()
                if data.endswith(_DONE):
                    data, done = data[:-len(_DONE)], _DONE
                if data:  # a worker's first, empty, chunk only starts the response
                    if end.first_token_at is None:
                        end.first_token_at = time.perf_counter()
                    yield data
                continue
            end.got_result = True
            result = read_result(request_id, payload)
            end.usage = result.usage
            if result.error is not None:
                end.outcome, end.status = _outcome(result), result.error.status
                yield _error_event(errors.from_info(result.error))
            else:
                end.outcome, end.status = "success", 200
                if done:
                    yield done
            return
    except StopAsyncIteration:
        raise errors.BadResult(f"request {request_id} ended without a result") from None
    except errors.MgpuError as exc:  # the deadline passed, Redis went away, a result was unreadable
        end.outcome, end.status = _outcome(exc), exc.status
        yield _error_event(exc)


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
    key: str = "anon"  # the API key's name (a bounded label: keys are created by an admin)
    usage: Usage | None = None  # of a request that was answered
    first_token_at: float | None = None  # a stream's first token written (perf_counter)


def _account(state: GatewayState, a: Access, ended: float | None = None) -> None:
    duration = (ended or time.perf_counter()) - a.started
    u = a.usage
    state.metrics.observe(a.model, a.endpoint, a.outcome, a.status, duration, key=a.key,
                          prompt_tokens=u.prompt_tokens if u else 0, completion_tokens=u.completion_tokens if u else 0)
    ttft = None if a.first_token_at is None else a.first_token_at - a.started
    if ttft is not None:
        state.metrics.ttft.labels(a.model).observe(ttft)
    if state.settings.log_requests and log.isEnabledFor(logging.INFO):  # built only to be written
        extra: dict[str, Any] = {"request_id": a.request_id, "model": a.model, "endpoint": a.endpoint,
                                 "outcome": a.outcome, "code": a.status, "duration_ms": round(duration * 1000, 1)}
        if ttft is not None:
            extra["ttft_ms"] = round(ttft * 1000, 1)
        if a.trace is not None:
            extra["trace_id"] = a.trace
        log.info("request done", extra=extra)


# ----------------------------------------------------------------------------- handling


async def handle(request: Request, kind: Kind) -> Response:
    """One request to a worker's endpoint, end to end (the routes' and the fast path's handler)."""
    state: GatewayState = request.app.state.gw
    a = Access(endpoint=_ENDPOINTS[kind], started=time.perf_counter())
    response: Response | None = None
    try:
        adm = await _admit(state, request, kind, a)
        item = adm.item
        s = state.settings
        route = state.balancer.plan(state.registry, s.keys, item.model, lambda: affinity_key(
            adm.fields.user, request.headers.get("x-session-id"), adm.affinity_text(), s.affinity_prefix_chars))
        if adm.background:  # the batch stream: slots beyond the reserve, and handed back for interactive work
            route = Route(route.strategy, None, Target(s.keys.batch_stream(item.model), "", s.keys.stream(item.model)),
                          route.epoch)
        w = state.router.register(item.id, item.stream, item.model)
        try:
            queued = await enqueue(state, adm, route)
        except BaseException:
            state.router.unregister(w)
            raise
        if isinstance(queued, Duplicate):  # a retry: answer with the original, do not generate again
            state.router.unregister(w)
            response = await _answer_retry(state, request, adm, queued.first, a)
        else:
            response = await _answer(state, request, adm, route, queued, w, a)
        return response
    except errors.MgpuError as exc:
        a.status, a.outcome = exc.status, outcome_of(exc)
        raise
    except Exception:
        a.status, a.outcome = 500, "failed"
        raise
    finally:
        if not isinstance(response, StreamingResponse):  # a stream accounts for itself when it ends
            asyncio.get_running_loop().call_soon(_account, state, a, time.perf_counter())


async def _admit(state: GatewayState, request: Request, kind: Kind, a: Access) -> Admission:
    s = state.settings
    caller = await authenticate(request, s.auth, state.api_keys, s.retry_after_s)
    a.key = caller.name
    trace = a.trace = admission.trace_id(request)
    key = admission.idempotency_key(request)
    body = await admission.read_json(request, s.max_body_bytes, s.http_read_timeout_s)
    model = body.get("model")
    a.model = state.model_label(model if isinstance(model, str) else None)
    adm = admission.admit(state, kind, body, trace, key, caller)
    a.model = state.model_label(adm.item.model)
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
    headers = {"X-Request-Id": adm.trace or item.id, **rate_headers(adm.caller.key, queued.usage)}
    if item.stream:
        return await _stream(state, request, waiter_events(w, item.deadline or time.time()), item.id, a, headers, w,
                             cancel=adm.idem_key is None)
    state.metrics.in_flight.inc()
    try:
        result = await until_result_or_disconnect(state, request, w, item, keep_on_disconnect=adm.idem_key is not None)
    finally:
        state.metrics.in_flight.dec()
        state.router.unregister(w)
    a.usage = result.usage
    return answer(result, headers)


async def _answer_retry(state: GatewayState, request: Request, adm: Admission, first: IdempotencyRecord,
                        a: Access) -> Response:
    """A retry of the request ``first`` (an Idempotency-Key used before): its answer, in the retry's shape."""
    admission.check_reuse(adm, first)
    rid = a.request_id = first.request_id
    headers = {"X-Request-Id": adm.trace or rid}
    events = follow(state, adm.item.model, rid, adm.item.stream, adm.item.deadline or time.time())
    if adm.item.stream:
        return await _stream(state, request, events, rid, a, headers, None, cancel=False)
    return answer(await final_result(events, rid), headers)


async def _first(state: GatewayState, request: Request, feed: Feed, request_id: str, watch: bool) -> Event | None:
    """A stream's first event; None when ``stream_keepalive_s`` passed first (the stream starts with
    comments).  A client that leaves meanwhile (``watch``) cancels the request."""
    keepalive = state.settings.stream_keepalive_s or None
    pending = feed.pending()
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive)) if watch else None
    try:
        waiting: set[asyncio.Future[Any]] = {pending} if watcher is None else {pending, watcher}
        await asyncio.wait(waiting, timeout=keepalive, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if watcher is not None:
            watcher.cancel()
    if pending.done():
        return await feed.wait()
    if watcher is not None and watcher.done():
        await state.cancel(request_id)
        raise errors.RequestCancelled("the client disconnected")
    return None


async def _stream(state: GatewayState, request: Request, events: AsyncIterator[Event], request_id: str, a: Access,
                  headers: dict[str, str], w: Waiter | None, *, cancel: bool) -> Response:
    """A stream's response.  Its status waits for the first event: a result that comes first (the worker
    refused the request) is a JSON answer, with its status, as ``vllm serve`` answers it; a chunk starts the
    event stream.  When the stream ends without its result (the client went away, the deadline passed) the
    request is cancelled, unless ``cancel`` is off (an idempotent request's client comes back)."""
    feed = Feed(events)
    end = StreamEnd()
    state.metrics.in_flight.inc()

    def done(*more: Awaitable[None]) -> Awaitable[Any]:
        """The stream's end: counted at once; the rest (``more``, then closing its events) in one task that
        a cancellation does not stop.  Under anyio's cancel scopes (Starlette's) every await after a
        cancellation raises again, so the clean-up must not be a sequence of awaits."""
        state.metrics.in_flight.dec()
        if w is not None:
            state.router.unregister(w)

        async def rest() -> None:
            for aw in (*more, feed.aclose()):
                with contextlib.suppress(Exception):
                    await aw

        return asyncio.shield(asyncio.ensure_future(rest()))

    try:
        first = await _first(state, request, feed, request_id, watch=cancel)
    except BaseException:
        await done()
        raise
    if first is not None and first[0] != ReplyKind.CHUNK:
        await done()
        return answer(read_result(request_id, first[1]), headers)

    async def body() -> AsyncIterator[bytes]:
        try:
            async with contextlib.aclosing(sse(feed, first, request_id, end,
                                               state.settings.stream_keepalive_s)) as parts:
                async for part in parts:
                    yield part
        finally:
            a.outcome, a.status, a.usage, a.first_token_at = end.outcome, end.status, end.usage, end.first_token_at
            _account(state, a)
            await done(*([state.cancel(request_id)] if not end.got_result and cancel else []))

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **headers})

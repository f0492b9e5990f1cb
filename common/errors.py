"""The mgpu exception tree.

::

    MgpuError
    ├── RequestError              the request cannot be served as sent (4xx)
    │   ├── InvalidRequest        400 schema / value / context-length violations
    │   ├── Unauthorized          401 no API key, or one that is wrong, revoked or expired
    │   ├── Forbidden             403 a valid key that may not do this (another model, an admin endpoint)
    │   ├── UnsupportedMediaType  415 a body that is not application/json
    │   ├── RateLimited           429 the key's requests or tokens per minute, or requests in flight
    │   ├── NotFound              404 no such request
    │   │   └── ModelNotFound     404 no such model
    │   ├── MethodNotAllowed      405 (with ``Allow``)
    │   ├── ReadTimeout           408 the request's body did not arrive in time
    │   ├── PayloadTooLarge       413 body over the configured limit
    │   ├── Conflict              409 not in a state that allows it (cancelling a finished batch)
    │   ├── IdempotencyMismatch   422 an Idempotency-Key reused for another request
    │   └── QueueFull             429 the model's backlog is over its limit (entries or bytes)
    ├── ServiceUnavailable        503 no live worker, Redis unreachable or near its memory limit
    ├── RequestTimeout            504 the deadline passed before a result
    ├── RequestCancelled          499 the client went away
    ├── BadResult                 502 a stored result cannot be read
    ├── StreamInterrupted         502 a stream's worker died after part of it was sent, and it cannot be continued
    ├── GenerationFailed          500 the engine failed on this request
    │   └── DeadLettered          500 retries exhausted, moved to the dead-letter stream
    └── EngineDead                    the engine of a worker is gone (ends the worker process)

Errors travel between processes as :class:`common.schemas.ErrorInfo`; ``to_info`` and
``from_info`` translate at that boundary.  Only the gateway's exception handlers turn
them into HTTP responses.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import redis

from common.schemas import ErrorInfo


class MgpuError(Exception):
    """An mgpu error: its HTTP status, OpenAI ``type`` and ``code`` are class facts, given as class
    keywords (``class NotFound(RequestError, status=404, code="not_found")``) and inherited otherwise."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init_subclass__(cls, *, status: int | None = None, type: str | None = None,
                          code: str | None = None, **kw: object) -> None:
        super().__init_subclass__(**kw)
        if status is not None:
            cls.status = status
        if type is not None:
            cls.type = type
        if code is not None:
            cls.code = code

    def __init__(self, message: str, *, param: str | None = None, retry_after: float | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.headers = headers  # extra response headers (``Allow`` of a 405, ...)

    def to_info(self) -> ErrorInfo:
        return ErrorInfo(
            message=self.message, type=self.type, param=self.param, code=self.code, status=self.status
        )


class RequestError(MgpuError, status=400, type="invalid_request_error"):
    pass


class Unauthorized(RequestError, status=401, code="invalid_api_key"):
    """401: a missing, malformed, unknown, wrong, revoked or expired API key."""


class Forbidden(RequestError, status=403, type="permission_error", code="forbidden"):
    """403: the key is valid but may not do this (another model, an admin endpoint)."""


class UnsupportedMediaType(RequestError, status=415, code="unsupported_media_type"):
    pass


class RateLimited(RequestError, status=429, type="rate_limit_error", code="rate_limit_exceeded"):
    """429: the API key is over its requests or tokens per minute, or its requests in flight."""


class InvalidRequest(RequestError, status=400, type="BadRequestError"):
    """400.  Its ``type`` is vLLM's (``vllm serve`` answers a bad request with ``BadRequestError``), so that
    a client sees the same error whether the gateway or a worker's vLLM refused the request."""


class NotFound(RequestError, status=404, type="NotFoundError", code="not_found"):
    pass


class ModelNotFound(NotFound, code="model_not_found"):
    pass


class MethodNotAllowed(RequestError, status=405, code="method_not_allowed"):
    pass


class ReadTimeout(RequestError, status=408, code="read_timeout"):
    pass


class Conflict(RequestError, status=409, code="conflict"):
    pass


class IdempotencyMismatch(RequestError, status=422, code="idempotency_key_reused"):
    pass


class PayloadTooLarge(RequestError, status=413, code="payload_too_large"):
    pass


class QueueFull(RequestError, status=429, type="rate_limit_error", code="queue_full"):
    pass


class ServiceUnavailable(MgpuError, status=503, type="service_unavailable", code="service_unavailable"):
    pass


class RequestTimeout(MgpuError, status=504, type="timeout", code="deadline_exceeded"):
    pass


class RequestCancelled(MgpuError, status=499, type="cancelled", code="cancelled"):
    pass


class BadResult(MgpuError, status=502, type="server_error", code="bad_result"):
    pass


class StreamInterrupted(MgpuError, status=502, type="server_error", code="stream_interrupted"):
    pass


class GenerationFailed(MgpuError, status=500, type="server_error", code="generation_failed"):
    pass


class DeadLettered(GenerationFailed, code="dead_lettered"):
    pass


class EngineDead(MgpuError, code="engine_dead"):
    """The engine is gone: the worker stops pulling and exits; the supervisor restarts it."""


_BY_CODE: dict[str | None, type[MgpuError]] = {
    cls.code: cls
    for cls in (NotFound, ModelNotFound, MethodNotAllowed, ReadTimeout, PayloadTooLarge, IdempotencyMismatch, Conflict,
                Unauthorized, Forbidden, UnsupportedMediaType, RateLimited,
                QueueFull, ServiceUnavailable, RequestTimeout, RequestCancelled, BadResult, GenerationFailed,
                DeadLettered, EngineDead)
}


def from_info(info: ErrorInfo) -> MgpuError:
    """Rebuild the exception a worker reported, keeping its message, status, type and code (a vLLM
    worker's errors are vLLM's own: ``{"type": "Bad Request"}``, ``BadRequestError``, ...)."""
    cls = _BY_CODE.get(info.code)
    if cls is None:
        cls = InvalidRequest if 400 <= info.status < 500 else GenerationFailed
    err = cls(info.message, param=info.param)
    err.status, err.type, err.code = info.status, info.type, info.code
    return err


def unavailable(exc: BaseException, *, what: str = "the queue (Redis) is unreachable",
                retry_after: float | None = None) -> ServiceUnavailable:
    """The one translation of a Redis (or socket) error into what a client is told: 503."""
    return ServiceUnavailable(f"{what}: {exc}", retry_after=retry_after)


@contextmanager
def redis_unavailable(what: str = "the queue (Redis) is unreachable",
                      retry_after: float | None = None) -> Iterator[None]:
    """``with redis_unavailable(...):`` a Redis or socket error inside becomes :class:`ServiceUnavailable`."""
    try:
        yield
    except (redis.RedisError, redis.exceptions.RedisClusterException, OSError) as exc:
        raise unavailable(exc, what=what, retry_after=retry_after) from None

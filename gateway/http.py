"""The one place where errors become HTTP responses: an :class:`common.errors.MgpuError` becomes its
status, the OpenAI error body, ``Retry-After`` and its own headers; the framework's own errors (no
such route, wrong method) become mgpu errors first; anything else is a logged 500."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match

from common import errors
from common.responses import error_body

log = logging.getLogger("mgpu.gateway")


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(obj), status_code=status, media_type="application/json", headers=headers)


def error_response(exc: errors.MgpuError) -> Response:
    """The one place an mgpu error becomes an HTTP response (status, OpenAI body, Retry-After, headers)."""
    headers = dict(exc.headers or {})
    if exc.retry_after:
        headers["Retry-After"] = str(int(exc.retry_after))
    return json_response(error_body(exc), status=exc.status, headers=headers or None)


def unexpected_error_response(exc: Exception) -> Response:
    log.error("unexpected error", exc_info=exc)
    return json_response(error_body(errors.MgpuError("internal error")), status=500)


def allowed_methods(request: Request) -> str:
    """The methods of every route of the request's path (``/v1/files`` has a GET route and a POST route)."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def http_exception_error(exc: StarletteHTTPException) -> errors.MgpuError:
    """The framework's own errors (no such route, wrong method) as mgpu errors, headers kept."""
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        return errors.NotFound("no such route", headers=headers)
    if exc.status_code == 405:
        return errors.MethodNotAllowed(f"method not allowed; allowed: {headers.get('Allow', '?')}", headers=headers)
    err = errors.RequestError(str(exc.detail), headers=headers)
    err.status = exc.status_code  # type: ignore[misc]
    return err

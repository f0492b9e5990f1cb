"""The gateway's OpenAPI document: the generation endpoints' request bodies (the request models of
:mod:`common.schemas`, strict as the gateway checks them), every response with its schema (the
OpenAI shapes that :mod:`common.protocol` builds, and the OpenAI error body), and ``/metrics`` as
Prometheus text.  The generation routes read their body themselves (``gateway.serving``), so their
schema is declared here rather than derived from a handler signature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from common.batch_api import Batch, BatchList, FileDeleted, FileList, FileObject
from common.producer import BATCH_URLS
from common.protocol import ChatCompletionRequest, CompletionRequest
from common.responses import ChatCompletionResponse, CompletionResponse, ErrorResponse, Health, ModelList, Readiness

_REQUESTS: list[type[BaseModel]] = [CompletionRequest, ChatCompletionRequest]
_RESPONSES: list[type[BaseModel]] = [ErrorResponse, CompletionResponse, ChatCompletionResponse, ModelList, Readiness,
                                     Health, FileObject, FileList, FileDeleted, Batch, BatchList]

_ERRORS = {
    "400": "Invalid request: a field, its value, or a context-length violation (the error names the field)",
    "401": "With API keys: a missing, malformed, unknown, wrong, expired or revoked key (invalid_api_key)",
    "403": "With API keys: the key may not use this model, or the endpoint needs an admin key",
    "404": "No such model, route or stored request",
    "405": "Method not allowed (see the Allow header)",
    "408": "The request's headers or body did not arrive in time",
    "409": "The batch has finished already: it cannot be cancelled",
    "413": "The body is over the size limit",
    "415": "The body is not sent as Content-Type: application/json (multipart/form-data for a file upload)",
    "422": "An Idempotency-Key reused with another endpoint, stream flag or body",
    "429": "The model's queue is full (entries or bytes, or the API key's share of it), or the API key is at its "
           "requests or tokens per minute or requests in flight; see Retry-After and the x-ratelimit-* headers",
    "499": "The client disconnected before the answer",
    "500": "The engine failed on this request, or it was dead-lettered after repeated worker failures",
    "502": "A stored result could not be read, or a stream whose worker died after part of it was sent cannot be "
           "continued (stream_interrupted)",
    "503": "No live worker for the model, Redis unreachable or near its memory limit, or the gateway at its "
           "connection limit; see Retry-After",
    "504": "The request's deadline passed before a result",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(*codes: str) -> dict[str, Any]:
    return {c: {"description": _ERRORS[c], "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
            for c in codes}


_GENERATION_ERRORS = ("400", "401", "403", "404", "408", "413", "415", "422", "429", "499", "500", "502", "503",
                      "504")
# with auth on (the default), every /v1 route and /workers need an API key; with auth off, none
_SECURITY: list[dict[str, list[str]]] = [{"apiKey": []}, {}]


def _generation(request: type[BaseModel], response: type[BaseModel], summary: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "parameters": [
            {"name": "Idempotency-Key", "in": "header", "required": False,
             "schema": {"type": "string", "pattern": "^[\\x20-\\x7e]{1,255}$"},
             "description": "a retry with the same key and body gets the original answer, not a second generation"},
            {"name": "X-Request-Id", "in": "header", "required": False,
             "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,128}$"},
             "description": "a tracing id, echoed back and logged (1-128 printable ASCII characters, no spaces)"},
        ],
        "responses": {
            "200": {"description": "The completion (JSON), or with stream=true its server-sent events",
                    "content": {"application/json": {"schema": _ref(response)},
                                "text/event-stream": {"schema": _SSE_EVENT}}},
            **_errors(*_GENERATION_ERRORS),
        },
    }


# one server-sent event: its data is a JSON chunk of the OpenAI shape, an error body, or [DONE]
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "a chat.completion.chunk / text_completion chunk as JSON, an error "
                                              "body, or [DONE] (the last event)"},
    "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"}}}


# the other endpoints a worker answers: their bodies are vLLM's, validated by the worker's vLLM
_PASSED_ON = {"/v1/embeddings": ("Embeddings (a worker serving a pooling model)", False),
              "/tokenize": ("Tokenize a prompt or messages", False), "/detokenize": ("Token ids to text", False),
              "/v1/responses": ("The Responses API (stateless: store and previous_response_id are not kept)", True)}
_ANY_BODY = {"type": "object", "properties": {"model": {"type": "string"}}, "additionalProperties": True}


def _passed_on(summary: str, stream: bool) -> dict[str, Any]:
    ok: dict[str, Any] = {"application/json": {"schema": {"type": "object"}}}
    if stream:
        ok["text/event-stream"] = {"schema": _SSE_EVENT}
    return {"summary": summary,
            "description": "The body is passed to a worker of the model, whose vLLM validates it (the request bodies "
                           "of vLLM's OpenAI server)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ANY_BODY}}},
            "responses": {"200": {"description": "The worker's answer", "content": ok},
                          **_errors(*_GENERATION_ERRORS)}}


def _json(model: type[BaseModel], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(model)}}}


def build_openapi(app: FastAPI, models: list[str]) -> dict[str, Any]:
    """The document, with ``models`` (those served now) as the examples of the requests' ``model``."""
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                         description="An OpenAI-compatible endpoint for a fleet of vLLM engines behind Redis Streams")
    _, defs = models_json_schema([(m, "validation") for m in _REQUESTS] + [(m, "serialization") for m in _RESPONSES],
                                 ref_template="#/components/schemas/{model}")
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(defs.get("$defs", {}))
    if models:
        for req in _REQUESTS:
            components[req.__name__]["properties"]["model"]["examples"] = models
    paths = schema["paths"]
    paths["/v1/completions"]["post"].update(_generation(CompletionRequest, CompletionResponse, "Text completion"))
    paths["/v1/chat/completions"]["post"].update(
        _generation(ChatCompletionRequest, ChatCompletionResponse, "Chat completion"))
    for path, (summary, stream) in _PASSED_ON.items():
        paths[path]["post"].update(_passed_on(summary, stream))
    paths["/v1/models"]["get"]["responses"] = {"200": _json(ModelList, "The models live workers serve"),
                                               **_errors("401")}
    lookup = paths["/v1/requests/{request_id}"]["get"]
    lookup["summary"] = "A finished request's stored answer (for result_ttl_s)"
    lookup["responses"] = {
        "200": {"description": "The stored answer: the JSON response, or a stream's server-sent events again",
                "content": {"application/json": {"schema": {"type": "object"}},
                            "text/event-stream": {"schema": _SSE_EVENT}}},
        **_errors("400", "401", "404", "499", "500", "502", "503", "504"),
    }
    paths["/health"]["get"]["responses"] = {"200": _json(Health, "The gateway process is up")}
    paths["/ready"]["get"]["responses"] = {"200": _json(Readiness, "Redis reachable and at least one live worker"),
                                           "503": _json(Readiness, "Not ready")}
    paths["/workers"]["get"]["responses"] = {"200": {"description": "The worker registry as this gateway sees it",
                                                     "content": {"application/json": {"schema": {"type": "object"}}}},
                                             **_errors("401", "403")}
    _files_and_batches(paths)
    schema["components"]["securitySchemes"] = {"apiKey": {
        "type": "http", "scheme": "bearer", "description": "an API key (mgpu keys create), as the OpenAI client's "
        "api_key"}}
    for path, item in paths.items():
        if path.startswith("/v1/") or path in ("/tokenize", "/detokenize", "/workers", "/metrics"):
            for op in item.values():
                op["security"] = _SECURITY
    paths["/metrics"]["get"]["responses"] = {"200": {"description": "Prometheus metrics",
                                                     "content": {"text/plain": {"schema": {"type": "string"}}}},
                                             **_errors("401", "403")}
    return schema


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


_AFTER = _query("after", {"type": "string"}, "the id of the last object of the previous page")
_FILE_ID = {"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}
_BATCH_ID = {"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}
_UPLOAD = {"type": "object", "required": ["file", "purpose"], "properties": {
    "file": {"type": "string", "format": "binary", "description": "a JSONL file, one request per line"},
    "purpose": {"type": "string", "enum": ["batch"]},
    "expires_after[anchor]": {"type": "string", "enum": ["created_at"], "description": "OpenAI's expires_after "
                              "(with expires_after[seconds]); without it a batch file expires after "
                              "file_expiry_default_s (30 days)"},
    "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000}}}
_EXPIRY = {"type": "object", "required": ["anchor", "seconds"], "additionalProperties": False, "properties": {
    "anchor": {"type": "string", "enum": ["created_at"]},
    "seconds": {"type": "integer", "minimum": 3600, "maximum": 2592000}}}
_CREATE_BATCH = {"type": "object", "required": ["input_file_id", "endpoint", "completion_window"],
                 "additionalProperties": False, "properties": {
                     "input_file_id": {"type": "string"}, "endpoint": {"type": "string", "enum": list(BATCH_URLS)},
                     "completion_window": {"type": "string", "enum": ["24h"]},
                     "metadata": {"type": ["object", "null"], "maxProperties": 16,
                                  "additionalProperties": {"type": "string", "maxLength": 512}},
                     "output_expires_after": {**_EXPIRY, "description": "the output and error files expire this "
                                              "long after they are written"}}}
_BYTES = {"description": "The file's content",
          "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}


def _op(summary: str, ok: dict[str, Any], codes: tuple[str, ...], params: list[dict[str, Any]] | None = None,
        body: tuple[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """One operation: its 200 (``ok``), its errors, its parameters and its body (a media type and its schema)."""
    op: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **_errors(*codes)}}
    if params is not None:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "content": {body[0]: {"schema": body[1]}}}
    return op


def _files_and_batches(paths: dict[str, Any]) -> None:
    """OpenAI's Files and Batches API (gateway/files_api.py, gateway/batches_api.py; docs/batch.md)."""
    one, page = ("401", "404", "503"), ("400", "401", "503")
    limit = {"type": "integer", "minimum": 1}
    ops = {
        ("/v1/files", "post"): _op("Upload a batch input file (JSONL; checked line by line when a batch uses it)",
                                   _json(FileObject, "The stored file"), ("400", "401", "413", "415", "503"),
                                   body=("multipart/form-data", _UPLOAD)),
        ("/v1/files", "get"): _op("The caller's files, newest first", _json(FileList, "A page of files"), page, [
            _query("limit", {**limit, "maximum": 10_000, "default": 100}, "at most this many"), _AFTER,
            _query("purpose", {"type": "string"}, "only files of this purpose")]),
        ("/v1/files/{file_id}", "get"): _op("A file's object", _json(FileObject, "The file"), one, [_FILE_ID]),
        ("/v1/files/{file_id}", "delete"): _op("Delete a file (409: the input of a batch not finished)",
                                                _json(FileDeleted, "Deleted"), (*one, "409"), [_FILE_ID]),
        ("/v1/files/{file_id}/content", "get"): _op("A file's bytes", _BYTES, one, [_FILE_ID]),
        ("/v1/batches", "post"): _op("Create a batch from an uploaded file", _json(Batch, "The batch, validating"),
                                     ("400", "401", "404", "408", "413", "415", "499", "503"),
                                     body=("application/json", _CREATE_BATCH)),
        ("/v1/batches", "get"): _op("The caller's batches, newest first", _json(BatchList, "A page of batches"), page,
                                    [_query("limit", {**limit, "maximum": 100, "default": 20}, "at most this many"),
                                     _AFTER]),
        ("/v1/batches/{batch_id}", "get"): _op("A batch's object", _json(Batch, "The batch"), one, [_BATCH_ID]),
        ("/v1/batches/{batch_id}/cancel", "post"): _op(
            "Cancel a batch: cancelling at once, cancelled once what runs has ended",
            _json(Batch, "The batch, cancelling"), ("401", "404", "409", "503"), [_BATCH_ID]),
    }
    for (path, method), op in ops.items():
        paths[path][method].update(op)


def install_openapi(app: FastAPI, live_models: Callable[[], list[str]]) -> None:
    """``app.openapi()`` builds the document once per set of served models."""
    built: dict[tuple[str, ...], dict[str, Any]] = {}

    def openapi() -> dict[str, Any]:
        models = tuple(live_models())
        if models not in built:
            built.clear()
            built[models] = build_openapi(app, list(models))
        app.openapi_schema = built[models]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

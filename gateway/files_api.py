"""OpenAI's Files API, for batches: ``POST /v1/files`` (multipart: ``file``, ``purpose``), ``GET /v1/files``,
``GET /v1/files/{id}``, ``GET /v1/files/{id}/content``, ``DELETE /v1/files/{id}``.  Files are kept in the
:class:`common.filestore.FileStore` every replica shares; each belongs to its caller's scope (another
caller's file is as if absent: 404).  A client uploads only ``purpose="batch"``; the gateway writes the
batches' output and error files (``batch_output``).  A file with an ``expires_at`` (OpenAI's ``expires_after``:
an upload's, ``file_expiry_default_s`` by default; a batch's ``output_expires_after`` for its output) is as if
absent from that second on, and a gateway's sweep deletes it (:mod:`gateway.file_expiry`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from common import errors
from common.batch_api import FileDeleted, FileList
from common.filestore import PURPOSES_UPLOAD, FileInUse, FileRecord, StoreFull, new_file_id
from gateway.auth import Caller, authenticate
from gateway.http import json_response
from gateway.state import GatewayState

router = APIRouter()  # its OpenAPI operations: gateway/openapi.py

_FORM_OVERHEAD = 64 << 10  # multipart boundaries and the purpose field, beyond the file's own bytes
_BLOCK = 1 << 20  # an upload is read a block at a time
EXPIRY_MAX_S = 30 * 24 * 3600  # OpenAI's longest expires_after
_FORM_FIELDS = ("file", "purpose", "expires_after[anchor]", "expires_after[seconds]")


def _state(request: Request) -> GatewayState:
    return request.app.state.gw  # type: ignore[no-any-return]


async def _caller(request: Request) -> Caller:
    s = _state(request)
    return await authenticate(request, s.settings.auth, s.api_keys, s.settings.retry_after_s)


def int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 12) or not low <= int(raw) <= high:
        raise errors.InvalidRequest(f"{name}: an integer from {low} to {high}", param=name)
    return int(raw)


async def owned_file(state: GatewayState, caller: Caller, file_id: str) -> FileRecord:
    """The caller's file ``file_id``; NotFound (404) when there is none (or it is another caller's, or expired)."""
    with errors.redis_unavailable(retry_after=state.settings.retry_after_s):
        rec = await state.files.meta(file_id)
    if rec is None or rec.scope != caller.scope or rec.expired(time.time()):
        raise errors.NotFound(f"No such File object: {file_id}", param="file_id")
    return rec


def expiry_seconds(anchor: Any, seconds: Any, param: str, low: int) -> int:
    """OpenAI's expiration policy (``{anchor: "created_at", seconds}``): its seconds, from ``low`` (OpenAI's 1 hour
    unless the settings lower it) to 30 days; 400 naming ``param`` otherwise."""
    if anchor != "created_at":
        raise errors.InvalidRequest(f"{param}.anchor: must be 'created_at'", param=f"{param}.anchor")
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not low <= seconds <= EXPIRY_MAX_S:
        raise errors.InvalidRequest(f"{param}.seconds: an integer from {low} to {EXPIRY_MAX_S}",
                                    param=f"{param}.seconds")
    return seconds


def _form_fields(form: Any, expiry_min: int) -> tuple[UploadFile, str, int | None]:
    """The multipart form's file, purpose and ``expires_after`` seconds (None: not given); 400 for anything else."""
    for name in form:
        if name not in _FORM_FIELDS:  # not dropped silently: the caller meant something by it
            raise errors.InvalidRequest(f"{name}: not a field this server takes (it takes "
                                        f"{', '.join(_FORM_FIELDS)})", param=name)
    expiry = None
    if "expires_after[anchor]" in form or "expires_after[seconds]" in form:
        seconds = form.get("expires_after[seconds]")  # a form's values are text
        if isinstance(seconds, str) and seconds.isascii() and seconds.isdigit() and len(seconds) <= 12:
            seconds = int(seconds)
        expiry = expiry_seconds(form.get("expires_after[anchor]"), seconds, "expires_after", expiry_min)
    upload, purpose = form.get("file"), form.get("purpose")
    if not isinstance(upload, UploadFile):
        raise errors.InvalidRequest("file: a file is required", param="file")
    if not isinstance(purpose, str) or not purpose:
        raise errors.InvalidRequest("purpose: required", param="purpose")
    if purpose not in PURPOSES_UPLOAD:
        raise errors.InvalidRequest(f"purpose: '{purpose}' is not supported here; use 'batch'", param="purpose")
    return upload, purpose, expiry


async def _spooled(upload: UploadFile) -> AsyncIterator[bytes]:
    """The upload from its start, a block at a time (Starlette spools a file part to disk past 1 MB)."""
    await upload.seek(0)
    while piece := await upload.read(_BLOCK):
        yield piece


class NonBlankLines:
    """Counts the lines (split at newlines, as the feeder splits them) that are not blank, fed in pieces."""

    def __init__(self) -> None:
        self.count = 0
        self._counted = False  # the line under way has a byte that is not blank (and is counted)

    def feed(self, data: bytes) -> None:
        for i, part in enumerate(data.split(b"\n")):
            if i:
                self._counted = False  # a newline ended the line under way
            if not self._counted and part.strip():
                self.count += 1
                self._counted = True


@router.post("/v1/files", name="files_create")
async def create_file(request: Request) -> Response:
    """Store an upload; the gateway holds a block of it at a time (the form's file is spooled to disk), not the
    file: its lines are counted in one pass and it is stored in a second."""
    state, caller = _state(request), await _caller(request)
    s = state.settings
    limit = s.file_max_bytes
    length = request.headers.get("content-length")
    if length is not None and length.isascii() and length.isdigit() and int(length) > limit + _FORM_OVERHEAD:
        raise errors.PayloadTooLarge(f"the file is over the {limit}-byte limit")
    ctype = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if ctype != "multipart/form-data":
        raise errors.UnsupportedMediaType("upload a file as multipart/form-data (fields: file, purpose)")
    async with request.form(max_files=1, max_fields=8) as form:
        upload, purpose, expiry = _form_fields(form, s.file_expiry_min_s)
        lines, size = NonBlankLines(), 0
        async for piece in _spooled(upload):
            size += len(piece)
            if size > limit:
                raise errors.PayloadTooLarge(f"the file is over the {limit}-byte limit")
            lines.feed(piece)
        if lines.count > s.file_max_lines:
            raise errors.InvalidRequest(f"the file has {lines.count} lines; a batch file may have at most "
                                        f"{s.file_max_lines}", param="file")
        now = int(time.time())
        if expiry is None:  # OpenAI's default for a batch file: 30 days (0: until deleted)
            expiry = s.file_expiry_default_s or None
        rec = FileRecord(id=new_file_id(), bytes=size, filename=upload.filename or "upload.jsonl", purpose=purpose,
                         scope=caller.scope, lines=lines.count, created_at=now,
                         expires_at=now + expiry if expiry else None)
        try:
            with errors.redis_unavailable("could not store the file", retry_after=s.retry_after_s):
                rec = await state.files.put(rec, _spooled(upload))
        except StoreFull as exc:
            raise errors.PayloadTooLarge(str(exc)) from None
    return json_response(rec.to_openai())


@router.get("/v1/files", name="files_list")
async def list_files(request: Request) -> Response:
    """The caller's files, newest first (``limit``, ``after``, ``purpose``)."""
    state, caller = _state(request), await _caller(request)
    limit = int_param(request, "limit", 100, 1, 10_000)
    after, purpose = request.query_params.get("after"), request.query_params.get("purpose")
    with errors.redis_unavailable(retry_after=state.settings.retry_after_s):
        recs, more = await state.files.list(limit, after)
    now = time.time()
    data = [r.to_object() for r in recs
            if r.scope == caller.scope and (purpose is None or r.purpose == purpose) and not r.expired(now)]
    return json_response(FileList(data=data, has_more=more, first_id=data[0].id if data else None,
                                  last_id=data[-1].id if data else None).model_dump(mode="json"))


@router.get("/v1/files/{file_id}", name="files_retrieve")
async def retrieve_file(request: Request, file_id: str) -> Response:
    rec = await owned_file(_state(request), await _caller(request), file_id)
    return json_response(rec.to_openai())


@router.get("/v1/files/{file_id}/content", name="files_content")
async def file_content(request: Request, file_id: str) -> Response:
    state = _state(request)
    await owned_file(state, await _caller(request), file_id)
    with errors.redis_unavailable(retry_after=state.settings.retry_after_s):
        data = await state.files.get(file_id)
    if data is None:
        raise errors.NotFound(f"No such File object: {file_id}", param="file_id")
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", name="files_delete")
async def delete_file(request: Request, file_id: str) -> Response:
    state = _state(request)
    await owned_file(state, await _caller(request), file_id)
    try:
        with errors.redis_unavailable(retry_after=state.settings.retry_after_s):
            deleted = await state.files.delete(file_id)
    except FileInUse:  # its feeder reads it until the last line is submitted
        raise errors.Conflict(f"The file {file_id} is the input of a batch that has not finished; cancel the "
                              "batch or wait for it to end.") from None
    return json_response(FileDeleted(id=file_id, deleted=deleted).model_dump(mode="json"))

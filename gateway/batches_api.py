"""OpenAI's Batches API: ``POST /v1/batches``, ``GET /v1/batches`` (``limit``, ``after``), ``GET
/v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.  A batch is created ``validating``; a feeder
(:mod:`gateway.feeder`, in whichever replica holds its lease) checks its file, runs it and writes its output.
Each batch belongs to its caller's scope (another caller's batch is as if absent: 404)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis
from fastapi import APIRouter, Request
from fastapi.responses import Response

from common import errors
from common.batch_api import Batch, BatchList
from common.batchjob import BatchRecord, BatchStatus
from common.producer import BATCH_URLS
from gateway import batch_records
from gateway.admission import read_json
from gateway.files_api import _caller, _state, expiry_seconds, int_param, owned_file
from gateway.http import json_response

router = APIRouter()  # its OpenAPI operations: gateway/openapi.py

WINDOWS = {"24h": 24 * 3600.0}  # OpenAI's only completion window
_CREATE_FIELDS = ("input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after")


def _metadata(v: Any) -> dict[str, str] | None:
    """OpenAI's metadata: at most 16 pairs, keys up to 64 characters, values up to 512."""
    if v is None:
        return None
    if (not isinstance(v, dict) or len(v) > 16
            or not all(isinstance(k, str) and isinstance(x, str) and len(k) <= 64 and len(x) <= 512
                       for k, x in v.items())):
        raise errors.InvalidRequest("metadata: at most 16 string pairs (keys up to 64 characters, values up to 512)",
                                    param="metadata")
    return v


@router.post("/v1/batches", name="batches_create")
async def create_batch(request: Request) -> Response:
    state, caller = _state(request), await _caller(request)
    s = state.settings
    body = await read_json(request, s.max_body_bytes, s.http_read_timeout_s)
    for name in body:
        if name not in _CREATE_FIELDS:  # not dropped silently: the caller meant something by it
            raise errors.InvalidRequest(f"{name}: not a field of a batch this server takes (it takes "
                                        f"{', '.join(_CREATE_FIELDS)})", param=name)
    file_id, endpoint, window = body.get("input_file_id"), body.get("endpoint"), body.get("completion_window")
    if not isinstance(file_id, str) or not file_id:
        raise errors.InvalidRequest("input_file_id: required", param="input_file_id")
    if endpoint not in BATCH_URLS:
        raise errors.InvalidRequest(f"endpoint: one of {', '.join(BATCH_URLS)}", param="endpoint")
    if window not in WINDOWS:
        raise errors.InvalidRequest("completion_window: must be '24h'", param="completion_window")
    metadata = _metadata(body.get("metadata"))
    out_expiry = body.get("output_expires_after")
    if out_expiry is not None:
        if not isinstance(out_expiry, dict) or set(out_expiry) - {"anchor", "seconds"}:
            raise errors.InvalidRequest("output_expires_after: an object {anchor: 'created_at', seconds}",
                                        param="output_expires_after")
        out_expiry = expiry_seconds(out_expiry.get("anchor"), out_expiry.get("seconds"), "output_expires_after",
                                    s.file_expiry_min_s)
    k = s.keys
    with errors.redis_unavailable("could not create the batch", retry_after=s.retry_after_s):
        async with state.redis.pipeline(transaction=True) as p:
            # the file is read after its record is WATCHed and marked as the batch's input in the transaction that
            # writes the batch: a deletion (a DELETE, an expiry's sweep) either comes first (404 here) or is
            # refused until the batch ends
            await p.watch(k.file(file_id))
            f = await owned_file(state, caller, file_id)
            if f.purpose != "batch":
                raise errors.InvalidRequest(f"input_file_id: the file {file_id} has purpose '{f.purpose}', not "
                                            "'batch'", param="input_file_id")
            now = time.time()
            rec = BatchRecord(id="batch_" + uuid.uuid4().hex, input_file_id=file_id, endpoint=endpoint,
                              completion_window=window, metadata=metadata, output_expires_after_s=out_expiry,
                              scope=caller.scope, created_at=int(now),
                              expires_at=now + (s.batch_completion_window_s or WINDOWS[window]))
            p.multi()
            p.set(k.batch(rec.id), rec.model_dump_json())
            p.zadd(k.batches, {rec.id: now})
            p.sadd(k.batches_active, rec.id)
            p.sadd(k.file_batches(file_id), rec.id)
            try:
                await p.execute()
            except redis.WatchError:
                raise errors.NotFound(f"No such File object: {file_id}", param="input_file_id") from None
    return json_response(rec.to_openai())


async def _owned(request: Request, batch_id: str) -> BatchRecord:
    state, caller = _state(request), await _caller(request)
    with errors.redis_unavailable(retry_after=state.settings.retry_after_s):
        rec = await batch_records.load(state.redis, state.settings.keys, batch_id)
    if rec is None or rec.scope != caller.scope:
        raise errors.NotFound(f"No such Batch object: {batch_id}", param="batch_id")
    return rec


@router.get("/v1/batches/{batch_id}", name="batches_retrieve")
async def retrieve_batch(request: Request, batch_id: str) -> Response:
    return json_response((await _owned(request, batch_id)).to_openai())


@router.get("/v1/batches", name="batches_list")
async def list_batches(request: Request) -> Response:
    """The caller's batches, newest first, from the one after ``after``; ``has_more`` as OpenAI's cursor page."""
    state, caller = _state(request), await _caller(request)
    limit = int_param(request, "limit", 20, 1, 100)
    after = request.query_params.get("after")
    k = state.settings.keys
    out: list[Batch] = []
    more = False
    with errors.redis_unavailable(retry_after=state.settings.retry_after_s):
        start = 0
        if after is not None:
            rank = await state.redis.zrevrank(k.batches, after)
            start = 0 if rank is None else rank + 1
        while not more:  # pages of the index until ``limit`` of the caller's batches (and one more) are found
            ids = await state.redis.zrevrange(k.batches, start, start + 199)
            if not ids:
                break
            start += len(ids)
            for raw in await state.redis.mget([k.batch(i.decode()) for i in ids]):
                rec = None if raw is None else BatchRecord.model_validate_json(raw)
                if rec is None or rec.scope != caller.scope:
                    continue
                if len(out) == limit:
                    more = True
                    break
                out.append(rec.to_object())
    return json_response(BatchList(data=out, has_more=more, first_id=out[0].id if out else None,
                                   last_id=out[-1].id if out else None).model_dump(mode="json"))


@router.post("/v1/batches/{batch_id}/cancel", name="batches_cancel")
async def cancel_batch(request: Request, batch_id: str) -> Response:
    """``cancelling`` at once; the batch's feeder cancels what runs and ends it ``cancelled`` (409 when the batch
    has finished already)."""
    await _owned(request, batch_id)
    state = _state(request)

    def change(rec: BatchRecord) -> BatchRecord | None:
        if rec.final or rec.status == BatchStatus.FINALIZING:
            raise errors.Conflict(f"Cannot cancel a batch with status '{rec.status}'.")
        if rec.status == BatchStatus.CANCELLING:
            return None
        return rec.model_copy(update={"status": BatchStatus.CANCELLING, "cancelling_at": int(time.time()),
                                      "stop_since": time.time()})

    with errors.redis_unavailable(retry_after=state.settings.retry_after_s):
        rec = await batch_records.transact(state.redis, state.settings.keys, batch_id, change)
    if rec is None:
        raise errors.NotFound(f"No such Batch object: {batch_id}", param="batch_id")
    return json_response(rec.to_openai())

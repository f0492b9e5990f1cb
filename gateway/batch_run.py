"""One step of a batch, run by its feeder (:mod:`gateway.feeder`) while it holds the batch's lease.

    validating    the input file checked whole, a block at a time, each line as an online request is
                  (``gateway.admission``: the fields, the model, the endpoint it is served on, the context
                  length), nothing stored but the count; or the batch ``failed`` with one error per bad line
    in_progress   collect: the results of the submitted lines (``Keys.result``, read in chunks) appended to the
                  output or error list; feed: the next lines, read again from the input file from the byte
                  offset where the last feed stopped (``next_offset``) and checked again, as WorkItems on the
                  model's batch stream, while fewer than ``batch_window`` are unanswered; all answered:
                  ``finalizing``.  So Redis holds a window of the batch's work, whatever its length
    cancelling,   stop: the unanswered requests are cancelled (``Keys.cancels``), their results collected for
    expiry        ``batch_cancel_grace_s``; then the files are written, what never ran listed in the error file
                  (``batch_cancelled`` / ``batch_expired``)
    finalizing    the output and error files written (ids derived from the batch's: writing them again after a
                  crash replaces them), then the final status

Exactly once: a line is submitted (``XADD``) in the same fenced transaction that moves ``next_line`` (and
``next_offset``) past it and
records it as outstanding (``Keys.batch_outstanding``), so no line is submitted twice, by this feeder or the one
that resumes after it.  A line's request id is ``{batch_id}-{line}``, and the first result stored for an id wins
(a worker that dies mid-request has it run again, but one result is stored).  A line's answer is appended to the
output in the same fenced transaction that removes it from the outstanding lines, so it is appended once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import redis.asyncio as aioredis

from common import errors
from common.batchjob import BatchRecord, BatchRequest, BatchStatus, LineError, error_line, request_id
from common.filestore import PURPOSE_OUTPUT, FileRecord
from common.producer import BatchLine, check_batch_lines, output_line
from common.schemas import ANONYMOUS, PATHS, Result, WorkItem
from gateway import admission
from gateway.auth import ANONYMOUS_CALLER, Caller
from gateway.batch_records import now_s, transact
from gateway.state import GatewayState

log = logging.getLogger("mgpu.gateway.batch")

MAX_ERRORS = 1000  # per-line validation errors kept in a failed batch's record
PAGE = 500


class Run:
    """The steps of one batch under one lease ``token``."""

    def __init__(self, state: GatewayState, batch_id: str, token: str, renew: Any) -> None:
        self.state, self.id, self.token, self.renew = state, batch_id, token, renew
        self.s = state.settings
        self.k = state.settings.keys
        self.r: aioredis.Redis = state.redis
        self.input_file_id = ""  # set at each step, from the record
        self.cancels_sent = False
        self.progressed = False  # the last step collected or submitted something (its feeder goes on at once)
        self.collected_from = 0  # lines outstanding when the last collect began

    async def _transact(self, change: Any, also: Any = None) -> BatchRecord | None:
        return await transact(self.r, self.k, self.id, change, also=also, token=self.token)

    async def step(self, rec: BatchRecord) -> bool:
        """One step; True when the batch is finished (nothing more to do)."""
        self.progressed = False
        self.input_file_id = rec.input_file_id
        if rec.final:
            return True
        stopping = rec.status == BatchStatus.CANCELLING or rec.end_status in (BatchStatus.EXPIRED,
                                                                              BatchStatus.CANCELLED)
        if not stopping and time.time() >= rec.expires_at:
            await self._transact(lambda x: None if x.final or x.status == BatchStatus.CANCELLING else x.model_copy(
                update={"status": BatchStatus.FINALIZING, "finalizing_at": now_s(), "end_status": BatchStatus.EXPIRED,
                        "stop_since": time.time()}))
            return False
        if rec.status == BatchStatus.VALIDATING:
            await self.validate(rec)
            return False
        if stopping:
            return await self.stop(rec)
        if rec.status == BatchStatus.IN_PROGRESS:
            left = await self.collect(rec)
            fed = await self.feed(rec)
            self.progressed = fed or left < self.collected_from
            if not fed and rec.next_line >= rec.total and not await self.r.hlen(self.k.batch_outstanding(self.id)):
                await self._transact(lambda x: x.model_copy(update={
                    "status": BatchStatus.FINALIZING, "finalizing_at": now_s(), "end_status": BatchStatus.COMPLETED})
                    if x.status == BatchStatus.IN_PROGRESS else None)
            return False
        if rec.status == BatchStatus.FINALIZING:
            await self.finalize(rec)
            return True
        return False

    # ------------------------------------------------------------------ validating

    async def _caller(self, scope: str) -> Caller:
        if scope == ANONYMOUS:
            return ANONYMOUS_CALLER
        return Caller(scope, await self.state.api_keys.get(scope))

    async def validate(self, rec: BatchRecord) -> None:
        """Check the input file whole, read a block at a time (see the module doc): what the gateway holds is a
        block, the custom_ids seen and the first errors, whatever the file's size.  ServiceUnavailable (no live
        worker, Redis near its limit) leaves the batch validating, to be checked again."""
        problems: list[LineError] = []
        found = 0  # errors found, of which ``problems`` keeps the first MAX_ERRORS by line

        def problem(e: LineError) -> None:
            nonlocal found
            found += 1
            if len(problems) < MAX_ERRORS or e.line is None:  # lines come in order: the first ones are kept
                problems.append(e)

        requests, seen, caller, n, nonblank = 0, set[str](), await self._caller(rec.scope), 0, 0
        try:
            async with contextlib.aclosing(self._file_lines(0)) as lines:
                async for raw, _after in lines:
                    n += 1
                    if n % PAGE == 0:
                        await self.renew()
                        await asyncio.sleep(0)  # a big file does not hold the event loop
                    if not raw.strip():
                        continue
                    nonblank += 1
                    try:
                        text = raw.decode()
                    except UnicodeDecodeError:
                        problem(LineError(code="invalid_file", message="the line is not UTF-8 text", line=n))
                        continue
                    good, bad = check_batch_lines([text], max_body_bytes=self.s.max_body_bytes, seen=seen, first=n)
                    for p in bad:
                        problem(LineError(code=p.code, message=p.message, line=p.line, param=p.param))
                    for bl in good:
                        got = self._check(rec, bl.kind, bl.body, bl.line, bl.custom_id, caller, requests)
                        requests += 1
                        if isinstance(got, LineError):
                            problem(got)
        except errors.NotFound:
            problem(LineError(code="file_not_found", message=f"the input file {rec.input_file_id} is gone"))
        if nonblank > self.s.file_max_lines:
            problem(LineError(code="too_many_lines", message=f"at most {self.s.file_max_lines} lines"))
        if not requests and not found:
            problem(LineError(code="empty_file", message="the input file has no requests"))
        if problems:
            problems.sort(key=lambda e: e.line or 0)
            await self._transact(lambda x: x.model_copy(update={
                "status": BatchStatus.FAILED, "failed_at": now_s(), "errors": problems[:MAX_ERRORS]}),
                also=lambda p, _r: self._cleanup(p))
            log.info("batch failed validation", extra={"batch": self.id, "errors": found})
            return
        await self._transact(lambda x: x.model_copy(update={
            "total": requests, "in_progress_at": now_s(),
            "status": BatchStatus.IN_PROGRESS if x.status == BatchStatus.VALIDATING else x.status}))

    async def _file_lines(self, offset: int) -> AsyncGenerator[tuple[bytes, int], None]:
        """The input file's lines from byte ``offset`` (split at newlines only, blank ones too), each with the
        offset after it, read a block at a time; NotFound when the file is gone."""
        rec = await self.state.files.meta(self.input_file_id)
        if rec is None:
            raise errors.NotFound(f"the input file {self.input_file_id} is gone")
        pos, block = offset, 1 << 20
        while pos < rec.bytes:
            data = await self.state.files.read(self.input_file_id, pos, block)
            if not data:  # gone, or shorter than its record says
                raise errors.NotFound(f"the input file {self.input_file_id} is gone")
            cut = data.rfind(b"\n") + 1 if pos + len(data) < rec.bytes else len(data)  # whole lines only
            if cut == 0:  # a line longer than the block: read more at once
                block *= 2
                continue
            body = data[:cut]
            at = pos
            for raw in (body[:-1] if body.endswith(b"\n") else body).split(b"\n"):
                at += len(raw) + 1
                yield raw, min(at, rec.bytes)
            pos += cut

    async def _read_lines(self, offset: int, count: int) -> tuple[list[BatchLine], int]:
        """Up to ``count`` request lines of the input file from byte ``offset`` (blank lines skipped, as the
        validation skipped them), and the offset after the last one."""
        out: list[BatchLine] = []
        end = offset
        async with contextlib.aclosing(self._file_lines(offset)) as lines:
            async for raw, after in lines:
                end = after
                if not raw.strip():
                    continue
                good, _bad = check_batch_lines([raw.decode()], max_body_bytes=self.s.max_body_bytes)
                out += good  # checked whole while validating: every one is good
                if len(out) == count:
                    break
        return out, end

    def _check(self, rec: BatchRecord, kind: Any, body: dict[str, Any], line: int, custom_id: str, caller: Caller,
               index: int) -> BatchRequest | LineError:
        if PATHS[kind] != rec.endpoint:
            return LineError(code="invalid_url", message=f"url: must be the batch's endpoint, {rec.endpoint}",
                             line=line, param="url")
        try:
            f = admission.read_fields(kind, body)
            item, _ = admission.build_item(self.state, kind, body, f, request_id(self.id, index), caller)
        except errors.RequestError as exc:
            return LineError(code=exc.code or "invalid_request", message=exc.message, line=line,
                             param=f"body.{exc.param}" if exc.param else None)
        return BatchRequest(custom_id=custom_id, kind=kind, model=item.model, body={**item.body, "model": item.model},
                            n=item.n)

    def _cleanup(self, p: Any) -> None:
        """The batch's working keys, and its place among the active batches (in a finishing transaction)."""
        p.srem(self.k.batches_active, self.id)
        p.srem(self.k.file_batches(self.input_file_id), self.id)  # its input may be deleted (or expire) now
        p.delete(self.k.batch_outstanding(self.id))

    # ------------------------------------------------------------------ in progress

    async def feed(self, rec: BatchRecord) -> bool:
        """Submit the next lines while fewer than ``batch_window`` are unanswered; whether any was submitted."""
        room = self.s.batch_window - await self.r.hlen(self.k.batch_outstanding(self.id))
        upto = min(rec.total, rec.next_line + room)
        if room <= 0 or rec.next_line >= upto:
            return False
        lines, offset = await self._read_lines(rec.next_offset, upto - rec.next_line)
        if len(lines) != upto - rec.next_line:
            raise RuntimeError(f"batch {self.id}: the input file ends before line {upto} of {rec.total}")
        caller = await self._caller(rec.scope)
        checked = [(i, bl.custom_id, self._check(rec, bl.kind, bl.body, bl.line, bl.custom_id, caller, i))
                   for i, bl in enumerate(lines, start=rec.next_line)]
        # a line the fleet refuses now that it took while validating (its model's context changed): answered
        # as failed at once, not submitted
        refused = [json.dumps(error_line(cid, got.code, got.message)) for _i, cid, got in checked
                   if isinstance(got, LineError)]
        idx = [i for i, _cid, got in checked if not isinstance(got, LineError)]
        reqs = [got for _i, _cid, got in checked if not isinstance(got, LineError)]
        first = rec.next_line

        def change(x: BatchRecord) -> BatchRecord | None:
            if x.next_line != first or x.status != BatchStatus.IN_PROGRESS:
                return None  # changed meanwhile (cancelled): nothing submitted
            return x.model_copy(update={"next_line": upto, "next_offset": offset, "failed": x.failed + len(refused),
                                        **self._grow(x, "error", refused)})

        def items(x: BatchRecord) -> list[tuple[str, WorkItem]]:
            return [(self.k.batch_stream(q.model), WorkItem(id=request_id(self.id, i), kind=q.kind, model=q.model,
                                                            body=q.body, n=q.n, deadline=x.expires_at, scope=x.scope))
                    for i, q in zip(idx, reqs, strict=True)]

        def also(p: Any, x: BatchRecord) -> None:
            if not self.k.cluster:
                for stream, item in items(x):
                    p.xadd(stream, item.to_fields())
            if idx:
                p.hset(self.k.batch_outstanding(self.id), mapping={
                    str(i): json.dumps({"m": q.model, "c": q.custom_id}) for i, q in zip(idx, reqs, strict=True)})
            self._append(p, x, "error", refused)

        if self.k.cluster:
            # the models' streams are on other slots than the batch's keys: submit first, then record it.  A
            # feeder that dies in between has the lines submitted again by the next one (the same request ids:
            # run twice at worst, one result stored, one output line)
            async with self.r.pipeline(transaction=False) as p:
                for stream, item in items(rec):
                    p.xadd(stream, item.to_fields())
                await p.execute()
        after = await self._transact(change, also)
        return after is not None and after.next_line == upto

    async def collect(self, rec: BatchRecord, stop_code: str | None = None) -> int:
        """Append the results of outstanding lines to the output or error list; how many are still outstanding.
        With ``stop_code`` (the batch is stopping), a request cancelled or past its deadline is listed as never
        run, with that code."""
        held = {int(i): json.loads(v) for i, v in (await self.r.hgetall(self.k.batch_outstanding(self.id))).items()}
        out = {i: str(v["m"]) for i, v in held.items()}
        self.collected_from = len(out)
        if not out:
            return 0
        lines = sorted(out)
        found: dict[int, Result] = {}
        for start in range(0, len(lines), PAGE):
            part = lines[start:start + PAGE]
            names = [self.k.result(out[i], request_id(self.id, i)) for i in part]
            raws = await (self.r.mget_nonatomic(names) if self.k.cluster  # type: ignore[attr-defined]
                          else self.r.mget(names))
            for i, raw in zip(part, raws, strict=True):
                if raw is not None:
                    found[i] = Result.model_validate_json(raw)
        if not found:
            return len(out)
        cids = {i: str(held[i]["c"]) for i in found}
        ok: list[str] = []
        bad: list[str] = []
        failed = 0
        for i, res in found.items():
            rid = request_id(self.id, i)
            code = res.error.code if res.error is not None else None
            if stop_code is not None and code in ("cancelled", "deadline_exceeded"):
                bad.append(json.dumps(error_line(cids[i], stop_code, _STOP_MESSAGES[stop_code])))
            elif res.error is None and res.status == 200:
                ok.append(json.dumps(output_line(cids[i], rid, res)))
            else:
                bad.append(json.dumps(output_line(cids[i], rid, res)))
                failed += 1

        # what the collected lines leave behind goes with them, so that Redis holds a window's worth of a batch's
        # work however long the batch (its files aside): their results
        results = [self.k.result(out[i], request_id(self.id, i)) for i in found]

        def also(p: Any, _x: BatchRecord) -> None:
            p.hdel(self.k.batch_outstanding(self.id), *(str(i) for i in found))
            if not self.k.cluster:  # on a cluster the results are in their models' slots: deleted after
                p.delete(*results)
            self._append(p, _x, "output", ok)
            self._append(p, _x, "error", bad)

        after = await self._transact(lambda x: x.model_copy(update={
            "completed": x.completed + len(ok), "failed": x.failed + failed, **self._grow(x, "output", ok),
            **self._grow(x, "error", bad)}), also)
        if self.k.cluster and after is not None:
            await self.r.delete(*results)  # redis-py splits it by slot
        return len(out) - len(found)

    # ------------------------------------------------------------------ stopping and finishing

    async def stop(self, rec: BatchRecord) -> bool:
        """A cancelled or expired batch: cancel what is outstanding (once per feeder: a resumed one sends the
        cancels again, which is harmless), collect until nothing is or the grace passed, then finish."""
        code = "batch_expired" if rec.end_status == BatchStatus.EXPIRED else "batch_cancelled"
        if not self.cancels_sent:
            outstanding = await self.r.hkeys(self.k.batch_outstanding(self.id))
            for start in range(0, len(outstanding), PAGE):
                async with self.r.pipeline(transaction=False) as p:
                    for i in outstanding[start:start + PAGE]:
                        p.xadd(self.k.cancels, {"r": request_id(self.id, int(i))}, maxlen=10_000, approximate=True)
                    await p.execute()
            self.cancels_sent = True
        left = await self.collect(rec, stop_code=code)
        if left and time.time() < (rec.stop_since or 0) + self.s.batch_cancel_grace_s:
            return False
        await self.finalize(rec, code)
        return True

    async def _never_ran(self, rec: BatchRecord) -> list[str]:
        """The custom ids of the lines that got no answer: outstanding ones, and those never submitted."""
        held = [json.loads(v) for _i, v in sorted((int(i), v) for i, v in
                                                   (await self.r.hgetall(self.k.batch_outstanding(self.id))).items())]
        rest = rec.total - rec.next_line
        lines, _ = await self._read_lines(rec.next_offset, rest) if rest > 0 else ([], 0)
        return [str(v["c"]) for v in held] + [bl.custom_id for bl in lines]

    # ------------------------------------------------------------------ the output and error files
    # Collected lines are appended to the output and error files in the fenced transaction that takes them off
    # the outstanding lines (the record tracks each file's length), so the files are built as the batch runs and
    # never held twice, in Redis or in the gateway; finalizing only lists the unanswered lines and seals them.

    def _file_id(self, what: str) -> str:
        return f"file-{self.id.removeprefix('batch_')}-{'output' if what == 'output' else 'errors'}"

    @staticmethod
    def _grow(x: BatchRecord, what: str, lines: list[str]) -> dict[str, int]:
        """The record's new length of the ``what`` file with ``lines`` appended."""
        return {f"{what}_bytes": getattr(x, f"{what}_bytes") + sum(len(ln.encode()) + 1 for ln in lines),
                f"{what}_lines": getattr(x, f"{what}_lines") + len(lines)}

    def _append(self, p: Any, new: BatchRecord, what: str, lines: list[str]) -> None:
        """Queue the append of ``lines`` to the ``what`` file; ``new`` is the record with them counted."""
        if lines:
            data = "".join(ln + "\n" for ln in lines).encode()
            self.state.files.append(p, self._file_id(what), getattr(new, f"{what}_bytes") - len(data), data)

    async def finalize(self, rec: BatchRecord, code: str | None = None) -> None:
        """List what got no answer in the error file (once), seal the files, then the final status."""
        if not rec.unanswered_listed:
            code = code or "batch_expired"
            never = [json.dumps(error_line(c, code, _STOP_MESSAGES[code])) for c in await self._never_ran(rec)]
            await self.renew()
            rec = await self._transact(lambda x: None if x.unanswered_listed else x.model_copy(
                update={"unanswered_listed": True, **self._grow(x, "error", never)}),
                also=lambda p, x: self._append(p, x, "error", never)) or rec
        out_id = await self._seal(rec, "output")
        err_id = await self._seal(rec, "error")
        end = rec.end_status or BatchStatus.CANCELLED
        if rec.status == BatchStatus.CANCELLING:
            end = BatchStatus.CANCELLED
        stamp = {BatchStatus.COMPLETED: "completed_at", BatchStatus.EXPIRED: "expired_at",
                 BatchStatus.CANCELLED: "cancelled_at"}[end]
        await self._transact(lambda x: x.model_copy(update={
            "status": end, stamp: now_s(), "output_file_id": out_id, "error_file_id": err_id}),
            also=self._finish)
        log.info("batch finished", extra={"batch": self.id, "status": str(end), "completed": rec.completed,
                                          "failed": rec.failed})

    def _finish(self, p: Any, _x: BatchRecord) -> None:
        self._cleanup(p)
        p.delete(self.k.batch_lease(self.id))

    async def _seal(self, rec: BatchRecord, what: str) -> str | None:
        size, lines = getattr(rec, f"{what}_bytes"), getattr(rec, f"{what}_lines")
        if not lines:
            return None
        fid = self._file_id(what)
        name = f"{rec.id}_{'output' if what == 'output' else 'errors'}.jsonl"
        now = int(time.time())  # the anchor of output_expires_after: the file's creation (OpenAI's)
        expires = now + rec.output_expires_after_s if rec.output_expires_after_s else None
        await self.state.files.seal(FileRecord(id=fid, bytes=size, filename=name, purpose=PURPOSE_OUTPUT,
                                               scope=rec.scope, lines=lines, created_at=now, expires_at=expires))
        return fid


_STOP_MESSAGES = {"batch_expired": "This request could not be executed before the completion window expired.",
                  "batch_cancelled": "This request was not executed: the batch was cancelled."}

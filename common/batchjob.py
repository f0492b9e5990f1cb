"""The typed records of a batch (OpenAI's Batch API) as mgpu keeps them in Redis, and the lines it writes.

* :class:`BatchRecord`: one batch (``Keys.batch``): what it asked for, its status and timestamps, its counts,
  where its feeder is in its input (``next_line``), its per-line validation errors, its output files.
  :meth:`BatchRecord.to_openai` is the object ``GET /v1/batches/{id}`` answers (OpenAI's ``Batch``).
* :class:`BatchRequest`: one checked line of its input file, what the feeder submits.
* :class:`LineError`: one line's validation error (OpenAI's ``errors.data[]``).
* :func:`error_line`: a line of the error file for a request that never got a response (``batch_expired``,
  ``batch_cancelled``); a request that got a non-200 response is listed there in the output line's shape.

The lifecycle (OpenAI's)::

    validating ──> in_progress ──> finalizing ──> completed
        │               │ │
        └──> failed     │ └──> (expires_at passed) ──> finalizing ──> expired
                        └──> (cancel) cancelling ──> cancelled     (validating can be cancelled too)
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from common.batch_api import Batch, BatchErrorData, BatchErrors, BatchRequestCounts
from common.schemas import Kind


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


FINAL = frozenset({BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED, BatchStatus.CANCELLED})


class LineError(BaseModel):
    code: str
    message: str
    line: int | None = None  # 1-based, as OpenAI counts
    param: str | None = None


class BatchRequest(BaseModel):
    """One line of a batch, checked: what its WorkItem is built from (``id`` is ``{batch_id}-{line}``)."""

    custom_id: str
    kind: Kind
    model: str
    body: dict[str, Any]
    n: int = 1


class BatchRecord(BaseModel):
    """A batch, as stored (``Keys.batch``).  Times are unix seconds (ints, as OpenAI's)."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    output_expires_after_s: int | None = None  # the output and error files expire this long after they are written
    scope: str  # the caller's scope: only it sees the batch
    status: BatchStatus = BatchStatus.VALIDATING
    created_at: int = Field(default_factory=lambda: int(time.time()))
    expires_at: float  # unix seconds (a float: a test's window may be shorter than a second's rounding)
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0  # answered with status 200
    failed: int = 0  # answered with an error (not cancelled, not expired)
    next_line: int = 0  # lines before it were submitted (or are being answered)
    next_offset: int = 0  # the byte offset in the input file where line ``next_line`` starts (or a blank before it)
    output_bytes: int = 0  # the output file, appended as lines are collected (common.filestore.FileStore.append)
    output_lines: int = 0
    error_bytes: int = 0  # the error file, likewise
    error_lines: int = 0
    unanswered_listed: bool = False  # the lines that got no answer are in the error file (finalizing)
    errors: list[LineError] = Field(default_factory=list)
    output_file_id: str | None = None
    error_file_id: str | None = None
    end_status: BatchStatus | None = None  # while finalizing: what it ends as (completed, expired, cancelled)
    stop_since: float | None = None  # when cancelling or expiry began (the grace for running requests)

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def to_openai(self) -> dict[str, Any]:
        return self.to_object().model_dump(mode="json")

    def to_object(self) -> Batch:
        """OpenAI's ``Batch`` object."""
        return Batch(
            id=self.id, endpoint=self.endpoint, input_file_id=self.input_file_id,
            completion_window=self.completion_window, status=self.status.value, output_file_id=self.output_file_id,
            error_file_id=self.error_file_id, created_at=self.created_at, in_progress_at=self.in_progress_at,
            expires_at=int(self.expires_at), finalizing_at=self.finalizing_at, completed_at=self.completed_at,
            failed_at=self.failed_at, expired_at=self.expired_at, cancelling_at=self.cancelling_at,
            cancelled_at=self.cancelled_at,
            request_counts=BatchRequestCounts(total=self.total, completed=self.completed, failed=self.failed),
            errors=BatchErrors(data=[BatchErrorData(**e.model_dump()) for e in self.errors]) if self.errors else None,
            metadata=self.metadata)


def request_id(batch_id: str, line: int) -> str:
    """The request id of a batch's line (0-based index): deterministic, so a resumed feeder finds its result."""
    return f"{batch_id}-{line}"


def error_line(custom_id: str, code: str, message: str) -> dict[str, Any]:
    """A line of the error file for a request that got no response (OpenAI: ``response`` null, ``error`` set)."""
    return {"id": None, "custom_id": custom_id, "response": None, "error": {"code": code, "message": message}}

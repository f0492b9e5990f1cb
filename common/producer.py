"""Writing work straight to a model's batch stream, and reading its results by id: the producer API on the
shared schema (``common.schemas.WorkItem`` in, ``common.schemas.Result`` out) that ``mgpu batch submit`` uses.

Batch work waits on ``Keys.batch_stream(model)``; workers take it only in slots that interactive work leaves
free beyond their reserve (``batch_reserve_slots``).  A request's result appears at ``Keys.result(model, id)``
for ``result_ttl_s``.  An entry that is not a valid WorkItem is answered with an error result (when it has an
id) and dead-lettered, never lost silently.

    from common.producer import Producer
    from common.schemas import WorkItem

    p = Producer(redis.Redis.from_url(url), Keys(), "my-model")
    p.submit(WorkItem(id="job-1", kind="chat", model="my-model",
                      body={"model": "my-model", "messages": [{"role": "user", "content": "hi"}]}))
    res = p.results(["job-1"])["job-1"]  # None until it is answered
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from common.keys import Keys
from common.schemas import PATHS, Kind, Result, WorkItem

# the endpoints a batch line may name (OpenAI's Batch API line: custom_id, method, url, body)
BATCH_URLS: dict[str, Kind] = {PATHS[k]: k for k in ("chat", "completion", "embedding")}


@dataclass(frozen=True)
class BatchLine:
    custom_id: str
    kind: Kind
    body: dict[str, Any]
    line: int = 0  # its number in the file, from 1


@dataclass(frozen=True)
class LineProblem:
    """Why one line of a batch file is not valid: its number (from 1), a code (OpenAI's batch error codes where
    there is one) and a message."""

    line: int
    code: str
    message: str
    param: str | None = None

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}"


def _check_line(n: int, raw: str, seen: set[str], max_body_bytes: int) -> BatchLine | LineProblem:
    try:
        d = json.loads(raw)
    except ValueError as exc:
        return LineProblem(n, "invalid_json_line", f"not JSON ({exc})")
    if not isinstance(d, dict):
        return LineProblem(n, "invalid_json_line", "not a JSON object")
    cid, method, url, body = d.get("custom_id"), d.get("method"), d.get("url"), d.get("body")
    if not isinstance(cid, str) or not cid:
        return LineProblem(n, "missing_required_parameter", "custom_id: a non-empty string is required", "custom_id")
    if cid in seen:
        return LineProblem(n, "duplicate_custom_id", f"custom_id {cid!r} is not unique", "custom_id")
    if method != "POST":
        return LineProblem(n, "invalid_method", "method: must be POST", "method")
    if url not in BATCH_URLS:
        return LineProblem(n, "invalid_url", f"url: one of {', '.join(BATCH_URLS)}", "url")
    if not isinstance(body, dict):
        return LineProblem(n, "invalid_request", "body: a JSON object is required", "body")
    if body.get("stream"):
        return LineProblem(n, "invalid_request", "body.stream: a batch request cannot stream", "body.stream")
    if len(json.dumps(body)) > max_body_bytes:
        return LineProblem(n, "invalid_request", f"body: larger than {max_body_bytes} bytes", "body")
    seen.add(cid)
    return BatchLine(cid, BATCH_URLS[url], body, n)


def check_batch_lines(lines: Iterable[str], *, max_body_bytes: int = 1 << 20, seen: set[str] | None = None,
                      first: int = 1) -> tuple[list[BatchLine], list[LineProblem]]:
    """The valid lines of an OpenAI batch JSONL file, and what is wrong with each other line (blank lines are
    skipped; ``lines`` is line ``first`` on).  A file with any problem should be refused whole, as OpenAI's Batch
    API does.  ``seen``: the custom_ids of the lines before (a file checked in parts), added to."""
    out: list[BatchLine] = []
    problems: list[LineProblem] = []
    seen = set() if seen is None else seen
    for n, raw in enumerate(lines, start=first):
        if not raw.strip():
            continue
        got = _check_line(n, raw, seen, max_body_bytes)
        (problems if isinstance(got, LineProblem) else out).append(got)  # type: ignore[arg-type]
    return out, problems


def parse_batch_lines(lines: Iterable[str], *, max_body_bytes: int = 1 << 20) -> tuple[list[BatchLine], list[str]]:
    """:func:`check_batch_lines` with each problem as one message (its line number first)."""
    out, problems = check_batch_lines(lines, max_body_bytes=max_body_bytes)
    return out, [str(p) for p in problems]


class Producer:
    """Submits WorkItems to one model's batch stream and reads their results (a blocking client)."""

    def __init__(self, r: redis.Redis, keys: Keys, model: str) -> None:
        self.r = r
        self.keys = keys
        self.model = model

    def submit(self, items: Sequence[WorkItem]) -> None:
        """Append ``items`` to the batch stream in one round trip."""
        p = self.r.pipeline(transaction=False)
        for item in items:
            p.xadd(self.keys.batch_stream(self.model), item.to_fields())  # type: ignore[arg-type]
        p.execute()

    def results(self, request_ids: Sequence[str]) -> dict[str, Result | None]:
        """Each id's result, or None while it is not answered (one round trip)."""
        if not request_ids:
            return {}
        raw = self.r.mget([self.keys.result(self.model, rid) for rid in request_ids])
        return {rid: None if v is None else Result.model_validate_json(v) for rid, v in zip(request_ids, raw)}

    def backlog(self) -> int:
        """Entries on the batch stream, waiting or running."""
        return int(self.r.xlen(self.keys.batch_stream(self.model)))


def output_line(custom_id: str, request_id: str, res: Result) -> dict[str, Any]:
    """A result as a line of OpenAI's batch output file."""
    if res.error is not None:
        status, body = res.error.status, {"error": res.error.model_dump(exclude_none=True)}
    else:
        status, body = res.status, res.body or {}
    return {"id": f"batch_req_{request_id}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}

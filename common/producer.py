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


def parse_batch_lines(lines: Iterable[str], *, max_body_bytes: int = 1 << 20) -> tuple[list[BatchLine], list[str]]:
    """The lines of an OpenAI batch JSONL file, and one message per line that is not valid (its number
    first).  A file with any error should be refused whole, as OpenAI's Batch API does."""
    out: list[BatchLine] = []
    errors: list[str] = []
    seen: set[str] = set()
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
        except ValueError as exc:
            errors.append(f"line {n}: not JSON ({exc})")
            continue
        if not isinstance(d, dict):
            errors.append(f"line {n}: not a JSON object")
            continue
        cid, method, url, body = d.get("custom_id"), d.get("method"), d.get("url"), d.get("body")
        if not isinstance(cid, str) or not cid:
            errors.append(f"line {n}: custom_id: a non-empty string is required")
        elif cid in seen:
            errors.append(f"line {n}: custom_id {cid!r} is not unique")
        elif method != "POST":
            errors.append(f"line {n}: method: must be POST")
        elif url not in BATCH_URLS:
            errors.append(f"line {n}: url: one of {', '.join(BATCH_URLS)}")
        elif not isinstance(body, dict):
            errors.append(f"line {n}: body: a JSON object is required")
        elif body.get("stream"):
            errors.append(f"line {n}: body.stream: a batch request cannot stream")
        elif len(json.dumps(body)) > max_body_bytes:
            errors.append(f"line {n}: body: larger than {max_body_bytes} bytes")
        else:
            seen.add(cid)
            out.append(BatchLine(cid, BATCH_URLS[url], body))
    return out, errors


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

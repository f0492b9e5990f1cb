"""``mgpu status`` lists the batches in progress (done/total, failures, time to expiry) and the preemptions."""

from __future__ import annotations

from common.batchjob import BatchRecord, BatchStatus
from ops.status import Snapshot, render


def test_status_shows_batches_and_preemptions() -> None:
    b = BatchRecord(id="batch_x", input_file_id="file-1", endpoint="/v1/chat/completions", scope="anon",
                    status=BatchStatus.IN_PROGRESS, expires_at=1000.0 + 1800, total=500, completed=120, failed=3)
    text = render(Snapshot(at=1000.0, batches=[b], preempted=7))
    assert "BATCHES  1 running; 7 batch requests preempted by interactive ones" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("batch_x"))
    assert row.split() == ["batch_x", "in_progress", "123/500", "3", "30.0m"]
    assert "BATCHES" not in render(Snapshot(at=1000.0))

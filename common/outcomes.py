"""Request outcomes, the ``status`` label of the request counters (gateway and workers)."""

from __future__ import annotations

from common.errors import MgpuError
from common.schemas import ErrorInfo

OUTCOMES = ("success", "client_error", "timeout", "cancelled", "failed", "dead_lettered")


def outcome_of(err: MgpuError | ErrorInfo | None) -> str:
    """success | client_error (4xx, queue full included) | timeout | cancelled | failed | dead_lettered."""
    if err is None:
        return "success"
    code, status = err.code, err.status
    if code == "dead_lettered":
        return "dead_lettered"
    if code == "cancelled" or status == 499:
        return "cancelled"
    if code == "deadline_exceeded" or status == 504:
        return "timeout"
    if 400 <= status < 500:
        return "client_error"
    return "failed"

"""The ids of requests cancelled lately, which the worker's jobs check before they run one."""

from __future__ import annotations

from collections import OrderedDict


class RecentIds:
    """Request ids seen in the last ``ttl_s`` seconds (at most ``cap``): O(1) to add, test and expire."""

    def __init__(self, ttl_s: float, cap: int = 200_000) -> None:
        self.ttl_s = ttl_s
        self.cap = cap
        self._seen: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str, now: float) -> None:
        self._seen[request_id] = now
        self._seen.move_to_end(request_id)
        horizon = now - self.ttl_s
        while self._seen and (len(self._seen) > self.cap or next(iter(self._seen.values())) < horizon):
            self._seen.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._seen

    def __len__(self) -> int:
        return len(self._seen)

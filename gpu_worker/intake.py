"""What a worker reads next, and how much: its streams in priority order, fair turns between the lanes, and
the slots kept for lanes that have nothing running here (docs/security.md, "Fair sharing").

The gateway puts each API key's requests in a lane of their own while lanes last (``Keys.lanes``; lane 0 is
the model's shared stream, where batch producers and requests without a key go).  A worker reads:

* with a blocking ``XREADGROUP`` over its own stream and the lanes, when they were drained at its last read:
  ``COUNT`` is the free slots shared out over the streams, so that a wake-up never takes more than there is
  room for and, once the read shows that a stream may hold more, the next read is
* the PULL script (``lua.PULL``), which takes one entry from each lane in turn, starting after the lane it
  last took from, up to the free slots.  A flooding key's backlog waits in its own lane, so another key's
  request is taken at the next free slot, not after the backlog.

Taking turns is not enough when one key keeps every slot busy: another key's request would still wait for a
slot to free.  So while two or more lanes had work here in the last ``fair_window_s``, lanes that already
have requests running here (busy lanes) may not take the last ``reserve`` free slots, which stay for a lane
that has none: a light key is served at once, and a lone flood (one active lane) still gets every slot.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

SHORT_BLOCK_MS = 20


@dataclass(frozen=True)
class Plan:
    """One read: the streams, which are busy lanes, and how many entries busy lanes may take together."""

    streams: list[str]
    busy: list[bool]
    budget: int


class FairIntake:
    def __init__(self, own: str, lanes: list[str], *, reserve: int, window_s: float) -> None:
        self.own = own
        self.lanes: list[str] = []
        self._lane_set: set[str] = set()
        self.add_lanes(lanes)
        self.reserve = reserve
        self.window_s = window_s
        self.first = 0  # the lane the next PULL starts at
        self.more = False  # the last read may have left entries: PULL next
        self._seen: dict[str, float] = {}  # lane -> when an entry was last taken from it here

    def add_lanes(self, lanes: Iterable[str]) -> None:
        for lane in lanes:
            if lane not in self._lane_set:
                self.lanes.append(lane)
                self._lane_set.add(lane)

    @property
    def streams(self) -> list[str]:
        """Every stream this worker reads, its own first."""
        return [self.own, *self.lanes]

    def taken(self, stream: str, now: float | None = None) -> None:
        if stream in self._lane_set:
            self._seen[stream] = time.monotonic() if now is None else now

    def active(self, now: float | None = None) -> int:
        """Lanes that had work here in the last ``window_s``."""
        now = time.monotonic() if now is None else now
        return sum(1 for t in self._seen.values() if now - t < self.window_s)

    def plan(self, free: int, running: Counter[str], now: float | None = None) -> Plan:
        """The read for ``free`` slots, with ``running`` the requests running here per stream."""
        keep = self.reserve if self.active(now) >= 2 else 0
        busy = [s in self._lane_set and running.get(s, 0) > 0 for s in self.streams]
        return Plan(self.streams, busy, max(0, free - keep))

    def blocking_read(self, plan: Plan, free: int, block_ms: int) -> tuple[list[str], int, int]:
        """The streams, the per-stream COUNT and the BLOCK of a blocking read: busy lanes only while the budget
        allows.  Without them the read must not outlast a slot freeing up (the budget would grow, and their
        backlog would not wake it): it blocks for a short while only."""
        streams = [s for s, b in zip(plan.streams, plan.busy, strict=True) if not b or plan.budget > 0]
        block = block_ms if len(streams) == len(plan.streams) else min(block_ms, SHORT_BLOCK_MS)
        return streams, max(1, free // len(streams)), block

"""What a worker reads next, and how much: its streams in priority order, fair turns between the lanes, and
the slots kept for lanes below their share of them (docs/security.md, "Fair sharing").

The gateway puts each API key's requests in a lane of their own while lanes last (``Keys.lanes``; lane 0 is
the model's shared stream, where batch producers and requests without a key go).  A worker reads:

* with a blocking ``XREADGROUP`` over its own stream and the lanes, when they were drained at its last read:
  ``COUNT`` is the free slots shared out over the streams, so that a wake-up never takes more than there is
  room for and, once the read shows that a stream may hold more, the next read is
* the PULL script (``lua.PULL``), which takes one entry from each lane in turn, starting after the lane it
  last took from, up to the free slots.  A flooding key's backlog waits in its own lane, so another key's
  request is taken at the next free slot, not after the backlog.

Taking turns is not enough when one key keeps every slot busy: another key's request would still wait for a
slot to free.  So a lane that has its share of this worker's slots running here (``slots`` over the lanes
active in the last ``fair_window_s``, counting itself) may not take the last ``keep`` free slots, which stay
for lanes below their share: a light key's request starts at once.  ``keep`` follows the light keys' demand:
one more than the most requests that lanes other than the largest had running here at once in the window, at
least ``reserve``, at most half the slots.  A lone flood (one active lane) has every slot as its share, so a
single tenant loses nothing.  ``reserve`` 0 turns this off (first come, first served within the turns).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

SHORT_BLOCK_MS = 20


@dataclass(frozen=True)
class Plan:
    """One read: the streams, each one's requests running here and share of the slots, and the free slots
    that streams at their share may not take."""

    streams: list[str]
    running: list[int]
    share: list[int]
    keep: int

    def capped(self, i: int) -> bool:
        return self.running[i] >= self.share[i]


class FairIntake:
    def __init__(self, own: str, lanes: list[str], *, reserve: int, window_s: float, slots: int = 1) -> None:
        self.own = own
        self.lanes: list[str] = []
        self._lane_set: set[str] = set()
        self.add_lanes(lanes)
        self.reserve = reserve
        self.window_s = window_s
        self.slots = slots
        self.first = 0  # the lane the next PULL starts at
        self.more = False  # the last read may have left entries: PULL next
        self._seen: dict[str, float] = {}  # lane -> when an entry was last taken from it here
        self._peaks: dict[int, int] = {}  # second -> most requests running outside the largest lane

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

    def active(self, now: float) -> set[str]:
        """Lanes that had work here in the last ``window_s``."""
        return {lane for lane, t in self._seen.items() if now - t < self.window_s}

    def keep(self, running: Counter[str], now: float) -> int:
        if self.reserve <= 0:
            return 0
        counts = [running.get(lane, 0) for lane in self.lanes]
        sec = int(now)
        self._peaks[sec] = max(self._peaks.get(sec, 0), sum(counts) - max(counts, default=0))
        for old in [t for t in self._peaks if t <= sec - self.window_s]:
            del self._peaks[old]
        return min(self.slots // 2, max(self.reserve, max(self._peaks.values()) + 1))

    def plan(self, running: Counter[str], now: float | None = None) -> Plan:
        """The read, with ``running`` the requests running here per stream."""
        now = time.monotonic() if now is None else now
        active = self.active(now)
        keep = self.keep(running, now)
        share = [self.slots] + [max(1, self.slots // len(active | {lane})) if keep else self.slots
                                for lane in self.lanes]
        return Plan(self.streams, [running.get(s, 0) for s in self.streams], share, keep)

    def blocking_read(self, plan: Plan, free: int, block_ms: int) -> tuple[list[str], int, int]:
        """The streams, the per-stream COUNT and the BLOCK of a blocking read: streams at their share only while
        more than ``keep`` slots are free.  Without them the read must not outlast a slot freeing up (their
        backlog would not wake it): it blocks for a short while only."""
        streams = [s for i, s in enumerate(plan.streams) if free > plan.keep or not plan.capped(i)]
        block = block_ms if len(streams) == len(plan.streams) else min(block_ms, SHORT_BLOCK_MS)
        return streams, max(1, free // len(streams)), block

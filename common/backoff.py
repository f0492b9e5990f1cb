"""The one retry delay of mgpu's loops that ride out a Redis outage: exponential, capped, reset on success."""

from __future__ import annotations

import asyncio
import time


class Backoff:
    """``await backoff.wait()`` sleeps ``base``, then twice as long each time, up to ``cap``;
    ``reset()`` after a success.  ``give_up_s``: :meth:`expired` says when retrying should stop."""

    def __init__(self, base: float = 0.05, cap: float = 1.0, *, give_up_s: float | None = None) -> None:
        self.base = base
        self.cap = cap
        self.delay = base
        self.give_up_s = give_up_s
        self._started: float | None = None

    @property
    def next_delay(self) -> float:
        return self.delay

    def reset(self) -> None:
        self.delay = self.base
        self._started = None

    def expired(self) -> bool:
        """Whether ``give_up_s`` has passed since the first failure after the last reset."""
        if self._started is None:
            self._started = time.monotonic()
        return self.give_up_s is not None and time.monotonic() - self._started > self.give_up_s

    def step(self) -> float:
        """The delay to wait now; the next one is twice as long (up to ``cap``)."""
        if self._started is None:
            self._started = time.monotonic()
        delay, self.delay = self.delay, min(self.delay * 2, self.cap)
        return delay

    async def wait(self) -> None:
        await asyncio.sleep(self.step())

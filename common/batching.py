"""Coalesce many concurrent Lua-script calls into pipelined round trips.

Callers ``await batcher.call(keys, args)`` as if they ran the script alone.  A call that finds
the batcher idle goes out at once, from the caller's own task (no extra event-loop turn); calls
made while a round trip is in flight queue up and go out together in the next one, so under heavy
load a round trip carries hundreds of calls.

With ``wait=(replicas, timeout_ms)`` every round trip ends in ``WAIT replicas timeout_ms`` on the same
connection, and each caller gets ``(result, replicas that confirmed)``: the writes are on that many
replicas before the caller goes on (docs/deployment.md, "Redis high availability").

Given a :class:`common.redis_pipe.RedisPipe` (every client but a cluster's), the round trips go through it
rather than through redis-py's command path: the same replies for about half the caller's CPU.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from common.redis_pipe import RedisPipe


class ScriptBatcher:
    def __init__(self, client: aioredis.Redis, script: str, *, max_batch: int = 512,
                 wait: tuple[int, int] | None = None, pipe: RedisPipe | None = None) -> None:
        self.client = client
        self.pipe = pipe
        self.wait = wait
        self.source = script
        self.script = client.register_script(script)
        self.max_batch = max_batch
        self._queue: list[tuple[list[str], list[Any], asyncio.Future[Any]]] = []
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # a round trip is in flight (inline or in the flush task)

    async def call(self, keys: list[str], args: list[Any]) -> Any:
        if not self._busy:
            self._busy = True
            try:
                if self.wait is not None or self.pipe is not None:
                    (res,) = await self._round_trip([(keys, args, None)])
                    if isinstance(res, Exception):
                        raise res
                    return res
                return await self.script(keys=keys, args=args)
            finally:
                self._busy = False
                if self._queue:
                    self._spawn()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, args, fut))
        if not self._busy:
            self._spawn()
        return await fut

    def _spawn(self) -> None:
        self._busy = True
        self._task = asyncio.create_task(self._flush())

    __call__ = call

    async def _evalsha_all(self, batch: list[tuple[list[str], list[Any], Any]]) -> list[Any]:
        if self.pipe is not None:
            sha = self.script.sha
            cmds: list[tuple[Any, ...]] = [("EVALSHA", sha, len(keys), *keys, *args) for keys, args, _ in batch]
            if self.wait is not None:
                cmds.append(("WAIT", *self.wait))
            return await self.pipe.execute(cmds)
        async with self.client.pipeline(transaction=False) as p:
            for keys, args, _ in batch:
                p.evalsha(self.script.sha, len(keys), *keys, *args)
            if self.wait is not None:
                p.execute_command("WAIT", *self.wait)
            return await p.execute(raise_on_error=False)  # type: ignore[no-any-return]

    async def _round_trip(self, batch: list[tuple[list[str], list[Any], Any]]) -> list[Any]:
        """Every call of ``batch`` in one pipeline: their results (an error as its exception), each paired
        with the replicas' count when ``wait`` is set.  Reloads the script once if Redis lost it."""
        results = await self._evalsha_all(batch)
        if any(isinstance(r, NoScriptError) for r in results):  # Redis restarted: load and redo
            await self.client.script_load(self.source)
            results = await self._evalsha_all(batch)
        if self.wait is None:
            return results
        acks = results.pop()  # an error here is no confirmation: the callers' refusal path runs (not a raise,
        replicas = 0 if isinstance(acks, Exception) else int(acks)  # which would leave their enqueues running)
        return [r if isinstance(r, Exception) else (r, replicas) for r in results]

    async def _flush(self) -> None:
        try:
            await self._flush_queue()
        finally:
            self._busy = False

    async def _flush_queue(self) -> None:
        while self._queue:
            batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
            try:
                if len(batch) == 1 and self.wait is None and self.pipe is None:
                    keys, args, fut = batch[0]
                    res = await self.script(keys=keys, args=args)
                    if not fut.done():
                        fut.set_result(res)
                    continue
                results = await self._round_trip(batch)
                for (_, _, fut), res in zip(batch, results):
                    if fut.done():
                        continue
                    if isinstance(res, Exception):
                        fut.set_exception(res)
                    else:
                        fut.set_result(res)
            except BaseException as exc:  # the round trip failed: every caller in it learns why
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
                if not isinstance(exc, Exception):
                    for _, _, fut in self._queue:
                        if not fut.done():
                            fut.set_exception(RuntimeError("batcher cancelled"))
                    self._queue.clear()
                    raise

"""The load generator's runner: :func:`run_load` drives one :class:`bench.workload.BenchConfig`
against an HTTP target (through a :class:`bench.client.Client`) or an in-process
:class:`gpu_worker.engine.sim.SimEngine`, and returns a :class:`bench.result.BenchResult`.

Two load modes:

* **open loop** (``rate``): arrivals are a seeded Poisson process scheduled in advance,
  independent of completions.  Latency and TTFT count from the *scheduled* arrival time, so a
  request that the generator (or a full in-flight limit) could only send late is charged for the
  wait: no coordinated omission.  How late sends were (``lateness``) shows whether the generator
  itself kept up.
* **closed loop** (``concurrency``): ``C`` clients each send a request, wait for it, repeat.

In-process mode drives the sim engine with the same schedule and request mix, so that ``HTTP
percentile - in-process percentile`` is the cost the serving path adds.  ``procs`` splits the load
over that many processes (one shard each) and merges their raw samples.

Python use (a scenario harness)::

    result = await run_load(BenchConfig(url=..., rate=50, duration=30, stream=True))
    print(format_table([result]))
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import math
import multiprocessing
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import orjson

from bench.client import AiohttpClient, Client, Response
from bench.rawhttp import RawHttpClient
from bench.result import BenchResult, Sample, summarize
from bench.workload import BenchConfig, MixSampler, arrival_schedule, prompt_text, shard_requests

if TYPE_CHECKING:
    from gpu_worker.engine.sim import SimEngine

perf_counter = time.perf_counter

_TIMER_SLACK_S = 0.0005


def run_async(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


@dataclass
class _ShardOutput:
    """What one shard hands back (from a ``--procs`` child through a pipe)."""

    samples: list[Sample]
    cpu_s: float
    wall_s: float  # from the shared start to the last reply
    error_details: dict[str, str]
    connections: int


async def open_loop(
    schedule: Sequence[float], t0: float, send: Callable[[int, float], Coroutine[Any, Any, None]], drain_s: float
) -> None:
    """Start ``send(i, at)`` as a task at each scheduled time ``at = t0 + schedule[i]`` (``t0``: a
    ``perf_counter`` time), whatever the earlier sends are doing; then wait up to ``drain_s`` for
    the sends still running and cancel the rest.  A send is never early and at most ~1 ms late."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    for i, off in enumerate(schedule):
        at = t0 + off
        while (delay := at - perf_counter()) > 0:
            # uvloop's timers have 1 ms granularity and round to nearest: a plain sleep(delay)
            # would wake early (sending before the schedule) or spin; round up instead, so a
            # send is never early and at most ~1 ms late (measured: ``lateness``)
            await asyncio.sleep(delay + _TIMER_SLACK_S)
        task = loop.create_task(send(i, at))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        _, pending = await asyncio.wait(tasks, timeout=drain_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


class _Shard:
    """One process's share of the load."""

    def __init__(self, cfg: BenchConfig, shard: int = 0, nshards: int = 1) -> None:
        self.cfg = cfg
        self.shard = shard
        self.samples: list[Sample] = []
        self.error_details: dict[str, str] = {}
        self.no_usage = 0
        self._t0 = 0.0
        self._mix = MixSampler(cfg.token_mix(), seed=cfg.seed * 7919 + 2 * shard + 1)
        self._prompt_tail = prompt_text(cfg.prompt_words, "")
        self._chat = cfg.endpoint == "chat"
        self._schedule: list[float] = []
        self._concurrency = 0
        self._rate = (cfg.rate or 0.0) / nshards
        self._requests = shard_requests(cfg, shard, nshards)
        if cfg.rate is not None:
            self._schedule = arrival_schedule(cfg, shard, nshards)
        else:
            assert cfg.concurrency is not None
            self._concurrency = cfg.concurrency // nshards + (1 if shard < cfg.concurrency % nshards else 0)
        self._client: Client | None = None
        self._engine: SimEngine | None = None
        limit = cfg.max_inflight or max(1, _nofile_limit() - 64)
        self._sem: asyncio.Semaphore | None = asyncio.Semaphore(limit) if cfg.rate is not None else None

    async def open(self) -> None:
        cfg = self.cfg
        if cfg.in_process:
            from gpu_worker.engine.sim import SimEngine

            self._engine = SimEngine(
                slots=cfg.sim_slots, max_model_len=cfg.sim_max_model_len,
                prefill_ms_per_token=cfg.sim_prefill_ms_per_token, decode_ms=cfg.sim_decode_ms,
                decode_ms_per_seq=cfg.sim_decode_ms_per_seq,
            )
            await self._engine.start()
        elif cfg.client == "aiohttp":
            self._client = AiohttpClient(cfg.url, cfg.endpoint, cfg.api_key)
        else:
            client = RawHttpClient(cfg.url, cfg.endpoint, cfg.api_key, connect_timeout=cfg.timeout)
            self._client = client
            await client.prewarm(self._prewarm_count())

    def _prewarm_count(self) -> int:
        if self.cfg.connections is not None:
            return self.cfg.connections
        if self.cfg.rate is None:
            return self._concurrency
        # about 20 ms worth of arrivals, so a burst finds connections ready
        return min(256, 4 + math.ceil(self._rate * 0.02))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
        if self._engine is not None:
            await self._engine.shutdown()

    @property
    def connections(self) -> int:
        return self._client.connections_opened if isinstance(self._client, RawHttpClient) else 0

    async def run(self, t0: float) -> None:
        """Run the schedule; ``t0`` is the ``perf_counter`` time that offsets count from."""
        self._t0 = t0
        if self.cfg.rate is not None:
            await open_loop(self._schedule, t0, self._request, drain_s=self.cfg.timeout + 5.0)
        else:
            await self._closed_loop()

    async def _closed_loop(self) -> None:
        end = self._t0 + self.cfg.warmup + self.cfg.duration
        counter = itertools.count()
        limit = self._requests

        async def client() -> None:
            while True:
                now = perf_counter()
                if now >= end:
                    return
                i = next(counter)
                if limit is not None and i >= limit:
                    return
                await self._request(i, now)

        await asyncio.gather(*(client() for _ in range(self._concurrency)))

    async def _request(self, i: int, sched: float) -> None:
        max_tokens = self._mix.draw()
        tag = f"r{self.shard}-{i}"
        sent: float | None = None
        first: float | None = None
        tokens = chunks = 0
        error: str | None = None
        detail = ""
        try:
            if self._sem is not None:
                await self._sem.acquire()
            try:
                if self._engine is not None:
                    sent, first, tokens, chunks, error = await self._engine_request(tag, max_tokens)
                else:
                    resp = Response(self.cfg.stream, self._chat)
                    try:
                        await self._http_request(tag, max_tokens, resp)
                        resp.finish()
                    finally:
                        sent, first, tokens, chunks = resp.t_sent, resp.t_first, resp.tokens, resp.chunks
                    error, detail = resp.error, resp.detail
                    if error is None and self.cfg.stream and not resp.usage_seen:
                        self.no_usage += 1
            finally:
                if self._sem is not None:
                    self._sem.release()
        except asyncio.CancelledError:
            error = "Unfinished"
            raise
        except TimeoutError as exc:  # one name for every client's flavour of timeout
            error = "TimeoutError"
            detail = str(exc)[:300]
        except Exception as exc:  # every failure is a counted outcome, never a crash of the run
            error = type(exc).__name__
            detail = str(exc)[:300]
        finally:
            t0 = self._t0
            self.samples.append(Sample(
                sched - t0, None if sent is None else sent - t0, perf_counter() - t0,
                None if first is None else first - t0, tokens, chunks, error,
            ))
            if error is not None and error not in self.error_details:
                self.error_details[error] = detail

    async def _http_request(self, tag: str, max_tokens: int, resp: Response) -> None:
        cfg = self.cfg
        text = tag + self._prompt_tail
        payload: dict[str, Any] = {"model": cfg.model, "max_tokens": max_tokens}
        if self._chat:
            payload["messages"] = [{"role": "user", "content": text}]
        else:
            payload["prompt"] = text
        if cfg.stream:
            payload["stream"] = True
            payload["stream_options"] = {"include_usage": True}
        if cfg.extra_body:
            payload.update(cfg.extra_body)
        assert self._client is not None
        await self._client.send(orjson.dumps(payload), resp, cfg.timeout)

    async def _engine_request(
        self, tag: str, max_tokens: int
    ) -> tuple[float, float | None, int, int, str | None]:
        from common.schemas import SamplingParams
        from gpu_worker.engine.base import EngineRequest

        assert self._engine is not None
        text = tag + self._prompt_tail
        req = EngineRequest(
            request_id=f"bench-{tag}",
            prompt=None if self._chat else text,
            messages=[{"role": "user", "content": text}] if self._chat else None,
            params=SamplingParams(max_tokens=max_tokens),
        )
        first: float | None = None
        tokens = chunks = 0
        finished = False
        sent = perf_counter()
        async with asyncio.timeout(self.cfg.timeout):
            gen = self._engine.generate(req)
            try:
                async for out in gen:
                    if out.text:
                        chunks += 1
                        if first is None:
                            first = perf_counter()
                    tokens = out.completion_tokens
                    if out.finish_reason is not None:
                        finished = True
            finally:
                aclose = getattr(gen, "aclose", None)
                if aclose is not None:
                    await aclose()
        return sent, first, tokens, chunks, None if finished else "IncompleteStream"


def _nofile_limit() -> int:
    """The soft limit on open files (the open loop's default in-flight cap); 1024 where unknown."""
    try:
        import resource

        return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    except (ImportError, ValueError, OSError):
        return 1024


def raise_nofile() -> None:
    """Raise the soft open-file limit to the hard one (at most 65536): one socket per request in flight.

    Where the platform has no ``resource`` module or refuses, the run keeps the limit it has (the
    open loop caps its in-flight requests below it)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        if soft != resource.RLIM_INFINITY and soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        return


async def _run_shard(cfg: BenchConfig, shard: int, nshards: int, start: Callable[[], float]) -> _ShardOutput:
    """Prepare a shard, get the shared start time from ``start()``, run, return raw samples."""
    runner = _Shard(cfg, shard, nshards)
    await runner.open()
    try:
        t0 = start()
        cpu0 = time.process_time()
        delay = t0 - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await runner.run(t0)
        cpu = time.process_time() - cpu0
        wall = perf_counter() - t0
    finally:
        await runner.close()
    details = dict(runner.error_details)
    if runner.no_usage:
        details["_no_usage"] = str(runner.no_usage)
    return _ShardOutput(runner.samples, cpu, wall, details, runner.connections)


def _shard_main(conn: Connection, cfg: BenchConfig, shard: int, nshards: int) -> None:
    """Entry point of a ``--procs`` child: handshake, run, send samples back."""
    raise_nofile()

    def start() -> float:
        conn.send("ready")
        start_wall = float(conn.recv())
        return perf_counter() + (start_wall - time.time())

    try:
        gc.collect()
        gc.freeze()
        out = run_async(_run_shard(cfg, shard, nshards, start))
        conn.send(("ok", out))
    except BaseException as exc:  # report, do not hang the parent
        with contextlib.suppress(OSError, ValueError):
            conn.send(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


async def _run_procs(cfg: BenchConfig) -> list[_ShardOutput]:
    ctx = multiprocessing.get_context("spawn")
    loop = asyncio.get_running_loop()
    pipes: list[Connection] = []
    procs: list[Any] = []
    try:
        for k in range(cfg.procs):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_shard_main, args=(child, cfg, k, cfg.procs), daemon=True)
            p.start()
            child.close()
            pipes.append(parent)
            procs.append(p)
        for pipe in pipes:
            msg = await asyncio.wait_for(loop.run_in_executor(None, pipe.recv), 60.0)
            if msg != "ready":
                why = msg[1] if isinstance(msg, tuple) else msg
                raise RuntimeError(f"bench child failed to start: {why}")
        start_wall = time.time() + 0.05
        for pipe in pipes:
            pipe.send(start_wall)
        horizon = cfg.warmup + cfg.duration + cfg.timeout + 60.0
        outs: list[_ShardOutput] = []
        for pipe in pipes:
            status, payload = await asyncio.wait_for(loop.run_in_executor(None, pipe.recv), horizon)
            if status != "ok":
                raise RuntimeError(f"bench child failed: {payload}")
            outs.append(payload)
        return outs
    finally:
        for pipe in pipes:
            pipe.close()
        for p in procs:
            await loop.run_in_executor(None, p.join, 5.0)
            if p.is_alive():
                p.kill()


async def run_load(cfg: BenchConfig) -> BenchResult:
    """Run one benchmark (HTTP or in-process; one process or ``cfg.procs``) and summarize it."""
    cfg.validate()
    if cfg.procs > 1:
        outs = await _run_procs(cfg)
    else:
        outs = [await _run_shard(cfg, 0, 1, lambda: perf_counter() + 0.001)]
    wall = max(o.wall_s for o in outs)
    samples = [s for out in outs for s in out.samples]
    samples.sort(key=lambda s: s.sched)
    details: dict[str, str] = {}
    no_usage = 0
    for out in outs:
        no_usage += int(out.error_details.pop("_no_usage", "0"))
        for k, v in out.error_details.items():
            details.setdefault(k, v)
    result = summarize(
        cfg, samples, wall, cpu_s=sum(o.cpu_s for o in outs), error_details=details,
        connections=sum(o.connections for o in outs),
    )
    result.no_usage = no_usage
    return result

"""Tests of the balancing comparison's arithmetic (bench/compare.py): the p99 floor and the pooled points."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from bench.compare import p99_floor, pooled
from bench.result import Sample
from common.schemas import SamplingParams
from gpu_worker.engine.base import EngineRequest
from gpu_worker.engine.sim import SimEngine


def test_p99_floor_picks_the_class_that_holds_the_p99() -> None:
    sim = {"sim_decode_ms": 10.0, "sim_decode_ms_per_seq": 0.1, "sim_prefill_ms_per_token": 0.02}
    f = p99_floor(sim, [(0.9, 32), (0.1, 1024)], prompt_words=32)
    assert f["tokens"] == 1024 and f["ms"] == pytest.approx(0.64 + 1024 * 10.1, abs=0.1)
    # long requests rarer than 1 %: the p99 is a short one
    assert p99_floor(sim, [(0.995, 32), (0.005, 1024)], prompt_words=32)["tokens"] == 32


def test_p99_floor_is_what_the_simulator_takes_for_a_request_alone() -> None:
    """The floor claimed for "any router" is the sim's own latency of one request on an idle
    engine: a request cannot finish sooner, and alone it finishes that soon."""
    sim = {"sim_decode_ms": 2.0, "sim_decode_ms_per_seq": 0.5, "sim_prefill_ms_per_token": 0.5}
    floor = p99_floor(sim, [(1.0, 200)], prompt_words=20)["ms"]

    async def one() -> float:
        engine = SimEngine(slots=4, decode_ms=2.0, decode_ms_per_seq=0.5, prefill_ms_per_token=0.5)
        await engine.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = 0
        async for out in engine.generate(EngineRequest("r", prompt=" ".join(["w"] * 20),
                                                       params=SamplingParams(max_tokens=200))):
            n = out.completion_tokens
        took = (loop.time() - t0) * 1000
        await engine.shutdown()
        assert n == 200
        return took

    took = asyncio.run(one())
    assert floor <= took < floor * 1.5, (floor, took)


def test_pooled_percentiles_are_over_all_repetitions() -> None:
    def smp(lat_s: float, tokens: int) -> Sample:
        return Sample(sched=0.0, sent=0.0, end=lat_s, first=0.01, tokens=tokens, chunks=tokens, error=None)

    a = [smp(0.1 * i, 32) for i in range(1, 101)]  # 0.1 .. 10 s
    b = [smp(20.0, 1024)] * 10
    rows = [{"rate": 5.0, "throughput_rps": 4.0, "errors": 0, "p99_ms": 9900.0, "short_p99_ms": 9900.0,
             "lateness_p99_ms": 1.0},
            {"rate": 5.0, "throughput_rps": 6.0, "errors": 1, "p99_ms": 20000.0, "short_p99_ms": float("nan"),
             "lateness_p99_ms": 3.0}]
    p = pooled("mgpu pull", 0.8, rows, a + b, 40.0)
    lat = sorted([x.end * 1000 for x in a + b])
    assert p["p99_ms"] == round(float(np.percentile(lat, 99)), 1)
    assert p["short_p99_ms"] == round(float(np.percentile([x.end * 1000 for x in a], 99)), 1)
    assert p["long_p99_ms"] == 20000.0
    assert p["norm_p99_ms_per_tok"] == round(float(np.percentile([x.end * 1000 / x.tokens for x in a + b], 99)), 1)
    assert p["throughput_rps"] == 5.0 and p["errors"] == 1 and p["requests"] == 110
    assert p["p99_ms_each"] == [9900.0, 20000.0] and p["lateness_p99_ms_max"] == 3.0

"""Tests of the peer benchmark's pure logic (bench/peers.py): target selection, the router command
line, the inter-chunk interval, and the summary (medians, differences to the direct baseline, the
cost of one chunk).  No process is started."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from bench.peers import (
    all_targets,
    chunk_gaps_ms,
    measured,
    router_cmd,
    run_row,
    select_targets,
    summarize_runs,
    tables,
)
from bench.result import Sample, summarize
from bench.workload import BenchConfig
from common.settings import STRATEGIES


def test_all_targets_lists_installed_routers_and_every_mgpu_strategy() -> None:
    names = all_targets(lambda r: r == "vllm-router")
    assert names[:3] == ["direct", "vllm-router:round_robin", "vllm-router:power_of_two"]
    assert names[3:] == [f"mgpu:{s}" for s in STRATEGIES]
    assert not any(n.startswith("sglang-router") for n in names)
    assert "sglang-router:power_of_two" in all_targets(lambda r: True)


def test_select_targets_by_name_or_group_in_table_order() -> None:
    names = all_targets(lambda r: True)
    assert select_targets(None, names) == names
    assert select_targets("mgpu:pull, direct", names) == ["direct", "mgpu:pull"]
    assert select_targets("vllm-router", names) == ["vllm-router:round_robin", "vllm-router:power_of_two"]
    assert select_targets("mgpu,mgpu:pull", names) == [f"mgpu:{s}" for s in STRATEGIES]
    with pytest.raises(ValueError, match="nginx"):
        select_targets("direct,nginx", names)
    with pytest.raises(ValueError):
        select_targets("sglang-router", all_targets(lambda r: False))


def test_router_cmd_names_every_worker_the_policy_and_its_own_ports() -> None:
    cmd = router_cmd("vllm-router", "power_of_two", 9000, 9001, ["http://127.0.0.1:1", "http://127.0.0.1:2"])
    assert cmd[1:3] == ["-m", "vllm_router.launch_router"]
    i = cmd.index("--worker-urls")
    assert cmd[i + 1:i + 3] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]
    assert cmd[cmd.index("--policy") + 1] == "power_of_two"
    assert cmd[cmd.index("--port") + 1] == "9000" and cmd[cmd.index("--prometheus-port") + 1] == "9001"
    sg = router_cmd("sglang-router", "round_robin", 1, 2, ["u"])
    assert "sglang_router.launch_router" in sg and sg[sg.index("--log-level") + 1] == "warn"


def _smp(sched: float, first: float | None, end: float, chunks: int, error: str | None = None) -> Sample:
    return Sample(sched=sched, sent=sched, end=end, first=first, tokens=chunks, chunks=chunks, error=error)


def test_chunk_gaps_are_the_mean_interval_per_request() -> None:
    s = [_smp(0.0, 0.010, 0.025, 16), _smp(0.0, 0.010, 0.010, 1), _smp(0.0, None, 0.02, 0)]
    assert chunk_gaps_ms(s) == [pytest.approx(1.0)]  # 15 ms over 15 intervals; one chunk or none: no interval


def test_measured_keeps_successes_scheduled_in_the_window() -> None:
    cfg = BenchConfig(rate=10, duration=2.0, warmup=1.0)
    s = [_smp(0.5, 0.6, 0.7, 2), _smp(1.0, 1.1, 1.2, 2), _smp(2.9, 3.0, 3.5, 2), _smp(3.0, 3.1, 3.2, 2),
         _smp(1.5, None, 1.6, 0, "HTTP 500")]
    assert [x.sched for x in measured(s, cfg)] == [1.0, 2.9]


def test_run_row_divides_cpu_by_every_successful_request_of_the_run() -> None:
    cfg = BenchConfig(rate=10, duration=2.0, warmup=1.0, stream=True)
    samples = [_smp(0.5, 0.51, 0.53, 3), _smp(1.5, 1.51, 1.55, 5), _smp(1.6, None, 1.7, 0, "HTTP 503")]
    res = summarize(cfg, samples, wall_s=3.0, cpu_s=0.002)
    row = run_row("mgpu:pull", True, "open", 0, res, cfg, {"router": 0.004, "engines": 0.002})
    assert row["repeat"] == 1 and row["errors"] == 1
    assert row["router_us_per_req"] == pytest.approx(2000.0)  # 4 ms / 2 successes (the warmup one counts)
    assert row["redis_us_per_req"] == 0.0 and row["serving_us_per_req"] == pytest.approx(3000.0)
    assert row["gen_us_per_req"] == pytest.approx(1000.0)
    assert row["gap_p50_ms"] == pytest.approx(10.0)  # the measured request: 40 ms over 4 intervals


def _row(target: str, stream: bool, load: str, rep: int, **kw: Any) -> dict[str, Any]:
    base = {"target": target, "stream": stream, "load": load, "repeat": rep, "errors": 0, "fell_behind": False,
            "p50_ms": 1.0, "p99_ms": 2.0, "ttft_p50_ms": None, "ttft_p99_ms": None, "gap_p50_ms": None,
            "gap_p99_ms": None, "chunks_mean": 0.0, "throughput_rps": 100.0, "router_us_per_req": 0.0,
            "engines_us_per_req": 100.0, "redis_us_per_req": 0.0, "serving_us_per_req": 100.0}
    return {**base, **kw}


def test_summary_takes_medians_and_compares_to_direct_and_to_non_streaming() -> None:
    rows = []
    for rep, (p50, rps) in enumerate([(1.0, 1000.0), (3.0, 900.0), (2.0, 1100.0)]):
        rows += [_row("direct", False, "open", rep, p50_ms=p50),
                 _row("direct", False, "closed", rep, throughput_rps=rps),
                 _row("mgpu:pull", False, "open", rep, p50_ms=p50 + 2.0, serving_us_per_req=400.0),
                 _row("mgpu:pull", False, "closed", rep, throughput_rps=rps / 2, errors=1),
                 _row("mgpu:pull", True, "open", rep, p50_ms=p50 + 3.6, serving_us_per_req=560.0,
                      chunks_mean=16.0, gap_p99_ms=0.5),
                 _row("mgpu:pull", True, "closed", rep, throughput_rps=rps / 4)]
    by = {(s["target"], s["stream"]): s for s in summarize_runs(rows)}
    d, m, sse = by[("direct", False)], by[("mgpu:pull", False)], by[("mgpu:pull", True)]
    assert d["repeats"] == 3 and d["p50_ms"] == 2.0 and d["closed_rps"] == 1000.0
    assert d["added_p50_ms"] == 0.0 and d["closed_vs_direct"] == 1.0
    assert m["added_p50_ms"] == pytest.approx(2.0) and m["closed_vs_direct"] == pytest.approx(0.5)
    assert m["errors"] == 3 and m["chunk_cpu_us"] is None
    # streaming: (560 - 400) µs over 16 chunks; (5.6 - 4.0) ms over 16 chunks; no streaming direct run
    assert sse["chunk_cpu_us"] == pytest.approx(10.0) and sse["chunk_p50_ms"] == pytest.approx(0.1)
    assert sse["added_p50_ms"] is None and sse["gap_p99_ms"] == 0.5
    args = argparse.Namespace(rate=400.0, clients=64, max_tokens=16, workers=4, repeats=3, duration=10.0)
    text = tables(summarize_runs(rows), args)
    assert "| mgpu:pull | 4.00 | 2.00 | +2.00 |" in text and "0.50x" in text and "+10.0" in text

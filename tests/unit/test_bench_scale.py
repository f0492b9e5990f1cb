"""Tests of the scale benchmark's pure logic (bench/scale.py): the counts, the split of clients over
gateways, INFO commandstats per request or second, CPU as cores, a load run's record and the tables.
No process is started."""

from __future__ import annotations

from typing import Any

import pytest

from bench.result import Sample, summarize
from bench.scale import (
    command_calls,
    cores,
    load_row,
    parse_counts,
    per_unit,
    split,
    tables,
    top_commands,
)
from bench.workload import BenchConfig


def test_parse_counts_sorted_distinct_positive() -> None:
    assert parse_counts("32, 1,8,8") == [1, 8, 32]
    for bad in ("0,1", "", "-2"):
        with pytest.raises(ValueError):
            parse_counts(bad)


def test_split_spreads_clients_evenly() -> None:
    assert split(64, 1) == [64]
    assert split(64, 3) == [22, 21, 21]
    assert sum(split(65, 4)) == 65


def test_command_calls_strips_prefix_and_drops_the_probes() -> None:
    stats = {"cmdstat_evalsha": {"calls": 10, "usec": 5}, "cmdstat_XADD": {"calls": 3},
             "cmdstat_config|resetstat": {"calls": 1}, "cmdstat_info": {"calls": 2},
             "cmdstat_client|setinfo": {"calls": 4}}
    assert command_calls(stats) == {"evalsha": 10, "xadd": 3, "client|setinfo": 4}
    assert command_calls(stats, ignore=()) ["info"] == 2


def test_per_unit_divides_and_orders_largest_first() -> None:
    per = per_unit({"hget": 50, "xadd": 200, "evalsha": 200}, 100)
    assert list(per.items()) == [("evalsha", 2.0), ("xadd", 2.0), ("hget", 0.5)]
    assert per_unit({"x": 1}, 0) == {}


def test_top_commands_ranks_by_the_largest_figure_of_any_configuration() -> None:
    per = [{"a": 5.0, "b": 1.0}, {"b": 9.0, "c": 0.5}]
    assert top_commands(per) == ["b", "a", "c"]
    assert top_commands(per, k=2) == ["b", "a"]


def test_cores_per_part_and_their_sum() -> None:
    c = cores({"gateway": 1.0, "workers": 2.0, "redis": 0.0}, {"gateway": 6.0, "workers": 4.0, "redis": 1.0}, 10.0)
    assert c == pytest.approx({"gateway": 0.5, "workers": 0.2, "redis": 0.1, "serving": 0.8})
    assert cores({"redis": 0.0}, {"redis": 1.0}, 0.0)["serving"] == 0.0


def _result(n_ok: int, n_err: int = 0, duration: float = 10.0) -> Any:
    cfg = BenchConfig(concurrency=4, duration=duration)
    samples = [Sample(i * 0.01, i * 0.01, i * 0.01 + 0.002, None, 16, 1, None) for i in range(n_ok)]
    samples += [Sample(1.0, 1.0, 1.5, None, 0, 0, "HTTP 503") for _ in range(n_err)]
    return summarize(cfg, samples, wall_s=duration)


def test_load_row_sums_gateways_and_counts_per_request() -> None:
    results = [_result(600, n_err=2), _result(400)]
    used = {"gateway": 0.8, "workers": 0.4, "redis": 0.3, "serving": 1.5}
    row = load_row(results, wall_s=10.0, gen_cpu_s=5.0, used=used, calls={"evalsha": 3000, "xadd": 1000},
                   idle_calls_per_s=20.0)
    assert row["ok"] == 1000
    assert row["throughput_rps"] == pytest.approx(100.0)
    assert row["errors"] == {"HTTP 503": 2}
    assert row["calls_per_req"] == {"evalsha": 3.0, "xadd": 1.0}
    assert row["calls_per_req_total"] == 4.0
    assert row["us_per_req"]["redis"] == pytest.approx(3000.0)  # 0.3 core x 10 s / 1000 requests
    assert row["rps_per_serving_core"] == pytest.approx(100 / 1.5)
    assert row["loadgen_cores"] == pytest.approx(0.5)
    assert row["idle_rate_calls_per_req"] == pytest.approx(0.2)
    assert row["p50_ms"] == pytest.approx(2.0)


def test_load_row_without_successes_has_no_per_request_figures() -> None:
    row = load_row([_result(0, n_err=3)], 10.0, 1.0, {"redis": 0.1, "serving": 0.0}, {"xadd": 5})
    assert row["calls_per_req"] == {} and row["calls_per_req_total"] is None
    assert row["rps_per_serving_core"] is None and "idle_rate_calls_per_req" not in row


def _out() -> dict[str, Any]:
    used = {"gateway": 0.5, "workers": 0.3, "redis": 0.2, "serving": 1.0}
    load = load_row([_result(1000)], 10.0, 4.0, used, {"evalsha": 2000, "xreadgroup": 500}, 30.0)
    idle = {"seconds": 20.0, "cores": {"gateway": 0.01, "workers": 0.05, "redis": 0.02, "serving": 0.08},
            "calls_total_per_s": 40.0, "calls_per_s": {"xreadgroup": 32.0, "hset": 8.0}}
    settings = {"clients": 64, "max_tokens": 16, "duration": 15.0, "idle": 20.0, "settle": 5.0, "slots": 512,
                "gateway_workers": 4}
    return {"settings": settings, "machine": {"cores": 2, "cpu": "AMD EPYC"},
            "workers": [{"workers": 1, "slots_per_worker": 512, "startup_s": 3.0, "idle": idle, "load": load},
                        {"workers": 32, "slots_per_worker": 512, "error": "timed out"}],
            "gateways": [{"gateways": 1, "workers": 4, "load": load}]}


def test_tables_name_the_cores_and_show_every_configuration() -> None:
    text = tables(_out())
    assert "2 CPU cores" in text
    assert "| 1 | 512 | 3.0 | 2.0% | 6.0% | 40.0 | 100 |" in text
    assert "| 32 | 512 | failed: timed out |" in text
    assert "| evalsha | 2.000 |" in text and "| xreadgroup | 32.0 |" in text
    assert "| **all** | 2.500 |" in text
    assert "| 1 | 4 | 100 |" in text
    widths = {line.count("|") for line in text.splitlines() if line.startswith("| 32 ") or line.startswith("| 1 | 512")}
    assert len(widths) == 1  # a failed row has as many cells as a measured one

"""bench.priomodel: the sim's step cost as the floor under the batch-priority TTFT ratio (docs/benchmarks.md §12d)."""

from __future__ import annotations

import pytest

from bench.priomodel import constant_needed, engine_ratio, row, step_ms


def test_the_step_cost_and_the_engine_ratio_follow_the_sims_formula() -> None:
    assert step_ms(0.5, 32, 0.1) == pytest.approx(11.6)  # 10 ms + 0.1 ms x 16 running
    assert engine_ratio(0.95, 0.16, 32, 0.1) == pytest.approx((10 + 3.04) / (10 + 0.512))
    assert engine_ratio(0.95, 0.16, 32, 0.0) == 1.0  # a flat step: the batch costs the engine part nothing
    # at 95 % occupancy the engine part alone is past 1.2x: the rest of the TTFT must dilute it, and not grow
    assert engine_ratio(0.95, 0.16, 32, 0.1) > 1.2
    g = constant_needed(0.95, 0.16, 32, 0.1)
    cw, ca = step_ms(0.95, 32, 0.1), step_ms(0.16, 32, 0.1)
    assert (2 * cw + g) / (2 * ca + g) == pytest.approx(1.2)
    assert constant_needed(0.6, 0.16, 32, 0.1) == 0.0


def test_a_row_reads_a_timeline_report() -> None:
    parts = {"engine_ms": {"p99": 20.0}, "queue_ms": {"p99": 2.0}, "relay_ms": {"p99": 3.0}}
    rep = {"setup": {"slots": 32, "decode_ms_per_seq": 0.1, "reserve": 1},
           "alone": {"occupancy": 0.16, "ttft_parts": parts},
           "with_batch": {"ttft_parts": {**parts, "engine_ms": {"p99": 25.0}}},
           "ratios": {"occupancy_with_batch": 0.97, "ttft_p99": 1.3}}
    r = row("x", rep)
    assert r["measured_engine_ratio"] == 1.25 and r["rest_p99_ms"] == [5.0, 5.0] and r["ttft_p99_ratio"] == 1.3
    assert r["model_engine_ratio"] == round(engine_ratio(0.97, 0.16, 32, 0.1), 3)
    rep["alone"].pop("ttft_parts")
    assert "measured_engine_ratio" not in row("x", rep)  # a report without --timeline: the model only

"""The benchmarks' one percentile: every tool (the load generator, chaos, compare) reports its
distributions through :func:`percentile` and :func:`dist_ms`, so a p99 means the same everywhere."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method) of already-sorted values; NaN if empty."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if n == 1:
        return float(sorted_values[0])
    rank = (q / 100.0) * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def pct(values: Iterable[float], q: float) -> float:
    """:func:`percentile` of values in any order; NaN if there are none."""
    return percentile(sorted(values), q)


def dist_ms(values_s: Sequence[float]) -> dict[str, float] | None:
    """p50/p90/p99/max/mean in milliseconds of values in seconds; None when there are none."""
    if not values_s:
        return None
    v = sorted(values_s)
    return {
        "p50": percentile(v, 50) * 1e3,
        "p90": percentile(v, 90) * 1e3,
        "p99": percentile(v, 99) * 1e3,
        "max": v[-1] * 1e3,
        "mean": sum(v) / len(v) * 1e3,
    }

"""Benchmarks of the serving path's own cost (issue: routing overhead and aggregate throughput).

Starts a redis-server (AOF, appendfsync everysec: the production setting), one gateway and one
sim worker at zero engine cost, then runs the load generator (:mod:`bench.loadgen`):

1. overhead: open-loop Poisson at ``--rate`` (500 req/s) over HTTP, then the same schedule against
   the same sim engine called in-process; the difference is what the full path adds
   (HTTP -> gateway -> Redis -> worker -> Redis -> gateway -> HTTP).  Repeated ``--repeats`` times.
2. throughput: open-loop at ``--high-rate`` (1,000 req/s) for ``--high-duration`` (60 s): errors,
   latency and achieved rate; then a closed loop (64 clients) for the ceiling.

    python -m bench.core --json bench-core.json

Sim figures only: no GPU is involved, and none of these numbers is a GPU figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import Fleet
from bench.loadgen import run_load
from bench.report import format_table
from bench.result import BenchResult, overhead_ms
from bench.stats import pct
from bench.workload import BenchConfig

MODEL = "sim-zero"
ZERO = {"sim_decode_ms": 0.0, "sim_decode_ms_per_seq": 0.0, "sim_prefill_ms_per_token": 0.0}


def _run(cfg: BenchConfig) -> BenchResult:
    """One load-generator run, on a fresh event loop."""
    return asyncio.run(run_load(cfg))


def _measure(args: argparse.Namespace, out: dict[str, Any], url: str) -> list[BenchResult]:
    """The runs against the gateway at ``url``, recorded into ``out``; the results, for the table."""
    base: dict[str, Any] = dict(url=url, model=MODEL, endpoint=args.endpoint, max_tokens=args.max_tokens,
                                sim_slots=512, **ZERO)
    _run(BenchConfig(rate=200, duration=3, **base))  # warm up connections and code paths
    tables = []
    for i in range(args.repeats):
        http = _run(BenchConfig(rate=args.rate, duration=args.duration, warmup=2, seed=i, label=f"http#{i}", **base))
        inproc = _run(BenchConfig(rate=args.rate, duration=args.duration, warmup=2, seed=i,
                                  in_process=True, label=f"in-process#{i}", **base))
        added = overhead_ms(http, inproc)
        out["overhead"].append({"http": http.to_dict(), "in_process": inproc.to_dict(), "added_ms": added})
        tables += [http, inproc]
        print(f"run {i}: added p50 {added['latency_p50']:.2f} ms, p99 {added['latency_p99']:.2f} ms, "
              f"errors {http.error_count}", flush=True)
    high = _run(BenchConfig(rate=args.high_rate, duration=args.high_duration, warmup=2, label="high", **base))
    closed = _run(BenchConfig(concurrency=64, duration=20, warmup=2, label="closed-64", **base))
    out["high"], out["closed"] = high.to_dict(), closed.to_dict()
    return [*tables, high, closed]


def main(argv: list[str] | None = None) -> int:
    """Start the fleet, run the benchmark, print the tables, write ``--json``."""
    ap = argparse.ArgumentParser(prog="python -m bench.core", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=500.0)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--high-rate", type=float, default=1000.0)
    ap.add_argument("--high-duration", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--endpoint", default="chat", choices=("chat", "completions"))
    ap.add_argument("--gateway-env", action="append", default=[], metavar="K=V",
                    help="extra MGPU_* settings for the gateway and worker (e.g. MGPU_LOG_REQUESTS=false)")
    ap.add_argument("--json", dest="json_path")
    args = ap.parse_args(argv)
    extra = dict(kv.split("=", 1) for kv in args.gateway_env)
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cores": os.cpu_count(),
                           "python": platform.python_version(), "settings": extra, "overhead": [], "high": None}
    with tempfile.TemporaryDirectory(prefix="mgpu-bench-") as d, Fleet.launch(Path(d), settings=extra) as fleet:
        fleet.start_worker(wait=False, model=MODEL, slots=512, **ZERO)
        fleet.start_gateway(timeout=60)
        tables = _measure(args, out, fleet.base_url)
    adds = [o["added_ms"] for o in out["overhead"]]
    out["added_median_ms"] = {k: pct((a[k] for a in adds), 50) for k in adds[0]}
    print(format_table(tables, markdown=True))
    m = out["added_median_ms"]
    print(f"\nadded by the full path at {args.rate:.0f} req/s (median of {args.repeats}): "
          f"p50 {m['latency_p50']:.2f} ms, p90 {m['latency_p90']:.2f} ms, p99 {m['latency_p99']:.2f} ms")
    h = out["high"]
    print(f"{args.high_rate:.0f} req/s offered for {args.high_duration:.0f} s: {h['throughput_rps']:.0f} req/s "
          f"achieved, {sum(h['errors'].values())} errors; closed loop (64 clients): "
          f"{out['closed']['throughput_rps']:.0f} req/s")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

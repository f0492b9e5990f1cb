"""CPU per request of each process on the serving path (gateway, worker, redis-server), for one or
more checkouts of mgpu measured in one run: each ``--code DIR`` gets its own fleet (a redis-server,
one zero-cost sim worker, one gateway, all running that checkout's ``mgpu``), and every repetition
runs the same open-loop load (``python -m bench`` from this checkout, ``--rate`` req/s, chat,
``max_tokens`` 16) against each fleet in turn, the order rotated.  CPU is read from /proc before and
after each run; the figure is CPU seconds per successful request.  Sim figures only.

    python -m bench.cpucost --code /path/to/old/checkout --code . --json /tmp/cpucost.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.fleet import ROOT, Fleet
from bench.stats import pct

MODEL = "sim-zero"
Rows = list[dict[str, Any]]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run(url: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench", "--url", url, "--model", MODEL, "--max-tokens", "16",
           "--rate", str(args.rate), "--requests", str(args.requests), "--duration", "600", "--json", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return dict(json.loads(out.read_text())["results"][0])


def _fleet(code: Path, tmp: Path) -> tuple[Fleet, dict[str, int]]:
    fleet = Fleet.launch(tmp, settings={"log_requests": "false"}, code=code)
    worker = fleet.start_worker(model=MODEL, slots=512, sim_decode_ms=0, sim_decode_ms_per_seq=0,
                                sim_prefill_ms_per_token=0)
    gateway = fleet.start_gateway(timeout=60)
    assert fleet.redis_server.proc is not None
    return fleet, {"gateway": gateway.proc.pid, "worker": worker.proc.pid, "redis": fleet.redis_server.proc.pid}


def measure(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    codes = [Path(c).resolve() for c in args.code]
    fleets = [_fleet(c, tmp / f"fleet{i}") for i, c in enumerate(codes)]
    rows: list[dict[str, Any]] = []
    try:
        for fleet, _ in fleets:  # warm up
            _run(fleet.base_url, argparse.Namespace(rate=200, requests=600), tmp / "warm.json")
        for rep in range(args.repeats):
            order = list(range(len(fleets)))
            order = order[rep % len(order):] + order[:rep % len(order)]
            for i in order:
                fleet, pids = fleets[i]
                before = {k: cpu_s(p) for k, p in pids.items()}
                res = _run(fleet.base_url, args, tmp / "run.json")
                ok = max(1, int(res["ok"]))
                row = {"repeat": rep + 1, "code": str(codes[i]), "ok": res["ok"],
                       "errors": sum(res["errors"].values()), "p50_ms": res["latency_ms"]["p50"],
                       "p99_ms": res["latency_ms"]["p99"],
                       **{f"{k}_us_per_req": 1e6 * (cpu_s(p) - before[k]) / ok for k, p in pids.items()}}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        for fleet, _ in fleets:
            fleet.stop()
    return rows


def table(rows: list[dict[str, Any]], rate: float) -> str:
    out = [f"| checkout | gateway µs/req | worker µs/req | redis-server µs/req | p50 / p99 ms (at {rate:.0f} req/s) |",
           "|---|---:|---:|---:|---:|"]
    def cell(mine: list[dict[str, Any]], k: str) -> str:
        v = [r[k] for r in mine]
        return f"{pct(v, 50):.0f} ({min(v):.0f}–{max(v):.0f})"

    for code in dict.fromkeys(r["code"] for r in rows):
        mine = [r for r in rows if r["code"] == code]
        out.append(f"| {code} | {cell(mine, 'gateway_us_per_req')} | {cell(mine, 'worker_us_per_req')} | "
                   f"{cell(mine, 'redis_us_per_req')} | {pct([r['p50_ms'] for r in mine], 50):.2f} / "
                   f"{pct([r['p99_ms'] for r in mine], 50):.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpucost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", action="append", required=True, help="a checkout of mgpu (repeatable)")
    p.add_argument("--rate", type=float, default=400.0)
    p.add_argument("--requests", type=int, default=6000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="json_path")
    a = p.parse_args(argv)
    return run_and_report("cpucost", a, measure, table)


def run_and_report(name: str, a: argparse.Namespace, measure: Callable[[argparse.Namespace, Path], Rows],
                   table: Callable[[Rows, float], str]) -> int:
    """Measure in a temporary folder, print the table, write ``--json`` (the runs, with when and how)."""
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix=f"mgpu-{name}-") as d:
        rows = measure(a, Path(d))
    print("\n" + table(rows, a.rate))
    if a.json_path:
        Path(a.json_path).write_text(json.dumps({"started": started, "cores": os.cpu_count(), "args": vars(a),
                                                 "runs": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

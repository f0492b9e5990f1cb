"""The load generator's CPU per request with each HTTP client (``--client raw`` and ``aiohttp``), in
one run, against the same targets under the same load:

* the dummy server (``mgpu bench --serve-dummy``, instant replies), and
* a real gateway + one sim worker at zero engine cost (a :class:`bench.fleet.Fleet`),

non-streaming and streaming, open-loop Poisson at ``--rate`` for ``--requests`` requests, each run
a fresh ``python -m bench`` process; ``--repeats`` repetitions, the clients' order alternating.  The
figure is the generator's CPU seconds during the run (``cpu_s``: its process time from the first
send to the last reply) per successful request; the whole process's CPU (start-up and imports
included, from ``getrusage``) is printed beside it.

    python -m bench.clientcost --json /tmp/clientcost.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import ROOT, Fleet
from bench.stats import pct
from ops.procs import free_port, spawn, terminate, wait_until

CLIENTS = ("raw", "aiohttp")
MODEL = "sim-zero"


def _one(url: str, client: str, stream: bool, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One ``python -m bench`` run; its CPU per request."""
    cmd = [sys.executable, "-m", "bench", "--url", url, "--model", MODEL, "--client", client,
           "--rate", str(args.rate), "--requests", str(args.requests), "--duration", "600", "--connections", "0",
           "--max-tokens", str(args.max_tokens), "--json", str(out), *(["--stream"] if stream else [])]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = json.loads(out.read_text())["results"][0]
    whole = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    ok = max(int(res["ok"]), 1)
    return {"client": client, "ok": res["ok"], "errors": sum(res["errors"].values()),
            "cpu_s": res["cpu_s"], "us_per_req": 1e6 * res["cpu_s"] / ok, "whole_us_per_req": 1e6 * whole / ok}


def measure(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Start the dummy server and the fleet, run :func:`runs` against both, stop them."""
    port = free_port()
    dummy = spawn([sys.executable, "-m", "bench", "--serve-dummy", f"127.0.0.1:{port}"],
                  env={"PYTHONPATH": str(ROOT)}, log_path=tmp / "dummy.log")
    try:
        (tmp / "fleet").mkdir()
        with Fleet.launch(tmp / "fleet", settings={"log_requests": "false"}) as fleet:
            fleet.start_worker(model=MODEL, slots=512, sim_decode_ms=0, sim_decode_ms_per_seq=0,
                               sim_prefill_ms_per_token=0)
            fleet.start_gateway()
            wait_until(lambda: "dummy server on" in (tmp / "dummy.log").read_text(), 30, "dummy server")
            return runs(args, tmp, {"dummy": f"http://127.0.0.1:{port}", "gateway": fleet.base_url})
    finally:
        terminate(dummy)


def runs(args: argparse.Namespace, tmp: Path, urls: dict[str, str]) -> list[dict[str, Any]]:
    """Every (repetition, target, stream, client) run, the clients' order alternating by repetition."""
    rows: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        order = CLIENTS if rep % 2 == 0 else CLIENTS[::-1]
        for target, url in urls.items():
            for stream in (False, True):
                for client in order:
                    row = {"repeat": rep + 1, "target": target, "stream": stream,
                           **_one(url, client, stream, args, tmp / "run.json")}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (target, stream): each client's µs/request (median and range over the repetitions), the
    ratio of the medians, and the smallest ratio within one repetition (the clients ran back to back)."""
    out = []
    for target, stream in dict.fromkeys((r["target"], r["stream"]) for r in rows):
        cell: dict[str, Any] = {"target": target, "stream": stream}
        mine = [r for r in rows if (r["target"], r["stream"]) == (target, stream)]
        for client in CLIENTS:
            us = [r["us_per_req"] for r in mine if r["client"] == client]
            cell[client] = {"median": round(pct(us, 50), 1), "min": round(min(us), 1), "max": round(max(us), 1)}
        cell["aiohttp_over_raw"] = round(cell["aiohttp"]["median"] / cell["raw"]["median"], 2)
        by_rep = {(r["repeat"], r["client"]): r["us_per_req"] for r in mine}
        reps = {r["repeat"] for r in mine}
        cell["aiohttp_over_raw_min"] = round(min(by_rep[k, "aiohttp"] / by_rep[k, "raw"] for k in reps), 2)
        out.append(cell)
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure, print one line per run and the summary table, write ``--json``."""
    p = argparse.ArgumentParser(prog="python -m bench.clientcost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=300.0)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="json_path")
    a = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    with tempfile.TemporaryDirectory(prefix="mgpu-clientcost-") as d:
        rows = measure(a, Path(d))
    table = summary(rows)
    print("\n| target | stream | raw µs/req: median (range) | aiohttp µs/req: median (range) "
          "| aiohttp / raw: medians (lowest in one repetition) |")
    print("|---|---|---:|---:|---:|")
    for c in table:
        raw, aio = c["raw"], c["aiohttp"]
        print(f"| {c['target']} | {'yes' if c['stream'] else 'no'} | {raw['median']} ({raw['min']}–{raw['max']}) "
              f"| {aio['median']} ({aio['min']}–{aio['max']}) | {c['aiohttp_over_raw']}x "
              f"({c['aiohttp_over_raw_min']}x) |")
    if a.json_path:
        doc = {"started": started, "cores": os.cpu_count(), "args": vars(a), "runs": rows, "summary": table}
        Path(a.json_path).write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

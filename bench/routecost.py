"""What routing the generation endpoints costs the gateway, three ways, in one run on one fleet:

* ``fast``: :class:`gateway.routes.GenerationFastPath`, the ASGI layer in front of FastAPI that calls
  the handler directly (what ``mgpu gateway`` serves);
* ``starlette``: plain Starlette routes for the two endpoints, inside the same FastAPI app;
* ``fastapi``: the FastAPI routes alone (a ``Request`` parameter; FastAPI's per-request machinery).

Three gateways, one per way, share a redis-server and one zero-cost sim worker; each runs the same
server as ``mgpu gateway`` (:func:`serve`: uvicorn with the guarded httptools protocol).  Every
repetition runs ``python -m bench`` against each gateway, the order rotated: an open loop at
``--rate`` (gateway CPU per request from /proc, latency), then a closed loop of 64 clients (req/s,
gateway CPU per request at saturation).

    python -m bench.routecost --json docs/routecost.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.cpucost import cpu_s, run_and_report
from bench.fleet import ROOT, Fleet, Proc, wait_http_ok
from bench.stats import pct
from ops.procs import free_port, spawn

MODES = ("fast", "starlette", "fastapi")
MODEL = "sim-zero"


def serve(mode: str) -> None:
    """Run a gateway (settings from ``MGPU_*``) that routes the generation endpoints the ``mode`` way."""
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from common import errors
    from common.settings import GatewaySettings
    from gateway import serving
    from gateway.app import create_app
    from gateway.http import error_response
    from gateway.routes import GenerationFastPath
    from gateway.server import GuardedHttpToolsProtocol, configure

    s = GatewaySettings.load()
    configure(s.http_read_timeout_s, s.max_connections, s.retry_after_s)
    app = create_app(s)

    def endpoint(kind: Any) -> Any:
        async def handle(request: Request) -> Response:
            try:
                return await serving.handle(request, kind)
            except errors.MgpuError as exc:
                return error_response(exc)
        return handle

    if mode == "starlette":
        app.router.routes[:0] = [Route("/v1/completions", endpoint("completion"), methods=["POST"]),
                                 Route("/v1/chat/completions", endpoint("chat"), methods=["POST"])]
    asgi: Any = GenerationFastPath(app) if mode == "fast" else app
    uvicorn.run(asgi, host=s.host, port=s.port, log_level="warning", access_log=False, loop="uvloop",
                http=GuardedHttpToolsProtocol)


def _load(url: str, args: argparse.Namespace, out: Path, closed: bool) -> dict[str, Any]:
    load = ["--concurrency", "64", "--duration", str(args.closed_duration)] if closed else \
        ["--rate", str(args.rate), "--requests", str(args.requests), "--duration", "600"]
    cmd = [sys.executable, "-m", "bench", "--url", url, "--model", MODEL, "--max-tokens", "16", *load,
           "--json", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return dict(json.loads(out.read_text())["results"][0])


def _gateway(fleet: Fleet, mode: str) -> Proc:
    port = free_port()
    env = fleet.env({"port": port, "health_port": free_port()})
    log = fleet.tmp / f"gateway-{mode}.log"
    p = Proc(f"gateway-{mode}", spawn([sys.executable, "-m", "bench.routecost", "--serve", mode], env=env,
                                      log_path=log, cwd=str(ROOT)), log, port=port)
    fleet.procs.append(p)
    wait_http_ok(p, f"http://127.0.0.1:{port}/ready", 60)
    return p


def measure(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with Fleet.launch(tmp, settings={"log_requests": "false"}) as fleet:
        fleet.start_worker(model=MODEL, slots=512, sim_decode_ms=0, sim_decode_ms_per_seq=0,
                           sim_prefill_ms_per_token=0)
        gws = {m: _gateway(fleet, m) for m in MODES}
        for rep in range(args.repeats):
            order = MODES[rep % 3:] + MODES[:rep % 3]
            for closed in (False, True):
                for m in order:
                    gw = gws[m]
                    c0 = cpu_s(gw.proc.pid)
                    res = _load(f"http://127.0.0.1:{gw.port}", args, tmp / "run.json", closed)
                    cpu = cpu_s(gw.proc.pid) - c0
                    row = {"repeat": rep + 1, "mode": m, "closed": closed, "ok": res["ok"],
                           "errors": sum(res["errors"].values()), "rps": res["throughput_rps"],
                           "p50_ms": res["latency_ms"]["p50"], "p99_ms": res["latency_ms"]["p99"],
                           "gateway_cpu_us_per_req": 1e6 * cpu / max(1, res["ok"])}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def table(rows: list[dict[str, Any]], rate: float) -> str:
    out = [f"| routing | gateway CPU µs/req at {rate:.0f} req/s | p50 / p99 ms | closed loop req/s "
           "| gateway CPU µs/req, closed loop |", "|---|---:|---:|---:|---:|"]
    for m in MODES:
        op = [r for r in rows if r["mode"] == m and not r["closed"]]
        cl = [r for r in rows if r["mode"] == m and r["closed"]]

        def cell(rs: list[dict[str, Any]], k: str, fmt: str = ".0f") -> str:
            v = [r[k] for r in rs]
            return f"{pct(v, 50):{fmt}} ({min(v):{fmt}}–{max(v):{fmt}})"

        out.append(f"| {m} | {cell(op, 'gateway_cpu_us_per_req')} | {pct([r['p50_ms'] for r in op], 50):.2f} / "
                   f"{pct([r['p99_ms'] for r in op], 50):.2f} | {cell(cl, 'rps')} | "
                   f"{cell(cl, 'gateway_cpu_us_per_req')} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.routecost", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=400.0)
    p.add_argument("--requests", type=int, default=6000)
    p.add_argument("--closed-duration", type=float, default=10.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="json_path")
    p.add_argument("--serve", choices=MODES, help=argparse.SUPPRESS)  # a gateway process of the run
    a = p.parse_args(argv)
    if a.serve:
        serve(a.serve)
        return 0
    return run_and_report("routecost", a, measure, table)


if __name__ == "__main__":
    sys.exit(main())

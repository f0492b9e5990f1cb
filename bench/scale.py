"""Scale figures: how mgpu's cost grows with the number of workers and of gateways.

1. workers (``--workers 1,8,32``): for each count a fresh fleet (a redis-server, AOF everysec, the
   production setting; one gateway; that many zero-cost sim workers, ``--slots`` slots each, 512 by
   default: every worker has 512, the total grows with the count).  Once the gateway routes to every
   worker and ``--settle`` seconds have passed:

   * idle (``--idle`` s, no load): CPU of redis-server, the gateway and the workers (% of one core,
     from /proc), and the Redis commands per second by command (``INFO commandstats`` after ``CONFIG
     RESETSTAT``): what idle workers and the gateway poll;
   * under load: a closed loop (``--clients`` clients, chat, ``--max-tokens``) for ``--duration`` s
     after a 2 s warm-up: req/s, latency, CPU of each part (µs per request and % of one core), and the
     Redis commands per request by command (calls during the run / successful requests): whether
     per-request Redis work grows with the number of workers.

2. gateways (``--gateways 1,2,3,4``): one fleet of ``--gateway-workers`` workers; gateways (each its own
   process and port) are added one at a time and, for each count, the same closed loop is split over
   them (one load generator per gateway, run concurrently in this process, their req/s summed).
   Throughput per core = req/s / (CPU seconds of the gateways, workers and redis-server / wall seconds).

Commands run by Lua scripts count in ``INFO commandstats`` under their own names (``evalsha`` is the
script call itself).  ``config`` and ``info`` (this program's own probes) are left out.  The load
generator runs on the same machine, sharing its cores (its CPU is reported too).  Sim figures only.

    python -m bench.scale --json docs/scale.json       # ~6 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench.cpucost import cpu_s
from bench.fleet import Fleet, FleetError, Proc, http_get
from bench.loadgen import raise_nofile, run_async, run_load
from bench.report import machine
from bench.result import BenchResult
from bench.stats import dist_ms
from bench.workload import BenchConfig
from ops.procs import wait_until

MODEL = "sim-zero"
ZERO = {"sim_decode_ms": 0.0, "sim_decode_ms_per_seq": 0.0, "sim_prefill_ms_per_token": 0.0}
PROBES = ("config", "info")  # this program's own commands, left out of the counts
PARTS = ("gateway", "workers", "redis")
TOP = 12
WARMUP_S = 2.0

# ----------------------------------------------------------------------------- pure logic


def parse_counts(spec: str) -> list[int]:
    """``"1,8,32"`` -> ``[1, 8, 32]`` (sorted, distinct); ValueError for a count below 1."""
    out = sorted({int(x) for x in spec.split(",") if x.strip()})
    if not out or out[0] < 1:
        raise ValueError(f"{spec!r}: give positive counts, comma-separated")
    return out


def split(clients: int, parts: int) -> list[int]:
    """``clients`` spread over ``parts`` load generators as evenly as possible (the first ones get the rest)."""
    return [clients // parts + (1 if i < clients % parts else 0) for i in range(parts)]


def command_calls(stats: Mapping[str, Any], ignore: Iterable[str] = PROBES) -> dict[str, int]:
    """``INFO commandstats`` as redis-py parses it (``{"cmdstat_xadd": {"calls": 3, ...}}``) ->
    ``{"xadd": 3}``, without the ``ignore`` commands (subcommands such as ``config|resetstat`` go
    with their command)."""
    skip = set(ignore)
    out: dict[str, int] = {}
    for key, v in stats.items():
        name = key.removeprefix("cmdstat_").lower()
        if name.split("|", 1)[0] in skip:
            continue
        calls = int(v["calls"]) if isinstance(v, Mapping) else 0
        out[name] = out.get(name, 0) + calls
    return out


def per_unit(calls: Mapping[str, int], n: float) -> dict[str, float]:
    """Calls divided by ``n`` (requests or seconds), largest first; empty when ``n`` is not positive."""
    if n <= 0:
        return {}
    return dict(sorted(((k, v / n) for k, v in calls.items()), key=lambda kv: (-kv[1], kv[0])))


def top_commands(per: Sequence[Mapping[str, float]], k: int = TOP) -> list[str]:
    """The ``k`` commands with the largest figure in any of ``per`` (one mapping per configuration),
    largest first: the rows of a table with one column per configuration."""
    best: dict[str, float] = {}
    for m in per:
        for name, v in m.items():
            best[name] = max(best.get(name, 0.0), v)
    return [n for n, _ in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]


def cores(before: Mapping[str, float], after: Mapping[str, float], wall_s: float) -> dict[str, float]:
    """CPU seconds used per part over ``wall_s`` wall seconds, as cores (1.0: one core busy), with
    ``serving``: their sum."""
    out = {k: (after[k] - before[k]) / wall_s if wall_s > 0 else 0.0 for k in before}
    out["serving"] = sum(out[k] for k in before)
    return out


def load_row(results: Sequence[BenchResult], wall_s: float, gen_cpu_s: float, used: Mapping[str, float],
             calls: Mapping[str, int], idle_calls_per_s: float | None = None) -> dict[str, Any]:
    """One closed loop's record (``results``: one per gateway, run at once): req/s summed, latency over
    every successful request, cores per part (``used``: :func:`cores`), CPU µs and Redis commands
    per successful request; ``idle_calls_per_s``: the idle fleet's command rate, as commands per request
    at this run's rate (the background share of ``calls_per_req``)."""
    ok = [s for r in results for s in r.samples if s.error is None]
    n = len(ok)
    rps = sum(r.throughput_rps for r in results)
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r.errors.items():
            errors[k] = errors.get(k, 0) + v
    lat = dist_ms([s.end - s.sched for s in ok]) or {}
    total = sum(calls.values())
    row: dict[str, Any] = {
        "ok": n, "errors": errors, "throughput_rps": rps, "p50_ms": lat.get("p50"), "p99_ms": lat.get("p99"),
        "wall_s": wall_s, "cores": dict(used), "loadgen_cores": gen_cpu_s / wall_s if wall_s > 0 else 0.0,
        "us_per_req": {k: 1e6 * used[k] * wall_s / n if n else None for k in used},
        "rps_per_serving_core": rps / used["serving"] if used.get("serving") else None,
        "calls_total": total, "calls_per_req_total": total / n if n else None,
        "calls_per_req": per_unit(calls, n),
    }
    if idle_calls_per_s is not None:
        row["idle_rate_calls_per_req"] = idle_calls_per_s * wall_s / n if n else None
    return row


# ----------------------------------------------------------------------------- tables


def _f(v: float | None, digits: int = 0) -> str:
    return "-" if v is None or v != v else f"{v:,.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def worker_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["| workers | slots each | start s | idle: redis CPU | idle: gateway+workers CPU | idle: redis cmd/s "
           "| req/s | p50 ms | p99 ms | load: redis CPU | redis µs/req | redis cmd/req | of which idle rate "
           "| serving cores | req/s per serving core | errors |", "|---:|" + "---:|" * 15]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['workers']} | {r['slots_per_worker']} | failed: {r['error'][:120]} |" + " |" * 13)
            continue
        i, ld = r["idle"], r["load"]
        out.append(
            f"| {r['workers']} | {r['slots_per_worker']} | {_f(r['startup_s'], 1)} | {_pct(i['cores']['redis'])} "
            f"| {_pct(i['cores']['gateway'] + i['cores']['workers'])} | {_f(i['calls_total_per_s'], 1)} "
            f"| {_f(ld['throughput_rps'])} | {_f(ld['p50_ms'], 2)} | {_f(ld['p99_ms'], 2)} "
            f"| {_pct(ld['cores']['redis'])} | {_f(ld['us_per_req']['redis'], 1)} | {_f(ld['calls_per_req_total'], 2)} "
            f"| {_f(ld.get('idle_rate_calls_per_req'), 3)} | {_f(ld['cores']['serving'], 2)} "
            f"| {_f(ld['rps_per_serving_core'])} | {sum(ld['errors'].values())} |")
    return out


def command_table(rows: Sequence[Mapping[str, Any]], unit: str, pick: str, digits: int) -> list[str]:
    """Commands (rows) by worker count (columns): ``pick`` "idle" (calls/s) or "load" (calls/request)."""
    good = [r for r in rows if "error" not in r]
    if not good:
        return []
    key = "calls_per_s" if pick == "idle" else "calls_per_req"
    per = [r[pick][key] for r in good]
    out = [f"| command ({unit}) | " + " | ".join(f"{r['workers']} workers" for r in good) + " |",
           "|---|" + "---:|" * len(good)]
    for name in top_commands(per):
        out.append(f"| {name} | " + " | ".join(_f(m.get(name), digits) for m in per) + " |")
    totals = [r[pick]["calls_total_per_s" if pick == "idle" else "calls_per_req_total"] for r in good]
    out.append("| **all** | " + " | ".join(_f(t, digits) for t in totals) + " |")
    return out


def gateway_table(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    out = ["| gateways | workers | req/s | p50 ms | p99 ms | gateways cores | workers cores | redis cores "
           "| serving cores | req/s per serving core | load generator cores | redis cmd/req | errors |",
           "|---:|" + "---:|" * 12]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['gateways']} | {r['workers']} | failed: {r['error'][:120]} |" + " |" * 10)
            continue
        ld = r["load"]
        c = ld["cores"]
        out.append(f"| {r['gateways']} | {r['workers']} | {_f(ld['throughput_rps'])} | {_f(ld['p50_ms'], 2)} "
                   f"| {_f(ld['p99_ms'], 2)} | {_f(c['gateway'], 2)} | {_f(c['workers'], 2)} | {_f(c['redis'], 2)} "
                   f"| {_f(c['serving'], 2)} | {_f(ld['rps_per_serving_core'])} | {_f(ld['loadgen_cores'], 2)} "
                   f"| {_f(ld['calls_per_req_total'], 2)} | {sum(ld['errors'].values())} |")
    return out


def tables(out: Mapping[str, Any]) -> str:
    s, m = out["settings"], out["machine"]
    lines = [f"machine: {m['cores']} CPU cores ({m.get('cpu') or 'unknown CPU'}), no GPU; the load generator, "
             f"redis-server, the gateways and the workers all share these cores. Zero-cost sim engines; closed loop "
             f"{s['clients']} clients, chat, max_tokens {s['max_tokens']}, {s['duration']:g} s; CPU % is of one core."]
    if out.get("workers"):
        lines += ["", f"### Workers (one gateway; {s['slots']} slots per worker, so total slots grow with the "
                  f"count; idle over {s['idle']:g} s, {s['settle']:g} s after every worker was routable)", "",
                  *worker_table(out["workers"]), "",
                  f"Idle: Redis commands per second by command (top {TOP})", "",
                  *command_table(out["workers"], "calls/s, idle", "idle", 1), "",
                  f"Under load: Redis commands per successful request by command (top {TOP}; scripts' "
                  "commands counted under their own names)", "",
                  *command_table(out["workers"], "calls/request", "load", 3)]
    if out.get("gateways"):
        lines += ["", f"### Gateways ({s['gateway_workers']} workers, {s['slots']} slots each; one load generator "
                  f"per gateway in one process, {s['clients']} clients split over them; serving cores = CPU s of "
                  f"gateways + workers + redis-server / wall s; {m['cores']} cores in all)", "",
                  *gateway_table(out["gateways"])]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measuring


@dataclass
class Meter:
    """The pids whose CPU counts, per part of the fleet."""

    pids: dict[str, list[int]]

    @classmethod
    def of(cls, fleet: Fleet) -> Meter:
        assert fleet.redis_server.proc is not None
        return cls({"gateway": [p.proc.pid for p in fleet.procs if p.worker_id is None],
                    "workers": [p.proc.pid for p in fleet.procs if p.worker_id is not None],
                    "redis": [fleet.redis_server.proc.pid]})

    def read(self) -> dict[str, float]:
        return {k: sum(cpu_s(p) for p in v) for k, v in self.pids.items()}


def wait_routes(fleet: Fleet, gateways: Sequence[Proc], timeout: float) -> None:
    """Until every gateway in ``gateways`` lists every worker of the fleet as ready; FleetError at once
    (with its log's tail) if any process of the fleet exits first."""
    want = {p.worker_id for p in fleet.workers()}

    def ready() -> bool:
        for p in fleet.procs:
            p.check_alive()
        for g in gateways:
            try:
                code, body = http_get(f"http://127.0.0.1:{g.port}/workers", timeout=5)
            except (OSError, ValueError):
                return False
            if code != 200 or not want <= {w.get("id") for w in body["workers"] if w.get("state") == "ready"}:
                return False
        return True

    wait_until(ready, timeout, f"{len(gateways)} gateway(s) routing to {len(want)} workers", interval=0.5)


def closed_loop(urls: Sequence[str], a: argparse.Namespace, duration: float, label: str) -> list[BenchResult]:
    """One closed loop per URL, run at once in this process, ``a.clients`` clients split over them."""
    cfgs = [BenchConfig(url=u, model=MODEL, endpoint="chat", max_tokens=a.max_tokens, concurrency=c,
                        duration=duration, warmup=0.0, label=f"{label} gw{i}")
            for i, (u, c) in enumerate(zip(urls, split(a.clients, len(urls)), strict=True))]

    async def all_of() -> list[BenchResult]:
        return list(await asyncio.gather(*(run_load(c) for c in cfgs)))

    out: list[BenchResult] = run_async(all_of())
    return out


def idle_phase(r: redis.Redis, meter: Meter, seconds: float) -> dict[str, Any]:
    """CPU of each part and Redis commands per second over ``seconds`` with no load."""
    r.config_resetstat()
    c0, t0 = meter.read(), time.perf_counter()
    time.sleep(seconds)
    c1, wall = meter.read(), time.perf_counter() - t0
    calls = command_calls(r.info("commandstats"))
    return {"seconds": wall, "cores": cores(c0, c1, wall), "calls_total_per_s": sum(calls.values()) / wall,
            "calls_per_s": per_unit(calls, wall)}


def load_phase(r: redis.Redis, meter: Meter, urls: Sequence[str], a: argparse.Namespace, label: str,
               idle_calls_per_s: float | None = None) -> dict[str, Any]:
    """A 2 s warm-up, then the measured closed loop with CPU and Redis commands around it."""
    closed_loop(urls, a, WARMUP_S, f"{label} warm-up")
    r.config_resetstat()
    c0, g0, t0 = meter.read(), time.process_time(), time.perf_counter()
    results = closed_loop(urls, a, a.duration, label)
    wall, gen = time.perf_counter() - t0, time.process_time() - g0
    c1 = meter.read()
    row = load_row(results, wall, gen, cores(c0, c1, wall), command_calls(r.info("commandstats")), idle_calls_per_s)
    print(f"{label}: {row['throughput_rps']:.0f} req/s, redis {100 * row['cores']['redis']:.0f}% of a core, "
          f"{row['calls_per_req_total'] or 0:.2f} redis cmd/req, serving cores {row['cores']['serving']:.2f}, "
          f"errors {sum(row['errors'].values())}", flush=True)
    return row


def start_workers(fleet: Fleet, n: int, a: argparse.Namespace) -> None:
    for i in range(n):
        fleet.start_worker(wait=False, worker_id=f"w{i}", model=MODEL, slots=a.slots, **ZERO)


def worker_run(n: int, a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """A fresh fleet of ``n`` workers and one gateway: its start time, the idle phase, the load phase."""
    row: dict[str, Any] = {"workers": n, "slots_per_worker": a.slots}
    with Fleet.launch(tmp / f"workers{n}", die_with_parent=True) as fleet:
        t0 = time.monotonic()
        gw = fleet.start_gateway(wait_ready=False, timeout=a.start_timeout)  # first: it starts on idle cores
        start_workers(fleet, n, a)
        wait_routes(fleet, [gw], a.start_timeout + 10 * n)
        row["startup_s"] = time.monotonic() - t0
        print(f"{n} workers: routable after {row['startup_s']:.1f} s", flush=True)
        meter, r = Meter.of(fleet), fleet.r
        try:
            time.sleep(a.settle)
            row["idle"] = idle_phase(r, meter, a.idle)
            i = row["idle"]
            print(f"{n} workers idle: redis {100 * i['cores']['redis']:.1f}% of a core, "
                  f"{i['calls_total_per_s']:.0f} cmd/s", flush=True)
            row["load"] = load_phase(r, meter, [fleet.base_url], a, f"{n} workers", i["calls_total_per_s"])
        finally:
            r.close()
    return row


def gateway_runs(a: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """One fleet of ``a.gateway_workers`` workers; gateways added one at a time, each count measured."""
    rows: list[dict[str, Any]] = []
    with Fleet.launch(tmp / "gateways", die_with_parent=True) as fleet:
        gws = [fleet.start_gateway(wait_ready=False, timeout=a.start_timeout)]  # before the workers, as above
        start_workers(fleet, a.gateway_workers, a)
        for g in a.gateways:
            row: dict[str, Any] = {"gateways": g, "workers": a.gateway_workers}
            try:
                while len(gws) < g:
                    gws.append(fleet.start_gateway(wait_ready=False, timeout=a.start_timeout))
                wait_routes(fleet, gws, a.start_timeout + 10 * a.gateway_workers)
                r = fleet.r
                try:
                    row["load"] = load_phase(r, Meter.of(fleet), [f"http://127.0.0.1:{p.port}" for p in gws], a,
                                             f"{g} gateway(s)")
                finally:
                    r.close()
            except (FleetError, TimeoutError) as e:
                row["error"] = str(e)
                print(f"{g} gateway(s): failed: {e}", file=sys.stderr, flush=True)
                rows.append(row)
                break
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1,8,32", help="worker counts (comma list; empty: skip the phase)")
    p.add_argument("--gateways", default="1,2,3,4", help="gateway counts (comma list; empty: skip the phase)")
    p.add_argument("--gateway-workers", type=int, default=4, help="workers behind the gateways in phase 2")
    p.add_argument("--slots", type=int, default=512, help="slots of every worker")
    p.add_argument("--clients", type=int, default=64, help="closed-loop clients (all gateways together)")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--duration", type=float, default=15.0, help="closed-loop seconds (after a 2 s warm-up)")
    p.add_argument("--idle", type=float, default=20.0, help="idle seconds measured per worker count")
    p.add_argument("--settle", type=float, default=5.0, help="seconds between routable and the idle phase")
    p.add_argument("--start-timeout", type=float, default=120.0, help="seconds for a gateway to start; the wait "
                   "for routable workers gets 10 s more per worker")
    p.add_argument("--json", dest="json_path", help="write the figures here")
    a = p.parse_args(argv)
    try:
        a.worker_counts = parse_counts(a.workers) if a.workers.strip() else []
        a.gateways = parse_counts(a.gateways) if a.gateways.strip() else []
    except ValueError as e:
        p.error(str(e))
    if a.duration <= 0 or a.idle <= 0 or a.settle < 0 or a.slots < 1 or a.gateway_workers < 1:
        p.error("--duration, --idle, --slots and --gateway-workers must be positive")
    if a.gateways and a.clients < a.gateways[-1]:
        p.error("--clients must be at least the largest gateway count")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    raise_nofile()
    cmd = " ".join(["python -m bench.scale", *(argv if argv is not None else sys.argv[1:])])
    settings = {k: v for k, v in vars(a).items() if k not in ("json_path", "worker_counts", "workers")}
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": cmd,
                           "machine": machine(), "settings": {**settings, "workers": a.worker_counts},
                           "sim": ZERO, "model": MODEL, "workers": [], "gateways": []}
    with tempfile.TemporaryDirectory(prefix="mgpu-scale-") as d:
        for n in a.worker_counts:
            try:
                out["workers"].append(worker_run(n, a, Path(d)))
            except (FleetError, TimeoutError) as e:
                print(f"{n} workers: failed: {e}", file=sys.stderr, flush=True)
                out["workers"].append({"workers": n, "slots_per_worker": a.slots, "error": str(e)})
        if a.gateways:
            try:
                out["gateways"] = gateway_runs(a, Path(d))
            except (FleetError, TimeoutError) as e:
                print(f"gateways: failed: {e}", file=sys.stderr, flush=True)
                out["gateways"] = [{"gateways": a.gateways[0], "workers": a.gateway_workers, "error": str(e)}]
    print("\n" + tables(out))
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

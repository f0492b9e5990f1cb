"""mgpu against its peers, in one run, under the same load generator (:mod:`bench.loadgen`):

* ``direct``: one ``mgpu sim-server`` called directly (the baseline: no router at all);
* ``vllm-router:round_robin`` and ``vllm-router:power_of_two``: vLLM's router (the ``vllm-router`` PyPI
  wheel, Rust) in front of ``--workers`` sim servers;
* ``sglang-router:round_robin`` and ``sglang-router:power_of_two``: SGLang's router (``sglang-router``),
  the same way, when it is installed;
* ``mgpu:<strategy>``: a gateway and ``--workers`` sim workers on a redis-server (AOF everysec, the
  production setting; ``--no-aof``), for every gateway strategy (switched at run time, one fleet).

Every engine is the sim at zero cost (no prefill or decode time), 512 slots, so what is measured is
the path.  Each target gets, per mode (non-streaming and streaming: ``--stream``), an open loop
(Poisson, ``--rate`` req/s: latency p50/p99 from the scheduled arrival; streaming: TTFT and the
inter-chunk interval) and then a closed loop (``--clients``: req/s).  CPU of every serving process
(router or gateway, the engines, redis-server) is read from /proc around each run and reported per
request; streaming against non-streaming gives the cost of one relayed chunk.  Every fleet is started
once; every repetition runs every target, the order rotated.  Sim figures only: no GPU is involved.

    python -m bench.peers --json docs/peers.json --plot docs/peers.png       # ~25 minutes on 2 cores

``--targets direct,vllm-router,mgpu:pull`` selects targets (a name before ``:`` selects all its policies).
The inter-chunk interval of a request is (last byte - first content chunk) / (content chunks - 1).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.compare import MODEL, mgpu_fleet
from bench.cpucost import cpu_s
from bench.fleet import ROOT, FleetError, Proc, http_get, settings_env, terminate_all, wait_http_ok
from bench.loadgen import raise_nofile, run_async, run_load
from bench.report import format_table, machine
from bench.result import BenchResult, Sample
from bench.stats import pct
from bench.workload import BenchConfig
from common.settings import STRATEGIES
from ops.procs import RedisServer, free_port, mgpu_cmd, spawn, wait_until

SIM = {"slots": 512, "sim_decode_ms": 0.0, "sim_decode_ms_per_seq": 0.0, "sim_prefill_ms_per_token": 0.0}
ROUTERS = {"vllm-router": ("vllm_router", "warning"), "sglang-router": ("sglang_router", "warn")}
POLICIES = ("round_robin", "power_of_two")
COMPONENTS = ("router", "engines", "redis")  # router: the router process or the mgpu gateway
LOADS = ("open", "closed")


# ----------------------------------------------------------------------------- targets


def router_installed(router: str) -> bool:
    return importlib.util.find_spec(ROUTERS[router][0]) is not None


def all_targets(installed: Callable[[str], bool] = router_installed) -> list[str]:
    """Every target name, in table order; a router that is not installed is left out."""
    names = ["direct"]
    for router in ROUTERS:
        if installed(router):
            names += [f"{router}:{p}" for p in POLICIES]
    return names + [f"mgpu:{s}" for s in STRATEGIES]


def select_targets(spec: str | None, names: Sequence[str]) -> list[str]:
    """The targets a ``--targets`` list names (a whole name, or a group: ``vllm-router``, ``mgpu``), in
    table order; ValueError for a selector that matches nothing."""
    if not spec:
        return list(names)
    chosen: set[str] = set()
    for sel in (s.strip() for s in spec.split(",")):
        if not sel:
            continue
        hit = {n for n in names if n == sel or n.split(":", 1)[0] == sel}
        if not hit:
            raise ValueError(f"--targets: {sel!r} matches none of {', '.join(names)} (a router that is not "
                             "installed is not offered)")
        chosen |= hit
    return [n for n in names if n in chosen]


def router_cmd(router: str, policy: str, port: int, metrics_port: int, worker_urls: Sequence[str]) -> list[str]:
    """The command line of a router over ``worker_urls`` (its metrics on a port of its own, so that
    several routers run side by side)."""
    module, level = ROUTERS[router]
    return [sys.executable, "-m", f"{module}.launch_router", "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", *worker_urls, "--policy", policy, "--prometheus-port", str(metrics_port),
            "--log-level", level]


@dataclass
class Target:
    """Where one target listens, its processes (checked before each run), the pids whose CPU counts
    per component, and what to do before and after each run (mgpu: set the strategy, wait idle)."""

    name: str
    url: str
    procs: list[Proc]
    pids: dict[str, list[int]]
    before: Callable[[], None] = lambda: None
    after: Callable[[], None] = lambda: None

    def cpu(self) -> dict[str, float]:
        return {k: sum(cpu_s(p) for p in self.pids.get(k, [])) for k in COMPONENTS}


@dataclass
class Fleets:
    """Every process this run started, stopped together by :meth:`stop`."""

    tmp: Path
    procs: list[Proc] = field(default_factory=list)
    stops: list[Callable[[], None]] = field(default_factory=list)

    def stop(self) -> None:
        for f in reversed(self.stops):
            with contextlib.suppress(Exception):
                f()
        terminate_all([p.proc for p in reversed(self.procs)])
        self.procs.clear()

    def sim_servers(self, n: int) -> list[Proc]:
        """``n`` ``mgpu sim-server`` processes (as :class:`bench.fleet.NginxFleet` starts them), up."""
        started = []
        for i in range(n):
            port = free_port()
            env = {"PYTHONPATH": str(ROOT), "MGPU_LOG_LEVEL": "WARNING",
                   **settings_env({**SIM, "port": port, "model": MODEL})}
            log = self.tmp / f"sim{i}.log"
            p = Proc(f"sim-server :{port}", spawn(mgpu_cmd("sim-server"), env=env, log_path=log,
                                                  die_with_parent=True), log, port=port)
            self.procs.append(p)
            started.append(p)
        for p in started:
            wait_http_ok(p, f"http://127.0.0.1:{p.port}/health", 30)
        return started

    def router(self, router: str, policy: str, sims: list[Proc]) -> Proc:
        """A router over ``sims``, once its /readiness counts every one of them healthy."""
        port = free_port()
        urls = [f"http://127.0.0.1:{s.port}" for s in sims]
        log = self.tmp / f"{router}-{policy}.log"
        p = Proc(f"{router} {policy}", spawn(router_cmd(router, policy, port, free_port(), urls), log_path=log,
                                             die_with_parent=True), log, port=port)
        self.procs.append(p)

        def ready() -> bool:
            p.check_alive()
            with contextlib.suppress(OSError, ValueError):
                code, body = http_get(f"http://127.0.0.1:{port}/readiness", timeout=1)
                return code == 200 and isinstance(body, dict) and body.get("healthy_workers") == len(sims)
            return False

        wait_until(ready, 60, f"{p.name}: {len(sims)} healthy workers", interval=0.2)
        return p


def launch(names: list[str], args: argparse.Namespace, fleets: Fleets) -> list[Target]:
    """Start what the targets ``names`` need (sim servers, routers, one mgpu fleet); their Targets."""
    out: list[Target] = []
    need_routers = any(n.split(":")[0] in ROUTERS for n in names)
    sims = fleets.sim_servers(args.workers if need_routers else 1) if need_routers or "direct" in names else []
    engines = {"engines": [s.proc.pid for s in sims]}
    for name in names:
        group, _, policy = name.partition(":")
        if name == "direct":
            out.append(Target(name, f"http://127.0.0.1:{sims[0].port}", sims[:1], {"engines": [sims[0].proc.pid]}))
        elif group in ROUTERS:
            r = fleets.router(group, policy, sims)
            out.append(Target(name, f"http://127.0.0.1:{r.port}", [r, *sims], {"router": [r.proc.pid], **engines}))
    mgpu = [n for n in names if n.startswith("mgpu:")]
    if mgpu:
        (fleets.tmp / "mgpu").mkdir()
        srv = RedisServer(fleets.tmp / "redis", appendonly=not args.no_aof, die_with_parent=True).start()
        fleets.stops.append(srv.stop)
        fleet = mgpu_fleet(fleets.tmp / "mgpu", srv, args.workers, SIM)
        fleets.stops.append(fleet.stop)
        procs = list(fleet.procs)
        assert srv.proc is not None
        pids = {"router": [p.proc.pid for p in procs if p.worker_id is None],
                "engines": [p.proc.pid for p in procs if p.worker_id is not None], "redis": [srv.proc.pid]}
        for name in mgpu:
            strategy = name.split(":", 1)[1]
            out.append(Target(name, fleet.base_url, procs, pids,
                              before=functools.partial(fleet.set_strategy, strategy), after=fleet.wait_idle))
    order = {n: i for i, n in enumerate(names)}
    return sorted(out, key=lambda t: order[t.name])


# ----------------------------------------------------------------------------- one run


def measured(samples: Iterable[Sample], cfg: BenchConfig) -> list[Sample]:
    """The successful requests scheduled inside the measured window."""
    return [s for s in samples if s.error is None and cfg.warmup <= s.sched < cfg.warmup + cfg.duration]


def chunk_gaps_ms(samples: Iterable[Sample]) -> list[float]:
    """Per request with two content chunks or more: its mean interval between chunks, in ms
    ((last byte - first content chunk) / (chunks - 1))."""
    return [(s.end - s.first) * 1000 / (s.chunks - 1) for s in samples if s.first is not None and s.chunks > 1]


def run_row(target: str, stream: bool, load: str, rep: int, res: BenchResult, cfg: BenchConfig,
            cpu: dict[str, float]) -> dict[str, Any]:
    """One run's record: latency, TTFT, inter-chunk interval, errors, and CPU per request of each
    component (CPU over the whole run, warmup included, / every successful request of the run)."""
    lat, ttft = res.latency_ms or {}, res.ttft_ms or {}
    gaps = chunk_gaps_ms(measured(res.samples, cfg))
    ok_all = max(1, sum(1 for s in res.samples if s.error is None))
    row: dict[str, Any] = {
        "target": target, "stream": stream, "load": load, "repeat": rep + 1, "rate": res.rate,
        "concurrency": res.concurrency, "offered": res.offered, "ok": res.ok, "errors": res.error_count,
        "error_kinds": res.errors, "throughput_rps": res.throughput_rps, "p50_ms": lat.get("p50"),
        "p99_ms": lat.get("p99"), "ttft_p50_ms": ttft.get("p50"), "ttft_p99_ms": ttft.get("p99"),
        "gap_p50_ms": pct(gaps, 50) if gaps else None, "gap_p99_ms": pct(gaps, 99) if gaps else None,
        "chunks_mean": res.chunks_mean, "lateness_p99_ms": (res.lateness_ms or {}).get("p99"),
        "fell_behind": res.fell_behind, "gen_us_per_req": 1e6 * res.cpu_s / ok_all}
    for k in COMPONENTS:
        row[f"{k}_us_per_req"] = 1e6 * cpu.get(k, 0.0) / ok_all
    row["serving_us_per_req"] = sum(row[f"{k}_us_per_req"] for k in COMPONENTS)
    return row


def bench_cfg(url: str, args: argparse.Namespace, stream: bool, load: str, seed: int, label: str,
              duration: float | None = None, warmup: float | None = None) -> BenchConfig:
    kw: dict[str, Any] = {"rate": args.rate} if load == "open" else {"concurrency": args.clients}
    return BenchConfig(url=url, model=MODEL, endpoint="chat", stream=stream, max_tokens=args.max_tokens,
                       duration=args.duration if duration is None else duration,
                       warmup=args.warmup if warmup is None else warmup, seed=seed, label=label, **kw)


def run_target(t: Target, args: argparse.Namespace, stream: bool, rep: int) -> tuple[list[dict[str, Any]],
                                                                                      list[BenchResult]]:
    """The open then the closed loop against ``t``, each with the CPU its serving processes used."""
    rows, results = [], []
    for load in LOADS:
        for p in t.procs:
            p.check_alive()
        t.before()
        cfg = bench_cfg(t.url, args, stream, load, rep, f"{t.name} {load}{' sse' if stream else ''} #{rep + 1}")
        c0 = t.cpu()
        res: BenchResult = run_async(run_load(cfg))
        c1 = t.cpu()
        t.after()
        row = run_row(t.name, stream, load, rep, res, cfg, {k: c1[k] - c0[k] for k in COMPONENTS})
        print(json.dumps({k: v for k, v in row.items() if k != "error_kinds"}, default=str), flush=True)
        rows.append(row)
        results.append(res)
    return rows, results


def modes(spec: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[spec]


def run_all(targets: list[Target], args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[BenchResult]]:
    """A short warm-up of every target, then ``--repeats`` rounds over every mode and target, the
    targets' order rotated by one each round."""
    for t in targets:
        for stream in modes(args.stream):
            t.before()
            run_async(run_load(bench_cfg(t.url, args, stream, "open", 99, "warm-up", duration=2.0, warmup=0.0)))
            t.after()
    rows: list[dict[str, Any]] = []
    results: list[BenchResult] = []
    for rep in range(args.repeats):
        k = rep % len(targets)
        for stream in modes(args.stream):
            for t in targets[k:] + targets[:k]:
                r, res = run_target(t, args, stream, rep)
                rows += r
                results += res
    return rows, results


# ----------------------------------------------------------------------------- summary


def _med(rows: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return pct(vals, 50) if vals else None


def summarize_runs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (target, stream): the median over repetitions of each figure (open loop: latency, TTFT,
    inter-chunk, CPU per request; closed loop: req/s), errors summed; first-seen order."""
    groups: dict[tuple[str, bool], dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        groups.setdefault((r["target"], r["stream"]), {"open": [], "closed": []})[r["load"]].append(r)
    out = []
    for (target, stream), g in groups.items():
        o, c = g["open"], g["closed"]
        s: dict[str, Any] = {"target": target, "stream": stream, "repeats": max(len(o), len(c)),
                             "errors": sum(r["errors"] for r in o + c),
                             "fell_behind": any(r["fell_behind"] for r in o)}
        for key in ("p50_ms", "p99_ms", "ttft_p50_ms", "ttft_p99_ms", "gap_p50_ms", "gap_p99_ms", "chunks_mean",
                    "serving_us_per_req", *(f"{k}_us_per_req" for k in COMPONENTS)):
            s[key] = _med(o, key)
        s["p99_ms_each"] = [r["p99_ms"] for r in o]
        s["closed_rps"] = _med(c, "throughput_rps")
        s["closed_p50_ms"] = _med(c, "p50_ms")
        s["closed_serving_us_per_req"] = _med(c, "serving_us_per_req")
        out.append(s)
    return compare_to(out)


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def compare_to(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adds, to each summary row: what it adds to the direct baseline's latency (same mode), its
    closed-loop req/s as a fraction of the baseline's; for streaming rows with a non-streaming twin,
    the cost of one chunk: (streaming - non-streaming) serving CPU per request and p50 latency,
    divided by the content chunks per request."""
    by = {(s["target"], s["stream"]): s for s in summary}
    for s in summary:
        base = by.get(("direct", s["stream"]))
        s["added_p50_ms"] = _diff(s["p50_ms"], base["p50_ms"]) if base else None
        s["added_p99_ms"] = _diff(s["p99_ms"], base["p99_ms"]) if base else None
        s["closed_vs_direct"] = (s["closed_rps"] / base["closed_rps"]
                                 if base and s["closed_rps"] and base["closed_rps"] else None)
        twin = by.get((s["target"], False)) if s["stream"] else None
        chunks = s["chunks_mean"]
        ok = bool(twin and chunks)
        cpu = _diff(s["serving_us_per_req"], twin["serving_us_per_req"]) if twin else None
        lat = _diff(s["p50_ms"], twin["p50_ms"]) if twin else None
        s["chunk_cpu_us"] = cpu / chunks if ok and cpu is not None else None
        s["chunk_p50_ms"] = lat / chunks if ok and lat is not None else None
    return summary


def _f(v: float | None, digits: int = 1, sign: bool = False) -> str:
    if v is None or v != v:
        return "-"
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def _x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def tables(summary: list[dict[str, Any]], args: argparse.Namespace) -> str:
    """The Markdown tables: non-streaming, then streaming (each only if it ran)."""
    head = (f"open loop {args.rate:.0f} req/s Poisson (latency from the scheduled arrival), closed loop "
            f"{args.clients} clients; chat, max_tokens {args.max_tokens}; {args.workers} zero-cost sim engines "
            f"(direct: one); median of {args.repeats} repetition(s) x {args.duration:.0f} s; CPU: µs per request")
    lines = [head, ""]
    plain = [s for s in summary if not s["stream"]]
    if plain:
        lines += ["| target | p50 ms | p99 ms | +p50 vs direct | +p99 vs direct | closed req/s | vs direct "
                  "| router/gateway CPU | engines CPU | redis CPU | serving CPU | errors |",
                  "|---|" + "---:|" * 11]
        for s in plain:
            lines.append(f"| {s['target']} | {_f(s['p50_ms'], 2)} | {_f(s['p99_ms'], 2)} "
                         f"| {_f(s['added_p50_ms'], 2, True)} | {_f(s['added_p99_ms'], 2, True)} "
                         f"| {_f(s['closed_rps'], 0)} | {_x(s['closed_vs_direct'])} "
                         f"| {_f(s['router_us_per_req'], 0)} | {_f(s['engines_us_per_req'], 0)} "
                         f"| {_f(s['redis_us_per_req'], 0)} | {_f(s['serving_us_per_req'], 0)} | {s['errors']} |")
        lines.append("")
    sse = [s for s in summary if s["stream"]]
    if sse:
        lines += ["streaming: TTFT from the scheduled arrival; gap = mean interval between content chunks of a "
                  "request; per chunk = (streaming - non-streaming) / content chunks per request", "",
                  "| target | p50 ms | p99 ms | TTFT p50 | TTFT p99 | gap p50 ms | gap p99 ms | chunks/req "
                  "| closed req/s | serving CPU | CPU µs per chunk | p50 ms per chunk | errors |",
                  "|---|" + "---:|" * 12]
        for s in sse:
            lines.append(f"| {s['target']} | {_f(s['p50_ms'], 2)} | {_f(s['p99_ms'], 2)} | {_f(s['ttft_p50_ms'], 2)} "
                         f"| {_f(s['ttft_p99_ms'], 2)} | {_f(s['gap_p50_ms'], 3)} | {_f(s['gap_p99_ms'], 3)} "
                         f"| {_f(s['chunks_mean'], 1)} | {_f(s['closed_rps'], 0)} "
                         f"| {_f(s['serving_us_per_req'], 0)} | {_f(s['chunk_cpu_us'], 1, True)} "
                         f"| {_f(s['chunk_p50_ms'], 3, True)} | {s['errors']} |")
    if any(s["fell_behind"] for s in summary):
        lines.append("\nWARNING: the generator fell behind its open-loop schedule in some run (see the JSON)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- plot


def _barh(ax: Any, names: list[str], series: list[tuple[str, list[float | None]]], title: str) -> None:
    """Grouped horizontal bars, one group per target (top to bottom), one bar per series."""
    h = 0.8 / max(1, len(series))
    for i, (label, vals) in enumerate(series):
        ys = [j + (i - (len(series) - 1) / 2) * h for j in range(len(names))]
        ax.barh(ys, [float("nan") if v is None else v for v in vals], height=h, label=label)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)


def plot(summary: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(s["target"] for s in summary))
    by = {(s["target"], s["stream"]): s for s in summary}

    def col(stream: bool, key: str) -> list[float | None]:
        return [by[(n, stream)][key] if (n, stream) in by else None for n in names]

    fig, axes = plt.subplots(1, 4, figsize=(20, 0.35 * len(names) + 2.5), sharey=True)
    _barh(axes[0], names, [("p50", col(False, "p50_ms")), ("p99", col(False, "p99_ms"))],
          f"open loop {args.rate:.0f} req/s, non-streaming: latency (ms)")
    _barh(axes[1], names, [("non-streaming", col(False, "closed_rps")), ("streaming", col(True, "closed_rps"))],
          f"closed loop {args.clients} clients: req/s")
    _barh(axes[2], names, [("TTFT p50", col(True, "ttft_p50_ms")), ("TTFT p99", col(True, "ttft_p99_ms")),
                           ("gap p99 x10", [None if v is None else 10 * v for v in col(True, "gap_p99_ms")])],
          "streaming, open loop: TTFT, inter-chunk gap x10 (ms)")
    left = [0.0] * len(names)
    for k in COMPONENTS:
        vals = [v or 0.0 for v in col(False, f"{k}_us_per_req")]
        axes[3].barh(range(len(names)), vals, left=left, label=k)
        left = [a + b for a, b in zip(left, vals, strict=True)]
    axes[3].set_title("serving CPU per request, open loop, non-streaming (µs)", fontsize=9)
    axes[3].legend(fontsize=7)
    axes[3].grid(axis="x", alpha=0.3)
    fig.suptitle(f"mgpu and peer routers over {args.workers} zero-cost sim engines (direct: one), "
                 f"{os.cpu_count()} CPU cores, no GPU; median of {args.repeats} x {args.duration:.0f} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ----------------------------------------------------------------------------- main


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4, help="sim engines behind each router and mgpu")
    p.add_argument("--rate", type=float, default=400.0, help="open-loop req/s")
    p.add_argument("--clients", type=int, default=64, help="closed-loop clients")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds at the start of each run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--stream", choices=("off", "on", "both"), default="both",
                   help="non-streaming, streaming, or both (default; both give the cost per chunk)")
    p.add_argument("--targets", help="comma list of targets or groups (default: all); see the list above")
    p.add_argument("--no-aof", action="store_true", help="mgpu's redis-server without AOF")
    p.add_argument("--json", dest="json_path", help="write the runs and the summary here")
    p.add_argument("--plot", dest="plot_path", help="write the plot (PNG) here")
    p.add_argument("--runs-table", action="store_true", help="also print the load generator's table of every run")
    a = p.parse_args(argv)
    if a.workers < 1 or a.repeats < 1 or a.duration <= 0 or a.rate <= 0 or a.clients < 1:
        p.error("--workers, --repeats, --clients, --duration and --rate must be positive")
    try:
        a.names = select_targets(a.targets, all_targets())
    except ValueError as e:
        p.error(str(e))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    per_run = 2 * (a.warmup + a.duration) + 1
    est = len(a.names) * len(modes(a.stream)) * (a.repeats * per_run + 2)
    print(f"targets: {', '.join(a.names)}; about {est / 60:.0f} minutes", flush=True)
    raise_nofile()
    cmd = " ".join(["python -m bench.peers", *(argv if argv is not None else sys.argv[1:])])
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": cmd,
                           "machine": machine(),
                           "versions": {d: _version(d) for d in ("vllm-router", "sglang-router")},
                           "settings": {k: v for k, v in vars(a).items() if k not in ("json_path", "plot_path")},
                           "sim": SIM, "model": MODEL}
    with tempfile.TemporaryDirectory(prefix="mgpu-peers-") as d:
        fleets = Fleets(Path(d))
        try:
            targets = launch(a.names, a, fleets)
            rows, results = run_all(targets, a)
        except FleetError as e:
            print(f"a process of the fleet exited: {e}", file=sys.stderr)
            return 1
        finally:
            fleets.stop()
    out["runs"] = rows
    out["summary"] = summarize_runs(rows)
    if a.runs_table:
        print(format_table(results, markdown=True))
    print("\n" + tables(out["summary"], a))
    if a.json_path:
        Path(a.json_path).write_text(json.dumps(out, indent=1))
    if a.plot_path:
        plot(out["summary"], a, Path(a.plot_path))
    return 0


if __name__ == "__main__":
    sys.exit(main())

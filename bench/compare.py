"""Side-by-side comparison of mgpu's balancing strategies and nginx round-robin, plus worker scaling.

    python -m bench.compare --out docs            # ~15 minutes on a 2-core machine

Part 1: one sim fleet (4 workers x 16 slots, decode 10 ms + 0.1 ms per running sequence, prefill
0.02 ms per prompt token), requests 90 % max_tokens=32 / 10 % max_tokens=1024, streaming.  The
fleet's capacity is measured first (closed loop, saturating, ``pull``); then every mgpu strategy
(switched at run time through the control hash, same gateway and workers) and nginx round-robin
(``upstream`` over 4 ``mgpu sim-server`` processes with the same engine settings) run open-loop
Poisson load at 50 %, 80 % and 95 % of that capacity.
Part 2: throughput of 1, 2, 4, 8 workers (``pull``) under saturating closed-loop load with a fixed,
cheap sim cost (8 slots, 40 ms per step, 16 tokens) so that the fleet stays far below what the
gateway and load generator can do on 2 cores.

Writes ``<out>/balancing.json``, ``<out>/balancing.png`` and prints the Markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import Fleet, NginxFleet
from bench.loadgen import run_load
from bench.result import BenchResult, Sample
from bench.stats import pct
from bench.workload import BenchConfig
from ops.procs import RedisServer

MODEL = "sim"
MIX = [(0.9, 32), (0.1, 1024)]
SHORT_TOKENS = 32  # requests of at most this many tokens are "short" in the per-class p99
STRATEGIES = ["pull", "round_robin", "least_loaded", "weighted", "prefix_affinity"]
SIM = {"slots": 16, "sim_decode_ms": 10.0, "sim_decode_ms_per_seq": 0.1, "sim_prefill_ms_per_token": 0.02}
SCALE_SIM = {"slots": 8, "sim_decode_ms": 40.0, "sim_decode_ms_per_seq": 0.0, "sim_prefill_ms_per_token": 0.0}
SCALE_TOKENS = 16


def mgpu_fleet(tmp: Path, redis_server: RedisServer, n: int, sim: dict[str, Any]) -> Fleet:
    """A gateway and ``n`` sim workers (``w0`` ...) on the shared redis-server, in a namespace of
    their own, every one of them dying with this process; returned once the gateway routes to all."""
    fleet = Fleet(tmp, redis_server, ns=f"cmp{os.getpid()}n{n}", die_with_parent=True)
    try:
        for i in range(n):
            fleet.start_worker(wait=False, worker_id=f"w{i}", model=MODEL, **sim)
        fleet.start_gateway(wait_ready=False)
        fleet.wait_routable(60)
    except BaseException:
        fleet.stop()
        raise
    return fleet


def _cfg(url: str, **kw: Any) -> BenchConfig:
    base: dict[str, Any] = {"url": url, "model": MODEL, "endpoint": "completions", "stream": True, "mix": MIX,
                            "prompt_words": 32, "timeout": 300.0, "seed": 1}
    base.update(kw)
    return BenchConfig(**base)


def _row(r: BenchResult) -> dict[str, Any]:
    lat = r.latency_ms or {}
    ttft = r.ttft_ms or {}
    return {"label": r.label, "rate": r.rate, "concurrency": r.concurrency, "offered": r.offered, "ok": r.ok,
            "errors": r.error_count, "throughput_rps": round(r.throughput_rps, 2),
            "tokens_per_s": round(r.tokens_per_s, 1),
            "p50_ms": round(lat.get("p50", float("nan")), 1), "p99_ms": round(lat.get("p99", float("nan")), 1),
            "ttft_p50_ms": round(ttft.get("p50", float("nan")), 1),
            "ttft_p99_ms": round(ttft.get("p99", float("nan")), 1),
            "lateness_p99_ms": round((r.lateness_ms or {}).get("p99", 0.0), 2),
            "gen_cpu_util": round(r.cpu_s / r.wall_s, 2) if r.wall_s else 0.0}


def _measured(res: BenchResult, cfg: BenchConfig) -> list[Sample]:
    """The successful requests scheduled inside the measured window."""
    return [smp for smp in res.samples
            if smp.error is None and cfg.warmup <= smp.sched < cfg.warmup + cfg.duration]


def _p(values: list[float], q: float) -> float:
    """The ``q`` percentile to 0.1 ms (NaN when there are no values)."""
    return round(pct(values, q), 1)


def _class_stats(samples: list[Sample]) -> dict[str, float]:
    """Per-request metrics over measured samples (pooled over repetitions by the caller):
    p99 latency of the short (<= 32 tokens) and of the long requests, and p99 normalized latency
    (end-to-end latency / output tokens, ms per token: the vLLM paper's metric for mixed lengths)."""
    lat = [((smp.end - smp.sched) * 1000, smp.tokens) for smp in samples]
    return {"short_p99_ms": _p([ms for ms, t in lat if t <= SHORT_TOKENS], 99),
            "long_p99_ms": _p([ms for ms, t in lat if t > SHORT_TOKENS], 99),
            "norm_p99_ms_per_tok": _p([ms / max(t, 1) for ms, t in lat], 99)}


def _run(cfg: BenchConfig) -> tuple[dict[str, Any], list[Sample]]:
    res = asyncio.run(run_load(cfg))
    row = _row(res)
    samples = _measured(res, cfg)
    if cfg.mix:
        row.update(_class_stats(samples))
    print(json.dumps(row), flush=True)
    return row, samples


def pooled(system: str, load: float, reps: list[dict[str, Any]], samples: list[Sample],
           window_s: float) -> dict[str, Any]:
    """One (system, load) point over all its repetitions: percentiles of the pooled requests (each
    repetition is a different Poisson arrival sequence), and the spread of the per-repetition p99."""
    lat = [(smp.end - smp.sched) * 1000 for smp in samples]
    ttft = [(smp.first - smp.sched) * 1000 for smp in samples if smp.first is not None]
    return {"system": system, "load": load, "repeats": len(reps), "rate": reps[0]["rate"],
            "throughput_rps": round(sum(r["throughput_rps"] for r in reps) / len(reps), 2),
            "requests": len(samples), "errors": sum(r["errors"] for r in reps),
            "p50_ms": _p(lat, 50), "p99_ms": _p(lat, 99), "ttft_p50_ms": _p(ttft, 50), "ttft_p99_ms": _p(ttft, 99),
            **_class_stats(samples),
            "p99_ms_each": [r["p99_ms"] for r in reps], "short_p99_ms_each": [r.get("short_p99_ms") for r in reps],
            "lateness_p99_ms_max": max(r["lateness_p99_ms"] for r in reps), "window_s": window_s}


def p99_floor(sim: dict[str, Any], mix: list[tuple[float, int]], prompt_words: int) -> dict[str, Any]:
    """The lowest p99 end-to-end latency that ANY router could reach on this fleet and mix: every
    request served alone the moment it arrives (no queue, batch of one).  Take the request classes
    from the shortest up; the class where the cumulative share passes 99 % holds the p99."""
    cum, tokens, share = 0.0, 0, 0.0
    for share, tokens in sorted(mix, key=lambda x: x[1]):  # noqa: B007 (the class that holds the p99)
        cum += share
        if cum >= 0.99:
            break
    step = sim["sim_decode_ms"] + sim["sim_decode_ms_per_seq"]
    ms = sim["sim_prefill_ms_per_token"] * prompt_words + tokens * step  # the sim: one token per word
    return {"tokens": tokens, "ms": round(ms, 1),
            "why": f"{share:.0%} of requests generate {tokens} tokens, so the p99 is one of them; alone on a "
                   f"worker each takes {tokens} decode steps of {step:.1f} ms"}


def compare(args: argparse.Namespace, tmp: Path, redis_server: RedisServer) -> dict[str, Any]:
    """Both fleets stay up for the whole run, and every repetition runs every (load, system) point
    with the same arrival sequence (seed = repetition), rotating the order of the systems, so that
    drift on a shared machine falls on all systems alike."""
    out: dict[str, Any] = {"sim": SIM, "mix": MIX, "duration_s": args.duration, "warmup_s": args.warmup,
                           "repeats": args.repeats, "runs": [], "each": []}
    (tmp / "mgpu").mkdir()
    (tmp / "nginx").mkdir()
    fleet = mgpu_fleet(tmp / "mgpu", redis_server, 4, SIM)
    ng = NginxFleet(tmp / "nginx", 4, SIM, model=MODEL)
    try:
        ng.start()
        out["nginx_config"] = ng.config
        fleet.set_strategy("pull")
        cap, _ = _run(_cfg(fleet.base_url, concurrency=4 * SIM["slots"] * 2, duration=args.cap_duration,
                           warmup=args.cap_warmup, label="capacity (pull, closed loop)"))
        capacity = args.capacity or cap["throughput_rps"]
        out["capacity"] = {**cap, "used_rps": capacity}
        fleet.wait_idle()
        systems = [f"mgpu {s}" for s in STRATEGIES] + ["nginx round-robin"]
        acc: dict[tuple[str, float], tuple[list[dict[str, Any]], list[Sample]]] = {}
        for rep in range(args.repeats):
            for frac in args.loads:
                k = rep % len(systems)
                for system in systems[k:] + systems[:k]:
                    url = ng.base_url if system.startswith("nginx") else fleet.base_url
                    if not system.startswith("nginx"):
                        fleet.set_strategy(system.split()[1])
                    row, samples = _run(_cfg(url, rate=frac * capacity, duration=args.duration, warmup=args.warmup,
                                             seed=1 + rep, label=f"{system} @{frac:.0%} #{rep + 1}"))
                    out["each"].append({"system": system, "load": frac, "repeat": rep + 1, **row})
                    rows, pool = acc.setdefault((system, frac), ([], []))
                    rows.append(row)
                    pool.extend(samples)
                    fleet.wait_idle()
        for (system, frac), (rows, pool) in acc.items():
            out["runs"].append(pooled(system, frac, rows, pool, args.duration * len(rows)))
    finally:
        fleet.stop()
        ng.stop()
    out["p99_floor"] = p99_floor(SIM, MIX, 32)
    return out


def scaling(args: argparse.Namespace, tmp: Path, redis_server: RedisServer) -> list[dict[str, Any]]:
    """Saturating closed-loop throughput of 1, 2, 4, 8 (``--scale``) workers, and its efficiency."""
    rows = []
    for n in args.scale:
        d = tmp / f"scale{n}"
        d.mkdir()
        fleet = mgpu_fleet(d, redis_server, n, SCALE_SIM)
        try:
            row, _ = _run(_cfg(fleet.base_url, stream=False, mix=None, max_tokens=SCALE_TOKENS, prompt_words=8,
                            concurrency=2 * n * SCALE_SIM["slots"], duration=args.scale_duration, warmup=3.0,
                            label=f"scaling {n} workers"))
            rows.append({"workers": n, **row})
        finally:
            fleet.stop()
    base = rows[0]["throughput_rps"] / rows[0]["workers"]
    for r in rows:
        r["efficiency"] = round(r["throughput_rps"] / (r["workers"] * base), 3)
        r["ideal_rps"] = round(r["workers"] * SCALE_SIM["slots"] / (SCALE_TOKENS * SCALE_SIM["sim_decode_ms"] / 1000),
                               1)
    return rows


def _systems(data: dict[str, Any]) -> list[str]:
    return sorted({r["system"] for r in data["runs"]}, key=lambda s: (s.startswith("nginx"), s))


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("p99_ms", "p99 latency, all requests (s)", False),
              ("short_p99_ms", "p99 latency, 32-token requests (s)", True),
              ("ttft_p99_ms", "p99 time to first token ≈ time in queue (s)", True)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for s in _systems(data):
        rs = sorted((r for r in data["runs"] if r["system"] == s), key=lambda r: r["load"])
        style = "--" if s.startswith("nginx") else "-"
        for ax, (key, _, _) in zip(axes, panels, strict=True):
            ax.plot([r["load"] * 100 for r in rs], [r[key] / 1000 for r in rs], style, marker="o", label=s)
    floor = data.get("p99_floor")
    if floor:
        axes[0].axhline(floor["ms"] / 1000, color="grey", linestyle=":",
                        label="floor for any router (no queue, batch of 1)")
    for ax, (_, title, log) in zip(axes, panels, strict=True):
        ax.set(xlabel="offered load (% of measured fleet capacity)", ylabel="seconds", title=title)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    reps = data.get("repeats", 1)
    fig.suptitle("4 simulated workers (sim engine, 2-core CPU machine, no GPU): mgpu strategies vs nginx "
                 f"round-robin; {reps} repetition(s) x {data.get('duration_s', 0):.0f} s per point, pooled",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def verdict(data: dict[str, Any]) -> list[str]:
    """The claims the issue asks about, computed from the pooled points."""
    lines = []
    runs = {(r["system"], r["load"]): r for r in data["runs"]}
    floor = data.get("p99_floor")
    for load in sorted({r["load"] for r in data["runs"]}):
        pull, nginx = runs.get(("mgpu pull", load)), runs.get(("nginx round-robin", load))
        if not pull or not nginx:
            continue
        best = min((r for r in data["runs"] if r["load"] == load), key=lambda r: r["p99_ms"])
        lines.append(
            f"* {load:.0%}: pull / nginx round-robin: p99 all {pull['p99_ms']:.0f} / {nginx['p99_ms']:.0f} ms = "
            f"{_ratio(pull['p99_ms'], nginx['p99_ms'])}; "
            f"p99 32-token {_ratio(pull['short_p99_ms'], nginx['short_p99_ms'])}; "
            f"p99 TTFT {_ratio(pull['ttft_p99_ms'], nginx['ttft_p99_ms'])}; "
            f"p99 normalized latency {_ratio(pull['norm_p99_ms_per_tok'], nginx['norm_p99_ms_per_tok'])}. "
            f"Lowest p99 all: {best['system']} ({best['p99_ms']:.0f} ms; pull is "
            f"{(pull['p99_ms'] / best['p99_ms'] - 1) * 100:+.1f} %)."
            + (f" Floor for any router: {floor['ms']:.0f} ms = {_ratio(floor['ms'], nginx['p99_ms'])} of nginx's p99."
               if floor else ""))
    return lines


def tables(data: dict[str, Any]) -> str:
    lines = []
    cap = data.get("capacity")
    if cap:
        lines.append(f"Measured capacity (pull, closed loop, {cap['concurrency']} clients): "
                     f"**{cap['throughput_rps']:.1f} req/s** (used: {cap['used_rps']:.1f} req/s)\n")
    if data.get("runs"):
        lines.append("| system | load | offered req/s | throughput req/s | requests | p50 ms | p99 ms "
                     "| p99 ms each run | p99 32-tok ms | p99 1024-tok ms | p99 ms/token | TTFT p50 ms | TTFT p99 ms "
                     "| errors | gen lateness p99 ms |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in sorted(data["runs"], key=lambda r: (r["load"], r["system"].startswith("nginx"), r["system"])):
            each = " / ".join(f"{x:.0f}" for x in r.get("p99_ms_each", []))
            lines.append(f"| {r['system']} | {r['load']:.0%} | {r['rate']:.1f} | {r['throughput_rps']:.1f} "
                         f"| {r.get('requests', '')} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {each} "
                         f"| {r.get('short_p99_ms', float('nan')):.0f} | {r.get('long_p99_ms', float('nan')):.0f} "
                         f"| {r.get('norm_p99_ms_per_tok', float('nan')):.1f} | {r['ttft_p50_ms']:.0f} "
                         f"| {r['ttft_p99_ms']:.0f} | {r['errors']} | {r.get('lateness_p99_ms_max', 0.0):.1f} |")
        lines.append("")
        lines.extend(verdict(data))
    if data.get("scaling"):
        lines.append("\n| workers | clients | throughput req/s | ideal req/s | efficiency | p50 ms | p99 ms |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in data["scaling"]:
            lines.append(f"| {r['workers']} | {r['concurrency']} | {r['throughput_rps']:.1f} | {r['ideal_rps']:.1f} "
                         f"| {r['efficiency']:.0%} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs")
    p.add_argument("--duration", type=float, default=20.0, help="measured seconds per point")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 0.8, 0.95])
    p.add_argument("--repeats", type=int, default=3,
                   help="repetitions of every point (different arrivals each), pooled")
    p.add_argument("--capacity", type=float, default=None, help="skip nothing, but use this req/s as 100 %%")
    p.add_argument("--cap-duration", type=float, default=20.0)
    p.add_argument("--cap-warmup", type=float, default=15.0)
    p.add_argument("--scale", type=int, nargs="*", default=[1, 2, 4, 8])
    p.add_argument("--scale-duration", type=float, default=15.0)
    p.add_argument("--skip-compare", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "command": " ".join(["python -m bench.compare",
                                                                                          *(argv or sys.argv[1:])]),
                            "machine": f"{os.cpu_count()} CPU cores, no GPU, sim engine"}
    with tempfile.TemporaryDirectory(prefix="mgpu-compare-") as td:
        tmp = Path(td)
        srv = RedisServer(tmp / "redis", appendonly=False, die_with_parent=True).start()  # a killed run leaves nothing
        try:
            if not a.skip_compare:
                data.update(compare(a, tmp, srv))
            if a.scale:
                data["scaling"] = scaling(a, tmp, srv)
        finally:
            srv.stop()
    (out / "balancing.json").write_text(json.dumps(data, indent=1))
    if data.get("runs"):
        plot(data, out / "balancing.png")
    print(tables(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

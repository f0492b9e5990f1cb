"""Batch work beside interactive traffic: does a saturating batch backlog hurt interactive latency, and how much
of the idle slot-time does it fill?  Sim engine only (never a GPU figure).

    python -m bench.batchprio --json docs/batchprio.json
    python -m bench.batchprio --plot docs/batchprio.png docs/batchprio-*.json   # the runs side by side

One fleet (a redis-server, ``--workers`` sim workers with ``--slots`` slots and ``--reserve`` batch reserve
each, one gateway).  Two phases, the same open-loop interactive load (streaming chat, ``--rate`` req/s,
``--duration`` s, measured by ``bench.loadgen``): first alone, then with a batch backlog larger than the
fleet can finish in the phase, written to the model's batch stream by ``common.producer`` before the load
starts.  With ``--timeline`` each phase also splits the TTFT by the fleet's request logs
(:mod:`bench.timeline`: the wait for a worker, the engine's first step, the way back).  Slot occupancy is
sampled from the workers' registry (``in_flight`` / slots, every 0.25 s); the batch's share of the slot-time
that interactive traffic leaves idle is (occupancy with − occupancy alone) / (1 − occupancy alone).  On this
2-core machine the batch work's own CPU (the sim engine, its results) also competes with the interactive
requests for the same cores, which a GPU fleet would not see.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.fleet import Fleet
from bench.loadgen import run_load
from bench.report import machine, machine_cpu
from bench.timeline import ttft_parts
from bench.workload import BenchConfig
from common.producer import Producer
from common.schemas import WorkItem
from ops.procs import RedisServer

MODEL = "prio-sim"
SIM_DECODE_MS = 10.0  # the workers' step cost before the per-sequence part (bench.priomodel models it)


class Occupancy:
    """Busy slots over all slots, sampled from the registry every ``interval`` s while running."""

    def __init__(self, fleet: Fleet, slots: int, interval: float = 0.25) -> None:
        self.fleet, self.slots, self.interval = fleet, slots, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def __enter__(self) -> Occupancy:
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._t is not None:
            self._t.join()

    def _run(self) -> None:
        r = self.fleet.r
        ids = [p.worker_id for p in self.fleet.workers()]
        while not self._stop.wait(self.interval):
            vals = r.pipeline(transaction=False)
            for wid in ids:
                vals.hget(self.fleet.keys.worker(str(wid)), "in_flight")
            busy = sum(int(v or 0) for v in vals.execute())
            self.samples.append(busy / self.slots)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples) if self.samples else 0.0


def _phase(fleet: Fleet, args: argparse.Namespace, slots: int) -> dict[str, Any]:
    cfg = BenchConfig(url=fleet.base_url, model=MODEL, endpoint="chat", stream=True, max_tokens=args.max_tokens,
                      rate=args.rate, duration=args.duration, warmup=2.0, seed=3, client="aiohttp")
    cpu0, forks0 = machine_cpu(), int(fleet.r.info("stats").get("total_forks", 0))
    since = time.time() + cfg.warmup
    with Occupancy(fleet, slots) as occ:
        res = asyncio.run(run_load(cfg))
    cpu1, forks1 = machine_cpu(), int(fleet.r.info("stats").get("total_forks", 0))
    parts = None
    if args.timeline:  # the request logs' view: where each streamed request's TTFT went (bench.timeline)
        parts = ttft_parts([p.output() for p in fleet.procs if p.worker_id is None],
                           [p.output() for p in fleet.workers()], since, time.time(),
                           skip_streams=[fleet.keys.batch_stream(MODEL)])
    # TTFT from the scheduled arrival, and from the send (without the load generator's own lateness: a saturated
    # machine delays the sending too)
    ttft, sent = res.ttft_ms or {}, res.ttft_from_send_ms or {}
    return {"ok": res.ok, "errors": res.error_count, "fell_behind": res.fell_behind,
            "ttft_p50_ms": ttft.get("p50"), "ttft_p99_ms": ttft.get("p99"),
            "ttft_from_send_p50_ms": sent.get("p50"), "ttft_from_send_p99_ms": sent.get("p99"),
            "lateness_p99_ms": (res.lateness_ms or {}).get("p99"),
            "occupancy": round(occ.mean, 4), "samples": len(occ.samples),
            "redis_forks": forks1 - forks0,  # AOF rewrites in the phase (each a fork beside the serving)
            "machine_cpu_busy": round(1 - (cpu1[1] - cpu0[1]) / max(1, cpu1[0] - cpu0[0]), 3),
            "ttft_parts": parts}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--reserve", type=int, default=1, help="each worker's batch_reserve_slots")
    p.add_argument("--rate", type=float, default=60.0, help="interactive requests per second")
    p.add_argument("--duration", type=float, default=20.0)
    p.add_argument("--max-tokens", type=int, default=32, help="of each interactive request")
    p.add_argument("--batch-tokens", type=int, default=32, help="of each batch request")
    p.add_argument("--batch", type=int, default=12_000, help="batch requests written before the second phase")
    p.add_argument("--decode-ms-per-seq", type=float, default=0.1,
                   help="the sim's step time per running sequence (0: a step costs the same at any batch size)")
    p.add_argument("--no-preempt", action="store_true", help="workers with batch_preempt off")
    p.add_argument("--timeline", action="store_true",
                   help="log every request (INFO, JSON) and split each phase's TTFT by those logs (bench.timeline)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None, help="plot the reports given as arguments, run nothing")
    p.add_argument("reports", nargs="*", type=Path)
    args = p.parse_args(argv)
    if args.plot:
        plot([json.loads(f.read_text()) for f in args.reports],
             [f.stem.removeprefix("batchprio-") for f in args.reports], args.plot)
        return 0
    slots = args.workers * args.slots
    # the request logs (INFO, JSON) only with --timeline: a line per request costs CPU on this machine too
    logs: dict[str, Any] = {"log_level": "INFO", "log_json": True} if args.timeline else {}
    with tempfile.TemporaryDirectory(prefix="mgpu-batchprio-") as d:
        tmp = Path(d)
        srv = RedisServer(tmp / "redis").start()
        fleet = Fleet(tmp, srv)
        try:
            for _ in range(args.workers):
                fleet.start_worker(model=MODEL, slots=args.slots, batch_reserve_slots=args.reserve,
                                   sim_decode_ms=SIM_DECODE_MS, sim_decode_ms_per_seq=args.decode_ms_per_seq,
                                   batch_preempt=not args.no_preempt, **logs)
            fleet.start_gateway(**logs)
            alone = _phase(fleet, args, slots)
            print("alone:", json.dumps(alone), flush=True)
            producer = Producer(fleet.r, fleet.keys, MODEL)
            for start in range(0, args.batch, 1000):
                producer.submit([WorkItem(id=f"prio-{i}", kind="completion", model=MODEL, body={
                    "model": MODEL, "prompt": f"batch {i}", "max_tokens": args.batch_tokens})
                    for i in range(start, min(args.batch, start + 1000))])
            group = fleet.keys.batch_stream(MODEL)
            read0 = _entries_read(fleet, group)
            t0 = time.monotonic()
            with_batch = _phase(fleet, args, slots)
            elapsed = time.monotonic() - t0
            started = _entries_read(fleet, group) - read0
            with_batch["batch_started"] = started
            with_batch["batch_left"] = producer.backlog()
            with_batch["preempted"] = sum(int(fleet.r.hget(fleet.keys.worker(str(w.worker_id)), "preempted") or 0)
                                          for w in fleet.workers())
            print("with batch:", json.dumps(with_batch), flush=True)
        finally:
            fleet.stop()
            srv.stop()
    idle = 1 - alone["occupancy"]
    report = {
        "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "setup": {"timeline": args.timeline, "workers": args.workers, "slots": args.slots, "reserve": args.reserve,
                  "rate": args.rate,
                  "decode_ms_per_seq": args.decode_ms_per_seq, "preempt": not args.no_preempt,
                  "duration_s": args.duration, "max_tokens": args.max_tokens, "batch_tokens": args.batch_tokens,
                  "batch_requests": args.batch, "phase_s": round(elapsed, 1)},
        "alone": alone, "with_batch": with_batch,
        "ratios": {"ttft_p99": round(with_batch["ttft_p99_ms"] / alone["ttft_p99_ms"], 3),
                   "ttft_from_send_p99": round(with_batch["ttft_from_send_p99_ms"] / alone["ttft_from_send_p99_ms"], 3),
                   "ttft_p50": round(with_batch["ttft_p50_ms"] / alone["ttft_p50_ms"], 3),
                   "batch_share_of_idle": round((with_batch["occupancy"] - alone["occupancy"]) / idle, 3)
                   if idle > 0 else None,
                   "occupancy_with_batch": with_batch["occupancy"]},
    }
    print(json.dumps(report["ratios"]))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if with_batch["errors"] == 0 and alone["errors"] == 0 else 1


def plot(reports: list[dict[str, Any]], names: list[str], out: Path) -> None:
    """Per run: the p99 TTFT ratio, and the occupancy and the batch's share of idle slot-time, against the goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(15, 5.5))
    xs = range(len(reports))
    a1.bar(xs, [r["ratios"]["ttft_p99"] for r in reports], color="tab:blue")
    a1.axhline(1.2, color="red", linestyle="--", label="goal <= 1.2x")
    a1.set_title("interactive p99 TTFT, with batch / alone")
    a2.bar([x - 0.2 for x in xs], [r["ratios"]["occupancy_with_batch"] for r in reports], 0.4, label="occupancy")
    a2.bar([x + 0.2 for x in xs], [r["ratios"]["batch_share_of_idle"] for r in reports], 0.4,
           label="batch share of idle slot-time")
    a2.axhline(0.95, color="red", linestyle="--", label="occupancy goal 0.95")
    a2.axhline(0.90, color="orange", linestyle=":", label="share goal 0.90")
    a2.set_ylim(0.5, 1.02)
    for ax in (a1, a2):
        ax.set_xticks(list(xs), names, rotation=60, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle("batch beside interactive, sim engine, 4 workers x 32 slots, 2-core machine (not a GPU figure)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def _entries_read(fleet: Fleet, stream: str) -> int:
    groups = fleet.r.xinfo_groups(stream)
    return sum(int(g.get("entries-read") or 0) for g in groups)


if __name__ == "__main__":
    sys.exit(main())

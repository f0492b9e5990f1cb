"""A large batch through the Files and Batches APIs, end to end, on the sim engine (never a GPU figure).

    python -m bench.batch50k --lines 50000 --json docs/batch50k.json
    python -m bench.batch50k --lines 10000 --pad 10000 --code /path/to/old/checkout   # 100 MB, another checkout

One fleet (a redis-server, ``--workers`` sim workers, one gateway).  A JSONL of ``--lines`` chat requests is
uploaded with the official ``openai`` client, a batch created on it and polled until it ends; then the output
file is read back and every ``custom_id`` must be in it exactly once.  Sampled every 0.25 s meanwhile: Redis's
``used_memory`` and the batch stream's length, the gateway's RSS (``/proc``).  Reported: the time of each
stage, the peaks, and Redis's memory before the upload, after it, and at the end.  ``--pad N`` gives each request
an ``x_pad`` field of N characters (a larger file, the same work: the engines ignore a field they do not know, as
vLLM does); ``--code DIR`` runs the fleet from another checkout
of mgpu (a before and after with the same load).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import openai

from bench.fleet import Fleet
from bench.report import machine
from ops.procs import RedisServer

MODEL = "batch-sim"


class Sampler:
    """Peaks of Redis memory, the batch stream's length and the gateway's RSS, every ``interval`` s."""

    def __init__(self, fleet: Fleet, gateway_pid: int, interval: float = 0.25) -> None:
        self.fleet, self.pid, self.interval = fleet, gateway_pid, interval
        self.peak = {"redis_used_memory": 0, "batch_stream_len": 0, "gateway_rss": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()

    def _run(self) -> None:
        r, stream = self.fleet.r, self.fleet.keys.batch_stream(MODEL)
        while not self._stop.wait(self.interval):
            now = {"redis_used_memory": int(r.info("memory")["used_memory"]), "batch_stream_len": int(r.xlen(stream)),
                   "gateway_rss": rss(self.pid)}
            self.peak = {k: max(v, now[k]) for k, v in self.peak.items()}


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _mb(n: int) -> float:
    return round(n / 2**20, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lines", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--pad", type=int, default=0, help="characters of an x_pad field in each request")
    p.add_argument("--code", type=Path, default=None, help="the checkout the fleet runs (default: this one)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    pad = {"x_pad": "p" * args.pad} if args.pad else {}
    body = io.BytesIO()
    for i in range(args.lines):
        body.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
            "model": MODEL, "max_tokens": args.max_tokens,
            "messages": [{"role": "user", "content": f"line {i} of a large batch"}], **pad}}).encode() + b"\n")
    data = body.getvalue()
    with tempfile.TemporaryDirectory(prefix="mgpu-batch50k-") as d:
        tmp = Path(d)
        srv = RedisServer(tmp / "redis").start()
        fleet = Fleet(tmp, srv, **({"code": args.code.resolve()} if args.code else {}))
        try:
            for _ in range(args.workers):
                fleet.start_worker(model=MODEL, slots=args.slots, sim_decode_ms=2, sim_decode_ms_per_seq=0)
            gw = fleet.start_gateway(request_timeout_s=600)
            fleet.wait_routable()
            client = openai.OpenAI(base_url=fleet.base_url + "/v1", api_key="unused", max_retries=0, timeout=600)
            r = fleet.r
            mem0 = int(r.info("memory")["used_memory"])
            with Sampler(fleet, gw.proc.pid) as sampler:
                t0 = time.monotonic()
                f = client.files.create(file=("big.jsonl", data), purpose="batch")
                t_upload = time.monotonic() - t0
                mem_uploaded = int(r.info("memory")["used_memory"])
                t1 = time.monotonic()
                b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
                while b.status not in ("completed", "failed", "expired", "cancelled"):
                    time.sleep(0.5)
                    b = client.batches.retrieve(b.id)
                t_batch = time.monotonic() - t1
                out = client.files.content(b.output_file_id).text if b.output_file_id else ""
            ids = [json.loads(line)["custom_id"] for line in out.splitlines() if line.strip()]
            mem_end = int(r.info("memory")["used_memory"])
            report: dict[str, Any] = {
                "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "setup": {"lines": args.lines, "workers": args.workers, "slots": args.slots,
                          "max_tokens": args.max_tokens, "file_bytes": len(data), "pad": args.pad,
                          "code": str(args.code.resolve()) if args.code else "."},
                "status": b.status, "request_counts": b.request_counts.model_dump() if b.request_counts else None,
                "output_lines": len(ids), "unique_custom_ids": len(set(ids)),
                "every_custom_id_once": sorted(ids) == sorted(f"req-{i}" for i in range(args.lines)),
                "upload_s": round(t_upload, 2), "batch_s": round(t_batch, 1),
                "validating_s": (b.in_progress_at - b.created_at) if b.in_progress_at else None,  # whole seconds
                "requests_per_s": round(args.lines / t_batch, 1),
                "redis_used_memory_mb": {"before": _mb(mem0), "after_upload": _mb(mem_uploaded),
                                         "peak": _mb(sampler.peak["redis_used_memory"]), "end": _mb(mem_end)},
                "batch_stream_len_peak": sampler.peak["batch_stream_len"],
                "gateway_rss_peak_mb": round(sampler.peak["gateway_rss"] / 2**20, 1),
            }
        finally:
            fleet.stop()
            srv.stop()
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["every_custom_id_once"] and report["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())

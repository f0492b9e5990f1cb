"""The gateway's footprint: start-up time (until ``/health`` answers) and resident memory once up, for one or
more checkouts of mgpu measured in one run (each ``--code DIR`` starts its own ``mgpu gateway`` on a
redis-server of its own, ``--repeats`` times, the order rotated), and whether the process mapped any
torch library (it must not: the gateway imports no engine code).

    python -m bench.footprint --code /path/to/old/checkout --code . --json /tmp/footprint.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fleet import ROOT, Fleet
from ops.procs import free_port


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def measure(code: Path, tmp: Path) -> dict[str, Any]:
    with Fleet.launch(tmp, appendonly=False, code=code) as fleet:
        t0 = time.monotonic()
        p = fleet.start_gateway(wait_ready=False, port=free_port())
        up = time.monotonic() - t0
        time.sleep(1.0)  # its background loops started
        return {"start_s": round(up, 3), "rss_mib": round(_rss_mib(p.proc.pid), 1), "torch": _maps_torch(p.proc.pid)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--code", type=Path, action="append", default=None, help="a checkout (default: this one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    codes = [c.resolve() for c in (args.code or [ROOT])]
    runs: dict[str, list[dict[str, Any]]] = {str(c): [] for c in codes}
    with tempfile.TemporaryDirectory(prefix="mgpu-footprint-") as d:
        for rep in range(args.repeats):
            order = codes[rep % len(codes):] + codes[:rep % len(codes)]
            for i, code in enumerate(order):
                runs[str(code)].append(measure(code, Path(d) / f"r{rep}-{i}"))
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "repeats": args.repeats,
              "checkouts": {c: {"start_s_median": statistics.median(r["start_s"] for r in rs),
                                "rss_mib_median": statistics.median(r["rss_mib"] for r in rs),
                                "torch_mapped": any(r["torch"] for r in rs), "runs": rs} for c, rs in runs.items()}}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

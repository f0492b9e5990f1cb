"""What the sim engine's step cost allows the batch-priority goals (docs/benchmarks.md §12d): the interactive p99
TTFT with a saturating batch at most 1.2x its value alone, and slot occupancy at least 95 %.

The sim (gpu_worker/engine/sim.py) costs a step ``decode_ms + decode_ms_per_seq * running`` (plus the prefill of
what joins).  A request's first token waits for the step under way to end, then runs one step: its engine time
lies between one step and two, so at a high percentile it scales with the step cost.  With a batch filling the
slots to occupancy ``occ`` the step costs ``decode_ms + decode_ms_per_seq * occ * slots``; alone, at the
interactive load's own occupancy, less.  Their ratio is what the engine part of the TTFT grows by, whatever the
scheduling: **the occupancy goal sets a floor under the TTFT ratio**.  The rest of the TTFT (the queue and the
relay: ``G`` at p99) dilutes it: total ratio ~ (2 c_with + G) / (2 c_alone + G).

    python -m bench.priomodel docs/batchprio-tl-after-*.json docs/batchprio-reserve-*.json --plot docs/priomodel.png

prints, per report, the model's engine ratio beside the measured one (the request logs' engine part,
``--timeline`` reports only), and the non-engine p99 that a 1.2x total would need to stay constant.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.batchprio import SIM_DECODE_MS as DECODE_MS


def step_ms(occupancy: float, slots: int, per_seq: float, decode_ms: float = DECODE_MS) -> float:
    """The sim's decode step with ``occupancy`` of ``slots`` running (prefill left out)."""
    return decode_ms + per_seq * occupancy * slots


def engine_ratio(occ_with: float, occ_alone: float, slots: int, per_seq: float) -> float:
    """The growth of the engine part of the TTFT (one wait for the step boundary plus one step) by the batch."""
    return step_ms(occ_with, slots, per_seq) / step_ms(occ_alone, slots, per_seq)


def constant_needed(occ_with: float, occ_alone: float, slots: int, per_seq: float, goal: float = 1.2) -> float:
    """The p99 of the TTFT outside the engine (ms) that keeps (2 c_with + G) / (2 c_alone + G) at ``goal``, if it
    did not grow with the batch; 0 when the engine part alone is within the goal."""
    cw, ca = step_ms(occ_with, slots, per_seq), step_ms(occ_alone, slots, per_seq)
    return max(0.0, (2 * cw - goal * 2 * ca) / (goal - 1))


def row(name: str, rep: dict[str, Any]) -> dict[str, Any]:
    s, a, w = rep["setup"], rep["alone"], rep["with_batch"]
    per_seq, slots = float(s.get("decode_ms_per_seq", 0.1)), int(s["slots"])
    occ_a, occ_w = float(a["occupancy"]), float(rep["ratios"]["occupancy_with_batch"])
    out: dict[str, Any] = {
        "run": name, "reserve": s.get("reserve"), "slots": slots, "per_seq_ms": per_seq, "occupancy_alone": occ_a,
        "occupancy_with": occ_w, "model_engine_ratio": round(engine_ratio(occ_w, occ_a, slots, per_seq), 3),
        "constant_needed_ms": round(constant_needed(occ_w, occ_a, slots, per_seq), 1),
        "ttft_p99_ratio": rep["ratios"]["ttft_p99"]}
    pa, pw = a.get("ttft_parts"), w.get("ttft_parts")
    if pa and pw:
        out["engine_p99_ms"] = [pa["engine_ms"]["p99"], pw["engine_ms"]["p99"]]
        out["measured_engine_ratio"] = round(pw["engine_ms"]["p99"] / pa["engine_ms"]["p99"], 3)
        out["rest_p99_ms"] = [round(pa["queue_ms"]["p99"] + pa["relay_ms"]["p99"], 1),
                              round(pw["queue_ms"]["p99"] + pw["relay_ms"]["p99"], 1)]
    return out


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for per_seq, colour in ((0.1, "tab:blue"), (0.0, "tab:green")):
        mine = [r for r in rows if r["per_seq_ms"] == per_seq]
        if not mine:
            continue
        occ_a = sum(r["occupancy_alone"] for r in mine) / len(mine)
        xs = [0.5 + i / 100 for i in range(51)]
        ax.plot(xs, [engine_ratio(x, occ_a, mine[0]["slots"], per_seq) for x in xs], color=colour, linestyle="-",
                label=f"model: engine part, {per_seq} ms per running seq")
        ax.scatter([r["occupancy_with"] for r in mine if "measured_engine_ratio" in r],
                   [r["measured_engine_ratio"] for r in mine if "measured_engine_ratio" in r], color=colour,
                   marker="o", label=f"measured engine part p99 ratio ({per_seq} ms)")
        ax.scatter([r["occupancy_with"] for r in mine], [r["ttft_p99_ratio"] for r in mine], color=colour,
                   marker="x", label=f"measured client p99 TTFT ratio ({per_seq} ms)")
    ax.axhline(1.2, color="red", linestyle="--", label="goal: p99 ratio <= 1.2")
    ax.axvline(0.95, color="orange", linestyle=":", label="goal: occupancy >= 0.95")
    ax.set_xlabel("slot occupancy with the batch")
    ax.set_ylabel("with batch / alone")
    ax.set_title("The sim's step cost: occupancy against the interactive TTFT (2-core machine, not a GPU figure)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", nargs="+", type=Path, help="bench.batchprio JSON reports")
    p.add_argument("--plot", type=Path, default=None)
    args = p.parse_args(argv)
    rows = [row(f.stem, json.loads(f.read_text())) for f in args.reports]
    print("| run | reserve | occupancy alone → with | model engine ratio | measured engine p99 ratio "
          "(alone → with, ms) | queue+relay p99 (alone → with, ms) | constant non-engine p99 a 1.2x needs | "
          "client p99 ratio |")
    print("|---|---:|---|---:|---|---|---:|---:|")
    for r in rows:
        eng = (f"{r['measured_engine_ratio']} ({r['engine_p99_ms'][0]} → {r['engine_p99_ms'][1]})"
               if "measured_engine_ratio" in r else "–")
        rest = f"{r['rest_p99_ms'][0]} → {r['rest_p99_ms'][1]}" if "rest_p99_ms" in r else "–"
        print(f"| {r['run']} | {r['reserve']} | {r['occupancy_alone']:.3f} → {r['occupancy_with']:.3f} | "
              f"{r['model_engine_ratio']} | {eng} | {rest} | {r['constant_needed_ms']} ms | {r['ttft_p99_ratio']} |")
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())

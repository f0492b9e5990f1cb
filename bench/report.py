"""The load generator's tables: one row per :class:`bench.result.BenchResult` (plain text or
Markdown, as ``mgpu bench`` and ``python -m bench.core`` print them), then error breakdowns and warnings.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from bench.result import BenchResult


def _f(v: float | None, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}f}"


_COLUMNS = (
    "label", "target", "load", "offered", "ok", "err", "req/s", "tok/s",
    "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms", "ttft50", "ttft90", "ttft99",
    "late avg", "late max", "cpu%",
)


def _row(r: BenchResult) -> list[str]:
    lat = r.latency_ms or {}
    ttft = r.ttft_ms or {}
    late = r.lateness_ms or {}
    load = f"{r.rate:g}/s" if r.rate is not None else f"c={r.concurrency}"
    return [
        r.label or "-", r.target + ("/sse" if r.stream else ""), load, str(r.offered), str(r.ok),
        str(r.error_count), _f(r.throughput_rps), _f(r.tokens_per_s, 0),
        _f(lat.get("p50")), _f(lat.get("p90")), _f(lat.get("p99")), _f(lat.get("max")), _f(lat.get("mean")),
        _f(ttft.get("p50")), _f(ttft.get("p90")), _f(ttft.get("p99")),
        _f(late.get("mean"), 2), _f(late.get("max"), 1),
        _f(100.0 * r.cpu_s / r.wall_s if r.wall_s > 0 else 0.0, 0),
    ]


def format_table(results: Sequence[BenchResult], markdown: bool = False) -> str:
    """One row per result, then error breakdowns and warnings; ``markdown`` for docs tables."""
    rows = [list(_COLUMNS)] + [_row(r) for r in results]
    lines: list[str] = []
    if markdown:
        lines.append("| " + " | ".join(rows[0]) + " |")
        lines.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(rows[0]))) + "|")
        lines.extend("| " + " | ".join(r) + " |" for r in rows[1:])
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for row in rows:
            cells = (c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            lines.append("  ".join(cells).rstrip())
    notes: list[str] = []
    for r in results:
        name = r.label or r.target
        if r.errors:
            parts = ", ".join(f"{k}: {v}" for k, v in r.errors.items())
            notes.append(f"{name}: errors {parts}")
            for k, v in r.error_details.items():
                if v:
                    notes.append(f"  {k}: {v[:160]}")
        if r.fell_behind and r.lateness_ms:
            notes.append(
                f"{name}: WARNING the generator fell behind its schedule (send lateness p99 "
                f"{r.lateness_ms['p99']:.1f} ms, max {r.lateness_ms['max']:.1f} ms); latencies still count "
                "from the schedule; consider --procs"
            )
        if r.no_usage:
            notes.append(f"{name}: {r.no_usage} streamed replies had no usage chunk; tokens = content chunks")
    return "\n".join(lines + (["", *notes] if notes else []))


def machine() -> dict[str, Any]:
    """The machine a benchmark ran on, as its JSON records it: cores, CPU model, Python, platform, redis-server."""
    cpu = None
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), None)
    except OSError:
        pass
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    try:
        redis_v = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        redis_v = None
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(), "redis": redis_v}


def machine_cpu() -> tuple[int, int]:
    """(all, idle) jiffies of the machine so far, from /proc/stat: two readings give how busy its cores were."""
    with open("/proc/stat") as f:
        vals = [int(v) for v in f.readline().split()[1:]]
    return sum(vals), vals[3] + vals[4]


def _proc_cpu() -> tuple[dict[int, int], dict[int, float]]:
    """Every process's parent and CPU seconds (user + system), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    parent, cpu = {}, {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = (int(fields[11]) + int(fields[12])) / tick
    return parent, cpu


def _tree(parent: dict[int, int], root: int) -> set[int]:
    members, grew = {root}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in members} - members
        members |= more
        grew = bool(more)
    return members


def tree_pids(roots: Iterable[int]) -> set[int]:
    """The processes ``roots`` and their descendants, now."""
    parent, _cpu = _proc_cpu()
    return set().union(*(_tree(parent, root) for root in roots))


def tree_cpu(roots: dict[str, int]) -> dict[str, float]:
    """CPU seconds of each named process and its descendants now (living ones: read before they exit)."""
    parent, cpu = _proc_cpu()
    return {name: sum(cpu.get(p, 0.0) for p in _tree(parent, root)) for name, root in roots.items()}

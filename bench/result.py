"""A run's outcome: the raw per-request :class:`Sample` records and their summary
(:func:`summarize` -> :class:`BenchResult`, whose ``to_dict`` is the JSON that ``mgpu bench --json``
and the benchmark programs write), and :func:`overhead_ms`, the HTTP-minus-in-process difference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from bench.stats import dist_ms
from bench.workload import BenchConfig

LATE_WARN_MS = 5.0  # p99 send lateness above this: the generator did not keep up with its schedule


class Sample(NamedTuple):
    """One request; times are seconds from the run's start (shared by all processes)."""

    sched: float  # scheduled arrival (open loop) or start (closed loop)
    sent: float | None  # when its bytes were written (None: never sent)
    end: float
    first: float | None  # first content chunk (streaming / in-process)
    tokens: int
    chunks: int
    error: str | None  # None: success


@dataclass
class BenchResult:
    """The summary of one run (see :func:`summarize`); ``samples`` keeps the raw requests."""

    label: str
    target: str  # "http" | "in-process"
    mode: str  # "open" | "closed"
    endpoint: str
    stream: bool
    rate: float | None
    concurrency: int | None
    procs: int
    client: str
    window_s: float  # measured seconds (throughput denominator)
    wall_s: float  # start to last reply (warmup and drain included; setup excluded)
    offered: int  # requests scheduled (open) / started (closed) in the measured window
    sent: int
    ok: int
    errors: dict[str, int]
    error_details: dict[str, str]
    throughput_rps: float  # ok completions inside the window / window
    tokens_per_s: float  # their completion tokens / window
    completion_tokens: int  # all ok measured requests
    latency_ms: dict[str, float] | None  # scheduled -> last byte, ok requests
    ttft_ms: dict[str, float] | None  # scheduled -> first content chunk
    ttft_from_send_ms: dict[str, float] | None  # sent -> first content chunk (without the generator's lateness)
    service_ms: dict[str, float] | None  # sent -> last byte
    lateness_ms: dict[str, float] | None  # sent - scheduled (open loop)
    chunks_mean: float
    no_usage: int  # ok streaming replies without a usage chunk (tokens approximated by chunks)
    connections: int
    cpu_s: float  # generator CPU (all processes; in-process mode includes the engine)
    samples: list[Sample] = field(default_factory=list, repr=False)

    @property
    def fell_behind(self) -> bool:
        return bool(self.lateness_ms and self.lateness_ms["p99"] > LATE_WARN_MS)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self, with_samples: bool = False) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "samples"}
        d["cpu_util"] = self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0
        d["fell_behind"] = self.fell_behind
        if with_samples:
            d["samples"] = [s._asdict() for s in self.samples]
        return d


def summarize(
    cfg: BenchConfig,
    samples: list[Sample],
    wall_s: float,
    cpu_s: float = 0.0,
    error_details: dict[str, str] | None = None,
    connections: int = 0,
) -> BenchResult:
    """Statistics over the requests scheduled inside ``[warmup, warmup + duration)``.

    Throughput and tokens/s count successes that *completed* inside the window; when the run was
    cut short by ``requests``, the window ends at the last measured completion instead.
    """
    w0 = cfg.warmup
    w1 = cfg.warmup + cfg.duration
    measured = [s for s in samples if w0 <= s.sched < w1]
    ok = [s for s in measured if s.error is None]
    if measured and cfg.requests is not None:
        w1 = min(w1, max(s.end for s in measured))
    window = max(w1 - w0, 1e-9)
    # completions inside the window, whenever they were scheduled (warmup ones included): steady state
    done_in_window = [s for s in samples if s.error is None and w0 <= s.end <= w1]
    errors: dict[str, int] = {}
    for s in measured:
        if s.error is not None:
            errors[s.error] = errors.get(s.error, 0) + 1
    sent = [s for s in measured if s.sent is not None]
    is_open = cfg.rate is not None
    stream_like = cfg.stream or cfg.in_process
    return BenchResult(
        label=cfg.label,
        target="in-process" if cfg.in_process else "http",
        mode=cfg.mode,
        endpoint=cfg.endpoint,
        stream=cfg.stream,
        rate=cfg.rate,
        concurrency=cfg.concurrency,
        procs=cfg.procs,
        client="sim" if cfg.in_process else cfg.client,
        window_s=window,
        wall_s=wall_s,
        offered=len(measured),
        sent=len(sent),
        ok=len(ok),
        errors=dict(sorted(errors.items(), key=lambda kv: -kv[1])),
        error_details={k: v for k, v in (error_details or {}).items() if k in errors},
        throughput_rps=len(done_in_window) / window,
        tokens_per_s=sum(s.tokens for s in done_in_window) / window,
        completion_tokens=sum(s.tokens for s in ok),
        latency_ms=dist_ms([s.end - s.sched for s in ok]),
        ttft_ms=dist_ms([s.first - s.sched for s in ok if s.first is not None]) if stream_like else None,
        ttft_from_send_ms=dist_ms([s.first - s.sent for s in ok if s.first is not None and s.sent is not None])
        if stream_like else None,
        service_ms=dist_ms([s.end - s.sent for s in ok if s.sent is not None]),
        lateness_ms=dist_ms([s.sent - s.sched for s in sent if s.sent is not None]) if is_open else None,
        chunks_mean=sum(s.chunks for s in ok) / len(ok) if ok else 0.0,
        no_usage=0,
        connections=connections,
        cpu_s=cpu_s,
        samples=samples,
    )


def overhead_ms(http: BenchResult, base: BenchResult) -> dict[str, float]:
    """``http - base`` per latency (and TTFT) percentile: what the serving path adds."""
    out: dict[str, float] = {}
    for name in ("latency_ms", "ttft_ms"):
        a, b = getattr(http, name), getattr(base, name)
        if a and b:
            for q in ("p50", "p90", "p99", "mean"):
                out[f"{name[:-3]}_{q}"] = a[q] - b[q]
    return out

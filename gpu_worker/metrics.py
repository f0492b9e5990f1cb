"""A worker's Prometheus metrics and its small HTTP server (``/metrics``, ``/health``).

Owned by the worker (one registry per worker, no module-level state).  The server runs in a
thread of its own, so a scrape answers even while the event loop is busy, and ``/health`` can say
the loop has stalled.

Request metrics are observed at hooks the worker and its jobs call (start, token steps, finish);
state (slots, in flight, reclaims, fenced writes, ...) is read from the worker's
:class:`gpu_worker.stats.WorkerStats` at scrape time; GPU gauges come from the worker's
:class:`gpu_worker.nvml.Gpu` at scrape time.  This module knows the worker only through those two
records, the engine and :class:`JobFacts`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.outcomes import OUTCOMES, outcome_of
from common.probe_http import ProbeServer
from common.schemas import Result, WorkItem
from common.settings import WorkerSettings
from gpu_worker.nvml import Gpu
from gpu_worker.serving.base import OpenAIServer
from gpu_worker.stats import WorkerStats

log = logging.getLogger("mgpu.worker")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5)
STATES = ("starting", "canary", "ready", "draining", "gone")


class JobFacts(Protocol):
    """What the request hooks read of a job (:class:`gpu_worker.job.Job`)."""

    item: WorkItem | None
    stream: str
    deliveries: int
    started: float  # monotonic
    started_at: float  # unix time
    first_token_at: float | None  # unix time
    preempted: int


class TokenTimer:
    """Times one sequence's steps: time to first token (from enqueue) and inter-token latency."""

    __slots__ = ("first", "last", "m", "prompt_counted", "ttft")

    def __init__(self, m: WorkerMetrics, item: WorkItem, ttft: bool) -> None:
        self.m = m
        self.first = item.enqueued_at
        self.last = 0.0
        self.ttft = ttft
        self.prompt_counted = False

    def step(self, tokens: int, prompt_tokens: int) -> None:
        now = time.time()
        m = self.m
        if not self.last:
            if self.ttft:
                m.ttft.observe(max(0.0, now - self.first))
            if not self.prompt_counted:
                m.prompt_tokens.inc(prompt_tokens)
                self.prompt_counted = True
        elif tokens:
            m.itl.observe((now - self.last) / tokens)
        self.last = now
        if tokens:
            m.generation_tokens.inc(tokens)


class _StateCollector(Collector):
    def __init__(self, m: WorkerMetrics) -> None:
        self.m = m

    def collect(self) -> Iterator[Metric]:
        m, st, engine, lv = self.m, self.m.stats, self.m.engine, self.m.label_values
        names = ["model", "worker", "gpu"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=names)
            g.add_metric(lv, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=names)
            c.add_metric(lv, value)
            return c

        yield gauge("mgpu_worker_in_flight_requests", "Requests running on this worker", st.requests)
        yield gauge("mgpu_worker_busy_slots", "Batch slots in use (a request with n choices takes n)", st.busy_slots)
        yield gauge("mgpu_worker_slots", "Batch slots of this worker's engine", engine.slots)
        yield gauge("mgpu_worker_healthy", "1 while the engine passes its health checks", 1 if st.healthy else 0)
        yield gauge("mgpu_worker_event_loop_lag_seconds", "Seconds since the worker's event loop last ticked",
                    st.loop_lag_s)
        yield gauge("mgpu_worker_start_time_seconds", "Unix time this worker process started", m.started_at)
        state = GaugeMetricFamily("mgpu_worker_state", "1 for the worker's current state", labels=[*names, "state"])
        for s in STATES:
            state.add_metric([*lv, s], 1 if st.state == s else 0)
        yield state
        info = GaugeMetricFamily("mgpu_worker_info", "Worker facts",
                                 labels=[*names, "engine", "version", "revision"])
        info.add_metric([*lv, engine.name, m.version, m.revision], 1)
        yield info
        yield counter("mgpu_worker_reclaims_total", "Entries taken over from a worker whose lease lapsed",
                      st.reclaimed)
        yield counter("mgpu_worker_fenced_writes_total",
                      "Writes refused because another worker owns the entry now (zombie writes)", st.fenced)
        yield counter("mgpu_worker_drains_total", "Drain requests this worker received", st.drains)
        yield counter("mgpu_worker_preempted_total", "Batch requests handed back to make room for interactive ones",
                      st.preempted)
        yield counter("mgpu_worker_engine_aborts_total", "Sequences aborted in the engine", engine.aborts)


class _GpuCollector(Collector):
    def __init__(self, m: WorkerMetrics, gpu: Gpu) -> None:
        self.m = m
        self.gpu = gpu

    def collect(self) -> Iterator[Metric]:
        r = self.gpu.read()
        if r is None:
            return
        names = ["model", "worker", "gpu"]
        lv = self.m.label_values
        gauges = (
            ("utilization_ratio", "mgpu_gpu_utilization_ratio", "Share of time a kernel ran on the GPU (0..1)"),
            ("memory_utilization_ratio", "mgpu_gpu_memory_utilization_ratio",
             "Share of time GPU memory was read or written (0..1)"),
            ("memory_used_bytes", "mgpu_gpu_memory_used_bytes", "GPU memory in use"),
            ("memory_total_bytes", "mgpu_gpu_memory_total_bytes", "GPU memory in all"),
            ("temperature_celsius", "mgpu_gpu_temperature_celsius", "GPU core temperature"),
            ("power_watts", "mgpu_gpu_power_watts", "GPU power draw"),
            ("power_limit_watts", "mgpu_gpu_power_limit_watts", "GPU enforced power limit"),
        )
        for attr, name, doc in gauges:
            v = getattr(r, attr)
            if v is not None:
                g = GaugeMetricFamily(name, doc, labels=names)
                g.add_metric(lv, v)
                yield g
        xid = CounterMetricFamily("mgpu_gpu_xid_errors", "XID critical-error events seen on the GPU", labels=names)
        xid.add_metric(lv, r.xid_errors_total)
        yield xid
        if r.ecc_corrected_total is not None or r.ecc_uncorrected_total is not None:
            ecc = CounterMetricFamily("mgpu_gpu_ecc_errors", "ECC memory errors since the driver loaded",
                                      labels=[*names, "type"])
            if r.ecc_corrected_total is not None:
                ecc.add_metric([*lv, "corrected"], r.ecc_corrected_total)
            if r.ecc_uncorrected_total is not None:
                ecc.add_metric([*lv, "uncorrected"], r.ecc_uncorrected_total)
            yield ecc
        info = GaugeMetricFamily("mgpu_gpu_info", "GPU facts", labels=[*names, "name", "uuid"])
        info.add_metric([*lv, r.name or "", r.uuid or ""], 1)
        yield info


class _EngineCollector(Collector):
    """vLLM's own metrics (``vllm:*``: steps and tokens per step, its queue, TTFT, KV-cache use, preemptions), which
    it registers in the process's default registry, so that the worker's /metrics has what ``vllm serve``'s has."""

    def collect(self) -> Iterator[Metric]:
        for fam in REGISTRY.collect():
            if fam.name.startswith("vllm:"):
                yield fam


class WorkerMetrics:
    def __init__(self, settings: WorkerSettings, stats: WorkerStats, engine: OpenAIServer, gpu: Gpu, *, worker_id: str,
                 version: str) -> None:
        self.s = settings
        self.stats = stats
        self.engine = engine
        self.worker_id = worker_id
        self.version = version
        self.revision = settings.effective_revision
        self.registry = r = CollectorRegistry()
        self.started_at = time.time()
        self.label_values = [settings.model, worker_id, "none" if settings.gpu is None else str(settings.gpu)]
        lv = self.label_values
        names = ["model", "worker", "gpu"]
        requests = Counter("mgpu_worker_requests", "Requests finished by this worker, by outcome",
                           [*names, "status"], registry=r)
        self.requests = {o: requests.labels(*lv, o) for o in OUTCOMES}
        self.latency = Histogram("mgpu_worker_request_duration_seconds",
                                 "End-to-end latency of successful requests, from enqueue to result",
                                 names, buckets=LATENCY_BUCKETS, registry=r).labels(*lv)
        self.queue_wait = Histogram("mgpu_worker_queue_wait_seconds",
                                    "Time from enqueue until this worker started the request",
                                    names, buckets=LATENCY_BUCKETS, registry=r).labels(*lv)
        self.ttft = Histogram("mgpu_worker_time_to_first_token_seconds",
                              "Time from enqueue to the first generated token", names,
                              buckets=LATENCY_BUCKETS, registry=r).labels(*lv)
        self.itl = Histogram("mgpu_worker_inter_token_latency_seconds",
                             "Time between a sequence's generation steps, per token", names,
                             buckets=TOKEN_BUCKETS, registry=r).labels(*lv)
        self.prompt_tokens = Counter("mgpu_worker_prompt_tokens", "Prompt tokens prefilled", names,
                                     registry=r).labels(*lv)
        self.generation_tokens = Counter("mgpu_worker_generation_tokens", "Tokens generated", names,
                                         registry=r).labels(*lv)
        self.retries = Counter("mgpu_worker_retries", "Requests started again after an earlier delivery",
                               names, registry=r).labels(*lv)
        r.register(_StateCollector(self))
        r.register(_GpuCollector(self, gpu))  # reads nothing without a GPU
        r.register(_EngineCollector())  # vLLM's own (nothing on the sim engine)
        self.server: ProbeServer | None = None
        self.port = 0

    # ------------------------------------------------------------------ hooks
    def started(self, job: JobFacts) -> None:
        if job.item is not None:
            self.queue_wait.observe(max(0.0, time.time() - job.item.enqueued_at))
        if job.deliveries > 1:
            self.retries.inc()

    def token_timer(self, item: WorkItem, index: int) -> TokenTimer:
        return TokenTimer(self, item, ttft=index == 0)

    def finished(self, job: JobFacts, result: Result) -> None:
        item = job.item
        outcome = outcome_of(result.error)
        self.requests[outcome].inc()
        now = time.time()
        if outcome == "success" and item is not None:
            self.latency.observe(max(0.0, now - item.enqueued_at))
        if self.s.log_requests and log.isEnabledFor(logging.INFO):  # built only to be written
            extra: dict[str, Any] = {
                "request_id": result.id, "worker": self.worker_id, "model": result.model, "outcome": outcome,
                "attempts": job.deliveries, "completion_tokens": result.usage.completion_tokens,
                "run_ms": round((time.monotonic() - job.started) * 1000, 1), "stream": job.stream}
            if item is not None:  # from the gateway's enqueue: to this start, to the first token, to the end
                extra["queue_ms"] = round(max(0.0, job.started_at - item.enqueued_at) * 1000, 1)
                if job.first_token_at is not None:
                    extra["ttft_ms"] = round(max(0.0, job.first_token_at - item.enqueued_at) * 1000, 1)
                extra["total_ms"] = round((now - item.enqueued_at) * 1000, 1)
                if item.trace_id is not None:
                    extra["trace_id"] = item.trace_id
            if job.preempted:
                extra["preempted"] = job.preempted
            log.info("request finished", extra=extra)

    def dead_lettered(self) -> None:
        self.requests["dead_lettered"].inc()

    # ------------------------------------------------------------------ HTTP
    def health(self) -> tuple[int, dict[str, Any]]:
        st, s = self.stats, self.s
        lag = st.loop_lag_s
        ok = st.healthy and st.state in ("starting", "canary", "ready", "draining") and lag < s.loop_stall_s
        return (200 if ok else 503), {
            "status": "ok" if ok else "unhealthy", "state": st.state, "healthy": st.healthy, "worker": self.worker_id,
            "model": s.model, "gpu": s.gpu, "in_flight": st.requests, "busy_slots": st.busy_slots,
            "slots": self.engine.slots, "loop_lag_s": round(lag, 3), "served": st.served}

    def serve(self, host: str, port: int) -> int:
        """Start ``/metrics`` and ``/health`` on ``host:port`` (0: a free port); returns the port."""

        def health() -> tuple[int, str, bytes]:
            code, obj = self.health()
            return code, "application/json", json.dumps(obj).encode()

        self.server = ProbeServer({"/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(self.registry)),
                                   "/health": health})
        self.port = self.server.start(host, port)
        log.info("metrics on http://%s:%d/metrics", host, self.port, extra={"worker": self.worker_id})
        return self.port

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

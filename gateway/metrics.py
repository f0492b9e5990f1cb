"""The gateway's Prometheus metrics, owned by the app's lifespan (no module-level registry).

Request counters and histograms are ordinary prometheus-client metrics.  Everything read from
Redis (queues, dead letters, the worker registry) is collected at scrape time from the last
snapshot of a background task (:meth:`GatewayMetrics.run_monitor`), never per scrape.

With several gateway processes on one host (``mgpu gateway --gateway-procs N``) the process-local
metrics go through prometheus-client's multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set
before any process imports prometheus-client, every process writes its values to files there, and
whichever process answers ``/metrics`` sums them (counters, histograms, the in-flight gauge).  The
Redis-derived gauges are not per process: the answering process reports its own snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator

import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.keys import Keys
from common.queues import ModelQueues, read_queues
from gateway.registry import RegistryView

log = logging.getLogger("mgpu.gateway.metrics")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_ENV) or None


class ClusterCollector(Collector):
    """Gauges from the gateway's view of Redis: worker registry, queues, dead letters."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        now = time.time()
        view = m.view
        live = GaugeMetricFamily("mgpu_gateway_live_workers", "Ready workers seen in the registry", labels=["model"])
        workers = GaugeMetricFamily("mgpu_registry_workers", "Registered workers by state",
                                    labels=["model", "state"])
        state = GaugeMetricFamily("mgpu_registry_worker_state", "1 for the state a registered worker is in",
                                  labels=["model", "worker", "gpu", "state"])
        hb = GaugeMetricFamily("mgpu_registry_heartbeat_age_seconds",
                               "Seconds since a registered worker's last heartbeat", labels=["model", "worker", "gpu"])
        slots = GaugeMetricFamily("mgpu_registry_worker_slots", "Slots a registered worker announces",
                                  labels=["model", "worker", "gpu"])
        if view is not None:
            models = set(view.models) | {w.model for w in view.workers.values()}
            counts: dict[tuple[str, str], int] = {}
            for w in view.workers.values():
                gpu = w.gpu or "none"
                counts[(w.model, w.state)] = counts.get((w.model, w.state), 0) + 1
                state.add_metric([w.model, w.id, gpu, w.state], 1)
                hb.add_metric([w.model, w.id, gpu], max(0.0, now - w.heartbeat))
                slots.add_metric([w.model, w.id, gpu], w.slots)
            for model in sorted(models):
                live.add_metric([model], len(view.live_workers(model)))
            for (model, st), n in sorted(counts.items()):
                workers.add_metric([model, st], n)
        yield from (live, workers, state, hb, slots)
        starts = CounterMetricFamily("mgpu_registry_worker_starts", "Times a worker id registered (restarts + 1)",
                                     labels=["worker"])
        for wid, n in sorted(m.worker_starts.items()):
            starts.add_metric([wid], n)
        yield starts
        labels = ["model", "stream"]
        fams = {
            "length": GaugeMetricFamily("mgpu_queue_length", "Entries on the stream (waiting + in progress)",
                                        labels=labels),
            "lag": GaugeMetricFamily("mgpu_queue_lag", "Entries not yet delivered to a worker (consumer-group lag)",
                                     labels=labels),
            "pending": GaugeMetricFamily("mgpu_queue_pending", "Entries delivered and not yet acknowledged",
                                         labels=labels),
            "consumers": GaugeMetricFamily("mgpu_queue_consumers", "Consumers in the stream's group", labels=labels),
            "oldest_waiting_age_s": GaugeMetricFamily(
                "mgpu_queue_oldest_waiting_age_seconds", "Age of the oldest entry not yet delivered", labels=labels),
            "oldest_pending_age_s": GaugeMetricFamily(
                "mgpu_queue_oldest_pending_age_seconds", "Age (since enqueue) of the oldest entry in progress",
                labels=labels),
        }
        dlq = GaugeMetricFamily("mgpu_dead_letter_length", "Entries on the model's dead-letter stream",
                                labels=["model"])
        for mq in m.queues:
            dlq.add_metric([mq.model], mq.dead_letters)
            for q in mq.streams:
                for attr, fam in fams.items():
                    fam.add_metric([q.model, q.stream], getattr(q, attr))
        yield from fams.values()
        yield dlq
        if m.queues_at:
            yield GaugeMetricFamily("mgpu_queue_stats_age_seconds", "Seconds since the queue gauges were read",
                                    value=max(0.0, now - m.queues_at))


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None, *, view: RegistryView | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.multiprocess = multiprocess_dir()
        self.view = view
        self.queues: list[ModelQueues] = []
        self.queues_at = 0.0
        self.worker_starts: dict[str, int] = {}
        r = self.registry
        self.requests = Counter("mgpu_gateway_requests", "Requests answered by the gateway, by outcome",
                                ["model", "endpoint", "status", "code"], registry=r)
        self.latency = Histogram("mgpu_gateway_request_duration_seconds",
                                 "End-to-end latency of successful requests seen by the gateway",
                                 ["model", "endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("mgpu_gateway_time_to_first_token_seconds", "Time to first streamed token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("mgpu_gateway_in_flight_requests", "Requests waiting for a result", registry=r,
                               multiprocess_mode="livesum")
        self.routed = Counter("mgpu_gateway_routed_requests", "Requests routed, by target worker's own stream "
                              "('shared': the model's shared stream) and strategy", ["worker", "strategy"],
                              registry=r)
        self.key_requests = Counter("mgpu_key_requests", "Requests per API key (its name; 'anon' with auth off), by "
                                    "outcome", ["key", "status"], registry=r)
        self.key_tokens = Counter("mgpu_key_tokens", "Tokens per API key (its name), prompt and completion",
                                  ["key", "kind"], registry=r)
        self.batch_requests = Gauge("mgpu_gateway_batch_requests", "Requests of each batch this gateway feeds: "
                                    "total, completed, failed, outstanding (on the batch stream, unanswered)",
                                    ["batch", "state"], registry=r, multiprocess_mode="livesum")
        self.batch_expires_in = Gauge("mgpu_gateway_batch_expires_in_seconds", "Seconds until each batch this "
                                      "gateway feeds expires (its completion window ends)", ["batch"], registry=r,
                                      multiprocess_mode="livemin")
        self.batches_finished = Counter("mgpu_gateway_batches_finished", "Batches this gateway finished, by status",
                                        ["status"], registry=r)
        self.files_expired = Counter("mgpu_gateway_files_expired", "Files this gateway deleted past their "
                                     "expires_at (OpenAI's expires_after)", registry=r)
        self.cluster = ClusterCollector(self)
        if not self.multiprocess:
            r.register(self.cluster)

    def observe(self, model: str, endpoint: str, outcome: str, code: int, duration_s: float, *, key: str = "anon",
                prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.requests.labels(model, endpoint, outcome, str(code)).inc()
        self.key_requests.labels(key, outcome).inc()
        if prompt_tokens:
            self.key_tokens.labels(key, "prompt").inc(prompt_tokens)
        if completion_tokens:
            self.key_tokens.labels(key, "completion").inc(completion_tokens)
        if outcome == "success":
            self.latency.labels(model, endpoint).observe(duration_s)

    def batch_progress(self, batch_id: str, counts: dict[str, int] | None, expires_in_s: float = 0.0) -> None:
        """A fed batch's counts and time left; None: it is no longer fed here (its series go)."""
        for state in ("total", "completed", "failed", "outstanding"):
            if counts is None:
                with contextlib.suppress(KeyError):
                    self.batch_requests.remove(batch_id, state)
            else:
                self.batch_requests.labels(batch_id, state).set(counts.get(state, 0))
        if counts is None:
            with contextlib.suppress(KeyError):
                self.batch_expires_in.remove(batch_id)
        else:
            self.batch_expires_in.labels(batch_id).set(expires_in_s)

    def exposition(self) -> bytes:
        if not self.multiprocess:
            return generate_latest(self.registry)
        from prometheus_client import multiprocess

        reg = CollectorRegistry()
        multiprocess.MultiProcessCollector(reg, path=self.multiprocess)
        reg.register(self.cluster)
        return generate_latest(reg)

    closed = False  # set at shutdown: the monitor loop ends even if a cancellation got lost

    def close(self) -> None:
        """At process exit: a live gauge (in-flight) stops counting this process."""
        if self.multiprocess:
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(os.getpid(), self.multiprocess)

    async def refresh_queues(self, r: aioredis.Redis, keys: Keys) -> None:
        view = self.view
        models = sorted(set(view.models) | {w.model for w in view.workers.values()}) if view else []
        queues = await read_queues(r, keys, models)
        raw = await r.hgetall(keys.worker_starts)
        self.worker_starts = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
        self.queues, self.queues_at = queues, time.time()

    async def run_monitor(self, r: aioredis.Redis, keys: Keys, interval_s: float) -> None:
        failing = False
        while not self.closed:
            try:
                await self.refresh_queues(r, keys)
                failing = False
            except (redis.RedisError, OSError) as exc:
                if not failing:
                    log.warning("queue metrics refresh failed: %s", exc)
                failing = True
            await asyncio.sleep(interval_s)

"""The gateway's Prometheus metrics, owned by the app's lifespan (no module-level registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("mgpu_gateway_requests", "Requests answered by the gateway, by outcome",
                                ["model", "endpoint", "status"], registry=r)
        self.latency = Histogram("mgpu_gateway_request_duration_seconds",
                                 "End-to-end latency seen by the gateway", ["model", "endpoint"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("mgpu_gateway_time_to_first_token_seconds", "Time to first streamed token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("mgpu_gateway_in_flight_requests", "Requests waiting for a result", registry=r)
        self.routed = Counter("mgpu_gateway_routed_requests", "Requests routed, by target worker's own stream "
                              "('shared': the model's shared stream) and strategy", ["worker", "strategy"],
                              registry=r)
        self.live_workers = Gauge("mgpu_gateway_live_workers", "Ready workers seen in the registry", ["model"],
                                  registry=r)

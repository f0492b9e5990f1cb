"""The Grafana dashboard, as code: ``python -m ops.dashboard`` writes ops/grafana/dashboards/mgpu.json.

Panels are per GPU worker (legend ``{{worker}} gpu{{gpu}}``); ``$model`` and ``$worker`` filter.
A test checks that the committed JSON is this module's output and that every query names only
metrics the gateway and the workers export (or recording rules).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "grafana" / "dashboards" / "mgpu.json"
DS = {"type": "prometheus", "uid": "${datasource}"}
W = 'model=~"$model", worker=~"$worker"'  # worker-side selector
M = 'model=~"$model"'
RI = "$__rate_interval"
PER_GPU = "{{worker}} gpu{{gpu}}"


class _Layout:
    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.row_h = 0

    def row(self, title: str) -> None:
        self._newline()
        self.panels.append({"type": "row", "title": title, "collapsed": False, "id": len(self.panels) + 1,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def _newline(self) -> None:
        if self.x:
            self.y += self.row_h
            self.x, self.row_h = 0, 0

    def add(self, panel: dict[str, Any], w: int, h: int) -> None:
        if self.x + w > 24:
            self._newline()
        panel["id"] = len(self.panels) + 1
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def _targets(queries: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"datasource": DS, "expr": q, "legendFormat": legend, "refId": chr(ord("A") + i), "range": True}
            for i, (q, legend) in enumerate(queries)]


def timeseries(title: str, queries: list[tuple[str, str]], unit: str = "short", *, stack: bool = False,
               description: str = "", max_: float | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": unit, "custom": {"fillOpacity": 10, "lineWidth": 1, "showPoints": "never",
                                                          "stacking": {"mode": "normal" if stack else "none"}}}
    if max_ is not None:
        defaults["max"], defaults["min"] = max_, 0
    return {"type": "timeseries", "title": title, "description": description, "datasource": DS,
            "targets": _targets(queries), "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull", "max"]},
                        "tooltip": {"mode": "multi", "sort": "desc"}}}


def stat(title: str, query: str, unit: str = "short", *, thresholds: list[tuple[float | None, str]] | None = None,
         description: str = "") -> dict[str, Any]:
    steps = [{"value": v, "color": c} for v, c in (thresholds or [(None, "green")])]
    return {"type": "stat", "title": title, "description": description, "datasource": DS,
            "targets": _targets([(query, "")]),
            "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                            "overrides": []},
            "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "background", "graphMode": "area", "textMode": "auto"}}


def _quantiles(metric: str, qs: tuple[float, ...]) -> list[tuple[str, str]]:
    return [(f"histogram_quantile({q}, sum by (worker, gpu, le) (rate({metric}_bucket{{{W}}}[{RI}])))",
             f"p{round(q * 100)} {PER_GPU}") for q in qs]


def build() -> dict[str, Any]:
    """The dashboard: its rows and panels, one call each, in the order they are shown (hence one long
    function: it reads as the dashboard does)."""
    L = _Layout()
    L.row("Overview")
    L.add(stat("Requests/s", f"sum(rate(mgpu_gateway_requests_total{{{M}}}[{RI}]))", "reqps"), 4, 4)
    L.add(stat("Server error ratio (5m)", f"max(model:mgpu_gateway_request_errors:ratio_rate5m{{{M}}})",
               "percentunit", thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
               description="failed, timeout and dead-lettered requests / all requests"), 4, 4)
    L.add(stat("Ready workers", f"sum(max by (model) (mgpu_gateway_live_workers{{{M}}}))",
               thresholds=[(None, "red"), (1, "green")]), 4, 4)
    L.add(stat("Queue length", f"sum(stream:mgpu_queue_length:max{{{M}}})",
               thresholds=[(None, "green"), (100, "orange")]), 4, 4)
    L.add(stat("Oldest waiting", f"max(stream:mgpu_queue_oldest_waiting_age_seconds:max{{{M}}})", "s",
               thresholds=[(None, "green"), (5, "orange"), (30, "red")]), 4, 4)
    L.add(stat("Dead letters", f"sum(model:mgpu_dead_letter_length:max{{{M}}})",
               thresholds=[(None, "green"), (1, "red")]), 4, 4)

    L.row("Traffic and latency per GPU worker")
    L.add(timeseries("Requests/s per GPU worker",
                     [(f"sum by (worker, gpu) (rate(mgpu_worker_requests_total{{{W}}}[{RI}]))", PER_GPU)],
                     "reqps", stack=True), 12, 8)
    L.add(timeseries("Error rate by outcome (gateway)",
                     [(f'sum by (status) (rate(mgpu_gateway_requests_total{{{M}, status!="success"}}[{RI}]))',
                       "{{status}}"),
                      (f'sum by (worker, status) (rate(mgpu_worker_requests_total{{{W}, status!="success"}}[{RI}]))',
                       "{{worker}} {{status}}")], "reqps"), 12, 8)
    L.add(timeseries("End-to-end latency p50 / p95 / p99 per GPU worker (enqueue to result)",
                     _quantiles("mgpu_worker_request_duration_seconds", (0.5, 0.95, 0.99)), "s"), 12, 8)
    L.add(timeseries("Time to first token p50 / p99 per GPU worker",
                     [*_quantiles("mgpu_worker_time_to_first_token_seconds", (0.5, 0.99)),
                      (f"histogram_quantile(0.99, sum by (le) (rate(mgpu_gateway_time_to_first_token_seconds_bucket"
                       f"{{{M}}}[{RI}])))", "p99 at the gateway (streams)")], "s"), 12, 8)
    L.add(timeseries("Inter-token latency p50 / p99 per GPU worker",
                     _quantiles("mgpu_worker_inter_token_latency_seconds", (0.5, 0.99)), "s"), 12, 8)
    L.add(timeseries("Queue wait p50 / p99 per GPU worker",
                     _quantiles("mgpu_worker_queue_wait_seconds", (0.5, 0.99)), "s"), 12, 8)
    L.add(timeseries("Tokens/s per GPU worker",
                     [(f"sum by (worker, gpu) (rate(mgpu_worker_generation_tokens_total{{{W}}}[{RI}]))",
                       f"out {PER_GPU}"),
                      (f"sum by (worker, gpu) (rate(mgpu_worker_prompt_tokens_total{{{W}}}[{RI}]))",
                       f"in {PER_GPU}")], "short"), 24, 8)

    L.row("GPUs")
    L.add(timeseries("GPU utilisation", [(f"mgpu_gpu_utilization_ratio{{{W}}}", PER_GPU)], "percentunit",
                     max_=1), 8, 8)
    L.add(timeseries("GPU memory used / total",
                     [(f"mgpu_gpu_memory_used_bytes{{{W}}}", f"used {PER_GPU}"),
                      (f"mgpu_gpu_memory_total_bytes{{{W}}}", f"total {PER_GPU}")], "bytes"), 8, 8)
    L.add(timeseries("GPU temperature and power",
                     [(f"mgpu_gpu_temperature_celsius{{{W}}}", f"°C {PER_GPU}"),
                      (f"mgpu_gpu_power_watts{{{W}}}", f"W {PER_GPU}")], "short"), 8, 8)
    L.add(timeseries("GPU errors (XID, ECC uncorrected) in the interval",
                     [(f"increase(mgpu_gpu_xid_errors_total{{{W}}}[{RI}])", f"XID {PER_GPU}"),
                      (f'increase(mgpu_gpu_ecc_errors_total{{{W}, type="uncorrected"}}[{RI}])',
                       f"ECC {PER_GPU}")], "short"), 24, 6)

    L.row("Slots, queues and workers")
    L.add(timeseries("Slot occupancy per GPU worker", [(f"worker:mgpu_worker_slot_occupancy:ratio{{{W}}}",
                                                       PER_GPU)], "percentunit", max_=1), 8, 8)
    L.add(timeseries("Slots busy / total",
                     [(f"sum by (worker, gpu) (mgpu_worker_busy_slots{{{W}}})", f"busy {PER_GPU}"),
                      (f"sum by (worker, gpu) (mgpu_worker_slots{{{W}}})", f"total {PER_GPU}")], "short"), 8, 8)
    L.add(timeseries("Queue depth, lag and pending",
                     [(f"stream:mgpu_queue_length:max{{{M}}}", "length {{stream}}"),
                      (f"stream:mgpu_queue_lag:max{{{M}}}", "lag {{stream}}"),
                      (f"max by (model, stream) (mgpu_queue_pending{{{M}}})", "pending {{stream}}")], "short"), 8, 8)
    L.add(timeseries("Oldest waiting request", [(f"stream:mgpu_queue_oldest_waiting_age_seconds:max{{{M}}}",
                                                 "{{stream}}")], "s"), 8, 8)
    L.add(timeseries("Worker states",
                     [(f"max by (model, state) (mgpu_registry_workers{{{M}}})", "{{model}} {{state}}"),
                      ('sum(up{job="mgpu-worker"})', "scraped up"),
                      ('count(up{job="mgpu-worker"} == 0)', "scraped down")], "short", stack=False), 8, 8)
    L.add(timeseries("Heartbeat age per worker",
                     [(f"max by (worker, gpu) (mgpu_registry_heartbeat_age_seconds{{{W}}})", PER_GPU)], "s"), 8, 8)
    L.add(timeseries("Reclaims, retries, fenced writes, dead letters (per interval)",
                     [(f"sum by (worker) (increase(mgpu_worker_reclaims_total{{{W}}}[{RI}]))", "reclaims {{worker}}"),
                      (f"sum by (worker) (increase(mgpu_worker_retries_total{{{W}}}[{RI}]))", "retries {{worker}}"),
                      (f"sum by (worker) (increase(mgpu_worker_fenced_writes_total{{{W}}}[{RI}]))",
                       "fenced {{worker}}"),
                      (f'sum by (worker) (increase(mgpu_worker_requests_total{{{W}, status="dead_lettered"}}[{RI}]))',
                       "dead-lettered {{worker}}")], "short"), 12, 8)
    L.add(timeseries("Restarts and drains",
                     [("max by (worker) (increase(mgpu_registry_worker_starts_total[1h]))", "starts/1h {{worker}}"),
                      (f"sum by (worker) (mgpu_worker_drains_total{{{W}}})", "drains {{worker}}")], "short"), 12, 8)

    L.row("Batch work")
    L.add(timeseries("Batch streams: waiting and running",
                     [(f'stream:mgpu_queue_lag:max{{{M}, stream=~".*:batch"}}', "waiting {{stream}}"),
                      (f'max by (model, stream) (mgpu_queue_pending{{{M}, stream=~".*:batch"}})',
                       "running {{stream}}"),
                      (f"sum by (worker) (increase(mgpu_worker_preempted_total{{{W}}}[{RI}]))",
                       "preempted {{worker}}")], "short"), 8, 8)
    L.add(timeseries("Batches: requests by state",
                     [("sum by (batch, state) (mgpu_gateway_batch_requests)", "{{batch}} {{state}}")], "short"), 8, 8)
    L.add(timeseries("Batches: time to expiry",
                     [("min by (batch) (mgpu_gateway_batch_expires_in_seconds)", "{{batch}}")], "s"), 8, 8)

    variables = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus",
         "current": {"text": "Prometheus", "value": "prometheus"}, "hide": 0},
        {"name": "model", "type": "query", "datasource": DS, "label": "Model", "includeAll": True,
         "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
         "query": {"query": "label_values(mgpu_worker_slots, model)", "refId": "model"},
         "definition": "label_values(mgpu_worker_slots, model)", "current": {"text": "All", "value": "$__all"}},
        {"name": "worker", "type": "query", "datasource": DS, "label": "Worker", "includeAll": True,
         "multi": True, "allValue": ".*", "refresh": 2, "sort": 1,
         "query": {"query": 'label_values(mgpu_worker_slots{model=~"$model"}, worker)', "refId": "worker"},
         "definition": 'label_values(mgpu_worker_slots{model=~"$model"}, worker)',
         "current": {"text": "All", "value": "$__all"}},
    ]
    return {
        "uid": "mgpu-overview", "title": "mgpu: LLM serving per GPU", "tags": ["mgpu", "llm", "gpu"],
        "timezone": "browser", "schemaVersion": 39, "version": 1, "editable": True, "graphTooltip": 1,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables}, "annotations": {"list": []}, "links": [], "panels": L.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

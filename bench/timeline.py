"""Where a streamed request's time to first token goes, from the fleet's own request logs (JSON lines,
``log_json``): the gateway's ``request done`` line (``ttft_ms``: from its receipt to the first token written to
the client) joined by request id with the worker's ``request finished`` line (``queue_ms``: from the gateway's
enqueue to the worker's start; ``ttft_ms``: to the engine's first token; ``preempted``: batch requests handed
back so that it could start).  Three parts, which add up to the gateway's figure:

* queue: enqueue → worker start (waiting in the stream, the worker's read, the preemption);
* engine: worker start → first token generated (the engine's queue, its step, the prefill);
* relay: the rest (the gateway's admission before the enqueue, then the first token's way back: the chunk
  written to Redis, the gateway's reply reader, the write to the client).

The clocks are one machine's (the gateway's ``time.time`` stamps the enqueue, the worker's the rest).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from bench.stats import dist_ms


def log_lines(text: str, msg: str, since: float, until: float) -> list[dict[str, Any]]:
    """The JSON log lines with message ``msg`` logged between ``since`` and ``until`` (unix time)."""
    out = []
    for ln in text.splitlines():
        if not ln.startswith("{") or msg not in ln:
            continue
        try:
            x = json.loads(ln)
        except ValueError:
            continue
        if x.get("msg") == msg and since <= float(x.get("ts", 0)) <= until:
            out.append(x)
    return out


def _ms(values: Iterable[float]) -> dict[str, float] | None:
    d = dist_ms([v / 1000 for v in values])
    return None if d is None else {k: round(v, 1) for k, v in d.items()}


def ttft_parts(gateway_logs: Iterable[str], worker_logs: Iterable[str], since: float, until: float,
               skip_streams: Iterable[str] = ()) -> dict[str, Any]:
    """The parts of the streamed, successful requests' TTFT logged in the window (requests on ``skip_streams``,
    the batch stream, left out), their distributions, and what the slowest 1 % spent in each part."""
    skip = set(skip_streams)
    gw = {x["request_id"]: x for text in gateway_logs for x in log_lines(text, "request done", since, until)
          if x.get("ttft_ms") is not None and x.get("outcome") == "success"}
    wk = {x["request_id"]: x for text in worker_logs for x in log_lines(text, "request finished", since, until)
          if x.get("stream") not in skip and x.get("ttft_ms") is not None}
    rows = [{"ttft": g["ttft_ms"], "queue": w["queue_ms"], "engine": w["ttft_ms"] - w["queue_ms"],
             "relay": g["ttft_ms"] - w["ttft_ms"], "preempted": bool(w.get("preempted"))}
            for rid, g in gw.items() if (w := wk.get(rid)) is not None]
    if not rows:
        return {"requests": 0}
    rows.sort(key=lambda r: r["ttft"])
    tail = rows[-max(1, len(rows) // 100):]
    pre = [r for r in rows if r["preempted"]]
    return {
        "requests": len(rows), "unmatched_gateway_lines": len(gw) - len(rows),
        "gateway_ttft_ms": _ms(r["ttft"] for r in rows),
        "queue_ms": _ms(r["queue"] for r in rows), "engine_ms": _ms(r["engine"] for r in rows),
        "relay_ms": _ms(r["relay"] for r in rows),
        "preempting": len(pre),
        "gateway_ttft_preempting_ms": _ms(r["ttft"] for r in pre),
        "gateway_ttft_not_preempting_ms": _ms(r["ttft"] for r in rows if not r["preempted"]),
        # the slowest 1 %: the mean of each part, and how many of them preempted
        "tail": {"requests": len(tail), "ttft_ms": round(sum(r["ttft"] for r in tail) / len(tail), 1),
                 **{f"{k}_ms": round(sum(r[k] for r in tail) / len(tail), 1) for k in ("queue", "engine", "relay")},
                 "preempting": sum(r["preempted"] for r in tail)},
    }

"""bench.timeline: the request logs' TTFT parts (queue, engine, relay) add up to the gateway's figure."""

from __future__ import annotations

import json

from bench.timeline import log_lines, ttft_parts


def _gw(rid: str, ttft: float, ts: float = 100.0, outcome: str = "success") -> str:
    return json.dumps({"ts": ts, "msg": "request done", "request_id": rid, "outcome": outcome, "ttft_ms": ttft})


def _wk(rid: str, queue: float, ttft: float, stream: str = "q", ts: float = 100.0, **kw: object) -> str:
    return json.dumps({"ts": ts, "msg": "request finished", "request_id": rid, "stream": stream,
                       "queue_ms": queue, "ttft_ms": ttft, **kw})


def test_parts_join_by_request_id_and_add_up() -> None:
    gateway = "\n".join([_gw("a", 30), _gw("b", 50), _gw("late", 10, ts=500), _gw("err", 5, outcome="server_error"),
                         "plain text line", "{not json"])
    workers = ["\n".join([_wk("a", 2, 25), _wk("batch-1", 0, 1, stream="q:batch")]),
               "\n".join([_wk("b", 10, 40, preempted=1), _wk("late", 1, 5, ts=500)])]
    out = ttft_parts([gateway], workers, since=50, until=200, skip_streams=["q:batch"])
    assert out["requests"] == 2 and out["unmatched_gateway_lines"] == 0  # "late" outside the window, "err" failed
    assert out["queue_ms"]["max"] == 10 and out["engine_ms"]["max"] == 30 and out["relay_ms"]["max"] == 10
    assert out["preempting"] == 1 and out["gateway_ttft_preempting_ms"]["p50"] == 50
    assert out["tail"] == {"requests": 1, "ttft_ms": 50, "queue_ms": 10, "engine_ms": 30, "relay_ms": 10,
                           "preempting": 1}
    assert ttft_parts([gateway], [], since=50, until=200) == {"requests": 0}


def test_log_lines_keeps_the_message_and_the_window() -> None:
    text = "\n".join([_gw("a", 1, ts=10), _gw("b", 1, ts=20), _wk("c", 0, 1, ts=15)])
    assert [x["request_id"] for x in log_lines(text, "request done", 0, 15)] == ["a"]

"""bench.floors' report: the Redis floors and the ASGI servers side by side."""

from __future__ import annotations

from bench.floors import _server_cmd, table


def test_the_table_lists_each_server_run_and_skips_redis_when_not_measured() -> None:
    rows = [{"kind": "http", "server": "uvicorn", "load": "400 req/s", "server_us_per_req": 81.4, "ok": 10,
             "p50_ms": 0.9, "p99_ms": 1.7},
            {"kind": "http", "server": "granian", "load": "closed loop, 64 clients", "server_us_per_req": 44.0,
             "ok": 10, "p50_ms": 2.5, "p99_ms": 6.7}]
    out = table(rows, 400)
    assert "Redis call" not in out
    assert "| uvicorn | 400 req/s | 81 | 0.90 | 1.70 |" in out and "| granian | closed loop, 64 clients | 44 |" in out
    redis = {"kind": "redis", "call": "PING", "server_us": 17.5, "client_us": 69.0, "wall_us": 84.6}
    assert "| PING | 17.5 | 69.0 | 84.6 |" in table([redis, *rows], 400)


def test_granian_serves_the_same_app_on_uvloop_with_one_worker() -> None:
    cmd = _server_cmd("granian", 8123)
    assert cmd[-1] == "bench.floors:app" and cmd[cmd.index("--loop") + 1] == "uvloop"
    assert cmd[cmd.index("--workers") + 1] == "1" and cmd[cmd.index("--port") + 1] == "8123"
    assert "uvicorn.run(f.app" in _server_cmd("uvicorn", 8123)[-1]

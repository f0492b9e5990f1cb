"""The ``mgpu`` command.

    mgpu up        the whole service on this machine (redis-server, gateway, one worker per GPU)
    mgpu gateway   the HTTP gateway alone
    mgpu worker    one GPU worker alone
    mgpu drain ID  ask a worker to drain and exit
    mgpu status    live view of workers and queues (``--once``: one snapshot)
    mgpu strategy  show or set the load-balancing strategy of running gateways
    mgpu rollout   roll the workers of a running `mgpu up` to new settings, with health gate and rollback
    mgpu sim-server  the sim engine as a standalone OpenAI-compatible server (no Redis)
    mgpu bench     the load generator
    mgpu chaos     the chaos benchmark (kills workers and Redis under load)

Every setting is a flag (``--slots 64``) and an environment variable (``MGPU_SLOTS=64``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from common.logs import setup_logging
from common.settings import Settings, SettingsError
from ops.rollout import add_arguments as rollout_arguments

log = logging.getLogger("mgpu.cli")

_SCOPES: dict[str, set[str]] = {
    "gateway": {"redis_url", "namespace", "log_level", "log_json", "result_ttl_s", "host", "port", "gateway_id",
                "request_timeout_s", "max_body_bytes", "max_queue_len", "redis_pool_size",
                "registry_refresh_s", "retry_after_s", "log_requests", "gateway_procs", "queue_metrics_interval_s",
                "strategy", "affinity_prefix_chars", "affinity_vnodes", "max_request_timeout_s", "max_queue_bytes",
                "max_queue_bytes_total", "redis_memory_high_water", "http_read_timeout_s", "max_connections",
                "health_port"},
    "worker": {"redis_url", "namespace", "log_level", "log_json", "result_ttl_s", "engine", "model", "weight",
               "model_path", "worker_id", "gpu", "slots", "max_model_len", "heartbeat_interval_s", "worker_ttl_s",
               "lease_ms", "loop_stall_s", "reclaim_interval_s", "max_deliveries", "drain_grace_s", "read_block_ms",
               "max_dead_letters",
               "metrics_port", "metrics_host", "log_requests", "sim_prefill_ms_per_token", "sim_decode_ms",
               "sim_decode_ms_per_seq", "vllm_gpu_memory_utilization", "vllm_enforce_eager", "vllm_kv_cache_gb",
               "vllm_dtype", "data_dir", "model_cache_dir", "revision", "canary_gate"},
}
# canary_gate: set per start by rollouts
_SCOPES["up"] = (_SCOPES["gateway"] | _SCOPES["worker"] | {"workers", "redis_maxmemory"}) - {"canary_gate"}
_SCOPES["drain"] = {"redis_url", "namespace"}
_SCOPES["status"] = {"redis_url", "namespace", "log_level"}
_SCOPES["strategy"] = {"redis_url", "namespace"}
_SCOPES["rollout"] = {"redis_url", "namespace", "log_level"}
_SCOPES["sim-server"] = {"log_level", "log_json", "host", "port", "model", "slots", "max_model_len",
                         "sim_prefill_ms_per_token", "sim_decode_ms", "sim_decode_ms_per_seq"}


def _add_settings(p: argparse.ArgumentParser, scope: str) -> None:
    g = p.add_argument_group("settings (also MGPU_<NAME> environment variables)")
    for name, f in Settings.model_fields.items():
        if name not in _SCOPES[scope]:
            continue
        default = f.default if f.default_factory is None else "(generated)"
        g.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar="V",
                       help=f"default: {default}")


def _settings(ns: argparse.Namespace, scope: str, env: Mapping[str, str] | None = None, **extra: Any) -> Settings:
    overrides = {k: getattr(ns, k) for k in _SCOPES[scope] if getattr(ns, k, None) is not None}
    model = overrides.get("model")
    if model and os.path.isdir(model) and "model_path" not in overrides:  # --model PATH
        overrides["model_path"] = os.path.abspath(model)
        overrides["model"] = os.path.basename(os.path.normpath(model))
    overrides.update({k: v for k, v in extra.items() if v is not None})
    return Settings.load(overrides, env=env)


def parse_command(argv: list[str], env: Mapping[str, str] | None = None) -> tuple[argparse.Namespace, Settings]:
    """An ``mgpu`` command line (not ``bench``/``chaos``) and its settings, loaded as ``main`` loads them
    (``env``: the ``MGPU_*`` variables; default ``os.environ``).  SystemExit on bad arguments,
    SettingsError on bad settings.  The container health check and tests/test_compose.py use it."""
    ns = build_parser().parse_args(argv)
    return ns, _settings(ns, ns.cmd, env)


def _multiproc_dir(s: Settings) -> Path:
    """prometheus-client's multiprocess directory, emptied: stale files would add old counts."""
    default = Path(s.data_dir) / "prometheus-multiproc" / f"gateway-{s.port}"
    d = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or default)
    d.mkdir(parents=True, exist_ok=True)
    for f in d.glob("*.db"):
        f.unlink()
    return d.resolve()


def _run_gateway(s: Settings) -> int:
    import uvicorn

    from gateway.server import GuardedHttpToolsProtocol, configure

    configure(s.http_read_timeout_s, s.max_connections, s.retry_after_s)
    opts: dict[str, Any] = dict(host=s.host, port=s.port, log_level="warning", access_log=False, loop="uvloop",
                                http=GuardedHttpToolsProtocol, timeout_graceful_shutdown=5,
                                backlog=min(4096, s.max_connections))
    if s.gateway_procs > 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # set before any process imports prometheus_client; uvicorn's workers inherit the environment
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_multiproc_dir(s))
    if s.gateway_procs > 1:
        # every process loads the same settings from the environment, with a gateway_id of its own
        os.environ.update({"MGPU_" + k.upper(): str(v) for k, v in s.model_dump().items()
                           if v is not None and k != "gateway_id"})
        uvicorn.run("gateway.factory:app_from_env", factory=True, workers=s.gateway_procs, **opts)
        return 0
    from gateway.app import create_asgi

    _gateway_server_class()(uvicorn.Config(create_asgi(s), **opts)).run()
    return 0


def _gateway_server_class() -> type:
    import signal

    import uvicorn

    class GatewayServer(uvicorn.Server):
        """uvicorn's server with SIGTERM/SIGINT handled by the event loop itself.

        uvicorn installs plain ``signal.signal`` handlers; under uvloop we saw a gateway sit through
        SIGTERM and SIGINT without ever running them (about one start in six, in tests).  The
        loop's own ``add_signal_handler`` is uvloop's supported path."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            loop = asyncio.get_running_loop()
            sigs = (signal.SIGINT, signal.SIGTERM)
            for sig in sigs:
                loop.add_signal_handler(sig, self.handle_exit, sig, None)
            try:
                yield
            finally:
                for sig in sigs:
                    loop.remove_signal_handler(sig)

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            log.info("gateway: signal %s, shutting down", sig)
            if not self._watchdog_started:  # a shutdown that hangs must not leave the process behind
                self._watchdog_started = True
                limit = (self.config.timeout_graceful_shutdown or 5) + 10.0
                timer = threading.Timer(limit, _exit_hung, args=(limit,))
                timer.daemon = True  # it must not itself keep the process alive
                timer.start()

        _watchdog_started = False

    return GatewayServer


def _exit_hung(limit: float) -> None:
    stacks = {t.name: t.ident for t in threading.enumerate()}
    log.error("gateway shutdown did not finish within %.0fs (threads: %s): exiting now", limit, stacks)
    logging.shutdown()
    os._exit(1)



def _strategy(s: Settings, name: str | None, gateway: str | None) -> int:
    import redis

    from gateway.routing import STRATEGIES

    r = redis.Redis.from_url(s.redis_url, decode_responses=True)
    field = f"strategy:{gateway}" if gateway else "strategy"
    if name is None:
        control = r.hgetall(s.keys.control)
        shown = {k: v for k, v in control.items() if k == "strategy" or k.startswith("strategy:")}
        print(shown or "no run-time strategy set: each gateway uses its --strategy")
        return 0
    if name == "default":
        r.hdel(s.keys.control, field)
    elif name in STRATEGIES:
        r.hset(s.keys.control, field, name)
    else:
        print(f"mgpu strategy: unknown strategy {name!r}; one of {', '.join(STRATEGIES)}", file=sys.stderr)
        return 2
    print(f"{field} = {name} (gateways pick it up within their registry refresh interval)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``mgpu`` argument parser (``bench`` and ``chaos`` hand their arguments to their own parsers)."""
    parser = argparse.ArgumentParser(prog="mgpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up", help="run the whole service on this machine")
    _add_settings(p_up, "up")
    p_gw = sub.add_parser("gateway", help="run the HTTP gateway")
    _add_settings(p_gw, "gateway")
    p_w = sub.add_parser("worker", help="run one GPU worker")
    _add_settings(p_w, "worker")
    p_w.add_argument("--version", dest="deploy_version", default="dev", help="deployment version label")
    p_d = sub.add_parser("drain", help="ask a worker to drain and exit")
    p_d.add_argument("worker")
    _add_settings(p_d, "drain")
    p_st = sub.add_parser("status", help="live view of workers and queues, from Redis")
    p_st.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p_st.add_argument("--interval", type=float, default=1.0, help="refresh (and requests/s window), seconds")
    p_st.add_argument("--color", dest="color", action="store_true", default=None, help="colours even when piped")
    p_st.add_argument("--no-color", dest="color", action="store_false", help="no colours")
    _add_settings(p_st, "status")
    p_sg = sub.add_parser("strategy", help="show or set the load-balancing strategy at run time")
    p_sg.add_argument("name", nargs="?", help="pull, round_robin, least_loaded, weighted, prefix_affinity; "
                                             "'default': back to each gateway's own setting")
    p_sg.add_argument("--gateway", dest="target_gateway", default=None, help="only this gateway id")
    _add_settings(p_sg, "strategy")
    p_ro = sub.add_parser("rollout", help="zero-downtime rolling update of the workers of a running `mgpu up`",
                          description="Roll the workers of a running `mgpu up` to new settings, one at a time, "
                                      "each gated by a canary; a failed gate rolls every worker back. "
                                      "See docs/rollouts.md.")
    rollout_arguments(p_ro)
    _add_settings(p_ro, "rollout")
    p_ss = sub.add_parser("sim-server", help="the sim engine as a standalone OpenAI-compatible server")
    _add_settings(p_ss, "sim-server")
    sub.add_parser("bench", help="load generator (see: mgpu bench --help)")
    sub.add_parser("chaos", help="chaos benchmark (see: mgpu chaos --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["chaos"], ["bench"]):
        import importlib

        try:  # the benchmarks are a package of their own, which the runtime image leaves out
            tool = importlib.import_module("bench.chaos" if argv[0] == "chaos" else "bench.cli")
        except ModuleNotFoundError as exc:
            if exc.name != "bench":
                raise
            print(f"mgpu {argv[0]}: the benchmarks (package bench) are not installed in this image", file=sys.stderr)
            return 2
        return int(tool.main(argv[1:]))
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        s = _settings(ns, ns.cmd)
    except SettingsError as exc:
        print(f"mgpu {ns.cmd}: {exc}", file=sys.stderr)
        return 2
    setup_logging(s.log_level, s.log_json, name=f"[{ns.cmd}] ")
    if ns.cmd == "gateway":
        return _run_gateway(s)
    if ns.cmd == "worker":
        from gpu_worker.main import run_worker

        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
        try:
            return asyncio.run(run_worker(s, version=ns.deploy_version))
        except SettingsError as exc:
            log.error("mgpu worker: %s", exc)
            return 2
    if ns.cmd == "drain":
        import redis

        r = redis.Redis.from_url(s.redis_url)
        r.set(s.keys.drain(ns.worker), "1", ex=600)
        print(f"asked worker {ns.worker} to drain")
        return 0
    if ns.cmd == "status":
        from ops.status import run_status

        try:
            return asyncio.run(run_status(s.redis_url, s.keys, once=ns.once, interval=ns.interval, colour=ns.color))
        except KeyboardInterrupt:
            return 0
    if ns.cmd == "strategy":
        return _strategy(s, ns.name, ns.target_gateway)
    if ns.cmd == "rollout":
        from ops.rollout import run_command

        return run_command(s, ns)
    if ns.cmd == "sim-server":
        from gpu_worker.sim_server import run_sim_server

        return run_sim_server(s)
    if ns.cmd == "up":
        from ops.supervisor import run_up

        return run_up(s, explicit_redis="redis_url" in {k for k in vars(ns) if getattr(ns, k) is not None})
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``mgpu`` command.

    mgpu up        the whole service on this machine (redis-server, gateway, one worker per GPU or GPU group)
    mgpu gateway   the HTTP gateway alone
    mgpu worker    one GPU worker alone (``mgpu worker ... -- <vllm serve engine flags>``)
    mgpu drain ID  ask a worker to drain and exit
    mgpu status    live view of workers and queues (``--once``: one snapshot)
    mgpu strategy  show or set the load-balancing strategy of running gateways
    mgpu rollout   roll the workers of a running `mgpu up` to new settings, with health gate and rollback
    mgpu keys      API keys (create, list, show, revoke, rotate, usage)
    mgpu sim-server  the sim engine as a standalone OpenAI-compatible server (no Redis)
    mgpu bench     the load generator
    mgpu chaos     the chaos benchmark (kills workers and Redis under load)

Each command's settings flags are the fields of its settings class (``COMMANDS``), and every one is
also an environment variable (``--slots 64`` is ``MGPU_SLOTS=64``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from common.logs import setup_logging
from common.redis_conn import check_credentials, sync_client
from common.settings import (
    STRATEGIES,
    ControlSettings,
    GatewaySettings,
    LogSettings,
    SettingsError,
    SimServerSettings,
    UpSettings,
    WorkerSettings,
    to_env,
)
from ops.flags import ENV_NOTE, add_settings_flags, given
from ops.rollout import add_arguments as rollout_arguments
from ops.rollout import run_command as run_rollout

log = logging.getLogger("mgpu.cli")

S = TypeVar("S", bound=LogSettings)


@dataclass(frozen=True)
class Command(Generic[S]):
    """An ``mgpu`` subcommand: its settings class (whose fields are its settings flags), what runs it,
    and its other arguments."""

    settings: type[S]
    run: Callable[[S, argparse.Namespace], int]
    help: str
    arguments: Callable[[argparse.ArgumentParser], None] | None = None
    description: str | None = None


def _settings(ns: argparse.Namespace, env: Mapping[str, str] | None = None) -> LogSettings:
    cls = COMMANDS[ns.cmd].settings
    overrides = given(ns, cls)
    model = overrides.get("model")
    if model and "model_path" in cls.model_fields and "model_path" not in overrides and os.path.isdir(model):
        overrides["model_path"] = os.path.abspath(model)  # --model PATH: that folder, under its name
        overrides["model"] = os.path.basename(os.path.normpath(model))
    return cls.load(overrides, env=env)


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command line; what follows ``--`` are vLLM engine flags (``mgpu worker|up ... -- FLAGS``)."""
    engine: list[str] | None = None
    if "--" in argv:
        i = argv.index("--")
        argv, engine = argv[:i], argv[i + 1:]
    parser = build_parser()
    ns = parser.parse_args(argv)
    if engine is not None:
        if "engine_args" not in COMMANDS[ns.cmd].settings.model_fields:
            parser.error(f"mgpu {ns.cmd} takes no engine flags after --")
        ns.engine_args = engine
    return ns


def parse_command(argv: list[str], env: Mapping[str, str] | None = None) -> tuple[argparse.Namespace, LogSettings]:
    """An ``mgpu`` command line (not ``bench``/``chaos``) and its settings, loaded as ``main`` loads them
    (``env``: the ``MGPU_*`` variables; default ``os.environ``), of the command's class.  SystemExit on bad
    arguments, SettingsError on bad settings.  The container health check and tests/unit/test_compose.py use it."""
    ns = _parse(argv)
    return ns, _settings(ns, env)


def _multiproc_dir(s: GatewaySettings) -> Path:
    """prometheus-client's multiprocess directory, emptied: stale files would add old counts."""
    default = Path(s.data_dir) / "prometheus-multiproc" / f"gateway-{s.port}"
    d = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or default)
    d.mkdir(parents=True, exist_ok=True)
    for f in d.glob("*.db"):
        f.unlink()
    return d.resolve()


def _run_gateway(s: GatewaySettings, ns: argparse.Namespace) -> int:
    import uvicorn

    from gateway.server import GuardedHttpToolsProtocol, configure

    try:
        s.check_exposure()
    except SettingsError as exc:
        log.error("mgpu gateway: %s", exc)
        return 2
    configure(s.http_read_timeout_s, s.max_connections, s.retry_after_s)
    opts: dict[str, Any] = dict(host=s.host, port=s.port, log_level="warning", access_log=False, loop="uvloop",
                                http=GuardedHttpToolsProtocol, timeout_graceful_shutdown=5,
                                backlog=min(4096, s.max_connections))
    if s.gateway_procs > 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # set before any process imports prometheus_client; uvicorn's workers inherit the environment
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_multiproc_dir(s))
    if s.gateway_procs > 1:
        # every process loads the same settings from the environment, with a gateway_id of its own
        os.environ.update(to_env(s))
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


def _run_up(s: UpSettings, ns: argparse.Namespace) -> int:
    from ops.supervisor import run_up

    try:
        if "auth" not in s.model_fields_set and s.on_loopback:  # a single-machine service: keys are opt-in
            s = s.model_copy(update={"auth": "off"})
        s.check_exposure()
        if s.auth == "off":
            log.warning("API keys are off: anyone who can reach %s:%s can use every model (--auth keys, then "
                        "mgpu keys create, to require them)", s.host, s.port or "(its port)")
        return run_up(s)
    except SettingsError as exc:
        log.error("mgpu up: %s", exc)
        return 2


def _worker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", dest="deploy_version", default="dev", metavar="LABEL",
                   help="deployment version label (default: %(default)s)")


def _run_worker(s: WorkerSettings, ns: argparse.Namespace) -> int:
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


def _drain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("worker", help="the worker id (mgpu status, GET /workers)")


def _drain(s: ControlSettings, ns: argparse.Namespace) -> int:

    r = sync_client(s.redis_dsn)
    r.set(s.keys.drain(ns.worker), "1", ex=600)
    print(f"asked worker {ns.worker} to drain")
    return 0


def _status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.add_argument("--interval", type=float, default=1.0, help="refresh (and requests/s window), seconds")
    p.add_argument("--color", dest="color", action="store_true", default=None, help="colours even when piped")
    p.add_argument("--no-color", dest="color", action="store_false", help="no colours")


def _status(s: ControlSettings, ns: argparse.Namespace) -> int:
    from ops.status import run_status

    try:
        return asyncio.run(run_status(s.redis_dsn, s.keys, once=ns.once, interval=ns.interval, colour=ns.color))
    except KeyboardInterrupt:
        return 0


def _strategy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help=f"{', '.join(STRATEGIES)}; 'default': back to each gateway's own "
                                          "setting; none: show what is set")
    p.add_argument("--gateway", dest="target_gateway", default=None, metavar="ID", help="only this gateway id")


def _strategy(s: ControlSettings, ns: argparse.Namespace) -> int:

    r = sync_client(s.redis_dsn, decode_responses=True)
    field = f"strategy:{ns.target_gateway}" if ns.target_gateway else "strategy"
    if ns.name is None:
        control = r.hgetall(s.keys.control)
        shown = {k: v for k, v in control.items() if k == "strategy" or k.startswith("strategy:")}
        print(shown or "no run-time strategy set: each gateway uses its --strategy")
        return 0
    if ns.name == "default":
        r.hdel(s.keys.control, field)
    elif ns.name in STRATEGIES:
        r.hset(s.keys.control, field, ns.name)
    else:
        print(f"mgpu strategy: unknown strategy {ns.name!r}; one of {', '.join(STRATEGIES)}", file=sys.stderr)
        return 2
    print(f"{field} = {ns.name} (gateways pick it up within their registry refresh interval)")
    return 0


def _keys_arguments(p: argparse.ArgumentParser) -> None:
    from ops.keys import add_arguments

    add_arguments(p)


def _keys(s: ControlSettings, ns: argparse.Namespace) -> int:
    from ops.keys import run

    return run(s, ns)


def _batch_arguments(p: argparse.ArgumentParser) -> None:
    from ops.batch import add_arguments

    add_arguments(p)


def _batch(s: ControlSettings, ns: argparse.Namespace) -> int:
    from ops.batch import run

    return run(s, ns)


def _run_sim_server(s: SimServerSettings, ns: argparse.Namespace) -> int:
    from gpu_worker.sim_server import run_sim_server

    return run_sim_server(s)


COMMANDS: dict[str, Command[Any]] = {
    "up": Command(UpSettings, _run_up, "run the whole service on this machine"),
    "gateway": Command(GatewaySettings, _run_gateway, "run the HTTP gateway"),
    "worker": Command(WorkerSettings, _run_worker, "run one GPU worker", _worker_arguments),
    "drain": Command(ControlSettings, _drain, "ask a worker to drain and exit", _drain_arguments),
    "status": Command(ControlSettings, _status, "live view of workers and queues, from Redis", _status_arguments),
    "strategy": Command(ControlSettings, _strategy, "show or set the load-balancing strategy at run time",
                        _strategy_arguments),
    "rollout": Command(ControlSettings, run_rollout,
                       "zero-downtime rolling update of the workers of a running `mgpu up`", rollout_arguments,
                       "Roll the workers of a running `mgpu up` to new settings, one at a time, each gated by a "
                       "canary; a failed gate rolls every worker back. See docs/rollouts.md."),
    "keys": Command(ControlSettings, _keys, "API keys: create, list, show, revoke, rotate, usage", _keys_arguments,
                    "API keys, in Redis: mgpu keys create --name NAME [--rpm N --tpm N ...] prints a secret once."),
    "batch": Command(ControlSettings, _batch, "run an OpenAI batch JSONL file on the model's batch stream",
                     _batch_arguments, "mgpu batch submit FILE.jsonl --model M: the requests go to the model's "
                     "batch stream (idle slots only); the output JSONL is keyed by custom_id; rerun to resume."),
    "sim-server": Command(SimServerSettings, _run_sim_server,
                          "the sim engine as a standalone OpenAI-compatible server"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``mgpu`` argument parser (``bench`` and ``chaos`` hand their arguments to their own parsers)."""
    parser = argparse.ArgumentParser(prog="mgpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help, epilog=ENV_NOTE)
        if cmd.arguments is not None:
            cmd.arguments(p)
        p.usage = p.format_usage().removeprefix("usage: ").rstrip() + " [--SETTING VALUE ...]"  # not all 60
        add_settings_flags(p, cmd.settings)
    sub.add_parser("bench", help="load generator (see: mgpu bench --help)")
    sub.add_parser("chaos", help="chaos benchmark (see: mgpu chaos --help)")
    sub.add_parser("acl", help="the least-privilege Redis ACL user of a role (see: mgpu acl --help)")
    return parser


def _local_up_redis(s: ControlSettings) -> ControlSettings:
    """With no Redis URL given, a control command (status, drain, keys, ...) run where ``mgpu up`` runs uses
    the redis-server that ``mgpu up`` started: its URL, password included, is in ``<data dir>/redis-url``
    (readable by its owner only)."""
    url_file = Path(os.environ.get("MGPU_DATA_DIR") or ".data") / "redis-url"
    try:
        url = url_file.read_text().strip()
    except OSError:
        return s
    return s.model_copy(update={"redis_url": url}) if url else s


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
    if argv[:1] == ["acl"]:  # prints an ACL rule; it needs no settings and no Redis
        from ops.acl import main as acl_main

        return acl_main(argv[1:])
    ns = _parse(argv)
    try:
        s = _settings(ns)
        if type(s) is ControlSettings and "redis_url" not in s.model_fields_set:
            s = _local_up_redis(s)
        if isinstance(s, ControlSettings) and (ns.cmd != "up" or "redis_url" in s.model_fields_set):
            check_credentials(s.redis_dsn)  # a wrong password or TLS file stops it here, named
    except SettingsError as exc:
        print(f"mgpu {ns.cmd}: {exc}", file=sys.stderr)
        return 2
    setup_logging(s.log_level, s.log_json, name=f"[{ns.cmd}] ")
    return COMMANDS[ns.cmd].run(s, ns)


if __name__ == "__main__":
    sys.exit(main())

"""The container health check: ``python -m ops.healthcheck`` (the Dockerfile's ``HEALTHCHECK``).

One image runs every part, so the check reads the container's main command from ``/proc/1/cmdline``
(``tini -- mgpu worker ...``), loads its settings exactly as that process did (flags, then the
container's ``MGPU_*`` environment) and asks the right endpoint:

* ``mgpu gateway`` / ``mgpu up``: ``GET /health`` on the gateway's probe port (``health_port``, default
  the gateway port + 1: it answers under a connection flood on the API port; liveness: the event loop
  ticks; ``/ready``, which needs a live worker, is for load balancers, not for restarts);
* ``mgpu worker``: ``GET /health`` on the worker's metrics port (200 while the engine is healthy and the
  event loop ticks, also while the model loads or the worker drains);
* anything else (``status``, a model conversion, a shell): healthy.

Exit status 0 healthy, 1 unhealthy, as Docker expects; one line says why.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

_WILDCARD = ("", "0.0.0.0", "::", "[::]")


def mgpu_argv(cmdline: list[str]) -> list[str] | None:
    """The ``mgpu`` arguments in a process command line, past any init (``tini --``) and interpreter
    (``python -m ops.cli``); None when the process is not ``mgpu``."""
    for i, arg in enumerate(cmdline):
        if os.path.basename(arg) == "mgpu":
            return cmdline[i + 1:]
        if arg == "-m" and i + 1 < len(cmdline) and cmdline[i + 1] == "ops.cli":
            return cmdline[i + 2:]
    return None


def health_url(argv: list[str], env: Mapping[str, str] | None = None) -> str | None:
    """The ``/health`` URL of the process started with ``mgpu <argv>``; None when it has none."""
    if argv[:1] not in (["gateway"], ["up"], ["worker"]):
        return None
    from common.settings import GatewaySettings, WorkerSettings
    from ops.cli import parse_command

    ns, s = parse_command(argv, env)
    if ns.cmd == "worker":
        assert isinstance(s, WorkerSettings)
        host, port = s.metrics_host, s.metrics_port
        if port == 0:
            raise ValueError("the worker's metrics port is 0 (a free port): set MGPU_METRICS_PORT to check it")
    else:
        assert isinstance(s, GatewaySettings)  # mgpu gateway, mgpu up
        host, port = s.host, s.probe_port
    host = "127.0.0.1" if host in _WILDCARD else host
    return f"http://{host}:{port}/health"


def check(url: str, timeout: float = 4.0) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200, f"{url}: {r.status} {r.read(300).decode(errors='replace')}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code} {exc.read(300).decode(errors='replace')}"
    except OSError as exc:
        return False, f"{url}: {exc}"


def main(cmdline_path: str = "/proc/1/cmdline") -> int:
    raw = Path(cmdline_path).read_bytes().split(b"\0")
    argv = mgpu_argv([a.decode(errors="replace") for a in raw if a])
    try:
        url = None if argv is None else health_url(argv)
    except (ValueError, SystemExit) as exc:  # SettingsError is a ValueError
        print(f"unhealthy: {exc}")
        return 1
    if url is None:
        print("healthy: no mgpu gateway or worker in this container")
        return 0
    ok, why = check(url)
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

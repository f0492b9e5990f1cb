"""docker-compose.yml, its overrides and the Dockerfile, checked without Docker.

Each compose configuration (docker-compose.yml alone, and with every docker-compose.*.yml override) is
merged and interpolated as Compose does it for what these files use, then: every mgpu command parses
with mgpu's own CLI parser and its settings load from the service's environment; Prometheus scrapes
exactly the gateway and worker services at the ports they listen on; mounted host paths and Dockerfile
COPY sources exist; workers get time to drain; the generated fleets are current.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from common.settings import ENV_PREFIX, Settings
from ops import compose_workers, healthcheck
from ops.cli import parse_command

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
OVERRIDES = sorted(ROOT.glob("docker-compose.*.yml"))
CONFIGS = {"base": [BASE], **{p.name: [BASE, p] for p in OVERRIDES}}
GATEWAY_EXIT_S = 15.0  # a gateway exits within uvicorn's graceful shutdown (5 s) + its watchdog (10 s)


# ----------------------------------------------------------------------------- loading like Compose


_VAR = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\})")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}`` and ``$$``, on every string."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m.group(0) == "$$":
                return "$"
            got = env.get(m.group("name"))
            return got if got else (m.group("default") or "")

        return _VAR.sub(sub, value)
    return value


def _volume_target(v: Any) -> str:
    return str(v["target"]) if isinstance(v, dict) else str(v).split(":")[1]


def _merge(base: Any, over: Any, key: str = "") -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if key == "volumes" and isinstance(base, list) and isinstance(over, list):  # merged by container path
        targets = {_volume_target(v) for v in over}
        return [v for v in base if _volume_target(v) not in targets] + list(over)
    return copy.deepcopy(over)


@cache
def load(name: str) -> dict[str, Any]:
    """The configuration ``name`` (a key of CONFIGS), merged and interpolated with no variable set."""
    merged: dict[str, Any] = {}
    for path in CONFIGS[name]:
        doc = yaml.safe_load(path.read_text())
        merged = _merge(merged, {k: v for k, v in doc.items() if not k.startswith("x-")})
    return interpolate(merged, {})


def services(name: str) -> dict[str, dict[str, Any]]:
    return load(name)["services"]


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    assert isinstance(env, dict), "write `environment:` as a mapping"
    return {k: "" if v is None else str(v) for k, v in env.items()}


def seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), f"bad duration {duration!r}"
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[u] for n, u in parts)


# ----------------------------------------------------------------------------- the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def image_entrypoint() -> list[str]:
    entrypoints = [json.loads(rest) for word, rest in dockerfile_instructions() if word == "ENTRYPOINT"]
    assert len(entrypoints) == 1, "one ENTRYPOINT, in the base stage, for every target"
    return entrypoints[0]


def is_mgpu(svc: dict[str, Any]) -> bool:
    return "build" in svc or str(svc.get("image", "")).startswith("mgpu:")


def mgpu_argv(svc: dict[str, Any]) -> list[str] | None:
    """The ``mgpu`` arguments a service runs, or None when it runs something else."""
    entry = svc.get("entrypoint", image_entrypoint())
    command = svc.get("command", [])
    entry = shlex.split(entry) if isinstance(entry, str) else list(entry)
    command = shlex.split(command) if isinstance(command, str) else list(command)
    return healthcheck.mgpu_argv(entry + command)


def role(svc: dict[str, Any]) -> str | None:
    argv = mgpu_argv(svc) if is_mgpu(svc) else None
    return argv[0] if argv else None


def test_dockerfile_targets_entrypoint_healthcheck_and_user() -> None:
    ins = dockerfile_instructions()
    stages = [rest.split()[-1] for word, rest in ins if word == "FROM"]
    assert {"base", "cpu", "gpu"} <= set(stages) and stages[-1] == "cpu"
    assert image_entrypoint()[:2] == ["tini", "--"] and image_entrypoint()[2] == "mgpu"
    checks = [rest for word, rest in ins if word == "HEALTHCHECK"]
    assert len(checks) == 1
    cmd = json.loads(checks[0].split("CMD", 1)[1])
    assert cmd[:2] == ["python", "-m"] and importlib.util.find_spec(cmd[2]) is not None
    # every target ends as the unprivileged user
    users, stage = {}, None
    for word, rest in ins:
        if word == "FROM":
            stage = rest.split()[-1]
        elif word == "USER":
            users[stage] = rest
    uid = re.search(r"useradd --uid (\d+) --user-group .* mgpu", (ROOT / "Dockerfile").read_text())
    assert uid and users.get("cpu") == users.get("gpu") == f"{uid[1]}:{uid[1]}", "numeric: runAsNonRoot can check it"


def test_dockerfile_copy_sources_exist_and_reach_the_build_context() -> None:
    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip()]
    assert "*" in ignore, ".dockerignore keeps out everything but what it names"
    kept = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    copies = [rest for word, rest in dockerfile_instructions() if word == "COPY"]
    assert copies
    for rest in copies:
        args = [a for a in rest.split() if not a.startswith("--")]
        assert not any(a.startswith("--from") for a in rest.split())
        for src in args[:-1]:
            assert (ROOT / src).exists(), f"COPY {src}: no such path in the repository"
            assert src.rstrip("/") in kept, f"COPY {src}: .dockerignore leaves it out of the build context"


# ----------------------------------------------------------------------------- every configuration


@pytest.fixture(params=sorted(CONFIGS))
def config(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_mgpu_commands_parse_and_settings_load(config: str) -> None:
    ran = set()
    for name, svc in services(config).items():
        if not is_mgpu(svc):
            continue
        env = env_of(svc)
        for key in env:
            if key.startswith(ENV_PREFIX):
                assert key[len(ENV_PREFIX):].lower() in Settings.model_fields, f"{name}: {key} is no setting"
        argv = mgpu_argv(svc)
        if argv is None:  # a module run by python: it must exist (the model conversion)
            entry = list(svc["entrypoint"])
            assert entry[:2] == ["tini", "--"], f"{name}: run under tini (signals, zombies)"
            assert entry[2:4] == ["python", "-m"] and importlib.util.find_spec(entry[4]) is not None
            Settings.load(env=env)
            continue
        ns, s = parse_command(argv, env=env)  # argparse exits, Settings raises, on anything wrong
        ran.add(ns.cmd)
        if ns.cmd == "worker":
            assert s.worker_id == name, f"{name}: the worker id is the service name"
            assert s.drain_grace_s > 0
    assert {"gateway", "worker"} <= ran


def test_other_services_mgpu_variables_are_read_by_their_mounted_files(config: str) -> None:
    for name, svc in services(config).items():
        if is_mgpu(svc):
            continue
        mounted = "".join(p.read_text() for p in _host_files(svc))
        for key in env_of(svc):
            if key.startswith(ENV_PREFIX):
                assert "${" + key in mounted, f"{name}: {key} is read by none of its mounted files"


def _bind_mounts(svc: dict[str, Any]) -> list[tuple[Path, str]]:
    out = []
    for v in svc.get("volumes", []):
        if isinstance(v, dict):
            src, target = v.get("source", ""), v["target"]
            if v.get("type") != "bind":
                continue
        else:
            src, target = str(v).split(":")[:2]
        if src.startswith((".", "/")):
            out.append(((ROOT / src).resolve(), target))
    return out


def _host_files(svc: dict[str, Any]) -> list[Path]:
    files: list[Path] = []
    for src, _ in _bind_mounts(svc):
        files += [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    return files


def test_mounted_host_paths_exist_and_named_volumes_are_declared(config: str) -> None:
    cfg = load(config)
    for name, svc in cfg["services"].items():
        for src, target in _bind_mounts(svc):
            assert src.exists(), f"{name}: mounts {src} (at {target}), which is not in the repository"
            assert src.is_relative_to(ROOT), f"{name}: mounts {src} from outside the repository"
        for v in svc.get("volumes", []):
            src = v.get("source", "") if isinstance(v, dict) else str(v).split(":")[0]
            if src and not src.startswith((".", "/")):
                assert src in (cfg.get("volumes") or {}), f"{name}: volume {src} is not declared"


def _container_to_host(svc: dict[str, Any], path: str) -> Path | None:
    """The host file behind ``path`` in the container, through the service's bind mounts."""
    best: tuple[int, Path] | None = None
    for src, target in _bind_mounts(svc):
        p, t = PurePosixPath(path), PurePosixPath(target)
        if p == t or t in p.parents:
            cand = src / p.relative_to(t)
            if best is None or len(t.parts) > best[0]:
                best = (len(t.parts), cand)
    return None if best is None else best[1]


def _scraped(config: str) -> tuple[dict[str, set[str]], dict[str, Any]]:
    """job -> targets, from the Prometheus config the prometheus service runs, through its mounts."""
    prom = services(config)["prometheus"]
    flag = next(a for a in prom["command"] if a.startswith("--config.file="))
    cfg_path = PurePosixPath(flag.split("=", 1)[1])
    host_cfg = _container_to_host(prom, str(cfg_path))
    assert host_cfg is not None and host_cfg.is_file(), "the Prometheus config is not mounted"
    pcfg = yaml.safe_load(host_cfg.read_text())
    for rule in pcfg.get("rule_files", []):
        host_rule = _container_to_host(prom, str(cfg_path.parent / rule))
        assert host_rule is not None and host_rule.is_file(), f"rule file {rule} is not mounted"
    jobs: dict[str, set[str]] = {}
    for job in pcfg["scrape_configs"]:
        targets = jobs.setdefault(job["job_name"], set())
        for sc in job.get("static_configs", []):
            targets |= set(sc["targets"])
        for sd in job.get("file_sd_configs", []):
            for pattern in sd["files"]:
                container_glob = cfg_path.parent / pattern
                mounts = [(src, t) for src, t in _bind_mounts(prom)
                          if PurePosixPath(t).match(str(container_glob))]
                assert mounts, f"{job['job_name']}: nothing is mounted at {container_glob}"
                for src, _ in mounts:
                    for group in json.loads(src.read_text()):
                        targets |= set(group["targets"])
        assert not set(job) - {"job_name", "static_configs", "file_sd_configs", "metrics_path", "scrape_interval"}
    return jobs, pcfg


def test_prometheus_scrapes_exactly_the_gateway_and_worker_services(config: str) -> None:
    want: dict[str, set[str]] = {"mgpu-gateway": set(), "mgpu-worker": set()}
    for name, svc in services(config).items():
        r = role(svc)
        if r not in ("gateway", "worker"):
            continue
        _, s = parse_command(mgpu_argv(svc) or [], env=env_of(svc))
        if r == "gateway":
            assert s.host == "0.0.0.0", f"{name}: listen on every interface, or Prometheus cannot reach it"
            want["mgpu-gateway"].add(f"{name}:{s.port}")
        else:
            assert s.metrics_host == "0.0.0.0" and s.metrics_port != 0, f"{name}: a fixed, reachable metrics port"
            want["mgpu-worker"].add(f"{name}:{s.metrics_port}")
    jobs, _ = _scraped(config)
    assert jobs == want


def test_workers_drain_within_their_stop_grace_period(config: str) -> None:
    for name, svc in services(config).items():
        r = role(svc)
        if r == "worker":
            _, s = parse_command(mgpu_argv(svc) or [], env=env_of(svc))
            # after the drain: cancelling leftovers, handing them back, the engine's shutdown
            assert seconds(svc["stop_grace_period"]) >= s.drain_grace_s + 15, name
        elif r == "gateway":
            assert seconds(svc["stop_grace_period"]) > GATEWAY_EXIT_S, name
        if r in ("gateway", "worker"):
            assert svc.get("restart") in ("always", "unless-stopped"), f"{name}: restart it when it dies"
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy"


def test_every_worker_runs_the_same_settings_but_its_id(config: str) -> None:
    workers = {n: s for n, s in services(config).items() if role(s) == "worker"}
    assert sorted(workers) == [f"worker-{k}" for k in range(len(workers))]
    envs = [{k: v for k, v in env_of(s).items() if k != "MGPU_WORKER_ID"} for s in workers.values()]
    assert all(e == envs[0] for e in envs)
    for name, svc in workers.items():
        assert svc["depends_on"]["model-init"]["condition"] == "service_completed_successfully"
        assert svc["shm_size"] == compose_workers.SHM_SIZE, f"{name}: vLLM needs more than 64 MB of /dev/shm"
        assert svc["image"] == services(config)["gateway"]["image"] == services(config)["model-init"]["image"]
        devices = svc.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        if devices:  # one GPU each, its own; inside the container it is GPU 0
            assert devices == [{"driver": "nvidia", "device_ids": [name.split("-")[1]], "capabilities": ["gpu"]}]
            assert env_of(svc)["MGPU_GPU"] == "0"


def test_the_base_worker_has_the_generators_environment() -> None:
    # before interpolation: the same `${VAR:-default}` knobs
    raw = yaml.safe_load(BASE.read_text())["services"]["worker-0"]["environment"]
    assert {k: str(v) for k, v in raw.items()} == {**compose_workers.WORKER_ENV, **compose_workers.FLEET_ENV["cpu"],
                                                   "MGPU_WORKER_ID": "worker-0"}
    assert compose_workers.targets_path(None).read_text() == compose_workers.targets_json(1)


@pytest.mark.parametrize("override", OVERRIDES, ids=[p.name for p in OVERRIDES])
def test_generated_fleets_are_current(override: Path) -> None:
    m = re.match(r"# Generated by `python3 ops/compose_workers.py (cpu|gpu) (\d+)`", override.read_text())
    assert m, f"{override.name}: not written by ops/compose_workers.py"
    fleet, n = m.group(1), int(m.group(2))
    assert override == compose_workers.override_path(fleet)
    assert override.read_text() == compose_workers.render(fleet, n), "rerun ops/compose_workers.py"
    assert compose_workers.targets_path(fleet).read_text() == compose_workers.targets_json(n)


def test_gpu_fleet_of_four(tmp_path: Path) -> None:
    """A fleet other than the committed one: merged onto the base, it agrees with Prometheus too."""
    text = compose_workers.render("gpu", 4)
    doc = _merge(yaml.safe_load(BASE.read_text()), yaml.safe_load(text))
    svcs = interpolate({k: v for k, v in doc.items() if not k.startswith("x-")}, {})["services"]
    assert [n for n in svcs if n.startswith("worker-")] == [f"worker-{k}" for k in range(4)]
    assert [svcs[f"worker-{k}"]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"]
            for k in range(4)] == [["0"], ["1"], ["2"], ["3"]]
    groups = json.loads(compose_workers.targets_json(4))
    assert groups[0]["targets"] == [f"worker-{k}:9400" for k in range(4)]


def test_redis_is_durable_and_never_evicts() -> None:
    redis_svc = services("base")["redis"]
    cmd = redis_svc["command"]
    opts = dict(zip(cmd[1::2], cmd[2::2]))
    assert cmd[0] == "redis-server"
    assert opts["--appendonly"] == "yes" and opts["--appendfsync"] == "everysec"
    assert opts["--maxmemory-policy"] == "noeviction"
    assert redis_svc["healthcheck"]["test"][:2] == ["CMD", "redis-cli"]
    assert any(_volume_target(v) == "/data" for v in redis_svc["volumes"])


# ----------------------------------------------------------------------------- the container health check


def test_healthcheck_finds_the_endpoint_of_each_service() -> None:
    svcs = services("base")
    gw, worker = svcs["gateway"], svcs["worker-0"]
    assert healthcheck.health_url(mgpu_argv(gw) or [], env_of(gw)) == "http://127.0.0.1:8001/health"  # the probe port
    assert healthcheck.health_url(mgpu_argv(worker) or [], env_of(worker)) == "http://127.0.0.1:9400/health"
    assert healthcheck.mgpu_argv(["/usr/bin/tini", "--", "/opt/mgpu/venv/bin/mgpu", "worker", "--slots", "4"]) == [
        "worker", "--slots", "4"]
    assert healthcheck.mgpu_argv(["tini", "--", "python", "-m", "gpu_worker.model_store", "/models"]) is None
    assert healthcheck.health_url(["status", "--once"], {}) is None
    with pytest.raises(ValueError, match="metrics port is 0"):
        healthcheck.health_url(["worker"], {})


def test_healthcheck_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"tini\0--\0python\0-m\0gpu_worker.model_store\0/models\0")
    assert healthcheck.main(str(cmdline)) == 0
    # a gateway that does not answer: nothing listens on port 1
    cmdline.write_bytes(b"tini\x00--\x00mgpu\x00gateway\x00--port\x001\x00")
    assert healthcheck.main(str(cmdline)) == 1
    assert "unhealthy" in capsys.readouterr().out

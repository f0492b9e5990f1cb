"""docker-compose.yml, its overrides and the Dockerfile, checked without Docker.

Each compose configuration (docker-compose.yml alone, and with every docker-compose.*.yml override) is
merged and interpolated as Compose does it for what these files use (``$$``, ``$VAR``, ``${VAR}``,
``${VAR:-default}``, ``${VAR:?error}``, ...), with the three secrets it requires set, then: every mgpu
command parses with mgpu's own CLI parser and its settings load from the service's environment;
Prometheus scrapes exactly the gateway and worker services at the ports they listen on; mounted host
paths and Dockerfile COPY sources exist; workers get time to drain; the generated fleets are current.

Access control: Compose refuses to render without ``REDIS_PASSWORD``, ``MGPU_API_KEY`` or
``GRAFANA_ADMIN_PASSWORD`` (none has a default); Redis requires the password (its entrypoint script is
run here against a real redis-server where one is installed) and every mgpu service's ``MGPU_REDIS_URL``
carries it; the gateway checks API keys, bootstrapped from ``MGPU_API_KEY``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import time
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
import yaml
from redis.backoff import NoBackoff
from redis.retry import Retry

from common.apikeys import key_id
from common.settings import ENV_PREFIX, ControlSettings, GatewaySettings, Settings
from ops import compose_workers, healthcheck
from ops.cli import parse_command

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "docker-compose.yml"
OVERRIDES = sorted(ROOT.glob("docker-compose.*.yml"))
CONFIGS = {"base": [BASE], **{p.name: [BASE, p] for p in OVERRIDES}}
GATEWAY_EXIT_S = 15.0  # a gateway exits within uvicorn's graceful shutdown (5 s) + its watchdog (10 s)
# what the README has the operator export (openssl rand -hex 24 / -hex 12): Compose requires each
SECRETS = {"REDIS_PASSWORD": "5f1c0ffee0ddba11" * 3, "MGPU_API_KEY": "a11ce0b0b0c0ffee" * 3,
           "GRAFANA_ADMIN_PASSWORD": "9a7e5a1d3c0de42f" * 3}


# ----------------------------------------------------------------------------- loading like Compose


_VAR = re.compile(r"\$(?:(?P<escaped>\$)|(?P<named>[A-Za-z_][A-Za-z0-9_]*)"
                  r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-+?])(?P<arg>[^}]*))?\}|(?P<invalid>))")


class MissingVariable(ValueError):
    """``${VAR:?error}`` / ``${VAR?error}`` with VAR unset (or empty, for ``:?``): Compose stops with the error."""

    def __init__(self, name: str, error: str) -> None:
        super().__init__(f"required variable {name} is missing a value: {error}")
        self.name, self.error = name, error


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation, on every string: ``$$`` (a ``$``), ``$VAR``, ``${VAR}``, ``${VAR:-default}``,
    ``${VAR-default}``, ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}``, ``${VAR+alt}``.  A ``$`` that
    starts none of them is an error, as Compose v1 has it (v2 leaves it as it is)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m.group("escaped"):
                return "$"
            if m.group("invalid") is not None:
                raise ValueError(f"invalid interpolation format in {value!r}")
            name = m.group("named") or m.group("braced")
            got, op, arg = env.get(name), m.group("op") or "", m.group("arg") or ""
            present = got is not None and (got != "" or not op.startswith(":"))
            if op.endswith("?") and not present:
                raise MissingVariable(name, arg)
            if op.endswith("-"):
                return got if present and got is not None else arg
            if op.endswith("+"):
                return arg if present else ""
            return got or ""

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
def raw(name: str) -> dict[str, Any]:
    """The configuration ``name`` (a key of CONFIGS), merged, before interpolation."""
    merged: dict[str, Any] = {}
    for path in CONFIGS[name]:
        doc = yaml.safe_load(path.read_text())
        merged = _merge(merged, {k: v for k, v in doc.items() if not k.startswith("x-")})
    return merged


@cache
def load(name: str) -> dict[str, Any]:
    """The configuration ``name``, interpolated with the secrets set and no other variable."""
    out: dict[str, Any] = interpolate(raw(name), SECRETS)
    return out


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
            want["mgpu-gateway"].add(f"{name}:{s.probe_port}")  # the probe listener: /metrics without a key
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
    svcs = interpolate({k: v for k, v in doc.items() if not k.startswith("x-")}, SECRETS)["services"]
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


# ----------------------------------------------------------------------------- access control


_REQUIRED = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:?[-+?])?(?P<arg>[^}]*)\}")


def _references(name: str) -> list[tuple[str, str]]:
    """(operator, argument) of every ``${name...}`` in the compose files."""
    return [(m["op"] or "", m["arg"]) for p in [BASE, *OVERRIDES] for m in _REQUIRED.finditer(p.read_text())
            if m["name"] == name]


@pytest.mark.parametrize("var", sorted(SECRETS))
def test_every_secret_is_required_and_has_no_default(var: str) -> None:
    refs = _references(var)
    assert refs, f"{var} is used nowhere"
    for op, arg in refs:
        assert op == ":?", f"${{{var}{op}{arg}}}: a secret is required (:?), never defaulted (an empty one too)"
        assert var in arg and "openssl rand" in arg, f"${{{var}:?...}}: say what it is and how to make one"


@pytest.mark.parametrize("var", sorted(SECRETS))
def test_rendering_without_a_secret_fails(config: str, var: str) -> None:
    for env in ({k: v for k, v in SECRETS.items() if k != var}, {**SECRETS, var: ""}):
        with pytest.raises(MissingVariable) as exc:
            interpolate(raw(config), env)
        assert exc.value.name == var and "openssl rand" in exc.value.error
    assert interpolate(raw(config), SECRETS) == load(config)  # and with all three it renders


def test_interpolation_like_compose() -> None:
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("$$SET ${SET} $SET ${UNSET:-d} ${EMPTY:-d} ${EMPTY-d} ${SET:+a} ${EMPTY+a}", env) == \
        "$SET v v d d  a a"
    with pytest.raises(MissingVariable, match="EMPTY is missing a value: why"):
        interpolate("${EMPTY:?why}", env)
    assert interpolate("${EMPTY?why}", env) == ""
    with pytest.raises(ValueError, match="invalid interpolation"):
        interpolate("e.g. $(openssl rand -hex 24)", env)


def test_every_mgpu_service_reaches_redis_with_the_password(config: str) -> None:
    checked = set()
    for name, svc in services(config).items():
        if not is_mgpu(svc) or mgpu_argv(svc) is None:  # the model conversion runs no mgpu command, no Redis
            continue
        url = urlsplit(env_of(svc).get("MGPU_REDIS_URL", ""))
        assert (url.scheme, url.hostname, url.port, url.path) == ("redis", "redis", 6379, "/0"), name
        assert url.password == SECRETS["REDIS_PASSWORD"], f"{name}: MGPU_REDIS_URL has no Redis password"
        _, s = parse_command(mgpu_argv(svc) or [], env=env_of(svc))
        assert isinstance(s, ControlSettings) and urlsplit(s.redis_dsn).password == SECRETS["REDIS_PASSWORD"], name
        checked.add(role(svc))
    assert checked == {"gateway", "worker"}
    # one spelling, the generator's, in docker-compose.yml too
    base = yaml.safe_load(BASE.read_text())["services"]
    assert base["gateway"]["environment"]["MGPU_REDIS_URL"] == compose_workers.REDIS_URL
    assert base["redis"]["environment"]["REDIS_PASSWORD"] == compose_workers.REDIS_PASSWORD_REQUIRED


def test_gateway_checks_api_keys_bootstrapped_from_the_environment(config: str) -> None:
    gw = services(config)["gateway"]
    _, s = parse_command(mgpu_argv(gw) or [], env=env_of(gw))
    assert isinstance(s, GatewaySettings)
    assert s.auth == "keys" and not s.insecure_no_auth
    assert s.bootstrap_api_key == SECRETS["MGPU_API_KEY"]
    s.check_exposure()  # listens on 0.0.0.0 with keys on: allowed
    assert key_id(SECRETS["MGPU_API_KEY"]) is not None, "openssl rand -hex 24 makes a key the gateway takes"
    assert gw["ports"] == ["8000:8000"]  # still published, on every interface: the keys are what guards it
    # `docker compose exec gateway mgpu keys create ...` (the README): the container's settings reach Redis
    _, ctl = parse_command(["keys", "create", "--name", "alice"], env=env_of(gw))
    assert isinstance(ctl, ControlSettings) and urlsplit(ctl.redis_dsn).password == SECRETS["REDIS_PASSWORD"]
    raw_env = raw(config)["services"]["gateway"]["environment"]
    assert raw_env["MGPU_AUTH"] == "keys"
    assert re.fullmatch(r"\$\{MGPU_API_KEY:\?[^}]*Authorization: Bearer[^}]*20\+ characters[^}]*\}",
                        raw_env["MGPU_BOOTSTRAP_API_KEY"])


def test_grafana_admin_password_is_required(config: str) -> None:
    env = env_of(services(config)["grafana"])
    assert env["GF_SECURITY_ADMIN_PASSWORD"] == SECRETS["GRAFANA_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}",
                        raw(config)["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"])
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"


def test_the_secrets_are_documented_where_the_commands_are() -> None:
    header = "".join(ln for ln in BASE.read_text().splitlines(keepends=True) if ln.startswith("#"))
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Docker Compose"):]
    section = section[:section.index("\n## ", 1)]
    for var in SECRETS:
        assert f"export {var}=$(openssl rand -hex" in header, f"docker-compose.yml's header: export {var}"
        assert f"{var}=$(openssl rand -hex" in section, f"README's Docker Compose section: {var}"
    assert "Authorization: Bearer $MGPU_API_KEY" in header and "Authorization: Bearer $MGPU_API_KEY" in section


# the redis service's entrypoint script, run by sh as the container runs it, with docker-entrypoint.sh (the
# official image's, which starts redis-server as the redis user) replaced by a stand-in


def _redis_entrypoint(tmp_path: Path, entrypoint_sh: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    svc = services("base")["redis"]
    entry, command = svc["entrypoint"], svc["command"]
    assert entry[:2] == ["sh", "-c"] and len(entry) == 4, "sh -c SCRIPT NAME, then the command as its arguments"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    stand_in = bin_dir / "docker-entrypoint.sh"
    stand_in.write_text("#!/bin/sh\n" + entrypoint_sh)
    stand_in.chmod(0o755)
    full_env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "OUT": str(tmp_path), **env}
    return subprocess.Popen([*entry, *command], env=full_env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_redis_gets_the_password_on_stdin_not_in_its_arguments(tmp_path: Path) -> None:
    svc = services("base")["redis"]
    env = env_of(svc)
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == SECRETS["REDIS_PASSWORD"]
    proc = _redis_entrypoint(tmp_path, 'printf "%s\\n" "$@" > "$OUT/argv"\ncat > "$OUT/stdin"\n', env)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv == [*svc["command"], "-"], "redis-server ... - : the config on stdin, after the arguments"
    assert (tmp_path / "stdin").read_text() == f"requirepass {SECRETS['REDIS_PASSWORD']}\n"
    assert SECRETS["REDIS_PASSWORD"] not in " ".join(svc["command"] + svc["entrypoint"])
    opts = dict(zip(argv[1::2], argv[2::2]))
    assert opts["--protected-mode"] == "yes"  # inert with a password; refuses other hosts without one


@pytest.mark.parametrize("password", ["", "pass@word", "with space", 'quo"te', "p/w"])
def test_redis_refuses_a_password_that_would_break_the_urls(tmp_path: Path, password: str) -> None:
    proc = _redis_entrypoint(tmp_path, 'touch "$OUT/started"\n', {"REDIS_PASSWORD": password})
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 1 and b"REDIS_PASSWORD" in err
    assert not (tmp_path / "started").exists()


@pytest.mark.skipif(not (shutil.which("redis-server") and shutil.which("redis-cli")), reason="no redis-server")
def test_redis_service_requires_the_password_and_its_health_check_knows_it(tmp_path: Path) -> None:
    """The real redis-server, started by the service's script with its command (on a unix socket here): the
    gateway's URL password gets in, no password or a wrong one does not, and the health check says so."""
    svc, gw = services("base")["redis"], services("base")["gateway"]
    sock = tmp_path / "redis.sock"
    cli = tmp_path / "bin" / "redis-cli"
    cli.parent.mkdir()
    cli.write_text(f'#!/bin/sh\nexec {shutil.which("redis-cli")} -s "{sock}" "$@"\n')
    cli.chmod(0o755)
    proc = _redis_entrypoint(tmp_path, f'[ "$1" = redis-server ] || exit 97\nshift\n'
                             f'exec redis-server --port 0 --unixsocket "{sock}" --dir "$OUT" "$@"\n', env_of(svc))
    try:
        deadline = time.monotonic() + 15
        while not sock.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        assert "redis-server" in Path(f"/proc/{proc.pid}/cmdline").read_text(), "exec: redis-server is PID 1"
        password = urlsplit(env_of(gw)["MGPU_REDIS_URL"]).password
        once = Retry(NoBackoff(), 0)  # redis-py retries a refused AUTH with backoff by default
        with redis.Redis(unix_socket_path=str(sock), password=password, retry=once) as r:
            assert r.ping()
            assert r.config_get("appendonly") == {"appendonly": "yes"}
            assert r.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        for wrong in (None, "wrong-password"):
            with redis.Redis(unix_socket_path=str(sock), password=wrong, retry=once) as r, \
                    pytest.raises((redis.AuthenticationError, redis.ResponseError)):
                r.ping()
        check = svc["healthcheck"]["test"]
        assert check[0] == "CMD-SHELL"
        path_env = {"PATH": f"{cli.parent}:{os.environ['PATH']}"}
        for auth, healthy in ((env_of(svc)["REDISCLI_AUTH"], True), ("wrong-password", False), ("", False)):
            rc = subprocess.run(["sh", "-c", check[1]], env={**path_env, "REDISCLI_AUTH": auth},
                                capture_output=True, timeout=30).returncode
            assert (rc == 0) == healthy, f"health check with REDISCLI_AUTH={auth!r}: exit {rc}"
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0, "redis-server exits 0 on SIGTERM (it saves the AOF)"

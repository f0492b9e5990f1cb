"""The settings classes (common/settings.py): layering, errors that name the setting, the ``MGPU_*``
round trip, and one declaration per field."""

from __future__ import annotations

import inspect
from typing import Any, Literal, get_args, get_origin

import pytest
from pydantic.fields import FieldInfo

from common import settings as settings_module
from common.settings import (
    ROLLOUT_FIELDS,
    ControlSettings,
    GatewaySettings,
    LogSettings,
    MgpuSettings,
    Settings,
    SettingsError,
    SimServerSettings,
    UpSettings,
    WorkerSettings,
    per_process,
    to_env,
)

ROLES: list[type[MgpuSettings]] = [LogSettings, ControlSettings, GatewaySettings, WorkerSettings, SimServerSettings,
                                   UpSettings]
CLASSES = list(dict.fromkeys(c for c in vars(settings_module).values()  # (Settings names UpSettings again)
                             if inspect.isclass(c) and issubclass(c, MgpuSettings) and c is not MgpuSettings))
# text settings whose valid values a rule cannot guess
TEXT: dict[str, Any] = {"redis_url": "rediss://u:p@10.0.0.5:6380/2", "redis_tls_ca": "/etc/tls/ca.pem",
                        "redis_tls_cert": "/etc/tls/c.pem", "redis_tls_key": "/etc/tls/c.key", "namespace": "ns-2",
                        "revision": "v2.1",
                        "redis_maxmemory": "512mb",
                        # quoting survives the trip through MGPU_ENGINE_ARGS
                        "engine_args": ["--tensor-parallel-size", "2", "--chat-template", "a b's {{x}}"],
                        "key_cache_s": 0.25, "allowed_hosts": ["gw.example", "10.0.0.7"],
                        "cors_origins": ["https://app.example"], "bootstrap_api_key": "x" * 24, "max_key_share": 0.25}


def _other(name: str, f: FieldInfo) -> Any:
    """A valid value of the field that is not its default."""
    if name in TEXT:
        return TEXT[name]
    tp: Any = f.annotation
    args = [a for a in get_args(tp) if a is not type(None)]
    if args and get_origin(tp) is not Literal:
        tp = args[0]
    default = None if f.default_factory is not None else f.default
    if get_origin(tp) is Literal:
        return next(v for v in reversed(get_args(tp)) if v != default)
    if tp is bool:
        return not default
    if tp in (int, float):
        bounds = {k: getattr(m, k) for m in f.metadata for k in ("ge", "gt", "le", "lt")
                  if getattr(m, k, None) is not None}
        v = (default if default is not None else bounds.get("ge", bounds.get("gt", 0))) + 1
        if v > bounds.get("le", v) or v >= bounds.get("lt", v + 1):
            v = default - 1
        return tp(v) if tp is int else v + 0.25
    return TEXT.get(name, f"{name}-x")


def test_engine_flags_from_the_environment_and_the_command_line() -> None:
    assert WorkerSettings.load(env={"MGPU_ENGINE_ARGS": "-tp 2 --chat-template 'a b'"}).engine_args == [
        "-tp", "2", "--chat-template", "a b"]
    assert WorkerSettings.load({"engine_args": ["--x", "1"]}, env={"MGPU_ENGINE_ARGS": "-tp 2"}).engine_args == [
        "--x", "1"]


def test_defaults_then_environment_then_overrides() -> None:
    env = {"MGPU_SLOTS": "8", "MGPU_PORT": "9000", "MGPU_ENGINE": "sim", "MGPU_MODEL": ""}
    s = UpSettings.load({"slots": "64", "model": None}, env=env)
    assert (s.slots, s.port, s.engine, s.model) == (64, 9000, "sim", "SmolLM2-135M-Instruct")
    assert s.model_fields_set == {"slots", "port", "engine"}  # an empty variable and a None override are unset
    w = WorkerSettings.load(env={**env, "mgpu_max_model_len": "99", "MGPU_max_model_len": "98"})
    assert (w.slots, w.max_model_len) == (8, 2048)  # only MGPU_<NAME> in capitals
    assert GatewaySettings.load(env=env).port == 9000  # each role reads its own fields and ignores the rest


def test_construction_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGPU_SLOTS", "5")
    assert WorkerSettings().slots == 32
    assert WorkerSettings.model_validate({"model": "m"}).slots == 32  # as the supervisor checks a rollout target
    assert WorkerSettings.load().slots == 5
    assert WorkerSettings.load(env={}).slots == 32


@pytest.mark.parametrize(("cls", "name", "bad"), [
    (WorkerSettings, "slots", "0"),
    (WorkerSettings, "engine", "tensorrt"),
    (WorkerSettings, "vllm_dtype", "int3"),
    (GatewaySettings, "strategy", "fastest"),
    (GatewaySettings, "redis_memory_high_water", "1.5"),
    (ControlSettings, "redis_url", "http://nope"),
    (ControlSettings, "namespace", "a b"),
    (UpSettings, "redis_maxmemory", "lots"),
    (SimServerSettings, "port", "70000"),
    (LogSettings, "log_level", "loud"),
    (LogSettings, "log_json", "perhaps"),
])
def test_a_bad_value_names_the_setting(cls: type[MgpuSettings], name: str, bad: str) -> None:
    want = f"MGPU_{name.upper()} / --{name.replace('_', '-')}: "
    with pytest.raises(SettingsError, match=want):
        cls.load(env={f"MGPU_{name.upper()}": bad})
    with pytest.raises(SettingsError, match=want):
        cls.load({name: bad}, env={})


def test_a_setting_of_another_role_is_refused_by_name() -> None:
    with pytest.raises(SettingsError, match="MGPU_SLOTS / --slots: Extra inputs"):
        GatewaySettings.load({"slots": "4"}, env={})


def test_log_level_is_read_in_any_case() -> None:
    assert [LogSettings.load({"log_level": v}, env={}).log_level for v in ("debug", "Warn", "fatal")] == [
        "DEBUG", "WARNING", "CRITICAL"]


@pytest.mark.parametrize("cls", ROLES, ids=lambda c: c.__name__)
def test_environment_round_trip(cls: type[MgpuSettings]) -> None:
    values = {name: _other(name, f) for name, f in cls.model_fields.items()}
    s = cls(**values)
    assert all(getattr(s, k) != f.default for k, f in cls.model_fields.items() if f.default_factory is None)
    env = to_env(s)
    assert not {f"MGPU_{k.upper()}" for k in per_process(cls)} & set(env)  # ids, GPU, gate: not handed on
    back = cls.load(env=env)
    skip = per_process(cls)
    assert back.model_dump(exclude=skip) == s.model_dump(exclude=skip)
    assert set(env) == {f"MGPU_{k.upper()}" for k in cls.model_fields} - {f"MGPU_{k.upper()}" for k in skip}


def test_unset_values_are_not_exported() -> None:
    env = to_env(WorkerSettings())
    assert "MGPU_MODEL_PATH" not in env and "MGPU_WEIGHT" not in env and "MGPU_REVISION" not in env
    assert WorkerSettings.load(env=env) == WorkerSettings.load(env={})


def test_a_role_taken_from_the_superset() -> None:
    up = UpSettings.load({"slots": "3", "port": "9100", "workers": "2"}, env={})
    w, g = WorkerSettings.of(up), GatewaySettings.of(up)
    assert type(w) is WorkerSettings and type(g) is GatewaySettings
    assert (w.slots, g.port, g.gateway_id) == (3, 9100, up.gateway_id)
    assert w.effective_revision == up.effective_revision


def test_classes_and_fields() -> None:
    assert Settings is UpSettings and issubclass(UpSettings, GatewaySettings) and issubclass(UpSettings, WorkerSettings)
    assert set(ROLLOUT_FIELDS) <= set(WorkerSettings.model_fields)
    assert per_process(UpSettings) == {"gateway_id", "worker_id", "gpu", "canary_gate"}
    declared: dict[str, str] = {}
    for c in CLASSES:  # every field is declared once, in one class
        for name in inspect.get_annotations(c):
            if name in c.model_fields:
                assert name not in declared, f"{name}: declared in {declared[name]} and {c.__name__}"
                declared[name] = c.__name__
    assert set(declared) == set(UpSettings.model_fields)


def test_probe_port() -> None:
    assert GatewaySettings(port=8000).probe_port == 8001
    assert GatewaySettings(port=0).probe_port == 0
    assert GatewaySettings(port=8000, health_port=7000).probe_port == 7000

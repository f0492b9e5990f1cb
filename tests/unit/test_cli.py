"""The ``mgpu`` command line (ops/cli.py, ops/flags.py): each subcommand's settings flags are exactly
its settings class's fields, ``--help`` shows the choices of enumerated settings, and flags are loaded
over the environment."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import pytest

from common.settings import (
    STRATEGIES,
    ControlSettings,
    GatewaySettings,
    MgpuSettings,
    SettingsError,
    SimServerSettings,
    UpSettings,
    WorkerSettings,
    flag_name,
    per_process,
    to_env,
)
from ops import cli
from ops.cli import COMMANDS, build_parser, parse_command


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _own_dests(name: str) -> set[str]:
    """The command's arguments that are not settings (and -h)."""
    bare = argparse.ArgumentParser()
    if COMMANDS[name].arguments is not None:
        COMMANDS[name].arguments(bare)  # type: ignore[misc]
    return {a.dest for a in bare._actions}


def _choices(tp: Any) -> tuple[Any, ...] | None:
    tp = next((a for a in get_args(tp) if a is not type(None)), tp) if get_origin(tp) is not Literal else tp
    return get_args(tp) if get_origin(tp) is Literal else None


@pytest.mark.parametrize("name", list(COMMANDS))
def test_flags_are_the_fields_of_the_commands_settings_class(name: str) -> None:
    cls = COMMANDS[name].settings
    p = _subparsers()[name]
    settings_flags = {a.dest: a for a in p._actions if a.dest not in _own_dests(name)}
    assert set(settings_flags) == set(cls.flag_names())
    for dest, action in settings_flags.items():
        assert action.option_strings == [flag_name(dest)] and action.default is None


def test_each_command_has_its_roles_class() -> None:
    assert {n: c.settings for n, c in COMMANDS.items()} == {
        "up": UpSettings, "gateway": GatewaySettings, "worker": WorkerSettings, "drain": ControlSettings,
        "status": ControlSettings, "strategy": ControlSettings, "rollout": ControlSettings, "keys": ControlSettings,
        "batch": ControlSettings,
        "sim-server": SimServerSettings}
    for cls in {c.settings for c in COMMANDS.values()} - {UpSettings}:
        assert cls.flag_names() == tuple(cls.model_fields)
    # mgpu up gives each process it starts its own id, GPU and canary gate
    assert set(UpSettings.flag_names()) == set(UpSettings.model_fields) - per_process(UpSettings)


def test_roles_take_only_their_flags() -> None:
    with pytest.raises(SystemExit):
        parse_command(["gateway", "--slots", "4"], env={})
    with pytest.raises(SystemExit):
        parse_command(["worker", "--strategy", "pull"], env={})
    with pytest.raises(SystemExit):
        parse_command(["up", "--worker-id", "w"], env={})
    _, s = parse_command(["drain", "w1", "--namespace", "n2"], env={})
    assert type(s) is ControlSettings and s.keys.ns == "n2"


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_lists_the_choices_of_enumerated_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    cls: type[MgpuSettings] = COMMANDS[name].settings
    text = _subparsers()[name].format_help()
    for field in cls.flag_names():
        choices = _choices(cls.model_fields[field].annotation)
        if choices is not None:
            assert f"{flag_name(field)} {{{','.join(choices)}}}" in text, field
        elif cls.model_fields[field].annotation is bool:
            assert f"{flag_name(field)} {{true,false}}" in text, field


def test_gateway_help_shows_the_strategies_and_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    text = _subparsers()["gateway"].format_help()
    assert "--strategy {pull,round_robin,least_loaded,weighted,prefix_affinity}" in text
    assert "default: pull" in text
    assert ", ".join(STRATEGIES) in " ".join(_subparsers()["strategy"].format_help().split())


def test_the_strategies_are_listed_once() -> None:
    from gateway import routing

    assert routing.STRATEGIES is STRATEGIES
    assert _choices(GatewaySettings.model_fields["strategy"].annotation) == STRATEGIES


def test_flags_beat_the_environment(tmp_path: Path) -> None:
    env = {"MGPU_SLOTS": "8", "MGPU_ENGINE": "sim", "MGPU_MODEL": "from-env"}
    ns, s = parse_command(["worker", "--slots", "64", "--version", "v9"], env=env)
    assert isinstance(s, WorkerSettings) and (s.slots, s.engine, s.model) == (64, "sim", "from-env")
    assert ns.deploy_version == "v9"
    model = tmp_path / "llama-x"
    model.mkdir()
    _, s = parse_command(["up", "--model", str(model)], env={})
    assert isinstance(s, UpSettings) and (s.model, s.model_path) == ("llama-x", str(model))
    _, s = parse_command(["sim-server", "--model", str(model)], env={})  # no model_path: the name as given
    assert isinstance(s, SimServerSettings) and s.model == str(model)


def test_a_bad_flag_names_the_setting(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MGPU_SLOTS", raising=False)
    assert cli.main(["worker", "--slots", "0"]) == 2
    assert "MGPU_SLOTS / --slots: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert cli.main(["gateway", "--strategy", "fastest"]) == 2
    assert "MGPU_STRATEGY / --strategy: Input should be 'pull'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- engine flags and GPU plans


def test_engine_flags_follow_the_double_dash() -> None:
    _ns, s = parse_command(["worker", "--engine", "vllm", "--slots", "8", "--", "--tensor-parallel-size", "2",
                           "--chat-template", "a b"], env={})
    assert isinstance(s, WorkerSettings) and s.slots == 8
    assert s.engine_args == ["--tensor-parallel-size", "2", "--chat-template", "a b"]
    _ns, up = parse_command(["up", "--workers", "2", "--", "-tp", "2"], env={"MGPU_ENGINE_ARGS": "--x 1"})
    assert up.engine_args == ["-tp", "2"]  # the command line beats MGPU_ENGINE_ARGS
    assert to_env(WorkerSettings.of(up))["MGPU_ENGINE_ARGS"] == "-tp 2"  # what mgpu up hands every worker
    with pytest.raises(SystemExit):
        parse_command(["gateway", "--", "-tp", "2"], env={})  # a gateway has no engine


def test_mgpu_up_gives_each_worker_the_gpus_its_engine_asks_for(tmp_path: Path) -> None:
    from ops.supervisor import Supervisor, gpus_per_worker, plan_gpus

    assert gpus_per_worker([]) == 1
    assert gpus_per_worker(["--tensor-parallel-size", "2"]) == 2
    assert gpus_per_worker(["-tp=2", "--pipeline-parallel-size", "2", "--quantization", "awq"]) == 4
    assert plan_gpus([0, 1, 2, 3, 4], 2) == [(0, 1), (2, 3)]  # GPU 4 stays idle
    assert plan_gpus([0, 1, 2, 3], 1) == [(0,), (1,), (2,), (3,)]
    with pytest.raises(SettingsError, match="asks for 4 GPUs"):
        plan_gpus([0, 1], 4)
    s = UpSettings.load({"engine": "vllm", "redis_url": "redis://127.0.0.1:1/0", "data_dir": str(tmp_path),
                         "engine_args": ["-tp", "2"], "port": 18000, "health_port": 18001}, env={})
    sup = Supervisor(s, tmp_path, plan_gpus([0, 1, 2, 3], gpus_per_worker(s.engine_args)))
    envs = [sup.worker_env(i, sup.template, f"w{i}") for i in range(len(sup.specs))]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0,1", "2,3"]
    assert [e["MGPU_GPU"] for e in envs] == ["0", "2"]  # NVML health watches the first of each
    assert all(e["MGPU_ENGINE_ARGS"] == "-tp 2" for e in envs)

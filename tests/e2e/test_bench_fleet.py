"""The benchmarks' fleet launcher (bench/fleet.py) starts a whole local service and stops all of it;
``mgpu bench`` / ``mgpu chaos`` say so when the bench package is absent (a runtime image)."""

from __future__ import annotations

import importlib.abc
import os
import sys
from pathlib import Path

import httpx
import pytest

from bench.fleet import Fleet, settings_env
from ops import cli


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (read from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it exited while we looked
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads the process tree from /proc")
def test_fleet_serves_a_request_and_stops_everything(tmp_path: Path) -> None:
    before = _descendants(os.getpid())
    fleet = Fleet.launch(tmp_path, settings={"log_level": "INFO"})
    with fleet:
        worker = fleet.start_worker(model="sim-model", slots=4, sim_decode_ms=0)
        gateway = fleet.start_gateway()
        assert fleet.worker_state(worker.worker_id or "") == "ready"
        fleet.wait_routable(10)
        r = httpx.post(fleet.base_url + "/v1/completions", timeout=10,
                       json={"model": "sim-model", "prompt": "one request", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        started = _descendants(os.getpid()) - before
        pids = {worker.proc.pid, gateway.proc.pid}
        assert fleet.redis_server.proc is not None
        pids.add(fleet.redis_server.proc.pid)
        assert pids <= started
        assert worker.log.exists() and gateway.log.exists()  # each process logs into its own file
    assert fleet.procs == []
    assert worker.proc.returncode is not None and gateway.proc.returncode is not None
    assert fleet.redis_server.proc.poll() is not None
    assert not (_descendants(os.getpid()) - before), "a process of the fleet outlived stop()"


def test_settings_env_names() -> None:
    assert settings_env({"slots": 8, "sim_decode_ms": 0.0, "MGPU_LOG_LEVEL": "INFO"}) == {
        "MGPU_SLOTS": "8", "MGPU_SIM_DECODE_MS": "0.0", "MGPU_LOG_LEVEL": "INFO"}


@pytest.mark.parametrize("cmd", ["bench", "chaos"])
def test_mgpu_bench_without_the_package_says_so(
    cmd: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class NoBench(importlib.abc.MetaPathFinder):
        """What an image without the package has: no module ``bench``."""

        def find_spec(self, name: str, path: object = None, target: object = None) -> None:
            if name == "bench":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    for name in [m for m in sys.modules if m == "bench" or m.startswith("bench.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NoBench(), *sys.meta_path])
    assert cli.main([cmd, "--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"mgpu {cmd}: the benchmarks (package bench) are not installed in this image"]


@pytest.mark.parametrize("cmd", ["bench", "chaos"])
def test_mgpu_bench_dispatches_to_the_package(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main([cmd, "--help"])
    assert exc.value.code == 0
    assert f"usage: mgpu {cmd}" in capsys.readouterr().out

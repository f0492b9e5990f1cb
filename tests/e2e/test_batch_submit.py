"""``mgpu batch submit``: an OpenAI batch file run through the model's batch stream on sim workers, with the
official output line shape keyed by custom_id; a bad file refused whole; a failed request makes the exit
non-zero; and a run interrupted with Ctrl+C (SIGINT) resumes without sending anything twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from gpu_worker.engine.sim import expected_text
from ops.procs import mgpu_cmd, wait_until
from tests.conftest import ROOT, Stack

pytestmark = [pytest.mark.slow]
MODEL = "sim-model"


def _line(i: int, max_tokens: int = 8, **body: object) -> str:
    if i % 2:
        return json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                           "body": {"model": "x", "max_tokens": max_tokens,
                                    "messages": [{"role": "user", "content": f"line {i}"}], **body}})
    return json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                       "body": {"model": "x", "prompt": f"line {i}", "max_tokens": max_tokens, **body}})


def _want(i: int, max_tokens: int = 8) -> str:
    if i % 2:
        return expected_text(messages=[{"role": "user", "content": f"line {i}"}], max_tokens=max_tokens)
    return expected_text(f"line {i}", max_tokens=max_tokens)


def _submit(stack: Stack, path: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MGPU_REDIS_URL": stack.redis_server.url,
           "MGPU_NAMESPACE": stack.ns}
    return subprocess.Popen([*mgpu_cmd("batch", "submit", str(path), "--model", MODEL, *extra)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _output(path: Path) -> dict[str, dict]:  # type: ignore[type-arg]
    lines = [json.loads(x) for x in path.with_suffix(".output.jsonl").read_text().splitlines()]
    by_id = {ln["custom_id"]: ln for ln in lines}
    assert len(by_id) == len(lines), "a custom_id answered twice"
    return by_id


def _text(line: dict) -> str:  # type: ignore[type-arg]
    choice = line["response"]["body"]["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def test_a_batch_file_runs_on_the_batch_stream_and_its_output_is_keyed_by_custom_id(stack: Stack,
                                                                                   tmp_path: Path) -> None:
    stack.start_worker(model=MODEL, slots=8, sim_decode_ms=2)
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(_line(i) for i in range(30)) + "\n")
    p = _submit(stack, path, "--window", "7")
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    out = _output(path)
    assert sorted(out) == sorted(f"c{i}" for i in range(30))
    for i in range(30):
        ln = out[f"c{i}"]
        assert ln["error"] is None and ln["response"]["status_code"] == 200
        assert _text(ln) == _want(i) and ln["id"] == "batch_req_" + ln["response"]["request_id"]
    batch = stack.keys.batch_stream(MODEL)
    assert stack.r.xinfo_stream(batch)["entries-added"] == 30 and stack.r.xlen(batch) == 0
    assert "30 requests, 0 failed" in err


def test_a_bad_file_is_refused_whole_and_a_failed_request_fails_the_run(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker(model=MODEL, slots=8, sim_decode_ms=2)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([_line(0), _line(0), "{not json", json.dumps({"custom_id": "u", "method": "POST",
                                                                        "url": "/v1/images", "body": {}})]) + "\n")
    p = _submit(stack, bad)
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 2
    assert "line 2: custom_id 'c0' is not unique" in err and "line 3: not JSON" in err and "line 4: url" in err
    assert stack.r.xinfo_stream(stack.keys.batch_stream(MODEL))["entries-added"] == 0  # nothing submitted
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("\n".join([_line(1), _line(2, temperature=-1)]) + "\n")  # the second is refused by the worker
    p = _submit(stack, mixed)
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 1, err
    out = _output(mixed)
    assert out["c1"]["response"]["status_code"] == 200
    assert out["c2"]["response"]["status_code"] == 400 and "temperature" in json.dumps(out["c2"]["response"])


def test_an_interrupted_run_resumes_without_sending_anything_twice(stack: Stack, tmp_path: Path) -> None:
    stack.start_worker(model=MODEL, slots=4, sim_decode_ms=20)
    path = tmp_path / "slow.jsonl"
    path.write_text("\n".join(_line(i, max_tokens=16) for i in range(24)) + "\n")
    outfile = path.with_suffix(".output.jsonl")
    p = _submit(stack, path, "--window", "6")
    wait_until(lambda: outfile.exists() and len(outfile.read_text().splitlines()) >= 5, 60, "5 answers")
    p.send_signal(signal.SIGINT)
    _out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and "run the same command again to resume" in err
    first = len(outfile.read_text().splitlines())
    assert first < 24
    p = _submit(stack, path, "--window", "6")
    _out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    out = _output(path)
    assert sorted(out) == sorted(f"c{i}" for i in range(24))
    assert all(_text(out[f"c{i}"]) == _want(i, 16) for i in range(24))
    # the second run sent only what the first never sent: 24 entries in all
    assert stack.r.xinfo_stream(stack.keys.batch_stream(MODEL))["entries-added"] == 24

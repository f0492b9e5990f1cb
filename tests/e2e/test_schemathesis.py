"""Schemathesis fuzzes the gateway from its own OpenAPI document (``/openapi.json``), against a real
redis-server and a sim worker: no 5xx, every response as documented (status, content type, headers,
schema), nothing hangs.  The count of requests it made is in the test's output and docs/reliability.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Stack

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,"
          "response_schema_conformance,unsupported_method,allow_header_conformance")
MAX_EXAMPLES = int(os.environ.get("MGPU_SCHEMATHESIS_EXAMPLES", "60"))


def _fuzz(stack: Stack, tmp_path: Path, *extra: str) -> Counter[tuple[str, str, int]]:
    """Run schemathesis against the stack's gateway; (method, path, status) of every request it made."""
    report = tmp_path / "report"
    st = Path(sys.executable).with_name("st")
    cmd = [str(st), "run", f"{stack.base_url}/openapi.json", "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES),
           "--seed", "20261201", "--request-timeout", "20", "--workers", "1", "--generation-database", "none",
           "--phases", "examples,coverage,fuzzing", "--report", "ndjson", "--report-dir", str(report), "--no-color",
           *extra]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.e2e.schemathesis_hooks", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)  # bounded: no hang
    out = proc.stdout + proc.stderr
    statuses = _statuses(report)
    print(f"schemathesis made {sum(statuses.values())} requests: {dict(sorted(statuses.items()))}\n{out[-3000:]}")
    assert proc.returncode == 0, out[-6000:]
    assert not [key for key in statuses if key[2] >= 500]
    generated = sum(n for (method, path, code), n in statuses.items() if method == "POST" and code == 200)
    assert generated >= 50, statuses  # fuzzing reached generation, not only validation errors
    return statuses


def _start(stack: Stack, **gateway: Any) -> None:
    # a zero-cost engine with a context long enough for any max_tokens the schema allows below it
    stack.start_worker(model="sim-model", sim_decode_ms=0, sim_decode_ms_per_seq=0, sim_prefill_ms_per_token=0,
                       slots=256, max_model_len=512)
    stack.start_gateway(max_queue_len=100_000, **gateway)


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(stack: Stack, tmp_path: Path) -> None:
    _start(stack)
    _fuzz(stack, tmp_path)


ADMIN_KEY = "mgpu-fuzz-" + "k" * 32


@pytest.mark.slow
def test_schemathesis_with_api_keys(stack: Stack, tmp_path: Path) -> None:
    """Keys on: with a valid (admin) key, the same run finds no 5xx and no schema violation; without a key,
    every operation of the API (all but /health and /ready) is a 401 in OpenAI's shape."""
    _start(stack, auth="keys", bootstrap_api_key=ADMIN_KEY)
    statuses = _fuzz(stack, tmp_path, "--header", f"Authorization: Bearer {ADMIN_KEY}")
    assert not [key for key in statuses if key[2] == 401], statuses  # the key was sent and taken
    spec = httpx.get(stack.base_url + "/openapi.json").json()
    operations = [(m.upper(), path) for path, item in spec["paths"].items() for m in item
                  if m in ("get", "post", "put", "delete", "patch")]
    open_paths = {"/health", "/ready"}
    assert len(operations) >= 10
    for method, path in operations:
        url = stack.base_url + path.replace("{request_id}", "cmpl-x")
        r = httpx.request(method, url, json={"model": "sim-model", "prompt": "x"} if method == "POST" else None)
        if path in open_paths:
            assert r.status_code == 200, (method, path, r.status_code)
            continue
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["code"] == "invalid_api_key", err


def _statuses(report: Path) -> Counter[tuple[str, str, int]]:
    """(method, path, status) of every request in schemathesis's NDJSON report."""
    seen: Counter[tuple[str, str, int]] = Counter()

    def walk(o: Any) -> None:
        if isinstance(o, dict):
            req, resp = o.get("request"), o.get("response")
            if isinstance(req, dict) and isinstance(resp, dict) and "status_code" in resp:
                path = "/" + req.get("uri", "").split("/", 3)[-1].split("?")[0].split("#")[0]
                seen[(req.get("method", ""), path if not path.startswith("/v1/requests/") else "/v1/requests/*",
                      int(resp["status_code"]))] += 1
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    for f in report.glob("*.ndjson"):
        for line in f.read_text().splitlines():
            walk(json.loads(line))
    return seen

"""Redis locked down, with real processes: the documented least-privilege ACL users run the stack and a
worker's user can read neither the API keys nor another model's results; TLS to Redis; a wrong password or
TLS file stops a process at start-up, naming the setting; a gateway others can reach refuses to run without
API keys; no prompt or answer text in any log."""

from __future__ import annotations

import concurrent.futures
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis

from ops.acl import acl_line, admin_rules, gateway_rules, worker_rules
from ops.procs import RedisServer, free_port, mgpu_cmd
from tests.conftest import ROOT, Stack

NS = "mgpu"


def _run(cmd: str, env: dict[str, str], *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(mgpu_cmd(cmd, *args), env={**_base_env(), **env}, capture_output=True, text=True,
                          timeout=timeout, check=False)


def _base_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith("MGPU_")}


@pytest.fixture
def acl_stack(tmp_path: Path) -> tuple[Stack, dict[str, str]]:
    pw = {u: secrets.token_urlsafe(12) for u in ("default", "gw", "wm", "admin")}
    srv = RedisServer(tmp_path / "redis", password=pw["default"], acl=[
        acl_line("default", pw["default"], "~* &* +@all"),
        acl_line("gw", pw["gw"], gateway_rules(NS)),
        acl_line("wm", pw["wm"], worker_rules(NS, ["m"])),
        acl_line("admin", pw["admin"], admin_rules(NS)),
    ]).start()
    s = Stack(tmp_path, srv, ns=NS)
    urls = {u: srv.url_for(u, pw[u]) for u in ("gw", "wm", "admin")}
    yield s, urls
    s.stop()
    srv.stop()


def test_the_stack_runs_under_least_privilege_users(acl_stack: tuple[Stack, dict[str, str]]) -> None:
    s, urls = acl_stack
    s.start_worker(model="m", sim_decode_ms=1, redis_url=urls["wm"])
    s.start_worker(model="m2", sim_decode_ms=1)  # another model's worker (default user)
    s.start_gateway(redis_url=urls["gw"])
    for model in ("m", "m2"):
        r = httpx.post(s.base_url + "/v1/completions", json={"model": model, "prompt": "a b", "max_tokens": 3})
        assert r.status_code == 200, r.text
    with httpx.stream("POST", s.base_url + "/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": True}) as st:
        assert st.status_code == 200 and st.read().endswith(b"data: [DONE]\n\n")
    admin = redis.Redis.from_url(urls["admin"])
    assert admin.hset(f"{NS}:apikey:probe", "sha256", "x") == 1  # the admin's user manages keys
    results = {k.decode().split(":")[2] for k in admin.keys(f"{NS}:res:*")}
    assert results == {"m", "m2"}
    other = next(k for k in admin.keys(f"{NS}:res:m2:*"))
    mine = next(k for k in admin.keys(f"{NS}:res:m:*"))
    w = redis.Redis.from_url(urls["wm"])
    assert w.get(mine) is not None  # its own model's results
    for denied in (lambda: w.hgetall(f"{NS}:apikey:probe"),  # API keys
                   lambda: w.get(other),  # another model's results
                   lambda: w.xrange(f"{NS}:replies:x"),  # the replies of every model: write-only
                   lambda: w.xlen(f"{NS}:q:m2")):  # another model's queue
        with pytest.raises(redis.exceptions.NoPermissionError):
            denied()


def test_a_worker_refused_by_its_acl_stops_and_its_request_is_served_elsewhere(tmp_path: Path) -> None:
    """A permission error is not retried forever: the worker leaves rotation, exits 3 and hands its entry
    back, which a worker with the right user serves."""
    pw = {u: secrets.token_urlsafe(12) for u in ("default", "bad")}
    narrow = worker_rules(NS, ["m"]).replace(f"%W~{NS}:replies:*", "")  # may not answer the gateways
    srv = RedisServer(tmp_path / "redis", password=pw["default"], acl=[
        acl_line("default", pw["default"], "~* &* +@all"), acl_line("bad", pw["bad"], narrow)]).start()
    s = Stack(tmp_path, srv, ns=NS)
    try:
        bad = s.start_worker(model="m", sim_decode_ms=1, redis_url=srv.url_for("bad", pw["bad"]))
        s.start_gateway()
        with httpx.Client(timeout=60) as c:
            pending = c.build_request("POST", s.base_url + "/v1/completions",
                                      json={"model": "m", "prompt": "a b", "max_tokens": 3})
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                fut = pool.submit(c.send, pending)
                assert bad.proc.wait(timeout=30) == 3
                s.start_worker(model="m", sim_decode_ms=1, reclaim_min_idle_ms=500)
                r = fut.result(timeout=60)
        assert r.status_code == 200, r.text
        assert "check its ACL" in bad.log.read_text()
    finally:
        s.stop()
        srv.stop()


def test_a_wrong_password_stops_a_process_naming_the_setting(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "redis", password="right-password").start()
    try:
        wrong = f"redis://:wrong@127.0.0.1:{srv.port}/0"
        for cmd, args in (("gateway", ("--port", str(free_port()))), ("worker", ("--engine", "sim")),
                          ("status", ("--once",))):
            out = _run(cmd, {"MGPU_REDIS_URL": wrong}, *args)
            assert out.returncode == 2, (cmd, out.stdout, out.stderr)
            assert "MGPU_REDIS_URL / --redis-url" in out.stderr and "wrong" not in out.stderr.split("credentials")[1]
    finally:
        srv.stop()


def _certs(d: Path) -> dict[str, Path]:
    d.mkdir()
    run = lambda *a: subprocess.run(["openssl", *a], cwd=d, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=mgpu test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "srv.key", "-out", "srv.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost")
    run("x509", "-req", "-in", "srv.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out", "srv.crt",
        "-days", "2", "-extfile", "ext")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other.key", "-out", "other.crt", "-days", "2",
        "-subj", "/CN=another CA")
    return {n: d / n for n in ("ca.crt", "srv.crt", "srv.key", "other.crt")}


@pytest.mark.skipif(subprocess.run(["which", "openssl"], capture_output=True).returncode != 0, reason="needs openssl")
def test_tls_to_redis(tmp_path: Path) -> None:
    c = _certs(tmp_path / "tls")
    port = free_port()
    srv = RedisServer(tmp_path / "redis", password="pw-tls", extra_args=[
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(c["srv.crt"]),
        "--tls-key-file", str(c["srv.key"]), "--tls-ca-cert-file", str(c["ca.crt"]), "--tls-auth-clients", "no"],
        tls_port=port, tls_ca=str(c["ca.crt"])).start()
    s = Stack(tmp_path, srv)
    try:
        tls = {"redis_url": f"rediss://:pw-tls@127.0.0.1:{port}/0", "redis_tls_ca": str(c["ca.crt"])}
        s.start_worker(model="m", sim_decode_ms=1, **tls)
        s.start_gateway(**tls)
        r = httpx.post(s.base_url + "/v1/completions", json={"model": "m", "prompt": "a", "max_tokens": 2})
        assert r.status_code == 200, r.text
        out = _run("worker", {"MGPU_REDIS_URL": tls["redis_url"], "MGPU_REDIS_TLS_CA": str(c["other.crt"])},
                   "--engine", "sim")
        assert out.returncode == 2 and "TLS handshake with Redis failed" in out.stderr, out.stderr
        out = _run("worker", {"MGPU_REDIS_URL": tls["redis_url"], "MGPU_REDIS_TLS_CA": str(tmp_path / "no.pem")},
                   "--engine", "sim")
        assert out.returncode == 2 and "MGPU_REDIS_TLS_CA" in out.stderr, out.stderr
    finally:
        s.stop()
        srv.stop()


def test_a_reachable_gateway_needs_api_keys(redis_server: RedisServer) -> None:
    env = {"MGPU_REDIS_URL": redis_server.url, "MGPU_AUTH": "off"}
    out = _run("gateway", env, "--host", "0.0.0.0", "--port", str(free_port()), timeout=20)
    assert out.returncode == 2 and "MGPU_INSECURE_NO_AUTH" in out.stderr, out.stderr


def test_no_prompt_or_answer_text_in_any_log(stack: Stack) -> None:
    stack.settings["log_level"] = "DEBUG"
    stack.start_worker(model="m", sim_decode_ms=1)
    stack.start_gateway()
    marker = "zebra" + secrets.token_hex(6)
    answers = []
    for stream in (False, True):
        r = httpx.post(stack.base_url + "/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": f"tell me about {marker}"}], "max_tokens": 20,
            "stream": stream})
        assert r.status_code == 200
        answers.append(r.text)
    text = httpx.Response(200, content=answers[0]).json()["choices"][0]["message"]["content"]
    stack.stop()
    logs = "".join(p.read_text(errors="replace") for p in stack.tmp.glob("*.log"))
    assert "request done" in logs and "request finished" in logs  # the logs were written, at DEBUG
    assert marker not in logs and text.strip() not in logs  # neither the prompt nor the answer


def test_data_and_logs_are_the_owners_only(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "redis", password="x" * 16).start()
    try:
        redis.Redis.from_url(srv.url).set("k", "v")
        aof = list((tmp_path / "redis").rglob("*.aof"))
        assert aof and all(p.stat().st_mode & 0o077 == 0 for p in aof)
        assert (tmp_path / "redis").stat().st_mode & 0o077 == 0
    finally:
        srv.stop()
    assert sys.platform == "linux"


def test_mgpu_status_does_not_print_the_redis_password(tmp_path: Path) -> None:
    srv = RedisServer(tmp_path / "redis", password="status-secret-pw").start()
    try:
        out = subprocess.run([*mgpu_cmd("status", "--once", "--no-color")], cwd=ROOT, timeout=30, capture_output=True,
                             text=True, env={**os.environ, "MGPU_REDIS_URL": srv.url, "PYTHONPATH": str(ROOT)})
        assert out.returncode == 0, out.stderr
        assert f"127.0.0.1:{srv.port}" in out.stdout and "status-secret-pw" not in out.stdout + out.stderr
    finally:
        srv.stop()

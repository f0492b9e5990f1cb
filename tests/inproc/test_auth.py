"""API keys and their limits, the gateway app and a sim worker in the test's event loop on a real redis-server
(``auth=keys``): every refusal is an OpenAI-shaped 401 / 403 / 415 / 429, limits hold in the ENQUEUE script,
usage is counted in Redis and in Prometheus, and ``mgpu keys`` manages the records."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis

from common.keys import Keys
from common.redis_conn import make_client
from common.settings import ControlSettings, GatewaySettings, WorkerSettings
from gateway.app import create_asgi
from gpu_worker.engine.sim import SimEngine
from gpu_worker.serving.sim import SimServer
from gpu_worker.worker import Worker
from ops.keys import KeyStore
from ops.keys import run as keys_cli
from ops.procs import RedisServer

MODEL, OTHER = "m", "m2"
BOOT = "boot-" + "s" * 24


@dataclass
class Rig:
    client: httpx.AsyncClient
    store: KeyStore
    keys: Keys
    r: redis.Redis

    def key(self, name: str, **settings: Any) -> str:
        return self.store.create(name, **settings)[1]

    async def ask(self, secret: str | None, *, model: str = MODEL, max_tokens: int = 3, **body: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {secret}"} if secret is not None else {}
        return await self.client.post("/v1/completions", headers=headers,
                                      json={"model": model, "prompt": "one two three", "max_tokens": max_tokens,
                                            **body})


@pytest.fixture
async def rig(redis_server: RedisServer) -> AsyncIterator[Rig]:
    ns = "t" + uuid.uuid4().hex[:8]
    base = {"redis_url": redis_server.url, "namespace": ns, "log_requests": False}
    conn = make_client(redis_server.url)
    workers = []
    for model, wid in ((MODEL, "wa"), (OTHER, "wb")):
        ws = WorkerSettings.load({**base, "engine": "sim", "model": model, "slots": 8, "worker_id": wid,
                                  "sim_decode_ms": 5, "sim_decode_ms_per_seq": 0}, env={})
        w = Worker(ws, SimServer(SimEngine(slots=8, decode_ms=5, decode_ms_per_seq=0), model), conn)
        await w.server.start()
        workers.append((w, asyncio.create_task(w.run())))
    gs = GatewaySettings.load({**base, "health_port": 0, "registry_refresh_s": 0.1, "auth": "keys",
                               "key_cache_s": 0.2, "bootstrap_api_key": BOOT}, env={})
    asgi = create_asgi(gs)
    sync = redis.Redis.from_url(redis_server.url)
    try:
        async with asgi.fastapi.router.lifespan_context(asgi.fastapi):
            client = httpx.AsyncClient(transport=httpx.ASGITransport(app=asgi), base_url="http://127.0.0.1")
            async with client:
                for _ in range(100):
                    if (await client.get("/ready")).status_code == 200 and len(
                            (await client.get("/v1/models", headers={"Authorization": f"Bearer {BOOT}"})).json()
                            .get("data", [])) == 2:
                        break
                    await asyncio.sleep(0.05)
                yield Rig(client, KeyStore(sync, gs.keys), gs.keys, sync)
    finally:
        for w, task in workers:
            w.request_drain()
            await asyncio.wait_for(task, 30)
            await w.server.shutdown()
        await conn.aclose()
        sync.close()


def _error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err  # type: ignore[no-any-return]


async def test_a_request_needs_a_valid_key(rig: Rig) -> None:
    good = rig.key("good")
    assert (await rig.ask(good)).status_code == 200
    _error(await rig.ask(None), 401, "invalid_api_key")  # no key
    r = await rig.client.post("/v1/completions", headers={"Authorization": f"Basic {good}"},
                              json={"model": MODEL, "prompt": "x"})
    _error(r, 401, "invalid_api_key")  # not a bearer token
    _error(await rig.ask(good[:-4] + "AAAA"), 401, "invalid_api_key")  # the right id, the wrong secret
    _error(await rig.ask("mgpu-zzzzzzzz-" + "A" * 43), 401)  # an unknown key
    expired = rig.key("old", expires_at=time.time() - 1)
    assert "expired" in _error(await rig.ask(expired), 401)["message"]
    _error(await rig.client.get("/v1/models"), 401)  # every /v1 route


async def test_the_openai_client_with_its_api_key(rig: Rig) -> None:
    """What a user's code sees: the official client's api_key is the Bearer token, and each refusal is the
    client's own exception class."""
    import openai

    def client(key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(api_key=key, base_url="http://127.0.0.1/v1", http_client=rig.client, max_retries=0)

    ok = rig.key("sdk", models=[MODEL], rpm=2)
    c = client(ok)
    out = await c.completions.create(model=MODEL, prompt="one two", max_tokens=2)
    assert out.usage is not None and out.usage.completion_tokens == 2
    chat = await c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                           stream=True)
    assert [ch async for ch in chat]
    with pytest.raises(openai.RateLimitError) as limited:  # rpm=2, third request
        await c.completions.create(model=MODEL, prompt="x", max_tokens=2)
    assert limited.value.code == "rate_limit_exceeded" and limited.value.response.headers["retry-after"]
    with pytest.raises(openai.PermissionDeniedError):
        await client(rig.key("sdk-other", models=[OTHER])).completions.create(model=MODEL, prompt="x", max_tokens=2)
    with pytest.raises(openai.AuthenticationError) as wrong:
        await client("mgpu-00000000-" + "A" * 43).models.list()
    assert wrong.value.code == "invalid_api_key"


async def test_a_revoked_key_is_refused_at_once_by_the_queue(rig: Rig) -> None:
    secret = rig.key("leaving")
    assert (await rig.ask(secret)).status_code == 200
    rec = rig.store.get("leaving")
    assert rec is not None
    rig.store.revoke(rec)
    # the gateway's copy of the record is still fresh, but the ENQUEUE script reads the record itself
    _error(await rig.ask(secret), 401, "invalid_api_key")
    await asyncio.sleep(0.25)  # past key_cache_s: every other endpoint refuses it too
    _error(await rig.client.get("/v1/models", headers={"Authorization": f"Bearer {secret}"}), 401)


async def test_models_and_admin_endpoints_need_permission(rig: Rig) -> None:
    only_m = rig.key("only-m", models=[MODEL])
    assert (await rig.ask(only_m)).status_code == 200
    err = _error(await rig.ask(only_m, model=OTHER), 403)
    assert err["type"] == "permission_error" and err["param"] == "model"
    models = await rig.client.get("/v1/models", headers={"Authorization": f"Bearer {only_m}"})
    assert [m["id"] for m in models.json()["data"]] == [MODEL]  # what it may use
    _error(await rig.client.get("/workers", headers={"Authorization": f"Bearer {only_m}"}), 403)
    _error(await rig.client.get("/workers"), 401)
    admin = await rig.client.get("/workers", headers={"Authorization": f"Bearer {BOOT}"})  # the bootstrap key
    assert admin.status_code == 200 and {w["model"] for w in admin.json()["workers"]} == {MODEL, OTHER}


async def test_results_and_idempotency_keys_belong_to_their_api_key(rig: Rig) -> None:
    a, b = rig.key("a"), rig.key("b")
    r = await rig.ask(a)
    rid = r.json()["id"]
    assert (await rig.client.get(f"/v1/requests/{rid}", headers={"Authorization": f"Bearer {a}"})).status_code == 200
    _error(await rig.client.get(f"/v1/requests/{rid}", headers={"Authorization": f"Bearer {b}"}), 404)
    idem = {"Idempotency-Key": "same-key"}
    first = await rig.client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                                  headers={"Authorization": f"Bearer {a}", **idem})
    other = await rig.client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2},
                                  headers={"Authorization": f"Bearer {b}", **idem})
    assert first.status_code == other.status_code == 200
    assert first.json()["id"] != other.json()["id"]  # scoped: b's request is its own, never a's answer


async def test_requests_per_minute_and_the_headers(rig: Rig) -> None:
    k = rig.key("rpm", rpm=3, tpm=1000)
    oks = [await rig.ask(k) for _ in range(3)]
    assert all(r.status_code == 200 for r in oks)
    assert [r.headers["x-ratelimit-remaining-requests"] for r in oks] == ["2", "1", "0"]
    assert oks[0].headers["x-ratelimit-limit-requests"] == "3" and oks[0].headers["x-ratelimit-limit-tokens"] == "1000"
    assert oks[0].headers["x-ratelimit-reset-requests"].endswith("s")
    before = rig.r.xinfo_stream(rig.keys.stream(MODEL))["entries-added"]
    r = await rig.ask(k)
    err = _error(r, 429, "rate_limit_exceeded")
    assert "3 requests per minute" in err["message"] and err["type"] == "rate_limit_error"
    assert 1 <= int(r.headers["retry-after"]) <= 60 and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert rig.r.xinfo_stream(rig.keys.stream(MODEL))["entries-added"] == before  # never enqueued


async def test_tokens_are_reserved_then_settled(rig: Rig) -> None:
    k = rig.key("tpm", tpm=100)
    rec = rig.store.get("tpm")
    assert rec is not None
    # 3 prompt words + 20 reserved; the stop string ends it after fewer tokens: the rest is refunded
    r = await rig.ask(k, max_tokens=20, stop=["zzz-never"])
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-tokens"] == str(100 - 23)
    used = r.json()["usage"]["total_tokens"]
    assert int(rig.r.hget(rig.keys.rate(rec.id), "ts") or 0) == used  # settled: reserved 23, used 23
    r = await rig.ask(k, max_tokens=5, stop=[r.json()["choices"][0]["text"].split()[1]])
    assert r.json()["choices"][0]["finish_reason"] == "stop"
    assert int(rig.r.hget(rig.keys.rate(rec.id), "ts") or 0) == used + r.json()["usage"]["total_tokens"]
    err = _error(await rig.ask(k, max_tokens=500), 429, "rate_limit_exceeded")
    assert "tokens per minute" in err["message"] and "reserves 503" in err["message"]


async def test_requests_in_flight(rig: Rig) -> None:
    k = rig.key("one-at-a-time", max_inflight=1)
    slow = asyncio.create_task(rig.ask(k, max_tokens=60))
    rec = rig.store.get("one-at-a-time")
    assert rec is not None
    for _ in range(200):
        if rig.r.hget(rig.keys.rate(rec.id), "inflight") == b"1":
            break
        await asyncio.sleep(0.01)
    err = _error(await rig.ask(k), 429, "rate_limit_exceeded")
    assert "requests in flight" in err["message"]
    assert (await slow).status_code == 200
    assert rig.r.hget(rig.keys.rate(rec.id), "inflight") == b"0"  # FINISH settled it
    assert (await rig.ask(k)).status_code == 200


async def test_usage_is_counted_per_key(rig: Rig) -> None:
    k = rig.key("counted")
    for _ in range(2):
        assert (await rig.ask(k, max_tokens=4)).status_code == 200
    assert (await rig.ask(k, max_tokens=4, temperature=9)).status_code == 400  # refused by the worker: an error
    rec = rig.store.get("counted")
    assert rec is not None
    u = rig.store.usage(rec)
    assert (u["requests"], u["completion_tokens"], u["errors"]) == (3, 8, 1) and u["prompt_tokens"] == 6
    _error(await rig.client.get("/metrics", headers={"Authorization": f"Bearer {k}"}), 403)  # they name the keys
    metrics = (await rig.client.get("/metrics", headers={"Authorization": f"Bearer {BOOT}"})).text
    assert 'mgpu_key_tokens_total{key="counted",kind="completion"} 8.0' in metrics
    assert 'mgpu_key_requests_total{key="counted",status="success"} 2.0' in metrics
    assert k not in metrics and (rec.sha256 not in metrics)  # the name, never the secret


async def test_browser_safety(rig: Rig) -> None:
    k = rig.key("browser")
    r = await rig.client.post("/v1/completions", content=b'{"model": "m", "prompt": "x"}',
                              headers={"Authorization": f"Bearer {k}", "Content-Type": "text/plain"})
    _error(r, 415, "unsupported_media_type")  # a CORS-simple request cannot make it generate
    r = await rig.client.post("http://evil.example/v1/completions", json={"model": MODEL, "prompt": "x"},
                              headers={"Authorization": f"Bearer {k}"})
    assert _error(r, 400)["param"] == "Host"  # DNS rebinding: a name the gateway does not answer to
    r = await rig.client.options("/v1/completions", headers={"Origin": "https://page.example",
                                                             "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers  # CORS is off unless origins are configured


async def test_a_new_bootstrap_key_revokes_the_old_one(rig: Rig) -> None:
    from gateway.auth import bootstrap_key

    client = make_client(_url(rig))
    new = "boot-" + "n" * 24
    try:
        await bootstrap_key(client, rig.keys, new)  # the deployment's variable changed
    finally:
        await client.aclose()
    await asyncio.sleep(0.25)  # past key_cache_s
    assert (await rig.client.get("/workers", headers={"Authorization": f"Bearer {new}"})).status_code == 200
    _error(await rig.client.get("/workers", headers={"Authorization": f"Bearer {BOOT}"}), 401)


def _url(rig: Rig) -> str:
    kw = rig.r.connection_pool.connection_kwargs
    return f"redis://{kw.get('host', '127.0.0.1')}:{kw['port']}/{kw.get('db', 0)}"


def test_mgpu_keys_manages_the_records(redis_server: RedisServer, capsys: pytest.CaptureFixture[str]) -> None:
    s = ControlSettings.load({"redis_url": redis_server.url, "namespace": "k" + uuid.uuid4().hex[:6]}, env={})

    def cli(*argv: str) -> tuple[int, str]:
        p = argparse.ArgumentParser()
        from ops.keys import add_arguments

        add_arguments(p)
        rc = keys_cli(s, p.parse_args(list(argv)))
        return rc, capsys.readouterr().out

    rc, out = cli("create", "--name", "team-a", "--models", "m,m2", "--rpm", "60", "--expires", "30d")
    secret = out.strip().splitlines()[-1]
    assert rc == 0 and secret.startswith("mgpu-")
    assert cli("create", "--name", "team-a")[0] == 2  # names are unique
    rc, out = cli("show", "team-a")
    assert rc == 0 and '"rpm": 60' in out and secret not in out and "sha256" not in out
    r = redis.Redis.from_url(redis_server.url)
    kid = r.hget(s.keys.api_key_names, "team-a").decode()
    assert r.hget(s.keys.api_key(kid), "sha256").decode() != secret  # stored hashed
    rc, out = cli("rotate", "team-a")
    new_secret = out.strip().splitlines()[-1]
    assert rc == 0 and new_secret != secret and r.hget(s.keys.api_key(kid), "revoked_at") != b"0.0"
    assert cli("revoke", "team-a")[0] == 0 and cli("show", "nobody")[0] == 1
    rc, out = cli("usage", "team-a")
    assert rc == 0 and '"requests_last_minute": 0' in out

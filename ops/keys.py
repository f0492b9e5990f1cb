"""``mgpu keys``: API keys, kept in Redis (the records :class:`common.apikeys.ApiKey`), as every ``mgpu``
control command talks to the fleet: through Redis, with the credentials of ``--redis-url``.

    mgpu keys create --name NAME [--models m1,m2] [--rpm N] [--tpm N] [--max-inflight N]
                     [--priority interactive|batch] [--expires 30d] [--admin]     prints the secret, once
    mgpu keys list | show NAME | revoke NAME | rotate NAME | usage [NAME]

A revocation holds at once for new requests (the ENQUEUE script reads the record) and within
``key_cache_s`` (0.5 s) for the other endpoints of every gateway.  ``rotate`` gives the name a new secret
with the same settings and revokes the old one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis

from common.apikeys import ApiKey, digest, new_secret, parse_duration
from common.keys import Keys
from common.redis_conn import sync_client
from common.settings import ControlSettings


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="keys_cmd", required=True)
    c = sub.add_parser("create", help="a new key: prints its secret once")
    c.add_argument("--name", required=True, help="a unique name (metrics and logs show it, never the secret)")
    c.add_argument("--models", default="", help="comma-separated models (and adapters) it may use; default: all")
    c.add_argument("--rpm", type=int, default=0, help="requests per minute (0: no limit)")
    c.add_argument("--tpm", type=int, default=0, help="tokens per minute, prompt + max_tokens reserved (0: no limit)")
    c.add_argument("--max-inflight", type=int, default=0, help="requests at once (0: no limit)")
    c.add_argument("--priority", choices=("interactive", "batch"), default="interactive")
    c.add_argument("--expires", default=None, help="lifetime, e.g. 30d, 12h (default: never)")
    c.add_argument("--admin", action="store_true", help="may use /workers and the admin endpoints")
    sub.add_parser("list", help="every key (no secrets)")
    for name, what in (("show", "one key"), ("revoke", "refuse the key from now on"),
                       ("rotate", "a new secret for the key, the old one revoked")):
        sub.add_parser(name, help=what).add_argument("name")
    sub.add_parser("usage", help="requests, tokens and errors per key").add_argument("name", nargs="?")


class KeyStore:
    def __init__(self, r: redis.Redis, keys: Keys) -> None:
        self.r = r
        self.keys = keys

    def get(self, name: str) -> ApiKey | None:
        kid = self.r.hget(self.keys.api_key_names, name)
        return None if kid is None else ApiKey.from_hash(self.r.hgetall(self.keys.api_key(kid.decode())))

    def all(self) -> list[ApiKey]:
        ids = [v.decode() for v in self.r.hvals(self.keys.api_key_names)]
        with self.r.pipeline(transaction=False) as p:
            for kid in ids:
                p.hgetall(self.keys.api_key(kid))
            recs = [ApiKey.from_hash(raw) for raw in p.execute()]
        return sorted((r for r in recs if r is not None), key=lambda k: k.name)

    def create(self, name: str, **settings: Any) -> tuple[ApiKey, str]:
        kid, secret = new_secret()
        rec = ApiKey(id=kid, name=name, sha256=digest(secret), created=time.time(), **settings)
        if not self.r.hsetnx(self.keys.api_key_names, name, kid):
            raise ValueError(f"a key named {name!r} exists (mgpu keys rotate {name} gives it a new secret)")
        self.r.hset(self.keys.api_key(kid), mapping=rec.to_hash())
        return rec, secret

    def revoke(self, rec: ApiKey) -> None:
        self.r.hset(self.keys.api_key(rec.id), "revoked_at", str(time.time()))

    def rotate(self, rec: ApiKey) -> tuple[ApiKey, str]:
        kid, secret = new_secret()
        new = rec.model_copy(update={"id": kid, "sha256": digest(secret), "created": time.time(), "revoked_at": 0.0})
        with self.r.pipeline(transaction=True) as p:
            p.hset(self.keys.api_key(kid), mapping=new.to_hash())
            p.hset(self.keys.api_key_names, rec.name, kid)
            p.hset(self.keys.api_key(rec.id), "revoked_at", str(time.time()))
            p.execute()
        return new, secret

    def usage(self, rec: ApiKey) -> dict[str, int]:
        raw = self.r.hgetall(self.keys.usage(rec.id))
        rate = self.r.hmget(self.keys.rate(rec.id), "rs", "ts", "inflight")
        out = {k.decode(): int(v) for k, v in raw.items()}
        out.update({"requests_last_minute": int(rate[0] or 0), "tokens_last_minute": int(rate[1] or 0),
                    "in_flight": int(rate[2] or 0)})
        return out


def _row(rec: ApiKey) -> dict[str, Any]:
    d = rec.model_dump(exclude={"sha256"})
    for k in ("created", "expires_at", "revoked_at"):
        d[k] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(d[k])) if d[k] else None
    return d


def run(s: ControlSettings, ns: argparse.Namespace) -> int:
    store = KeyStore(sync_client(s.redis_dsn), s.keys)
    cmd = ns.keys_cmd
    try:
        if cmd == "create":
            expires = time.time() + parse_duration(ns.expires) if ns.expires else 0.0
            rec, secret = store.create(ns.name, models=[m for m in ns.models.split(",") if m], rpm=ns.rpm,
                                       tpm=ns.tpm, max_inflight=ns.max_inflight, priority=ns.priority,
                                       expires_at=expires, admin=ns.admin)
            print(f"created key {rec.name!r} (id {rec.id}); its secret, shown only now:\n{secret}")
            return 0
        if cmd == "list":
            for rec in store.all():
                print(json.dumps(_row(rec)))
            return 0
        if cmd == "usage":
            recs = store.all() if ns.name is None else [r for r in [store.get(ns.name)] if r is not None]
            for rec in recs:
                print(json.dumps({"name": rec.name, **store.usage(rec)}))
            return 0 if recs else 1
        found = store.get(ns.name)
        if found is None:
            print(f"mgpu keys: no key named {ns.name!r}", file=sys.stderr)
            return 1
        if cmd == "show":
            print(json.dumps(_row(found), indent=2))
        elif cmd == "revoke":
            store.revoke(found)
            print(f"revoked {found.name!r} (id {found.id})")
        elif cmd == "rotate":
            new, secret = store.rotate(found)
            print(f"rotated {new.name!r}: id {found.id} revoked, new id {new.id}; its secret, shown only now:\n"
                  f"{secret}")
        return 0
    except ValueError as exc:
        print(f"mgpu keys: {exc}", file=sys.stderr)
        return 2

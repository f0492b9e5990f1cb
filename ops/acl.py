"""Least-privilege Redis ACL users for a fleet (docs/security.md): what each role may run and touch.

    gateway   enqueue, read replies and results, the registry, API keys (read; the bootstrap key: write)
    worker    its models' streams, results and chunks, write-only the gateways' reply streams and the keys'
              usage, its registry entry and flags; never the API key records, never another model's results
    admin     the mgpu control commands (status, drain, strategy, rollout, keys): every mgpu key

Commands are granted by category (streams, hashes, strings, scripts, ...) without the dangerous ones
(KEYS, FLUSHALL, CONFIG, ACL, ...); CLIENT SETINFO is left out because Redis 7.0 does not know it
(redis-py ignores the refusal).  What isolates the roles is the key patterns.  Scripts run with their
caller's permissions, so the Lua in ``common/lua.py`` is held to the same patterns.

    mgpu acl --role worker --model SmolLM2-135M-Instruct --user w1 --password-env W1_PASSWORD
"""

from __future__ import annotations

import argparse
import os
import sys

from common.settings import ControlSettings

_COMMANDS = ("-@all +@read +@write +@stream +@hash +@string +@set +@list +@keyspace +@scripting +@connection "
             "+@transaction +time -@dangerous +info +client|setname")


def gateway_rules(ns: str) -> str:
    keys = [f"~{ns}:{p}" for p in ("q:*", "wq:*", "dlq:*", "res:*", "chunks:*", "idem:*", "qbytes*", "qlen:*",
                                   "replies:*",
                                   "cancels", "worker:*", "workers", "models", "control", "starts", "apikey:*",
                                   "apikeys", "rate:*", "usage:*", "-")]
    return " ".join(["resetkeys", *keys, "resetchannels", _COMMANDS])


def _literal(name: str) -> str:
    """``name`` matched literally in a key pattern (Redis patterns are globs: ``*?[]\\`` are escaped)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in name)


def worker_rules(ns: str, models: list[str]) -> str:
    keys = []
    for m in map(_literal, models):
        keys += [f"~{ns}:q:{m}", f"~{ns}:q:{m}:*", f"~{ns}:wq:{m}", f"~{ns}:dlq:{m}", f"~{ns}:res:{m}:*",
                 f"~{ns}:chunks:{m}:*", f"~{ns}:qbytes:{m}", f"~{ns}:qlen:{m}"]
    keys += [f"~{ns}:qbytes", f"%W~{ns}:replies:*", f"%R~{ns}:cancels", f"~{ns}:worker:*", f"~{ns}:workers",
             f"~{ns}:models", f"~{ns}:drain:*", f"~{ns}:admit:*", f"~{ns}:starts", f"~{ns}:rate:*",
             f"%W~{ns}:usage:*"]
    return " ".join(["resetkeys", *keys, "resetchannels", _COMMANDS])


def admin_rules(ns: str) -> str:
    return " ".join(["resetkeys", f"~{ns}:*", "resetchannels", _COMMANDS, "+keys"])


def acl_line(user: str, password: str, rules: str) -> str:
    """A line of an ACL file (``--aclfile``); ``ACL SETUSER`` takes the same words after the user name."""
    return f"user {user} on >{password} {rules}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mgpu acl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", choices=("gateway", "worker", "admin"), required=True)
    p.add_argument("--model", action="append", default=[], help="worker: a model (or adapter) it serves; repeat")
    p.add_argument("--user", required=True)
    p.add_argument("--password-env", required=True, help="the environment variable holding the user's password")
    p.add_argument("--namespace", default=ControlSettings.model_fields["namespace"].default)
    p.add_argument("--format", choices=("setuser", "aclfile"), default="setuser",
                   help="an ACL SETUSER command (redis-cli), or a line for an --aclfile")
    args = p.parse_args(argv)
    password = os.environ.get(args.password_env)
    if not password:
        print(f"mgpu acl: ${args.password_env} is not set", file=sys.stderr)
        return 2
    if args.role == "worker" and not args.model:
        print("mgpu acl: a worker's user needs its --model", file=sys.stderr)
        return 2
    rules = {"gateway": lambda: gateway_rules(args.namespace), "admin": lambda: admin_rules(args.namespace),
             "worker": lambda: worker_rules(args.namespace, args.model)}[args.role]()
    line = acl_line(args.user, password, rules)
    print(line if args.format == "aclfile" else "ACL SETUSER " + line.removeprefix("user "))
    return 0


if __name__ == "__main__":
    sys.exit(main())

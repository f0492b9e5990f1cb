"""API keys: what a key is (:class:`ApiKey`, the hash ``Keys.api_key(id)``), how its secret looks and is
checked, and how its limits are given.

A secret is ``mgpu-<id>-<43 random characters>`` (32 random bytes, URL-safe base64): ``<id>`` (8 lower-case
letters and digits) names the key's record; the record holds the SHA-256 of the whole secret, never the
secret, and a presented secret is checked by comparing digests in constant time (``hmac.compare_digest``).
A secret that a deployment chose itself (``bootstrap_api_key``: any string of 20 characters or more) has the
id ``x`` + the first 15 hex digits of its digest.

The record is a Redis hash, so that the ENQUEUE script reads a key's limits and its revocation in the same
atomic step that admits a request (no gateway replica can admit past a limit, or after a revocation).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

Priority = Literal["interactive", "batch"]
_FORMAT = re.compile(r"^mgpu-([a-z0-9]{8})-[A-Za-z0-9_-]{43}$")
_ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def key_id(secret: str) -> str | None:
    """The id a secret names (None: not a possible secret)."""
    m = _FORMAT.match(secret)
    if m:
        return m.group(1)
    if len(secret) >= 20 and secret.isprintable() and " " not in secret:
        return "x" + digest(secret)[:15]
    return None


def new_secret() -> tuple[str, str]:
    """A new key's (id, secret)."""
    kid = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
    return kid, f"mgpu-{kid}-{secrets.token_urlsafe(32)}"


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class ApiKey(BaseModel):
    """A key's record (``Keys.api_key(id)``, a hash).  Limits of 0 are no limit; ``models`` empty: every model."""

    model_config = ConfigDict(extra="ignore")

    id: str
    name: str
    sha256: str
    models: list[str] = Field(default_factory=list)
    rpm: int = 0  # requests per minute (a sliding minute)
    tpm: int = 0  # tokens per minute: prompt + max_tokens reserved at admission, the unused part refunded
    max_inflight: int = 0  # requests admitted and not finished
    priority: Priority = "interactive"
    admin: bool = False  # may use /workers and the control endpoints
    created: float = 0.0
    expires_at: float = 0.0  # unix time; 0: never
    revoked_at: float = 0.0  # unix time; 0: not revoked

    def verify(self, secret: str) -> bool:
        """The secret is this key's (constant time)."""
        return hmac.compare_digest(digest(secret), self.sha256)

    def why_not_usable(self, now: float | None = None) -> str | None:
        now = time.time() if now is None else now
        if self.revoked_at:
            return "this API key was revoked"
        if self.expires_at and now >= self.expires_at:
            return "this API key has expired"
        return None

    def allows(self, model: str) -> bool:
        return not self.models or model in self.models

    def to_hash(self) -> dict[str, str]:
        d = self.model_dump()
        d["models"] = ",".join(self.models)
        d["admin"] = "1" if self.admin else "0"
        return {k: str(v) for k, v in d.items()}

    @classmethod
    def from_hash(cls, raw: Mapping[Any, Any]) -> ApiKey | None:
        if not raw:
            return None
        d: dict[str, Any] = {_text(k): _text(v) for k, v in raw.items()}
        d["models"] = [m for m in d.get("models", "").split(",") if m]
        d["admin"] = d.get("admin") == "1"
        try:
            return cls.model_validate(d)
        except ValidationError:
            return None


_DURATION = re.compile(r"^(\d+)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` as seconds; ValueError otherwise."""
    m = _DURATION.match(text.strip())
    if not m:
        raise ValueError(f"{text!r}: a duration is a number and one of s, m, h, d, w (e.g. 30d)")
    return int(m.group(1)) * _SECONDS[m.group(2)]

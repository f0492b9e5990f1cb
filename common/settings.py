"""The one settings object.  Values come from defaults, then ``MGPU_*`` environment variables,
then explicit overrides (command-line flags); they are validated once, at start-up."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.keys import Keys

ENV_PREFIX = "MGPU_"


# The worker settings that ``mgpu rollout`` may change (``--set NAME=VALUE``).  Not among them: where a
# worker is (redis_url, namespace, worker_id, gpu, metrics port and host, data folders) and the name of
# the model it serves, which clients address (see docs/rollouts.md).
ROLLOUT_FIELDS: tuple[str, ...] = (
    "engine", "model_path", "slots", "weight", "max_model_len", "heartbeat_interval_s", "worker_ttl_s", "lease_ms",
    "loop_stall_s", "reclaim_interval_s", "max_deliveries", "drain_grace_s", "read_block_ms", "log_level",
    "log_json", "log_requests", "result_ttl_s", "sim_prefill_ms_per_token", "sim_decode_ms", "sim_decode_ms_per_seq",
    "vllm_gpu_memory_utilization", "vllm_enforce_eager", "vllm_kv_cache_gb", "vllm_dtype", "revision",
)


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it."""


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # shared
    redis_url: str = "redis://127.0.0.1:6379/0"
    namespace: str = Field(default="mgpu", pattern=r"^[A-Za-z0-9_.-]+$")
    log_level: str = "INFO"
    log_json: bool = False
    result_ttl_s: int = Field(default=600, ge=1)
    log_requests: bool = True  # one INFO line per finished request (request_id, outcome, timings)

    # gateway
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    gateway_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}")
    request_timeout_s: float = Field(default=600.0, gt=0)
    max_request_timeout_s: float = Field(default=3600.0, gt=0)  # the most a request's `timeout` may ask for
    max_body_bytes: int = Field(default=1 << 20, ge=1024)
    max_queue_len: int = Field(default=50_000, ge=1)
    # bytes of request payloads waiting or running, per model and over all models (429 past them)
    max_queue_bytes: int = Field(default=256 << 20, ge=1 << 20)
    max_queue_bytes_total: int = Field(default=1 << 30, ge=1 << 20)
    # Redis used_memory / maxmemory past which new work is refused (503) before Redis refuses writes
    redis_memory_high_water: float = Field(default=0.9, gt=0, le=1)
    http_read_timeout_s: float = Field(default=10.0, gt=0)  # to receive a request's headers, and its body
    max_connections: int = Field(default=10_000, ge=16)  # open HTTP connections; past it new requests get 503
    # /health, /ready and /metrics on a listener of their own (answers under a connection flood on `port`):
    # unset: port + 1 (a free port when port is 0); 0: a free port
    health_port: int | None = Field(default=None, ge=0, le=65535)
    redis_pool_size: int = Field(default=32, ge=2)
    registry_refresh_s: float = Field(default=0.5, gt=0)
    retry_after_s: int = Field(default=1, ge=1)
    gateway_procs: int = Field(default=1, ge=1, le=64)  # uvicorn worker processes (Prometheus multiprocess mode)
    queue_metrics_interval_s: float = Field(default=2.0, gt=0)  # how often queue gauges are read from Redis
    # load balancing (gateway/routing.py); the `strategy` field of the control hash overrides it at run time
    strategy: Literal["pull", "round_robin", "least_loaded", "weighted", "prefix_affinity"] = "pull"
    affinity_prefix_chars: int = Field(default=256, ge=1)  # prompt prefix that keys prefix_affinity
    affinity_vnodes: int = Field(default=64, ge=1, le=4096)  # virtual nodes per worker on the hash ring

    # worker
    engine: Literal["vllm", "sim"] = "vllm"
    model: str = "SmolLM2-135M-Instruct"
    model_path: str | None = None
    worker_id: str | None = None
    gpu: int | None = None
    slots: int = Field(default=32, ge=1, le=65536)
    weight: float | None = Field(default=None, gt=0)  # share for the `weighted` strategy; default: slots
    max_model_len: int = Field(default=2048, ge=16)
    heartbeat_interval_s: float = Field(default=0.5, gt=0)
    worker_ttl_s: float = Field(default=2.0, gt=0)
    lease_ms: int = Field(default=3000, ge=100)
    loop_stall_s: float = Field(default=3.0, gt=0)  # event loop silent this long: stop renewing
    reclaim_interval_s: float = Field(default=0.5, gt=0)
    max_deliveries: int = Field(default=3, ge=1)
    max_dead_letters: int = Field(default=10_000, ge=1)  # per model; oldest trimmed first, never unacknowledged ones
    drain_grace_s: float = Field(default=60.0, ge=0)
    read_block_ms: int = Field(default=1000, ge=1)
    metrics_port: int = Field(default=0, ge=0, le=65535)  # worker /metrics + /health; 0: a free port
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 to be scraped from other hosts (the hostname is published)
    # what the worker runs, as a label: published in the registry, /workers, mgpu status and /metrics.
    # Unset: derived from the settings a rollout can change (Settings.effective_revision)
    revision: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:+-]{1,64}$")
    # start in state 'canary': take work only from the own stream until admitted (Keys.admit); mgpu rollout
    # starts new workers so, to run its canary requests before any client request reaches them
    canary_gate: bool = False

    # sim engine (ms); zero cost makes it an overhead probe
    sim_prefill_ms_per_token: float = Field(default=0.02, ge=0)
    sim_decode_ms: float = Field(default=10.0, ge=0)
    sim_decode_ms_per_seq: float = Field(default=0.1, ge=0)

    # vLLM engine
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    vllm_enforce_eager: bool = False
    vllm_kv_cache_gb: int = Field(default=2, ge=1)
    vllm_dtype: str = "auto"

    # mgpu up
    data_dir: str = ".data"
    redis_maxmemory: str = Field(default="2gb", pattern=r"^[0-9]+(b|kb|mb|gb)?$")  # of the redis-server mgpu up starts
    model_cache_dir: str = Field(default_factory=lambda: os.path.expanduser("~/.cache/mgpu/models"))
    workers: int = Field(default=1, ge=0, le=64)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace)

    @property
    def probe_port(self) -> int:
        """Where the gateway's probe listener binds: ``health_port``, else port + 1 (a free port when port is 0)."""
        if self.health_port is not None:
            return self.health_port
        return self.port + 1 if self.port else 0

    @property
    def effective_revision(self) -> str:
        """``revision`` when set, else ``r-`` and a hash of the served model and of the settings a
        rollout may change: two workers with the same derived revision run the same thing."""
        if self.revision:
            return self.revision
        facts = {k: getattr(self, k) for k in ("model", *ROLLOUT_FIELDS) if k != "revision"}
        digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()
        return "r-" + digest[:8]

    @classmethod
    def load(cls, overrides: dict[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        """Defaults < ``MGPU_*`` environment < overrides (None values are skipped)."""
        source: Mapping[str, str] = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = source.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        for k, v in (overrides or {}).items():
            if v is not None:
                values[k] = v
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            lines = []
            for e in exc.errors():
                field = ".".join(str(p) for p in e["loc"])
                lines.append(f"  {ENV_PREFIX}{field.upper()} / --{field.replace('_', '-')}: {e['msg']}")
            raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None

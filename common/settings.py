"""The settings of every mgpu process: one pydantic-settings class per role, each field declared once.

    LogSettings                                  log_level, log_json
    ControlSettings(Log)                         + redis_url, namespace: mgpu drain, status, strategy, rollout
    CommonSettings(Control)                      + what the gateway and the workers share
    HttpSettings                                 host, port: where an OpenAI-compatible API listens
    SimEngineSettings                            the served model's name and shape, the sim engine's costs
    GatewaySettings(Http, Common)                mgpu gateway
    WorkerSettings(SimEngine, Common)            mgpu worker
    SimServerSettings(Http, SimEngine, Log)      mgpu sim-server
    UpSettings(Gateway, Worker)                  mgpu up; ``Settings`` is its other name (the superset)

Values come from defaults, then ``MGPU_<NAME>`` environment variables, then explicit overrides (the
command-line flags, which ``ops/flags.py`` makes from the fields): :meth:`MgpuSettings.load`, once, at
start-up; a bad value raises :class:`SettingsError` naming ``MGPU_<NAME> / --<name>``.  :func:`to_env`
turns settings back into ``MGPU_*`` variables for the processes that a process starts.  Every enumerated
setting's values are listed once, here (``Strategy``, ``Engine``, ``LogLevel``, ``VllmDtype``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import socket
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Self, get_args
from urllib.parse import quote

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic.json_schema import JsonDict
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from common.keys import Keys
from common.redis_url import CLUSTER_SCHEME, SENTINEL_SCHEME, ClusterUrl, SentinelUrl

ENV_PREFIX = "MGPU_"

Strategy = Literal["pull", "round_robin", "least_loaded", "weighted", "prefix_affinity"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
Engine = Literal["vllm", "sim"]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]
VllmDtype = Literal["auto", "half", "float16", "bfloat16", "float", "float32"]  # vLLM's ModelDType
AuthMode = Literal["keys", "off"]
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _names(v: Any) -> Any:
    """A list of names given as one string, comma- or space-separated (MGPU_ALLOWED_HOSTS=a.example,b.example)."""
    return [x for x in re.split(r"[,\s]+", v) if x] if isinstance(v, str) else v

# The worker settings that ``mgpu rollout`` may change (``--set NAME=VALUE``).  Not among them: where a
# worker is (redis_url, namespace, worker_id, gpu, metrics port and host, data folders) and the name of
# the model it serves, which clients address (see docs/rollouts.md).
ROLLOUT_FIELDS: tuple[str, ...] = (
    "engine", "model_path", "slots", "weight", "max_model_len", "heartbeat_interval_s", "worker_ttl_s", "lease_ms",
    "loop_stall_s", "reclaim_interval_s", "max_deliveries", "drain_grace_s", "read_block_ms", "log_level",
    "log_json", "log_requests", "result_ttl_s", "sim_prefill_ms_per_token", "sim_decode_ms", "sim_decode_ms_per_seq",
    "vllm_gpu_memory_utilization", "vllm_enforce_eager", "vllm_kv_cache_gb", "vllm_dtype", "engine_args", "revision",
)

# json_schema_extra of a setting that belongs to one process (its id, its GPU, its canary gate): it is
# never handed on to another process (to_env), and mgpu up, which gives each process its own, has no flag
# for it
_PER_PROCESS: JsonDict = {"per_process": True}


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names it."""


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping: ``MGPU_<NAME>`` in capitals only;
    an empty value counts as unset."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items() if k.startswith(ENV_PREFIX) and k.isupper() and v}


class MgpuSettings(BaseSettings):
    """What every settings class shares: how it is loaded, and how its errors read.

    An instance holds what it is given: construction (also ``model_validate``, as the supervisor checks a
    rollout's target) reads no environment.  :meth:`load` layers the environment under the overrides."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_assignment=True)
    flag_group: ClassVar[str] = ""  # the --help heading of the flags of the fields that a class declares

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Only the values given: no environment, no .env or secrets files (load reads the environment)."""
        return (init_settings,)

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Self:
        """Defaults < ``MGPU_*`` environment (``env``, default ``os.environ``) < overrides (None values
        are skipped).  ``model_fields_set`` names the settings that the environment or an override gave."""
        values: dict[str, Any] = _Environment(cls, os.environ if env is None else env)()
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        try:
            return cls(**values)
        except ValidationError as exc:
            lines = []
            for e in exc.errors():
                field = ".".join(str(p) for p in e["loc"])
                lines.append(f"  {env_name(field)} / {flag_name(field)}: {e['msg']}")
            raise SettingsError("invalid settings:\n" + "\n".join(lines)) from None

    @classmethod
    def of(cls, s: MgpuSettings) -> Self:
        """This class's fields taken from ``s``, the settings of a larger role (e.g. mgpu up's)."""
        return cls.model_validate(s.model_dump(include=set(cls.model_fields)))

    @classmethod
    def flag_names(cls) -> tuple[str, ...]:
        """The fields that are command-line flags of this class's command: all of them."""
        return tuple(cls.model_fields)


def per_process(cls: type[MgpuSettings]) -> frozenset[str]:
    """The fields of ``cls`` that belong to one process (see ``_PER_PROCESS``)."""
    return frozenset(n for n, f in cls.model_fields.items() if f.json_schema_extra == _PER_PROCESS)


def to_env(s: MgpuSettings) -> dict[str, str]:
    """``s`` as the ``MGPU_*`` variables that give another process the same settings (``load`` reads them
    back to equal values), but for the per-process ones and the unset ones."""
    skip = per_process(type(s))
    return {env_name(k): shlex.join(v) if isinstance(v, list) else str(v) for k, v in s.model_dump().items()
            if v is not None and k not in skip}


class LogSettings(MgpuSettings):
    flag_group = "logging settings"

    log_level: LogLevel = Field(default="INFO", description="any case; WARN and FATAL are WARNING and CRITICAL")
    log_json: bool = Field(default=False, description="log JSON lines instead of plain ones")

    @field_validator("log_level", mode="before")
    @classmethod
    def _log_level(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.upper()
            return {"WARN": "WARNING", "FATAL": "CRITICAL"}.get(v, v)
        return v


class ControlSettings(LogSettings):
    """Where a fleet is: what the control commands (drain, status, strategy, rollout) need."""

    flag_group = "Redis settings"

    redis_url: str = Field(default="redis://127.0.0.1:6379/0", description="redis://, rediss:// (TLS), unix://, "
                           "redis+sentinel://host:26379[,host:26379...]/<primary name>[/db] (Redis Sentinel) or "
                           "redis+cluster://host:6379[,host:6379...] (Redis Cluster: seed nodes); "
                           "a password or an ACL user goes in it: redis://user:password@host:6379/0")
    redis_tls_ca: str | None = Field(default=None, description="rediss://: the CA certificate file to verify the "
                                     "server with")
    redis_tls_cert: str | None = Field(default=None, description="rediss://: this client's certificate file "
                                       "(when the server checks clients)")
    redis_tls_key: str | None = Field(default=None, description="rediss://: this client's private key file")
    namespace: str = Field(default="mgpu", pattern=r"^[A-Za-z0-9_.-]+$", description="prefix of every Redis key")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://", SENTINEL_SCHEME, CLUSTER_SCHEME)):
            raise ValueError(f"must start with redis://, rediss://, unix://, {SENTINEL_SCHEME} or {CLUSTER_SCHEME}")
        if v.startswith(SENTINEL_SCHEME):
            SentinelUrl.parse(v)  # a ValueError names what is wrong
        if v.startswith(CLUSTER_SCHEME):
            ClusterUrl.parse(v)
        return v

    def _tls_files(self) -> dict[str, str | None]:
        return {"ssl_ca_certs": self.redis_tls_ca, "ssl_certfile": self.redis_tls_cert,
                "ssl_keyfile": self.redis_tls_key}

    @model_validator(mode="after")
    def _tls(self) -> Self:
        if any(self._tls_files().values()) and not self.redis_url.startswith("rediss://"):
            if self.redis_url.startswith((SENTINEL_SCHEME, CLUSTER_SCHEME)):
                raise ValueError("redis_tls_*: TLS to a Sentinel-managed primary or a Redis Cluster is not "
                                 "supported yet")
            raise ValueError("redis_tls_*: TLS needs a rediss:// URL")
        return self

    @property
    def redis_dsn(self) -> str:
        """The URL every Redis client of this process connects with: ``redis_url`` and the TLS files."""
        extra = "&".join(f"{k}={quote(v, safe='/')}" for k, v in self._tls_files().items() if v)
        if not extra:
            return self.redis_url
        return self.redis_url + ("&" if "?" in self.redis_url else "?") + extra

    @property
    def keys(self) -> Keys:
        return Keys(self.namespace, cluster=self.redis_url.startswith(CLUSTER_SCHEME))


class CommonSettings(ControlSettings):
    """What the gateway and the workers share."""

    flag_group = "settings of the gateway and the workers"

    result_ttl_s: int = Field(default=600, ge=1, description="how long a finished request's result is kept")
    log_requests: bool = Field(default=True, description="one INFO line per finished request (outcome, timings)")
    loop_stall_s: float = Field(default=3.0, gt=0, description="event loop silent this long: /health fails "
                                "(a worker also stops renewing its leases)")
    data_dir: str = Field(default=".data", description="mgpu up's redis and logs; the gateway's Prometheus "
                          "multiprocess files")


class HttpSettings(MgpuSettings):
    """Where an OpenAI-compatible API listens (the gateway's, the sim server's)."""

    flag_group = "HTTP listener settings"

    host: str = Field(default="127.0.0.1", description="the API's address (0.0.0.0: every interface)")
    port: int = Field(default=8000, ge=0, le=65535, description="the API's port; 0: a free port")


class SimEngineSettings(MgpuSettings):
    """The served model's name and shape, and the sim engine's costs (ms; zero cost makes it an
    overhead probe): what a sim engine is made of."""

    flag_group = "served model and sim engine settings"

    model: str = Field(default="SmolLM2-135M-Instruct", description="the served model name (mgpu worker, "
                       "up: a model folder is model_path, and its name the served name)")
    slots: int = Field(default=32, ge=1, le=65536, description="requests an engine runs at once")
    max_model_len: int = Field(default=2048, ge=16, description="context length, prompt and completion")
    sim_prefill_ms_per_token: float = Field(default=0.02, ge=0, description="prefill, per prompt token")
    sim_decode_ms: float = Field(default=10.0, ge=0, description="one decode step")
    sim_decode_ms_per_seq: float = Field(default=0.1, ge=0, description="added to a decode step per running "
                                         "sequence")


class GatewaySettings(HttpSettings, CommonSettings):
    flag_group = "gateway settings"

    gateway_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}",
                            json_schema_extra=_PER_PROCESS, description="names this gateway's reply stream")
    request_timeout_s: float = Field(default=600.0, gt=0, description="the deadline of a request that sets no "
                                     "`timeout`")
    max_request_timeout_s: float = Field(default=3600.0, gt=0, description="the most a request's `timeout` may "
                                         "ask for")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="a larger request body gets 413")
    max_queue_len: int = Field(default=50_000, ge=1, description="requests accepted through the gateways "
                               "and not yet answered, per model: waiting or running (429 past it)")
    max_queue_bytes: int = Field(default=256 << 20, ge=1 << 20, description="bytes of request payloads waiting "
                                 "or running, per model (429 past it)")
    max_queue_bytes_total: int = Field(default=1 << 30, ge=1 << 20, description="the same over all models")
    fair_lanes: bool = Field(default=True, description="with API keys, each key's requests wait in a fair lane "
                             "of their own, taken in turn (docs/security.md); off: one queue, first come first "
                             "served")
    max_key_share: float = Field(default=0.5, ge=0, le=1, description="the share of max_queue_len one API key may "
                                 "hold queued or running in the fair lanes (429 past it); 0: no limit")
    redis_memory_high_water: float = Field(default=0.9, gt=0, le=1, description="Redis used_memory / maxmemory "
                                           "past which new work is refused (503) before Redis refuses writes")
    http_read_timeout_s: float = Field(default=10.0, gt=0, description="to receive a request's headers, and "
                                       "its body")
    max_connections: int = Field(default=10_000, ge=16, description="open HTTP connections; past it new "
                                 "requests get 503")
    health_port: int | None = Field(default=None, ge=0, le=65535, description="/health, /ready and /metrics "
                                    "on a listener of their own; unset: port + 1 (a free port when port is 0); "
                                    "0: a free port")
    redis_pool_size: int = Field(default=32, ge=2, description="Redis connections per gateway process")
    registry_refresh_s: float = Field(default=0.5, gt=0, description="how often the worker registry is read")
    retry_after_s: int = Field(default=1, ge=1, description="Retry-After of a 429 or 503")
    scale_from_zero: bool = Field(default=False, description="queue requests for a model that no live worker "
                                  "serves now but one served before (its facts are in Redis), instead of a 503, "
                                  "so that an autoscaler (KEDA, on the queue's lag) starts one; /ready then needs "
                                  "only Redis (deploy/k8s)")
    enqueue_wait_replicas: int = Field(default=0, ge=0, description="accept a request only once this many Redis "
                                       "replicas hold it (WAIT after the enqueue; 503 and the request cancelled "
                                       "if they do not confirm in time): bounds what a failover loses "
                                       "(docs/deployment.md); 0: do not wait")
    enqueue_wait_timeout_ms: int = Field(default=1000, ge=1, le=4000, description="how long the enqueue's WAIT "
                                         "waits for the replicas (below the Redis socket timeout, 5 s)")
    auth: AuthMode = Field(default="keys", description="keys: every /v1 request needs an API key (mgpu keys); "
                           "off: none (refused on a non-loopback address unless insecure_no_auth; mgpu up on "
                           "loopback: off unless set, and it says so)")
    insecure_no_auth: bool = Field(default=False, description="let a gateway on a non-loopback address run with "
                                   "auth off: anyone who reaches it can use every model")
    bootstrap_api_key: str | None = Field(default=None, description="an admin API key (20+ characters) the gateway "
                                          "registers at start-up as 'bootstrap' (docker compose)")
    key_cache_s: float = Field(default=0.5, gt=0, le=1, description="how long an API key's record is trusted "
                               "before it is read again (a revocation holds within it; enqueues check at once)")
    default_reserve_tokens: int = Field(default=256, ge=1, description="completion tokens a request without "
                                        "max_tokens reserves against its key's tokens per minute")
    allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Host header names the gateway answers to (comma-separated); empty: the "
        "loopback names when it listens on loopback, any otherwise")
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="browser origins allowed to call the API (comma-separated); empty: CORS off")
    stream_keepalive_s: float = Field(default=0.0, ge=0, description="a stream whose first event has not come "
                                      "this long starts, with SSE comments (': keep-alive') every as long while it "
                                      "waits; 0: off, as vllm serve's --sse-keep-alive-interval (a worker's refusal "
                                      "is then a 4xx JSON answer, not an error event)")
    gateway_procs: int = Field(default=1, ge=1, le=64, description="uvicorn worker processes (Prometheus "
                               "multiprocess mode)")
    queue_metrics_interval_s: float = Field(default=2.0, gt=0, description="how often queue gauges are read "
                                            "from Redis")
    strategy: Strategy = Field(default="pull", description="load balancing (gateway/routing.py); `mgpu strategy` "
                               "overrides it at run time")
    affinity_prefix_chars: int = Field(default=256, ge=1, description="prompt prefix that keys prefix_affinity")
    affinity_vnodes: int = Field(default=64, ge=1, le=4096, description="virtual nodes per worker on the hash "
                                 "ring")
    file_max_bytes: int = Field(default=200 << 20, ge=1024, description="the largest file POST /v1/files takes "
                                "(413 past it)")
    file_max_lines: int = Field(default=50_000, ge=1, description="the most lines (requests) of a batch input file")
    file_store_max_bytes: int = Field(default=2 << 30, ge=1 << 20, description="bytes of every file kept in Redis "
                                      "together, uploads and batch outputs (413 past it)")
    file_chunk_bytes: int = Field(default=1 << 20, ge=1024, description="a stored file is split into Redis values "
                                  "of at most this many bytes")
    file_expiry_default_s: int = Field(default=30 * 24 * 3600, ge=0, description="how long an uploaded batch file "
                                       "is kept when its upload names no expires_after (OpenAI's 30 days); 0: "
                                       "until deleted")
    file_expiry_min_s: int = Field(default=3600, ge=1, le=30 * 24 * 3600, description="the shortest expires_after "
                                   "and output_expires_after a client may ask for (OpenAI's 1 hour; tests lower "
                                   "it); the longest is OpenAI's 30 days")
    file_sweep_interval_s: float = Field(default=30.0, gt=0, description="how often a gateway deletes the files "
                                         "past their expires_at (the API hides them from that second on)")
    batch_window: int = Field(default=256, ge=1, description="requests of one batch on its model's batch stream "
                              "and not yet answered, at most")
    batch_lease_ms: int = Field(default=10_000, ge=500, description="a batch's feeder lease: another gateway "
                                "takes the batch over this long after its feeder stops renewing it")
    batch_poll_s: float = Field(default=0.2, gt=0, description="how often a feeder reads its batch's results, "
                                "and how often a gateway looks for batches without a feeder")
    batch_completion_window_s: float | None = Field(default=None, gt=0, description="the completion window every "
                                                    "batch gets, in seconds, whatever it asked for (tests, a "
                                                    "shorter deadline); unset: what it asked for (24h)")
    batch_cancel_grace_s: float = Field(default=10.0, ge=0, description="how long a cancelled or expired batch "
                                        "waits for the requests already running before it lists them as "
                                        "cancelled")

    @field_validator("allowed_hosts", "cors_origins", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _names(v)

    @model_validator(mode="after")
    def _cluster_limits(self) -> Self:
        if self.redis_url.startswith(CLUSTER_SCHEME) and self.enqueue_wait_replicas:
            raise ValueError("enqueue_wait_replicas: WAIT on a Redis Cluster would confirm one shard's replicas "
                             "only; not supported yet (docs/deployment.md, \"Redis Cluster\")")
        return self

    @property
    def on_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def check_exposure(self) -> None:
        """A gateway others can reach must check API keys, unless told otherwise in so many words."""
        if self.auth == "off" and not self.on_loopback and not self.insecure_no_auth:
            raise SettingsError(f"MGPU_AUTH / --auth: off on {self.host}, which other hosts can reach: anyone could "
                                "use every model.  Use --auth keys (and mgpu keys create), or set "
                                "MGPU_INSECURE_NO_AUTH=true if you mean it")

    @property
    def probe_port(self) -> int:
        """Where the gateway's probe listener binds: ``health_port``, else port + 1 (a free port when port is 0)."""
        if self.health_port is not None:
            return self.health_port
        return self.port + 1 if self.port else 0


class WorkerSettings(SimEngineSettings, CommonSettings):
    flag_group = "worker settings"

    engine: Engine = Field(default="vllm", description="vLLM (its CPU build on CPU hosts), or the simulator")
    model_path: str | None = Field(default=None, description="the model folder (vllm); unset: the embedded "
                                   "model, converted once into model_cache_dir")
    model_cache_dir: str = Field(default_factory=lambda: os.path.expanduser("~/.cache/mgpu/models"),
                                 description="where the embedded model is converted to (~/.cache/mgpu/models)")
    worker_id: str | None = Field(default=None, json_schema_extra=_PER_PROCESS, description="unset: host-pid")
    gpu: int | None = Field(default=None, json_schema_extra=_PER_PROCESS, description="the GPU index "
                            "(NVML health, CUDA_VISIBLE_DEVICES)")
    weight: float | None = Field(default=None, gt=0, description="share for the `weighted` strategy; unset: "
                                 "slots")
    heartbeat_interval_s: float = Field(default=0.5, gt=0, description="how often the registry entry and the "
                                        "leases are renewed")
    worker_ttl_s: float = Field(default=2.0, gt=0, description="the registry entry lives this long past a "
                                "heartbeat")
    lease_ms: int = Field(default=3000, ge=100, description="a request unrenewed this long is reclaimed by "
                          "another worker")
    reclaim_interval_s: float = Field(default=0.5, gt=0, description="how often dead workers' requests are "
                                      "looked for")
    max_deliveries: int = Field(default=3, ge=1, description="deliveries before a request is dead-lettered")
    max_dead_letters: int = Field(default=10_000, ge=1, description="per model; oldest trimmed first, never "
                                  "unacknowledged ones")
    drain_grace_s: float = Field(default=60.0, ge=0, description="on SIGTERM or mgpu drain, in-flight requests "
                                 "get this long")
    read_block_ms: int = Field(default=1000, ge=1, description="the longest wait of one stream read")
    fair_reserve_slots: int | None = Field(default=None, ge=0, description="the fewest free slots that a fair "
                                           "lane with its share of the slots running may not take (they stay "
                                           "for lanes below their share); grows with the light lanes' demand up "
                                           "to half the slots; unset: slots / 32, at least 1; 0: none")
    fair_window_s: float = Field(default=10.0, gt=0, description="how recently a lane must have had work here to "
                                 "count as active")
    batch_preempt: bool = Field(default=True, description="when every slot is taken and some run batch work, "
                                "an interactive request that arrives takes the slot of the batch request started "
                                "last, which goes back to its batch stream (to run again later, on any worker): "
                                "interactive work never waits behind batch work")
    batch_reserve_slots: int | None = Field(default=None, ge=0, description="free slots that batch work "
                                            "({ns}:q:{model}:batch) may never take, so that an interactive "
                                            "request starts at once while batch work fills the rest; unset: "
                                            "slots / 8, at least 1")
    metrics_port: int = Field(default=0, ge=0, le=65535, description="/metrics and /health; 0: a free port")
    metrics_host: str = Field(default="127.0.0.1", description="0.0.0.0 to be scraped from other hosts")
    revision: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:+-]{1,64}$", description="what the worker "
                                 "runs, as a label in the registry, /workers, mgpu status and /metrics; unset: "
                                 "derived from the settings a rollout can change")
    canary_gate: bool = Field(default=False, json_schema_extra=_PER_PROCESS, description="start in state "
                              "'canary': take work only from the own stream until admitted (mgpu rollout)")
    vllm_gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1, description="share of the GPU's "
                                               "memory the engine may take")
    vllm_enforce_eager: bool = Field(default=False, description="no CUDA graphs (mgpu up sets it on CPU workers)")
    vllm_kv_cache_gb: int = Field(default=2, ge=1, description="GiB of RAM for the KV cache (CPU build)")
    vllm_dtype: VllmDtype = Field(default="auto", description="the weights' and activations' dtype")
    engine_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="vLLM engine flags as `vllm serve` takes them, given after `--` (mgpu "
        "worker ... -- --tensor-parallel-size 2); they win over mgpu's own; in MGPU_ENGINE_ARGS as one shell-quoted "
        "string")

    @field_validator("engine_args", mode="before")
    @classmethod
    def _engine_args(cls, v: Any) -> Any:
        return shlex.split(v) if isinstance(v, str) else v

    @property
    def effective_revision(self) -> str:
        """``revision`` when set, else ``r-`` and a hash of the served model and of the settings a
        rollout may change: two workers with the same derived revision run the same thing."""
        if self.revision:
            return self.revision
        facts = {k: getattr(self, k) for k in ("model", *ROLLOUT_FIELDS) if k != "revision"}
        digest = hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()
        return "r-" + digest[:8]


class SimServerSettings(HttpSettings, SimEngineSettings, LogSettings):
    """mgpu sim-server: the sim engine behind an OpenAI-compatible API of its own (no Redis)."""


class UpSettings(GatewaySettings, WorkerSettings):
    flag_group = "mgpu up settings"

    workers: int = Field(default=1, ge=0, le=64, description="CPU workers when no GPU is visible")
    redis_maxmemory: str = Field(default="2gb", pattern=r"^[0-9]+(b|kb|mb|gb)?$", description="of the "
                                 "redis-server mgpu up starts")

    @classmethod
    def flag_names(cls) -> tuple[str, ...]:
        """Not the per-process settings: mgpu up gives each process it starts its own."""
        skip = per_process(cls)
        return tuple(n for n in cls.model_fields if n not in skip)


# every role's settings in one object, for code that has not moved to its role's class yet
Settings = UpSettings

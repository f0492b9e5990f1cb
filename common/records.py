"""Typed records of what mgpu keeps in Redis outside the request streams (those are
:mod:`common.schemas`): each is written and parsed here, and nowhere else.

* :class:`WorkerRecord`: a worker's registry hash (``Keys.worker``), written by its heartbeat,
  read by the gateways, ``mgpu status``, the Prometheus target writer and the supervisor.
* :class:`ModelFacts`: one field of the models hash (``Keys.models``): what the gateway needs to
  check a prompt's length before it queues it.
* :class:`WorkerState`: the states of a worker, in the order they come.
* :class:`ReplyKind`: the kind of an event on a gateway's reply stream (``Keys.replies``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError


class WorkerState(StrEnum):
    STARTING = "starting"  # registered, the engine loads: takes no work
    CANARY = "canary"  # a rollout's new worker: serves its own stream only, until admitted
    READY = "ready"  # takes work (the only state the gateway routes to)
    DRAINING = "draining"  # finishes what it runs, takes nothing new, then leaves
    GONE = "gone"  # deregistered
    CRASHLOOP = "crashloop"  # written by `mgpu up` for a worker it left down


class ReplyKind(StrEnum):
    CHUNK = "c"  # a streaming delta (common.schemas.Chunk)
    FINAL = "f"  # the result (common.schemas.Result)
    ERROR = "e"  # an error result (common.schemas.Result with .error)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class WorkerRecord(BaseModel):
    """A worker's registry hash: what it is, where its metrics are, its load and its counters."""

    model_config = ConfigDict(extra="ignore")

    id: str
    state: WorkerState | str = WorkerState.STARTING  # a state this code does not know is kept as text
    model: str = ""
    models: str = ""  # every name it answers to, comma-separated: its model and its LoRA adapters (once ready)
    host: str = ""
    pid: int = 0
    gpu: str = ""  # the GPU index, "" for none
    gpu_name: str = ""
    engine: str = ""
    version: str = ""
    revision: str = ""
    slots: int = 0
    in_flight: int = 0  # busy slots
    queued: int = 0  # undelivered entries in its own stream, as of its last heartbeat
    weight: float = 0.0  # its share for the weighted strategy (<= 0: its slots)
    heartbeat: float = 0.0  # unix time of the last heartbeat
    max_model_len: int = 0
    metrics_host: str = ""
    metrics_port: int = 0
    served: int = 0
    failed: int = 0
    cancelled: int = 0
    skipped: int = 0
    reclaimed: int = 0
    fenced: int = 0
    preempted: int = 0  # batch requests handed back for interactive ones (the worker's batch_preempt)
    dead_lettered: int = 0
    engine_aborts: int = 0
    exits: int = 0  # crash-loop records: exits within the window
    log: str = ""  # crash-loop records: the worker's log file

    @property
    def names(self) -> list[str]:
        """The names this worker answers to (its model, and its adapters once it is ready)."""
        return self.models.split(",") if self.models else [self.model]

    @property
    def share(self) -> float:
        return self.weight if self.weight > 0 else float(max(self.slots, 1))

    @property
    def heartbeat_age_s(self) -> float:
        return max(0.0, time.time() - self.heartbeat)

    @property
    def ready(self) -> bool:
        return self.state == WorkerState.READY

    def to_hash(self) -> dict[str, str]:
        """The hash fields (HSET mapping); unset crash-loop fields are left out."""
        out = {k: str(v) for k, v in self.model_dump(exclude={"exits", "log"}).items()}
        if self.exits:
            out["exits"], out["log"] = str(self.exits), self.log
        return out

    @classmethod
    def from_hash(cls, worker_id: str, raw: Mapping[Any, Any]) -> WorkerRecord | None:
        """The record of an HGETALL reply; None when the hash is gone or unreadable."""
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        fields = {k: v for k, v in fields.items() if v != ""}  # empty: the default
        fields["id"] = worker_id
        try:
            return cls.model_validate(fields)
        except ValidationError:
            return None

    def as_dict(self) -> dict[str, Any]:
        """For ``/workers``: the record, and its heartbeat's age."""
        d = self.model_dump(mode="json")
        d["heartbeat_age_s"] = round(self.heartbeat_age_s, 3)
        return d


class ModelFacts(BaseModel):
    """What workers publish about a model (or a LoRA adapter) they serve (``Keys.models``, one JSON field
    per name): what the gateway checks before it queues a request, and lists in ``/v1/models``."""

    model_config = ConfigDict(extra="ignore")

    max_model_len: int = 0
    engine: str = ""
    # how the gateway counts prompt tokens: "sim" (words), a model folder (its tokenizer.json), or ""
    tokenizer: str = ""
    root: str = ""  # the model folder
    parent: str | None = None  # an adapter's base model
    kinds: list[str] = ["chat", "completion", "tokenize", "detokenize"]  # the endpoints it is served on
    owned_by: str = "mgpu"
    created: int = 0

    @classmethod
    def parse(cls, raw: Any) -> ModelFacts:
        try:
            return cls.model_validate_json(raw)
        except ValidationError:
            return cls()

"""Every Redis key, stream and group name mgpu uses.  Nothing else builds key strings.

Layout (``ns`` is the namespace, ``mgpu`` by default)::

    {ns}:q:{model}                shared request stream of a model (consumer group GROUP); its fair lane 0
    {ns}:q:{model}:lane:{i}       fair lanes 1..LANES-1: with API keys, each key's requests wait in a lane of
                                  their own while lanes last, and workers take from the lanes in turn
    {ns}:q:{model}:lanes          hash: which lane each key's requests go to and how many it has in flight
    {ns}:q:{model}:batch          lower-priority stream for batch jobs (same group)
    {ns}:q:{model}:w:{worker}     a worker's own stream, for push strategies
    {ns}:wq:{model}               set of worker ids that have an own stream for the model
    <any request stream>:gc       set: ids of answered entries kept in that stream until its group reads past
                                  them, so that XINFO GROUPS' lag stays true for KEDA (lua._SAFE_DEL)
    {ns}:dlq:{model}              dead-letter stream
    {ns}:res:{model}:{id}         a request's final Result (JSON, TTL); per model, so that a worker's Redis user
                                  can be kept from other models' results (docs/security.md)
    {ns}:chunks:{model}:{id}      a streaming request's chunks (stream, TTL)
    {ns}:idem:{scope}:{hash}      an Idempotency-Key (hashed) of one scope -> IdempotencyRecord JSON (TTL)
    {ns}:qbytes:{model}           bytes of the model's request payloads on its streams (ENQUEUE adds, FINISH and
                                  DEAD_LETTER subtract; entries carry their size in field ``b``)
    {ns}:qbytes                   the same over all models
    {ns}:qlen:{model}             the model's requests accepted and not yet answered (ENQUEUE adds one, FINISH and
                                  DEAD_LETTER take it off with the bytes): what max_queue_len limits
    {ns}:apikey:{id}              an API key's record (hash: common.apikeys.ApiKey)
    {ns}:apikeys                  hash: key name -> key id
    {ns}:rate:{id}                an API key's sliding minute (per-second counts of requests and tokens) and
                                  its requests in flight (hash, written by ENQUEUE, FINISH and DEAD_LETTER)
    {ns}:usage:{id}               an API key's usage: requests, prompt_tokens, completion_tokens, errors (hash)
    {ns}:replies:{gateway}        events for one gateway process (stream, trimmed, TTL)
    {ns}:cancels                  cancellations, read by every worker (stream, trimmed)
    {ns}:worker:{id}              a worker's registry hash (TTL = heartbeat lease)
    {ns}:workers                  set of registered worker ids
    {ns}:models                   hash: model -> JSON facts (max_model_len, tokenizer) ever served
    {ns}:drain:{id}               present: that worker drains and exits
    {ns}:control                  hash of run-time settings: ``strategy`` (every gateway),
                                  ``strategy:{gateway}`` (one gateway, wins)
    {ns}:starts                   hash: worker id -> how many times it registered (restarts = starts - 1)
    {ns}:admit:{id}               present: that worker, started in state 'canary', joins the fleet ('ready')
    {ns}:supervisor:{id}          a running `mgpu up` (JSON: host, pid, revision, workers; TTL = its lease)
    {ns}:supervisors              set of supervisor ids
    {ns}:rollout                  the current or last rollout (JSON, ops.rollout.RolloutState)
    {ns}:rollout:lock             present while a rollout is requested or runs: its id (TTL, renewed)
    {ns}:rollout:history          the last finished rollouts (list of JSON, newest first)
    {ns}:-                        never written: a script's "no key here" (an ACL user's patterns cover it)
    {ns}:rollout:abort            present: stop the running rollout with that id and roll it back (JSON, TTL)
    {ns}:file:{id}                an uploaded or written file's record (JSON, common.filestore.FileRecord)
    {ns}:file:{id}:c:{i}          the file's content, chunk i (bytes; a file is split so no value is huge)
    {ns}:files                    sorted set: file id by creation time (GET /v1/files)
    {ns}:files:bytes              bytes of every stored file (the file store's size cap)
    {ns}:files:expiry             sorted set: file id by when a sweep deletes it (its expires_at, or later while a
                                  batch reads it; gateway.file_expiry)
    {ns}:file:{id}:batches        set of the batches not finished that read the file (their input: not deleted)
    {ns}:batch:{id}               a batch's record (JSON, common.batchjob.BatchRecord)
    {ns}:batches                  sorted set: batch id by creation time (GET /v1/batches)
    {ns}:batches:active           set of the batches not finished yet (what the feeders look for)
    {ns}:batch:{id}:lease         the feeder lease of a batch: the holder's token (SET NX PX, renewed)
    {ns}:batch:{id}:out           hash: line index -> {"m": model, "c": custom_id}, for every line submitted and
                                  not yet answered

On a Redis Cluster (``Keys(cluster=True)``, a ``redis+cluster://`` URL) the names carry hash tags, so that every
script and multi-key call stays in one slot (docs/deployment.md, "Redis Cluster"):

    {ns}:q:{<model>}...           every key of one model has the model as its tag: its streams, lane map,
                                  results, chunks, counters, dead letters, and those below, so a model's whole
                                  queue lives on one shard and models spread over the shards
    {ns}:idem:{<model>}:{scope}:{hash}   idempotency keys are per model (the ENQUEUE script checks them)
    {ns}:qbytes:{<model>}:all     the "total" byte counter: per model (a cluster has no one place for a total)
    {ns}:replies:{<model>}:{gateway}     one reply stream per gateway and model (FINISH writes it)
    {ns}:wl:{<model>}:{worker}    a copy of the worker's state (hash: state; TTL = heartbeat lease) on the
                                  model's slot, for the scripts that check it (ENQUEUE's push, the orphan sweep)
    {ns}:-:{<model>}              the "no key here" of a model's scripts
    {{ns}}:...                    every other key (registry, control, API keys and their limits, cancels,
                                  rollouts) has the namespace as its tag: one slot, so their few multi-key
                                  steps (API-key admission, registry transactions) stay atomic
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

GROUP = "workers"

# Fair lanes per model (docs/security.md, "Fair sharing").  A constant, not a setting: a gateway that wrote to
# a lane its workers do not read would strand requests.
LANES = 8


@dataclass(frozen=True)
class Keys:
    ns: str = "mgpu"
    cluster: bool = False  # Redis Cluster: hash-tagged names (module docstring)

    def _g(self, rest: str) -> str:
        """A key that belongs to no model."""
        return f"{{{self.ns}}}:{rest}" if self.cluster else f"{self.ns}:{rest}"

    def _m(self, kind: str, model: str) -> str:
        """The prefix of a model's keys of one kind."""
        return f"{self.ns}:{kind}:{{{model}}}" if self.cluster else f"{self.ns}:{kind}:{model}"

    @property
    def none(self) -> str:
        """A name that is never written, given to a script in place of a key it does not need."""
        return self._g("-")

    def none_for(self, model: str) -> str:
        """:attr:`none` in a script of ``model``'s keys (on a cluster, in that model's slot)."""
        return f"{self.ns}:-:{{{model}}}" if self.cluster else self.none

    def stream(self, model: str) -> str:
        return self._m("q", model)

    def lanes(self, model: str) -> list[str]:
        """The model's fair lanes, lane 0 (its shared stream) first."""
        return [self.stream(model), *(f"{self.lane_prefix(model)}{i}" for i in range(1, LANES))]

    def lane_prefix(self, model: str) -> str:
        """A lane's name without its number (the ENQUEUE script's recount builds them)."""
        return f"{self.stream(model)}:lane:"

    def lane_map(self, model: str) -> str:
        return f"{self.stream(model)}:lanes"

    def batch_stream(self, model: str) -> str:
        return f"{self.stream(model)}:batch"

    def worker_stream(self, model: str, worker: str) -> str:
        return f"{self.worker_stream_prefix(model)}{worker}"

    def worker_stream_prefix(self, model: str) -> str:
        """A worker's own stream's name without its id (the ENQUEUE script's recount builds them)."""
        return f"{self.stream(model)}:w:"

    def worker_streams(self, model: str) -> str:
        return self._m("wq", model)

    def dlq(self, model: str) -> str:
        return self._m("dlq", model)

    def result(self, model: str, request_id: str) -> str:
        return f"{self._m('res', model)}:{request_id}"

    def chunks(self, model: str, request_id: str) -> str:
        return f"{self._m('chunks', model)}:{request_id}"

    def idempotency(self, scope: str, key: str, model: str) -> str:
        """An Idempotency-Key of one scope (hashed).  On a cluster it is per model too: the ENQUEUE script of
        the model's slot checks and sets it."""
        digest = hashlib.sha256(key.encode()).hexdigest()[:40]
        if self.cluster:
            return f"{self._m('idem', model)}:{scope}:{digest}"
        return f"{self.ns}:idem:{scope}:{digest}"

    def queue_bytes(self, model: str) -> str:
        return self._m("qbytes", model)

    def queue_len(self, model: str) -> str:
        return self._m("qlen", model)

    def queue_bytes_total(self, model: str) -> str:
        """The byte counter over all models; on a cluster, a second one per model (no key spans the shards)."""
        return f"{self._m('qbytes', model)}:all" if self.cluster else f"{self.ns}:qbytes"

    def api_key(self, key_id: str) -> str:
        return self._g(f"apikey:{key_id}")

    @property
    def api_key_names(self) -> str:
        return self._g("apikeys")

    def rate(self, key_id: str) -> str:
        return self._g(f"rate:{key_id}")  # also built by the FINISH and DEAD_LETTER scripts (common/lua.py)

    def usage(self, key_id: str) -> str:
        return self._g(f"usage:{key_id}")  # also built by the FINISH and DEAD_LETTER scripts

    def replies(self, gateway: str, model: str) -> str:
        """The reply stream of one gateway process; on a cluster one per model (its workers' scripts write it)."""
        return f"{self._m('replies', model)}:{gateway}" if self.cluster else f"{self.ns}:replies:{gateway}"

    @property
    def cancels(self) -> str:
        return self._g("cancels")

    def worker(self, worker_id: str) -> str:
        return self._g(f"worker:{worker_id}")

    def worker_live(self, model: str, worker_id: str) -> str:
        """Where a model's scripts read a worker's state: its registry hash, or on a cluster a copy of the
        state on the model's slot (the worker keeps both)."""
        return f"{self._m('wl', model)}:{worker_id}" if self.cluster else self.worker(worker_id)

    @property
    def workers(self) -> str:
        return self._g("workers")

    @property
    def models(self) -> str:
        return self._g("models")

    def drain(self, worker_id: str) -> str:
        return self._g(f"drain:{worker_id}")

    @property
    def control(self) -> str:
        return self._g("control")

    @property
    def worker_starts(self) -> str:
        return self._g("starts")

    def admit(self, worker_id: str) -> str:
        return self._g(f"admit:{worker_id}")

    def supervisor(self, supervisor_id: str) -> str:
        return self._g(f"supervisor:{supervisor_id}")

    @property
    def supervisors(self) -> str:
        return self._g("supervisors")

    @property
    def rollout(self) -> str:
        return self._g("rollout")

    @property
    def rollout_lock(self) -> str:
        return self._g("rollout:lock")

    @property
    def rollout_history(self) -> str:
        return self._g("rollout:history")

    @property
    def rollout_abort(self) -> str:
        return self._g("rollout:abort")

    def file(self, file_id: str) -> str:
        return self._g(f"file:{file_id}")

    def file_batches(self, file_id: str) -> str:
        return self._g(f"file:{file_id}:batches")

    def file_chunk(self, file_id: str, index: int) -> str:
        return self._g(f"file:{file_id}:c:{index}")

    @property
    def files(self) -> str:
        return self._g("files")

    @property
    def files_bytes(self) -> str:
        return self._g("files:bytes")

    @property
    def files_expiry(self) -> str:
        return self._g("files:expiry")

    def batch(self, batch_id: str) -> str:
        return self._g(f"batch:{batch_id}")

    @property
    def batches(self) -> str:
        return self._g("batches")

    @property
    def batches_active(self) -> str:
        return self._g("batches:active")

    def batch_lease(self, batch_id: str) -> str:
        return f"{self.batch(batch_id)}:lease"

    def batch_outstanding(self, batch_id: str) -> str:
        return f"{self.batch(batch_id)}:out"

"""What a load-generator run sends and when: :class:`BenchConfig` (target, request shape, load),
the max_tokens mix (:func:`parse_mix`, :class:`MixSampler`) and the seeded open-loop arrival
schedule (:func:`poisson_schedule`, :func:`arrival_schedule`), split over ``--procs`` shards.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
    "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform",
    "victor", "whiskey", "xray", "yankee", "zulu",
]


def parse_mix(spec: str) -> list[tuple[float, int]]:
    """Parse ``"0.9:32,0.1:1024"`` into ``[(0.9, 32), (0.1, 1024)]``.

    Fractions must be positive and sum to 1 (within 1e-6); max_tokens must be positive integers.
    """
    out: list[tuple[float, int]] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        frac_s, sep, tok_s = part.partition(":")
        if not sep:
            raise ValueError(f"mix entry {part!r} is not FRACTION:MAX_TOKENS")
        try:
            frac, tokens = float(frac_s), int(tok_s)
        except ValueError:
            raise ValueError(f"mix entry {part!r} is not FRACTION:MAX_TOKENS") from None
        if not (frac > 0.0 and math.isfinite(frac)):
            raise ValueError(f"mix fraction must be positive, got {frac_s!r}")
        if tokens < 1:
            raise ValueError(f"mix max_tokens must be >= 1, got {tok_s!r}")
        out.append((frac, tokens))
    if not out:
        raise ValueError("empty mix")
    total = sum(f for f, _ in out)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"mix fractions sum to {total:g}, not 1")
    return out


class MixSampler:
    """Draws max_tokens per request from a ``parse_mix`` result with its own seeded RNG."""

    def __init__(self, mix: Sequence[tuple[float, int]], seed: int) -> None:
        self._rng = random.Random(seed)
        self._values = [t for _, t in mix]
        acc = 0.0
        self._cum: list[float] = []
        for frac, _ in mix:
            acc += frac
            self._cum.append(acc)

    def draw(self) -> int:
        if len(self._values) == 1:
            return self._values[0]
        u = self._rng.random() * self._cum[-1]
        return self._values[min(bisect.bisect_right(self._cum, u), len(self._values) - 1)]


def poisson_schedule(rate: float, horizon_s: float, seed: int, max_n: int | None = None) -> list[float]:
    """Arrival offsets (seconds from 0) of a Poisson process of ``rate``/s over ``[0, horizon_s)``."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while max_n is None or len(out) < max_n:
        t += rng.expovariate(rate)
        if t >= horizon_s:
            break
        out.append(t)
    return out


@dataclass
class BenchConfig:
    """One run: the target (an HTTP base URL or the in-process sim engine), the requests' shape and the load."""

    url: str = "http://127.0.0.1:8000"
    model: str = DEFAULT_MODEL
    endpoint: Literal["chat", "completions"] = "chat"
    stream: bool = False
    max_tokens: int = 32
    mix: list[tuple[float, int]] | None = None  # overrides max_tokens
    prompt_words: int = 32
    rate: float | None = None  # open loop (req/s, all processes together)
    concurrency: int | None = None  # closed loop (clients, all processes together)
    duration: float = 10.0  # measured seconds (after warmup)
    warmup: float = 0.0
    requests: int | None = None  # stop after this many requests (warmup included), if sooner
    seed: int = 0
    timeout: float = 60.0  # per request, from its send
    connections: int | None = None  # raw client: keep-alive connections opened before the start (None: auto)
    max_inflight: int = 0  # 0: no limit (beyond the file-descriptor limit)
    procs: int = 1
    client: Literal["raw", "aiohttp"] = "raw"
    api_key: str | None = None
    extra_body: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    in_process: bool = False
    sim_decode_ms: float = 10.0
    sim_decode_ms_per_seq: float = 0.1
    sim_prefill_ms_per_token: float = 0.02
    sim_slots: int = 32
    sim_max_model_len: int = 2048

    def validate(self) -> None:
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError("give exactly one of rate (open loop) or concurrency (closed loop)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError("rate must be positive")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.duration <= 0 or self.warmup < 0 or self.timeout <= 0:
            raise ValueError("duration and timeout must be positive, warmup non-negative")
        if self.requests is not None and self.requests < 1:
            raise ValueError("requests must be >= 1")
        if self.procs < 1:
            raise ValueError("procs must be >= 1")
        if self.connections is not None and self.connections < 0:
            raise ValueError("connections must be >= 0")
        if self.concurrency is not None and self.procs > self.concurrency:
            raise ValueError("procs must not exceed concurrency")
        if self.in_process and self.procs != 1:
            raise ValueError("in-process mode runs in one process (procs=1)")
        if self.endpoint not in ("chat", "completions"):
            raise ValueError("endpoint must be chat or completions")
        if self.max_tokens < 1 or self.prompt_words < 1:
            raise ValueError("max_tokens and prompt_words must be >= 1")

    @property
    def mode(self) -> str:
        return "open" if self.rate is not None else "closed"

    def token_mix(self) -> list[tuple[float, int]]:
        return self.mix if self.mix else [(1.0, self.max_tokens)]


def shard_requests(cfg: BenchConfig, shard: int, nshards: int) -> int | None:
    """Shard ``shard``'s part of ``cfg.requests`` (None: no request limit)."""
    if cfg.requests is None:
        return None
    return cfg.requests // nshards + (1 if shard < cfg.requests % nshards else 0)


def arrival_schedule(cfg: BenchConfig, shard: int = 0, nshards: int = 1) -> list[float]:
    """The open-loop arrival offsets (seconds from the start) that process ``shard`` of ``nshards`` sends."""
    assert cfg.rate is not None
    return poisson_schedule(
        cfg.rate / nshards, cfg.warmup + cfg.duration, seed=cfg.seed * 7919 + 2 * shard,
        max_n=shard_requests(cfg, shard, nshards),
    )


def prompt_text(words: int, tag: str) -> str:
    """``words`` words starting with ``tag``: a unique first word keeps prompts distinct (no
    prefix-cache sharing between requests)."""
    body = [_WORDS[i % len(_WORDS)] for i in range(words - 1)]
    return " ".join([tag, *body])

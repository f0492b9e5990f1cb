"""Engines behind one Protocol: ``vllm`` (vLLM's AsyncLLM) and ``sim`` (a vLLM simulator)."""

from __future__ import annotations

from gpu_worker.engine.base import Engine, EngineRequest, StepOutput

__all__ = ["Engine", "EngineRequest", "StepOutput"]

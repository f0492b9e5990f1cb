"""Token-level engines behind one Protocol (:class:`Engine`): ``sim``, a vLLM simulator.  mgpu's own
OpenAI layer (:mod:`gpu_worker.serving.sim`) runs requests on one.  A vLLM worker needs none of this:
vLLM's own OpenAI layer runs on vLLM's engine (:mod:`gpu_worker.serving.vllm`)."""

from __future__ import annotations

from gpu_worker.engine.base import Engine, EngineRequest, StepOutput

__all__ = ["Engine", "EngineRequest", "StepOutput"]

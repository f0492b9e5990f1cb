"""The real engine: vLLM's v1 ``AsyncLLM`` behind the :class:`gpu_worker.engine.base.Engine` Protocol.

Prompts are rendered and tokenized here (chat template, ``add_generation_prompt=True``) and sent
to vLLM as token ids, so prompt token counts are exact and a resumed sequence is simply
"prompt + what was already generated".  vLLM streams deltas (``RequestOutputKind.DELTA``).

vLLM starts its engine core in a new (spawned) process: a script that builds this engine needs an
``if __name__ == "__main__":`` guard.  vLLM is imported in :meth:`VllmEngine.start` only, so this
module imports cheaply.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from common.errors import EngineDead, GenerationFailed
from gpu_worker.engine.base import EngineRequest, InvalidEngineRequest, StepOutput

if TYPE_CHECKING:
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        model_path: str,
        served_name: str,
        *,
        slots: int = 32,
        max_model_len: int = 2048,
        enforce_eager: bool = False,
        kv_cache_gb: int = 2,
        gpu_memory_utilization: float = 0.9,
        dtype: str = "auto",
    ) -> None:
        self.model_path = model_path
        self.served_name = served_name
        self.slots = slots
        self.max_model_len = max_model_len
        self.enforce_eager = enforce_eager
        self.kv_cache_gb = kv_cache_gb
        self.gpu_memory_utilization = gpu_memory_utilization
        self.dtype = dtype
        self._engine: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Build the engine: the model loads in vLLM's engine-core process (seconds to minutes).

        The blocking construction runs in a thread, so the caller's event loop stays responsive
        (heartbeats, signals); ``AsyncLLM`` starts its output handler on the first request."""
        if self._engine is not None:
            return
        if self._closed:
            raise EngineDead("the vLLM engine was shut down")
        # The engine travels in a list, not as a return value: vLLM keeps tracebacks of imports it
        # does while building (so the frames of the thread stay alive), and shutdown() must be able
        # to drop the last reference to the engine.
        box: list[AsyncLLM] = []
        fut = asyncio.ensure_future(asyncio.to_thread(self._build, box))
        try:
            await asyncio.shield(fut)
        except asyncio.CancelledError:
            # The thread cannot be stopped: shut the engine down once it is built.
            fut.add_done_callback(lambda _: [engine.shutdown() for engine in box])
            raise
        self._engine = box.pop()
        self._tokenizer = self._engine.get_tokenizer()
        log.info("vLLM engine ready: model=%s slots=%d max_model_len=%d",
                 self.model_path, self.slots, self.max_model_len)

    def _build(self, box: list[AsyncLLM]) -> None:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        if current_platform.is_cpu() and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.kv_cache_gb)  # GiB of RAM for the KV cache
        args = AsyncEngineArgs(
            model=self.model_path,
            served_model_name=self.served_name,
            max_num_seqs=self.slots,
            max_model_len=self.max_model_len,
            enforce_eager=self.enforce_eager,
            gpu_memory_utilization=self.gpu_memory_utilization,
            dtype=self.dtype,  # type: ignore[arg-type]  # ModelDType is a Literal | torch.dtype
            disable_log_stats=True,
            enable_log_requests=False,
        )
        box.append(AsyncLLM.from_engine_args(args, usage_context=UsageContext.ENGINE_CONTEXT))

    async def shutdown(self) -> None:
        engine, self._engine = self._engine, None
        self._closed = True
        if engine is not None:
            engine.shutdown()
            del engine
            gc.collect()  # AsyncLLM sits in reference cycles: finalize it now, not at interpreter exit

    async def check_health(self) -> None:
        engine = self._engine
        if engine is None:
            raise EngineDead("the vLLM engine is not running")
        try:
            await engine.check_health()
        except Exception as exc:
            raise EngineDead(f"the vLLM engine is dead: {exc}") from exc

    @property
    def load(self) -> int:
        return self._engine.get_num_unfinished_requests() if self._engine is not None else 0

    # ------------------------------------------------------------------ prompts
    def _prompt_ids(self, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
        tok = self._tokenizer
        if tok is None:
            raise EngineDead("the vLLM engine is not running")
        if messages is not None:
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tok.encode(text, add_special_tokens=False))  # the template has them already
        return list(tok.encode(prompt or "", add_special_tokens=True))

    def count_prompt_tokens(self, prompt: str | None, messages: list[dict[str, str]] | None) -> int:
        return len(self._prompt_ids(prompt, messages))

    # ------------------------------------------------------------------ requests
    def _sampling_params(self, req: EngineRequest) -> Any:
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        p = req.params
        return SamplingParams(
            n=1,
            max_tokens=p.max_tokens,
            temperature=p.temperature,
            top_p=p.top_p,
            stop=list(p.stop) or None,
            seed=p.seed,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            logprobs=p.logprobs,
            output_kind=RequestOutputKind.DELTA,
        )

    async def generate(self, req: EngineRequest) -> AsyncIterator[StepOutput]:
        engine = self._engine
        if engine is None:
            raise EngineDead("the vLLM engine is not running")
        from vllm.exceptions import VLLMClientError
        from vllm.inputs import TokensPrompt
        from vllm.renderers.inputs.preprocess import parse_model_prompt
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        prompt_ids = self._prompt_ids(req.prompt, req.messages)
        prompt_tokens = len(prompt_ids)
        context = prompt_ids + list(req.resume_token_ids)
        if len(context) + req.params.max_tokens > self.max_model_len:
            raise InvalidEngineRequest(
                f"this model's maximum context length is {self.max_model_len} tokens; the request "
                f"needs {len(context)} prompt and {req.params.max_tokens} completion tokens"
            )
        sampling = self._sampling_params(req)
        top_n = req.params.logprobs
        # Rendered input (as vLLM's docs advise): the raw-prompt path is deprecated in vLLM.
        (engine_input,) = engine.renderer.render_cmpl(
            [parse_model_prompt(engine.model_config, TokensPrompt(prompt_token_ids=context))]
        )
        stream = engine.generate(engine_input, sampling, req.request_id)
        generated = 0
        finished = False
        try:
            async for out in stream:
                if not out.outputs:
                    continue
                comp = out.outputs[0]
                token_ids = list(comp.token_ids)
                generated += len(token_ids)
                reason = comp.finish_reason
                if reason == "abort":  # abort() was called: end like the simulator does
                    finished = True
                    raise asyncio.CancelledError(f"request {req.request_id} aborted")
                if reason == "error":
                    finished = True
                    raise GenerationFailed(f"vLLM failed request {req.request_id}")
                if reason is not None and reason not in ("stop", "length"):
                    reason = "stop"
                logprobs = None
                if top_n is not None and comp.logprobs is not None:
                    logprobs = _logprobs(token_ids, comp.logprobs, top_n)
                if reason is not None:
                    finished = True
                yield StepOutput(
                    text=comp.text,
                    token_ids=token_ids,
                    prompt_tokens=prompt_tokens,
                    completion_tokens=generated,
                    finish_reason=reason,
                    logprobs=logprobs,
                )
                if finished:
                    return
            finished = True
        except EngineDeadError as exc:
            finished = True  # nothing to abort: the engine is gone
            raise EngineDead(f"the vLLM engine died: {exc}") from exc
        except VLLMClientError as exc:
            finished = True
            raise InvalidEngineRequest(str(exc)) from exc
        except EngineGenerateError as exc:
            raise GenerationFailed(f"vLLM failed request {req.request_id}: {exc.__cause__ or exc}") from exc
        finally:
            if not finished:
                # Closed early (GeneratorExit), cancelled, or failed: free the sequence in vLLM.
                # vLLM's own generator aborts only when it is closed, which may be much later.
                try:
                    await engine.abort(req.request_id)
                except Exception:  # the engine may be dead already
                    log.debug("abort of %s failed", req.request_id, exc_info=True)
            await stream.aclose()

    async def abort(self, request_id: str) -> None:
        engine = self._engine
        if engine is not None:
            await engine.abort(request_id)


def _logprobs(token_ids: list[int], positions: Any, top_n: int) -> list[dict[str, object]]:
    """vLLM's per-position ``{token_id: Logprob}`` (sampled token + top-n) as OpenAI-style entries."""
    result: list[dict[str, object]] = []
    for tok_id, pos in zip(token_ids, positions, strict=False):
        pos = pos or {}
        chosen = pos.get(tok_id)
        ranked = sorted(pos.values(), key=lambda lp: lp.rank if lp.rank is not None else 1 << 30)
        top: dict[str, float] = {}
        for lp in ranked:
            if len(top) >= top_n:
                break
            top.setdefault(lp.decoded_token or "", float(lp.logprob))
        result.append({
            "token": (chosen.decoded_token or "") if chosen is not None else "",
            "logprob": float(chosen.logprob) if chosen is not None else float("-inf"),
            "top_logprobs": top,
        })
    return result


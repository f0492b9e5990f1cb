"""Entry point of one worker process: build the engine, run the worker, shut the engine down."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

from common.redis_conn import make_client
from common.settings import SettingsError, WorkerSettings
from gpu_worker.engine.base import Engine
from gpu_worker.worker import Worker

log = logging.getLogger("mgpu.worker")


def build_engine(s: WorkerSettings) -> Engine:
    if s.engine == "sim":
        from gpu_worker.engine.sim import SimEngine

        return SimEngine(slots=s.slots, max_model_len=s.max_model_len,
                         prefill_ms_per_token=s.sim_prefill_ms_per_token, decode_ms=s.sim_decode_ms,
                         decode_ms_per_seq=s.sim_decode_ms_per_seq,
                         faults=os.environ.get("MGPU_SIM_FAULTS") == "1")
    from gpu_worker.engine.vllm_engine import VllmEngine
    from gpu_worker.model_store import ensure_embedded_model

    path = s.model_path or str(ensure_embedded_model(Path(s.model_cache_dir)))
    if path.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(path)):
        # a local folder that is not there (anything else is a model id for vLLM to fetch): fail before vLLM loads
        raise SettingsError(f"MGPU_MODEL_PATH / --model-path: {path} does not exist")
    return VllmEngine(model_path=path, served_name=s.model, slots=s.slots, max_model_len=s.max_model_len,
                      enforce_eager=s.vllm_enforce_eager, kv_cache_gb=s.vllm_kv_cache_gb,
                      gpu_memory_utilization=s.vllm_gpu_memory_utilization, dtype=s.vllm_dtype)


@contextlib.asynccontextmanager
async def engine_running(engine: Engine) -> AsyncIterator[Engine]:
    """The engine lives exactly as long as this block; ``finally`` always shuts it down."""
    try:
        await engine.start()
        yield engine
    finally:
        await engine.shutdown()


async def run_worker(s: WorkerSettings, version: str = "dev") -> int:
    if s.gpu is not None:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", str(s.gpu))
    client = make_client(s.redis_url, max_connections=24, block_ms=max(s.read_block_ms, 1000),
                         name=f"worker:{s.worker_id or os.getpid()}")
    worker = Worker(s, build_engine(s), client, version=version)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_drain)
    try:
        await worker.announce()  # visible as "starting" while the engine loads
        async with engine_running(worker.engine):
            if worker.state == "draining":  # asked to stop while loading
                return 0
            return await worker.run()
    finally:
        await worker.close()
        await client.aclose()

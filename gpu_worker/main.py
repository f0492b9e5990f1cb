"""Entry point of one worker process: build its OpenAI server (vLLM's, or the simulator's), run the
worker, shut the server's engine down."""

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
from gpu_worker.serving.base import OpenAIServer
from gpu_worker.worker import Worker

log = logging.getLogger("mgpu.worker")


def build_server(s: WorkerSettings) -> OpenAIServer:
    if s.engine == "sim":
        if s.engine_args:
            raise SettingsError("engine flags after -- are vLLM's: the sim engine takes none")
        from gpu_worker.engine.sim import SimEngine
        from gpu_worker.serving.sim import SimServer

        return SimServer(SimEngine(slots=s.slots, max_model_len=s.max_model_len,
                                   prefill_ms_per_token=s.sim_prefill_ms_per_token, decode_ms=s.sim_decode_ms,
                                   decode_ms_per_seq=s.sim_decode_ms_per_seq,
                                   faults=os.environ.get("MGPU_SIM_FAULTS") == "1"), s.model)
    from gpu_worker.model_store import ensure_embedded_model
    from gpu_worker.serving.vllm import VllmServer

    path = s.model_path or str(ensure_embedded_model(Path(s.model_cache_dir)))
    if path.startswith(("/", ".", "~")) and not os.path.exists(os.path.expanduser(path)):
        # a local folder that is not there (anything else is a model id for vLLM to fetch): fail before vLLM loads
        raise SettingsError(f"MGPU_MODEL_PATH / --model-path: {path} does not exist")
    try:
        return VllmServer(s, path)
    except (ValueError, SystemExit) as exc:  # vLLM's parser and checks of the engine flags
        raise SettingsError(f"engine flags ({' '.join(s.engine_args)}): {exc}") from None


@contextlib.asynccontextmanager
async def engine_running(server: OpenAIServer) -> AsyncIterator[OpenAIServer]:
    """The engine lives exactly as long as this block; ``finally`` always shuts it down."""
    try:
        await server.start()
        yield server
    finally:
        await server.shutdown()


async def run_worker(s: WorkerSettings, version: str = "dev") -> int:
    if s.gpu is not None:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", str(s.gpu))
    client = make_client(s.redis_dsn, max_connections=24, block_ms=max(s.read_block_ms, 1000),
                         name=f"worker:{s.worker_id or os.getpid()}")
    worker = Worker(s, build_server(s), client, version=version)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.request_drain)
    try:
        await worker.announce()  # visible as "starting" while the engine loads
        async with engine_running(worker.server):
            if worker.state == "draining":  # asked to stop while loading
                return 0
            return await worker.run()
    finally:
        await worker.close()
        await client.aclose()

"""What a GPU machine lent for a few minutes can tell mgpu, with only what such a machine has: Python, torch
and nvidia-ml-py (no package index, no Redis, no vLLM).  Run by ``bench/gpu_check.sh``; imports nothing of
mgpu but ``gpu_worker.nvml`` (standard library only).

1. NVML: every GPU's reading and health, as the worker's exporter reads them (``gpu_worker.nvml.probe``),
   before, during (sampled every 0.5 s) and after the load below: the ``mgpu_gpu_*`` gauges on a real GPU.
2. A decode-like step: for batch sizes 1 to 512, the time of one step of a Llama-8B-sized layer stack
   (bf16 GEMMs of hidden 4096 / MLP 14336 over 32 layers, the weights read once per step), which is the
   shape of the sim engine's batch-dependent step cost (``sim_decode_ms`` + ``sim_decode_ms_per_seq`` x
   running): a fit of both on a real GPU, so that sim figures can be read against one.
3. Prefill: the time per prompt token of the same stack at 2,048 tokens (``sim_prefill_ms_per_token``).

    python -m bench.gpu_probe --out DIR      (DIR/gpu_probe.json)

GPU figures only when a GPU answered: without one it writes what it found and exits 1.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path
from typing import Any

from gpu_worker import nvml

HIDDEN, MLP, LAYERS = 4096, 14336, 32


def _sampler(stop: threading.Event, out: list[dict[str, Any]]) -> None:
    while not stop.wait(0.5):
        out.append({"t": time.time(), **nvml.probe()})


def _stack(torch: Any, device: str) -> list[Any]:
    w = [torch.randn(HIDDEN, 3 * HIDDEN), torch.randn(HIDDEN, HIDDEN), torch.randn(HIDDEN, 2 * MLP),
         torch.randn(MLP, HIDDEN)]
    return [t.to(device=device, dtype=torch.bfloat16) / 64 for t in w]


def _step(torch: Any, x: Any, weights: list[Any]) -> Any:
    qkv, o, up, down = weights
    for _ in range(LAYERS):  # one set of weights stands for every layer: the GEMM shapes are what count
        h = x @ qkv
        x = x + h[:, :HIDDEN] @ o
        g = x @ up
        x = x + (torch.nn.functional.silu(g[:, :MLP]) * g[:, MLP:]) @ down
    return x


def _timed(torch: Any, fn: Any, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeats


def measure(torch: Any) -> dict[str, Any]:
    weights = _stack(torch, "cuda")
    decode = {}
    for batch in (1, 8, 32, 64, 128, 256, 512):
        x = torch.randn(batch, HIDDEN, device="cuda", dtype=torch.bfloat16)
        decode[batch] = 1000 * _timed(torch, lambda x=x: _step(torch, x, weights), 10)
    xs = sorted(decode)
    n = len(xs)
    mx, my = sum(xs) / n, sum(decode.values()) / n
    slope = sum((b - mx) * (decode[b] - my) for b in xs) / sum((b - mx) ** 2 for b in xs)
    prompt = torch.randn(2048, HIDDEN, device="cuda", dtype=torch.bfloat16)
    prefill_ms = 1000 * _timed(torch, lambda: _step(torch, prompt, weights), 3)
    return {"decode_step_ms_by_batch": decode, "fit_sim_decode_ms": my - slope * mx,
            "fit_sim_decode_ms_per_seq": slope, "prefill_ms_per_token_at_2048": prefill_ms / 2048,
            "device": torch.cuda.get_device_name(0), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=".")
    a = p.parse_args(argv)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "nvml_before": nvml.probe()}
    ok = False
    try:
        import torch
        if torch.cuda.is_available():
            samples: list[dict[str, Any]] = []
            stop = threading.Event()
            t = threading.Thread(target=_sampler, args=(stop, samples), daemon=True)
            t.start()
            try:
                report["load"] = measure(torch)
                ok = True
            finally:
                stop.set()
                t.join()
            report["nvml_during"] = samples
        else:
            report["load"] = "torch sees no CUDA device"
    except ImportError as exc:
        report["load"] = f"no torch: {exc}"
    report["nvml_after"] = nvml.probe()
    out = Path(a.out) / "gpu_probe.json"
    out.write_text(json.dumps(report, indent=1, default=str))
    print(json.dumps({k: v for k, v in report.items() if k != "nvml_during"}, indent=1, default=str)[:6000])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

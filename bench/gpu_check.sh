#!/usr/bin/env bash
# The GPU check, run in one go on a lent GPU machine (torch and nvidia-ml-py there, no package index):
#   device tool:  bash bench/gpu_check.sh        (writes under $OUT, or ./gpu-out without it)
# 1. nvidia-smi and the NVML readings as mgpu's worker exporter reads them (python -m gpu_worker.nvml);
# 2. bench.gpu_probe: NVML sampled under a decode-like load, the step time by batch size and its fit to the
#    sim engine's cost model (docs/benchmarks.md says which figures came from which card);
# 3. what else this machine can run of mgpu's benchmarks: none of them without redis-server and the
#    Python packages of pyproject.toml, which the script reports rather than installs.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-./gpu-out}"; mkdir -p "$out"
py=$(command -v python3 || command -v python)
{ date -u; nvidia-smi || echo "no nvidia-smi"; } > "$out/nvidia-smi.txt" 2>&1
PYTHONPATH=. timeout 60 "$py" -m gpu_worker.nvml > "$out/nvml.json" 2> "$out/nvml.err"; echo "nvml probe: rc $?"
PYTHONPATH=. timeout 300 "$py" -m bench.gpu_probe --out "$out"; rc=$?
{
  echo "redis-server: $(command -v redis-server || echo absent)"
  for m in redis fastapi uvicorn pydantic vllm torch pynvml; do
    "$py" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>/dev/null || echo "$m: absent"
  done
} > "$out/what-runs.txt"
cat "$out/what-runs.txt"
exit $rc

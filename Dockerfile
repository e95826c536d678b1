# Higgs Audio v2 on RunPod serverless. Two targets from one file (see docs/deploy.md):
#   thin (default): Python, uv and the project; the runtime (torch, transformers, ...) is
#                   installed by the bootstrap onto the network volume on the first start.
#   full:           the same with the runtime installed at build time (about 5 GB more).
# Model weights are in neither: they live on the network volume.
# Supply chain (README, Security): the one base image is pinned by digest (`make pin-images`
# refreshes it; Dependabot proposes updates), and everything fetched is hash-checked:
# uv and the build backend from requirements-build.lock, the runtime from requirements.lock.
# No `# syntax=` line: BuildKit's built-in Dockerfile frontend, not one pulled by tag.

# The base, named once, literally: Dependabot does not read images given through an ARG.
FROM python:3.11-slim-trixie AS slim

FROM slim AS build
# uv and hatchling from hash-pinned wheels; the project's wheel is built offline with them.
WORKDIR /build
COPY requirements-build.lock pyproject.toml README.md ./
COPY src ./src
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --require-hashes --no-deps \
        --requirement requirements-build.lock \
    && /opt/build/bin/pip wheel --no-cache-dir --no-index --no-deps --no-build-isolation \
        --wheel-dir /dist .

FROM slim AS base
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
COPY --from=build /opt/build/bin/uv /usr/local/bin/uv
WORKDIR /app
COPY requirements.lock ./
COPY --from=build /dist /tmp/dist
# The project itself, without its dependencies: the bootstrap needs only the standard library.
RUN uv pip install --system --no-index --no-deps /tmp/dist/*.whl && rm -rf /tmp/dist
# The health check passes once the worker has loaded the model (higgs_runpod.container.health).
HEALTHCHECK --interval=30s --timeout=10s --start-period=15m --retries=3 \
    CMD ["python", "-m", "higgs_runpod.container.health"]
# Runs as root: RunPod mounts /runpod-volume owned by root, and the bootstrap and the model
# download must write there. Nothing secret is baked in; keys arrive as RunPod secrets.
CMD ["python", "-m", "higgs_runpod.container.bootstrap"]

FROM base AS full
# The whole pinned runtime at build time; the bootstrap then only checks and starts.
RUN uv pip install --system --require-hashes --no-deps --compile-bytecode \
        --requirement /app/requirements.lock
ENV RUNTIME_MODE=image

FROM base AS thin
ENV RUNTIME_MODE=volume

# syntax=docker/dockerfile:1
#
# qdserve container image: one uvicorn process serving one GPU (or the CPU).
#
# GPU image (default): CUDA runtime base + the CUDA build of torch from the PyTorch index.
#   docker build -t qdserve:cuda .
# Other CUDA/torch variants: change the base and the wheel index together, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-base-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 -t qdserve:cu126 .
# CPU image (runs the embedded model, no GPU needed):
#   docker build --build-arg BASE_IMAGE=ubuntu:24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t qdserve:cpu .
#
# Builder and runtime use the same BASE_IMAGE, so the virtual environment copied from one to
# the other finds the same /usr/bin/python3. Every setting is a QDS_* environment variable
# (see quantization/settings.py and service/settings.py); nothing secret is baked in: API keys
# come from QDS_API_KEYS at run time (a Kubernetes Secret, or the shell for compose).

ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04

########################################################################################
FROM ${BASE_IMAGE} AS builder

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Must match the torch pin in constraints.txt (the CUDA wheel is 2.13.0+cu128, which
# satisfies the constraint torch==2.13.0).
ARG TORCH_VERSION=2.13.0
# Extras installed into the image: gpu = bitsandbytes + nvidia-modelopt (both install on CPU
# too, so `qdserve backends` can say why they are unavailable there).
ARG EXTRAS=gpu

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Distribution packages follow the base image's release; pinning their exact Debian/Ubuntu
# revisions breaks the build on every security update of the base image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /src
# Dependency layer first (cached while only the source changes).
COPY constraints.txt ./
# Versions are pinned through the constraints file (pip's -c), which hadolint cannot see.
# hadolint ignore=DL3013
RUN pip install --upgrade pip \
    && pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY quantization ./quantization
COPY service ./service
RUN pip install -c constraints.txt ".[${EXTRAS}]" \
    && qdserve --help >/dev/null

########################################################################################
FROM ${BASE_IMAGE} AS runtime

ARG APP_UID=10001

# python3 only (the venv brings everything else). g++ is left out of the runtime: quanto's
# int4/int2 kernels compile a C++ extension on first use and need g++ + ninja (use
# quanto int8 or another backend, or build a derived image with g++).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid "$APP_UID" qds \
    && useradd --uid "$APP_UID" --gid qds --home-dir /home/qds --create-home --shell /usr/sbin/nologin qds \
    && mkdir -p /data/hf /data/qdserve \
    && chown -R qds:qds /data

COPY --from=builder /opt/venv /opt/venv

# HF_HOME on the /data volume: downloaded weights survive container restarts.
# QDS_CACHE_DIR: built / converted models (e.g. GGUF files) on the same volume.
# Compiler caches go to /tmp so the root filesystem can be mounted read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf \
    QDS_CACHE_DIR=/data/qdserve \
    QDS_HOST=0.0.0.0 \
    QDS_PORT=8000 \
    TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor \
    TRITON_CACHE_DIR=/tmp/triton \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    XDG_CACHE_HOME=/tmp/.cache

VOLUME ["/data"]
WORKDIR /home/qds
# Numeric ids so Kubernetes runAsNonRoot can verify them without /etc/passwd.
USER ${APP_UID}:${APP_UID}
EXPOSE 8000

# /healthz is "alive" (the model may still be loading; readiness is /readyz). No curl in the
# image: python's urllib does the request and exits non-zero on any error.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('QDS_PORT', '8000'), timeout=4)"]

ENTRYPOINT ["qdserve", "serve"]

# qdserve container image: one `qdserve serve` per GPU (or per CPU host).
#
# Build it with `make image` (CPU image qdserve:cpu) or deploy/image/build.sh cuda (GPU image
# qdserve:cuda): the script creates the local Debian base when missing and hands pip this
# machine's CA bundle and local wheel folder (docs/deploy.md, "The image"). By hand, where a
# registry is reachable:
#
#   docker build -t qdserve:cuda .                                  # GPU: Debian + PyPI's CUDA torch
#   docker build --build-arg TORCH_VERSION=2.13.0+cpu \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#                --build-arg EXTRAS= -t qdserve:cpu .               # CPU
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                -t qdserve:cu128 .                                 # GPU on NVIDIA's CUDA base
#
# Why Debian and not nvidia/cuda by default: torch's Linux wheels bring the CUDA runtime,
# cuBLAS, cuDNN and NCCL as nvidia-* wheels, so the image needs only the host driver, which the
# NVIDIA container toolkit mounts (docs/deploy.md has the measurements).
#
# No `# syntax=` line: BuildKit would fetch that frontend image from Docker Hub, and machines
# without a registry build with the legacy builder (DOCKER_BUILDKIT=0), which reads this too.
#
# Stages: `deps` (torch + every dependency; rebuilt only when pyproject.toml, constraints.txt or
# the pip inputs change), `app` (qdserve itself, a small wheel), `runtime` (python3, both copied
# in). All stages use the same BASE_IMAGE, so the copied virtual environment finds the same
# /usr/bin/python3. Steps are few and metadata comes before the large copies: Docker's vfs
# storage driver (the one that works on this project's machines) copies the whole file
# system for every step, so each step after a 2 GB layer costs a minute or more.
#
# Every setting is a QDS_* environment variable; nothing secret is baked in: API keys come
# from QDS_API_KEYS at run time.

ARG BASE_IMAGE=debian:bookworm-slim

########################################################################################
FROM ${BASE_IMAGE} AS python

# PIP_CONFIG_FILE: deploy/image/pip-inputs/ holds what build.sh copied from this machine's pip
# configuration (CA bundle, local wheel folder) or nothing, and pip ignores a missing file.
# Only the build stages see it: the runtime stage copies the venv and the app, nothing else.
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_PROGRESS_BAR=off \
    PIP_CONFIG_FILE=/tmp/pip-inputs/pip.conf \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# No compiler: every dependency ships wheels for the base's Python (3.11 on bookworm).
# Distribution packages follow the base image's release; pinning their exact revisions breaks
# the build on every security update of the base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"
COPY deploy/image/pip-inputs/ /tmp/pip-inputs/

########################################################################################
FROM python AS deps

# Empty: the Python registry's torch (on Linux x86_64 the CUDA build, its CUDA libraries as
# nvidia-* wheels). https://download.pytorch.org/whl/<cuXXX|cpu> picks another build.
ARG TORCH_INDEX_URL=
# Must match the torch pin in constraints.txt; a local label (2.13.0+cpu) still satisfies it.
ARG TORCH_VERSION=2.13.0
# gpu = bitsandbytes + nvidia-modelopt, which only work on an NVIDIA GPU. Empty for CPU images.
ARG EXTRAS=gpu

# The dependencies come from pyproject.toml alone (a stub project with empty packages), so
# editing the source or the README does not reinstall them. torch first and pinned, then the
# rest pinned through the constraints file (pip's -c, which hadolint cannot see). torch's C++
# headers stay: inductor's CPU kernels include them (QDS_COMPILE); its static archives go.
COPY pyproject.toml constraints.txt /tmp/stub/
# hadolint ignore=DL3013
RUN pip install --upgrade pip \
    && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
    && mkdir /tmp/stub/quantization /tmp/stub/pipelines /tmp/stub/engine /tmp/stub/service \
    && touch /tmp/stub/README.md \
    && pip install -c /tmp/stub/constraints.txt "/tmp/stub${EXTRAS:+[$EXTRAS]}" \
    && pip uninstall -y -q qdserve \
    && rm -rf /tmp/stub \
    && find "$VIRTUAL_ENV" -name '*.a' -delete

########################################################################################
FROM python AS app

# qdserve alone (no dependencies), installed under /app with the venv's paths, so the runtime
# lays it over the deps venv with one copy.
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY quantization ./quantization
COPY pipelines ./pipelines
COPY engine ./engine
COPY service ./service
RUN pip install --no-deps --root /app . \
    && test -x /app/opt/venv/bin/qdserve

########################################################################################
FROM ${BASE_IMAGE} AS runtime

ARG APP_UID=10001

# python3 (the venv brings everything else) and the smallest toolchain torch.compile needs:
# g++ for inductor's CPU kernels (and gcc for Triton's launchers in the GPU image), the Python
# headers for the bindings both build (Python.h; libpython's static archive dropped). Without
# them QDS_COMPILE=auto stays eager. quanto's int4/int2 kernels also want ninja (not here).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates g++ libpython3-dev \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
    && find /usr/lib/python3* -name 'libpython3*.a' -delete \
    && groupadd --gid "$APP_UID" qds \
    && useradd --uid "$APP_UID" --gid qds --home-dir /home/qds --create-home --shell /usr/sbin/nologin qds \
    && mkdir -p /data/hf /data/qdserve \
    && chown -R qds:qds /data

# HF_HOME on the /data volume: downloaded weights survive container restarts.
# QDS_CACHE_DIR: built / converted models (e.g. GGUF files) on the same volume, and the
# compile caches (inductor's and Triton's under QDS_CACHE_DIR/inductor and /triton, set by the
# engine when TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR are unset), so a restarted container
# does not compile again and `qdserve warmup` can fill them ahead of time.
# Other compiler caches go to /tmp so the root filesystem can be mounted read-only.
# NVIDIA_DRIVER_CAPABILITIES: the container toolkit mounts the driver's compute libraries (a
# CUDA base image sets this; this base does not). Which GPUs is the runtime's choice (--gpus,
# the Kubernetes device plugin), so NVIDIA_VISIBLE_DEVICES is left unset.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/data/hf \
    QDS_CACHE_DIR=/data/qdserve \
    QDS_HOST=0.0.0.0 \
    QDS_PORT=8000 \
    TORCH_EXTENSIONS_DIR=/tmp/torch_extensions \
    XDG_CACHE_HOME=/tmp/.cache \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

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

# Last, so that a source change costs one copy on top of the cached dependencies.
COPY --from=deps /opt/venv /opt/venv
COPY --from=app /app/opt/venv /opt/venv

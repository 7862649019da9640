#!/usr/bin/env bash
# Build qdserve's container image on a machine that reaches no image registry.
#
#   deploy/image/build.sh [cpu|cuda]        (`make image` runs the cpu variant)
#
#   cpu   qdserve:cpu   torch's CPU build, no GPU extras; runs the embedded model anywhere
#   cuda  qdserve:cuda  the registry's CUDA torch (CUDA libraries as nvidia-* wheels) + the
#                       gpu extras (bitsandbytes, nvidia-modelopt); needs the NVIDIA toolkit
#
# Steps, each skipped when already done: a Docker engine answers (deploy/image/engine.sh
# starts one as root when none does), the Debian base exists (deploy/image/base.sh), this
# machine's pip configuration is copied into the build context (deploy/image/pip_inputs.py),
# then `docker build`, whose layer cache makes a rebuild without changes take seconds.
#
# Environment overrides: IMAGE (tag), BASE_IMAGE (default qdserve-base:bookworm, built here;
# debian:bookworm-slim or nvidia/cuda:... where a registry is reachable), TORCH_INDEX_URL,
# TORCH_VERSION, EXTRAS, PYTHON (whose pip configuration is read), DOCKER_BUILDKIT (default
# 0: the legacy builder needs no buildx plugin and no frontend image from a registry).
set -euo pipefail
cd "$(dirname "$0")/../.."

variant=${1:-cpu}
base=${BASE_IMAGE:-qdserve-base:bookworm}
python=${PYTHON:-python3}
pin=$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' constraints.txt)
inputs=deploy/image/pip-inputs
case $variant in
  cpu)
    tag=${IMAGE:-qdserve:cpu}
    extras=${EXTRAS-}
    torch_version=${TORCH_VERSION:-$pin+cpu}
    wheels=()
    ;;
  cuda)
    tag=${IMAGE:-qdserve:cuda}
    extras=${EXTRAS-gpu}
    torch_version=${TORCH_VERSION:-$pin}
    wheels=(--no-wheels)
    ;;
  *)
    echo "usage: $0 [cpu|cuda]" >&2
    exit 2
    ;;
esac

t0=$SECONDS
echo "== image $tag: engine"
docker info >/dev/null 2>&1 || deploy/image/engine.sh
if [ "$base" = qdserve-base:bookworm ]; then
  echo "== image $tag: base $base"
  deploy/image/base.sh "$base"
fi
echo "== image $tag: pip inputs from this machine's pip configuration"
"$python" deploy/image/pip_inputs.py "$inputs" --python "$python" "${wheels[@]}"

if [ -z "${TORCH_INDEX_URL+set}" ]; then
  # A local wheel of that exact build comes through find-links; otherwise the CPU build
  # lives on PyTorch's index (the registry's Linux torch is the CUDA build).
  TORCH_INDEX_URL=
  if [ "$variant" = cpu ] && ! compgen -G "$inputs/wheels/torch-${torch_version}-*.whl" >/dev/null; then
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
  fi
fi

echo "== image $tag: docker build (BASE_IMAGE=$base torch==$torch_version${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} extras=[${extras}])"
t1=$SECONDS
DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0} docker build \
  --network host \
  --build-arg BASE_IMAGE="$base" \
  --build-arg TORCH_VERSION="$torch_version" \
  --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" \
  --build-arg EXTRAS="$extras" \
  --tag "$tag" \
  .
size=$(docker image inspect -f '{{.Size}}' "$tag")
echo "== image $tag: $((size / 1000000)) MB; docker build $((SECONDS - t1)) s, all steps $((SECONDS - t0)) s"

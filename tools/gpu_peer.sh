#!/usr/bin/env bash
# One prepared run on a lent GPU: the serving-core peer table (issue 11) on a Flux-dev-size
# denoiser at 1024x1024, then the engine's `gpu` tests with whatever time is left.
# Wheels travel in $WHL (default .whl: cp312 wheels of diffusers, fastapi, starlette, pydantic,
# pydantic-core, pydantic-settings, python-dotenv, uvicorn, litserve, pyzmq, python-multipart,
# annotated-types, typing-inspection, typing-extensions, opentelemetry-api, importlib-metadata,
# lazy-importer, zipp, gguf, optimum-quanto, sdnq, torchao). Results land in $OUT.
# Knobs (for a CPU dry run): SMALL=1 (two-block denoiser), SIZE, STEPS, LEVEL_SECONDS,
# BUDGET_S, SKIP_TESTS=1, OURS / PEERS (bench peer's --qdserve / --peers), QUALITY=1.
# (Not SECONDS: bash's own clock, which the budget reads.)
set -u
OUT=${OUT:-/tmp/qds-out}
WHL=${WHL:-.whl}
SIZE=${SIZE:-1024}
STEPS=${STEPS:-4}
LEVEL_SECONDS=${LEVEL_SECONDS:-20}
END=$((SECONDS + ${BUDGET_S:-560}))
mkdir -p "$OUT"
if [ -d "$WHL" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$WHL"/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 QDS_CACHE_DIR=/tmp/qdcache HF_HUB_OFFLINE=1
card=cpu
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv > "$OUT/card.txt"
  card=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z ' 'a-z-')
fi
python3 -c "import torch, diffusers, litserve; print('torch', torch.__version__, 'diffusers', \
diffusers.__version__, 'litserve', litserve.__version__)" >> "$OUT/card.txt" 2>&1
cat "$OUT/card.txt"
# tmpfs when it has room for the ~24 GB folder: both servers and the bench read it.
root=/tmp
[ "$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1)" -gt 40 ] 2>/dev/null && root=/dev/shm
model=$root/flux-dev-random
rm -rf "$model"
timeout 200 python3 -m benchmarks.gpu_pipeline --out "$model" ${SMALL:+--small} 2>&1 \
  | tail -1 | tee "$OUT/build.log"
df -h "$root" | tail -1
left=$((END - SECONDS - 90))
echo "peer: ${left}s left for it"
# Two servers by default (qdserve at its defaults, plain LitServe): three Flux-dev-size copies
# would not fit an 80 GB card. QUALITY=1 adds the quality rows (the demo prompt set through
# each server: minutes at 1024x1024).
quality=--no-quality
[ -n "${QUALITY:-}" ] && quality=
timeout "$left" python3 -m service.cli bench peer --model "$model" --size "$SIZE" \
  --steps "$STEPS" --tables defaults --rounds 1 --seconds "$LEVEL_SECONDS" \
  --qdserve "${OURS:-qdserve}" --peers "${PEERS:-litserve}" $quality \
  --direct-calls 3 --name "peer-$card" --out "$OUT" > "$OUT/peer.log" 2>&1
echo "peer exit $?"
grep -v -i -E "warn|deprecat|loading|it/s" "$OUT/peer.log" | tail -8
[ -f "$OUT/peer-$card.md" ] && sed -n '/^| server/,/^Start-up/p' "$OUT/peer-$card.md"
rm -rf "$model"
left=$((END - SECONDS))
if [ "$left" -gt 30 ] && [ -z "${SKIP_TESTS:-}" ]; then
  echo "gpu tests: ${left}s"
  timeout "$left" python3 -m pytest -m gpu -p no:cacheprovider -q -o addopts="" --timeout 120 \
    tests/backends/test_stepping.py tests/integration/test_engine_core.py \
    tests/backends/test_edits_pipeline.py > "$OUT/gpu_tests.log" 2>&1
  grep -E "passed|failed|Error|error" "$OUT/gpu_tests.log" | tail -15
fi
echo done

#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the `gpu` tests, then the GPU benchmark.
# Wheels travel in .whl (see docs/gpu.md); results land in $OUT.
set -u
OUT=${OUT:-/tmp/qds-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QDS_CACHE_DIR=/tmp/qdcache
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv > "$OUT/card.txt"
python3 -c "import torch, diffusers, bitsandbytes, torchao; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'bnb', bitsandbytes.__version__, 'torchao', torchao.__version__)" >> "$OUT/card.txt" 2>&1
cat "$OUT/card.txt"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -m gpu tests/test_loading.py tests/test_gpu_metrics.py \
  -p no:cacheprovider -q -s -o addopts="" --timeout 150 2>&1 | grep -v Warning | tee "$OUT/gpu_tests.log" | grep -E "GPU|GAUGE|passed|failed|Error|error" | head -60
timeout "${BENCH_TIMEOUT:-380}" python3 -m service.bench.gpu --out "$OUT/gpu_bench.json" \
  --budget-s "${BENCH_BUDGET:-320}" 2>&1 | grep -v -i warn | tee "$OUT/gpu_bench.log" | cut -c1-400
echo done

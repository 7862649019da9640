#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the `gpu` tests, then the GPU benchmark.
# Wheels travel in $WHL (default .whl: cp312 wheels of diffusers, bitsandbytes, torchao,
# gguf, optimum-quanto, nvidia-modelopt + pulp, pydantic-settings and their missing deps,
# fetched with `pip download --only-binary=:all: --python-version 3.12`); results land in $OUT
# and are copied into docs/benchmarks/gpu-*/ (rendered by `qdserve bench gpu-report`).
# Knobs: TESTS_K (pytest -k filter), BENCH_ARGS (extra args per arch run, ';'-separated runs),
# SPEEDUPS_TIMEOUT (seconds for issue 26's rows first: compile on CUDA, fp8 with compile, step
# caching on a Flux-dev-size denoiser, `benchmarks/gpu_speedups.py`; 0 skips them),
# SPEEDUPS_ARGS (e.g. "--tiny --size 64" for a CPU dry run), STAGES (default "speedups tests
# bench"). The three stages at their default timeouts (300 + 200 + 380 s) exceed one device call
# (600 s): run them as two calls, STAGES="speedups tests" then STAGES=bench.
set -u
STAGES=" ${STAGES:-speedups tests bench} "
OUT=${OUT:-/tmp/qds-out}
WHL=${WHL:-.whl}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site "$WHL"/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 QDS_CACHE_DIR=/tmp/qdcache
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv > "$OUT/card.txt"
python3 -c "import torch, diffusers, torchao; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'torchao', torchao.__version__)" >> "$OUT/card.txt" 2>&1
cat "$OUT/card.txt"
if [[ $STAGES == *" speedups "* ]] && [ "${SPEEDUPS_TIMEOUT:-300}" -gt 0 ]; then
  # shellcheck disable=SC2086
  timeout "${SPEEDUPS_TIMEOUT:-300}" python3 -m benchmarks.gpu_speedups --out "$OUT/speedups.json" \
    --budget-s $(( ${SPEEDUPS_TIMEOUT:-300} - 30 )) ${SPEEDUPS_ARGS:-} 2>&1 \
    | grep -v -i warn | tee "$OUT/speedups.log" | cut -c1-300
fi
[[ $STAGES == *" tests "* ]] && timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -m gpu tests/backends/test_loading.py tests/integration/test_gpu_metrics.py \
  ${TESTS_K:+-k "$TESTS_K"} -p no:cacheprovider -q -s -o addopts="" --timeout 150 2>&1 \
  | grep -v Warning | tee "$OUT/gpu_tests.log" | grep -E "GPU|GAUGE|passed|failed|Error" | head -60
i=0
IFS=';' read -ra RUNS <<< "${BENCH_ARGS:-}"
[ ${#RUNS[@]} -eq 0 ] && RUNS=("")
[[ $STAGES == *" bench "* ]] || RUNS=()
for args in "${RUNS[@]}"; do
  i=$((i+1))
  # shellcheck disable=SC2086
  timeout "${BENCH_TIMEOUT:-380}" python3 -m benchmarks.gpu --out "$OUT/gpu_bench_$i.json" \
    --budget-s "${BENCH_BUDGET:-320}" $args 2>&1 | grep -v -i -E "warn|MatMul8bitLt" \
    | tee "$OUT/gpu_bench_$i.log" | cut -c1-300
done
echo done

#!/usr/bin/env bash
# Run on the GPU machine from the repository root, with target/gpu-carry
# carried (scripts/gpu/build.sh). Results go to $OUT.
#   MODE=test   : tests only
#   MODE=bench  : benchmark only (TOKENS=8192,32768 by default)
#   MODE=all    : both (default)
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
MODE=${MODE:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
date -u | tee -a "$OUT/nvidia-smi.txt"
if [ "$MODE" != bench ]; then
  timeout 300 target/gpu-carry/gpu_decode --nocapture --test-threads 1 2>&1 | tee "$OUT/gpu_decode-tests.log"
fi
if [ "$MODE" != test ]; then
  timeout 420 target/gpu-carry/cachegen-gpu-bench --tokens "${TOKENS:-8192,32768}" --repeat "${REPEAT:-10}" --out "$OUT/gpu-bench.json" 2>&1 | tee "$OUT/gpu-bench.log"
fi
if [ "${TORCH:-1}" = 1 ] && [ "$MODE" != test ]; then
  timeout 240 python3 scripts/gpu/torch_baseline.py --tokens "${TOKENS:-8192,32768}" --out "$OUT/torch-baseline.json" 2>&1 | tee "$OUT/torch-baseline.log"
fi

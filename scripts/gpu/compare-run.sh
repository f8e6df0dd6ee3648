#!/usr/bin/env bash
# Before/after on one card in one run (GPU machine, repository root), with
# target/gpu-carry (new build, scripts/gpu/build.sh) and target/gpu-carry-old
# (the previous binaries plus the kernel source they were measured with,
# decode_head.cu) carried. Results go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
TOKENS=${TOKENS:-8192,32768}
REPEAT=${REPEAT:-5}
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.txt"
date -u | tee -a "$OUT/nvidia-smi.txt"
echo "== before (previous kernel)"
CACHEGEN_CUDA_SRC=target/gpu-carry-old/decode_head.cu timeout 200 target/gpu-carry-old/cachegen-gpu-bench --tokens "$TOKENS" --repeat "$REPEAT" --out "$OUT/before.json" 2>&1 | tee "$OUT/before.log"
echo "== after"
timeout 200 target/gpu-carry/cachegen-gpu-bench --tokens "$TOKENS" --repeat "$REPEAT" --out "$OUT/after.json" 2>&1 | tee "$OUT/after.log"
echo "== after, register cap 64 (8K only)"
CACHEGEN_NVRTC_OPTS="--maxrregcount=64" timeout 120 target/gpu-carry/cachegen-gpu-bench --tokens 8192 --repeat "$REPEAT" --out "$OUT/after-r64.json" 2>&1 | grep -E "tokens|error" | tee "$OUT/after-r64.log"
echo "== tests"
timeout 300 target/gpu-carry/gpu_decode --nocapture --test-threads 1 2>&1 | tee "$OUT/gpu_decode-tests.log"

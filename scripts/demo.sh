#!/usr/bin/env bash
# The demo: encode and decode the committed real KV fixture (SmolLM2-135M on
# Linux kernel documentation) at the default level, and report size, ratio
# and what the real model says about the decoded cache.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/model/setup_env.sh >/dev/null 2>&1 || scripts/model/setup_env.sh
cargo build --release --quiet
fixture=fixtures/smollm2-kernel-doc-320.safetensors
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
# The model's sensitivity profile (calibrated on other documents) sets per-layer steps.
./target/release/cachegen encode --profile profiles/smollm2-135m-instruct.json "$fixture" "$out/kv.cg"
./target/release/cachegen decode "$out/kv.cg" "$out/decoded.safetensors"
./target/release/cachegen inspect "$out/kv.cg" | .venv/bin/python -c '
import json, sys
i = json.load(sys.stdin)
print("stream: {total_bytes} bytes, {bits_per_element:.3f} bits/element, {ratio_vs_fp16:.2f}x smaller than fp16 "
      "(level {level_name}, {layers} layers x {tokens} tokens x {kv_heads} heads x {head_dim})".format(**i))'
echo "quality of the decoded KV (next-token distributions over the 127 following tokens):"
.venv/bin/python scripts/model/evaluate.py "$fixture" "$out/decoded.safetensors" 2>/dev/null | sed 's/^/  /'

#!/usr/bin/env bash
# The demo, on the committed real KV fixture (SmolLM2-135M on Linux kernel
# documentation):
#  1. the codec: encode and decode at the default level; size, ratio, and what
#     the real model says about the decoded cache;
#  2. the connector: the fixture laid out in vLLM-style paged blocks is stored
#     through memory, disk and Redis tiers, looked up and stream-loaded from a
#     fresh context into another layout, and checked against the codec.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/model/setup_env.sh >/dev/null 2>&1 || scripts/model/setup_env.sh
scripts/redis.sh >/dev/null
cargo build --release --quiet
fixture=fixtures/smollm2-kernel-doc-320.safetensors
out=$(mktemp -d)
redis_pid=""
cleanup() {
    [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
    rm -rf "$out"
}
trap cleanup EXIT

echo "== codec"
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

echo
echo "== connector: store, lookup and stream-load through memory, disk and Redis tiers"
port=$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$port" --save "" --appendonly no --dir "$out" >"$out/redis.log" 2>&1 &
redis_pid=$!
for _ in $(seq 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
rm -rf .cache/demo-tiers
./target/release/cachegen connector --input "$fixture" --redis "redis://127.0.0.1:$port"

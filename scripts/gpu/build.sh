#!/usr/bin/env bash
# Build the GPU benchmark and test binaries here (the GPU machine has no
# cargo) and copy stripped versions to target/gpu-carry/, which the device
# tool can carry: carry ["target/gpu-carry"] and run scripts/gpu/device-run.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --bin cachegen-gpu-bench
test_bin=$(cargo test --release --test gpu_decode --no-run 2>&1 | sed -n 's/.*Executable.*(\(target\/release\/deps\/gpu_decode-[0-9a-f]*\)).*/\1/p' | tail -1)
mkdir -p target/gpu-carry
cp target/release/cachegen-gpu-bench target/gpu-carry/
cp "$test_bin" target/gpu-carry/gpu_decode
strip target/gpu-carry/cachegen-gpu-bench target/gpu-carry/gpu_decode
ls -la target/gpu-carry

#!/usr/bin/env bash
# The whole test suite, exactly as CI runs it (.ci/run calls this script).
# Installs what it needs: the Python model harness (.venv, model and text
# under .cache/), pytest, the Python binding, redis-server (the tests start
# their own servers), a C toolchain, and cargo-fuzz for the fuzz smoke run.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n== %s\n' "$*"; }

step "model harness: venv, SmolLM2 (sha256-pinned) and kernel docs"
scripts/model/setup_env.sh
.venv/bin/pip install -q pytest==8.3.4
.venv/bin/pip install -q -e integrations/python

step "redis-server for the Redis tier and connector tests"
scripts/redis.sh

step "build"
cargo build --release

step "fuzz smoke run: the decoder on arbitrary bytes (${FUZZ_SECONDS:=60} s)"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
mkdir -p fuzz/corpus/decode
# Seeds: real streams of every level, cut to 4 layers x 16 tokens so that
# mutations run fast (the fixture's own streams are megabytes).
.venv/bin/python - <<'PY'
import sys; sys.path.insert(0, "scripts/model")
import kvfile
kv, meta, _ = kvfile.read_kv("fixtures/smollm2-kernel-doc-320.safetensors")
small = {k: v[:16] for k, v in kv.items() if int(k.split(".")[1]) < 4}
kvfile.write_kv("fuzz/corpus/seed-kv.safetensors", small, dtype="f16")
PY
for level in 1 2 3 4; do
    ./target/release/cachegen encode --level $level fuzz/corpus/seed-kv.safetensors fuzz/corpus/decode/seed-$level.cg 2>/dev/null
done
# cargo-fuzz needs nightly flags (sanitizers); RUSTC_BOOTSTRAP lets the stable toolchain take them.
(cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run decode corpus/decode -- -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -max_len=262144)

step "harness self-checks (model output: self, f16/bf16 rounding, noise)"
.venv/bin/python scripts/model/sanity_check.py

step "Rust tests"
cargo test --release

step "C/C++ ABI tests (ASan, LSan, UBSan)"
CACHEGEN_SKIP_BUILD=1 scripts/c_tests.sh

step "Python: the ctypes binding, and the CLI end to end judged by the model"
.venv/bin/python -m pytest -q tests/python --ignore-glob='*/test_vllm_*'

step "vLLM connector through vLLM 0.33.0's factory, scheduler and worker hooks (CPU)"
scripts/vllm_env.sh
.cache/vllm-venv/bin/python -m pytest -q tests/python/test_vllm_connector.py

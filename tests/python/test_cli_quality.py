"""End-to-end tests of the `cachegen` CLI on the committed real KV fixture, judged by the
real model (SmolLM2-135M through scripts/model): sizes, exactness, quality, and errors.

Run by scripts/test.sh after `cargo build --release` and scripts/model/setup_env.sh."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts/model"))
import evaluate as ev  # noqa: E402
import kvfile  # noqa: E402

CLI = REPO / "target/release/cachegen"
FIXTURE = REPO / "fixtures/smollm2-kernel-doc-320.safetensors"
PROFILE = REPO / "profiles/smollm2-135m-instruct.json"

# Regression guards for each level on the fixture with the model's profile
# (measured values are in docs/BENCHMARKS.md; these bounds leave room for
# noise, not for regressions of a different order).
# (min ratio vs fp16 counting every byte, max KL nats/token, min top-1)
LEVELS = {
    "compact": (6.0, 0.04, 0.85),
    "default": (3.7, 0.006, 0.92),
    "high": (2.6, 0.0012, 0.97),
}


def run(*args, check=True):
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, check=check)


@pytest.fixture(scope="module")
def reference():
    kv, meta, _ = kvfile.read_kv(FIXTURE)
    return kv, *ev.tokens_from_metadata(meta, FIXTURE)


def round_trip(tmp_path, level, profile=True):
    cg, out = tmp_path / f"{level}-{profile}.cg", tmp_path / f"{level}-{profile}.safetensors"
    run("encode", "--level", level, *(["--profile", PROFILE] if profile else []), FIXTURE, cg)
    run("decode", cg, out)
    return cg, out


@pytest.mark.parametrize("level", LEVELS)
def test_lossy_level_size_and_quality(tmp_path, reference, level):
    min_ratio, max_kl, min_top1 = LEVELS[level]
    kv, ctx, evals = reference
    cg, out = round_trip(tmp_path, level)
    ratio = 2 * sum(t.size for t in kv.values()) / cg.stat().st_size
    assert ratio >= min_ratio, f"{level}: {ratio:.2f}x"
    cand, _, dtype = kvfile.read_kv(out)
    assert dtype == "f16"
    r = ev.evaluate(kv, cand, ctx, evals)
    assert r["kl_mean"] <= max_kl and r["top1_agreement"] >= min_top1, r
    assert r["kl_mean"] > 0  # lossy really is lossy: the evaluator sees it


def test_levels_trade_size_for_quality(tmp_path, reference):
    kv, ctx, evals = reference
    sizes, kls = [], []
    for level in ["compact", "default", "high"]:
        cg, out = round_trip(tmp_path, level)
        sizes.append(cg.stat().st_size)
        kls.append(ev.evaluate(kv, kvfile.read_kv(out)[0], ctx, evals)["kl_mean"])
    assert sizes[0] < sizes[1] < sizes[2], sizes
    assert kls[0] > kls[1] > kls[2], kls


def test_profile_lowers_kl_at_about_the_same_size(tmp_path, reference):
    # The profile was calibrated on other documents; this text is held out.
    kv, ctx, evals = reference
    with_cg, with_out = round_trip(tmp_path, "default", profile=True)
    without_cg, without_out = round_trip(tmp_path, "default", profile=False)
    assert abs(with_cg.stat().st_size / without_cg.stat().st_size - 1) < 0.05
    kl_with = ev.evaluate(kv, kvfile.read_kv(with_out)[0], ctx, evals)["kl_mean"]
    kl_without = ev.evaluate(kv, kvfile.read_kv(without_out)[0], ctx, evals)["kl_mean"]
    assert kl_with < 0.6 * kl_without, (kl_with, kl_without)


def test_profile_must_match_the_model(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"key": [1.0] * 3, "value": [1.0] * 3}))
    r = run("encode", "--profile", bad, FIXTURE, tmp_path / "x.cg", check=False)
    assert r.returncode != 0 and "30 layers" in r.stderr


def test_lossless_is_bit_exact(tmp_path):
    _, out = round_trip(tmp_path, "lossless")
    # Same tensors byte for byte (the header may differ: metadata is not carried).
    a, _, _ = kvfile.read_kv(FIXTURE)
    b, _, _ = kvfile.read_kv(out)
    assert all((a[k].view("u4") == b[k].view("u4")).all() for k in a)


def test_inspect_reports_the_container(tmp_path):
    cg, _ = round_trip(tmp_path, "default")
    info = json.loads(run("inspect", cg).stdout)
    assert info["layers"] == 30 and info["tokens"] == 320 and info["kv_heads"] == 3 and info["head_dim"] == 64
    assert info["level_name"] == "default" and info["tables"] == "embedded"
    assert info["total_bytes"] == cg.stat().st_size == sum(info["bytes"].values()) - info["bytes"]["total"]
    # The attention-sink token of this text is stored exactly.
    assert info["exact_tokens"] == [0]


def test_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "bad.cg"
    r = run("decode", tmp_path / "missing.cg", tmp_path / "x.safetensors", check=False)
    assert r.returncode != 0 and r.stderr.count("\n") == 1 and "cannot read" in r.stderr
    cg, _ = round_trip(tmp_path, "default")
    data = bytearray(cg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    r = run("decode", bad, tmp_path / "x.safetensors", check=False)
    assert r.returncode != 0 and "checksum" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "x.safetensors").exists()
    # Wrong tensor names: a safetensors file that is not a KV cache.
    wrong = tmp_path / "wrong.safetensors"
    header = json.dumps({"foo": {"dtype": "F16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    wrong.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    r = run("encode", wrong, tmp_path / "w.cg", check=False)
    assert r.returncode != 0 and "layers." in r.stderr and r.stderr.count("\n") == 1
    r = run("encode", "--level", "9", FIXTURE, tmp_path / "w.cg", check=False)
    assert r.returncode != 0 and "unknown level" in r.stderr

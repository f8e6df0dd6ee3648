#!/usr/bin/env python3
"""Sanity checks of the evaluation harness on the committed fixture (a few seconds each).

    .venv/bin/python scripts/model/sanity_check.py [FIXTURE]

1. fixture vs itself through the CLI file path: KL exactly 0, top1 1, ppl increase 0;
2. f32 re-export of the same context vs its f16 and bf16 roundings: tiny KL;
3. fixture vs fixture + gaussian noise (10% of each tensor's std): KL clearly > 0.
Also checks that f16/bf16/f32 files written by kvfile (by hand, see kvfile.write_kv) read
back bit-exactly and that the safetensors library itself parses them.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate  # noqa: E402
import kvfile  # noqa: E402
import smollm2  # noqa: E402

DEFAULT_FIXTURE = smollm2.REPO / "fixtures" / "smollm2-kernel-doc-320.safetensors"


def show(label, r):
    print(f"{label:<28} kl_mean {r['kl_mean']:.3e}  kl_max {r['kl_max']:.3e}  top1 {r['top1_agreement']:.4f}  "
          f"ppl {r['ppl_ref']:.3f} -> {r['ppl_cand']:.3f} ({r['ppl_increase_pct']:+.4f}%)")
    return r


def main():
    fixture = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_FIXTURE
    ref, meta, _ = kvfile.read_kv(fixture)
    context, evals = evaluate.tokens_from_metadata(meta, fixture)
    model = smollm2.get_model()

    t0 = time.time()
    r = show("self", evaluate.evaluate(ref, ref, context, evals, model))
    print(f"  (one evaluation: {time.time() - t0:.1f} s)")
    assert r["kl_max"] == 0 and r["top1_agreement"] == 1 and r["ppl_increase_pct"] == 0

    # The fixture is f16; recompute the exact f32 KV for the same tokens.
    t0 = time.time()
    _, kv32 = model.forward(context, logits=None)
    print(f"  ({len(context)}-token context forward: {time.time() - t0:.1f} s)")
    kv32 = kvfile.kv_dict(kv32)
    # Exact on the machine that made the fixture; elsewhere BLAS rounding may flip an f16 ulp.
    assert all(np.allclose(kv32[n], ref[n], rtol=2e-3, atol=1e-3) for n in ref), \
        "fixture does not match a fresh forward pass (different GGUF?)"

    with tempfile.TemporaryDirectory() as tmp:
        for dtype in kvfile.DTYPES:
            path = Path(tmp) / f"kv-{dtype}.safetensors"
            kvfile.write_kv(path, kv32, dtype, meta)
            back, back_meta, back_dtype = kvfile.read_kv(path)
            assert back_dtype == dtype and back_meta == meta
            assert all(np.array_equal(back[n], kvfile.round_to(kv32[n], dtype)) for n in kv32)
            with safe_open(str(path), "np") as f:   # the reference parser accepts our files
                assert f.metadata() == meta and len(list(f.keys())) == len(kv32)
                if dtype != "bf16":                # safetensors.numpy has no bfloat16
                    assert all(np.array_equal(f.get_tensor(n).astype(np.float32), back[n]) for n in kv32)
        print("  (f16/bf16/f32 files round-trip exactly and parse with safetensors)")

    show("f16 vs f32", evaluate.evaluate(kv32, ref, context, evals, model))
    bf16 = {n: kvfile.round_to(a, "bf16") for n, a in kv32.items()}
    show("bf16 vs f32", evaluate.evaluate(kv32, bf16, context, evals, model))

    rng = np.random.default_rng(0)
    noisy = {n: a + rng.normal(0, 0.1 * a.std(), a.shape).astype(np.float32) for n, a in ref.items()}
    r = show("gaussian noise 10% std", evaluate.evaluate(ref, noisy, context, evals, model))
    assert r["kl_mean"] > 1e-3
    print(json.dumps({"ok": True}))


if __name__ == "__main__":
    main()

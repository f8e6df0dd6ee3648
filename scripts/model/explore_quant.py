#!/usr/bin/env python3
"""Explore quantization recipes for the codec: entropy (bits/element, per-(K/V, layer, channel)
tables) against model quality (KL, top-1, perplexity), on real KV files.

    .venv/bin/python scripts/model/explore_quant.py [FILES...]

The step-size recipes here are what src/codec/levels.rs implements; this is how its constants
were chosen (docs/BENCHMARKS.md, "Choosing the levels"). Entropy is the empirical entropy of each
(K/V, layer, channel) symbol stream, so it excludes table and scale overhead.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # noqa: E402
import kvfile  # noqa: E402
import smollm2  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def entropy_bits(sym):
    """Sum over channels of the empirical entropy of sym[:, c] (sym: [T, C] ints), in bits."""
    t = sym.shape[0]
    bits = 0.0
    for c in range(sym.shape[1]):
        _, counts = np.unique(sym[:, c], return_counts=True)
        p = counts / t
        bits += -(counts * np.log2(p)).sum()
    return bits


def quantize(x, step):
    """Uniform quantizer with the given step (broadcast); returns symbols and reconstruction."""
    s = np.rint(x / step)
    return s, s * step


def recipe(kv, alpha_k, alpha_v, early=0, early_scale=1.0, key_group="layer", value_group="layer"):
    """Step = alpha * RMS of the group. Groups: 'layer' (whole tensor), 'head', 'channel' (over tokens),
    'token' (over channels). Early layers (< early) get early_scale * step."""
    out, bits, n = {}, 0.0, 0
    layers = len(kv) // 2
    for name, x in kv.items():
        layer = int(name.split(".")[1])
        is_key = name.endswith("key")
        alpha = alpha_k if is_key else alpha_v
        group = key_group if is_key else value_group
        t, h, d = x.shape
        if group == "layer":
            rms = np.sqrt(np.mean(x * x))
        elif group == "head":
            rms = np.sqrt(np.mean(x * x, axis=(0, 2), keepdims=True))
        elif group == "channel":
            rms = np.sqrt(np.mean(x * x, axis=0, keepdims=True))
        elif group == "token":
            rms = np.sqrt(np.mean(x * x, axis=(1, 2), keepdims=True))
        step = alpha * rms * (early_scale if layer < early else 1.0)
        step = np.maximum(step, np.abs(x).max(axis=0, keepdims=True) / 127.0) if group in ("layer", "head") else step
        s, y = quantize(x, step)
        out[name] = y.astype(np.float32)
        bits += entropy_bits(s.reshape(t, h * d))
        n += x.size
    return out, bits / n


def main():
    files = [Path(f) for f in sys.argv[1:]] or [REPO / "fixtures/smollm2-kernel-doc-320.safetensors"]
    model = smollm2.get_model()
    configs = []
    for a in [0.25, 0.35, 0.5, 0.7, 1.0]:
        configs.append((f"layer a={a}", dict(alpha_k=a, alpha_v=a)))
    for a in [0.35, 0.5, 0.7]:
        configs.append((f"k-channel v-layer a={a}", dict(alpha_k=a, alpha_v=a, key_group="channel")))
        configs.append((f"k-head v-token a={a}", dict(alpha_k=a, alpha_v=a, key_group="head", value_group="token")))
    for f in files:
        kv, meta, _ = kvfile.read_kv(f)
        ctx, evals = ev.tokens_from_metadata(meta, f)
        print(f"# {f.name}")
        print(f"{'recipe':34s} {'bits':>6s} {'kl_mean':>9s} {'top1':>6s} {'ppl%':>7s}")
        for label, cfg in configs:
            cand, bits = recipe(kv, **cfg)
            r = ev.evaluate(kv, cand, ctx, evals, model)
            print(f"{label:34s} {bits:6.3f} {r['kl_mean']:9.5f} {r['top1_agreement']:6.3f} {r['ppl_increase_pct']:7.2f}", flush=True)


if __name__ == "__main__":
    main()

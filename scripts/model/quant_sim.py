#!/usr/bin/env python3
"""Quick numpy simulation of KV quantization schemes, scored with evaluate.evaluate().

    .venv/bin/python scripts/model/quant_sim.py [KV.safetensors ...] [--json]

Each scheme maps a KV dict {"layers.{i}.key"/"value": [T, H, D]} to (dequantized KV dict,
integer symbols per tensor, number of scale values).  Symbols use the CacheGen/LMCache
convention: MAX = bins//2 - 1, sym = round_half_even(x * MAX / absmax + MAX) in 0..2*MAX,
x' = (sym - MAX) / MAX * absmax.

bits/element is the empirical order-0 entropy of the symbols: for every (tensor, channel)
the entropy of that channel's symbols over tokens, summed and divided by the element count,
i.e. roughly what a per-channel adaptive arithmetic coder would reach.  Scales are not in
it; `scale_bits` is their cost at 16 bits each, per element.

To try another scheme, write a function like the ones below and add it to SCHEMES.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate  # noqa: E402
import kvfile  # noqa: E402
import smollm2  # noqa: E402

DEFAULT_FIXTURE = smollm2.REPO / "fixtures" / "smollm2-kernel-doc-320.safetensors"

# Bins per layer group as ((first_layer, bins), ...), sorted by first_layer.
LMCACHE_KEY_BINS = ((0, 32), (10, 16))
LMCACHE_VALUE_BINS = ((0, 32), (2, 16))


def bins_for(groups, layer):
    return [bins for first, bins in groups if layer >= first][-1]


def quantize(x, absmax, bins):
    """Symmetric quantization of x with a broadcastable absmax -> (symbols, dequantized)."""
    mx = bins // 2 - 1
    scale = np.where(absmax > 0, absmax, 1).astype(np.float32)
    sym = np.clip(np.round(x * (mx / scale) + mx), 0, 2 * mx)    # np.round: half to even
    return sym.astype(np.int32), ((sym - mx) / mx * scale).astype(np.float32)


def per_token_absmax(x):      # [T, H, D] -> [T, 1, 1]: one scale per (layer, token), all heads
    return np.abs(x).max(axis=(1, 2), keepdims=True)


def per_channel_absmax(x):    # [T, H, D] -> [1, H, D]: one scale per (layer, channel), over tokens
    return np.abs(x).max(axis=0, keepdims=True)


def _apply(kv, pick):
    """Run pick(kind, layer) -> (absmax function, bins) over every tensor of kv."""
    deq, syms, n_scales = {}, {}, 0
    for name in kvfile.sorted_names(kv):
        _, layer, kind = name.split(".")
        absmax_fn, bins = pick(kind, int(layer))
        absmax = absmax_fn(kv[name])
        syms[name], deq[name] = quantize(kv[name], absmax, bins)
        n_scales += absmax.size
    return deq, syms, n_scales


def lmcache(kv):
    """(a) LMCache CacheGen: per-(layer, token) absmax; keys 32 bins in layers < 10 else 16,
    values 32 bins in layers < 2 else 16."""
    return _apply(kv, lambda kind, layer: (
        per_token_absmax, bins_for(LMCACHE_KEY_BINS if kind == "key" else LMCACHE_VALUE_BINS, layer)))


def channel_keys(kv, key_bins=LMCACHE_KEY_BINS, value_bins=LMCACHE_VALUE_BINS):
    """(b) keys: per-channel absmax over tokens; values: per-token absmax; bins per layer group."""
    return _apply(kv, lambda kind, layer: (
        (per_channel_absmax, bins_for(key_bins, layer)) if kind == "key"
        else (per_token_absmax, bins_for(value_bins, layer))))


def int8_per_token(kv):
    """(c) int8 (256 bins -> MAX 127, symbols 0..254) with per-(layer, token) absmax."""
    return _apply(kv, lambda kind, layer: (per_token_absmax, 256))


SCHEMES = {
    "lmcache": lmcache,
    "channel-keys": channel_keys,
    "int8-per-token": int8_per_token,
}


def entropy_bits_per_element(syms):
    """Sum over (tensor, channel) of the channel's empirical symbol entropy over tokens, / elements."""
    total_bits, elements = 0.0, 0
    for s in syms.values():
        s = s.reshape(s.shape[0], -1)                  # [T, channels]
        T, C = s.shape
        nsym = int(s.max()) + 1
        counts = np.bincount((s + np.arange(C) * nsym).ravel(), minlength=C * nsym).reshape(C, nsym)
        p = counts / T
        with np.errstate(divide="ignore", invalid="ignore"):
            h = -np.nansum(p * np.log2(p), axis=1)     # bits per symbol, per channel
        total_bits += h.sum() * T
        elements += s.size
    return total_bits / elements


def run(path, schemes=SCHEMES):
    """Rows of {scheme, bits, scale_bits, kl_mean, ...} for one reference KV file."""
    ref, meta, _ = kvfile.read_kv(path)
    context, evals = evaluate.tokens_from_metadata(meta, path)
    rows = []
    for name, scheme in schemes.items():
        deq, syms, n_scales = scheme(ref)
        elements = sum(a.size for a in ref.values())
        metrics = evaluate.evaluate(ref, deq, context, evals)
        rows.append({"file": str(path), "scheme": name, "bits": entropy_bits_per_element(syms),
                     "scale_bits": 16.0 * n_scales / elements, **metrics})
        smollm2.log(f"{path.name}: {name} done")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, default=[DEFAULT_FIXTURE])
    ap.add_argument("--json", action="store_true", help="print one JSON object per row")
    args = ap.parse_args()
    try:
        rows = [row for path in args.files for row in run(path)]
    except (kvfile.KVFileError, ValueError) as e:
        sys.exit(f"quant_sim.py: error: {e}")
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return
    w = max(len(Path(r["file"]).name) for r in rows)
    print(f"{'file':<{w}} {'scheme':<16} {'bits/el':>7} {'+scales':>7} {'kl_mean':>10} {'kl_max':>9} "
          f"{'top1':>6} {'ppl +%':>8}")
    for r in rows:
        print(f"{Path(r['file']).name:<{w}} {r['scheme']:<16} {r['bits']:7.3f} {r['scale_bits']:7.3f} "
              f"{r['kl_mean']:10.3e} {r['kl_max']:9.3e} {r['top1_agreement']:6.3f} {r['ppl_increase_pct']:+8.3f}")


if __name__ == "__main__":
    main()

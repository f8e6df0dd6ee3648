#!/usr/bin/env python3
"""Does a per-channel step, weighted by how much each channel's error reaches the model's output,
beat the codec's one step per (K/V, layer) tensor at equal model quality?

    .venv/bin/python scripts/model/explore_channel_weights.py [--alphas ...] [--betas ...]

Why it might: a key channel's quantization error reaches the attention logits multiplied by the
query's value in that channel (logit error = sum_d q_d dk_d / sqrt(D)), and post-RoPE queries put
most of their energy in a few channels; a value channel's error reaches the residual stream through
its columns of the output projection W_o. For independent errors of variance step_d^2 / 12 the
expected squared output error is sum_d w_d step_d^2 with
    keys:   w_d = sum over the query heads j of the KV head of E[q_{j,d}^2]   (calibration text)
    values: w_d = sum over the query heads j of the KV head of ||W_o[:, j*D + d]||^2   (weights)
and at equal rate the weighted error is smallest with step_d ~ w_d^(-beta), beta = 1/2 (reverse
water-filling at high rate). Per-channel steps are the format's per-channel scale group (code 3):
one bf16 per channel per plane, counted here as 16 bits x channels per tensor.

The simulation is calibrate_profile.py's quantizer (protected tokens, the per-layer profile, the
bf16 step rounded up, the absmax/127 floor, entropy per (tensor, channel)); only the step differs.
Query statistics come from the calibration files, never from the held-out ones.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import calibrate_profile as cp  # noqa: E402
import kvfile  # noqa: E402
import smollm2  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def query_energy(model, paths):
    """E[q^2] per (layer, query head, dim) over the context tokens of the files (post-RoPE)."""
    c = model.config
    acc = np.zeros((c.n_layer, c.n_head, c.head_dim))
    n = 0
    calls = []
    orig = model._apply_rope

    def hook(x, cos, sin):
        y = orig(x, cos, sin)
        calls.append(y)
        return y

    model._apply_rope = hook
    try:
        for p in paths:
            kv, meta, _ = kvfile.read_kv(REPO / p)
            ctx, _ = cp.ev.tokens_from_metadata(meta, p)
            calls.clear()
            model.forward(ctx, logits=None)
            for layer in range(c.n_layer):
                q = calls[2 * layer].astype(np.float64)        # [T, n_head, D]; calls alternate q, k
                acc[layer] += (q * q).sum(0)
            n += len(ctx)
    finally:
        model._apply_rope = orig
    return acc / n


def channel_weights(model, qe):
    """{tensor name: w [kv_heads * D]} as in the module doc."""
    c = model.config
    group = c.n_head // c.n_kv_head
    out = {}
    for layer in range(c.n_layer):
        wo = model.layers[layer]["wo"]                          # [n_head * D, hidden]: x @ wo
        col = (wo.astype(np.float64) ** 2).sum(1).reshape(c.n_head, c.head_dim)
        wk = qe[layer].reshape(c.n_kv_head, group, c.head_dim).sum(1)
        wv = col.reshape(c.n_kv_head, group, c.head_dim).sum(1)
        out[f"layers.{layer}.key"] = wk.ravel()
        out[f"layers.{layer}.value"] = wv.ravel()
    return out


def multipliers(w, beta, clamp):
    """r_d = (w_d / geomean(w))^-beta, clamped to [1/clamp, clamp]."""
    lw = np.log(np.maximum(w, 1e-30))
    return np.exp(np.clip(-beta * (lw - lw.mean()), -np.log(clamp), np.log(clamp)))


def quantize_tensor_channels(x, alpha_eff, keep, r):
    """calibrate_profile.quantize_tensor with step_d = bf16_round_up(max(alpha * r_d * rms,
    absmax_d / 127)) per channel; + 16 bits per channel for the stored steps."""
    t = x.shape[0]
    flat = x.reshape(t, -1).astype(np.float32)
    sel = flat[keep]
    out = flat.copy()
    rms = np.float32(np.sqrt(np.mean(sel.astype(np.float64) ** 2)))
    if sel.size == 0 or rms == 0:
        out[keep] = 0.0
        return out.reshape(x.shape), 0.0
    absmax = np.abs(sel).max(0)
    step = cp.bf16_round_up(np.maximum(np.float32(alpha_eff) * rms * r.astype(np.float32),
                                       absmax / np.float32(127.0)))
    sym = np.rint(sel / step)
    out[keep] = (sym * step).astype(np.float32)
    return out.reshape(x.shape), cp.entropy_bits(sym) + 16.0 * flat.shape[1]


def quantize_kv_channels(kv, alpha, mult, rmult, protect, streams):
    """cp.quantize_kv with per-channel steps for the tensors of the given streams ('key', 'value')."""
    names = kvfile.sorted_names(kv)
    t = kv[names[0]].shape[0]
    keep = np.ones(t, bool)
    keep[protect] = False
    out, bits, elems = {}, 0.0, 0
    for n in names:
        x = kv[n]
        elems += x.size
        a = alpha * mult[n]
        if n.split(".")[2] in streams:
            y, b = quantize_tensor_channels(x, a, keep, rmult[n])
        else:
            y, b, _, _ = cp.quantize_tensor(x, a, keep)
        out[n] = kvfile.round_to(y, "f16")
        bits += b + 16.0 * len(protect) * x[0].size
    return out, bits / elems


def bits_at_kl(points, kl_target):
    """Bits at a KL, log-KL interpolated along (bits, kl) points; None outside their range."""
    pts = sorted(points, key=lambda p: p[1])
    kls = np.log([p[1] for p in pts])
    bs = [p[0] for p in pts]
    if not kls[0] <= np.log(kl_target) <= kls[-1]:
        return None
    return float(np.interp(np.log(kl_target), kls, bs))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--alphas", default="0.06,0.1,0.15,0.22,0.3,0.45,0.6,0.8")
    ap.add_argument("--betas", default="0.5")
    ap.add_argument("--clamp", type=float, default=8.0)
    ap.add_argument("--streams", default="key;value;key,value",
                    help="';'-separated sets of streams given per-channel steps")
    ap.add_argument("--heldout-tokens", type=int, default=None)
    ap.add_argument("--json", type=Path, help="write all points here")
    args = ap.parse_args()
    model = smollm2.get_model()
    layers = model.config.n_layer
    prof = json.loads((REPO / "profiles/smollm2-135m-instruct.json").read_text())
    mult = {f"layers.{l}.{s}": prof[s][l] for s in ("key", "value") for l in range(layers)}
    qe = query_energy(model, cp.CALIB)
    w = channel_weights(model, qe)
    for s in ("key", "value"):
        spread = [np.log2(w[f"layers.{l}.{s}"].max() / np.median(w[f"layers.{l}.{s}"])) for l in range(layers)]
        smollm2.log(f"{s}: log2(max / median channel weight) per layer: median {np.median(spread):.1f}, "
                    f"max {max(spread):.1f}")
    held = [cp.Sample(p, args.heldout_tokens if "1024" in p else None, model) for p in cp.HELDOUT]
    alphas = [float(a) for a in args.alphas.split(",")]
    schemes = [("per-tensor (current)", None, ())]
    for beta in (float(b) for b in args.betas.split(",")):
        rm = {n: multipliers(v, beta, args.clamp) for n, v in w.items()}
        for streams in args.streams.split(";"):
            schemes.append((f"per-channel {streams} beta={beta}", rm, tuple(streams.split(","))))
    points = {}
    for label, rm, streams in schemes:
        points[label] = []
        for a in alphas:
            rows = []
            for s in held:
                if rm is None:
                    cand, bits, _ = cp.quantize_kv(s.kv, a, mult, protect=s.prot)
                else:
                    cand, bits = quantize_kv_channels(s.kv, a, mult, rm, s.prot, streams)
                r = s.metrics(cand)
                rows.append((bits, r["kl"], r["top1"], r["ppl_pct"]))
            m = np.array(rows).mean(0)
            points[label].append((a, *m.tolist(), rows))
            print(f"{label:34s} a={a:5.3f} bits {m[0]:6.3f} kl {m[1]:.2e} top1 {m[2]:.3f} ppl {m[3]:+.2f}%   "
                  + "  ".join(f"{x[0]:.3f}/{x[1]:.1e}" for x in rows), flush=True)
    print(f"\n## mean bits/element at equal mean KL over {', '.join(s.label for s in held)}")
    targets = (5e-4, 3e-3, 2e-2)
    print(f"{'scheme':34s} " + " ".join(f"{'KL ' + format(t, 'g'):>10s}" for t in targets))
    for label, pts in points.items():
        bk = [bits_at_kl([(p[1], p[2]) for p in pts], t) for t in targets]
        print(f"{label:34s} " + " ".join(f"{b:10.3f}" if b else f"{'-':>10s}" for b in bk))
    if args.json:
        args.json.write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()

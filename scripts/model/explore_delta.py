#!/usr/bin/env python3
"""Does CacheGen's anchor/delta coding across tokens (SIGCOMM'24 sec. 5.2) help the codec?

    .venv/bin/python scripts/model/explore_delta.py [FILES...] [--alphas 0.22,0.59] [--groups 2,4,10]

Quantizer = the codec's RMS-step quantizer exactly as calibrate_profile.py simulates it
(protected tokens stored exactly; per (layer, K/V) tensor over the other tokens step =
bf16_round_up(max(alpha * m * rms, absmax / 127)), m from profiles/smollm2-135m-instruct.json).
Every variant uses the same step on the same tokens, so the reconstruction error is the same
(|x - xhat| <= step / 2; checked); only the symbols that get entropy-coded differ:

  direct   symbol = rint(x_t / step)                                  1 table set per (tensor, channel)
  anchorG  groups of G consecutive (unprotected) tokens; anchor = first token of the group,
           symbol rint(x_a / step); others: rint((x_t - xhat_a) / step), xhat_a = anchor's
           reconstruction (closed loop)                               2 table sets (anchor, delta)
  best/ch  oracle choice of direct or dpcm per (tensor, channel) (choice flag not charged)
  dpcm     first token direct (charged 8 bits/element, it is 1 symbol per channel), then
           rint((x_t - xhat_{t-1}) / step), closed loop              1 table set (delta)

Groups run over the unprotected tokens in order (protected tokens are removed first).

Columns (bits per unprotected element, tables excluded):
  ent   sum over (tensor, channel, kind) of the empirical entropy of the symbol stream;
  kt    the same streams coded by an adaptive Krichevsky-Trofimov model over the stream's own
        alphabet (sequential code length: entropy + a learning cost ~ (k-1)/2 log2 n per
        stream), i.e. a fair stand-in for "entropy + table cost": empirical entropy of a short
        stream (anchors: T/G symbols per channel) is biased low.
  +prot the codec's whole-chunk figure: ent, plus 16 bits per protected element, over all elements.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kvfile  # noqa: E402
from calibrate_profile import protected_tokens, quantize_tensor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FILES = ["fixtures/smollm2-kernel-doc-320.safetensors",
         ".cache/kv-eval/00-admin-guide-cifs-usage-1024.safetensors"]
PROFILE = REPO / "profiles/smollm2-135m-instruct.json"

_LG = np.array([math.lgamma(j / 2) if j else 0.0 for j in range(2 * 4096)])  # _LG[j] = lnGamma(j/2)


def stream_costs(sym, per_column=False):
    """sym [n, C] ints -> (empirical entropy bits, KT adaptive code length bits), summed over
    columns (per_column: arrays [C] instead)."""
    n, c = sym.shape
    s = sym.astype(np.int64)
    s -= s.min()
    k = int(s.max()) + 1
    counts = np.bincount((s + k * np.arange(c)).ravel(), minlength=k * c).reshape(c, k)
    nz = counts > 0
    cf = counts.astype(np.float64)
    ent = -np.where(nz, cf * np.log2(np.maximum(cf, 1) / n), 0.0).sum(1)
    # KT: -ln P = lnG(n + a/2) + a lnG(1/2) - lnG(a/2) - sum lnG(c_i + 1/2), a = alphabet size seen
    a = nz.sum(1)
    ln = _LG[2 * n + a] + a * _LG[1] - _LG[a] - np.where(nz, _LG[2 * counts + 1], 0.0).sum(1)
    kt = ln / math.log(2)
    return (ent, kt) if per_column else (float(ent.sum()), float(kt.sum()))


def code_tensor(sel, step, groups):
    """sel [n, C] float32 (unprotected tokens), step float32 ->
    {variant: (ent bits, kt bits, tables, max |symbol|)} and the max reconstruction error / step."""
    res, maxerr = {}, 0.0
    direct = np.rint(sel / step)
    ec_dir, kc_dir = stream_costs(direct, per_column=True)
    e, k = float(ec_dir.sum()), float(kc_dir.sum())
    res["direct"] = (e, k, 1, np.abs(direct).max())
    for g in groups:
        anchors = np.arange(0, sel.shape[0], g)
        asym = np.rint(sel[anchors] / step)
        xa = (asym * step).astype(np.float32)                       # anchor reconstruction
        owner = np.arange(sel.shape[0]) // g                         # group index of each token
        is_delta = np.arange(sel.shape[0]) % g != 0
        dsym = np.rint((sel[is_delta] - xa[owner[is_delta]]) / step)
        xhat = np.empty_like(sel)
        xhat[anchors] = xa
        xhat[is_delta] = (xa[owner[is_delta]] + dsym * step).astype(np.float32)
        maxerr = max(maxerr, float(np.abs(sel.astype(np.float64) - xhat).max() / step))
        ea, ka = stream_costs(asym)
        ed, kd = stream_costs(dsym)
        res[f"anchor{g}"] = (ea + ed, ka + kd, 2, max(np.abs(asym).max(), np.abs(dsym).max()))
    # DPCM, closed loop (sequential over tokens)
    n, c = sel.shape
    rsym = np.empty((n, c), np.float32)
    prev = np.rint(sel[0] / step)
    rsym[0] = prev
    xprev = (prev * step).astype(np.float32)
    err = np.abs(sel[0].astype(np.float64) - xprev).max()
    for t in range(1, n):
        r = np.rint((sel[t] - xprev) / step)
        rsym[t] = r
        xprev = (xprev + r * step).astype(np.float32)
        err = max(err, np.abs(sel[t].astype(np.float64) - xprev).max())
    maxerr = max(maxerr, float(err / step))
    ec, kc = stream_costs(rsym[1:], per_column=True)
    res["dpcm"] = (float(ec.sum()) + 8.0 * c, float(kc.sum()) + 8.0 * c, 1, np.abs(rsym[1:]).max())
    # oracle per-(tensor, channel) switch direct/dpcm (the 1 flag bit per channel not charged)
    res["best/ch"] = (float(np.minimum(ec_dir, ec + 8.0).sum()), float(np.minimum(kc_dir, kc + 8.0).sum()),
                      1, max(np.abs(direct).max(), np.abs(rsym[1:]).max()))
    res["dpcm_wins"] = (float((ec + 8.0 < ec_dir).sum()), float((kc + 8.0 < kc_dir).sum()), 0, 0)
    return res, maxerr


def run_file(path, alphas, mult, groups):
    kv, _, _ = kvfile.read_kv(REPO / path)
    names = kvfile.sorted_names(kv)
    t = kv[names[0]].shape[0]
    prot = protected_tokens(kv)
    keep = np.ones(t, bool)
    keep[prot] = False
    total = sum(kv[n].size for n in names)
    unprot = total - len(prot) * sum(kv[n][0].size for n in names)
    rows = {}
    for alpha in alphas:
        acc, maxerr, maxsym = {}, 0.0, {}
        for n in names:
            _, b_ref, step, _ = quantize_tensor(kv[n], alpha * mult[n], keep)   # the codec's own figure
            sel = kv[n].reshape(t, -1).astype(np.float32)[keep]
            res, me = code_tensor(sel, np.float32(step), groups)
            assert abs(res["direct"][0] - b_ref) <= 1e-6 * max(b_ref, 1.0), (n, res["direct"][0], b_ref)
            maxerr = max(maxerr, me)
            for v, (e, k, tabs, ms) in res.items():
                a = acc.setdefault(v, [0.0, 0.0, tabs])
                a[0] += e
                a[1] += k
                maxsym[v] = max(maxsym.get(v, 0), ms)
        rows[alpha] = ({v: (e / unprot, k / unprot, (e + 16.0 * (total - unprot)) / total, tabs, maxsym[v])
                        for v, (e, k, tabs) in acc.items()}, maxerr)
    return t, prot, rows, unprot, sum(kv[n][0].size for n in names)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", default=FILES)
    ap.add_argument("--alphas", default="0.22,0.59")
    ap.add_argument("--groups", default="2,4,10")
    args = ap.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    groups = [int(g) for g in args.groups.split(",")]
    prof = json.loads(PROFILE.read_text())
    mult = {f"layers.{l}.{s}": prof[s][l] for s in ("key", "value") for l in range(prof["layers"])}
    print("bits per unprotected element (ent: empirical entropy per (tensor, channel[, kind]); kt: "
          "adaptive KT code length, ~ent + table/learning cost; +prot: codec whole-chunk figure)")
    for f in args.files:
        t0 = time.time()
        t, prot, rows, unprot, nchan = run_file(f, alphas, mult, groups)
        print(f"\n# {Path(f).name}: T={t}, protected tokens {prot.tolist()}  ({time.time() - t0:.0f} s)")
        print(f"{'alpha':>5s} {'variant':8s} {'tables':>6s} {'ent':>6s} {'d_ent%':>7s} {'kt':>6s} "
              f"{'d_kt%':>7s} {'+prot':>6s} {'max|sym|':>8s}")
        for alpha, (res, maxerr) in rows.items():
            e0, k0 = res["direct"][0], res["direct"][1]
            for v, (e, k, p, tabs, ms) in res.items():
                if v == "dpcm_wins":
                    continue
                print(f"{alpha:5.2f} {v:8s} {tabs:6d} {e:6.3f} {100 * (e / e0 - 1):+7.1f} {k:6.3f} "
                      f"{100 * (k / k0 - 1):+7.1f} {p:6.3f} {int(ms):8d}")
            w = res["dpcm_wins"]
            print(f"      channels where dpcm beats direct: {w[0] * unprot:.0f} (ent) / {w[1] * unprot:.0f} (kt)"
                  f" of {nchan}")
            print(f"      max |x - xhat| / step over all variants and tensors: {maxerr:.6f} (<= 0.5 required)")
            assert maxerr <= 0.5 + 1e-5


if __name__ == "__main__":
    main()

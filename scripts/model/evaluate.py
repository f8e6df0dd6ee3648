#!/usr/bin/env python3
"""Score a (compressed/decompressed) KV cache against the reference by what the model does with it.

    .venv/bin/python scripts/model/evaluate.py REFERENCE.safetensors CANDIDATE.safetensors... [--json]

The reference (written by make_kv.py) holds the KV of N context tokens and, in its metadata,
the context token ids and the M eval tokens e0..e{M-1} that follow them in the text.  The
candidate must have the same tensor names and shapes (any of F16/BF16/F32; metadata optional).

With past KV = reference, then past KV = candidate (both upcast to float32), we feed
e0..e{M-2} at positions N..N+M-2 and compare the next-token distributions at those M-1
positions, i.e. the predictions of e1..e{M-1}.  (Predicting e0 would need the last context
token's query, which the KV cache does not hold; we leave that position out rather than
recompute it with an exact, uncompressed KV entry for itself.)  Metrics over the M-1 positions:

  kl_mean, kl_max    KL(p_ref || p_cand) in nats, full vocabulary, float64 from logits
  top1_agreement     fraction of positions where argmax p_ref == argmax p_cand
  ppl_ref, ppl_cand  perplexity of the actual tokens e1..e{M-1}
  ppl_increase_pct   100 * (ppl_cand / ppl_ref - 1)

Note that the eval tokens' own KV is computed exactly in both runs; only the context KV differs.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kvfile  # noqa: E402
import smollm2  # noqa: E402


def check_compatible(ref_kv, cand_kv):
    """Raise ValueError (one line) unless both KV dicts have the same names and shapes."""
    if set(ref_kv) != set(cand_kv):
        missing = sorted(set(ref_kv) - set(cand_kv))[:3]
        extra = sorted(set(cand_kv) - set(ref_kv))[:3]
        raise ValueError(f"tensor names differ (missing in candidate: {missing}, extra: {extra})")
    for name in kvfile.sorted_names(ref_kv):
        if ref_kv[name].shape != cand_kv[name].shape:
            raise ValueError(f"{name}: shape {list(cand_kv[name].shape)} in candidate, "
                             f"{list(ref_kv[name].shape)} in reference")


def evaluate(ref_kv, cand_kv, context_tokens, eval_tokens, model=None):
    """Metrics (dict, see module doc) for KV dicts {"layers.{i}.key"/"value": [N, 3, 64]}.

    Arrays may be any float dtype.  `model` defaults to smollm2.get_model() (loaded once)."""
    check_compatible(ref_kv, cand_kv)
    model = model or smollm2.get_model()
    c = model.config
    n_ctx = len(context_tokens)
    expect = (n_ctx, c.n_kv_head, c.head_dim)
    if len(ref_kv) != 2 * c.n_layer or ref_kv["layers.0.key"].shape != expect:
        raise ValueError(f"expected {c.n_layer} layers of {list(expect)} (context of {n_ctx} tokens), "
                         f"got {len(ref_kv) // 2} layers of {list(ref_kv['layers.0.key'].shape)}")
    if len(eval_tokens) < 2:
        raise ValueError("need at least 2 eval tokens")
    feed, targets = list(eval_tokens[:-1]), np.asarray(eval_tokens[1:])

    lp_ref = smollm2.log_softmax64(model.forward(feed, past=kvfile.kv_layers(ref_kv))[0])
    lp_cand = smollm2.log_softmax64(model.forward(feed, past=kvfile.kv_layers(cand_kv))[0])
    kl = np.sum(np.exp(lp_ref) * (lp_ref - lp_cand), axis=-1)
    rows = np.arange(len(targets))
    ppl_ref = float(np.exp(-lp_ref[rows, targets].mean()))
    ppl_cand = float(np.exp(-lp_cand[rows, targets].mean()))
    return {
        "positions": len(targets),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "top1_agreement": float(np.mean(lp_ref.argmax(-1) == lp_cand.argmax(-1))),
        "ppl_ref": ppl_ref,
        "ppl_cand": ppl_cand,
        "ppl_increase_pct": 100.0 * (ppl_cand / ppl_ref - 1.0),
    }


def tokens_from_metadata(metadata, path):
    try:
        return json.loads(metadata["context_tokens"]), json.loads(metadata["eval_tokens"])
    except (KeyError, ValueError):
        raise ValueError(f"{path}: reference lacks context_tokens/eval_tokens metadata "
                         "(make it with scripts/model/make_kv.py)") from None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reference", type=Path)
    ap.add_argument("candidate", type=Path, nargs="+", help="one or more candidates (the model loads once)")
    ap.add_argument("--json", action="store_true",
                    help="print one JSON object (a JSON list of objects for several candidates)")
    args = ap.parse_args()
    try:
        ref_kv, meta, ref_dtype = kvfile.read_kv(args.reference)
        context, evals = tokens_from_metadata(meta, args.reference)
        candidates = []
        for path in args.candidate:
            cand_kv, _, cand_dtype = kvfile.read_kv(path)
            check_compatible(ref_kv, cand_kv)
            candidates.append((path, cand_kv, cand_dtype))
        model = smollm2.get_model()
        results = []
        for path, cand_kv, cand_dtype in candidates:
            t0 = time.time()
            result = evaluate(ref_kv, cand_kv, context, evals, model)
            smollm2.log(f"{path}: evaluated {result['positions']} positions in {time.time() - t0:.1f} s")
            results.append((path, cand_dtype, result))
    except (kvfile.KVFileError, ValueError) as e:
        sys.exit(f"evaluate.py: error: {e}")
    if args.json:
        objs = [{"reference": str(args.reference), "candidate": str(path), "reference_dtype": ref_dtype,
                 "candidate_dtype": cand_dtype, **result} for path, cand_dtype, result in results]
        print(json.dumps(objs[0] if len(objs) == 1 else objs))
        return
    for path, cand_dtype, result in results:
        print(f"reference  {args.reference} ({ref_dtype}, {len(context)} context tokens)")
        print(f"candidate  {path} ({cand_dtype})")
        print(f"positions  {result['positions']} (predictions of eval tokens 1..{len(evals) - 1})")
        print(f"kl_mean    {result['kl_mean']:.6g} nats")
        print(f"kl_max     {result['kl_max']:.6g} nats")
        print(f"top1       {result['top1_agreement']:.4f}")
        print(f"ppl        {result['ppl_ref']:.4f} -> {result['ppl_cand']:.4f} "
              f"({result['ppl_increase_pct']:+.3f}%)")


if __name__ == "__main__":
    main()

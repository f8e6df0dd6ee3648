#!/usr/bin/env python3
"""Plain baseline for the GPU decode benchmark (issue 5): int8 values with a
per-(layer, K/V) scale, dequantized to f16 and copied into vLLM
FlashAttention NHD paged blocks with `index_copy_`, for a Llama-3-8B-shaped
cache (32 layers, 8 KV heads, head_dim 128, block size 16, shuffled blocks).

    python3 scripts/gpu/torch_baseline.py [--tokens 8192,32768] [--out FILE.json]

Times (CUDA events, median of 10): the dequantize + scatter on the device,
and the same with the host-to-device copy of the int8 bytes from pinned memory.
"""
import argparse
import json

import torch

p = argparse.ArgumentParser()
p.add_argument("--tokens", default="8192,32768")
p.add_argument("--repeat", type=int, default=10)
p.add_argument("--out")
a = p.parse_args()

L, H, D, B = 32, 8, 128, 16
dev = torch.device("cuda")
res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": []}
for tokens in [int(t) for t in a.tokens.split(",")]:
    nb = tokens // B
    g = torch.Generator(device="cpu").manual_seed(tokens)
    q_host = torch.randint(-127, 128, (L, 2, tokens, H, D), dtype=torch.int8, generator=g).pin_memory()
    q = q_host.to(dev)
    scales = torch.rand(L, 2, device=dev, dtype=torch.float32) * 0.1
    caches = [torch.empty(2, nb, B, H, D, dtype=torch.float16, device=dev) for _ in range(L)]
    perm = torch.randperm(nb, generator=g).to(dev)

    def scatter(src):
        for l in range(L):
            v = (src[l].to(torch.float32) * scales[l].view(2, 1, 1, 1)).to(torch.float16)
            v = v.view(2, nb, B, H, D)
            caches[l].index_copy_(1, perm, v)

    def timed(fn):
        ts = []
        for _ in range(a.repeat + 1):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            ts.append(s.elapsed_time(e))
        ts = sorted(ts[1:])
        return ts[len(ts) // 2]

    k = timed(lambda: scatter(q))
    e2e = timed(lambda: scatter(q_host.to(dev, non_blocking=True)))
    elems = L * 2 * tokens * H * D
    r = {
        "tokens": tokens,
        "elements": elems,
        "dequant_scatter_ms": k,
        "dequant_scatter_gelem_s": elems / k / 1e6,
        "output_gb_s": elems * 2 / k / 1e6,
        "with_h2d_of_int8_ms": e2e,
    }
    print(json.dumps(r))
    res["results"].append(r)
    del q, q_host, caches
    torch.cuda.empty_cache()
if a.out:
    json.dump(res, open(a.out, "w"), indent=2)

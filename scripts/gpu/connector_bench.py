"""Benchmark (not a test): the connector's GPU path end to end, through the C
ABI (ctypes binding), the way an engine uses it.

A Llama-3-8B-shaped KV cache (32 layers, 8 KV heads, head_dim 128, f16) is
built by tiling the real SmolLM2 fixture (layer, head, dim and token indices
wrap around), placed in vLLM FlashAttention NHD paged blocks on the GPU
(torch tensors, block size 16, shuffled block ids), stored through
`Context.store` (GPU encode, memory tier), then loaded through
`Context.load` into other blocks, repeatedly:

- store: from the call to DONE (encoded on the GPU, written to the memory tier);
- load: from the call to layer 0 ready on the GPU and to every layer ready
  (host waits on the per-layer events), and to job DONE;
- baseline in the same run: copying the same KV as raw f16 from pinned host
  memory into the GPU (what loading uncompressed KV from CPU memory costs).

With `--tables SET.cgts` (a default-level table set for this shape, made
with scripts/gpu/tile_kv.py and `cachegen calibrate` from another text's
KV), every size runs twice in the same process: chunks with embedded
tables, then chunks referencing the set (config `tables`). Stores with a
set gather on the GPU and encode on the host.

Usage (on a GPU machine; CACHEGEN_LIBRARY names libcachegen.so):
    python3 scripts/gpu/connector_bench.py --tokens 8192,32768 --repeat 5 --out result.json [--tables SET.cgts]
"""

import argparse
import json
import os
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "integrations/python"))
import cachegen  # noqa: E402

FIXTURE = REPO / "fixtures/smollm2-kernel-doc-320.safetensors"
LAYERS, HEADS, HEAD_DIM, BS, CHUNK = 32, 8, 128, 16, 256
AXES = ("kv", "block", "token", "head", "dim")


def read_fixture():
    data = FIXTURE.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        a, b = h["data_offsets"]
        out[name] = np.frombuffer(data, dtype=np.float16, count=(b - a) // 2, offset=8 + n + a).reshape(h["shape"])
    layers = len([k for k in out if k.endswith(".key")])
    # [layers, 2, tokens, heads, dim]
    return np.stack([np.stack([out[f"layers.{i}.key"], out[f"layers.{i}.value"]]) for i in range(layers)])


def tiled(src, tokens):
    """[LAYERS, 2, tokens, HEADS, HEAD_DIM] from the fixture, indices wrapping."""
    L, _, T, H, D = src.shape
    li = np.arange(LAYERS) % L
    ti = np.arange(tokens) % T
    hi = np.arange(HEADS) % H
    di = np.arange(HEAD_DIM) % D
    return src[li][:, :, ti][:, :, :, hi][:, :, :, :, di]


def cache(num_blocks):
    return [torch.zeros((2, num_blocks, BS, HEADS, HEAD_DIM), dtype=torch.float16, device="cuda") for _ in range(LAYERS)]


def ms(t0):
    return (time.perf_counter() - t0) * 1e3


def run(tokens, repeat, fixture, tables=None):
    kv = tiled(fixture, tokens)  # host, f16
    nb = tokens // BS
    rng = np.random.default_rng(tokens)
    src_blocks = rng.permutation(nb + 64)[:nb].astype(np.uint32)
    dst_blocks = rng.permutation(nb + 64)[:nb].astype(np.uint32)
    src = cache(nb + 64)
    idx = torch.from_numpy(src_blocks.astype(np.int64)).cuda()
    for l in range(LAYERS):
        x = torch.from_numpy(np.ascontiguousarray(kv[l])).cuda().view(2, nb, BS, HEADS, HEAD_DIM)
        src[l].index_copy_(1, idx, x)
    torch.cuda.synchronize()
    toks = (np.arange(tokens, dtype=np.uint32) * 2654435761 % 49152).astype(np.uint32)
    cfg = {
        "namespace": {"model": "llama3-8b-shaped-bench", "kv_dtype": "f16", "block_size": BS},
        "chunk_tokens": CHUNK,
        "tiers": {"memory": {"bytes": 8 << 30}},
    }
    if tables:
        cfg["tables"] = {"default": tables}
    out = {"tokens": tokens, "raw_bytes": int(kv.nbytes), "tables": tables or "embedded"}
    stream = torch.cuda.current_stream()
    with cachegen.Context(cfg) as ctx:
        slayout = cachegen.Layout.from_tensors(src, AXES)
        t0 = time.perf_counter()
        with ctx.store(slayout, toks, src_blocks, stream=stream) as job:
            assert job.wait("reusable", timeout=600)
            out["store_reusable_ms"] = ms(t0)
            assert job.wait("done", timeout=600)
            out["store_done_ms"] = ms(t0)
            info = job.info()
            assert info["chunks_ok"] == tokens // CHUNK, job.errors()
        st = ctx.stats()
        out["stored_bytes"] = st["counters"]["store_bytes_encoded"]
        out["ratio_vs_f16"] = out["raw_bytes"] / out["stored_bytes"]
        dst = cache(nb + 64)
        dlayout = cachegen.Layout.from_tensors(dst, AXES)
        runs = []
        for _ in range(repeat):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            job = ctx.load(dlayout, toks, dst_blocks, stream=stream)
            assert job.wait_layer(0, timeout=600)
            first = ms(t0)
            assert job.wait_layer(LAYERS - 1, timeout=600)
            last = ms(t0)
            assert job.wait("done", timeout=600)
            done = ms(t0)
            info = job.info()
            assert info["chunks_ok"] == tokens // CHUNK and info["chunks_failed"] == 0, job.errors()
            job.close()
            runs.append({"layer0_ms": first, "all_layers_ms": last, "done_ms": done})
        out["load_runs"] = runs
        out["load_all_layers_ms_median"] = float(np.median([r["all_layers_ms"] for r in runs]))
        out["load_layer0_ms_median"] = float(np.median([r["layer0_ms"] for r in runs]))
        # Quality sanity: the loaded blocks against the source (default level).
        didx = torch.from_numpy(dst_blocks.astype(np.int64)).cuda()
        err = 0.0
        for l in (0, LAYERS - 1):
            got = dst[l].index_select(1, didx).float()
            want = src[l].index_select(1, idx).float()
            err = max(err, float((got - want).abs().max()))
        out["max_abs_error_layers_0_and_last"] = err
    # Baseline: the raw f16 KV from pinned host memory to the GPU.
    pinned = torch.from_numpy(kv.reshape(-1)).pin_memory()
    dev = torch.empty(pinned.numel(), dtype=torch.float16, device="cuda")
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        dev.copy_(pinned, non_blocking=True)
        torch.cuda.synchronize()
        times.append(ms(t0))
    out["raw_f16_h2d_ms_median"] = float(np.median(times))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", default="8192,32768")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out")
    ap.add_argument("--tables", help="a default-level table set (.cgts) for the Llama-3-8B shape: also run with it")
    a = ap.parse_args()
    fixture = read_fixture()
    res = {"device": torch.cuda.get_device_name(0), "library": cachegen.library_path(), "results": []}
    for t, tables in [(int(x), tb) for x in a.tokens.split(",") for tb in ([None, a.tables] if a.tables else [None])]:
        r = run(t, a.repeat, fixture, tables)
        res["results"].append(r)
        print(
            f"{t} tokens, tables {r['tables']}: {r['raw_bytes'] / 1e9:.2f} GB f16, stored {r['stored_bytes'] / 1e6:.1f} MB ({r['ratio_vs_f16']:.2f}x); "
            f"store {r['store_reusable_ms']:.1f} ms to reusable, {r['store_done_ms']:.1f} ms to done; "
            f"load: layer 0 {r['load_layer0_ms_median']:.1f} ms, all layers {r['load_all_layers_ms_median']:.1f} ms (median of {a.repeat}); "
            f"raw f16 H2D from pinned {r['raw_f16_h2d_ms_median']:.1f} ms; max abs error {r['max_abs_error_layers_0_and_last']:.4f}",
            flush=True,
        )
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

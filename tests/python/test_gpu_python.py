"""The GPU path through the Python binding (issue 5): torch CUDA tensors in
vLLM's layout (per-layer ``(2, num_blocks, block_size, heads, head_dim)``,
NHD and HND) described with ``Layout.from_tensors``; stores gather on the
GPU, loads decode on the GPU, per-layer waits are enqueued on torch's
current stream. Every result is compared byte for byte with the host path
(numpy buffers) on the same request.

Without torch or a CUDA device every test is skipped with the reason; the
refusal of CUDA memory without a GPU is tested everywhere."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if (REPO / "target/release/libcachegen.so").is_file():
    os.environ.setdefault("CACHEGEN_LIBRARY", str(REPO / "target/release/libcachegen.so"))
try:
    import cachegen
except ImportError:
    sys.path.insert(0, str(REPO / "integrations/python"))
    import cachegen

try:
    import torch

    HAVE_CUDA = torch.cuda.is_available()
    WHY = "" if HAVE_CUDA else "torch sees no CUDA device"
except ImportError:
    torch = None
    HAVE_CUDA = False
    WHY = "torch is not installed"

needs_gpu = pytest.mark.skipif(not HAVE_CUDA, reason=f"no GPU: {WHY}")

LAYERS, HEADS, HEAD_DIM, BS, CHUNK = 6, 4, 64, 16, 64
AXES = ("kv", "block", "token", "head", "dim")


def config():
    return {
        "namespace": {"model": "gpu-python-test", "kv_dtype": "float16", "block_size": BS},
        "chunk_tokens": CHUNK,
        "decode_threads": 2,
    }


def kv_like(tokens, seed):
    """KV-like values: per-channel offsets and scales, heavy tails, a sink token."""
    rng = np.random.default_rng(seed)
    c = HEADS * HEAD_DIM
    off = rng.normal(0, 1, (LAYERS, 2, 1, c))
    scale = rng.uniform(0.2, 1.5, (LAYERS, 2, 1, c))
    x = off + scale * rng.laplace(0, 1, (LAYERS, 2, tokens, c))
    x[:, :, 0] *= 6
    return x.astype(np.float16).reshape(LAYERS, 2, tokens, HEADS, HEAD_DIM)


def host_cache(num_blocks, hnd):
    """Per-layer numpy tensors in vLLM's logical shape (HND: permuted strides)."""
    out = []
    for _ in range(LAYERS):
        if hnd:
            t = np.zeros((2, num_blocks, HEADS, BS, HEAD_DIM), np.float16).transpose(0, 1, 3, 2, 4)
        else:
            t = np.zeros((2, num_blocks, BS, HEADS, HEAD_DIM), np.float16)
        out.append(t)
    return out


def cuda_cache(num_blocks, hnd, fill=0.0):
    out = []
    for _ in range(LAYERS):
        if hnd:
            t = torch.full((2, num_blocks, HEADS, BS, HEAD_DIM), fill, dtype=torch.float16, device="cuda").permute(0, 1, 3, 2, 4)
        else:
            t = torch.full((2, num_blocks, BS, HEADS, HEAD_DIM), fill, dtype=torch.float16, device="cuda")
        out.append(t)
    return out


def put(cache, kv, block_ids):
    """Writes kv [layers, 2, tokens, heads, dim] into the blocks (numpy or torch)."""
    tokens = kv.shape[2]
    for i in range(tokens):
        b, s = block_ids[i // BS], i % BS
        for l in range(LAYERS):
            if isinstance(cache[l], np.ndarray):
                cache[l][:, b, s] = kv[l, :, i]
            else:
                cache[l][:, b, s] = torch.from_numpy(np.ascontiguousarray(kv[l, :, i])).to("cuda")


def as_numpy(cache):
    return [t.cpu().numpy() if not isinstance(t, np.ndarray) else t for t in cache]


@needs_gpu
@pytest.mark.parametrize("hnd", [False, True])
def test_gpu_store_and_load_equal_the_host_path(hnd):
    tokens = list(range(1000, 1000 + 256))
    kv = kv_like(256, seed=7)
    src_blocks = [31 - 2 * i for i in range(16)]
    dst_blocks = [(7 * i + 3) % 20 for i in range(16)]

    # Store from the GPU; the host path stores the same KV from numpy.
    gpu_src = cuda_cache(32, hnd)
    put(gpu_src, kv, src_blocks)
    host_src = host_cache(32, hnd)
    put(host_src, kv, src_blocks)
    with cachegen.Context(config()) as gctx, cachegen.Context(config()) as hctx:
        glayout = cachegen.Layout.from_tensors(gpu_src, AXES)
        assert glayout.memory == "cuda"
        stream = torch.cuda.current_stream()
        with gctx.store(glayout, tokens, src_blocks, stream=stream) as job:
            assert job.wait("done", timeout=60)
            assert job.info()["chunks_ok"] == 4, job.errors()
        with hctx.store(cachegen.Layout.from_tensors(host_src, AXES), tokens, src_blocks) as job:
            assert job.wait("done", timeout=60)
        assert gctx.lookup(tokens)[0] == 256

        # Load on the GPU (per-layer waits on torch's stream, then a copy on
        # that stream) and on the host: the same bytes, untouched blocks too.
        gpu_dst = cuda_cache(20, hnd, fill=1.5)
        host_dst = host_cache(20, hnd)
        for t in host_dst:
            t[...] = 1.5
        dlayout = cachegen.Layout.from_tensors(gpu_dst, AXES)
        job = gctx.load(dlayout, tokens, dst_blocks, stream=stream)
        copies = []
        for l in range(LAYERS):
            assert job.wait_layer_on_stream(l, stream, timeout=60)
            copies.append(gpu_dst[l].clone())  # ordered after layer l's decode on the device
        assert job.wait("done", timeout=60)
        assert job.info()["chunks_ok"] == 4, job.errors()
        job.close()
        with hctx.load(cachegen.Layout.from_tensors(host_dst, AXES), tokens, dst_blocks) as hjob:
            assert hjob.wait("done", timeout=60)
        torch.cuda.synchronize()
        for l in range(LAYERS):
            np.testing.assert_array_equal(copies[l].cpu().numpy(), host_dst[l], err_msg=f"layer {l}")
            np.testing.assert_array_equal(gpu_dst[l].cpu().numpy(), host_dst[l])


@needs_gpu
def test_gpu_load_reports_missing_chunks_and_spares_the_engines_blocks():
    tokens = list(range(5000, 5000 + 256))
    kv = kv_like(256, seed=11)
    blocks = list(range(16))
    src = cuda_cache(16, False)
    put(src, kv, blocks)
    with cachegen.Context(config()) as ctx:
        # Only the first two chunks are stored.
        with ctx.store(cachegen.Layout.from_tensors(src, AXES), tokens[:128], blocks) as job:
            assert job.wait("done", timeout=60)
        dst = cuda_cache(16, False, fill=-2.0)
        with ctx.load(cachegen.Layout.from_tensors(dst, AXES), tokens, blocks, first_token=32) as job:
            assert job.wait("done", timeout=60)
            assert job.failed_blocks() == list(range(8, 16))
            assert job.info()["chunks_ok"] == 2
        out = as_numpy(dst)
        for l in range(LAYERS):
            # Blocks 0-1 (the engine's 32 tokens) and the failed blocks are untouched.
            assert (out[l][:, :2] == -2.0).all()
            assert (out[l][:, 8:] == -2.0).all()
            assert not (out[l][:, 2:8] == -2.0).all()


def test_cuda_memory_without_a_gpu_is_refused_with_no_gpu():
    if HAVE_CUDA:
        pytest.skip("a GPU is present: the refusal is for machines without one")
    with pytest.raises(cachegen.CacheGenError) as e:
        cachegen.Layout(kind="kv", dtype="float16", layers=1, num_blocks=1, block_size=1, heads=1, head_dim=1,
                        layer_base=[1 << 20], stride_block=4, stride_kv=2, stride_token=4, stride_head=2, memory="cuda")
    assert e.value.code == cachegen.CG_ERR_NO_GPU, e.value


@needs_gpu
@pytest.mark.parametrize("level", ["default", "lossless"])
def test_fp8_caches_as_vllm_allocates_them_match_the_host_path(level):
    """vLLM's fp8 cache: uint8 CUDA tensors registered with dtype="fp8"
    (and float8_e4m3fn tensors by their own dtype); stored from and loaded
    into GPU memory, compared with the same request on numpy uint8 blocks."""
    tokens = list(range(7000, 7000 + 256))
    f16 = kv_like(256, seed=5)
    kv = torch.from_numpy(np.ascontiguousarray(f16)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    src_blocks = [31 - 2 * i for i in range(16)]
    dst_blocks = [(7 * i + 3) % 20 for i in range(16)]

    def host(num_blocks):
        return [np.zeros((2, num_blocks, BS, HEADS, HEAD_DIM), np.uint8) for _ in range(LAYERS)]

    def cuda(num_blocks, dtype=torch.uint8):
        return [torch.zeros((2, num_blocks, BS, HEADS, HEAD_DIM), dtype=dtype, device="cuda") for _ in range(LAYERS)]

    cfg = config()
    cfg["namespace"]["kv_dtype"] = "fp8"
    cfg["level"] = level
    gpu_src, host_src = cuda(32), host(32)
    put(gpu_src, kv, src_blocks)
    put(host_src, kv, src_blocks)
    with cachegen.Context(cfg) as gctx, cachegen.Context(cfg) as hctx:
        glayout = cachegen.Layout.from_tensors(gpu_src, AXES, dtype="fp8")
        assert glayout.memory == "cuda"
        with gctx.store(glayout, tokens, src_blocks, stream=torch.cuda.current_stream()) as job:
            assert job.wait("done", timeout=60)
            assert job.info()["chunks_ok"] == 4, job.errors()
        with hctx.store(cachegen.Layout.from_tensors(host_src, AXES, dtype="fp8"), tokens, src_blocks) as job:
            assert job.wait("done", timeout=60)
            assert job.info()["chunks_ok"] == 4, job.errors()
        # Loads: into float8_e4m3fn CUDA tensors (the dtype from the tensors)
        # and numpy uint8 blocks.
        gpu_dst = cuda(20, torch.float8_e4m3fn)
        host_dst = host(20)
        with gctx.load(cachegen.Layout.from_tensors(gpu_dst, AXES), tokens, dst_blocks) as job:
            assert job.wait("done", timeout=60)
            assert job.info()["chunks_ok"] == 4, job.errors()
        with hctx.load(cachegen.Layout.from_tensors(host_dst, AXES, dtype="fp8"), tokens, dst_blocks) as job:
            assert job.wait("done", timeout=60)
        for l in range(LAYERS):
            got = gpu_dst[l].view(torch.uint8).cpu().numpy()
            np.testing.assert_array_equal(got, host_dst[l], err_msg=f"layer {l}")
            if level == "lossless":
                for i in range(256):
                    np.testing.assert_array_equal(got[:, dst_blocks[i // BS], i % BS], kv[l, :, i])

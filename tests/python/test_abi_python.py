"""The Python binding (integrations/python, package `cachegen`) of the C ABI, on
numpy host buffers holding the real KV fixture: store from one engine layout,
lookup, load into others; per-layer waits, job info, statistics, salts,
partial loads, failures reported per block, error codes, timeouts.

What a load must produce is the codec's own decoded output, obtained
independently through the CLI (`cachegen encode` / `cachegen decode` of each
64-token chunk). The library is $CACHEGEN_LIBRARY or target/release (built by
scripts/test.sh with `cargo build --release`)."""

import gc
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
# Test this checkout's build unless told otherwise (an installed wheel may bundle another).
if (REPO / "target/release/libcachegen.so").is_file():
    os.environ.setdefault("CACHEGEN_LIBRARY", str(REPO / "target/release/libcachegen.so"))
try:
    import cachegen
except ImportError:  # not installed into the venv: use the source tree
    sys.path.insert(0, str(REPO / "integrations/python"))
    import cachegen

CLI = REPO / "target/release/cachegen"
FIXTURE = REPO / "fixtures/smollm2-kernel-doc-320.safetensors"
BS = 16  # tokens per block
CHUNK = 64  # tokens per chunk
N_TOK = 320  # the fixture's tokens: 5 chunks, 20 blocks
AXES_VLLM = ("kv", "block", "token", "head", "dim")
AXES_FLASHINFER = ("block", "kv", "token", "head", "dim")
AXES_TRTLLM = ("block", "layer", "kv", "head", "token", "dim")


# ---------------------------------------------------------------------------
# safetensors by hand: 8-byte little-endian header length, JSON header, raw bytes

def read_safetensors(path):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    out = {}
    for name, h in header.items():
        assert h["dtype"] == "F16", h
        a, b = h["data_offsets"]
        out[name] = np.frombuffer(data, dtype=np.float16, count=(b - a) // 2, offset=8 + n + a).reshape(h["shape"])
    return out, meta


def write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        raw = np.ascontiguousarray(t, dtype=np.float16).tobytes()
        header[name] = {"dtype": "F16", "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.fixture(scope="module")
def kv():
    """(K, V, tokens): K and V as [layers, 320, 3, 64] f16; the fixture's own token ids."""
    t, meta = read_safetensors(FIXTURE)
    layers = len([k for k in t if k.endswith(".key")])
    k = np.stack([t[f"layers.{i}.key"] for i in range(layers)])
    v = np.stack([t[f"layers.{i}.value"] for i in range(layers)])
    tokens = np.array(json.loads(meta["context_tokens"]), dtype=np.uint32)
    assert k.shape == (30, N_TOK, 3, 64) and tokens.shape == (N_TOK,)
    return k, v, tokens


@pytest.fixture(scope="module")
def decoded(kv, tmp_path_factory):
    """What loading the 5 chunks must give: each 64-token chunk encoded at the
    default level and decoded again, by the CLI."""
    k, v, _ = kv
    d = tmp_path_factory.mktemp("codec")
    outs_k, outs_v = [], []
    for c in range(N_TOK // CHUNK):
        s = slice(c * CHUNK, (c + 1) * CHUNK)
        src, cg, dec = d / f"chunk{c}.safetensors", d / f"chunk{c}.cg", d / f"chunk{c}.dec.safetensors"
        tensors = {}
        for i in range(k.shape[0]):
            tensors[f"layers.{i}.key"] = k[i, s]
            tensors[f"layers.{i}.value"] = v[i, s]
        write_safetensors(src, tensors)
        subprocess.run([str(CLI), "encode", "--level", "default", str(src), str(cg)], check=True, capture_output=True)
        subprocess.run([str(CLI), "decode", str(cg), str(dec)], check=True, capture_output=True)
        got, _ = read_safetensors(dec)
        outs_k.append(np.stack([got[f"layers.{i}.key"] for i in range(k.shape[0])]))
        outs_v.append(np.stack([got[f"layers.{i}.value"] for i in range(k.shape[0])]))
    dk, dv = np.concatenate(outs_k, axis=1), np.concatenate(outs_v, axis=1)
    assert dk.shape == k.shape and not np.array_equal(dk.view(np.uint16), k.view(np.uint16)), "lossy level"
    return dk, dv


def config(**extra):
    cfg = {
        "namespace": {"model": "smollm2-python-test", "kv_dtype": "f16", "block_size": BS},
        "chunk_tokens": CHUNK,
        "decode_threads": 2,
        "io_threads": 2,
    }
    cfg.update(extra)
    return cfg


# ---------------------------------------------------------------------------
# Engines: numpy host memory in each engine's layout, plus a canonical view
# [layer][kv, block, token, head, dim] for filling and checking from the test.

class Engine:
    def __init__(self, layout, canon):
        self.layout = layout
        self.canon = canon  # per layer: a view (2, blocks, BS, heads, dim) of the engine's memory

    def fill(self, k, v, blocks, tokens):
        nb = len(blocks)
        assert nb * BS == tokens
        idx = np.asarray(blocks)
        for l, view in enumerate(self.canon):
            view[0, idx] = k[l, :tokens].reshape(nb, BS, *k.shape[2:])
            view[1, idx] = v[l, :tokens].reshape(nb, BS, *v.shape[2:])

    def read(self, blocks, start, end):
        """(K, V) [layers, end-start, heads, dim] of tokens start..end (block aligned)."""
        idx = np.asarray(blocks[start // BS : end // BS])
        ks = np.stack([view[0, idx].reshape(-1, *view.shape[3:]) for view in self.canon])
        vs = np.stack([view[1, idx].reshape(-1, *view.shape[3:]) for view in self.canon])
        return ks, vs

    def block_bytes(self, block):
        return [view[:, block].tobytes() for view in self.canon]


def vllm(num_blocks, hnd=False, layers=30, dtype=np.float16):
    """vLLM flash-attn: per layer (2, blocks, BS, heads, dim); HND: heads before tokens physically."""
    if hnd:
        arrs = [np.zeros((2, num_blocks, 3, BS, 64), dtype).transpose(0, 1, 3, 2, 4) for _ in range(layers)]
    else:
        arrs = [np.zeros((2, num_blocks, BS, 3, 64), dtype) for _ in range(layers)]
    return Engine(cachegen.Layout.from_tensors(arrs, AXES_VLLM), arrs)


def flashinfer(num_blocks, layers=30):
    arrs = [np.zeros((num_blocks, 2, BS, 3, 64), np.float16) for _ in range(layers)]
    return Engine(cachegen.Layout.from_tensors(arrs, AXES_FLASHINFER), [a.transpose(1, 0, 2, 3, 4) for a in arrs])


def trtllm(num_blocks, layers=30):
    pool = np.zeros((num_blocks, layers, 2, 3, BS, 64), np.float16)
    canon = [pool[:, l].transpose(1, 0, 3, 2, 4) for l in range(layers)]
    return Engine(cachegen.Layout.from_tensors(pool, AXES_TRTLLM), canon)


def assert_same(got, want, what):
    # bytes, not values: f16 NaN/-0 must round-trip exactly too
    assert got.shape == want.shape, what
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16)), what


def store_all(ctx, k, v, toks, n=N_TOK, salt=b"", num_blocks=20):
    src = vllm(num_blocks)
    blocks = list(range(n // BS))
    src.fill(k, v, blocks, n)
    with ctx.store(src.layout, toks[:n], blocks, salt=salt) as job:
        assert job.wait(timeout=60)
        return job.info()


# ---------------------------------------------------------------------------

def test_version_and_library():
    assert cachegen.version() == "0.1.0"
    assert Path(cachegen.library_path()).is_file()


def test_store_lookup_load_across_layouts(kv, decoded):
    k, v, toks = kv
    dk, dv = decoded
    with cachegen.Context(config()) as ctx:
        assert ctx.lookup(toks) == (0, 0)
        # Source: vLLM NHD, 40 blocks, every other block, descending.
        src = vllm(40)
        src_blocks = [39 - 2 * i for i in range(20)]
        src.fill(k, v, src_blocks, N_TOK)
        job = ctx.store(src.layout, toks, np.array(src_blocks, dtype=np.int64))
        assert job.kind == "store" and job.layers == 30
        assert job.wait("reusable", timeout=60)
        assert job.wait("done", timeout=60)
        info = job.info()
        assert info == {
            "kind": "store", "reusable": True, "done": True, "layers_done": info["layers_done"], "layers": 30,
            "chunks_ok": 5, "chunks_failed": 0, "chunks_skipped": 0, "failed_blocks": 0,
        }, (info, job.errors())
        assert job.errors() == [] and job.failed_blocks() == []
        assert job.wait_layer(29, timeout=0), "a store's layer wait is its done"
        job.close()
        job.close()

        assert ctx.lookup(toks) == (320, 0)
        assert ctx.lookup(list(toks) + [7] * 100)[0] == 320  # longer prompt, same prefix
        changed = toks.copy()
        changed[130] ^= 1
        assert ctx.lookup(changed)[0] == 128
        assert ctx.lookup(toks[:300])[0] == 256  # only whole chunks

        # Storing again writes nothing.
        with ctx.store(src.layout, toks.tolist(), src_blocks) as again:
            assert again.wait(timeout=30)
            assert again.info()["chunks_skipped"] == 5 and again.info()["chunks_ok"] == 0

        # Into vLLM HND, FlashInfer and a TensorRT-LLM pool, each with its own block order.
        targets = [
            ("vllm-hnd", vllm(20, hnd=True), [(i * 7 + 3) % 20 for i in range(20)][::-1]),
            ("flashinfer", flashinfer(24), [23 - i for i in range(20)]),
            ("trtllm", trtllm(21), [(i * 5) % 21 for i in range(1, 21)]),
        ]
        for name, dst, blocks in targets:
            assert len(set(blocks)) == 20
            job = ctx.load(dst.layout, toks, blocks)
            assert job.kind == "load"
            assert all(job.wait_layer(l, timeout=60) for l in range(30)), name
            assert job.wait(timeout=60)
            info = job.info()
            assert info == {
                "kind": "load", "reusable": True, "done": True, "layers_done": 30, "layers": 30,
                "chunks_ok": 5, "chunks_failed": 0, "chunks_skipped": 0, "failed_blocks": 0,
            }, (name, info, job.errors())
            assert job.failed_blocks() == [] and job.errors() == []
            got_k, got_v = dst.read(blocks, 0, N_TOK)
            assert_same(got_k, dk, f"{name}: keys differ from the codec's decoded output")
            assert_same(got_v, dv, f"{name}: values differ from the codec's decoded output")
            unused = set(range(dst.layout.num_blocks)) - set(blocks)
            for b in unused:  # nothing written outside the blocks given
                assert all(not any(x) for x in dst.block_bytes(b)), (name, b)
            job.close()

        s = ctx.stats()
        assert s["namespace"] == {
            "model": "smollm2-python-test", "kv_dtype": "f16", "tp_world_size": 1, "tp_rank": 0,
            "block_size": BS, "chunk_tokens": CHUNK, "level": "default",
        }
        c = s["counters"]
        assert (c["stores"], c["store_chunks_written"], c["store_chunks_skipped"], c["store_chunks_failed"]) == (2, 5, 5, 0)
        assert (c["loads"], c["load_chunks_ok"], c["load_chunks_failed"], c["load_blocks_failed"]) == (3, 15, 0, 0)
        assert c["lookups"] == 5 and c["lookup_tokens_hit"] == 320 * 2 + 128 + 256
        assert c["store_bytes_raw"] == 320 * 30 * 2 * 3 * 64 * 2
        assert c["load_bytes_decoded"] == 3 * c["store_bytes_raw"]
        assert 3.0 < s["throughput"]["compression_ratio"] < 10, s["throughput"]
        assert c["store_bytes_encoded"] < c["store_bytes_raw"] / 3
        assert [t["name"] for t in s["tiers"]] == ["memory"] and s["tiers"][0]["entries"] == 5
        assert s["leases_active"] == 0 and s["queued"] == {"io": 0, "cpu": 0}


def test_torch_like_tensors_give_the_same_layout():
    """Duck-typed tensors (data_ptr, stride in elements, element_size, shape,
    dtype): the strides come from the tensor, as for numpy."""
    arrs = [np.zeros((2, 8, 3, BS, 64), np.float16).transpose(0, 1, 3, 2, 4) for _ in range(4)]
    a = cachegen.Layout.from_tensors(arrs, AXES_VLLM)
    b = cachegen.Layout.from_tensors([FakeTensor(x) for x in arrs], AXES_VLLM)
    fields = ("kind", "dtype", "layers", "num_blocks", "block_size", "heads", "head_dim", "layer_base",
              "stride_block", "stride_kv", "stride_token", "stride_head", "stride_layer", "memory")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
    assert (a.stride_kv, a.stride_block, a.stride_token, a.stride_head) == (8 * 3 * BS * 64 * 2, 3 * BS * 64 * 2, 128, BS * 64 * 2)
    # A pool is one tensor with a layer axis.
    pool = np.zeros((8, 4, 2, 3, BS, 64), np.float16)
    p = cachegen.Layout.from_tensors(pool, AXES_TRTLLM)
    assert p.layers == 4 and p.stride_layer == 2 * 3 * BS * 64 * 2 and len(set(p.layer_base)) == 1
    # MLA: one latent stream, no kv and no head axis.
    mla = cachegen.Layout.from_tensors([np.zeros((8, BS, 576), np.float16)] * 1, ("block", "token", "dim"), kind="latent")
    assert (mla.kind, mla.heads, mla.head_dim, mla.stride_kv) == ("latent", 1, 576, 0)
    # CUDA tensors become device-memory layouts (refused without a GPU, and
    # here the addresses are host memory).
    class CudaTensor(FakeTensor):
        class device:
            type = "cuda"

    try:
        cuda = cachegen.Layout.from_tensors([CudaTensor(x) for x in arrs], AXES_VLLM)
        assert cuda.memory == "cuda"
        cuda.close()
    except cachegen.CacheGenError as e:
        assert e.code in (cachegen.CG_ERR_INVALID_ARGUMENT, cachegen.CG_ERR_NO_GPU), e
    for lay in (a, b, p, mla):
        lay.close()
        lay.close()


class FakeTensor:
    """Shaped like a torch.Tensor for the binding: data_ptr, stride() in
    elements, element_size, shape, dtype, device."""

    class device:
        type = "cpu"

    def __init__(self, a, dtype="torch.float16"):
        self.a = a
        self.shape = a.shape
        self.dtype = dtype

    def data_ptr(self):
        return self.a.__array_interface__["data"][0]

    def element_size(self):
        return self.a.itemsize

    def stride(self):
        return tuple(s // self.a.itemsize for s in self.a.strides)


def test_negative_strides_and_bf16_round_trip_exactly():
    """Lossless level: stored bytes come back bit-exact, through layouts with
    reversed blocks and tokens (negative strides) and torch-like bf16 tensors."""
    rng = np.random.default_rng(7)
    toks = rng.integers(0, 49152, 128)
    for dtype, np_dtype, fake in (("f32", np.float32, None), ("bf16", np.uint16, "torch.bfloat16")):
        cfg = config(level="lossless")
        cfg["namespace"]["kv_dtype"] = dtype
        if np_dtype is np.uint16:  # random bf16 bit patterns that are finite numbers
            src = [(rng.integers(0, 0x7F00, (2, 8, BS, 2, 32)) | (rng.integers(0, 2, (2, 8, BS, 2, 32)) << 15)).astype(np.uint16) for _ in range(3)]
        else:
            src = [rng.standard_normal((2, 8, BS, 2, 32)).astype(np_dtype) for _ in range(3)]
        base = [np.zeros((2, 8, 2, BS, 32), np_dtype) for _ in range(3)]
        rev = [b[:, ::-1, :, ::-1].transpose(0, 1, 3, 2, 4) for b in base]  # HND, blocks and tokens reversed
        wrap = (lambda xs: [FakeTensor(x, fake) for x in xs]) if fake else (lambda xs: xs)
        with cachegen.Context(cfg) as ctx:
            layout_src = cachegen.Layout.from_tensors(wrap(src), AXES_VLLM)
            layout_dst = cachegen.Layout.from_tensors(wrap(rev), AXES_VLLM)
            assert layout_dst.stride_block < 0 and layout_dst.stride_token < 0 and layout_src.dtype == dtype
            with ctx.store(layout_src, toks, range(8)) as job:
                assert job.wait(timeout=30) and job.info()["chunks_ok"] == 2
            with ctx.load(layout_dst, toks, range(8)) as job:
                assert job.wait(timeout=30) and job.failed_blocks() == []
            for a, b in zip(src, rev):
                assert np.array_equal(a.view(np.uint8), np.ascontiguousarray(b).view(np.uint8)), dtype


def test_a_layout_of_another_geometry_gets_failed_blocks_and_is_not_written():
    """The namespace does not name the model's geometry: a chunk stored with
    3 layers x 2 heads x 8 dims is found by lookup, but loading it into another
    geometry fails its blocks and writes nothing."""
    rng = np.random.default_rng(3)
    src = [rng.standard_normal((2, 4, BS, 2, 8)).astype(np.float16) for _ in range(3)]
    with cachegen.Context(config()) as ctx:
        with ctx.store(cachegen.Layout.from_tensors(src, AXES_VLLM), range(64), range(4)) as job:
            assert job.wait(timeout=30) and job.info()["chunks_ok"] == 1
        assert ctx.lookup(range(64))[0] == 64
        for shape, layers in [((2, 4, BS, 2, 8), 2), ((2, 4, BS, 1, 8), 3), ((2, 4, BS, 2, 16), 3)]:
            dst = [np.full(shape, 7, np.float16) for _ in range(layers)]
            with ctx.load(cachegen.Layout.from_tensors(dst, AXES_VLLM), range(64), range(4)) as job:
                assert job.wait(timeout=30)
                assert job.failed_blocks() == [0, 1, 2, 3] and len(job.errors()) == 1, (shape, layers)
            assert all((d == 7).all() for d in dst), (shape, layers)


def test_layout_keeps_its_arrays_alive(kv, decoded):
    k, v, toks = kv
    dk, dv = decoded
    with cachegen.Context(config()) as ctx:
        src = vllm(20)
        src.fill(k, v, list(range(20)), N_TOK)
        layout = src.layout
        del src  # the layout alone holds the arrays now
        gc.collect()
        with ctx.store(layout, toks, list(range(20))) as job:
            assert job.wait(timeout=60) and job.info()["chunks_ok"] == 5
        dst = vllm(20)
        job = ctx.load(dst.layout, toks, list(range(20)))
        canon = dst.canon
        del dst  # the job holds the destination
        gc.collect()
        assert job.wait(timeout=60) and job.failed_blocks() == []
        got_k = np.stack([c[0].reshape(-1, 3, 64) for c in canon])
        assert_same(got_k, dk, "keys")


def test_salt_separates(kv, decoded):
    k, v, toks = kv
    with cachegen.Context(config()) as ctx:
        assert store_all(ctx, k, v, toks, salt=b"tenant-a\x00lora-1")["chunks_ok"] == 5
        assert ctx.lookup(toks)[0] == 0
        assert ctx.lookup(toks, salt=b"tenant-b")[0] == 0
        assert ctx.lookup(toks, salt=b"tenant-a")[0] == 0
        assert ctx.lookup(toks, salt=b"tenant-a\x00lora-1")[0] == 320
        dst = vllm(20)
        with ctx.load(dst.layout, toks, range(20), salt=b"tenant-b") as job:
            assert job.wait(timeout=30)
            assert job.failed_blocks() == list(range(20)) and job.info()["chunks_failed"] == 5
        with ctx.load(dst.layout, toks, range(20), salt="tenant-a\x00lora-1") as job:
            assert job.wait(timeout=30) and job.failed_blocks() == []
        assert_same(dst.read(list(range(20)), 0, N_TOK)[1], decoded[1], "values")


def test_partial_load_with_first_token(kv, decoded):
    k, v, toks = kv
    dk, dv = decoded
    with cachegen.Context(config()) as ctx:
        store_all(ctx, k, v, toks, n=256, num_blocks=16)
        assert ctx.lookup(toks)[0] == 256
        dst = vllm(16)
        blocks = list(range(15, -1, -1))
        # The engine has the first 48 tokens (3 blocks): a marker there must survive.
        for view in dst.canon:
            view[:, blocks[:3]] = np.frombuffer(b"\x55\x55", np.float16)[0]
        marker = dst.read(blocks, 0, 48)
        with ctx.load(dst.layout, toks[:256], blocks, first_token=48) as job:
            assert all(job.wait_layer(l, timeout=60) for l in range(30))
            assert job.wait(timeout=60)
            info = job.info()
            assert (info["chunks_ok"], info["chunks_failed"], info["failed_blocks"]) == (4, 0, 0)
        got = dst.read(blocks, 0, 48)
        assert_same(got[0], marker[0], "marker keys overwritten")
        assert_same(got[1], marker[1], "marker values overwritten")
        got_k, got_v = dst.read(blocks, 48, 256)
        assert_same(got_k, dk[:, 48:256], "keys")
        assert_same(got_v, dv[:, 48:256], "values")
        # first_token must be block aligned.
        with pytest.raises(cachegen.CacheGenError) as e:
            ctx.load(dst.layout, toks[:256], blocks, first_token=40)
        assert e.value.code == cachegen.CG_ERR_INVALID_ARGUMENT and "first_token" in e.value.message


def test_leases(kv):
    k, v, toks = kv
    with cachegen.Context(config()) as ctx:
        store_all(ctx, k, v, toks, n=128, num_blocks=8)
        matched, lease = ctx.lookup(toks, lease_ms=60_000)
        assert matched == 128 and lease != 0
        assert ctx.stats()["leases_active"] == 1
        ctx.release_lease(lease)
        ctx.release_lease(lease)  # ended already: not an error
        ctx.release_lease(0)
        assert ctx.stats()["leases_active"] == 0
        assert ctx.lookup(toks[64:], lease_ms=1000) == (0, 0), "no lease when nothing is found"
        matched, lease = ctx.lookup(toks, lease_ms=60_000)
        dst = vllm(8)
        with ctx.load(dst.layout, toks[:matched], range(8), lease_id=lease) as job:
            assert job.wait(timeout=60) and job.failed_blocks() == []
        assert ctx.stats()["leases_active"] == 0, "the load consumed the lease"
        assert ctx.stats()["counters"]["leases_granted"] == 2
        with pytest.raises(cachegen.CacheGenError) as e:
            ctx.lookup(toks, lease_ms=2**32)
        assert e.value.code == cachegen.CG_ERR_INVALID_ARGUMENT


def test_load_of_tokens_never_stored_fails_those_blocks(kv, decoded):
    k, v, toks = kv
    dk, dv = decoded
    with cachegen.Context(config()) as ctx:
        store_all(ctx, k, v, toks, n=192, num_blocks=12)
        dst = vllm(20)
        blocks = list(range(20))
        with ctx.load(dst.layout, toks, blocks) as job:
            assert all(job.wait_layer(l, timeout=60) for l in range(30))
            assert job.wait(timeout=60)
            info = job.info()
            assert (info["chunks_ok"], info["chunks_failed"], info["failed_blocks"], info["layers_done"]) == (3, 2, 8, 30)
            assert job.failed_blocks() == list(range(12, 20))
            errs = job.errors()
            assert len(errs) == 2 and all(errs), errs
        got_k, got_v = dst.read(blocks, 0, 192)
        assert_same(got_k, dk[:, :192], "keys")
        assert_same(got_v, dv[:, :192], "values")
        c = ctx.stats()["counters"]
        assert (c["load_chunks_ok"], c["load_chunks_failed"], c["load_blocks_failed"]) == (3, 2, 8)


def test_chunk_decisions_of_a_multi_level_load(kv, decoded):
    """cg_job_chunk_decisions: a load over chunks stored at two levels fetches
    the configured level; a chunk never stored is left for recompute."""
    k, v, toks = kv
    extra = np.arange(64, dtype=np.uint32) + 7
    longer = np.concatenate([toks, extra])
    with cachegen.Context(config(levels=["compact", "default"], level="default")) as ctx:
        store_all(ctx, k, v, toks)
        dst = vllm(24)
        blocks = list(range(24))
        with ctx.load(dst.layout, longer, blocks) as job:
            assert job.wait(timeout=60)
            d = job.chunk_decisions()
            assert [x["chunk"] for x in d] == list(range(6))
            assert all(x["planned"] == "default" for x in d)
            assert [x["outcome"] for x in d] == ["default"] * 5 + ["recompute"]
            assert all(x["bytes"] > 0 for x in d[:5]) and d[5]["bytes"] == 0
            assert job.failed_blocks() == list(range(20, 24))
        got_k, got_v = dst.read(blocks, 0, N_TOK)
        dk, dv = decoded
        assert_same(got_k, dk, "keys")
        assert_same(got_v, dv, "values")
    # A single-level context makes no level decisions.
    with cachegen.Context(config()) as ctx:
        store_all(ctx, k, v, toks)
        dst = vllm(20)
        with ctx.load(dst.layout, toks, list(range(20))) as job:
            assert job.wait(timeout=60)
            assert job.chunk_decisions() == []


def files_under(d):
    return {p for p in Path(d).rglob("*") if p.is_file()}


def test_corrupt_disk_file_fails_its_blocks_only(kv, decoded, tmp_path):
    k, v, toks = kv
    dk, dv = decoded
    cfg = config(tiers={"disk": {"path": str(tmp_path / "disk"), "bytes": 100_000_000}})
    src = vllm(20)
    src.fill(k, v, list(range(20)), N_TOK)
    with cachegen.Context(cfg) as ctx:
        with ctx.store(src.layout, toks[:128], range(20)) as job:
            assert job.wait(timeout=60) and job.info()["chunks_ok"] == 2
        before = files_under(tmp_path / "disk")
        with ctx.store(src.layout, toks, range(20)) as job:
            assert job.wait(timeout=60)
            assert (job.info()["chunks_ok"], job.info()["chunks_skipped"]) == (3, 2)
        # Storing chunks 2..4 added three files; the one for chunk 2 is found by
        # storing 192 tokens in a scratch directory with the same keys.
    with cachegen.Context(config(tiers={"disk": {"path": str(tmp_path / "probe"), "bytes": 100_000_000}})) as probe:
        with probe.store(src.layout, toks[:192], range(20)) as job:
            assert job.wait(timeout=60)
    chunk2 = {p.relative_to(tmp_path / "probe") for p in files_under(tmp_path / "probe")}
    chunk2 -= {p.relative_to(tmp_path / "disk") for p in before}
    assert len(chunk2) == 1, chunk2
    path = tmp_path / "disk" / chunk2.pop()
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))

    with cachegen.Context(cfg) as ctx:  # a new context finds the files again
        assert ctx.lookup(toks)[0] == 320
        dst = vllm(20)
        blocks = [19 - i for i in range(20)]
        with ctx.load(dst.layout, toks, blocks) as job:
            assert job.wait(timeout=60)
            assert job.failed_blocks() == sorted(blocks[8:12]), job.errors()
            info = job.info()
            assert (info["chunks_ok"], info["chunks_failed"]) == (4, 1)
            assert len(job.errors()) == 1
        for c in (0, 1, 3, 4):
            s, e = c * CHUNK, (c + 1) * CHUNK
            got_k, got_v = dst.read(blocks, s, e)
            assert_same(got_k, dk[:, s:e], f"chunk {c} keys")
            assert_same(got_v, dv[:, s:e], f"chunk {c} values")
        assert ctx.lookup(toks)[0] == 128, "the corrupt entry is dropped"


def test_error_codes_and_messages(kv):
    k, v, toks = kv
    E = cachegen.CacheGenError
    cases = [
        ('{"namespace": {"model": "m"', cachegen.CG_ERR_CONFIG),
        ({"namespace": {"model": "m"}, "chunk_tokenz": 64}, cachegen.CG_ERR_CONFIG),
        ({"namespace": {"model": "m", "kv_dtype": "fp8_e5m2"}}, cachegen.CG_ERR_CONFIG),
        ({"namespace": {"model": "m"}, "chunk_tokens": 60}, cachegen.CG_ERR_CONFIG),
        ({"namespace": {"model": ""}}, cachegen.CG_ERR_CONFIG),
    ]
    for cfg, code in cases:
        with pytest.raises(E) as e:
            cachegen.Context(cfg)
        assert e.value.code == code and e.value.message, (cfg, e.value)
    with pytest.raises(E) as e:
        cachegen.Context({"namespace": {"model": "m"}, "chunk_tokenz": 64})
    assert "chunk_tokenz" in e.value.message

    base = [0x1000_0000, 0x2000_0000]  # never touched: a layout is only validated

    def layout(**kw):
        args = dict(kind="kv", dtype="f16", layers=2, num_blocks=8, block_size=BS, heads=3, head_dim=64,
                    layer_base=base, stride_block=BS * 3 * 64 * 2, stride_kv=8 * BS * 3 * 64 * 2,
                    stride_token=3 * 64 * 2, stride_head=64 * 2)
        args.update(kw)
        return cachegen.Layout(**args)

    layout().close()
    for kw in [dict(stride_token=64), dict(stride_head=2), dict(stride_kv=0), dict(num_blocks=0),
               dict(kind="latent"), dict(layer_base=[base[0], base[0]]), dict(layer_base=base[:1])]:
        with pytest.raises(E) as e:
            layout(**kw)
        assert e.value.code == cachegen.CG_ERR_LAYOUT and e.value.message, kw
    with pytest.raises(E) as e:  # host memory labelled as device memory
        layout(memory="cuda")
    assert e.value.code in (cachegen.CG_ERR_NO_GPU, cachegen.CG_ERR_INVALID_ARGUMENT), e.value
    assert "CG_MEMORY_CUDA" in e.value.message
    with pytest.raises(E) as e:
        layout(dtype="fp8_e5m2")
    assert e.value.code == cachegen.CG_ERR_INVALID_ARGUMENT
    with pytest.raises(E) as e:  # head_dim not contiguous
        cachegen.Layout.from_tensors([np.zeros((2, 8, BS, 64, 3), np.float16).transpose(0, 1, 2, 4, 3)], AXES_VLLM)
    assert e.value.code == cachegen.CG_ERR_LAYOUT
    with pytest.raises(E) as e:
        cachegen.Layout.from_tensors([np.zeros((2, 8, BS, 3, 64), np.float16)], ("kv", "block", "token", "heads", "dim"))
    assert e.value.code == cachegen.CG_ERR_LAYOUT and "heads" in e.value.message
    with pytest.raises(E):
        cachegen.Layout.from_tensors([np.zeros((2, 8, BS, 3, 64), np.int16)], AXES_VLLM)

    with cachegen.Context(config()) as ctx:
        # A layout whose dtype differs from the namespace's.
        f32 = vllm(20, layers=30, dtype=np.float32)
        with pytest.raises(E) as e:
            ctx.store(f32.layout, toks, range(20))
        assert e.value.code == cachegen.CG_ERR_INVALID_ARGUMENT and "dtype" in e.value.message  # docs/ABI.md
        with pytest.raises(E):
            ctx.load(f32.layout, toks, range(20))
        src = vllm(20)
        for blocks, code in [
            (range(19), cachegen.CG_ERR_INVALID_ARGUMENT),  # too few blocks for 320 tokens
            ([], cachegen.CG_ERR_INVALID_ARGUMENT),
            (list(range(19)) + [20], cachegen.CG_ERR_LAYOUT),  # out of range
            (list(range(19)) + [0], cachegen.CG_ERR_INVALID_ARGUMENT),  # twice
        ]:
            for call in (lambda: ctx.store(src.layout, toks, blocks), lambda: ctx.load(src.layout, toks, blocks)):
                with pytest.raises(E) as e:
                    call()
                assert e.value.code == code and e.value.message, (list(blocks), e.value)
        for bad_tokens in ([-1], [2**32], np.zeros((2, 2), np.uint32), ["a"], [1.5]):
            with pytest.raises(E) as e:
                ctx.lookup(bad_tokens)
            assert e.value.code == cachegen.CG_ERR_INVALID_ARGUMENT
        assert ctx.lookup([]) == (0, 0)
        # Read-only memory can be stored from, never loaded into.
        ro = [np.zeros((2, 20, BS, 3, 64), np.float16) for _ in range(30)]
        for a in ro:
            a.flags.writeable = False
        ro_layout = cachegen.Layout.from_tensors(ro, AXES_VLLM)
        with pytest.raises(E):
            ctx.load(ro_layout, toks, range(20))
        with ctx.store(ro_layout, toks, range(20)) as job:
            assert job.wait(timeout=60)
            with pytest.raises(E) as e:
                job.wait_layer(30)
            assert e.value.code == cachegen.CG_ERR_INVALID_ARGUMENT
            with pytest.raises(E):
                job.wait("durable")
        src.layout.close()
        with pytest.raises(E):
            ctx.store(src.layout, toks, range(20))
    with pytest.raises(E):  # a closed context
        ctx.lookup(toks)
    ctx.close()


def test_string_buffers_are_retried_with_the_size_asked(kv, monkeypatch):
    k, v, toks = kv
    monkeypatch.setattr(cachegen, "_INITIAL_BUFFER", 1)
    with cachegen.Context(config()) as ctx:
        s = ctx.stats()
        assert s["namespace"]["chunk_tokens"] == CHUNK
        dst = vllm(20)
        with ctx.load(dst.layout, toks, range(20)) as job:
            assert job.wait(timeout=30)
            errs = job.errors()
            assert len(errs) == 5 and all(len(e) > 10 for e in errs), errs


def test_closed_redis_port_fails_every_block_without_hanging(kv):
    k, v, toks = kv
    cfg = config(tiers={"redis": {"url": "redis://127.0.0.1:1", "timeout_ms": 200}}, load_timeout_ms=5000)
    t0 = time.monotonic()
    with cachegen.Context(cfg) as ctx:
        src = vllm(20)
        src.fill(k, v, list(range(20)), N_TOK)
        assert ctx.lookup(toks) == (0, 0)
        with ctx.store(src.layout, toks, range(20)) as job:
            assert job.wait(timeout=30)
            info = job.info()
            assert (info["chunks_ok"], info["chunks_failed"]) == (0, 5) and job.errors()
        dst = vllm(20)
        with ctx.load(dst.layout, toks, range(20)) as job:
            assert job.wait(timeout=30), "the load must end"
            assert all(job.wait_layer(l, timeout=0) for l in range(30))
            assert job.failed_blocks() == list(range(20))
            assert job.info()["chunks_failed"] == 5 and job.errors()
        s = ctx.stats()
        assert [t["name"] for t in s["tiers"]] == ["redis"]
    assert time.monotonic() - t0 < 20


class StalledRedis:
    """A hung Redis: a TCP server that accepts connections and never answers a
    command (it acknowledges only `CLIENT SETINFO`, which older redis-rs
    builds send on connecting before any timeout applies)."""

    def __init__(self):
        self.stop = threading.Event()
        self.srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(64)
        self.srv.settimeout(0.1)
        self.port = self.srv.getsockname()[1]
        self.conns = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                conn, _ = self.srv.accept()
            except OSError:
                continue
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(0.1)
        while not self.stop.is_set():
            try:
                data = conn.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            if b"SETINFO" in data:
                conn.sendall(b"+OK\r\n" * data.count(b"SETINFO"))

    def close(self):
        self.stop.set()
        self.srv.close()
        for c in self.conns:
            c.close()


@pytest.fixture
def stalled_redis():
    srv = StalledRedis()
    yield srv.port
    srv.close()


def test_wait_timeouts_return_false_then_the_load_fails(kv, stalled_redis):
    k, v, toks = kv
    cfg = config(tiers={"redis": {"url": f"redis://127.0.0.1:{stalled_redis}", "timeout_ms": 300}}, load_timeout_ms=1500)
    with cachegen.Context(cfg) as ctx:
        t0 = time.monotonic()
        assert ctx.lookup(toks) == (0, 0)  # EXISTS times out: nothing found
        assert time.monotonic() - t0 < 2
        dst = vllm(20)
        t0 = time.monotonic()
        with ctx.load(dst.layout, toks, range(20)) as job:
            assert job.wait(timeout=0) is False
            assert job.wait(timeout=0.05) is False
            assert job.wait("reusable", timeout=0.01) is False
            assert job.wait_layer(0, timeout=0.01) is False
            info = job.info()
            assert not info["done"] and info["layers_done"] == 0
            assert job.wait(timeout=30)
            waited = time.monotonic() - t0
            assert 0.25 < waited < 10, waited
            assert job.failed_blocks() == list(range(20))
            assert job.info()["chunks_failed"] == 5 and len(job.errors()) == 5
        # Cancelling a load ends it at once, its blocks failed.
        job = ctx.load(dst.layout, toks, range(20))
        assert job.wait(timeout=0.05) is False
        t0 = time.monotonic()
        job.cancel()
        assert job.wait(timeout=5) and time.monotonic() - t0 < 1.0
        assert job.failed_blocks() == list(range(20))
        job.close()
        with pytest.raises(cachegen.CacheGenError):
            job.info()
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 5, "closing the context waited too long for the stalled fetches"


def test_closing_from_another_thread_is_safe(kv, stalled_redis):
    """close() waits for calls in progress on other threads; those that come
    after it fail with CacheGenError, never on a freed handle."""
    k, v, toks = kv
    cfg = config(tiers={"redis": {"url": f"redis://127.0.0.1:{stalled_redis}", "timeout_ms": 300}}, load_timeout_ms=60_000)
    ctx = cachegen.Context(cfg)
    dst = vllm(20)
    job = ctx.load(dst.layout, toks, range(20))
    outcome = []

    def waiter():
        try:
            outcome.append(job.wait())  # no limit: until the job is closed under it
        except cachegen.CacheGenError as e:
            outcome.append(e.code)

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    job.close()  # cancels the load and waits for it; the waiter is released
    t.join(timeout=5)
    assert not t.is_alive() and time.monotonic() - t0 < 2
    assert outcome in ([True], [cachegen.CG_ERR_INVALID_ARGUMENT]), outcome

    # Lookups racing with close.
    errors = []

    def looker():
        for _ in range(200):
            try:
                ctx.lookup(toks[:10])
            except cachegen.CacheGenError as e:
                errors.append(e.code)
                return

    threads = [threading.Thread(target=looker) for _ in range(4)]
    for th in threads:
        th.start()
    ctx.close()
    for th in threads:
        th.join(timeout=10)
    assert not any(th.is_alive() for th in threads)
    assert set(errors) <= {cachegen.CG_ERR_INVALID_ARGUMENT}
    assert ctx.closed


SILENT_REDIS_SCRIPT = """
import sys, socket, numpy as np
sys.path.insert(0, sys.argv[1])
import cachegen
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(64)  # accepts, never answers
cfg = {"namespace": {"model": "m", "block_size": 16}, "chunk_tokens": 64, "load_timeout_ms": 500, "io_threads": 1,
       "tiers": {"redis": {"url": "redis://127.0.0.1:%d" % srv.getsockname()[1], "timeout_ms": 200}}}
arrs = [np.zeros((2, 4, 16, 1, 8), np.float16)]
layout = cachegen.Layout.from_tensors(arrs, ("kv", "block", "token", "head", "dim"))
ctx = cachegen.Context(cfg)
job = ctx.load(layout, list(range(64)), range(4))
print("load done:", job.wait(timeout=5), job.failed_blocks(), flush=True)
job.close()
ctx.close()
print("context closed", flush=True)
ctx = cachegen.Context(cfg)
print("lookup:", ctx.lookup(list(range(64))), flush=True)
"""


def test_a_silent_redis_does_not_hang_the_context(tmp_path):
    """Regression: redis-rs' connect() used to send CLIENT SETINFO and read the
    replies before any read timeout was set, so a Redis that accepts
    connections but never answers blocked the io threads, cg_lookup and
    cg_context_free forever (fixed by the crate's disable-client-setinfo
    feature). In a subprocess, so that a hang fails instead of stalling."""
    out = tmp_path / "out.txt"
    with open(out, "w") as f:
        p = subprocess.Popen([sys.executable, "-c", SILENT_REDIS_SCRIPT, str(REPO / "integrations/python")],
                             stdout=f, stderr=subprocess.STDOUT)
        try:
            rc = p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            pytest.fail(f"hung after: {out.read_text()!r}")
    assert rc == 0 and "lookup: (0, 0)" in out.read_text(), out.read_text()


def test_missing_library_is_a_clear_error(tmp_path):
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import cachegen\n"
        "try:\n    cachegen.version()\nexcept ImportError as e:\n"
        "    assert isinstance(e, cachegen.CacheGenError) and e.code == cachegen.CG_ERR_LIBRARY\n"
        "    print(e)\n"
    )
    missing = tmp_path / "nowhere" / "libcachegen.so"
    env = dict(os.environ, CACHEGEN_LIBRARY=str(missing))
    r = subprocess.run([sys.executable, "-c", code, str(REPO / "integrations/python")], env=env,
                       capture_output=True, text=True, check=True)
    assert str(missing) in r.stdout and "CACHEGEN_LIBRARY" in r.stdout, r.stdout
    # And the variable is honoured when it names the library.
    env["CACHEGEN_LIBRARY"] = str(REPO / "target/release/libcachegen.so")
    r = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); import cachegen; "
                        "print(cachegen.library_path(), cachegen.version())", str(REPO / "integrations/python")],
                       env=env, capture_output=True, text=True, check=True)
    assert r.stdout.split() == [env["CACHEGEN_LIBRARY"], "0.1.0"]


# ---------------------------------------------------------------------------
# FP8 E4M3 (vLLM --kv-cache-dtype fp8): coded in its stored units, no scales.

def _e4m3_table():
    """The value of every e4m3fn byte (NaN for 0x7F and 0xFF)."""
    vals = np.empty(256, np.float64)
    for b in range(256):
        s, e, m = b >> 7, (b >> 3) & 0xF, b & 7
        if e == 0xF and m == 7:
            v = np.nan
        elif e == 0:
            v = m / 8 * 2.0**-6
        else:
            v = (1 + m / 8) * 2.0 ** (e - 7)
        vals[b] = -v if s else v
    return vals


E4M3 = _e4m3_table()


def to_e4m3(x):
    """Nearest e4m3 byte of each value (saturating at 448; ties to the lower
    magnitude: a test helper, not the codec's conversion)."""
    x = np.asarray(x, np.float64)
    mags = E4M3[:0x7F]  # 0 .. 448, increasing
    a = np.minimum(np.abs(x), 448.0)
    i = np.clip(np.searchsorted(mags, a), 1, 0x7E)
    i = np.where(a - mags[i - 1] <= mags[i] - a, i - 1, i)
    return (i | np.where(np.signbit(x) & (i > 0), 0x80, 0)).astype(np.uint8)


def write_safetensors_u8(path, tensors, dtype="F8_E4M3"):
    header, offset, blobs = {}, 0, []
    for name, t in tensors.items():
        raw = np.ascontiguousarray(t, dtype=np.uint8).tobytes()
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors_u8(path):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        a, b = h["data_offsets"]
        out[name] = (h["dtype"], np.frombuffer(data, dtype=np.uint8, count=b - a, offset=8 + n + a).reshape(h["shape"]))
    return out


@pytest.fixture(scope="module")
def kv8(kv):
    """The fixture's K and V as e4m3 bytes [layers, 320, 3, 64] (unit scales)."""
    k, v, toks = kv
    k8, v8 = to_e4m3(k.astype(np.float32)), to_e4m3(v.astype(np.float32))
    assert np.count_nonzero(k8 & 0x7F) > 0.9 * k8.size and not np.isnan(E4M3[k8]).any()
    return k8, v8, toks


def cli_round_trip(d, name, k8, v8, level):
    """Encodes the layers' e4m3 K/V with the CLI at `level` and decodes them:
    (dtypes, K, V) as the decoded safetensors file holds them."""
    src, cg, dec = d / f"{name}.safetensors", d / f"{name}.cg", d / f"{name}.dec.safetensors"
    tensors = {}
    for i in range(k8.shape[0]):
        tensors[f"layers.{i}.key"] = k8[i]
        tensors[f"layers.{i}.value"] = v8[i]
    write_safetensors_u8(src, tensors)
    subprocess.run([str(CLI), "encode", "--level", level, str(src), str(cg)], check=True, capture_output=True)
    subprocess.run([str(CLI), "decode", str(cg), str(dec)], check=True, capture_output=True)
    got = read_safetensors_u8(dec)
    dtypes = {dt for dt, _ in got.values()}
    gk = np.stack([got[f"layers.{i}.key"][1] for i in range(k8.shape[0])])
    gv = np.stack([got[f"layers.{i}.value"][1] for i in range(k8.shape[0])])
    return dtypes, gk, gv


def test_cli_round_trips_an_fp8_safetensors_file(kv8, tmp_path):
    k8, v8, _ = kv8
    s = slice(0, CHUNK)
    dtypes, gk, gv = cli_round_trip(tmp_path, "lossless", k8[:, s], v8[:, s], "lossless")
    assert dtypes == {"F8_E4M3"}
    assert np.array_equal(gk, k8[:, s]) and np.array_equal(gv, v8[:, s])
    dtypes, gk, gv = cli_round_trip(tmp_path, "default", k8[:, s], v8[:, s], "default")
    assert dtypes == {"F8_E4M3"} and gk.shape == k8[:, s].shape
    want, got = E4M3[k8[:, s]], E4M3[gk]
    assert not np.isnan(got).any() and np.abs(got).max() <= 448
    assert not np.array_equal(gk, k8[:, s]), "the default level is lossy"
    # Close to the stored values: the error is a small part of each layer's spread.
    err = np.sqrt(((got - want) ** 2).mean(axis=(1, 2, 3)))
    rms = np.sqrt((want**2).mean(axis=(1, 2, 3)))
    assert (err < 0.2 * rms).all(), (err / rms).max()


def fp8_engine(num_blocks, layers=30, torch_like=False):
    """vLLM's fp8 cache: per layer (2, blocks, BS, heads, dim) of uint8."""
    arrs = [np.zeros((2, num_blocks, BS, 3, 64), np.uint8) for _ in range(layers)]
    tensors = [FakeTensor(a, "torch.uint8") for a in arrs] if torch_like else arrs
    return Engine(cachegen.Layout.from_tensors(tensors, AXES_VLLM, dtype="fp8"), arrs)


def test_fp8_dtype_names_and_uint8_needs_an_override():
    assert cachegen.CG_DTYPE_F8E4M3 == 4
    u8 = [np.zeros((2, 4, BS, 3, 64), np.uint8) for _ in range(2)]
    for t in (u8, [FakeTensor(a, "torch.uint8") for a in u8]):
        # uint8 is raw bytes: never taken as fp8 without being told.
        with pytest.raises(cachegen.CacheGenError, match="dtype="):
            cachegen.Layout.from_tensors(t, AXES_VLLM)
        for name in ("fp8", "fp8_e4m3", "f8e4m3", "float8_e4m3fn"):
            lay = cachegen.Layout.from_tensors(t, AXES_VLLM, dtype=name)
            assert lay.dtype == "f8e4m3" and lay.stride_token == 3 * 64 and lay.stride_head == 64
            lay.close()
        with pytest.raises(cachegen.CacheGenError, match="E5M2"):
            cachegen.Layout.from_tensors(t, AXES_VLLM, dtype="fp8_e5m2")
        # An override never reinterprets bytes as a dtype of another size.
        with pytest.raises(cachegen.CacheGenError):
            cachegen.Layout.from_tensors(t, AXES_VLLM, dtype="f16")
    # torch.float8_e4m3fn tensors are fp8 by their own dtype; a float16
    # tensor is never reinterpreted as fp8.
    lay = cachegen.Layout.from_tensors([FakeTensor(a, "torch.float8_e4m3fn") for a in u8], AXES_VLLM)
    assert lay.dtype == "f8e4m3"
    lay.close()
    f16 = [np.zeros((2, 4, BS, 3, 64), np.float16) for _ in range(2)]
    with pytest.raises(cachegen.CacheGenError, match="raw integers"):
        cachegen.Layout.from_tensors(f16, AXES_VLLM, dtype="fp8")
    # The context's namespace takes the same names and refuses E5M2.
    for name in ("fp8", "fp8_e4m3", "f8e4m3", "float8_e4m3fn"):
        cfg = config()
        cfg["namespace"]["kv_dtype"] = name
        cachegen.Context(cfg).close()
    cfg = config()
    cfg["namespace"]["kv_dtype"] = "fp8_e5m2"
    with pytest.raises(cachegen.CacheGenError, match="E5M2") as e:
        cachegen.Context(cfg)
    assert e.value.code == cachegen.CG_ERR_CONFIG


@pytest.mark.parametrize("level", ["default", "lossless"])
def test_fp8_store_and_load_through_the_binding(kv8, tmp_path, level):
    """vLLM-style uint8 fp8 caches: stored from one layout, loaded into an
    HND-like torch-like one; lossless gives the bytes back, the default level
    gives exactly what the CLI's encode/decode of each chunk gives."""
    k8, v8, toks = kv8
    n = 3 * CHUNK
    cfg = config(level=level)
    cfg["namespace"]["kv_dtype"] = "fp8"
    with cachegen.Context(cfg) as ctx:
        src = fp8_engine(16)
        blocks = list(range(15, 3, -1))
        src.fill(k8, v8, blocks, n)
        with ctx.store(src.layout, toks[:n], blocks) as job:
            assert job.wait(timeout=60) and job.info()["chunks_ok"] == 3
        assert ctx.lookup(toks[:n])[0] == n
        # An f16 layout does not load fp8 chunks.
        with pytest.raises(cachegen.CacheGenError):
            ctx.load(vllm(16).layout, toks[:n], blocks)
        dst = fp8_engine(12, torch_like=True)
        dst_blocks = [(i * 5 + 2) % 12 for i in range(12)]
        with ctx.load(dst.layout, toks[:n], dst_blocks) as job:
            assert job.wait(timeout=60) and job.failed_blocks() == []
        gk, gv = dst.read(dst_blocks, 0, n)
    if level == "lossless":
        assert np.array_equal(gk, k8[:, :n]) and np.array_equal(gv, v8[:, :n])
        return
    assert not np.array_equal(gk, k8[:, :n])
    for c in range(n // CHUNK):
        s = slice(c * CHUNK, (c + 1) * CHUNK)
        _, ck, cv = cli_round_trip(tmp_path, f"chunk{c}", k8[:, s], v8[:, s], "default")
        assert np.array_equal(gk[:, s], ck) and np.array_equal(gv[:, s], cv), f"chunk {c}"

"""CacheGenConnector driven through vLLM's own machinery on a CPU-only machine.

Run with the vLLM venv (scripts/vllm_env.sh installs vLLM 0.33.0 the slim way):

    scripts/vllm_env.sh && .cache/vllm-venv/bin/python -m pytest -q tests/python/test_vllm_connector.py

What is real: vLLM's config classes, ``KVConnectorFactory`` (the connector is
loaded from ``kv_connector_module_path`` exactly as ``--kv-transfer-config``
does), the V1 ``Scheduler`` (prefix cache, block allocation, connector
calls, ``update_from_output`` and its invalid-block recompute path), the
model-runner mixin that calls the worker hooks around a forward
(``KVConnectorModelRunnerMixin``), the ``maybe_transfer_kv_layer`` decorator
that calls ``wait_for_layer_load`` / ``save_kv_layer`` per attention layer,
and ``ensure_kv_transfer_initialized`` under a real (gloo, world size 1)
distributed environment. What is not: the model forward. The "attention
kernel" here writes known pseudo-random K/V for each scheduled token into its
slot of vLLM's CPU KV tensors, so what a load put into a block can be
checked byte for byte.

vLLM missing is a failure, not a skip: the test command installs it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

try:
    import torch
    import vllm  # noqa: F401
except ImportError as e:  # fail loudly: this test must run against the real engine
    raise ImportError(
        f"vLLM is not importable ({e}); run scripts/vllm_env.sh and use .cache/vllm-venv/bin/python"
    ) from e

import cachegen
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.distributed.kv_transfer import kv_transfer_state
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.forward_context import set_forward_context
from vllm.model_executor.layers.attention.kv_transfer_utils import maybe_transfer_kv_layer
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager
from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

BLOCK = 16
CHUNK = 32  # libcachegen chunk: 2 blocks
LAYERS = 2
KV_HEADS = 2
HEAD_DIM = 16
NUM_BLOCKS = 48
VOCAB = 1000
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
EOS = VOCAB - 1


# ---------------------------------------------------------------------------
# Fixtures: a hand-written tiny llama, a distributed environment of one


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny-llama")
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-5,
        "torch_dtype": "float16",
        "eos_token_id": EOS,
        "bos_token_id": 1,
    }))
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed(model_dir):
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )

    vc = make_config(model_dir, {"tiers": {"memory": {"bytes": 1 << 20}}})
    with set_current_vllm_config(vc):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0,
            distributed_init_method=f"tcp://127.0.0.1:{_free_port()}", backend="gloo",
        )
        initialize_model_parallel(1, 1)
    init_none_hash(sha256)
    yield
    destroy_model_parallel()
    destroy_distributed_environment()


def serve_args(model_dir: Path, extra: dict, prefix_caching: bool = True) -> list:
    """The `vllm serve` command line of this test's engine (less `serve`)."""
    kv_transfer = {
        "kv_connector": "CacheGenConnector",
        "kv_connector_module_path": "cachegen_vllm.connector",
        "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": extra,
    }
    return [
        "--model", str(model_dir), "--skip-tokenizer-init", "--dtype", "float16", "--seed", "0",
        "--max-model-len", "512", "--max-num-seqs", "8", "--max-num-batched-tokens", "512",
        "--block-size", str(BLOCK),
        "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching",
        "--kv-transfer-config", json.dumps(kv_transfer),
    ]


def make_config(model_dir: Path, extra: dict, prefix_caching: bool = True) -> VllmConfig:
    """A VllmConfig built the way `vllm serve` builds it: vLLM's own argument
    parser reads --kv-transfer-config as JSON, then EngineArgs makes the config."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(serve_args(model_dir, extra, prefix_caching))
    vc = EngineArgs.from_cli_args(args).create_engine_config()
    assert vc.kv_transfer_config.kv_connector == "CacheGenConnector"
    assert vc.kv_transfer_config.kv_connector_extra_config == extra
    assert vc.cache_config.block_size == BLOCK
    return vc


# ---------------------------------------------------------------------------
# The "attention kernel": known K/V per (layer, position, token)


def true_kv(layer: int, pos: int, token: int) -> np.ndarray:
    """K and V of one token, shape (2, heads, dim): deterministic, f16."""
    rng = np.random.default_rng([layer, pos, token])
    return rng.standard_normal((2, KV_HEADS, HEAD_DIM)).astype(np.float16)


def read_token(kv: torch.Tensor, block: int, offset: int) -> np.ndarray:
    """(2, heads, dim) of one slot of a (2, blocks, block_size, heads, dim) tensor."""
    return kv[:, block, offset].numpy().copy()


class Engine:
    """One engine instance: the real Scheduler (with its SCHEDULER-role
    connector) and the WORKER-role connector over CPU KV tensors in vLLM's
    layout, stepped as the V1 engine core steps them (in one process)."""

    def __init__(self, model_dir: Path, extra: dict, layout: str = "NHD", prefix_caching: bool = True,
                 num_blocks: int = NUM_BLOCKS):
        self.vc = make_config(model_dir, extra, prefix_caching)
        self.vc.cache_config.num_gpu_blocks = num_blocks
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float16)
        self.kvc = KVCacheConfig(
            num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(list(LAYER_NAMES), spec)],
        )
        with set_current_vllm_config(self.vc):
            self.scheduler = Scheduler(
                vllm_config=self.vc,
                kv_cache_config=self.kvc,
                structured_output_manager=StructuredOutputManager(self.vc),
                block_size=BLOCK,
                log_stats=True,
            )
            kv_transfer_state.ensure_kv_transfer_shutdown()
            kv_transfer_state.ensure_kv_transfer_initialized(self.vc, self.kvc)
        self.worker = kv_transfer_state.get_kv_transfer_group()
        assert type(self.worker).__name__ == "CacheGenConnector" and self.worker.role == KVConnectorRole.WORKER
        assert type(self.scheduler.connector).__name__ == "CacheGenConnector"
        # vLLM's flash-attn shape; HND permutes the strides, not the shape.
        shape = (2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM)
        self.kv = {}
        for name in LAYER_NAMES:
            if layout == "HND":
                t = torch.zeros(2, num_blocks, KV_HEADS, BLOCK, HEAD_DIM, dtype=torch.float16).permute(0, 1, 3, 2, 4)
            else:
                t = torch.zeros(shape, dtype=torch.float16)
            assert tuple(t.shape) == shape
            self.kv[name] = t
        self.worker.register_kv_caches(self.kv)
        ctx = self.vc.compilation_config.static_forward_context
        ctx.clear()
        for name in LAYER_NAMES:
            ctx[name] = SimpleNamespace(kv_cache=self.kv[name])
        self.calls = []  # worker-side hooks as vLLM called them
        for hook in ("bind_connector_metadata", "start_load_kv", "wait_for_layer_load", "save_kv_layer",
                     "wait_for_save", "get_finished", "get_block_ids_with_load_errors", "clear_connector_metadata"):
            setattr(self.worker, hook, self._spy(hook, getattr(self.worker, hook)))
        self.last_output = None

    def _spy(self, hook, fn):
        def call(*args, **kwargs):
            self.calls.append(hook + (f"({args[0]})" if args and isinstance(args[0], str) else ""))
            return fn(*args, **kwargs)
        return call

    # -- requests

    def add(self, req_id: str, tokens: list, max_tokens: int = 2) -> Request:
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        sp.update_from_generation_config({}, EOS)
        req = Request(req_id, list(tokens), sp, pooling_params=None,
                      block_hasher=get_request_block_hasher(BLOCK, sha256))
        self.scheduler.add_request(req)
        return req

    def block_ids(self, req_id: str) -> list:
        return list(self.scheduler.kv_cache_manager.get_block_ids(req_id)[0])

    # -- one engine step

    def step(self):
        so = self.scheduler.schedule()
        self.calls.clear()
        with set_current_vllm_config(self.vc):
            kv_out = self._execute(so)
        req_ids = list(so.num_scheduled_tokens)
        out = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[7] for _ in req_ids],
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=None,
            kv_connector_output=kv_out,
        )
        self.last_output = out
        self.scheduler.update_from_output(so, out)
        return so, kv_out

    def _execute(self, so):
        """What GPUModelRunner.execute_model does around the forward."""
        slots = {}
        for req_id, n in so.num_scheduled_tokens.items():
            req = self.scheduler.requests[req_id]
            start = req.num_computed_tokens - n  # schedule() already advanced it
            blocks = self.block_ids(req_id)
            toks = req.all_token_ids
            slots[req_id] = [(pos, toks[pos], blocks[pos // BLOCK], pos % BLOCK) for pos in range(start, start + n)]
        attn_meta = {name: SimpleNamespace() for name in LAYER_NAMES}
        with set_forward_context(attn_meta, self.vc, slot_mapping={n: torch.zeros(1) for n in LAYER_NAMES}):
            with KVConnectorModelRunnerMixin.maybe_get_kv_connector_output(so) as kv_out:
                for li, name in enumerate(LAYER_NAMES):
                    self._attention(name, li, slots)
        return kv_out

    @maybe_transfer_kv_layer
    def _attention(self, layer_name: str, li: int, slots: dict):
        kv = self.kv[layer_name]
        for entries in slots.values():
            for pos, tok, block, off in entries:
                kv[:, block, off] = torch.from_numpy(true_kv(li, pos, tok))

    def run_until_done(self, max_steps: int = 20):
        for _ in range(max_steps):
            if not self.scheduler.has_requests():
                return
            self.step()
        raise AssertionError("requests did not finish")

    def close(self):
        self.scheduler.shutdown()
        kv_transfer_state.ensure_kv_transfer_shutdown()


def wait_store_durable(ctx_stats, expect_chunks: int, timeout: float = 20.0):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        c = ctx_stats()["counters"]
        if c.get("store_chunks_written", 0) >= expect_chunks:
            return c
        time.sleep(0.02)
    raise AssertionError(f"stores not durable: {ctx_stats()['counters']}")


def lib_config(disk: Path, memory: bool = True) -> dict:
    tiers = {"disk": {"path": str(disk), "bytes": 1 << 26}}
    if memory:
        tiers["memory"] = {"bytes": 1 << 24}
    return {"tiers": tiers, "chunk_tokens": CHUNK, "level": "default", "io_threads": 2, "decode_threads": 2,
            "load_timeout_ms": 10_000}


def connector_namespace(engine: Engine) -> dict:
    return engine.worker._settings.lib_config["namespace"]


# ---------------------------------------------------------------------------


def calibrated_tables(tmp_path: Path) -> Path:
    """A default-level table set for this model's KV shape, made by `cachegen
    calibrate` from KV of the same kind as the test kernel's (N(0, 1) values)."""
    sys.path.insert(0, str(REPO / "scripts/model"))
    import kvfile

    rng = np.random.default_rng(7)
    kv = {}
    for i in range(LAYERS):
        for part in ("key", "value"):
            kv[f"layers.{i}.{part}"] = rng.standard_normal((4 * CHUNK, KV_HEADS, HEAD_DIM)).astype(np.float32)
    src, out = tmp_path / "calib.safetensors", tmp_path / "default.cgts"
    kvfile.write_kv(src, kv, "f16")
    subprocess.run([str(REPO / "target/release/cachegen"), "calibrate", "--level", "default", "--chunk-tokens", str(CHUNK),
                    "-o", str(out), str(src)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize("layout,variant", [("NHD", ""), ("HND", ""), ("NHD", "tables"), ("NHD", "levels")])
def test_store_then_load_through_scheduler(model_dir, distributed, tmp_path, layout, variant):
    rng = np.random.default_rng(1)
    prompt_a = [int(t) for t in rng.integers(2, VOCAB - 2, 100)]
    extra = lib_config(tmp_path / "tier")
    tables = variant == "tables"
    if tables:
        # Chunks reference a model-level table set (passed through to the library).
        extra["tables"] = {"default": str(calibrated_tables(tmp_path))}
    if variant == "levels":
        # Every chunk stored at two levels (passed through to the library);
        # loads take the configured level, and the reference load below
        # (same config) must agree.
        extra["levels"] = ["compact", "default"]
        extra["level"] = "default"

    # Engine 1 computes request A; its full chunks (3 x 32 tokens) are stored.
    e1 = Engine(model_dir, extra, layout)
    ns = connector_namespace(e1)
    assert ns["block_size"] == BLOCK and ns["kv_dtype"] == "f16" and ns["tp_world_size"] == 1 and ns["tp_rank"] == 0
    assert str(model_dir) in ns["model"]
    assert e1.scheduler.connector._shared is e1.worker._shared  # one context per process and config
    e1.add("A", prompt_a)
    so, kv_out = e1.step()
    assert so.num_scheduled_tokens["A"] == 100
    assert so.kv_connector_metadata.requests[0].save_tokens == 96
    assert not kv_out.invalid_block_ids
    layer_hooks = [f"{h}({n})" for n in LAYER_NAMES for h in ("wait_for_layer_load", "save_kv_layer")]
    after = ["wait_for_save", "get_finished", "get_block_ids_with_load_errors", "clear_connector_metadata"]
    # No sync load this step: vLLM starts (async) loads after the forward.
    assert e1.calls == ["bind_connector_metadata", *layer_hooks, "start_load_kv", *after]
    e1.run_until_done()
    wait_store_durable(e1.worker.stats, 3)
    if variant == "levels":
        stored = e1.worker.stats()["streaming"]["stored_chunks"]
        assert (stored["compact"], stored["default"]) == (3, 3), stored
    e1.close()
    if tables:
        # The set is part of the namespace: a context without it finds nothing.
        with cachegen.Context(dict(extra, tables={}, namespace=dict(ns))) as plain:
            assert plain.lookup(prompt_a[:96])[0] == 0

    # Engine 2: a fresh instance on the same storage (the disk tier is found
    # again on open), with different KV memory.
    e2 = Engine(model_dir, extra, layout)
    ctx_stats = e2.worker.stats
    # P shares A's first 48 tokens: vLLM has nothing locally; one chunk loads.
    prompt_p = prompt_a[:48] + [int(t) for t in rng.integers(2, VOCAB - 2, 10)]
    e2.add("P", prompt_p)
    so, kv_out = e2.step()
    assert so.scheduled_new_reqs[0].num_computed_tokens == CHUNK
    assert so.num_scheduled_tokens["P"] == len(prompt_p) - CHUNK
    assert so.has_sync_kv_loads
    [meta_p] = [m for m in so.kv_connector_metadata.requests if m.req_id == "P"]
    assert (meta_p.load_tokens, meta_p.first_token) == (CHUNK, 0)
    assert not kv_out.invalid_block_ids
    blocks_p = e2.block_ids("P")
    e2.run_until_done()

    # B = A's 96 stored tokens + 20 new ones. vLLM's prefix cache has P's first
    # 3 blocks (48 tokens, = A's); the connector is asked with 48 local tokens,
    # finds 96, and loads tokens 48..95 (the second chunk partially).
    prompt_b = prompt_a[:96] + [int(t) for t in rng.integers(2, VOCAB - 2, 20)]
    req_b = e2.add("B", prompt_b)
    matched = e2.scheduler.connector.get_num_new_matched_tokens(req_b, 48)
    assert matched == (48, False)
    assert e2.scheduler.connector.get_num_new_matched_tokens(req_b, 48) == (48, False)  # idempotent
    assert e2.scheduler.connector.get_num_new_matched_tokens(req_b, 96) == (0, False)
    so, kv_out = e2.step()
    [new_b] = so.scheduled_new_reqs
    assert new_b.num_computed_tokens == 96
    assert so.num_scheduled_tokens["B"] == 20
    [meta_b] = [m for m in so.kv_connector_metadata.requests if m.req_id == "B"]
    assert (meta_b.load_tokens, meta_b.first_token) == (96, 48)
    assert not kv_out.invalid_block_ids
    # A sync load: started before the forward, awaited per layer.
    assert e2.calls == ["bind_connector_metadata", "start_load_kv", *layer_hooks, *after]
    blocks_b = e2.block_ids("B")
    assert blocks_b[:3] == blocks_p[:3]  # vLLM's own prefix-cache hit

    # What the load wrote: close to the originals (quantization error), and
    # identical to an independent load of the same chunks by a plain Context.
    loaded = {name: e2.kv[name].clone() for name in LAYER_NAMES}
    ref_kv = [torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.float16) for _ in LAYER_NAMES]
    ref_cfg = dict(extra, namespace=dict(ns))
    with cachegen.Context(ref_cfg) as ref:
        ref_layout = cachegen.Layout.from_tensors(ref_kv, ("kv", "block", "token", "head", "dim"))
        ref_blocks = list(range(NUM_BLOCKS - 1, NUM_BLOCKS - 1 - 6, -1))
        job = ref.load(ref_layout, prompt_b[:96], ref_blocks)
        assert job.wait(timeout=30) and job.failed_blocks() == []
        job.close()
    max_err = 0.0
    for li, name in enumerate(LAYER_NAMES):
        for pos in range(48, 96):
            got = read_token(loaded[name], blocks_b[pos // BLOCK], pos % BLOCK)
            ref_tok = ref_kv[li][:, ref_blocks[pos // BLOCK], pos % BLOCK].numpy()
            np.testing.assert_array_equal(got, ref_tok)
            err = np.abs(got.astype(np.float32) - true_kv(li, pos, prompt_b[pos]).astype(np.float32)).max()
            max_err = max(max_err, float(err))
        for pos in range(96, 116):  # computed by the "kernel" this step
            got = read_token(loaded[name], blocks_b[pos // BLOCK], pos % BLOCK)
            np.testing.assert_array_equal(got, true_kv(li, pos, prompt_b[pos]))
    assert 0 < max_err < 0.5, max_err  # lossy, but close (values are ~N(0, 1))

    stats = ctx_stats()
    c = stats["counters"]
    assert c["load_chunks_ok"] >= 3 and c.get("load_chunks_failed", 0) == 0, c
    if variant == "levels":
        loaded_levels = stats["streaming"]["loaded_chunks"]
        assert loaded_levels["default"] >= 3 and loaded_levels["compact"] == 0, loaded_levels
    # Scheduler and worker share the context here, so each load carried a
    # lease; the loads ended them once their chunks were fetched.
    assert c["leases_granted"] == 2 and stats["leases_active"] == 0, stats
    e2.run_until_done()
    e2.close()


def test_failed_load_is_recomputed(model_dir, distributed, tmp_path):
    """A corrupted entry fails its chunk: the blocks come back through
    get_block_ids_with_load_errors -> KVConnectorOutput.invalid_block_ids, and
    the scheduler (policy "recompute") rewinds the request to the first bad block."""
    rng = np.random.default_rng(2)
    prompt_a = [int(t) for t in rng.integers(2, VOCAB - 2, 100)]
    disk = tmp_path / "tier"
    extra = lib_config(disk, memory=False)

    def entries() -> set:
        return {p for p in disk.rglob("*") if p.is_file() and not p.name.startswith(".")}

    e1 = Engine(model_dir, extra)
    # Prefixes of A one chunk longer each time: each step's new file is the next chunk.
    files = []
    for n, length in enumerate((33, 65, 100)):
        before = entries()
        e1.add(f"A{n}", prompt_a[:length], max_tokens=1)
        e1.run_until_done()
        wait_store_durable(e1.worker.stats, n + 1)
        new = entries() - before
        assert len(new) == 1, new
        files.append(new.pop())
    e1.close()

    e2 = Engine(model_dir, extra)  # indexes the three entries
    raw = bytearray(files[1].read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    files[1].write_bytes(bytes(raw))  # chunk 1 (tokens 32..63) is now corrupt

    prompt_b = prompt_a[:96] + [5, 6, 7]
    req = e2.add("B", prompt_b)
    so, kv_out = e2.step()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 96
    blocks = e2.block_ids("B")
    assert kv_out.invalid_block_ids == {blocks[2], blocks[3]}
    assert req.num_computed_tokens == 32  # rewound to the first failed block
    # The chunks that did load hold the right data.
    for li, name in enumerate(LAYER_NAMES):
        for pos in list(range(0, 32)) + list(range(64, 96)):
            got = read_token(e2.kv[name], blocks[pos // BLOCK], pos % BLOCK).astype(np.float32)
            assert np.abs(got - true_kv(li, pos, prompt_b[pos])).max() < 0.5
    c = e2.worker.stats()["counters"]
    assert c["load_chunks_failed"] == 1 and c["load_chunks_ok"] == 2, c
    # The step's store was cut before the failed block: nothing written from garbage.
    assert c["store_chunks_written"] == 0, c

    so, kv_out = e2.step()
    assert so.num_scheduled_tokens["B"] == len(prompt_b) - 32  # recomputed from there
    assert not kv_out.invalid_block_ids
    for li, name in enumerate(LAYER_NAMES):
        for pos in range(32, len(prompt_b)):
            np.testing.assert_array_equal(read_token(e2.kv[name], blocks[pos // BLOCK], pos % BLOCK),
                                          true_kv(li, pos, prompt_b[pos]))
    e2.run_until_done()
    # Once recomputed, the chunk is stored again (the others exist) ...
    c = wait_store_durable(e2.worker.stats, 1)
    assert c["store_chunks_written"] == 1, c
    ns = connector_namespace(e2)
    e2.close()
    # ... with the right data.
    ref_kv = [torch.zeros(2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.float16) for _ in LAYER_NAMES]
    with cachegen.Context(dict(extra, namespace=dict(ns))) as ref:
        assert ref.lookup(prompt_b[:96])[0] == 96
        layout = cachegen.Layout.from_tensors(ref_kv, ("kv", "block", "token", "head", "dim"))
        job = ref.load(layout, prompt_b[:96], list(range(6)))
        assert job.wait(timeout=30) and job.failed_blocks() == []
        job.close()
    for li in range(LAYERS):
        for pos in range(96):
            got = ref_kv[li][:, pos // BLOCK, pos % BLOCK].numpy().astype(np.float32)
            assert np.abs(got - true_kv(li, pos, prompt_b[pos])).max() < 0.5


def test_full_prompt_hit_leaves_a_token(model_dir, distributed, tmp_path):
    """A prompt that is exactly stored chunks is never reported fully matched."""
    rng = np.random.default_rng(3)
    prompt = [int(t) for t in rng.integers(2, VOCAB - 2, 64)]
    e = Engine(model_dir, lib_config(tmp_path / "tier"), prefix_caching=False)
    e.add("A", prompt, max_tokens=1)
    e.run_until_done()
    wait_store_durable(e.worker.stats, 2)
    req = e.add("B", prompt, max_tokens=1)
    # 64 stored tokens, 64-token prompt: only the first chunk may be reported.
    assert e.scheduler.connector.get_num_new_matched_tokens(req, 0) == (CHUNK, False)
    so, kv_out = e.step()
    assert so.num_scheduled_tokens["B"] == 64 - CHUNK
    assert not kv_out.invalid_block_ids
    e.run_until_done()
    e.close()


def test_refused_memory_disables_the_connector(model_dir, distributed, tmp_path):
    """KV tensors the library refuses (here on the "meta" device; CUDA tensors
    take the same path while libcachegen has no GPU path) disable the
    connector: register_kv_caches logs and returns, lookups report 0, and a
    load still in the metadata reports all its blocks failed. Nothing raises."""
    from cachegen_vllm.connector import CacheGenConnectorMetadata, ReqMeta

    vc = make_config(model_dir, lib_config(tmp_path / "tier"))
    vc.cache_config.num_gpu_blocks = NUM_BLOCKS
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float16)
    kvc = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(list(LAYER_NAMES), spec)])
    with set_current_vllm_config(vc):
        sched = KVConnectorFactory.create_connector(config=vc, role=KVConnectorRole.SCHEDULER, kv_cache_config=kvc)
        worker = KVConnectorFactory.create_connector(config=vc, role=KVConnectorRole.WORKER, kv_cache_config=kvc)
    worker.register_kv_caches({n: torch.empty(2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, dtype=torch.float16, device="meta")
                               for n in LAYER_NAMES})
    assert worker._disabled and "meta" in worker._disabled
    sp = SamplingParams(max_tokens=1)
    req = Request("X", list(range(2, 100)), sp, pooling_params=None)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    meta = CacheGenConnectorMetadata(requests=[ReqMeta(req_id="X", token_ids=list(range(2, 66)), block_ids=[5, 6, 7, 8],
                                                       load_tokens=64, first_token=16, save_tokens=64)])
    worker.bind_connector_metadata(meta)
    worker.start_load_kv(None)
    for n in LAYER_NAMES:
        worker.wait_for_layer_load(n)
        worker.save_kv_layer(n, None, None)
    worker.wait_for_save()
    assert worker.get_finished(set()) == (None, None)
    assert worker.get_block_ids_with_load_errors() == {6, 7, 8}
    worker.clear_connector_metadata()
    worker.shutdown()
    sched.shutdown()


def test_scheduler_on_cuda_asks_the_library(model_dir, distributed, tmp_path, monkeypatch):
    """On a CUDA deployment the scheduler-role connector probes whether the
    library takes device memory (without touching the GPU); a host-only build
    makes it report no matches rather than loads that would all fail."""
    import cachegen_vllm.connector as mod

    refusal = mod._cuda_refusal()
    monkeypatch.setattr(mod, "_device_type", lambda vc: "cuda")
    vc = make_config(model_dir, lib_config(tmp_path / "tier"))
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float16)
    kvc = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(list(LAYER_NAMES), spec)])
    with set_current_vllm_config(vc):
        sched = KVConnectorFactory.create_connector(config=vc, role=KVConnectorRole.SCHEDULER, kv_cache_config=kvc)
    assert sched._disabled == refusal
    if refusal is not None:  # libcachegen built without its GPU path
        assert "CUDA" in refusal
        req = Request("X", list(range(2, 100)), SamplingParams(max_tokens=1), pooling_params=None)
        assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.shutdown()


def test_connector_class_capabilities():
    from cachegen_vllm.connector import CacheGenConnector, CacheGenConnectorMetadata, ReqMeta
    import pickle

    assert CacheGenConnector.requires_piecewise_for_cudagraph({}) is True
    assert CacheGenConnector.requires_piecewise_for_cudagraph({"layerwise": False}) is False
    m = CacheGenConnectorMetadata(requests=[ReqMeta(req_id="r", token_ids=[1, 2], block_ids=[3], salt=b"s", load_tokens=32)])
    assert pickle.loads(pickle.dumps(m)) == m


def test_preempted_request_reloads_its_prefix(model_dir, distributed, tmp_path):
    """A request preempted for lack of blocks (vLLM frees them) is resumed
    into new blocks: the connector reloads its stored chunks into them."""
    rng = np.random.default_rng(4)
    e = Engine(model_dir, lib_config(tmp_path / "tier"), prefix_caching=False, num_blocks=11)
    prompts = {r: [int(t) for t in rng.integers(2, VOCAB - 2, 64)] for r in ("R1", "R2")}
    for r, p in prompts.items():
        e.add(r, p, max_tokens=20)
    resumed = None
    for step in range(40):
        if not e.scheduler.has_requests():
            break
        so, kv_out = e.step()
        assert not kv_out.invalid_block_ids
        if step == 0:
            # Entries become visible to lookups once written (durable), in the
            # background; don't let the test race that.
            wait_store_durable(e.worker.stats, 4)
        if "R2" in getattr(so.scheduled_cached_reqs, "resumed_req_ids", ()):
            # The prompt's two stored chunks reload; the generated tokens are recomputed.
            [meta] = [m for m in so.kv_connector_metadata.requests if m.req_id == "R2"]
            assert (meta.load_tokens, meta.first_token) == (64, 0)
            # (update_from_output has appended this step's sampled token)
            assert so.num_scheduled_tokens["R2"] == e.scheduler.requests["R2"].num_tokens - 1 - 64
            blocks = e.block_ids("R2")
            for li, name in enumerate(LAYER_NAMES):
                for pos in range(64):
                    got = read_token(e.kv[name], blocks[pos // BLOCK], pos % BLOCK).astype(np.float32)
                    assert np.abs(got - true_kv(li, pos, prompts["R2"][pos])).max() < 0.5
            resumed = blocks
    assert resumed is not None, "R2 was never preempted and resumed"
    assert not e.scheduler.has_requests()
    assert e.worker.stats()["counters"]["load_chunks_ok"] == 2
    e.close()


@pytest.mark.parametrize("shape_name", ["flashinfer", "mla"])
def test_other_backend_layouts_round_trip(model_dir, distributed, tmp_path, shape_name):
    """The worker side alone, driven with hand-built metadata, on the other
    per-layer shapes vLLM backends use: FlashInfer/Triton (blocks before K/V)
    and MLA (one latent vector per token). Stored from some blocks, loaded
    into others, the values come back within quantization error."""
    from cachegen_vllm.connector import CacheGenConnectorMetadata, ReqMeta

    vc = make_config(model_dir, lib_config(tmp_path / "tier"))
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float16)
    kvc = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(list(LAYER_NAMES), spec)])
    with set_current_vllm_config(vc):
        worker = KVConnectorFactory.create_connector(config=vc, role=KVConnectorRole.WORKER, kv_cache_config=kvc)
    shape = (NUM_BLOCKS, 2, BLOCK, KV_HEADS, HEAD_DIM) if shape_name == "flashinfer" else (NUM_BLOCKS, BLOCK, 64)
    gen = torch.Generator().manual_seed(5)
    kv = {n: torch.randn(shape, generator=gen).to(torch.float16) for n in LAYER_NAMES}
    worker.register_kv_caches(kv)
    assert worker._disabled is None and worker._layout is not None
    assert worker._layout.kind == ("kv" if shape_name == "flashinfer" else "latent")
    tokens = list(range(10, 10 + 64))
    src, dst = [3, 9, 1, 20], [30, 31, 32, 33]

    def run(meta):
        worker.bind_connector_metadata(CacheGenConnectorMetadata(requests=[meta]))
        worker.start_load_kv(None)
        for n in LAYER_NAMES:
            worker.wait_for_layer_load(n)
        worker.wait_for_save()
        failed = worker.get_block_ids_with_load_errors()
        worker.clear_connector_metadata()
        return failed

    assert run(ReqMeta(req_id="s", token_ids=tokens, block_ids=src, save_tokens=64)) == set()
    wait_store_durable(worker.stats, 2)
    assert run(ReqMeta(req_id="l", token_ids=tokens, block_ids=dst, load_tokens=64)) == set()
    for n in LAYER_NAMES:
        t = kv[n].float()
        err = (t[dst] - t[src]).abs().max().item()
        assert 0 <= err < 0.5, (n, err)
        assert t[dst].abs().sum() > 0
    worker.shutdown()


@pytest.fixture
def redis_url(tmp_path):
    """A private redis-server on a free loopback port (scripts/redis.sh installs it)."""
    import shutil
    import subprocess
    import time

    exe = shutil.which("redis-server")
    assert exe, "redis-server is not installed (scripts/redis.sh installs it)"
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            raise AssertionError("redis-server did not start")
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_tensor_parallel_ranks_share_through_redis(model_dir, distributed, tmp_path, redis_url, monkeypatch):
    """TP=2 as vLLM's multiproc executor runs it, in one process: a
    scheduler-role connector and one worker-role connector per rank; rank 1's
    context is its own (as in a separate process), and the only tier is Redis.
    A prefix counts as matched only once every rank stored its shard; each
    rank then loads its own shard."""
    import cachegen_vllm.connector as mod
    from cachegen_vllm.connector import CacheGenConnectorMetadata, ReqMeta

    extra = {"tiers": {"redis": {"url": redis_url, "timeout_ms": 2000}}, "chunk_tokens": CHUNK, "io_threads": 2,
             "decode_threads": 2, "load_timeout_ms": 10_000}
    vc = make_config(model_dir, extra)
    vc.parallel_config.tensor_parallel_size = 2  # the connector reads only this
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=KV_HEADS, head_size=HEAD_DIM, dtype=torch.float16)
    kvc = KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(list(LAYER_NAMES), spec)])
    gen = torch.Generator().manual_seed(6)
    workers, kv = [], []
    with set_current_vllm_config(vc):
        sched = KVConnectorFactory.create_connector(config=vc, role=KVConnectorRole.SCHEDULER, kv_cache_config=kvc)
        for rank in range(2):
            monkeypatch.setattr(mod, "_tp_rank", lambda rank=rank: rank)
            w = KVConnectorFactory.create_connector(config=vc, role=KVConnectorRole.WORKER, kv_cache_config=kvc)
            assert w._settings.lib_config["namespace"]["tp_rank"] == rank
            t = {n: torch.randn(2, NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(torch.float16) for n in LAYER_NAMES}
            w.register_kv_caches(t)
            workers.append(w)
            kv.append(t)
    assert sched._shared is not workers[1]._shared
    tokens = [int(x) for x in np.random.default_rng(6).integers(2, VOCAB - 2, 70)]
    req = Request("T", tokens, SamplingParams(max_tokens=1), pooling_params=None)
    src, dst = [4, 8, 15, 16], [40, 41, 42, 43]

    def run(w, meta):
        w.bind_connector_metadata(CacheGenConnectorMetadata(requests=[meta]))
        w.start_load_kv(None)
        for n in LAYER_NAMES:
            w.wait_for_layer_load(n)
        w.wait_for_save()
        failed = w.get_block_ids_with_load_errors()
        w.clear_connector_metadata()
        return failed

    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    run(workers[0], ReqMeta(req_id="T", token_ids=tokens[:64], block_ids=src, save_tokens=64))
    wait_store_durable(workers[0].stats, 2)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # rank 1's shards are missing
    run(workers[1], ReqMeta(req_id="T", token_ids=tokens[:64], block_ids=src, save_tokens=64))
    wait_store_durable(workers[1].stats, 2)
    assert sched.get_num_new_matched_tokens(req, 0) == (64, False)
    for rank, w in enumerate(workers):
        assert run(w, ReqMeta(req_id="T", token_ids=tokens[:64], block_ids=dst, load_tokens=64)) == set()
        for n in LAYER_NAMES:
            t = kv[rank][n].float()
            assert (t[:, dst] - t[:, src]).abs().max().item() < 0.5
    other = [kv[1 - r][LAYER_NAMES[0]].float()[:, src] for r in range(2)]
    assert (other[0] - other[1]).abs().max().item() > 1  # the ranks' shards differ
    for w in workers:
        w.shutdown()
    sched.shutdown()


def test_fp8_cache_dtype_maps_to_e4m3_and_e5m2_is_refused():
    """--kv-cache-dtype fp8 / fp8_e4m3 is FP8 E4M3 in the namespace (vLLM
    allocates it as uint8: register_kv_caches passes dtype="fp8");
    fp8_e5m2 and fp8_ds_mla disable the connector with a reason."""
    import cachegen_vllm.connector as mod

    def settings(cache_dtype):
        cfg = SimpleNamespace(
            cache_config=SimpleNamespace(block_size=16, cache_dtype=cache_dtype),
            model_config=SimpleNamespace(dtype=torch.bfloat16, model="m", revision=None, quantization=None),
            parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
        )
        return mod._Settings(cfg, {}, 0)

    for name in ("fp8", "fp8_e4m3"):
        s = settings(name)
        if torch.version.hip:
            assert s.kv_dtype is None and "FNUZ" in s.disabled_reason
            continue
        assert s.kv_dtype == "f8e4m3" and s.disabled_reason is None
        assert s.lib_config["namespace"]["kv_dtype"] == "f8e4m3"
    assert settings("auto").kv_dtype == "bf16"
    s = settings("fp8_e5m2")
    assert s.kv_dtype is None and "E5M2" in s.disabled_reason and "not supported" in s.disabled_reason
    assert "fp8_ds_mla" in settings("fp8_ds_mla").disabled_reason
    # What register_kv_caches does with vLLM's uint8 fp8 cache.
    t = [torch.zeros((2, 4, 16, 2, 8), dtype=torch.uint8) for _ in range(2)]
    lay = cachegen.Layout.from_tensors(t, ("kv", "block", "token", "head", "dim"), dtype="fp8")
    assert lay.dtype == "f8e4m3" and lay.stride_token == 16
    lay.close()
    if hasattr(torch, "float8_e4m3fn"):
        t8 = [x.view(torch.float8_e4m3fn) for x in t]
        lay = cachegen.Layout.from_tensors(t8, ("kv", "block", "token", "head", "dim"))
        assert lay.dtype == "f8e4m3"
        lay.close()

"""cachegen_trtllm driven the way TensorRT-LLM's PyTorch executor drives a KV cache connector.

TensorRT-LLM cannot be installed here (PyPI has only stub sdists that download
the wheel from NVIDIA's index, and its connector modules import compiled
bindings), so this test runs the shim against a STAND-IN of TensorRT-LLM's
documented interface, built below and injected into ``sys.modules`` (it is
never shipped in the package). The stand-in copies signatures and the
executor-side logic, without the compiled parts, from TensorRT-LLM's source:

* ``tensorrt_llm/_torch/pyexecutor/kv_cache_connector.py`` @ 3277953654b9b2863dae4f1cb81856b172837db4
  and ``tensorrt_llm/_torch/pyexecutor/connectors/kv_cache_connector.py`` @ 5a06f334f04fb515ff79f73b7f0f7726ad757361:
  ``KvCacheConnectorScheduler`` / ``KvCacheConnectorWorker`` (abstract methods and
  signatures), ``RequestData`` / ``SchedulerOutput``, and the manager's logic:
  scheduler only on rank 0, ``(0, True)`` rejected, ``computed_position`` minus
  the connector's matched tokens for new requests, ``handle_metadata`` =
  ``build_connector_meta`` + ``bind_connector_meta``, layer pre/post hooks.
* ``tensorrt_llm/_torch/pyexecutor/py_executor_creator.py`` @ bab0f2e6eea19bcce16c805101420ef7d9d62d75:
  the connector is loaded with ``importlib.import_module(connector_module)`` and
  ``getattr`` of the two class names; worker ``(llm_args)`` on every rank,
  scheduler ``(llm_args)`` on rank 0; ``register_forward_pass_callable()``.
* ``tensorrt_llm/_torch/pyexecutor/py_executor.py`` @ 9521caf4696c1fb79b0f946f0d980f8f0ebd3e64:
  ``_maybe_init_kv_connector_manager`` (``register_kv_caches(get_unique_primary_pool())``,
  hooks on every ``DecoderLayer``) and the loop order: ``prepare_resources``
  (``add_sequence`` -> ``get_num_new_matched_tokens``, then
  ``update_state_after_alloc(req, get_cache_indices(req))``, then
  ``build_scheduler_output``), ``_kv_connector_start_batch``
  (``handle_metadata``, ``start_load_kv(stream)``), forward (per layer
  ``wait_for_layer_load(layer_idx, stream)`` / ``save_kv_layer(layer_idx, stream)``),
  ``wait_for_save(stream)``, responses (``request_finished``),
  ``_kv_connector_terminate_requests`` (``get_finished``).
* ``tensorrt_llm/llmapi/llm_args.py`` @ fcd3f31682808ae56118ae43c1d7864a3a945e6f:
  ``KvCacheConnectorConfig(connector_module, connector_scheduler_class,
  connector_worker_class)`` (strict: unknown fields rejected).
* The pool: ``[num_blocks, num_layers, kv_factor, block_elems]`` (``kvCacheManager.cpp``
  ``allocatePools``); the native TRTLLM attention kernel keeps each K/V half of
  a block head-major, ``[heads, tokens, head_dim]`` (``KVBlockArray::getKVLocalIdx``).

What is real: libcachegen, the ``cachegen`` package and the shim. What is not:
TensorRT-LLM itself, a model forward, GPU memory. The "attention kernel" below
writes known pseudo-random K/V per (layer, position, token) into a host numpy
pool in TensorRT-LLM's layout, so loaded bytes can be checked exactly.

Run: cargo build --release && .venv/bin/python -m pytest -q tests/python/test_trtllm_connector.py
"""

from __future__ import annotations

import abc
import enum
import importlib
import json
import pickle
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
for sub in ("integrations/python", "integrations/tensorrt_llm"):
    if str(REPO / sub) not in sys.path:
        sys.path.insert(0, str(REPO / sub))

import cachegen  # noqa: E402

BLOCK = 16  # tokens_per_block
CHUNK = 32  # libcachegen chunk: 2 blocks
LAYERS = 2
KV_HEADS = 2
HEAD_DIM = 16
NUM_BLOCKS = 40
VOCAB = 1000


# ---------------------------------------------------------------------------
# The stand-in of TensorRT-LLM's connector interface (signatures only)


def _standin_modules() -> dict:
    """Fresh module objects for the parts of ``tensorrt_llm`` the connector touches."""

    class KvCacheConnectorWorker(abc.ABC):
        def __init__(self, llm_args):
            self._llm_args = llm_args
            self._metadata = None
            super().__init__()

        def bind_connector_meta(self, metadata: object):
            self._metadata = metadata

        def get_connector_meta(self) -> object:
            return self._metadata

        def _clear_connector_meta(self):
            self._metadata = None

        def register_forward_pass_callable(self) -> Callable:
            """Optional: a callable run at the end of the forward pass."""

        @abc.abstractmethod
        def register_kv_caches(self, kv_cache_tensor): ...

        @abc.abstractmethod
        def start_load_kv(self, stream): ...

        @abc.abstractmethod
        def wait_for_layer_load(self, layer_idx: int, stream): ...

        @abc.abstractmethod
        def save_kv_layer(self, layer_idx: int, stream): ...

        @abc.abstractmethod
        def wait_for_save(self, stream): ...

        @abc.abstractmethod
        def get_finished(self, finished_gen_req_ids: List[int], started_loading_req_ids: List[int]) -> Tuple[List[int], List[int]]: ...

    class KvCacheConnectorScheduler(abc.ABC):
        def __init__(self, llm_args):
            self._llm_args = llm_args
            super().__init__()

        @abc.abstractmethod
        def build_connector_meta(self, scheduler_output): ...

        @abc.abstractmethod
        def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> Tuple[int, bool]: ...

        @abc.abstractmethod
        def request_finished(self, request, cache_block_ids: List[int]) -> bool: ...

        @abc.abstractmethod
        def update_state_after_alloc(self, request, block_ids: List[int]): ...

        def wait_for_initialization(self):
            return

    @dataclass
    class RequestData:
        request_id: int
        new_tokens: List[int]
        new_block_ids: List[int]
        computed_position: int
        num_scheduled_tokens: int
        priorities: Optional[List[int]] = None
        cache_salt_id: Optional[int] = None

    @dataclass
    class SchedulerOutput:
        new_requests: List[RequestData] = field(default_factory=list)
        cached_requests: List[RequestData] = field(default_factory=list)

    @dataclass
    class KvCacheConnectorConfig:  # pydantic StrictBaseModel upstream: unknown fields rejected
        connector_module: str
        connector_scheduler_class: str
        connector_worker_class: str

    @dataclass
    class KvCacheConfig:
        tokens_per_block: int = 32
        dtype: str = "auto"
        enable_block_reuse: bool = True

    @dataclass
    class TorchLlmArgs:  # only the fields the connector reads
        model: str
        dtype: str = "auto"
        revision: Optional[str] = None
        kv_cache_config: KvCacheConfig = field(default_factory=KvCacheConfig)
        tensor_parallel_size: int = 1
        pipeline_parallel_size: int = 1
        max_beam_width: int = 1
        attn_backend: str = "TRTLLM"
        kv_connector_config: Optional[KvCacheConnectorConfig] = None

    class LlmRequestState(enum.Enum):
        CONTEXT_INIT = 1
        GENERATION_IN_PROGRESS = 2
        GENERATION_COMPLETE = 3
        DISAGG_GENERATION_TRANS_IN_PROGRESS = 4

    mods = {name: types.ModuleType(name) for name in (
        "tensorrt_llm", "tensorrt_llm._torch", "tensorrt_llm._torch.pyexecutor",
        "tensorrt_llm._torch.pyexecutor.kv_cache_connector", "tensorrt_llm.llmapi",
        "tensorrt_llm.llmapi.llm_args", "tensorrt_llm._utils", "tensorrt_llm.bindings",
    )}
    kc = mods["tensorrt_llm._torch.pyexecutor.kv_cache_connector"]
    kc.KvCacheConnectorWorker, kc.KvCacheConnectorScheduler = KvCacheConnectorWorker, KvCacheConnectorScheduler
    kc.RequestData, kc.SchedulerOutput = RequestData, SchedulerOutput
    la = mods["tensorrt_llm.llmapi.llm_args"]
    la.KvCacheConnectorConfig, la.KvCacheConfig, la.TorchLlmArgs = KvCacheConnectorConfig, KvCacheConfig, TorchLlmArgs
    mods["tensorrt_llm._utils"].mpi_rank = lambda: 0
    mods["tensorrt_llm.bindings"].LlmRequestState = LlmRequestState
    mods["tensorrt_llm"].__path__ = []  # a package
    return mods


@pytest.fixture
def trt(monkeypatch):
    """Installs the stand-in as ``tensorrt_llm`` for one test, and a fresh
    import of the connector module against it."""
    mods = _standin_modules()
    for name, mod in mods.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.delitem(sys.modules, "cachegen_trtllm.connector", raising=False)
    yield types.SimpleNamespace(
        kc=mods["tensorrt_llm._torch.pyexecutor.kv_cache_connector"],
        llm_args=mods["tensorrt_llm.llmapi.llm_args"],
        bindings=mods["tensorrt_llm.bindings"],
    )
    sys.modules.pop("cachegen_trtllm.connector", None)


# ---------------------------------------------------------------------------
# The executor side, as TensorRT-LLM's source runs it (minus MPI and CUDA)


class LlmRequest:
    """The attributes of the C++ LlmRequest binding the executor and connector use."""

    def __init__(self, request_id: int, prompt: list, max_new_tokens: int, state_enum):
        self.request_id = self.py_request_id = request_id
        self.prompt_len = len(prompt)
        self._tokens = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.context_current_position = 0
        self.context_chunk_size = len(prompt)
        self.state = state_enum.CONTEXT_INIT
        self.is_generation_only_request = False
        self.cache_salt_id = None
        self.lora_task_id = None
        self.kv_cache_retention_config = None
        self.py_num_connector_matched_tokens = 0
        self._S = state_enum

    def get_tokens(self, beam: int) -> list:
        assert beam == 0
        return list(self._tokens)

    @property
    def context_remaining_length(self) -> int:
        return self.prompt_len - self.context_current_position


class Stream:
    """Stands in for torch.cuda.Stream (a host pool needs no ordering)."""

    cuda_stream = 0

    def synchronize(self):
        pass


def true_kv(layer: int, pos: int, token: int) -> np.ndarray:
    """K and V of one token, shape (2, heads, dim), deterministic, float16."""
    rng = np.random.default_rng([layer, pos, token])
    return rng.standard_normal((2, KV_HEADS, HEAD_DIM)).astype(np.float16)


def pool_hnd(pool: np.ndarray) -> np.ndarray:
    """[blocks, layers, 2, heads*tokens*dim] seen as [blocks, layers, 2, heads, tokens, dim]."""
    return pool.reshape(pool.shape[0], pool.shape[1], pool.shape[2], KV_HEADS, BLOCK, HEAD_DIM)


def read_token(pool: np.ndarray, layer: int, block: int, off: int) -> np.ndarray:
    return pool_hnd(pool)[block, layer, :, :, off, :].copy()


class Executor:
    """One TensorRT-LLM PyTorch executor with the connector enabled, one rank."""

    def __init__(self, trt, model_dir: Path, config: dict, monkeypatch, num_blocks: int = NUM_BLOCKS, **llm_kwargs):
        monkeypatch.setenv("CACHEGEN_TRTLLM_CONFIG", json.dumps(config))
        la = trt.llm_args
        import cachegen_trtllm

        conn_cfg = la.KvCacheConnectorConfig(**cachegen_trtllm.connector_config_kwargs())
        self.llm_args = la.TorchLlmArgs(model=str(model_dir), kv_cache_config=la.KvCacheConfig(tokens_per_block=BLOCK),
                                        kv_connector_config=conn_cfg, **llm_kwargs)
        self.S = trt.bindings.LlmRequestState
        self.kc = trt.kc
        # py_executor_creator.create_py_executor
        module = importlib.import_module(conn_cfg.connector_module)
        worker_cls = getattr(module, conn_cfg.connector_worker_class)
        scheduler_cls = getattr(module, conn_cfg.connector_scheduler_class)
        self.worker = worker_cls(self.llm_args)
        self.scheduler = scheduler_cls(self.llm_args)  # rank 0
        assert isinstance(self.worker, trt.kc.KvCacheConnectorWorker)
        assert isinstance(self.scheduler, trt.kc.KvCacheConnectorScheduler)
        assert self.worker.register_forward_pass_callable() is None
        # KVCacheManager: the single primary pool, C++ shape {blocks, layers, kvFactor, blockSize}.
        self.pool = np.zeros((num_blocks, LAYERS, 2, KV_HEADS * BLOCK * HEAD_DIM), np.float16)
        self.free_blocks = list(range(num_blocks))[::-1]
        self.blocks: dict = {}
        # PyExecutor._maybe_init_kv_connector_manager
        self.worker.register_kv_caches(self.pool)
        self.scheduler.wait_for_initialization()
        # KvCacheConnectorSchedulerOutputManager state
        self.sent_blocks: dict = {}
        self.sent_tokens: dict = {}
        self.external_loads: dict = {}
        self.requests: list = []
        self.calls: list = []
        self.next_id = 1
        for hook in ("bind_connector_meta", "start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save", "get_finished"):
            setattr(self.worker, hook, self._spy(hook, getattr(self.worker, hook)))
        self.last_meta = None
        self.last_output = None

    def _spy(self, hook, fn):
        def call(*args, **kwargs):
            self.calls.append(hook + (f"({args[0]})" if hook in ("wait_for_layer_load", "save_kv_layer") else ""))
            return fn(*args, **kwargs)
        return call

    def add(self, prompt: list, max_new_tokens: int = 1) -> LlmRequest:
        req = LlmRequest(self.next_id, prompt, max_new_tokens, self.S)
        self.next_id += 1
        self.requests.append(req)
        return req

    # KvCacheConnectorManager.get_num_new_matched_tokens (rank 0: no broadcast needed)
    def _manager_matched(self, req, num_computed: int) -> int:
        n, load_async = self.scheduler.get_num_new_matched_tokens(req, num_computed)
        if n == 0 and load_async:
            raise RuntimeError("load_kv_async must be False when num_tokens is 0!")
        assert not load_async, "this shim loads synchronously"
        self.external_loads[req.request_id] = n
        req.py_num_connector_matched_tokens = n
        return n

    def step(self):
        stream = Stream()
        self.calls.clear()
        ctx = [r for r in self.requests if r.state == self.S.CONTEXT_INIT]
        gen = [r for r in self.requests if r.state == self.S.GENERATION_IN_PROGRESS]
        # KVCacheManager.prepare_resources
        for req in ctx:
            if req.context_current_position == 0:
                # impl.add_sequence: no on-device reuse here; C++ asks the connector
                # and counts its tokens as computed (prepopulated prompt length).
                n = self._manager_matched(req, 0)
                req.context_current_position = n
                need = -(-(req.prompt_len + 1) // BLOCK)
                self.blocks[req.request_id] = [self.free_blocks.pop() for _ in range(need)]
                self.scheduler.update_state_after_alloc(req, list(self.blocks[req.request_id]))
                req.context_chunk_size = req.context_remaining_length
        for req in gen:
            pos = len(req._tokens) - 1
            if pos // BLOCK >= len(self.blocks[req.request_id]):
                self.blocks[req.request_id].append(self.free_blocks.pop())
        # KvCacheConnectorSchedulerOutputManager.build_scheduler_output
        so = self.kc.SchedulerOutput()
        scheduled = {}
        for req in ctx + gen:
            rid = req.request_id
            is_new = rid not in self.sent_blocks
            blocks, tokens = self.blocks[rid], req.get_tokens(0)
            prev_b, prev_t = self.sent_blocks.setdefault(rid, []), self.sent_tokens.setdefault(rid, [])
            new_b, new_t = blocks[len(prev_b):], tokens[len(prev_t):]
            prev_b.extend(new_b)
            prev_t.extend(new_t)
            if req.state == self.S.CONTEXT_INIT:
                computed, n_sched = req.context_current_position, min(req.context_remaining_length, req.context_chunk_size)
            else:
                computed, n_sched = len(tokens) - 1, 1
            rd = self.kc.RequestData(rid, new_t, new_b, computed, n_sched)
            if rid in self.external_loads and req.state == self.S.CONTEXT_INIT:
                rd.computed_position -= self.external_loads[rid]
            (so.new_requests if is_new else so.cached_requests).append(rd)
            scheduled[rid] = (computed, n_sched)
        self.external_loads = {}
        self.last_output = so
        # PyExecutor._kv_connector_start_batch: handle_metadata, then start_load_kv
        meta = self.scheduler.build_connector_meta(so)
        meta = pickle.loads(pickle.dumps(meta))  # mpi_broadcast pickles it
        self.last_meta = meta
        self.worker.bind_connector_meta(meta)
        self.worker.start_load_kv(stream)
        # forward: forward_pre_hook / forward_hook on every DecoderLayer
        for layer in range(LAYERS):
            self.worker.wait_for_layer_load(layer, stream)
            self._attention(layer, scheduled)
            self.worker.save_kv_layer(layer, stream)
        self.worker.wait_for_save(stream)
        # sampling, request states, responses
        finished = []
        for req in ctx + gen:
            computed, n_sched = scheduled[req.request_id]
            if req.state == self.S.CONTEXT_INIT:
                req.context_current_position = computed + n_sched
                req.state = self.S.GENERATION_IN_PROGRESS
            req._tokens.append(7)
            if len(req._tokens) - req.prompt_len >= req.max_new_tokens:
                req.state = self.S.GENERATION_COMPLETE
                finished.append(req)
        for req in finished:
            # _terminate_request -> KvCacheConnectorManager.request_finished
            assert self.scheduler.request_finished(req, list(self.blocks[req.request_id])) is False
            self.requests.remove(req)
            self.free_blocks.extend(self.blocks.pop(req.request_id))
        # _kv_connector_terminate_requests -> KvCacheConnectorManager.get_finished
        saved, loaded = self.worker.get_finished([], [])
        assert (saved, loaded) == ([], [])
        return meta

    def _attention(self, layer: int, scheduled: dict):
        """The attention kernel writes this step's K/V into the request's slots (HND blocks)."""
        view = pool_hnd(self.pool)
        for req in self.requests:
            if req.request_id not in scheduled:
                continue
            computed, n = scheduled[req.request_id]
            blocks, tokens = self.blocks[req.request_id], req.get_tokens(0)
            for pos in range(computed, computed + n):
                view[blocks[pos // BLOCK], layer, :, :, pos % BLOCK, :] = true_kv(layer, pos, tokens[pos])

    def run_until_done(self, max_steps: int = 20):
        for _ in range(max_steps):
            if not self.requests:
                return
            self.step()
        raise AssertionError("requests did not finish")

    def close(self):
        self.worker.shutdown()
        self.scheduler.shutdown()


# ---------------------------------------------------------------------------


@pytest.fixture
def model_dir(tmp_path) -> Path:
    d = tmp_path / "tiny-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": KV_HEADS, "num_hidden_layers": LAYERS,
        "torch_dtype": "float16", "vocab_size": VOCAB,
    }))  # head_dim = 64 / 4 = 16
    return d


def lib_config(disk: Path, memory: bool = True) -> dict:
    tiers = {"disk": {"path": str(disk), "bytes": 1 << 26}}
    if memory:
        tiers["memory"] = {"bytes": 1 << 24}
    return {"tiers": tiers, "chunk_tokens": CHUNK, "level": "default", "io_threads": 2, "decode_threads": 2,
            "load_timeout_ms": 10_000}


def wait_durable(stats, n: int, timeout: float = 20.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        c = stats()["counters"]
        if c.get("store_chunks_written", 0) >= n:
            return c
        time.sleep(0.02)
    raise AssertionError(f"stores not durable: {stats()['counters']}")


def run_request(mod, worker, meta) -> None:
    """One engine step for one request: its metadata (through a pickle round
    trip, as TensorRT-LLM ships it to the workers), then the load and the
    per-layer saves."""
    worker.bind_connector_meta(pickle.loads(pickle.dumps(mod.CacheGenTrtllmMetadata(requests=[meta]))))
    worker.start_load_kv(Stream())
    for layer in range(LAYERS):
        worker.wait_for_layer_load(layer, Stream())
        worker.save_kv_layer(layer, Stream())
    worker.wait_for_save(Stream())


def reference_load(config: dict, namespace: dict, tokens: list, block_ids: list) -> np.ndarray:
    """An independent load through a plain cachegen.Context into a fresh pool in the same layout."""
    pool = np.zeros((NUM_BLOCKS, LAYERS, 2, KV_HEADS * BLOCK * HEAD_DIM), np.float16)
    lib = {k: v for k, v in config.items()}
    lib["namespace"] = dict(namespace)
    with cachegen.Context(lib) as ctx:
        layout = cachegen.Layout.from_tensors([pool_hnd(pool)], ("block", "layer", "kv", "head", "token", "dim"))
        job = ctx.load(layout, tokens, block_ids)
        assert job.wait(timeout=30) and job.failed_blocks() == []
        job.close()
    return pool


# ---------------------------------------------------------------------------


def test_package_imports_without_tensorrt_llm(monkeypatch):
    """``import cachegen_trtllm`` needs nothing; the connector module says clearly what is missing."""
    for name in list(sys.modules):
        if name == "tensorrt_llm" or name.startswith("tensorrt_llm."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.delitem(sys.modules, "cachegen_trtllm.connector", raising=False)
    import cachegen_trtllm

    assert cachegen_trtllm.connector_config_kwargs() == {
        "connector_module": "cachegen_trtllm.connector",
        "connector_scheduler_class": "CacheGenConnectorScheduler",
        "connector_worker_class": "CacheGenConnectorWorker",
    }
    with pytest.raises(ImportError, match="needs TensorRT-LLM"):
        importlib.import_module("cachegen_trtllm.connector")
    sys.modules.pop("cachegen_trtllm.connector", None)


def test_store_then_load_through_the_executor(trt, model_dir, tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    prompt_a = [int(t) for t in rng.integers(2, VOCAB - 2, 100)]
    config = lib_config(tmp_path / "tier")

    # Executor 1 computes request A; its 3 full chunks (96 tokens) are stored.
    e1 = Executor(trt, model_dir, config, monkeypatch)
    ns = e1.worker._settings.lib_config["namespace"]
    assert ns["block_size"] == BLOCK and ns["kv_dtype"] == "f16" and ns["tp_world_size"] == 1 and ns["tp_rank"] == 0
    assert e1.worker._layout is not None and e1.worker._layout.layers == LAYERS
    assert e1.scheduler._shared is e1.worker._shared  # rank 0: one context per process
    a = e1.add(prompt_a)
    meta = e1.step()
    assert [(m.req_id, m.save_tokens, m.load_tokens) for m in meta.requests] == [(a.request_id, 96, 0)]
    layer_hooks = [f"{h}({i})" for i in range(LAYERS) for h in ("wait_for_layer_load", "save_kv_layer")]
    assert e1.calls == ["bind_connector_meta", "start_load_kv", *layer_hooks, "wait_for_save", "get_finished"]
    assert not e1.requests
    wait_durable(e1.worker.stats, 3)
    e1.close()

    # Executor 2: a fresh instance on the same storage, other KV memory. B
    # shares A's 96 tokens; the scheduler reports them and the worker loads
    # them into the blocks TensorRT-LLM allocated for B.
    e2 = Executor(trt, model_dir, config, monkeypatch, num_blocks=NUM_BLOCKS)
    e2.free_blocks = e2.free_blocks[::-1]  # B gets other block ids than A had
    prompt_b = prompt_a[:96] + [5, 6, 7]
    b = e2.add(prompt_b)
    meta = e2.step()
    assert b.py_num_connector_matched_tokens == 96
    [rd] = e2.last_output.new_requests
    assert rd.computed_position == 0 and rd.num_scheduled_tokens == 3  # the connector's tokens left out
    [m] = meta.requests
    blocks = m.block_ids
    assert (m.load_tokens, m.first_token, m.save_tokens) == (96, 0, 96)
    assert m.lease_id and m.lease_owner  # the rank-0 worker shares the scheduler's context
    assert e2.worker.load_failures == []
    c = e2.worker.stats()["counters"]
    assert c["load_chunks_ok"] == 3 and c.get("load_chunks_failed", 0) == 0, c
    # A step that builds no new metadata leaves the old one bound: not acted on twice.
    e2.worker.start_load_kv(Stream())
    e2.worker.wait_for_save(Stream())
    assert e2.worker.stats()["counters"]["load_chunks_ok"] == 3
    ref = reference_load(config, ns, prompt_b[:96], blocks)
    for block in blocks:
        np.testing.assert_array_equal(e2.pool[block], ref[block])  # bytes equal an independent load
    for layer in range(LAYERS):
        for pos in range(96):
            got = read_token(e2.pool, layer, blocks[pos // BLOCK], pos % BLOCK).astype(np.float32)
            assert np.abs(got - true_kv(layer, pos, prompt_b[pos])).max() < 0.5
        all_blocks = e2.sent_blocks[b.request_id]
        for pos in range(96, 99):  # computed by the "kernel" after the load
            np.testing.assert_array_equal(read_token(e2.pool, layer, all_blocks[pos // BLOCK], pos % BLOCK),
                                          true_kv(layer, pos, prompt_b[pos]))
    e2.close()


def test_full_prompt_hit_leaves_a_token(trt, model_dir, tmp_path, monkeypatch):
    prompt = [int(t) for t in np.random.default_rng(3).integers(2, VOCAB - 2, 64)]
    e = Executor(trt, model_dir, lib_config(tmp_path / "tier"), monkeypatch)
    e.add(prompt)
    e.run_until_done()
    wait_durable(e.worker.stats, 2)
    req = e.add(prompt)
    # 64 stored tokens, a 64-token prompt: only the first chunk may be reported.
    assert e.scheduler.get_num_new_matched_tokens(req, 0) == (CHUNK, False)
    assert e.scheduler.get_num_new_matched_tokens(req, 0) == (CHUNK, False)  # side-effect free
    assert e.scheduler.get_num_new_matched_tokens(req, 5) == (0, False)  # on-device hit not block-aligned
    e.run_until_done()
    assert req.py_num_connector_matched_tokens == CHUNK
    e.close()


def test_failed_load_is_recorded_and_never_stored(trt, model_dir, tmp_path, monkeypatch):
    """A corrupted disk entry fails its chunk. TensorRT-LLM's API has no
    failed-load channel: nothing raises, get_finished is normal, the failure
    is in ``load_failures`` and the stats, and nothing of the request is
    stored from the failed block on."""
    rng = np.random.default_rng(2)
    prompt_a = [int(t) for t in rng.integers(2, VOCAB - 2, 100)]
    disk = tmp_path / "tier"
    config = lib_config(disk, memory=False)

    def entries() -> set:
        return {p for p in disk.rglob("*") if p.is_file() and not p.name.startswith(".")}

    e1 = Executor(trt, model_dir, config, monkeypatch)
    files = []
    for n, length in enumerate((33, 65, 100)):  # each prefix adds one chunk file
        before = entries()
        e1.add(prompt_a[:length])
        e1.run_until_done()
        wait_durable(e1.worker.stats, n + 1)
        new = entries() - before
        assert len(new) == 1, new
        files.append(new.pop())
    e1.close()

    e2 = Executor(trt, model_dir, config, monkeypatch)  # indexes the three entries
    raw = bytearray(files[1].read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    files[1].write_bytes(bytes(raw))  # chunk 1 (tokens 32..63) is now corrupt

    prompt_b = prompt_a[:96] + [5, 6, 7]
    b = e2.add(prompt_b, max_new_tokens=2)
    meta = e2.step()  # nothing raises in the forward path
    assert b.py_num_connector_matched_tokens == 96
    blocks = meta.requests[0].block_ids
    [failure] = e2.worker.load_failures
    assert failure["request_id"] == b.request_id and failure["blocks"] == blocks[2:4] and failure["errors"]
    c = e2.worker.stats()["counters"]
    assert c["load_chunks_failed"] == 1 and c["load_chunks_ok"] == 2, c
    for layer in range(LAYERS):  # the chunks that loaded hold the right data
        for pos in list(range(0, 32)) + list(range(64, 96)):
            got = read_token(e2.pool, layer, blocks[pos // BLOCK], pos % BLOCK).astype(np.float32)
            assert np.abs(got - true_kv(layer, pos, prompt_b[pos])).max() < 0.5
    e2.run_until_done()  # the decode step: still nothing raises
    time.sleep(0.2)
    assert e2.worker.stats()["counters"].get("store_chunks_written", 0) == 0  # the plan's 96 tokens were cut at 32 (stored already)
    assert b.request_id in e2.worker._poisoned
    e2.step()  # the next step's metadata tells the workers that B finished
    assert b.request_id not in e2.worker._poisoned
    e2.close()


class FakeCudaTensor:
    """Shaped like a CUDA torch tensor; never dereferenced (the library refuses CUDA memory first)."""

    def __init__(self, shape):
        self.shape = tuple(shape)
        self.dtype = "torch.float16"
        self.device = types.SimpleNamespace(type="cuda", index=0)
        self.is_cuda = True

    def data_ptr(self):
        return 1 << 40

    def element_size(self):
        return 2

    def stride(self):
        out, acc = [], 1
        for n in reversed(self.shape):
            out.append(acc)
            acc *= n
        return tuple(reversed(out))

    def view(self, *shape):
        return FakeCudaTensor(shape)

    def __str__(self):
        return "float16"


def test_cuda_pool_disables_the_connector(trt, model_dir, tmp_path, monkeypatch):
    """A CUDA pool (libcachegen has no GPU path yet: CG_ERR_UNSUPPORTED) disables
    the worker at registration; the rank-0 scheduler then reports no matches,
    and a load already planned is skipped. Nothing raises."""
    config = lib_config(tmp_path / "tier")
    e = Executor(trt, model_dir, config, monkeypatch)
    prompt = [int(t) for t in np.random.default_rng(4).integers(2, VOCAB - 2, 70)]
    e.add(prompt)
    e.run_until_done()
    wait_durable(e.worker.stats, 2)
    e.close()

    monkeypatch.setenv("CACHEGEN_TRTLLM_CONFIG", json.dumps(config))
    mod = importlib.import_module("cachegen_trtllm.connector")
    la = trt.llm_args
    args = la.TorchLlmArgs(model=str(model_dir), kv_cache_config=la.KvCacheConfig(tokens_per_block=BLOCK))
    worker, sched = mod.CacheGenConnectorWorker(args), mod.CacheGenConnectorScheduler(args)
    req = LlmRequest(1, prompt, 1, trt.bindings.LlmRequestState)
    assert sched.get_num_new_matched_tokens(req, 0) == (64, False)  # before the pool is known
    pool = FakeCudaTensor((NUM_BLOCKS, LAYERS, 2, KV_HEADS * BLOCK * HEAD_DIM))
    pool.dtype = "float16"
    worker.register_kv_caches(pool)
    assert worker._disabled and "cuda" in worker._disabled.lower()
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    meta = mod.CacheGenTrtllmMetadata(requests=[mod.ReqMeta(req_id=1, token_ids=prompt[:64], block_ids=[3, 4, 5, 6],
                                                            load_tokens=64, save_tokens=64)])
    worker.bind_connector_meta(meta)
    worker.start_load_kv(Stream())
    for layer in range(LAYERS):
        worker.wait_for_layer_load(layer, Stream())
        worker.save_kv_layer(layer, Stream())
    worker.wait_for_save(Stream())
    assert worker.get_finished([], []) == ([], [])
    assert worker.load_failures and worker.load_failures[0]["blocks"] == [3, 4, 5, 6]
    worker.shutdown()
    sched.shutdown()


@pytest.mark.parametrize("kwargs, reason", [
    ({"pipeline_parallel_size": 2}, "pipeline parallelism"),
    ({"max_beam_width": 4}, "beam width"),
    ({"attn_backend": "VANILLA"}, "VANILLA"),
])
def test_unsupported_configurations_disable(trt, model_dir, tmp_path, monkeypatch, kwargs, reason):
    e = Executor(trt, model_dir, lib_config(tmp_path / "tier"), monkeypatch, **kwargs)
    assert reason in e.worker._disabled and reason in e.scheduler._disabled
    e.add(list(range(2, 80)))
    e.run_until_done()  # serves without the connector
    assert e.last_meta.requests == []
    e.close()


def test_nhd_pool_and_metadata_pickle(trt, model_dir, tmp_path, monkeypatch):
    """FlashInfer/Vanilla backends keep tokens before heads inside a block (NHD)."""
    monkeypatch.setenv("CACHEGEN_TRTLLM_CONFIG", json.dumps(lib_config(tmp_path / "tier")))
    mod = importlib.import_module("cachegen_trtllm.connector")
    la = trt.llm_args
    args = la.TorchLlmArgs(model=str(model_dir), kv_cache_config=la.KvCacheConfig(tokens_per_block=BLOCK),
                           attn_backend="FLASHINFER")
    worker = mod.CacheGenConnectorWorker(args)
    pool = np.random.default_rng(5).standard_normal((NUM_BLOCKS, LAYERS, 2, BLOCK * KV_HEADS * HEAD_DIM)).astype(np.float16)
    worker.register_kv_caches(pool)
    assert worker._disabled is None and worker._settings.kv_layout == "NHD"
    tokens = list(range(10, 74))
    src, dst = [3, 9, 1, 20], [30, 31, 32, 33]

    run_request(mod, worker, mod.ReqMeta(req_id=1, token_ids=tokens, block_ids=src, save_tokens=64))
    wait_durable(worker.stats, 2)
    run_request(mod, worker, mod.ReqMeta(req_id=2, token_ids=tokens, block_ids=dst, load_tokens=64))
    assert worker.load_failures == []
    err = np.abs(pool[dst].astype(np.float32) - pool[src].astype(np.float32)).max()
    assert 0 <= err < 0.5 and np.abs(pool[dst]).sum() > 0
    worker.shutdown()


def test_fp8_pool_round_trips_in_stored_units(trt, model_dir, tmp_path, monkeypatch):
    """KvCacheConfig(dtype="fp8"): the namespace is FP8 E4M3 and a pool of raw
    bytes (uint8) is registered as fp8 (a pool tensor of dtype float8_e4m3fn
    maps by its name); the lossless level gives the stored bytes back (no k/v
    scales involved)."""
    config = dict(lib_config(tmp_path / "tier"), level="lossless")
    monkeypatch.setenv("CACHEGEN_TRTLLM_CONFIG", json.dumps(config))
    mod = importlib.import_module("cachegen_trtllm.connector")
    assert mod._DTYPES["float8_e4m3fn"] == "f8e4m3"
    la = trt.llm_args
    args = la.TorchLlmArgs(model=str(model_dir), kv_cache_config=la.KvCacheConfig(tokens_per_block=BLOCK, dtype="fp8"))
    worker = mod.CacheGenConnectorWorker(args)
    assert worker._disabled is None and worker._settings.kv_dtype == "f8e4m3"
    assert worker._settings.lib_config["namespace"]["kv_dtype"] == "f8e4m3"
    # e4m3 bytes, NaN (0x7F, 0xFF) left out as an engine would
    rng = np.random.default_rng(6)
    pool = rng.integers(0, 0x7F, (NUM_BLOCKS, LAYERS, 2, KV_HEADS * BLOCK * HEAD_DIM), dtype=np.uint8)
    pool |= rng.integers(0, 2, pool.shape, dtype=np.uint8) << 7
    worker.register_kv_caches(pool)
    assert worker._disabled is None, worker._disabled
    assert worker._layout.dtype == "f8e4m3"
    tokens = list(range(10, 74))
    src, dst = [3, 9, 1, 20], [30, 31, 32, 33]
    before = pool[src].copy()

    run_request(mod, worker, mod.ReqMeta(req_id=1, token_ids=tokens, block_ids=src, save_tokens=64))
    wait_durable(worker.stats, 2)
    run_request(mod, worker, mod.ReqMeta(req_id=2, token_ids=tokens, block_ids=dst, load_tokens=64))
    assert worker.load_failures == []
    assert np.array_equal(pool[dst], before)
    worker.shutdown()


def test_fp4_and_e5m2_kv_disable(trt, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEGEN_TRTLLM_CONFIG", json.dumps(lib_config(tmp_path / "tier")))
    mod = importlib.import_module("cachegen_trtllm.connector")
    la = trt.llm_args
    for dtype in ("nvfp4", "fp8_e5m2"):
        args = la.TorchLlmArgs(model=str(model_dir), kv_cache_config=la.KvCacheConfig(tokens_per_block=BLOCK, dtype=dtype))
        worker = mod.CacheGenConnectorWorker(args)
        assert worker._disabled and dtype in worker._disabled
        worker.shutdown()

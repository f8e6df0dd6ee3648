"""TensorRT-LLM KV cache connector (PyTorch backend) over libcachegen.

TensorRT-LLM loads it through ``KvCacheConnectorConfig(connector_module=
"cachegen_trtllm.connector", connector_scheduler_class=
"CacheGenConnectorScheduler", connector_worker_class="CacheGenConnectorWorker")``
(``py_executor_creator.py``: ``importlib.import_module`` + ``getattr``; the
worker is built on every rank with ``(llm_args)``, the scheduler on MPI rank 0
only). Like the vLLM shim it is thin: hashing, chunking, lookups, leases,
compression, tiers, failure accounting and the per-layer load pipeline are
libcachegen's, reached through the ``cachegen`` ctypes package.

Scheduler side (rank 0; results are broadcast to every rank by TensorRT-LLM):

* ``get_num_new_matched_tokens(request, num_computed_tokens)``: a lease-free
  ``Context.lookup`` of the prompt (side-effect free). The hit is whole chunks,
  capped so that at least one prompt token is left to compute, minus the
  on-device hit. Loads are synchronous (``False``): they run in the next
  forward, one layer ahead of the attention kernels.
* ``update_state_after_alloc(request, block_ids)``: records a load of the
  matched tokens into the request's blocks (and leases the entries when the
  rank-0 worker shares this process's context, which it always does).
* ``build_connector_meta(scheduler_output)``: picklable plain data per request
  (token ids, block ids, first token, lease, tokens to store).
* ``request_finished``: forgets the request; returns ``False`` (stores are past
  ``REUSABLE`` before their step ends, so blocks are never held).

Worker side (every rank):

* ``register_kv_caches(pool)``: the single cross-layer pool
  ``[num_blocks, num_layers, kv_factor, block_elems]`` is viewed as
  ``[blocks, layers, kv, heads, tokens, dim]`` (native TRTLLM attention, HND)
  or ``[blocks, layers, kv, tokens, heads, dim]`` (FlashInfer/Vanilla, NHD) and
  described with ``cachegen.Layout.from_tensors``. A pool in GPU memory goes
  through libcachegen's GPU path (decode and gather on the GPU). If the
  library refuses the pool (e.g. ``CG_ERR_NO_GPU``) the connector disables
  itself: lookups report 0, nothing is loaded or stored, nothing raises.
* ``start_load_kv(stream)``: one ``Context.load`` per request, for a GPU pool
  ordered after the work already on ``stream``; ``wait_for_layer_load
  (layer_idx, stream)``: ``Job.wait_layer_on_stream`` for a GPU pool (the
  host waits until the layer's decode is enqueued, ``stream`` waits for it
  on the device), ``Job.wait_layer`` for a host pool.
* ``wait_for_save``: waits for the step's loads, then starts the stores of
  full prompt chunks and waits until they are ``REUSABLE``.
* ``get_finished``: ``([], [])``: nothing is asynchronous across steps.

Failed loads: TensorRT-LLM's connector API has no channel for them (no
``get_block_ids_with_load_errors``; ``get_finished`` only reports completion,
and the executor already counts the matched tokens as computed). The worker
therefore logs them at ERROR, records them in ``load_failures`` and
``stats()``, and never stores anything of that request from the first failed
block on, so a failed load cannot poison the cache. Nothing in the forward path
raises. See README.md.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

import cachegen


def _import_trtllm_bases():
    """TensorRT-LLM's connector base classes. The module moved from
    ``pyexecutor/kv_cache_connector.py`` (releases 1.1-1.2, the LLM API example)
    to ``pyexecutor/connectors/kv_cache_connector.py`` (newer main); both are
    tried. Importing either needs TensorRT-LLM's compiled bindings."""
    errors = []
    for mod in (
        "tensorrt_llm._torch.pyexecutor.kv_cache_connector",
        "tensorrt_llm._torch.pyexecutor.connectors.kv_cache_connector",
    ):
        try:
            m = __import__(mod, fromlist=["KvCacheConnectorScheduler", "KvCacheConnectorWorker"])
            return m.KvCacheConnectorScheduler, m.KvCacheConnectorWorker, mod
        except ImportError as e:
            errors.append(f"{mod}: {e}")
        except AttributeError as e:
            errors.append(f"{mod}: {e}")
    raise ImportError(
        "cachegen_trtllm.connector needs TensorRT-LLM with the KV cache connector API of the PyTorch "
        "backend (KvCacheConnectorScheduler / KvCacheConnectorWorker), installed in this Python "
        "environment; it could not be imported (" + "; ".join(errors) + ")"
    )


KvCacheConnectorScheduler, KvCacheConnectorWorker, TRTLLM_CONNECTOR_MODULE = _import_trtllm_bases()

logger = logging.getLogger("cachegen_trtllm")

__all__ = ["CacheGenConnectorScheduler", "CacheGenConnectorWorker", "CacheGenTrtllmMetadata", "ReqMeta"]

CONFIG_ENV = "CACHEGEN_TRTLLM_CONFIG"
# Keys of the configuration passed through to libcachegen.
_LIB_KEYS = ("chunk_tokens", "level", "levels", "adaptive", "profile", "tables", "tiers", "io_threads", "decode_threads", "load_timeout_ms")
# Keys this shim reads itself.
_SHIM_KEYS = ("model_fingerprint", "kv_dtype", "head_dim", "kv_layout", "lease_ms", "layerwise", "load", "save")

_DTYPES = {"float16": "f16", "half": "f16", "fp16": "f16", "f16": "f16",
           "bfloat16": "bf16", "bf16": "bf16", "float32": "f32", "float": "f32", "fp32": "f32", "f32": "f32",
           # FP8 E4M3 KV (KvCacheConfig(dtype="fp8")), coded in its stored units: no scales needed.
           "fp8": "f8e4m3", "fp8_e4m3": "f8e4m3", "float8_e4m3fn": "f8e4m3"}
# Pool element types that hold an fp8 cache's raw bytes.
_FP8_RAW = ("uint8", "int8")


# ---------------------------------------------------------------------------
# Metadata (scheduler -> every rank; pickled by mpi_broadcast every step)


@dataclass
class ReqMeta:
    """One request's work for this step. Plain data only."""

    req_id: int
    token_ids: list  # leading prompt tokens (covers the load and the store)
    block_ids: list  # token i lives in block_ids[i // tokens_per_block]
    salt: bytes = b""
    load_tokens: int = 0  # chunk-aligned count of leading tokens to load ...
    first_token: int = 0  # ... skipping the on-device hit (block-aligned)
    lease_id: int = 0
    lease_owner: str = ""
    save_tokens: int = 0  # leading tokens whose full chunks should be stored

    @property
    def load(self) -> bool:
        return self.load_tokens > self.first_token

    @property
    def save(self) -> bool:
        return self.save_tokens > 0


@dataclass
class CacheGenTrtllmMetadata:
    requests: list = field(default_factory=list)  # ReqMeta
    finished: list = field(default_factory=list)  # ids of requests that finished since the last step
    step: int = 0  # the scheduler's step number: metadata left bound is never acted on twice


# ---------------------------------------------------------------------------
# Configuration


def _read_config(explicit: Optional[dict]) -> dict:
    if explicit is not None:
        return dict(explicit)
    raw = os.environ.get(CONFIG_ENV, "").strip()
    if not raw:
        return {}
    if raw.startswith("{"):
        return json.loads(raw)
    with open(raw, encoding="utf-8") as f:
        return json.load(f)


def _get(obj, *path, default=None):
    for name in path:
        if obj is None:
            return default
        obj = obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)
    return default if obj is None else obj


def _hf_config(model) -> dict:
    """The model's Hugging Face config.json when ``model`` is a local directory."""
    try:
        path = os.path.join(str(model), "config.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
            return cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    except Exception:
        pass
    return {}


class _Settings:
    """What the connector derives from ``llm_args`` and its own configuration."""

    def __init__(self, llm_args: Any, cfg: dict, tp_rank: int):
        self.disabled_reason: Optional[str] = None
        unknown = sorted(set(cfg) - set(_LIB_KEYS) - set(_SHIM_KEYS))
        if unknown:
            logger.warning("cachegen_trtllm: ignoring unknown configuration keys %s", unknown)
        self.block_size = int(_get(llm_args, "kv_cache_config", "tokens_per_block", default=0) or 32)
        self.layerwise = bool(cfg.get("layerwise", True))
        self.lease_ms = int(cfg.get("lease_ms", 30_000))
        self.load_enabled = bool(cfg.get("load", True))
        self.save_enabled = bool(cfg.get("save", True))
        model = _get(llm_args, "model", default="?")
        hf = _hf_config(model)
        self.hf = hf
        # KV dtype: explicit, else the KV cache config's, else the model dtype.
        kv = str(cfg.get("kv_dtype") or "")
        if not kv:
            cache_dtype = str(_get(llm_args, "kv_cache_config", "dtype", default="auto") or "auto")
            model_dtype = str(_get(llm_args, "dtype", default="auto") or "auto")
            if cache_dtype != "auto":
                kv = cache_dtype
            elif model_dtype != "auto":
                kv = model_dtype
            else:
                kv = str(hf.get("torch_dtype") or hf.get("dtype") or "")
        self.kv_dtype = _DTYPES.get(kv.replace("torch.", "").lower()) if kv else None
        if self.kv_dtype is None:
            self.disabled_reason = (
                f"KV cache dtype {kv or 'unknown'!r} is not supported by libcachegen (f16, bf16, f32, fp8 e4m3), or could not "
                f"be determined: set \"kv_dtype\" in {CONFIG_ENV}"
            )
        parallel = _get(llm_args, "parallel_config")
        pp = int(_get(parallel, "pp_size", default=0) or _get(llm_args, "pipeline_parallel_size", default=1) or 1)
        tp = int(_get(parallel, "tp_size", default=0) or _get(llm_args, "tensor_parallel_size", default=1) or 1)
        beams = int(_get(llm_args, "max_beam_width", default=1) or 1)
        if pp > 1:
            self.disabled_reason = "pipeline parallelism is not supported (TensorRT-LLM refuses connectors with it too)"
        if beams > 1:
            self.disabled_reason = f"max_beam_width={beams}: only beam width 1 is supported"
        self.head_dim = cfg.get("head_dim") or hf.get("head_dim")
        if not self.head_dim and hf.get("hidden_size") and hf.get("num_attention_heads"):
            self.head_dim = int(hf["hidden_size"]) // int(hf["num_attention_heads"])
        backend = str(_get(llm_args, "attn_backend", default="TRTLLM") or "TRTLLM").upper()
        if backend == "VANILLA":  # tokens_per_block becomes max_num_tokens there
            self.disabled_reason = "attn_backend VANILLA is not supported"
        layout = cfg.get("kv_layout")
        if not layout:
            layout = "HND" if backend == "TRTLLM" else "NHD"
        self.kv_layout = str(layout).upper()
        if self.kv_layout not in ("HND", "NHD"):
            self.disabled_reason = f"kv_layout {layout!r} is not HND or NHD"
        revision = _get(llm_args, "revision", default=None)
        fingerprint = cfg.get("model_fingerprint") or "|".join(
            [str(model), "rev=" + str(revision or "default"), "dtype=" + str(_get(llm_args, "dtype", default="auto"))]
        )
        lib: dict = {k: cfg[k] for k in _LIB_KEYS if k in cfg}
        lib["namespace"] = {
            "model": fingerprint,
            "kv_dtype": self.kv_dtype or "f16",
            "tp_world_size": tp,
            "tp_rank": tp_rank,
            "block_size": self.block_size,
        }
        self.lib_config = lib
        self.chunk_tokens = int(lib.get("chunk_tokens", 256))
        self.load_timeout_s = int(lib.get("load_timeout_ms", 30_000)) / 1000.0
        if tp > 1 and "redis" not in (lib.get("tiers") or {"memory": {}}):
            logger.warning(
                "cachegen_trtllm: tensor parallelism (%d ranks) without a redis tier: ranks 1.. run in other "
                "processes than the scheduler, and only the redis tier is shared between processes", tp,
            )


def _mpi_rank() -> int:
    try:
        from tensorrt_llm._utils import mpi_rank

        return int(mpi_rank())
    except Exception:
        return 0


# ---------------------------------------------------------------------------
# One libcachegen context per (process, configuration): the scheduler and the
# rank-0 worker always share a process in TensorRT-LLM, so they share it
# (memory tier, leases, and the worker's verdict on the KV memory).


class _Shared:
    def __init__(self, key: str):
        self.key = key
        self.ctx = cachegen.Context(key)
        self.refs = 0
        self.token = uuid.uuid4().hex
        self.worker_attached = False
        self.worker_disabled: Optional[str] = None


_REGISTRY: dict = {}
_REGISTRY_LOCK = threading.Lock()


def _acquire(config: dict) -> _Shared:
    key = json.dumps(config, sort_keys=True)
    with _REGISTRY_LOCK:
        shared = _REGISTRY.get(key)
        if shared is None:
            shared = _REGISTRY[key] = _Shared(key)
        shared.refs += 1
        return shared


def _release(shared: _Shared) -> None:
    with _REGISTRY_LOCK:
        shared.refs -= 1
        if shared.refs > 0:
            return
        _REGISTRY.pop(shared.key, None)
    try:
        shared.ctx.close()
    except Exception:
        logger.exception("cachegen_trtllm: closing the context failed")


class _Base:
    """What both sides share: settings and the context."""

    config: Optional[dict] = None  # a subclass may set the configuration here instead of the env

    def _setup(self, llm_args, role: str, tp_rank: int) -> None:
        self._role = role
        self._shared: Optional[_Shared] = None
        try:
            self._settings = _Settings(llm_args, _read_config(self.config), tp_rank)
            self._disabled = self._settings.disabled_reason
        except Exception as e:
            self._settings = None
            self._disabled = f"bad configuration: {e}"
        if self._disabled is None:
            try:
                self._shared = _acquire(self._settings.lib_config)
            except Exception as e:
                self._disabled = f"cannot create the libcachegen context: {e}"
        if self._disabled is not None:
            logger.error("cachegen_trtllm %s disabled: %s", role, self._disabled)
        else:
            logger.info("cachegen_trtllm %s: namespace %s, chunk_tokens %d, layout %s", role,
                        self._settings.lib_config["namespace"], self._settings.chunk_tokens, self._settings.kv_layout)

    @property
    def _ctx(self):
        return self._shared.ctx if self._shared is not None else None

    def stats(self) -> dict:
        """libcachegen's statistics (counters, tiers, leases), or {} when disabled."""
        return self._ctx.stats() if self._ctx is not None else {}

    def _close_shared(self) -> None:
        if self._shared is not None:
            shared, self._shared = self._shared, None
            _release(shared)


def _request_salt(request) -> bytes:
    """Extra key bytes: LoRA adapter and cache salt change the KV (or who may read it)."""
    parts = []
    lora = getattr(request, "lora_task_id", None)
    if lora is not None:
        parts.append(f"lora={lora}")
    salt = getattr(request, "cache_salt_id", None)
    if salt is not None:
        parts.append(f"salt={salt}")
    return "|".join(parts).encode()


def _prompt_tokens(request) -> Optional[list]:
    """Prompt token ids, or None when the KV is not a function of them alone."""
    if getattr(request, "multimodal_hashes", None) or getattr(request, "py_multimodal_data", None):
        return None
    if getattr(request, "prompt_embedding_table", None) is not None:
        return None
    try:
        tokens = list(request.get_tokens(0))
    except Exception:
        return None
    n = int(getattr(request, "prompt_len", len(tokens)) or len(tokens))
    return [int(t) for t in tokens[:n]]


@dataclass
class _ReqState:
    tokens: list
    salt: bytes
    eligible: bool
    matched: tuple = ()  # (on-device tokens, total tokens) of the last lookup
    external: int = 0  # tokens loaded by the connector (TensorRT-LLM counts them as computed)
    block_ids: list = field(default_factory=list)
    saved_tokens: int = 0
    lease_id: int = 0


# ===========================================================================


class CacheGenConnectorScheduler(_Base, KvCacheConnectorScheduler):
    """Rank-0 side: lookups and per-step plans."""

    def __init__(self, llm_args=None):
        super().__init__(llm_args)
        self._setup(llm_args, "scheduler", 0)
        self._reqs: dict = {}
        self._pending_loads: dict = {}
        self._finished: list = []
        self._step = 0

    def _is_disabled(self) -> bool:
        if self._disabled is not None or self._shared is None:
            return True
        return self._shared.worker_disabled is not None

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        try:
            if self._is_disabled() or not self._settings.load_enabled:
                return 0, False
            state = self._state(request)
            if not state.eligible:
                return 0, False
            bs, chunk = self._settings.block_size, self._settings.chunk_tokens
            num_computed_tokens = int(num_computed_tokens)
            if num_computed_tokens % bs:
                return 0, False  # partial on-device block reuse: not block-aligned
            limit = len(state.tokens) - 1  # leave at least one token to compute
            limit -= limit % chunk
            if limit <= num_computed_tokens:
                state.matched = ()
                return 0, False
            matched, _ = self._ctx.lookup(state.tokens[:limit], salt=state.salt, lease_ms=0)
            total = min(int(matched), limit)
            total -= total % bs
            if total <= num_computed_tokens:
                state.matched = ()
                return 0, False
            state.matched = (num_computed_tokens, total)
            return total - num_computed_tokens, False
        except Exception:
            logger.exception("cachegen_trtllm: lookup of request %s failed; treating it as a miss",
                             getattr(request, "request_id", "?"))
            return 0, False

    def _state(self, request) -> _ReqState:
        req_id = int(request.request_id)
        state = self._reqs.get(req_id)
        if state is None:
            tokens = _prompt_tokens(request)
            state = self._reqs[req_id] = _ReqState(tokens=tokens or [], salt=_request_salt(request), eligible=bool(tokens))
        return state

    def update_state_after_alloc(self, request, block_ids):
        try:
            state = self._state(request)
            state.block_ids = [int(b) for b in block_ids]
            if not state.matched:
                return
            first, total = state.matched
            state.matched = ()
            state.external = total - first
            meta = ReqMeta(
                req_id=int(request.request_id),
                token_ids=state.tokens[:total],
                block_ids=state.block_ids[: total // self._settings.block_size],
                salt=state.salt,
                load_tokens=total,
                first_token=first,
            )
            shared = self._shared
            if shared is not None and shared.worker_attached and self._settings.lease_ms > 0:
                # The rank-0 worker shares this context: pin the entries until it fetched them.
                _, lease = self._ctx.lookup(meta.token_ids, salt=state.salt, lease_ms=self._settings.lease_ms)
                state.lease_id = meta.lease_id = int(lease)
                meta.lease_owner = shared.token
            self._pending_loads[meta.req_id] = meta
        except Exception:
            logger.exception("cachegen_trtllm: update_state_after_alloc failed; no load for request %s",
                             getattr(request, "request_id", "?"))

    def build_connector_meta(self, scheduler_output):
        metas = dict(self._pending_loads)
        self._pending_loads.clear()
        finished, self._finished = self._finished, []
        try:
            if self._settings is not None and self._settings.save_enabled and not self._is_disabled():
                self._plan_saves(scheduler_output, metas)
        except Exception:
            logger.exception("cachegen_trtllm: planning stores failed; nothing stored this step")
        self._step += 1
        return CacheGenTrtllmMetadata(requests=list(metas.values()), finished=finished, step=self._step)

    def _plan_saves(self, so, metas: dict) -> None:
        bs, chunk = self._settings.block_size, self._settings.chunk_tokens
        new = list(getattr(so, "new_requests", []) or [])
        for is_new, rd in [(True, r) for r in new] + [(False, r) for r in getattr(so, "cached_requests", []) or []]:
            state = self._reqs.get(int(rd.request_id))
            if state is None or not state.eligible:
                continue
            if is_new:
                state.block_ids = [int(b) for b in rd.new_block_ids]
            else:
                state.block_ids.extend(int(b) for b in rd.new_block_ids)
            # KV valid once this step ran. TensorRT-LLM leaves the connector's
            # matched tokens out of a new request's computed_position.
            valid = int(rd.computed_position) + int(rd.num_scheduled_tokens) + (state.external if is_new else 0)
            n = min(valid, len(state.tokens))
            n -= n % chunk
            if n <= state.saved_tokens or len(state.block_ids) * bs < n:
                continue
            state.saved_tokens = n
            req_id = int(rd.request_id)
            meta = metas.get(req_id)
            if meta is None:
                meta = metas[req_id] = ReqMeta(req_id=req_id, token_ids=[], block_ids=[], salt=state.salt)
            meta.save_tokens = n
            if len(meta.token_ids) < n:
                meta.token_ids = state.tokens[:n]
            if len(meta.block_ids) < n // bs:
                meta.block_ids = state.block_ids[: n // bs]

    def request_finished(self, request, cache_block_ids) -> bool:
        state = self._reqs.pop(int(request.request_id), None)
        self._pending_loads.pop(int(request.request_id), None)
        self._finished.append(int(request.request_id))
        if state is not None and state.lease_id and self._ctx is not None:
            try:
                self._ctx.release_lease(state.lease_id)
            except Exception:
                logger.exception("cachegen_trtllm: releasing a lease failed")
        return False  # stores are past REUSABLE when their step ends

    def shutdown(self) -> None:
        self._close_shared()


# ===========================================================================


class CacheGenConnectorWorker(_Base, KvCacheConnectorWorker):
    """Every rank: registers the pool, loads and stores."""

    def __init__(self, llm_args=None):
        super().__init__(llm_args)
        self._setup(llm_args, "worker", _mpi_rank())
        self._layout = None
        self._load_jobs: list = []  # (ReqMeta, Job)
        self._store_jobs: list = []  # (req_id, Job) past REUSABLE
        self._step_failed: dict = {}  # req_id -> first failed token, this step
        self._poisoned: dict = {}  # req_id -> first token whose KV may be garbage
        self.load_failures: list = []  # {"request_id", "blocks", "errors"}: no channel to TRT-LLM for them
        self._loaded_step = 0  # the last metadata step whose loads / stores were started
        self._saved_step = 0

    def _disable(self, reason: str) -> None:
        if self._disabled is None:
            self._disabled = reason
            logger.error("cachegen_trtllm worker disabled: %s; nothing will be loaded or stored", reason)
            if self._shared is not None:
                self._shared.worker_disabled = reason

    # -- registration

    def register_kv_caches(self, kv_cache_tensor) -> None:
        if self._shared is not None:
            self._shared.worker_attached = True
        if self._disabled is not None:
            return
        try:
            view, axes, kind = self._pool_view(kv_cache_tensor)
            if view is None:
                return
            # An fp8 pool may be allocated as raw bytes: say what they are.
            dtype = "fp8" if self._settings.kv_dtype == "f8e4m3" else None
            self._layout = cachegen.Layout.from_tensors([view], axes, kind=kind, dtype=dtype)
            logger.info("cachegen_trtllm: registered pool %s as %s, axes %s",
                        tuple(kv_cache_tensor.shape), tuple(view.shape), axes)
        except cachegen.CacheGenError as e:
            device = getattr(kv_cache_tensor, "device", "cpu")
            self._disable(f"libcachegen cannot use the KV cache pool (device {device}): {e} (code {getattr(e, 'code', '?')})")
        except Exception as e:
            logger.exception("cachegen_trtllm: register_kv_caches failed")
            self._disable(f"register_kv_caches failed: {e}")

    def _pool_view(self, pool):
        """The pool as [blocks, layers, kv, heads, tokens, dim] (HND) or
        [blocks, layers, kv, tokens, heads, dim] (NHD): a view, never a copy."""
        s = self._settings
        shape = tuple(int(n) for n in pool.shape)
        dtype = str(getattr(pool, "dtype", "")).replace("torch.", "")
        if _DTYPES.get(dtype) != s.kv_dtype and not (s.kv_dtype == "f8e4m3" and dtype in _FP8_RAW):
            self._disable(f"pool dtype {dtype} is not the namespace's kv_dtype {s.kv_dtype} (fp4 pools are not supported)")
            return None, None, None
        if len(shape) == 6:
            view = pool
        elif len(shape) == 4:
            n, layers, kv, elems = shape
            t = s.block_size
            head_dim = int(s.head_dim or 0)
            if not head_dim or elems % (t * head_dim):
                self._disable(f"cannot split a block of {elems} elements into {t} tokens x heads x head_dim "
                              f"{head_dim or '?'}: set \"head_dim\" in {CONFIG_ENV}")
                return None, None, None
            heads = elems // (t * head_dim)
            inner = (heads, t, head_dim) if s.kv_layout == "HND" else (t, heads, head_dim)
            new_shape = (n, layers, kv) + inner
            if hasattr(pool, "view") and not isinstance(pool, _np().ndarray):
                view = pool.view(*new_shape)
            else:
                view = pool.reshape(new_shape)
                if not _np().shares_memory(view, pool):
                    self._disable("the pool is not contiguous; a reshaped copy cannot be used")
                    return None, None, None
        else:
            self._disable(f"unexpected KV cache pool shape {shape}")
            return None, None, None
        kv = int(view.shape[2])
        inner = ("head", "token", "dim") if s.kv_layout == "HND" else ("token", "head", "dim")
        axes = ("block", "layer", "kv") + inner
        if kv == 2:
            return view, axes, "kv"
        if kv == 1:  # MLA: one latent vector per token
            return view, axes, "latent"
        self._disable(f"kv_factor {kv} is not 1 or 2")
        return None, None, None

    # -- loads

    def _fresh(self, meta, last: int) -> bool:
        """Whether ``meta`` is a new step's (TensorRT-LLM leaves the previous
        metadata bound when a step builds none)."""
        step = int(getattr(meta, "step", 0) or 0)
        return meta is not None and (step == 0 or step > last)

    def _stream(self, stream):
        """The stream to order GPU work on (the caller's, else torch's current
        one) when the pool is in GPU memory; None for a host pool."""
        if self._layout is None or self._layout.memory != "cuda":
            return None
        if stream is not None:
            return stream
        import torch

        return torch.cuda.current_stream()

    def start_load_kv(self, stream=None) -> None:
        meta = self._metadata
        if not self._fresh(meta, self._loaded_step):
            return
        self._loaded_step = int(getattr(meta, "step", 0) or 0)
        bs = self._settings.block_size if self._settings else 1
        for req in getattr(meta, "requests", []):
            if not req.load:
                continue
            if self._disabled is not None or self._layout is None:
                self._record_failure(req, req.block_ids[req.first_token // bs : req.load_tokens // bs],
                                     [f"connector disabled: {self._disabled or 'no pool registered'}"], req.first_token)
                continue
            lease = req.lease_id if (self._shared is not None and req.lease_owner == self._shared.token) else 0
            try:
                job = self._ctx.load(self._layout, req.token_ids[: req.load_tokens], req.block_ids,
                                     first_token=req.first_token, salt=req.salt, lease_id=lease,
                                     stream=self._stream(stream))
                self._load_jobs.append((req, job))
            except Exception as e:
                self._record_failure(req, req.block_ids[req.first_token // bs : req.load_tokens // bs],
                                     [f"load could not start: {e}"], req.first_token)
        if not self._settings or not self._settings.layerwise:
            for req, job in self._load_jobs:
                self._wait(job, req)

    def _wait(self, job, req, layer: Optional[int] = None, stream=None) -> None:
        """Waits without raising; a job past the deadline is cancelled. With a
        GPU pool and a ``stream``, a layer wait is enqueued on the stream."""
        timeout = self._settings.load_timeout_s + 5.0
        try:
            if layer is None:
                ok = job.wait("done", timeout=timeout)
            elif stream is not None:
                ok = job.wait_layer_on_stream(layer, stream, timeout=timeout)
            else:
                ok = job.wait_layer(layer, timeout=timeout)
            if not ok:
                logger.error("cachegen_trtllm: load of request %s timed out after %.1f s; cancelling", req.req_id, timeout)
                job.cancel()
                job.wait("done", timeout=timeout)
        except Exception:
            logger.exception("cachegen_trtllm: waiting for the load of request %s failed", req.req_id)

    def wait_for_layer_load(self, layer_idx: int, stream=None) -> None:
        # Host pools: a host-blocking wait; GPU pools: ``stream`` waits on the device.
        if not self._load_jobs or not self._settings.layerwise or self._layout is None:
            return
        if not 0 <= int(layer_idx) < self._layout.layers:
            return
        gpu_stream = self._stream(stream)
        for req, job in self._load_jobs:
            self._wait(job, req, layer=int(layer_idx), stream=gpu_stream)

    def _record_failure(self, req: ReqMeta, blocks: list, errors: list, first_bad_token: int) -> None:
        bad = min(first_bad_token, self._step_failed.get(req.req_id, first_bad_token))
        self._step_failed[req.req_id] = bad
        self._poisoned[req.req_id] = min(bad, self._poisoned.get(req.req_id, bad))
        self.load_failures.append({"request_id": req.req_id, "blocks": list(blocks), "errors": list(errors)})
        logger.error(
            "cachegen_trtllm: load of request %s failed for blocks %s (%s). TensorRT-LLM's connector API cannot "
            "be told: these blocks hold stale data and the request's output may be wrong; nothing of it is "
            "stored from token %d on", req.req_id, list(blocks), "; ".join(errors), bad,
        )

    def _finish_loads(self) -> None:
        bs = self._settings.block_size if self._settings else 1
        for req, job in self._load_jobs:
            self._wait(job, req)
            try:
                blocks = [int(b) for b in job.failed_blocks()]
                errors = job.errors() if blocks else []
            except Exception as e:
                blocks = req.block_ids[req.first_token // bs : req.load_tokens // bs]
                errors = [f"reading the job's failures failed: {e}"]
            if blocks:
                first = min(i for i, b in enumerate(req.block_ids) if b in set(blocks)) * bs
                self._record_failure(req, blocks, errors, first)
            try:
                job.close()
            except Exception:
                logger.exception("cachegen_trtllm: closing a load job failed")
        self._load_jobs = []

    def save_kv_layer(self, layer_idx: int, stream=None) -> None:
        # Stores are whole-request (a chunk's layers are encoded together):
        # started in wait_for_save, after the last layer.
        return None

    # -- stores

    def wait_for_save(self, stream=None) -> None:
        try:
            if stream is not None and hasattr(stream, "synchronize"):
                stream.synchronize()  # the forward's KV writes are complete
        except Exception:
            logger.exception("cachegen_trtllm: synchronizing the forward stream failed")
        meta = self._metadata
        self._finish_loads()
        self._step_failed = {}
        if not self._fresh(meta, self._saved_step):
            return
        self._saved_step = int(getattr(meta, "step", 0) or 0)
        for req_id in getattr(meta, "finished", None) or []:
            self._poisoned.pop(int(req_id), None)
        if self._disabled is not None or self._layout is None:
            return
        chunk = self._settings.chunk_tokens
        started = []
        for req in getattr(meta, "requests", []):
            if not req.save:
                continue
            n = req.save_tokens
            if req.req_id in self._poisoned:  # never store KV computed over a failed load
                n = min(n, self._poisoned[req.req_id] // chunk * chunk)
            if n <= 0:
                continue
            try:
                started.append((req.req_id, self._ctx.store(self._layout, req.token_ids[:n], req.block_ids, salt=req.salt)))
            except Exception as e:
                logger.error("cachegen_trtllm: store of request %s could not start: %s", req.req_id, e)
        timeout = self._settings.load_timeout_s + 5.0
        for req_id, job in started:
            try:
                if not job.wait("reusable", timeout=timeout):
                    logger.error("cachegen_trtllm: store of request %s still reading blocks after %.1f s", req_id, timeout)
            except Exception:
                logger.exception("cachegen_trtllm: waiting for the store of request %s failed", req_id)
            self._store_jobs.append((req_id, job))
        self._reap_stores()

    def _reap_stores(self, wait: bool = False) -> None:
        keep = []
        for req_id, job in self._store_jobs:
            try:
                if wait:
                    job.wait("done", timeout=self._settings.load_timeout_s)
                info = job.info()
                if not info.get("done") and not wait:
                    keep.append((req_id, job))
                    continue
                if info.get("chunks_failed"):
                    logger.warning("cachegen_trtllm: store of request %s: %s chunks failed: %s",
                                   req_id, info.get("chunks_failed"), "; ".join(job.errors()))
                job.close()
            except Exception:
                logger.exception("cachegen_trtllm: finishing the store of request %s failed", req_id)
        self._store_jobs = keep

    def get_finished(self, finished_gen_req_ids, started_loading_req_ids):
        # Loads are synchronous and request_finished never holds blocks, so
        # TensorRT-LLM passes no ids; return any it passes so nothing waits.
        self._reap_stores()
        return list(finished_gen_req_ids or []), list(started_loading_req_ids or [])

    def shutdown(self) -> None:
        try:
            for _, job in self._load_jobs:
                job.cancel()
                job.close()
            self._load_jobs = []
            if self._settings is not None:
                self._reap_stores(wait=True)
        except Exception:
            logger.exception("cachegen_trtllm: shutdown failed")
        self._close_shared()


def _np():
    import numpy

    return numpy

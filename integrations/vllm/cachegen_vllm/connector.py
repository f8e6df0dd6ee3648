"""``CacheGenConnector``: a vLLM V1 KV connector over libcachegen.

The connector is thin: hashing, chunking, lookups, leases, compression,
tiers, failure accounting and the per-layer pipeline all live in
libcachegen (through the ``cachegen`` ctypes package). This module only
translates vLLM's hooks into ``Context.lookup`` / ``store`` / ``load`` calls.

Scheduler side (one instance in the engine core):

* ``get_num_new_matched_tokens``: ``Context.lookup`` of the prompt (no lease,
  so it is side-effect free and may be repeated); the hit is chunk-aligned
  (so block-aligned), capped so that at least one token is left to compute,
  minus what vLLM already has locally. Loads are synchronous (``False``):
  they run inside the next forward, one layer ahead of the attention kernels.
* ``update_state_after_alloc``: when vLLM accepted external tokens, records a
  load of them into the request's blocks (and, when the worker shares this
  process's context, takes a lease so the entries cannot be evicted before
  the load fetched them).
* ``build_connector_meta``: picklable plain data per request: token ids,
  block ids, first token to load (vLLM's local hit), lease, and how many
  leading tokens to store (full chunks of the prompt whose KV is computed
  once this step ran).
* ``request_finished``: forgets the request and ends its lease; blocks are
  never held (stores are past ``REUSABLE`` before a step ends).

Worker side (one instance per TP rank):

* ``register_kv_caches``: describes vLLM's per-layer tensors to the library
  with ``cachegen.Layout.from_tensors`` (pointers and strides come from the
  tensors, so NHD and HND need no special casing). CUDA tensors go through
  libcachegen's GPU path (decode on the GPU straight into the blocks, gather
  on the GPU for stores); if the library refuses them (no usable GPU) the
  connector logs it and disables itself (lookups return 0, loads report
  every block failed).
* ``start_load_kv``: starts one ``Context.load`` per request (for CUDA
  tensors ordered after the work already on the current CUDA stream).
* ``wait_for_layer_load``: ``Job.wait_layer`` for that layer's index; for
  CUDA tensors ``Job.wait_layer_on_stream``: the host waits only until the
  layer's decode is enqueued, and the current CUDA stream waits for it on
  the device (a CUDA event per layer).
* ``save_kv_layer``: nothing. Stores are whole-request (all layers of a chunk
  are encoded together), so they start in ``wait_for_save``, after the last
  layer wrote its KV, which waits until the store job is ``REUSABLE`` (the
  source blocks were read) and leaves compression and writing to the
  library's threads.
* ``get_block_ids_with_load_errors``: waits for this step's load jobs and
  returns their failed blocks, so vLLM recomputes them. Nothing in the
  forward path raises: every failure becomes failed blocks.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

import cachegen
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

try:
    from vllm.logger import init_logger

    logger = init_logger(__name__)
except Exception:  # pragma: no cover - very old vLLM
    logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig

__all__ = ["CacheGenConnector", "CacheGenConnectorMetadata", "ReqMeta"]

# Keys of kv_connector_extra_config passed through to libcachegen's config.
_LIB_KEYS = ("chunk_tokens", "level", "levels", "adaptive", "profile", "tables", "tiers", "io_threads", "decode_threads", "load_timeout_ms")
# Keys this shim reads itself.
_SHIM_KEYS = ("model_fingerprint", "namespace", "lease_ms", "layerwise", "load", "save")

_TORCH_DTYPES = {"float16": "f16", "half": "f16", "bfloat16": "bf16", "float32": "f32", "float": "f32"}
# --kv-cache-dtype values for FP8 E4M3 (vLLM allocates the cache as uint8 and
# keeps per-layer k/v scales; libcachegen codes the stored units, no scales).
_FP8_E4M3 = ("fp8", "fp8_e4m3")


# ---------------------------------------------------------------------------
# Metadata (scheduler -> workers; pickled every step)


@dataclass
class ReqMeta:
    """One request's work for this step. Plain data only."""

    req_id: str
    token_ids: list  # leading prompt tokens (covers both the load and the store)
    block_ids: list  # vLLM block ids: token i lives in block_ids[i // block_size]
    salt: bytes = b""
    # Load: chunk-aligned count of leading tokens to load, skipping the first
    # `first_token` (vLLM's local prefix-cache hit, block-aligned).
    load_tokens: int = 0
    first_token: int = 0
    lease_id: int = 0
    lease_owner: str = ""  # the context that granted the lease
    # Blocks vLLM counts as external but no full chunk covers (reported failed).
    unloadable_blocks: list = field(default_factory=list)
    # Store: leading tokens whose full chunks should be stored (0: none).
    save_tokens: int = 0

    @property
    def load(self) -> bool:
        return self.load_tokens > self.first_token or bool(self.unloadable_blocks)

    @property
    def save(self) -> bool:
        return self.save_tokens > 0


@dataclass
class CacheGenConnectorMetadata(KVConnectorMetadata):
    requests: list = field(default_factory=list)


# ---------------------------------------------------------------------------
# Configuration


class _Settings:
    """What the connector derives from vllm_config and the extra config."""

    def __init__(self, vllm_config: "VllmConfig", extra: dict, tp_rank: int):
        self.disabled_reason: Optional[str] = None
        unknown = sorted(set(extra) - set(_LIB_KEYS) - set(_SHIM_KEYS))
        if unknown:
            logger.warning("CacheGenConnector: ignoring unknown kv_connector_extra_config keys %s", unknown)
        cache_config = vllm_config.cache_config
        model_config = vllm_config.model_config
        parallel = vllm_config.parallel_config
        self.block_size = int(cache_config.block_size)
        self.layerwise = bool(extra.get("layerwise", True))
        self.lease_ms = int(extra.get("lease_ms", 30_000))
        self.load_enabled = bool(extra.get("load", True))
        self.save_enabled = bool(extra.get("save", True))
        self.kv_dtype = _kv_dtype(cache_config, model_config)
        if self.kv_dtype is None:
            cache_dtype = str(getattr(cache_config, "cache_dtype", "?"))
            why = {
                "fp8_e5m2": "FP8 E5M2 KV caches are not supported; use --kv-cache-dtype fp8 (E4M3)",
                "fp8_ds_mla": "the fp8_ds_mla cache (fp8 with inline scales and bf16 RoPE) is not supported",
            }.get(cache_dtype, "")
            self.disabled_reason = (
                f"KV cache dtype {cache_dtype!r} (model dtype {getattr(model_config, 'dtype', '?')}) is not "
                f"supported by libcachegen (f16, bf16, f32, fp8/fp8_e4m3)" + (f": {why}" if why else "")
            )
        elif self.kv_dtype == "f8e4m3" and _rocm_fp8():
            self.kv_dtype = None
            self.disabled_reason = "fp8 KV caches on ROCm may be E4M3 FNUZ, which libcachegen does not support"
        pp = int(getattr(parallel, "pipeline_parallel_size", 1) or 1)
        if pp > 1:
            self.disabled_reason = "pipeline parallelism is not supported"
        tp = int(getattr(parallel, "tensor_parallel_size", 1) or 1)
        ns_override = extra.get("namespace") or {}
        model = extra.get("model_fingerprint") or ns_override.get("model") or _model_fingerprint(model_config)
        lib: dict[str, Any] = {k: extra[k] for k in _LIB_KEYS if k in extra}
        lib["namespace"] = {
            "model": model,
            "kv_dtype": self.kv_dtype or "f16",
            "tp_world_size": tp,
            "tp_rank": tp_rank,
            "block_size": self.block_size,
        }
        self.lib_config = lib
        self.chunk_tokens = int(lib.get("chunk_tokens", 256))
        self.load_timeout_s = int(lib.get("load_timeout_ms", 30_000)) / 1000.0
        tiers = lib.get("tiers") or {"memory": {}}
        if tp > 1 and "redis" not in tiers:
            logger.warning(
                "CacheGenConnector: tensor_parallel_size=%d without a redis tier: the scheduler and the "
                "workers run in different processes and only the redis tier is shared between them, "
                "so lookups will find nothing stored after startup",
                tp,
            )


def _kv_dtype(cache_config, model_config) -> Optional[str]:
    cache_dtype = str(getattr(cache_config, "cache_dtype", "auto") or "auto")
    if cache_dtype == "auto":
        name = str(getattr(model_config, "dtype", "float16")).replace("torch.", "")
    else:
        name = cache_dtype.replace("torch.", "")
    if name in _FP8_E4M3:
        return "f8e4m3"
    return _TORCH_DTYPES.get(name)


def _rocm_fp8() -> bool:
    """ROCm builds of torch (MI300) use float8_e4m3fnuz for vLLM's fp8 cache."""
    try:
        import torch

        return bool(getattr(torch.version, "hip", None))
    except Exception:
        return False


def _model_fingerprint(model_config) -> str:
    """Model name, revision, weights dtype and quantization: a change of any of
    them must not reuse cached KV. Override with ``model_fingerprint`` (e.g. to
    add a weights hash, or to share entries between two paths of one model)."""
    parts = [
        str(getattr(model_config, "model", "?")),
        "rev=" + str(getattr(model_config, "revision", None) or "default"),
        "dtype=" + str(getattr(model_config, "dtype", "?")).replace("torch.", ""),
    ]
    quant = getattr(model_config, "quantization", None)
    if quant:
        parts.append(f"quant={quant}")
    return "|".join(parts)


def _device_type(vllm_config) -> str:
    device_config = getattr(vllm_config, "device_config", None)
    return str(getattr(device_config, "device_type", "") or "")


def _cuda_refusal() -> Optional[str]:
    """Why libcachegen refuses CUDA memory, or None if it takes it. Describes a
    one-element layout in device memory (never touched: ``cg_layout_new``
    only validates) and reads the status."""
    try:
        cachegen.Layout(
            kind="kv", dtype="float16", layers=1, num_blocks=1, block_size=1, heads=1, head_dim=1,
            layer_base=[1 << 20], stride_block=4, stride_kv=2, stride_token=4, stride_head=2, memory="cuda",
        ).close()
        return None
    except cachegen.CacheGenError as e:
        # On a GPU machine the fake address is refused as not device memory
        # (CG_ERR_INVALID_ARGUMENT): the library takes CUDA layouts.
        if getattr(e, "code", None) in (cachegen.CG_ERR_UNSUPPORTED, cachegen.CG_ERR_NO_GPU):
            return f"libcachegen cannot use CUDA memory here ({e})"
        return None
    except Exception:
        return None


def _tp_rank() -> int:
    try:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())
    except Exception:
        return 0


def _layer_index(name: str) -> Optional[int]:
    try:
        from vllm.model_executor.models.utils import extract_layer_index

        return int(extract_layer_index(name))
    except Exception:
        nums = re.findall(r"\.(\d+)(?:\.|$)", name)
        return int(nums[0]) if len(nums) == 1 else None


# ---------------------------------------------------------------------------
# One libcachegen context per (process, configuration): the scheduler and a
# TP-rank-0 worker in the same process (vLLM's single-GPU "uni" executor)
# share it, so its memory tier and leases serve both.


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
            shared = _Shared(key)
            _REGISTRY[key] = shared
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
        logger.exception("CacheGenConnector: closing the context failed")


# ---------------------------------------------------------------------------
# Scheduler-side per-request state


@dataclass
class _ReqState:
    tokens: list
    salt: bytes
    eligible: bool
    block_ids: list = field(default_factory=list)
    saved_tokens: int = 0
    lease_id: int = 0


def _request_salt(request) -> bytes:
    """Extra key bytes: LoRA adapter and cache salt change the KV (or who may
    read it), so they must change the keys."""
    parts = []
    lora = getattr(request, "lora_request", None)
    if lora is not None:
        parts.append("lora=" + str(getattr(lora, "lora_name", None) or getattr(lora, "name", lora)))
    cache_salt = getattr(request, "cache_salt", None)
    if cache_salt:
        parts.append("salt=" + str(cache_salt))
    return "|".join(parts).encode()


def _request_tokens(request) -> Optional[list]:
    """Prompt token ids, or None when KV is not a function of them alone
    (multimodal inputs, prompt embeddings)."""
    if getattr(request, "mm_features", None):
        return None
    if getattr(request, "prompt_embeds", None) is not None:
        return None
    tokens = getattr(request, "prompt_token_ids", None)
    return list(tokens) if tokens is not None else None


def _group0(block_ids) -> list:
    """Block ids of the first (only) KV-cache group: vLLM passes a tuple of
    lists per group (older versions: a list of lists, or a flat list)."""
    if block_ids is None:
        return []
    if hasattr(block_ids, "get_block_ids"):
        block_ids = block_ids.get_block_ids()
    if len(block_ids) and isinstance(block_ids[0], (list, tuple)):
        return list(block_ids[0])
    return list(block_ids)


# ---------------------------------------------------------------------------


class CacheGenConnector(KVConnectorBase_V1):
    """vLLM V1 KV connector storing compressed KV chunks with libcachegen."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config=None):
        if _BASE_TAKES_KV_CACHE_CONFIG:
            super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        else:  # pragma: no cover - vLLM before the 3-argument constructor
            super().__init__(vllm_config=vllm_config, role=role)
        self._kv_cache_config_arg = kv_cache_config
        extra = dict(getattr(self._kv_transfer_config, "kv_connector_extra_config", None) or {})
        is_worker = role == KVConnectorRole.WORKER
        self._settings = _Settings(vllm_config, extra, _tp_rank() if is_worker else 0)
        # kv_producer only stores, kv_consumer only loads, kv_both does both.
        self._settings.load_enabled &= bool(getattr(self._kv_transfer_config, "is_kv_consumer", True))
        self._settings.save_enabled &= bool(getattr(self._kv_transfer_config, "is_kv_producer", True))
        self._shared: Optional[_Shared] = None
        self._disabled: Optional[str] = self._settings.disabled_reason
        if self._disabled is None and not is_worker and _device_type(vllm_config) == "cuda":
            # The scheduler never sees the KV tensors; ask the library whether
            # it takes device memory at all, so that a GPU deployment on a
            # host-only build reports misses instead of loads that all fail.
            self._disabled = _cuda_refusal()
        if self._disabled is None:
            try:
                self._shared = _acquire(self._settings.lib_config)
            except Exception as e:  # bad config, unreachable disk...
                self._disabled = f"cannot create the libcachegen context: {e}"
        if self._disabled is not None:
            logger.error("CacheGenConnector (%s) disabled: %s", role.name, self._disabled)
        else:
            logger.info(
                "CacheGenConnector (%s): namespace %s, chunk_tokens %d, layerwise %s",
                role.name,
                self._settings.lib_config["namespace"],
                self._settings.chunk_tokens,
                self._settings.layerwise,
            )
        # Scheduler side.
        self._reqs: dict = {}  # req_id -> _ReqState
        self._matched: dict = {}  # req_id -> (local tokens, total tokens) of the last lookup
        self._pending_loads: dict = {}  # req_id -> ReqMeta (load part)
        # Worker side.
        self._layout = None
        self._layer_index: dict = {}
        self._load_jobs: list = []  # (ReqMeta, Job)
        self._failed_blocks: set = set()  # to report (get_block_ids_with_load_errors)
        self._step_failed: set = set()  # failed during this step (bind .. next bind), for wait_for_save
        self._store_jobs: list = []  # (req_id, Job) past REUSABLE, finishing in the background

    # ------------------------------------------------------------------ helpers

    @property
    def _ctx(self):
        return self._shared.ctx if self._shared is not None else None

    def _is_disabled(self) -> bool:
        if self._disabled is not None:
            return True
        return self._shared is not None and self._shared.worker_disabled is not None

    def _disable(self, reason: str) -> None:
        if self._disabled is None:
            self._disabled = reason
            logger.error("CacheGenConnector disabled: %s; every load will be recomputed by vLLM", reason)
            if self._shared is not None and self.role == KVConnectorRole.WORKER:
                self._shared.worker_disabled = reason

    # ------------------------------------------------------------ class-level

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict) -> bool:
        # Per-layer waits run Python between layers; a full CUDA graph replay
        # would skip them (vLLM #29608).
        return bool((extra_config or {}).get("layerwise", True))

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> Optional[str]:
        return None  # any: the layout is read from the tensors' strides

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped store is only a future miss

    # ========================================================= scheduler side

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        try:
            if self._is_disabled() or not self._settings.load_enabled:
                return 0, False
            tokens = _request_tokens(request)
            if not tokens:
                return 0, False
            chunk = self._settings.chunk_tokens
            num_tokens = int(getattr(request, "num_tokens", len(tokens)))
            # Leave at least one token to compute; whole chunks only.
            limit = min(len(tokens), num_tokens - 1)
            limit -= limit % chunk
            if limit <= num_computed_tokens:
                return 0, False
            matched, _ = self._ctx.lookup(tokens[:limit], salt=_request_salt(request), lease_ms=0)
            total = min(int(matched), limit)
            total -= total % self._settings.block_size
            external = total - num_computed_tokens
            if external <= 0:
                self._matched.pop(request.request_id, None)
                return 0, False
            self._matched[request.request_id] = (num_computed_tokens, total)
            return external, False
        except Exception:
            logger.exception("CacheGenConnector: lookup failed; treating it as a miss")
            return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int):
        try:
            req_id = request.request_id
            state = self._reqs.get(req_id)
            if state is None:
                tokens = _request_tokens(request)
                state = _ReqState(tokens=tokens or [], salt=_request_salt(request), eligible=bool(tokens))
                self._reqs[req_id] = state
            matched = self._matched.pop(req_id, None)
            if num_external_tokens <= 0 or matched is None:
                return
            bs, chunk = self._settings.block_size, self._settings.chunk_tokens
            first = matched[0]
            end = first + int(num_external_tokens)
            load_tokens = end - end % chunk  # the library loads whole chunks only
            block_ids = _group0(blocks)
            # Blocks vLLM now counts as computed that no whole chunk covers
            # (only if vLLM trimmed the hit we reported): reported failed.
            unloadable = block_ids[max(load_tokens, first) // bs : -(-end // bs)]
            meta = ReqMeta(
                req_id=req_id,
                token_ids=state.tokens[:load_tokens],
                block_ids=block_ids[: -(-max(load_tokens, first) // bs)],
                salt=state.salt,
                load_tokens=load_tokens if load_tokens > first else 0,
                first_token=first,
                unloadable_blocks=unloadable,
            )
            if self._shared is not None and self._shared.worker_attached and meta.load_tokens and self._settings.lease_ms > 0:
                # The worker shares this context: pin the entries until its load fetched them.
                if state.lease_id:
                    self._ctx.release_lease(state.lease_id)
                _, lease = self._ctx.lookup(meta.token_ids, salt=state.salt, lease_ms=self._settings.lease_ms)
                state.lease_id = meta.lease_id = int(lease)
                meta.lease_owner = self._shared.token
            self._pending_loads[req_id] = meta
        except Exception:
            logger.exception("CacheGenConnector: update_state_after_alloc failed; no load for this request")

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        metas: dict = dict(self._pending_loads)
        self._pending_loads.clear()
        try:
            if self._settings.save_enabled and not self._is_disabled():
                self._plan_saves(scheduler_output, metas)
        except Exception:
            logger.exception("CacheGenConnector: planning stores failed; nothing stored this step")
        return CacheGenConnectorMetadata(requests=list(metas.values()))

    def _plan_saves(self, so, metas: dict) -> None:
        scheduled = getattr(so, "num_scheduled_tokens", {}) or {}
        updates = []  # (req_id, computed tokens after this step)
        for new in getattr(so, "scheduled_new_reqs", []) or []:
            state = self._reqs.get(new.req_id)
            if state is None:
                continue
            state.block_ids = _group0(new.block_ids)
            updates.append((new.req_id, int(new.num_computed_tokens) + int(scheduled.get(new.req_id, 0))))
        cached = getattr(so, "scheduled_cached_reqs", None)
        if cached is not None:
            resumed = getattr(cached, "resumed_req_ids", None)
            legacy_resumed = getattr(cached, "resumed_from_preemption", None)
            for i, req_id in enumerate(cached.req_ids):
                state = self._reqs.get(req_id)
                if state is None:
                    continue
                is_resumed = (req_id in resumed) if resumed is not None else bool(legacy_resumed and legacy_resumed[i])
                new_blocks = cached.new_block_ids[i]
                if new_blocks is not None:
                    if is_resumed:
                        state.block_ids = _group0(new_blocks)
                    else:
                        state.block_ids.extend(_group0(new_blocks))
                updates.append((req_id, int(cached.num_computed_tokens[i]) + int(scheduled.get(req_id, 0))))
        bs, chunk = self._settings.block_size, self._settings.chunk_tokens
        for req_id, computed in updates:
            state = self._reqs[req_id]
            if not state.eligible:
                continue
            n = min(computed, len(state.tokens))
            n -= n % chunk
            if n <= state.saved_tokens or len(state.block_ids) * bs < n:
                continue
            state.saved_tokens = n
            meta = metas.get(req_id)
            if meta is None:
                meta = metas[req_id] = ReqMeta(req_id=req_id, token_ids=[], block_ids=[], salt=state.salt)
            meta.save_tokens = n
            if len(meta.token_ids) < n:
                meta.token_ids = state.tokens[:n]
            if len(meta.block_ids) < n // bs:
                meta.block_ids = state.block_ids[: n // bs]

    def request_finished(self, request, block_ids):
        req_id = request.request_id
        self._matched.pop(req_id, None)
        self._pending_loads.pop(req_id, None)
        state = self._reqs.pop(req_id, None)
        if state is not None and state.lease_id and self._ctx is not None:
            try:
                self._ctx.release_lease(state.lease_id)
            except Exception:
                logger.exception("CacheGenConnector: releasing a lease failed")
        # Stores are past REUSABLE when their step ends: the blocks may be freed now.
        return False, None

    def update_connector_output(self, connector_output) -> None:
        """Blocks that failed to load are recomputed by vLLM; the chunks from
        the first of them on were not stored (see wait_for_save), so plan to
        store them again once recomputed."""
        invalid = getattr(connector_output, "invalid_block_ids", None)
        if not invalid:
            return
        bs, chunk = self._settings.block_size, self._settings.chunk_tokens
        for state in self._reqs.values():
            for i, b in enumerate(state.block_ids[: -(-state.saved_tokens // bs)]):
                if b in invalid:
                    state.saved_tokens = min(state.saved_tokens, i * bs // chunk * chunk)
                    break

    # ============================================================ worker side

    def register_kv_caches(self, kv_caches: dict) -> None:
        if self._shared is not None:
            self._shared.worker_attached = True
        if self._disabled is not None:
            return
        try:
            names = list(kv_caches)
            indices = {n: _layer_index(n) for n in names}
            if any(i is None for i in indices.values()):
                names.sort()
                indices = {n: i for i, n in enumerate(names)}
            else:
                names.sort(key=lambda n: indices[n])
                if sorted(indices.values()) != list(range(len(names))):
                    # Layer indices with gaps (e.g. some layers share KV): use positions.
                    indices = {n: i for i, n in enumerate(names)}
            tensors = [kv_caches[n] for n in names]
            axes, kind = self._axes(tensors[0])
            if axes is None:
                self._disable(f"unsupported KV cache tensor shape {tuple(tensors[0].shape)}")
                return
            # vLLM allocates an fp8 cache as uint8: say what the bytes are.
            dtype = "fp8" if self._settings.kv_dtype == "f8e4m3" else None
            self._layout = cachegen.Layout.from_tensors(tensors, axes, kind=kind, dtype=dtype)
            self._layer_index = indices
            t = tensors[0]
            logger.info(
                "CacheGenConnector: registered %d layers, shape %s, strides %s, dtype %s, device %s, axes %s",
                len(tensors), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, axes,
            )
        except cachegen.CacheGenError as e:
            device = getattr(next(iter(kv_caches.values()), None), "device", "?")
            self._disable(f"libcachegen cannot use the KV cache tensors (device {device}): {e} (code {getattr(e, 'code', '?')})")
        except Exception as e:
            logger.exception("CacheGenConnector: register_kv_caches failed")
            self._disable(f"register_kv_caches failed: {e}")

    def _axes(self, t: "torch.Tensor"):
        """Logical axes of one layer's tensor. Shapes are logical (vLLM permutes
        strides, not shapes, for HND), so only the block/KV order and MLA differ."""
        bs = self._settings.block_size
        shape = tuple(t.shape)
        num_blocks = getattr(self._kv_cache_config_arg, "num_blocks", None)
        if len(shape) == 5 and shape[2] == bs:
            if shape[0] == 2 and (shape[1] == num_blocks or shape[1] != 2 or num_blocks is None):
                return ("kv", "block", "token", "head", "dim"), "kv"  # FlashAttention
            if shape[1] == 2:
                return ("block", "kv", "token", "head", "dim"), "kv"  # FlashInfer / Triton
        if len(shape) == 3 and shape[1] == bs:
            return ("block", "token", "dim"), "latent"  # MLA
        return None, None

    def _stream(self):
        """The current CUDA stream when the KV cache is on the GPU, else None."""
        if self._layout is None or self._layout.memory != "cuda":
            return None
        import torch

        return torch.cuda.current_stream()

    def bind_connector_metadata(self, connector_metadata) -> None:
        super().bind_connector_metadata(connector_metadata)
        self._step_failed = set()

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        bs = self._settings.block_size
        for req in getattr(meta, "requests", []):
            if not req.load:
                continue
            self._failed_blocks.update(req.unloadable_blocks)
            self._step_failed.update(req.unloadable_blocks)
            if req.load_tokens <= req.first_token:
                continue
            wanted = req.block_ids[req.first_token // bs : req.load_tokens // bs]
            if self._disabled is not None or self._layout is None:
                self._failed_blocks.update(wanted)
                self._step_failed.update(wanted)
                continue
            lease = req.lease_id if (self._shared is not None and req.lease_owner == self._shared.token) else 0
            try:
                job = self._ctx.load(
                    self._layout, req.token_ids[: req.load_tokens], req.block_ids,
                    first_token=req.first_token, salt=req.salt, lease_id=lease, stream=self._stream(),
                )
                self._load_jobs.append((req, job))
            except Exception as e:
                logger.error("CacheGenConnector: load of %s could not start (%s); %d blocks will be recomputed",
                             req.req_id, e, len(wanted))
                self._failed_blocks.update(wanted)
                self._step_failed.update(wanted)
        if not self._settings.layerwise:
            for req, job in self._load_jobs:
                self._wait(job, req, stage="done")

    def _wait(self, job, req, stage: str = "done", layer: Optional[int] = None) -> None:
        """Waits without raising; a job past the deadline is cancelled (its
        unwritten blocks become failed blocks)."""
        timeout = self._settings.load_timeout_s + 5.0
        try:
            stream = self._stream()
            if layer is None:
                ok = job.wait(stage, timeout=timeout)
            elif stream is not None:
                ok = job.wait_layer_on_stream(layer, stream, timeout=timeout)
            else:
                ok = job.wait_layer(layer, timeout=timeout)
            if not ok:
                logger.error("CacheGenConnector: load of %s timed out after %.1f s; cancelling", req.req_id, timeout)
                job.cancel()
                job.wait("done", timeout=timeout)
        except Exception:
            logger.exception("CacheGenConnector: waiting for the load of %s failed", req.req_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._load_jobs or not self._settings.layerwise:
            return
        layer = self._layer_index.get(layer_name)
        if layer is None:
            return
        for req, job in self._load_jobs:
            self._wait(job, req, layer=layer)

    def save_kv_layer(self, layer_name: str, kv_layer, attn_metadata, **kwargs: Any) -> None:
        # Stores are whole-request: started in wait_for_save, after the last layer.
        return None

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata() or self._disabled is not None or self._layout is None:
            return
        meta = self._get_connector_metadata()
        # A block whose load failed this step holds garbage, and so may every
        # token computed after it (attention read it): store only the chunks
        # before the first failed block. vLLM recomputes the rest, and the
        # scheduler side plans their store again (update_connector_output).
        self._finish_loads()
        bs, chunk = self._settings.block_size, self._settings.chunk_tokens
        started = []
        for req in getattr(meta, "requests", []):
            if not req.save:
                continue
            n = req.save_tokens
            if self._step_failed:
                bad = [i for i, b in enumerate(req.block_ids[: -(-n // bs)]) if b in self._step_failed]
                if bad:
                    n = min(n, bad[0] * bs // chunk * chunk)
            if n <= 0:
                continue
            try:
                job = self._ctx.store(self._layout, req.token_ids[:n], req.block_ids, salt=req.salt, stream=self._stream())
                started.append((req.req_id, job))
            except Exception as e:
                logger.error("CacheGenConnector: store of %s could not start: %s", req.req_id, e)
        timeout = self._settings.load_timeout_s + 5.0
        for req_id, job in started:
            try:
                if not job.wait("reusable", timeout=timeout):
                    logger.error("CacheGenConnector: store of %s still reading blocks after %.1f s", req_id, timeout)
            except Exception:
                logger.exception("CacheGenConnector: waiting for the store of %s failed", req_id)
            self._store_jobs.append((req_id, job))
        self._reap_stores()

    def _reap_stores(self, wait: bool = False) -> None:
        """Logs and frees store jobs that are done (writing happens in the background)."""
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
                    logger.warning("CacheGenConnector: store of %s: %s chunks failed: %s",
                                   req_id, info.get("chunks_failed"), "; ".join(job.errors()))
                job.close()
            except Exception:
                logger.exception("CacheGenConnector: finishing the store of %s failed", req_id)
        self._store_jobs = keep

    def get_finished(self, finished_req_ids):
        self._reap_stores()
        return None, None  # nothing is asynchronous across steps

    def _finish_loads(self) -> None:
        """Waits for this step's loads, moves their failed blocks to
        ``_failed_blocks`` and frees the jobs."""
        for req, job in self._load_jobs:
            self._wait(job, req, stage="done")
            try:
                blocks = job.failed_blocks()
                if blocks:
                    logger.warning("CacheGenConnector: load of %s: %d blocks failed (%s); vLLM will recompute them",
                                   req.req_id, len(blocks), "; ".join(job.errors()))
                blocks = [int(b) for b in blocks]
            except Exception:
                logger.exception("CacheGenConnector: reading the failures of %s failed; recomputing all its blocks", req.req_id)
                bs = self._settings.block_size
                blocks = req.block_ids[req.first_token // bs : req.load_tokens // bs]
            self._failed_blocks.update(blocks)
            self._step_failed.update(blocks)
            try:
                job.close()
            except Exception:
                logger.exception("CacheGenConnector: closing a load job failed")
        self._load_jobs = []

    def get_block_ids_with_load_errors(self) -> set:
        self._finish_loads()
        failed, self._failed_blocks = self._failed_blocks, set()
        return failed

    def handle_preemptions(self, kv_connector_metadata) -> None:
        # Loads are waited for within their step and stores are past REUSABLE
        # (source blocks read) before their step ends, so nothing can still
        # touch a preempted request's blocks.
        return None

    def get_kv_connector_stats(self):
        return None

    def stats(self) -> dict:
        """libcachegen's statistics (counters, tiers, leases), or {} when disabled."""
        return self._ctx.stats() if self._ctx is not None else {}

    def shutdown(self) -> None:
        try:
            for req, job in self._load_jobs:
                job.cancel()
                job.close()
            self._load_jobs = []
            self._reap_stores(wait=True)
        except Exception:
            logger.exception("CacheGenConnector: shutdown failed")
        if self._shared is not None:
            shared, self._shared = self._shared, None
            _release(shared)


def _base_takes_kv_cache_config() -> bool:
    try:
        return "kv_cache_config" in inspect.signature(KVConnectorBase_V1.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return True


_BASE_TAKES_KV_CACHE_CONFIG = _base_takes_kv_cache_config()

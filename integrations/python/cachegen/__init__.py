"""Python binding of libcachegen's C ABI (``include/cachegen.h``), through ctypes.

libcachegen stores an engine's paged KV cache as compressed chunks in storage
tiers (memory, disk, Redis) and loads them back into any engine's block
layout. This module is a thin, pure-Python wrapper: every decision is made by
the library; Python only converts arguments, checks ranges ctypes would
silently truncate, turns error statuses into :class:`CacheGenError`, and keeps
the engine's arrays alive while the library may touch them.

The shared library is found, in order, through:

1. the ``CACHEGEN_LIBRARY`` environment variable (a path to ``libcachegen.so``;
   when it is set, nothing else is tried);
2. ``libcachegen.so`` beside this file (a wheel may bundle it);
3. ``../../target/release/libcachegen.so`` relative to the package source
   (``integrations/python`` in the cachegen repository, after
   ``cargo build --release``).

It is loaded on first use, so ``import cachegen`` always works; a missing
library raises :class:`LibraryNotFoundError` (a :class:`CacheGenError` and an
:class:`ImportError`) naming every place tried.

Example::

    import cachegen
    ctx = cachegen.Context({"namespace": {"model": "my-model@abc", "kv_dtype": "f16",
                                          "block_size": 16}, "chunk_tokens": 256})
    layout = cachegen.Layout.from_tensors(kv_caches, ("kv", "block", "token", "head", "dim"))
    ctx.store(layout, tokens, block_ids).wait()
    matched, lease = ctx.lookup(tokens, lease_ms=5000)
    job = ctx.load(layout, tokens[:matched], other_block_ids, lease_id=lease)
    for layer in range(layout.layers):
        job.wait_layer(layer)
    job.wait()
    assert not job.failed_blocks()
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager
from ctypes import POINTER, byref, c_char, c_char_p, c_int32, c_int64, c_size_t, c_uint32, c_uint64, c_void_p
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

__version__ = "0.1.0"

__all__ = [
    "version",
    "library_path",
    "CacheGenError",
    "LibraryNotFoundError",
    "Context",
    "Layout",
    "Job",
    "AXES",
]

# Status codes (include/cachegen.h).
CG_OK = 0
CG_PENDING = 1
CG_ERR_INVALID_ARGUMENT = -1
CG_ERR_CONFIG = -2
CG_ERR_LAYOUT = -3
CG_ERR_STORAGE = -4
CG_ERR_NO_GPU = -5
CG_ERR_BUFFER_TOO_SMALL = -6
CG_ERR_UNSUPPORTED = -7
CG_ERR_INTERNAL = -100
#: Python side only: the shared library could not be found or loaded.
CG_ERR_LIBRARY = -1000

CG_DTYPE_F16 = 1
CG_DTYPE_BF16 = 2
CG_DTYPE_F32 = 3
#: FP8 E4M3 (``float8_e4m3fn``), coded in its stored units: the engine's
#: per-layer k/v scales are neither passed nor applied (docs/ABI.md).
CG_DTYPE_F8E4M3 = 4
CG_KIND_KEY_VALUE = 0
CG_KIND_LATENT = 1
CG_MEMORY_HOST = 0
CG_MEMORY_CUDA = 1
CG_STAGE_REUSABLE = 1
CG_STAGE_DONE = 2
CG_JOB_STORE = 1
CG_JOB_LOAD = 2

_CODE_NAMES = {
    CG_OK: "CG_OK",
    CG_PENDING: "CG_PENDING",
    CG_ERR_INVALID_ARGUMENT: "CG_ERR_INVALID_ARGUMENT",
    CG_ERR_CONFIG: "CG_ERR_CONFIG",
    CG_ERR_LAYOUT: "CG_ERR_LAYOUT",
    CG_ERR_STORAGE: "CG_ERR_STORAGE",
    CG_ERR_NO_GPU: "CG_ERR_NO_GPU",
    CG_ERR_BUFFER_TOO_SMALL: "CG_ERR_BUFFER_TOO_SMALL",
    CG_ERR_UNSUPPORTED: "CG_ERR_UNSUPPORTED",
    CG_ERR_INTERNAL: "CG_ERR_INTERNAL",
    CG_ERR_LIBRARY: "CG_ERR_LIBRARY",
}

_KINDS = {"kv": CG_KIND_KEY_VALUE, "key_value": CG_KIND_KEY_VALUE, "latent": CG_KIND_LATENT, "mla": CG_KIND_LATENT}
_DTYPES = {
    "f16": CG_DTYPE_F16, "float16": CG_DTYPE_F16, "half": CG_DTYPE_F16,
    "bf16": CG_DTYPE_BF16, "bfloat16": CG_DTYPE_BF16,
    "f32": CG_DTYPE_F32, "float32": CG_DTYPE_F32, "float": CG_DTYPE_F32,
    "fp8": CG_DTYPE_F8E4M3, "fp8_e4m3": CG_DTYPE_F8E4M3, "f8e4m3": CG_DTYPE_F8E4M3, "float8_e4m3fn": CG_DTYPE_F8E4M3,
}
_DTYPE_NAMES = {CG_DTYPE_F16: "f16", CG_DTYPE_BF16: "bf16", CG_DTYPE_F32: "f32", CG_DTYPE_F8E4M3: "f8e4m3"}
_DTYPE_SIZES = {CG_DTYPE_F16: 2, CG_DTYPE_BF16: 2, CG_DTYPE_F32: 4, CG_DTYPE_F8E4M3: 1}
#: Element types that only hold raw bytes of another dtype (vLLM allocates its
#: fp8 cache as torch.uint8): accepted with an explicit ``dtype=``, never guessed.
_RAW_DTYPES = {"uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4}
_E5M2 = ("fp8_e5m2", "float8_e5m2", "f8e5m2", "float8_e5m2fnuz")
_MEMORY = {"host": CG_MEMORY_HOST, "cpu": CG_MEMORY_HOST, "cuda": CG_MEMORY_CUDA}
_STAGES = {"reusable": CG_STAGE_REUSABLE, "done": CG_STAGE_DONE}

#: Axis names understood by :meth:`Layout.from_tensors`.
AXES = ("layer", "block", "kv", "token", "head", "dim")

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1

#: First buffer size for the string-returning calls (retried with the size
#: the library reports on CG_ERR_BUFFER_TOO_SMALL).
_INITIAL_BUFFER = 4096

#: A wait without a timeout waits in slices this long, so that Ctrl-C (which
#: Python handles between calls) still interrupts it.
_WAIT_SLICE_MS = 250


class CacheGenError(Exception):
    """A libcachegen call failed. ``code`` is the ``CG_ERR_*`` status (negative);
    ``message`` the library's explanation (``cg_last_error_message``)."""

    def __init__(self, code: int, message: str):
        self.code = int(code)
        self.message = message
        super().__init__(f"{message} [{_CODE_NAMES.get(self.code, 'error')} ({self.code})]")

    def __reduce__(self):
        return (type(self), (self.code, self.message))


class LibraryNotFoundError(CacheGenError, ImportError):
    """libcachegen could not be found or loaded (``code`` is ``CG_ERR_LIBRARY``)."""


# ---------------------------------------------------------------------------
# The C structures

class _LayoutDesc(ctypes.Structure):
    _fields_ = [
        ("kind", c_uint32),
        ("dtype", c_uint32),
        ("memory", c_uint32),
        ("layers", c_uint32),
        ("num_blocks", c_uint32),
        ("block_size", c_uint32),
        ("heads", c_uint32),
        ("head_dim", c_uint32),
        ("layer_base", POINTER(c_uint64)),
        ("stride_block", c_int64),
        ("stride_kv", c_int64),
        ("stride_token", c_int64),
        ("stride_head", c_int64),
        ("stride_layer", c_int64),
    ]


class _ChunkDecision(ctypes.Structure):
    _fields_ = [
        ("chunk", c_uint32),
        ("planned", c_uint32),
        ("outcome", c_uint32),
        ("reserved", c_uint32),
        ("est_bytes_per_s", ctypes.c_double),
        ("budget_s", ctypes.c_double),
        ("bytes", c_uint64),
        ("fetch_s", ctypes.c_double),
    ]


_CHOICES = {0: "recompute", 1: "compact", 2: "default", 3: "high", 4: "lossless"}


class _JobInfo(ctypes.Structure):
    _fields_ = [
        ("kind", c_uint32),
        ("reusable", c_uint32),
        ("done", c_uint32),
        ("layers_done", c_uint32),
        ("layers", c_uint32),
        ("chunks_ok", c_uint64),
        ("chunks_failed", c_uint64),
        ("chunks_skipped", c_uint64),
        ("failed_blocks", c_uint64),
    ]


_P_U32 = POINTER(c_uint32)
_P_HANDLE = POINTER(c_void_p)

# name: (argtypes, restype). Salt pointers are `const uint8_t *`, passed as
# c_char_p (same ABI; accepts bytes, whose embedded NULs are fine since the
# length is passed separately).
_SIGNATURES = {
    "cg_version": ([], c_char_p),
    "cg_last_error_message": ([], c_char_p),
    "cg_context_new": ([c_char_p, _P_HANDLE], c_int32),
    "cg_context_free": ([c_void_p], None),
    "cg_layout_new": ([POINTER(_LayoutDesc), _P_HANDLE], c_int32),
    "cg_layout_free": ([c_void_p], None),
    "cg_lookup": ([c_void_p, _P_U32, c_size_t, c_char_p, c_size_t, c_uint32, POINTER(c_uint64), POINTER(c_uint64)], c_int32),
    "cg_lease_release": ([c_void_p, c_uint64], c_int32),
    "cg_store": ([c_void_p, c_void_p, _P_U32, c_size_t, _P_U32, c_size_t, c_char_p, c_size_t, _P_HANDLE], c_int32),
    "cg_load": ([c_void_p, c_void_p, _P_U32, c_size_t, _P_U32, c_size_t, c_size_t, c_char_p, c_size_t, c_uint64, _P_HANDLE], c_int32),
    "cg_job_wait": ([c_void_p, c_uint32, c_int64], c_int32),
    "cg_job_wait_layer": ([c_void_p, c_uint32, c_int64], c_int32),
    "cg_store_on_stream": ([c_void_p, c_void_p, _P_U32, c_size_t, _P_U32, c_size_t, c_char_p, c_size_t, c_uint64, _P_HANDLE], c_int32),
    "cg_load_on_stream": ([c_void_p, c_void_p, _P_U32, c_size_t, _P_U32, c_size_t, c_size_t, c_char_p, c_size_t, c_uint64, c_uint64, _P_HANDLE], c_int32),
    "cg_job_wait_layer_on_stream": ([c_void_p, c_uint32, c_uint64, c_int64], c_int32),
    "cg_job_info": ([c_void_p, POINTER(_JobInfo)], c_int32),
    "cg_job_failed_blocks": ([c_void_p, _P_U32, c_size_t, POINTER(c_size_t)], c_int32),
    "cg_job_errors": ([c_void_p, POINTER(c_char), c_size_t, POINTER(c_size_t)], c_int32),
    "cg_job_chunk_decisions": ([c_void_p, POINTER(_ChunkDecision), c_size_t, POINTER(c_size_t)], c_int32),
    "cg_job_cancel": ([c_void_p], c_int32),
    "cg_job_free": ([c_void_p], None),
    "cg_stats_json": ([c_void_p, POINTER(c_char), c_size_t, POINTER(c_size_t)], c_int32),
}


# ---------------------------------------------------------------------------
# Finding and loading the library

if sys.platform == "darwin":
    _LIBNAME = "libcachegen.dylib"
elif sys.platform == "win32":
    _LIBNAME = "cachegen.dll"
else:
    _LIBNAME = "libcachegen.so"

_lib: Optional[ctypes.CDLL] = None
_lib_path: Optional[str] = None
_lib_lock = threading.Lock()


def _candidates() -> List[Tuple[str, Path]]:
    env = os.environ.get("CACHEGEN_LIBRARY")
    if env:
        return [("$CACHEGEN_LIBRARY", Path(env))]
    here = Path(__file__).resolve().parent
    return [
        ("beside the package", here / _LIBNAME),
        ("repository build", here.parent.parent.parent / "target" / "release" / _LIBNAME),
    ]


def _open() -> Tuple[ctypes.CDLL, str]:
    tried = []
    for what, path in _candidates():
        if not path.is_file():
            tried.append(f"  {path} ({what}): not found")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            tried.append(f"  {path} ({what}): {e}")
            continue
        missing = [name for name in _SIGNATURES if not hasattr(lib, name)]
        if missing:
            tried.append(f"  {path} ({what}): not libcachegen, or too old (no {', '.join(missing)})")
            continue
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes = argtypes
            fn.restype = restype
        return lib, str(path)
    raise LibraryNotFoundError(
        CG_ERR_LIBRARY,
        "libcachegen could not be loaded; tried:\n" + "\n".join(tried)
        + "\nBuild it with `cargo build --release` in the cachegen repository, or set CACHEGEN_LIBRARY"
        " to the path of libcachegen.so.",
    )


def _library() -> ctypes.CDLL:
    global _lib, _lib_path
    lib = _lib
    if lib is None:
        with _lib_lock:
            if _lib is None:
                _lib, _lib_path = _open()
            lib = _lib
    return lib


def library_path() -> str:
    """The path of the loaded libcachegen (loading it if needed)."""
    _library()
    assert _lib_path is not None
    return _lib_path


def version() -> str:
    """libcachegen's version, e.g. ``"0.1.0"``."""
    return _library().cg_version().decode()


# ---------------------------------------------------------------------------
# Helpers

def _error(lib: ctypes.CDLL, code: int) -> CacheGenError:
    raw = lib.cg_last_error_message()
    msg = raw.decode("utf-8", "replace") if raw else ""
    return CacheGenError(code, msg or _CODE_NAMES.get(code, "libcachegen error"))


def _check(lib: ctypes.CDLL, code: int) -> int:
    if code < 0:
        raise _error(lib, code)
    return code


def _invalid(msg: str) -> CacheGenError:
    return CacheGenError(CG_ERR_INVALID_ARGUMENT, msg)


def _int_in(value: Any, lo: int, hi: int, name: str) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise _invalid(f"{name} must be an integer, not {value!r}")
    try:
        v = int(value)
    except (TypeError, ValueError, OverflowError):
        raise _invalid(f"{name} must be an integer, not {value!r}") from None
    if not lo <= v <= hi:
        raise _invalid(f"{name} = {v} is outside {lo}..={hi}")
    return v


def _u32_array(seq: Any, name: str) -> np.ndarray:
    """`seq` (list, tuple, numpy array, CPU torch tensor) as contiguous 1-D uint32."""
    if isinstance(seq, np.ndarray) and seq.dtype == np.uint32 and seq.ndim == 1 and seq.flags.c_contiguous:
        return seq
    if not isinstance(seq, np.ndarray) and hasattr(seq, "detach") and hasattr(seq, "cpu"):
        seq = seq.detach().cpu().numpy()  # a torch tensor
    try:
        arr = np.asarray(seq)
    except (TypeError, ValueError) as e:
        raise _invalid(f"{name} must be a sequence of integers: {e}") from None
    if arr.size == 0:
        return np.zeros(0, dtype=np.uint32)
    if arr.ndim != 1:
        raise _invalid(f"{name} must be one-dimensional, not of shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise _invalid(f"{name} must hold integers, not {arr.dtype}")
    if arr.dtype != np.uint32:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > _U32_MAX:
            raise _invalid(f"{name} must lie in 0..=2**32-1 (found {lo if lo < 0 else hi})")
        arr = arr.astype(np.uint32)
    return np.ascontiguousarray(arr)


def _u32_ptr(arr: np.ndarray):
    return arr.ctypes.data_as(_P_U32) if arr.size else None


def _salt(salt: Any) -> bytes:
    if salt is None:
        return b""
    if isinstance(salt, str):
        return salt.encode("utf-8")
    if isinstance(salt, (bytes, bytearray, memoryview)):
        return bytes(salt)
    raise _invalid(f"salt must be bytes or str, not {type(salt).__name__}")


def _stream_handle(stream: Any) -> int:
    """A CUDA stream as the integer the C ABI takes: a ``torch.cuda.Stream``
    (its ``cuda_stream``), a CuPy stream (``ptr``) or an int (0: the legacy
    default stream)."""
    for attr in ("cuda_stream", "ptr"):
        if hasattr(stream, attr):
            stream = getattr(stream, attr)
            break
    if isinstance(stream, bool) or not isinstance(stream, int):
        raise _invalid(f"stream must be a CUDA stream object or an int, not {type(stream).__name__}")
    return _int_in(stream, 0, _U64_MAX, "stream")


def _timeout_ms(timeout: Optional[float]) -> Optional[int]:
    """None (no limit) or a non-negative number of milliseconds."""
    if timeout is None:
        return None
    t = float(timeout)
    if math.isnan(t):
        raise _invalid("timeout is NaN")
    if math.isinf(t) and t > 0:
        return None
    return min(max(0, math.ceil(t * 1000.0)), _I64_MAX)


def _read_string(lib: ctypes.CDLL, fn, handle: int) -> str:
    """Calls a `(handle, buf, cap, *len)` function, growing the buffer as told."""
    cap = max(1, int(_INITIAL_BUFFER))
    for _ in range(16):
        buf = ctypes.create_string_buffer(cap)
        needed = c_size_t(0)
        rc = fn(handle, buf, cap, byref(needed))
        if rc == CG_OK:
            return buf.raw[: needed.value].decode("utf-8", "replace")
        if rc != CG_ERR_BUFFER_TOO_SMALL:
            raise _error(lib, rc)
        # Leave room for growth between the two calls (statistics move).
        cap = needed.value + 1 + needed.value // 8 + 64
    raise CacheGenError(CG_ERR_INTERNAL, "the library kept asking for a larger buffer")


class _Handle:
    """A C handle that several threads may use: each call holds it (``use``),
    and ``close`` waits for the calls in progress before freeing it, so a
    handle is never freed under a running call. Waits are made in slices of
    at most ``_WAIT_SLICE_MS``, so closing never waits long for them."""

    __slots__ = ("ptr", "_free", "_what", "_cv", "_users", "_closing")

    def __init__(self, ptr: int, free, what: str):
        self.ptr: Optional[int] = ptr
        self._free = free
        self._what = what
        self._cv = threading.Condition(threading.Lock())
        self._users = 0
        self._closing = False

    @contextmanager
    def use(self):
        with self._cv:
            if self.ptr is None or self._closing:
                raise _invalid(f"the {self._what} is closed")
            self._users += 1
        try:
            yield self.ptr
        finally:
            with self._cv:
                self._users -= 1
                if self._users == 0:
                    self._cv.notify_all()

    @property
    def closed(self) -> bool:
        return self.ptr is None or self._closing

    def close(self) -> None:
        with self._cv:
            if self.ptr is None or self._closing:
                return
            self._closing = True
            while self._users:
                self._cv.wait()
            ptr, self.ptr = self.ptr, None
        self._free(ptr)


# ---------------------------------------------------------------------------
# Layout

def _dtype_key(name: Any) -> str:
    key = str(name).lower()
    if key.startswith("torch."):
        key = key[len("torch."):]
    return key


def _dtype_code(name: Any) -> int:
    key = _dtype_key(name)
    code = _DTYPES.get(key)
    if code is None:
        if key in _E5M2:
            raise CacheGenError(CG_ERR_INVALID_ARGUMENT, f"dtype {name!r}: FP8 E5M2 KV caches are not supported (FP8 E4M3 is: 'fp8')")
        if key in _RAW_DTYPES:
            raise CacheGenError(
                CG_ERR_INVALID_ARGUMENT,
                f"dtype {name!r} holds raw bytes: pass dtype= naming what they are (e.g. dtype='fp8' for vLLM's fp8 cache, allocated as uint8)",
            )
        raise CacheGenError(CG_ERR_INVALID_ARGUMENT, f"dtype {name!r} is not float16, bfloat16, float32 or fp8 (float8_e4m3fn)")
    return code


def _element_code(native: Any, override: Any) -> int:
    """The dtype code of an array whose own element type is ``native``:
    that type, or ``override`` when given. An override must name the array's
    own type, or reinterpret raw integers of the same size (uint8 -> fp8);
    it never reinterprets one float type as another."""
    if override is None:
        return _dtype_code(native)
    code = _dtype_code(override)
    key = _dtype_key(native)
    if _DTYPES.get(key) == code or _RAW_DTYPES.get(key) == _DTYPE_SIZES[code]:
        return code
    raise CacheGenError(
        CG_ERR_INVALID_ARGUMENT,
        f"dtype={override!r} does not fit tensors of dtype {native}: an override reinterprets raw integers of the same size only",
    )


def _tensor_info(t: Any, dtype_override: Any = None) -> Dict[str, Any]:
    """Address, logical shape, byte strides, dtype and memory of an array or
    tensor, read from the object itself (never copied)."""
    if not isinstance(t, np.ndarray) and hasattr(t, "data_ptr") and hasattr(t, "stride"):
        # torch.Tensor (or anything shaped like it): strides are in elements.
        es = int(t.element_size())
        dtype = _element_code(t.dtype, dtype_override)
        if _DTYPE_SIZES[dtype] != es:
            raise CacheGenError(CG_ERR_LAYOUT, f"dtype {t.dtype} has {es}-byte elements")
        device = getattr(t, "device", None)
        dev_type = getattr(device, "type", None) or ("cuda" if getattr(t, "is_cuda", False) else "cpu")
        if dev_type not in ("cpu", "cuda"):
            raise CacheGenError(CG_ERR_UNSUPPORTED, f"tensors on {dev_type!r} devices are not supported (cpu or cuda)")
        return {
            "ptr": int(t.data_ptr()),
            "shape": tuple(int(n) for n in t.shape),
            "strides": tuple(int(s) * es for s in t.stride()),
            "dtype": dtype,
            "itemsize": es,
            "memory": "cuda" if dev_type == "cuda" else "host",
            "writable": True,
            "device": str(device) if device is not None else dev_type,
        }
    if not isinstance(t, np.ndarray):
        if hasattr(t, "__array_interface__"):
            t = np.asarray(t)  # a view of the object's memory, not a copy
        else:
            raise TypeError(f"expected a numpy array or a torch-like tensor, not {type(t).__name__}")
    dtype = _element_code(t.dtype.name, dtype_override)
    if _DTYPE_SIZES[dtype] != int(t.itemsize):
        raise CacheGenError(CG_ERR_LAYOUT, f"dtype {t.dtype} has {t.itemsize}-byte elements")
    return {
        "ptr": int(t.__array_interface__["data"][0]),
        "shape": tuple(int(n) for n in t.shape),
        "strides": tuple(int(s) for s in t.strides),
        "dtype": dtype,
        "itemsize": int(t.itemsize),
        "memory": "host",
        "writable": bool(t.flags.writeable),
        "device": "cpu",
    }


class Layout:
    """An engine's paged KV memory (``cg_layout``). Element (layer ``l``, stream
    ``s`` (0 key or latent, 1 value), block ``b``, token-in-block ``t``, head
    ``h``, dim ``d``) is at ``layer_base[l] + l*stride_layer + b*stride_block +
    s*stride_kv + t*stride_token + h*stride_head + d*element_size`` (bytes).

    The library validates the geometry (``CacheGenError`` with code
    ``CG_ERR_LAYOUT`` when elements could alias) but cannot know whether the
    addresses are valid memory: that is the caller's contract, which
    :meth:`from_tensors` fulfils by reading everything from the arrays and
    keeping references to them (``keepalive``) for as long as this object or a
    job using it lives.
    """

    def __init__(
        self,
        kind: str,
        dtype: str,
        layers: int,
        num_blocks: int,
        block_size: int,
        heads: int,
        head_dim: int,
        layer_base: Sequence[int],
        stride_block: int,
        stride_kv: int,
        stride_token: int,
        stride_head: int,
        stride_layer: int = 0,
        memory: str = "host",
        keepalive: Any = None,
    ):
        self._h: Optional[_Handle] = None
        lib = _library()
        self._lib = lib
        if str(kind).lower() not in _KINDS:
            raise _invalid(f"kind {kind!r} is not 'kv' or 'latent'")
        if str(memory).lower() not in _MEMORY:
            raise _invalid(f"memory {memory!r} is not 'host' or 'cuda'")
        self.kind = "kv" if _KINDS[str(kind).lower()] == CG_KIND_KEY_VALUE else "latent"
        dcode = _dtype_code(dtype)
        self.dtype = _DTYPE_NAMES[dcode]
        self.memory = "cuda" if _MEMORY[str(memory).lower()] == CG_MEMORY_CUDA else "host"
        self.layers = _int_in(layers, 0, _U32_MAX, "layers")
        self.num_blocks = _int_in(num_blocks, 0, _U32_MAX, "num_blocks")
        self.block_size = _int_in(block_size, 0, _U32_MAX, "block_size")
        self.heads = _int_in(heads, 0, _U32_MAX, "heads")
        self.head_dim = _int_in(head_dim, 0, _U32_MAX, "head_dim")
        bases = [_int_in(b, 0, _U64_MAX, "layer_base[]") for b in layer_base]
        if len(bases) != self.layers:
            # The library reads exactly `layers` entries: a shorter list would be read past its end.
            raise CacheGenError(CG_ERR_LAYOUT, f"layer_base has {len(bases)} entries for {self.layers} layers")
        self.layer_base = tuple(bases)
        self.stride_block = _int_in(stride_block, _I64_MIN, _I64_MAX, "stride_block")
        self.stride_kv = _int_in(stride_kv, _I64_MIN, _I64_MAX, "stride_kv")
        self.stride_token = _int_in(stride_token, _I64_MIN, _I64_MAX, "stride_token")
        self.stride_head = _int_in(stride_head, _I64_MIN, _I64_MAX, "stride_head")
        self.stride_layer = _int_in(stride_layer, _I64_MIN, _I64_MAX, "stride_layer")
        self.keepalive = keepalive
        #: False when some array is read-only: such a layout can be stored from, never loaded into.
        self.writable = True

        base_arr = (c_uint64 * max(1, len(bases)))(*bases)
        desc = _LayoutDesc(
            kind=_KINDS[self.kind],
            dtype=dcode,
            memory=_MEMORY[self.memory],
            layers=self.layers,
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            heads=self.heads,
            head_dim=self.head_dim,
            layer_base=ctypes.cast(base_arr, POINTER(c_uint64)) if bases else None,
            stride_block=self.stride_block,
            stride_kv=self.stride_kv,
            stride_token=self.stride_token,
            stride_head=self.stride_head,
            stride_layer=self.stride_layer,
        )
        out = c_void_p()
        _check(lib, lib.cg_layout_new(byref(desc), byref(out)))
        self._h = _Handle(out.value, lib.cg_layout_free, "layout")

    @classmethod
    def from_tensors(cls, tensors: Any, axes: Sequence[str], kind: str = "kv", dtype: Optional[str] = None) -> "Layout":
        """A layout over an engine's own KV arrays or tensors.

        ``tensors`` is a list of per-layer arrays (all of one shape, strides and
        dtype), or ONE pool array whose ``axes`` include ``"layer"``. ``axes``
        names each axis of the array's logical shape from ``"layer"``,
        ``"block"``, ``"kv"`` (absent for ``kind="latent"``), ``"token"``,
        ``"head"`` (may be absent: one head) and ``"dim"``. Strides always come
        from the array itself (numpy ``.strides``; torch ``.stride()`` times
        ``element_size()``), so a physically permuted tensor (vLLM HND) is
        described by its logical shape. Examples:

        - vLLM flash-attn, per layer ``(2, blocks, block_size, heads, dim)``:
          ``("kv", "block", "token", "head", "dim")`` (NHD or HND alike);
        - FlashInfer per layer: ``("block", "kv", "token", "head", "dim")``;
        - TensorRT-LLM pool ``[blocks, layers, 2, heads, tokens, dim]``:
          ``("block", "layer", "kv", "head", "token", "dim")``;
        - vLLM MLA per layer ``(blocks, block_size, width)``, ``kind="latent"``:
          ``("block", "token", "dim")``.

        The dtype is the arrays' own (torch ``float8_e4m3fn`` or an
        ``ml_dtypes`` float8_e4m3fn array is FP8 E4M3). ``dtype`` overrides it
        only for arrays of raw integers of the same size: vLLM allocates its
        ``--kv-cache-dtype fp8`` cache as ``torch.uint8``, so pass
        ``dtype="fp8"`` for it. FP8 is coded in its stored units; the
        engine's k/v scales are not needed.
        """
        axes = tuple(str(a) for a in axes)
        unknown = [a for a in axes if a not in AXES]
        if unknown:
            raise CacheGenError(CG_ERR_LAYOUT, f"unknown axis name(s) {unknown}; use {list(AXES)}")
        if len(set(axes)) != len(axes):
            raise CacheGenError(CG_ERR_LAYOUT, f"an axis is named twice in {axes}")
        kcode = _KINDS.get(str(kind).lower())
        if kcode is None:
            raise _invalid(f"kind {kind!r} is not 'kv' or 'latent'")
        pooled = "layer" in axes
        if isinstance(tensors, (list, tuple)):
            items = list(tensors)
            if not items:
                raise CacheGenError(CG_ERR_LAYOUT, "no tensors given")
            if pooled and len(items) != 1:
                raise CacheGenError(CG_ERR_LAYOUT, "axes name a 'layer' axis: pass ONE pool tensor, not a list of per-layer tensors")
        else:
            items = [tensors]
            if not pooled:
                raise CacheGenError(CG_ERR_LAYOUT, "one tensor was given but its axes have no 'layer': pass a list of per-layer tensors, or name the pool's layer axis")
        for need in ("block", "token", "dim"):
            if need not in axes:
                raise CacheGenError(CG_ERR_LAYOUT, f"axes {axes} lack {need!r}")
        if kcode == CG_KIND_KEY_VALUE and "kv" not in axes:
            raise CacheGenError(CG_ERR_LAYOUT, f"a 'kv' layout needs a 'kv' axis (extent 2) in {axes}")

        infos = [_tensor_info(t, dtype) for t in items]
        first = infos[0]
        for i, info in enumerate(infos):
            if len(info["shape"]) != len(axes):
                raise CacheGenError(CG_ERR_LAYOUT, f"tensor {i} has {len(info['shape'])} axes; {len(axes)} are named ({axes})")
            for key in ("shape", "strides", "dtype", "memory", "device"):
                if info[key] != first[key]:
                    raise CacheGenError(CG_ERR_LAYOUT, f"tensor {i} differs from tensor 0 in {key}: {info[key]} vs {first[key]}")
        dims = dict(zip(axes, first["shape"]))
        strides = dict(zip(axes, first["strides"]))
        if kcode == CG_KIND_KEY_VALUE and dims["kv"] != 2:
            raise CacheGenError(CG_ERR_LAYOUT, f"the 'kv' axis has extent {dims['kv']}, not 2")
        if kcode == CG_KIND_LATENT and dims.get("kv", 1) != 1:
            raise CacheGenError(CG_ERR_LAYOUT, "a latent layout has no K/V axis (or one of extent 1)")
        if dims["dim"] > 1 and strides["dim"] != first["itemsize"]:
            raise CacheGenError(
                CG_ERR_LAYOUT,
                f"the 'dim' axis must be contiguous (stride {first['itemsize']} bytes), not {strides['dim']} bytes",
            )
        if pooled:
            layers = dims["layer"]
            layer_base = [first["ptr"]] * layers
            stride_layer = strides["layer"]
        else:
            layers = len(infos)
            layer_base = [info["ptr"] for info in infos]
            stride_layer = 0
        layout = cls(
            kind="kv" if kcode == CG_KIND_KEY_VALUE else "latent",
            dtype=_DTYPE_NAMES[first["dtype"]],
            layers=layers,
            num_blocks=dims["block"],
            block_size=dims["token"],
            heads=dims.get("head", 1),
            head_dim=dims["dim"],
            layer_base=layer_base,
            stride_block=strides["block"],
            stride_kv=strides.get("kv", 0) if kcode == CG_KIND_KEY_VALUE else 0,
            stride_token=strides["token"],
            stride_head=strides.get("head", 0),
            stride_layer=stride_layer,
            memory=first["memory"],
            keepalive=items,
        )
        layout.writable = all(info["writable"] for info in infos)
        return layout

    def _use(self):
        if self._h is None:
            raise _invalid("the layout is closed")
        return self._h.use()

    @property
    def closed(self) -> bool:
        return self._h is None or self._h.closed

    def close(self) -> None:
        """Releases the handle (jobs using the layout keep their own reference
        to it and to the arrays). Idempotent."""
        if self._h is not None:
            self._h.close()
        self.keepalive = None

    def __enter__(self) -> "Layout":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (
            f"Layout(kind={self.kind!r}, dtype={self.dtype!r}, layers={self.layers}, num_blocks={self.num_blocks}, "
            f"block_size={self.block_size}, heads={self.heads}, head_dim={self.head_dim}, "
            f"stride_block={self.stride_block}, stride_kv={self.stride_kv}, stride_token={self.stride_token}, "
            f"stride_head={self.stride_head}, stride_layer={self.stride_layer}, memory={self.memory!r}"
            f"{', closed' if self.closed else ''})"
        )


# ---------------------------------------------------------------------------
# Job

class Job:
    """A store or load in progress (``cg_job``), returned by
    :meth:`Context.store` and :meth:`Context.load`.

    Closing it (explicitly, by ``with``, or when it is garbage-collected) first
    makes sure the job no longer touches engine memory: a load that is not done
    is CANCELLED and waited for; a store is waited for until reusable (it then
    finishes in the background). So keep a load's job until it is done.
    """

    def __init__(self, lib: ctypes.CDLL, handle: int, context: "Context", keepalive: Any):
        self._lib = lib
        self._h = _Handle(handle, lib.cg_job_free, "job")
        self._context = context
        self._keepalive = keepalive
        info = self.info()
        #: "store" or "load".
        self.kind: str = info["kind"]
        #: Layers of the layout (the range of :meth:`wait_layer`).
        self.layers: int = info["layers"]

    def _wait(self, fn, arg: int, timeout: Optional[float]) -> bool:
        ms = _timeout_ms(timeout)
        deadline = None if ms is None else time.monotonic() + ms / 1000.0
        # In slices, so that KeyboardInterrupt gets through and close() never waits long.
        while True:
            left = _WAIT_SLICE_MS if deadline is None else min(_WAIT_SLICE_MS, max(0, math.ceil((deadline - time.monotonic()) * 1000.0)))
            with self._h.use() as h:
                if _check(self._lib, fn(h, arg, left)) == CG_OK:
                    return True
            if deadline is not None and time.monotonic() >= deadline:
                return False

    def wait(self, stage: str = "done", timeout: Optional[float] = None) -> bool:
        """Waits until ``stage`` (``"done"`` or ``"reusable"``) is reached: True,
        or False if ``timeout`` seconds (None: no limit; 0: poll) passed first.
        Done does not mean every chunk succeeded: see :meth:`info` and
        :meth:`failed_blocks`."""
        code = _STAGES.get(stage) if isinstance(stage, str) else stage
        if code not in (CG_STAGE_REUSABLE, CG_STAGE_DONE):
            raise _invalid(f"stage {stage!r} is not 'done' or 'reusable'")
        return self._wait(self._lib.cg_job_wait, code, timeout)

    def wait_layer(self, layer: int, timeout: Optional[float] = None) -> bool:
        """Waits until layer ``layer`` of a load is complete (written, or its
        chunk failed); for a store, until done. True, or False on timeout."""
        layer = _int_in(layer, 0, _U32_MAX, "layer")
        return self._wait(self._lib.cg_job_wait_layer, layer, timeout)

    def wait_layer_on_stream(self, layer: int, stream: Any, timeout: Optional[float] = None) -> bool:
        """For a load into GPU memory: waits on the host until layer ``layer``'s
        decode is enqueued (every chunk fetched), then makes the CUDA ``stream``
        (e.g. ``torch.cuda.current_stream()``) wait for the layer on the device,
        without waiting for the GPU. For a host load, as :meth:`wait_layer`.
        True, or False if ``timeout`` seconds passed first."""
        layer = _int_in(layer, 0, _U32_MAX, "layer")
        sh = _stream_handle(stream)
        ms = _timeout_ms(timeout)
        with self._h.use() as h:
            rc = _check(self._lib, self._lib.cg_job_wait_layer_on_stream(h, layer, sh, -1 if ms is None else ms))
        return rc == CG_OK

    def info(self) -> Dict[str, Any]:
        """A snapshot: kind ("store"/"load"), reusable, done, layers_done,
        layers, chunks_ok, chunks_failed, chunks_skipped, failed_blocks (count)."""
        i = _JobInfo()
        with self._h.use() as h:
            _check(self._lib, self._lib.cg_job_info(h, byref(i)))
        return {
            "kind": {CG_JOB_STORE: "store", CG_JOB_LOAD: "load"}.get(i.kind, str(i.kind)),
            "reusable": bool(i.reusable),
            "done": bool(i.done),
            "layers_done": i.layers_done,
            "layers": i.layers,
            "chunks_ok": i.chunks_ok,
            "chunks_failed": i.chunks_failed,
            "chunks_skipped": i.chunks_skipped,
            "failed_blocks": i.failed_blocks,
        }

    @property
    def done(self) -> bool:
        return self.info()["done"]

    def failed_blocks(self) -> List[int]:
        """Block ids of failed chunks (sorted, distinct; final once done)."""
        with self._h.use() as h:
            count = c_size_t(0)
            _check(self._lib, self._lib.cg_job_failed_blocks(h, None, 0, byref(count)))
            while True:
                cap = count.value
                if cap == 0:
                    return []
                buf = (c_uint32 * cap)()
                _check(self._lib, self._lib.cg_job_failed_blocks(h, buf, cap, byref(count)))
                if count.value <= cap:  # (the list only grows, until done)
                    return list(buf[: count.value])

    def errors(self) -> List[str]:
        """The first few failure reasons, one per failed chunk."""
        with self._h.use() as h:
            text = _read_string(self._lib, self._lib.cg_job_errors, h)
        return text.split("\n") if text else []

    def chunk_decisions(self) -> List[Dict[str, Any]]:
        """Per-chunk decisions of a load that chooses levels (``levels`` or
        ``adaptive`` in the config), in chunk order: ``chunk``, ``planned`` and
        ``outcome`` (a level name or ``"recompute"``), ``est_gbps``,
        ``budget_ms``, ``bytes``, ``fetch_ms``. Empty for other jobs."""
        n = c_size_t(0)
        with self._h.use() as h:
            _check(self._lib, self._lib.cg_job_chunk_decisions(h, None, 0, byref(n)))
            arr = (_ChunkDecision * max(1, n.value))()
            _check(self._lib, self._lib.cg_job_chunk_decisions(h, arr, n.value, byref(n)))
        return [
            {
                "chunk": int(d.chunk),
                "planned": _CHOICES.get(int(d.planned), str(d.planned)),
                "outcome": _CHOICES.get(int(d.outcome), str(d.outcome)),
                "est_gbps": d.est_bytes_per_s * 8e-9,
                "budget_ms": d.budget_s * 1e3,
                "bytes": int(d.bytes),
                "fetch_ms": d.fetch_s * 1e3,
            }
            for d in arr[: min(n.value, len(arr))]
        ]

    def cancel(self) -> None:
        """Asks the job to stop (a load fails the chunks not yet written);
        returns at once: wait for done afterwards."""
        with self._h.use() as h:
            _check(self._lib, self._lib.cg_job_cancel(h))

    @property
    def closed(self) -> bool:
        return self._h.closed

    def close(self) -> None:
        """Releases the job; see the class documentation (may block). Idempotent."""
        h = getattr(self, "_h", None)
        if h is not None:
            h.close()
        self._keepalive = None
        self._context = None

    def __enter__(self) -> "Job":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        if self.closed:
            return "Job(closed)"
        return f"Job({self.info()})"


# ---------------------------------------------------------------------------
# Context

class Context:
    """A context (``cg_context``): configuration, storage tiers and worker
    threads. ``config`` is the JSON configuration as a dict (serialised with
    ``json.dumps``; ``pathlib.Path`` values become strings) or a string; see ``src/connector/config.rs``::

        {"namespace": {"model": "...", "kv_dtype": "f16", "tp_world_size": 1,
                       "tp_rank": 0, "block_size": 16},
         "chunk_tokens": 256, "level": "default", "profile": "path.json",
         "tables": {"default": "set.cgts"},
         "tiers": {"memory": {"bytes": N}, "disk": {"path": "...", "bytes": N},
                   "redis": {"url": "redis://host:6379", "timeout_ms": 500}},
         "io_threads": 4, "decode_threads": 0, "load_timeout_ms": 30000}

    Methods may be called from several threads at once, :meth:`close`
    included: it waits for the calls in progress (never a freed handle).
    """

    def __init__(self, config: Union[Dict[str, Any], str, bytes]):
        self._h: Optional[_Handle] = None
        if isinstance(config, dict):
            text = json.dumps(config, default=os.fspath).encode("utf-8")  # Path values become strings
        elif isinstance(config, str):
            text = config.encode("utf-8")
        elif isinstance(config, (bytes, bytearray)):
            text = bytes(config)
        else:
            raise TypeError(f"config must be a dict or a JSON string, not {type(config).__name__}")
        if b"\0" in text:
            raise CacheGenError(CG_ERR_CONFIG, "the configuration contains a NUL character")
        lib = _library()
        self._lib = lib
        out = c_void_p()
        _check(lib, lib.cg_context_new(text, byref(out)))
        self._h = _Handle(out.value, lib.cg_context_free, "context")

    def _use(self):
        if self._h is None:
            raise _invalid("the context is closed")
        return self._h.use()

    def lookup(self, tokens: Any, salt: Union[bytes, str] = b"", lease_ms: int = 0) -> Tuple[int, int]:
        """``(matched_tokens, lease_id)``: how many leading tokens can be loaded
        (a multiple of the chunk size). With ``lease_ms > 0`` the entries found
        are protected from eviction for that long, until :meth:`release_lease`
        or a load given the lease; ``lease_id`` is 0 when none was taken."""
        t = _u32_array(tokens, "tokens")
        s = _salt(salt)
        lease_ms = _int_in(lease_ms, 0, _U32_MAX, "lease_ms")
        matched, lease = c_uint64(0), c_uint64(0)
        with self._use() as h:
            _check(self._lib, self._lib.cg_lookup(
                h, _u32_ptr(t), t.size, s or None, len(s), lease_ms, byref(matched), byref(lease)))
        return int(matched.value), int(lease.value)

    def release_lease(self, lease_id: int) -> None:
        """Ends a lease early (an ended lease, or 0, is not an error)."""
        lease_id = _int_in(lease_id, 0, _U64_MAX, "lease_id")
        with self._use() as h:
            _check(self._lib, self._lib.cg_lease_release(h, lease_id))

    def store(self, layout: Layout, tokens: Any, block_ids: Any, salt: Union[bytes, str] = b"", stream: Any = None) -> Job:
        """Starts storing every full chunk of ``tokens`` not stored yet, reading
        token ``i`` from block ``block_ids[i // block_size]`` of ``layout``.
        The blocks must stay unchanged until the job is ``"reusable"``. For a
        layout in GPU memory, ``stream`` (a CUDA stream or its handle) orders
        the gather after the work already enqueued on it."""
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a cachegen.Layout, not {type(layout).__name__}")
        t = _u32_array(tokens, "tokens")
        b = _u32_array(block_ids, "block_ids")
        s = _salt(salt)
        out = c_void_p()
        with self._use() as h, layout._use() as lh:
            if stream is None:
                _check(self._lib, self._lib.cg_store(
                    h, lh, _u32_ptr(t), t.size, _u32_ptr(b), b.size, s or None, len(s), byref(out)))
            else:
                _check(self._lib, self._lib.cg_store_on_stream(
                    h, lh, _u32_ptr(t), t.size, _u32_ptr(b), b.size, s or None, len(s), _stream_handle(stream), byref(out)))
        return Job(self._lib, out.value, self, (layout, layout.keepalive))

    def load(
        self,
        layout: Layout,
        tokens: Any,
        block_ids: Any,
        first_token: int = 0,
        salt: Union[bytes, str] = b"",
        lease_id: int = 0,
        stream: Any = None,
    ) -> Job:
        """Starts loading the full chunks of ``tokens`` into ``block_ids`` of
        ``layout``, skipping the first ``first_token`` tokens (a multiple of the
        block size: those the engine already has). Blocks of chunks that cannot
        be loaded are reported by :meth:`Job.failed_blocks`. ``lease_id`` (from
        :meth:`lookup`) ends once every chunk has been fetched. The blocks must
        not be used until the job is done (a layer's: until
        :meth:`Job.wait_layer`). For a layout in GPU memory the decode runs on
        the GPU after the work already enqueued on ``stream`` (if given); use
        :meth:`Job.wait_layer_on_stream` to make the engine's stream wait."""
        if not isinstance(layout, Layout):
            raise TypeError(f"layout must be a cachegen.Layout, not {type(layout).__name__}")
        if not layout.writable:
            raise _invalid("the layout's memory is read-only: it can be stored from, not loaded into")
        t = _u32_array(tokens, "tokens")
        b = _u32_array(block_ids, "block_ids")
        s = _salt(salt)
        first_token = _int_in(first_token, 0, 2**63 - 1, "first_token")
        lease_id = _int_in(lease_id, 0, _U64_MAX, "lease_id")
        out = c_void_p()
        with self._use() as h, layout._use() as lh:
            if stream is None:
                _check(self._lib, self._lib.cg_load(
                    h, lh, _u32_ptr(t), t.size, _u32_ptr(b), b.size, first_token,
                    s or None, len(s), lease_id, byref(out)))
            else:
                _check(self._lib, self._lib.cg_load_on_stream(
                    h, lh, _u32_ptr(t), t.size, _u32_ptr(b), b.size, first_token,
                    s or None, len(s), lease_id, _stream_handle(stream), byref(out)))
        return Job(self._lib, out.value, self, (layout, layout.keepalive))

    def stats(self) -> Dict[str, Any]:
        """Statistics: namespace, counters, throughput, tiers, leases_active, queued."""
        with self._use() as h:
            return json.loads(_read_string(self._lib, self._lib.cg_stats_json, h))

    @property
    def closed(self) -> bool:
        return self._h is None or self._h.closed

    def close(self) -> None:
        """Releases the context, waiting for calls in progress on other
        threads and for the jobs already started (their Job objects stay
        valid). Idempotent."""
        if self._h is not None:
            self._h.close()

    def __enter__(self) -> "Context":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return "Context(closed)" if self.closed else f"Context(handle=0x{self._h.ptr:x})"

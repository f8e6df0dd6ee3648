"""Read/write KV caches in the project's interchange format (safetensors).

Tensors `layers.{i}.key` / `layers.{i}.value`, each [tokens, num_kv_heads, head_dim], dtype
F16, BF16 or F32, plus a string->string `__metadata__` map.  In memory a KV cache is a dict
name -> numpy array (`read_kv` always returns float32).
"""

import json
import re
import struct
from pathlib import Path

import numpy as np

DTYPES = {"f16": "F16", "bf16": "BF16", "f32": "F32"}
_NAME = re.compile(r"layers\.(\d+)\.(key|value)")


class KVFileError(Exception):
    pass


def kv_dict(layers):
    """[(K, V) per layer] -> {"layers.{i}.key": K, "layers.{i}.value": V}."""
    out = {}
    for i, (k, v) in enumerate(layers):
        out[f"layers.{i}.key"], out[f"layers.{i}.value"] = k, v
    return out


def kv_layers(kv):
    """{"layers.{i}.key": K, ...} -> [(K, V) per layer] as float32 (the model's past-KV format)."""
    n = len(kv) // 2
    return [(np.asarray(kv[f"layers.{i}.key"], np.float32), np.asarray(kv[f"layers.{i}.value"], np.float32))
            for i in range(n)]


def sorted_names(names):
    """Tensor names in layer order (key before value)."""
    return sorted(names, key=lambda n: (int(_NAME.fullmatch(n).group(1)), n))


def f32_to_bf16_bits(x):
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (inputs are finite)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_bits_to_f32(b):
    return (b.astype(np.uint32) << 16).view(np.float32)


def round_to(x, dtype):
    """x rounded to `dtype` ("f16"/"bf16"/"f32") and back to float32, as storing it would."""
    if dtype == "f16":
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)
    if dtype == "bf16":
        return bf16_bits_to_f32(f32_to_bf16_bits(x))
    return np.asarray(x, np.float32)


def write_kv(path, kv, dtype="f16", metadata=None):
    """Write a KV dict per the safetensors spec: u64 LE header length, JSON header, raw data.

    Written by hand rather than with safetensors.numpy.save_file because (1) numpy has no
    bfloat16 and (2) save_file orders the __metadata__ keys differently from run to run (a
    Rust HashMap), so regenerating a committed fixture would change its bytes.  Here metadata
    keys are sorted and tensors are in layer order: same input, same bytes."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}")
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = {k: str(metadata[k]) for k in sorted(metadata)}
    for n in sorted_names(kv):
        if dtype == "bf16":
            blob = f32_to_bf16_bits(kv[n]).astype("<u2").tobytes()
        else:
            blob = np.asarray(kv[n]).astype("<f2" if dtype == "f16" else "<f4").tobytes()
        header[n] = {"dtype": DTYPES[dtype], "shape": list(kv[n].shape),
                     "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)        # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)


def read_kv(path):
    """-> (kv dict of float32 arrays, metadata dict, dtype name).  Raises KVFileError on bad input.

    Parses the container directly, because safetensors.numpy cannot read BF16."""
    path = Path(path)
    if not path.is_file():
        raise KVFileError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        assert isinstance(header, dict)
    except (struct.error, ValueError, AssertionError):
        raise KVFileError(f"{path}: not a safetensors file") from None
    metadata = header.pop("__metadata__", None) or {}
    base, kv, dtypes = 8 + n, {}, set()
    for name, info in header.items():
        if not _NAME.fullmatch(name):
            raise KVFileError(f"{path}: unexpected tensor {name!r} (want layers.{{i}}.key/value)")
        dt = info.get("dtype")
        if dt not in DTYPES.values():
            raise KVFileError(f"{path}: tensor {name} has dtype {dt}; supported: F16, BF16, F32")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        if len(shape) != 3 or not 0 <= begin <= end <= len(data) - base \
                or end - begin != int(np.prod(shape)) * (4 if dt == "F32" else 2):
            raise KVFileError(f"{path}: tensor {name} has bad shape {list(shape)} or data offsets")
        raw = np.frombuffer(data, np.uint8, end - begin, base + begin)
        if dt == "F32":
            arr = raw.view("<f4").astype(np.float32)
        elif dt == "F16":
            arr = raw.view("<f2").astype(np.float32)
        else:
            arr = bf16_bits_to_f32(raw.view("<u2"))
        kv[name] = arr.reshape(shape)
        dtypes.add(dt)
    layers = {int(_NAME.fullmatch(k).group(1)) for k in kv}
    if not kv or layers != set(range(len(layers))) or len(kv) != 2 * len(layers):
        raise KVFileError(f"{path}: need layers.{{i}}.key and .value for every layer 0..L-1")
    name_of = {v: k for k, v in DTYPES.items()}
    return kv, metadata, "/".join(sorted(name_of[d] for d in dtypes))

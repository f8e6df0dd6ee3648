"""Tile a KV cache in the interchange format (safetensors, layers.{i}.key /
layers.{i}.value, [tokens, heads, head_dim]) to another model's shape, the
way the GPU benchmarks build their Llama-3-8B-shaped cache from the SmolLM2
fixture: layer, token, head and dim indices wrap around.

Used to calibrate a table set for the benchmark's shape from another text's
KV (`cachegen calibrate`), e.g.:
    python3 scripts/gpu/tile_kv.py --tokens 512 /tmp/calib-cifs-1024.safetensors /tmp/llama-calib.safetensors
    cachegen calibrate --level default -o /tmp/llama-default.cgts /tmp/llama-calib.safetensors
Needs numpy only.
"""

import argparse
import json
import struct
from pathlib import Path

import numpy as np


def read(path):
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        if h["dtype"] != "F16":
            raise SystemExit(f"{path}: {name} is {h['dtype']}; only F16 is tiled")
        a, b = h["data_offsets"]
        out[name] = np.frombuffer(data, dtype=np.float16, count=(b - a) // 2, offset=8 + n + a).reshape(h["shape"])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tokens", type=int, required=True)
    ap.add_argument("input")
    ap.add_argument("output")
    a = ap.parse_args()
    src = read(a.input)
    L = len([k for k in src if k.endswith(".key")])
    header, blobs, off = {}, [], 0
    for l in range(a.layers):
        for part in ("key", "value"):
            x = src[f"layers.{l % L}.{part}"]
            T, H, D = x.shape
            y = x[np.arange(a.tokens) % T][:, np.arange(a.heads) % H][:, :, np.arange(a.head_dim) % D]
            b = np.ascontiguousarray(y).tobytes()
            header[f"layers.{l}.{part}"] = {"dtype": "F16", "shape": [a.tokens, a.heads, a.head_dim], "data_offsets": [off, off + len(b)]}
            blobs.append(b)
            off += len(b)
    h = json.dumps(header).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(a.output, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


if __name__ == "__main__":
    main()

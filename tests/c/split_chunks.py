#!/usr/bin/env python3
"""Splits a KV fixture (interchange safetensors: layers.{i}.key/.value, each
[tokens, heads, head_dim]) into chunk files of CHUNK tokens, for the C ABI
tests: scripts/c_tests.sh then encodes and decodes each chunk with the CLI,
which gives the bytes a load through the C ABI must produce.

    split_chunks.py FIXTURE OUT_DIR [CHUNK_TOKENS]

Writes OUT_DIR/chunk_{c}.safetensors for every full chunk, and
OUT_DIR/tokens.u32: the fixture's token ids (metadata "context_tokens",
little-endian u32), which the tests use as the request's tokens.
Standard library only.
"""
import json
import os
import struct
import sys


def read_safetensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return header, data[8 + n :]


def write_safetensors(path, tensors, metadata=None):
    """tensors: list of (name, dtype, shape, bytes), written in this order."""
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # 8-byte aligned data, as the reference writer does
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for _, _, _, raw in tensors:
            f.write(raw)
    os.replace(tmp, path)


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    fixture, out_dir = sys.argv[1], sys.argv[2]
    chunk = int(sys.argv[3]) if len(sys.argv) == 4 else 64
    header, data = read_safetensors(fixture)
    meta = header.pop("__metadata__", {}) or {}
    layers = 0
    while f"layers.{layers}.key" in header:
        layers += 1
    if layers == 0:
        sys.exit(f"{fixture}: no layers.0.key tensor")
    info = header["layers.0.key"]
    tokens, heads, head_dim = info["shape"]
    if info["dtype"] != "F16":
        sys.exit(f"{fixture}: expected F16 tensors, got {info['dtype']}")
    row = heads * head_dim * 2  # bytes per token
    os.makedirs(out_dir, exist_ok=True)
    n_chunks = tokens // chunk
    for c in range(n_chunks):
        parts = []
        for layer in range(layers):
            for stream in ("key", "value"):
                name = f"layers.{layer}.{stream}"
                t = header[name]
                if t["shape"] != [tokens, heads, head_dim] or t["dtype"] != "F16":
                    sys.exit(f"{fixture}: {name} is {t['dtype']} {t['shape']}")
                begin, _ = t["data_offsets"]
                lo = begin + c * chunk * row
                parts.append((name, "F16", [chunk, heads, head_dim], data[lo : lo + chunk * row]))
        write_safetensors(os.path.join(out_dir, f"chunk_{c}.safetensors"), parts)
    ids = json.loads(meta["context_tokens"]) if "context_tokens" in meta else list(range(tokens))
    if len(ids) < tokens:
        sys.exit(f"{fixture}: {len(ids)} context_tokens for {tokens} tokens")
    with open(os.path.join(out_dir, "tokens.u32"), "wb") as f:
        f.write(struct.pack(f"<{tokens}I", *ids[:tokens]))
    print(f"{fixture}: {layers} layers x {tokens} tokens x {heads} heads x {head_dim} -> {n_chunks} chunks of {chunk} in {out_dir}")


if __name__ == "__main__":
    main()

//! Host memory standing in for an engine's paged KV cache, the real KV
//! fixture, and what loading it should produce (shared by connector tests).
#![allow(dead_code)]

use std::sync::Arc;

use cachegen::codec::{self, EncodeOptions, KvTensors, Level, TableSet};
use cachegen::layout::KvLayout;

pub const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/smollm2-kernel-doc-320.safetensors");
pub const CHUNK: usize = 64;
pub const BS: usize = 16;

pub fn fixture() -> KvTensors {
    cachegen::interchange::from_safetensors(&std::fs::read(FIXTURE).unwrap()).unwrap().kv
}

/// Host memory for an engine's paged cache: one buffer per layer (or one
/// pool), kept alive while its layout is in use.
pub struct Engine {
    pub bufs: Vec<Vec<u8>>,
    pub layout: Arc<KvLayout>,
}

impl Engine {
    /// vLLM flash-attn per-layer tensors, NHD or HND.
    pub fn vllm(kv: &KvTensors, num_blocks: usize, hnd: bool) -> Engine {
        let s = kv.shape;
        let per_layer = 2 * num_blocks * BS * s.heads * s.head_dim * kv.dtype.size();
        let mut bufs: Vec<Vec<u8>> = (0..s.layers).map(|_| vec![0u8; per_layer]).collect();
        let base = bufs.iter_mut().map(|b| b.as_mut_ptr() as usize).collect();
        let layout = KvLayout::vllm_flash_attn(base, num_blocks, BS, s.heads, s.head_dim, kv.dtype, hnd).unwrap();
        Engine { bufs, layout: Arc::new(layout) }
    }

    /// TensorRT-LLM's single pool `[blocks, layers, 2, heads, tokens, dim]`.
    pub fn trtllm(kv: &KvTensors, num_blocks: usize) -> Engine {
        let s = kv.shape;
        let bytes = num_blocks * s.layers * 2 * BS * s.heads * s.head_dim * kv.dtype.size();
        let mut bufs = vec![vec![0u8; bytes]];
        let layout = KvLayout::trtllm_pool(bufs[0].as_mut_ptr() as usize, s.layers, num_blocks, BS, s.heads, s.head_dim, kv.dtype, true).unwrap();
        Engine { bufs, layout: Arc::new(layout) }
    }

    /// Writes the first `tokens` tokens of `kv` into `blocks`.
    pub fn fill(&mut self, kv: &KvTensors, blocks: &[u32], tokens: usize) {
        let part = slice_tokens(kv, 0, tokens);
        unsafe { self.layout.scatter_raw(blocks, &part) }.unwrap();
    }

    pub fn read(&self, blocks: &[u32], tokens: usize) -> KvTensors {
        unsafe { self.layout.gather_raw(blocks, tokens) }.unwrap()
    }
}

/// Tokens `[start, end)` of every tensor.
pub fn slice_tokens(kv: &KvTensors, start: usize, end: usize) -> KvTensors {
    let tb = kv.shape.channels() * kv.dtype.size();
    let mut shape = kv.shape;
    shape.tokens = end - start;
    KvTensors { shape, dtype: kv.dtype, tensors: kv.tensors.iter().map(|t| t[start * tb..end * tb].to_vec()).collect() }
}

pub fn concat_tokens(parts: &[KvTensors]) -> KvTensors {
    let mut out = parts[0].clone();
    out.shape.tokens = parts.iter().map(|p| p.shape.tokens).sum();
    for (i, t) in out.tensors.iter_mut().enumerate() {
        t.clear();
        for p in parts {
            t.extend_from_slice(&p.tensors[i]);
        }
    }
    out
}

/// What loading should produce: each chunk encoded at `level` and decoded.
pub fn expected(kv: &KvTensors, chunks: usize, level: Level) -> KvTensors {
    let parts: Vec<KvTensors> = (0..chunks)
        .map(|c| {
            let part = slice_tokens(kv, c * CHUNK, (c + 1) * CHUNK);
            codec::decode(&codec::encode(&part, &EncodeOptions::level(level)).unwrap(), None).unwrap()
        })
        .collect();
    concat_tokens(&parts)
}

/// Deterministic token ids (a different prompt per seed).
pub fn tokens(n: usize, seed: u32) -> Vec<u32> {
    (0..n as u32).map(|i| i.wrapping_mul(2654435761).wrapping_add(seed) % 49152).collect()
}

/// One table set per level, calibrated on the fixture's chunks 1..5 (the
/// model's, not the request's) and written to `dir/<level>.cgts`; returns the
/// sets and, per level, the config's `"tables"` entry (`"<level>": "<path>"`).
pub fn table_set_files(kv: &KvTensors, dir: &std::path::Path, levels: &[Level]) -> (Vec<TableSet>, Vec<String>) {
    let samples: Vec<KvTensors> = (1..5).map(|c| slice_tokens(kv, c * CHUNK, (c + 1) * CHUNK)).collect();
    let refs: Vec<&KvTensors> = samples.iter().collect();
    let mut sets = Vec::new();
    let mut entries = Vec::new();
    for &level in levels {
        let set = codec::calibrate_tables(&refs, &EncodeOptions::level(level)).unwrap();
        let path = dir.join(format!("{}.cgts", level.name()));
        std::fs::write(&path, set.to_bytes()).unwrap();
        entries.push(format!(r#""{}": "{}""#, level.name(), path.display()));
        sets.push(set);
    }
    (sets, entries)
}

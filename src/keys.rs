//! Chunk keys: deterministic token-chain hashes, the same in every process,
//! restart and engine (no seeded or per-process hashing anywhere).
//!
//! A key names one TP shard of one chunk of a token prefix:
//! - the **namespace** (model fingerprint, KV dtype, TP world size, block and
//!   chunk size, codec level) is hashed once; entries of another namespace
//!   can never be returned because every key depends on it;
//! - the **chain**: `h_0 = H(namespace, salt, tokens of chunk 0)` and
//!   `h_i = H(h_{i-1}, tokens of chunk i)`, so a key identifies the whole
//!   prefix up to its chunk, and a salt (LoRA id, cache salt) separates
//!   requests that must not share entries;
//! - the **shard key** adds the TP rank to the chain hash, so lookup can ask
//!   whether every rank's shard of a chunk is present.
//!
//! `H` is XXH3-128 (seed 0) over the little-endian encoding given below.

use xxhash_rust::xxh3::xxh3_128;

use crate::store::Key;

/// What makes cached KV interchangeable: two processes share entries only
/// when every field is equal.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Namespace {
    /// Model and weights fingerprint (e.g. name plus a hash of the weights).
    pub model: String,
    /// KV element type as the engine stores it (`f16`, `bf16`, ...).
    pub kv_dtype: String,
    pub tp_world_size: u32,
    /// Tokens per engine block and per stored chunk.
    pub block_size: u32,
    pub chunk_tokens: u32,
    /// Codec level the chunks are stored at.
    pub level: u8,
    /// Id of the model-level table set the chunks reference, if any.
    pub tables: Option<u64>,
}

impl Namespace {
    /// `H("cachegen-ns-v1" || len-prefixed fields)`: lengths make the
    /// encoding unambiguous (`"ab","c"` differs from `"a","bc"`).
    pub fn id(&self) -> [u8; 16] {
        let mut b = Vec::with_capacity(64 + self.model.len() + self.kv_dtype.len());
        b.extend_from_slice(b"cachegen-ns-v1");
        for s in [&self.model, &self.kv_dtype] {
            b.extend_from_slice(&(s.len() as u32).to_le_bytes());
            b.extend_from_slice(s.as_bytes());
        }
        for v in [self.tp_world_size, self.block_size, self.chunk_tokens] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.push(self.level);
        // Appended only when set, so namespaces without a set keep their ids.
        if let Some(id) = self.tables {
            b.extend_from_slice(b"tables");
            b.extend_from_slice(&id.to_le_bytes());
        }
        xxh3_128(&b).to_le_bytes()
    }
}

/// Chain hashes of every full chunk of `tokens` (a partial last chunk has
/// none: only whole chunks are stored and found).
pub fn chunk_chain(ns: &Namespace, salt: &[u8], tokens: &[u32]) -> Vec<[u8; 16]> {
    let chunk = ns.chunk_tokens.max(1) as usize;
    let mut out = Vec::with_capacity(tokens.len() / chunk);
    let mut prev: Option<[u8; 16]> = None;
    let mut b = Vec::with_capacity(64 + salt.len() + 4 * chunk);
    for toks in tokens.chunks_exact(chunk) {
        b.clear();
        match prev {
            None => {
                b.extend_from_slice(b"cachegen-chunk0-v1");
                b.extend_from_slice(&ns.id());
                b.extend_from_slice(&(salt.len() as u32).to_le_bytes());
                b.extend_from_slice(salt);
            }
            Some(p) => {
                b.extend_from_slice(b"cachegen-chunk-v1");
                b.extend_from_slice(&p);
            }
        }
        for t in toks {
            b.extend_from_slice(&t.to_le_bytes());
        }
        let h = xxh3_128(&b).to_le_bytes();
        out.push(h);
        prev = Some(h);
    }
    out
}

/// Storage key of rank `rank`'s shard of the chunk with chain hash `chain`.
pub fn shard_key(chain: &[u8; 16], rank: u32) -> Key {
    let mut b = [0u8; 16 + 4 + 15];
    b[..15].copy_from_slice(b"cachegen-shard-");
    b[15..31].copy_from_slice(chain);
    b[31..35].copy_from_slice(&rank.to_le_bytes());
    xxh3_128(&b).to_le_bytes()
}

//! libcachegen: CacheGen-style KV-cache compression for LLM serving.
//!
//! Layers, with dependencies pointing one way:
//! - [`codec`]: pure functions from KV tensors to bytes and back.
//! - [`layout`]: an engine's paged KV memory as data (base addresses and
//!   byte strides), and gather/scatter between pages and codec chunks.
//! - [`store`]: storage tiers for compressed chunks (memory, disk).
//! - [`keys`]: deterministic token-chain chunk keys with namespace, salt and TP rank.
//! - [`interchange`]: the safetensors interchange format for KV caches.
//! - [`profile`]: a model's calibrated per-(layer, K/V) step multipliers.

pub mod codec;
pub mod gpu;
pub mod interchange;
pub mod keys;
pub mod layout;
pub mod profile;
pub mod store;

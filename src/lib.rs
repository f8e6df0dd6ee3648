//! libcachegen: CacheGen-style KV-cache compression for LLM serving.
//!
//! Layers, with dependencies pointing one way:
//! - [`codec`]: pure functions from KV tensors to bytes and back.
//! - [`interchange`]: the safetensors interchange format for KV caches.
//! - [`profile`]: a model's calibrated per-(layer, K/V) step multipliers.

pub mod codec;
pub mod interchange;
pub mod profile;

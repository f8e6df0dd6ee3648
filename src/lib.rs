//! libcachegen: CacheGen-style KV-cache compression for LLM serving.
//!
//! Layers, with dependencies pointing one way:
//! - [`codec`]: pure functions from KV tensors to bytes and back.
//! - [`interchange`]: the safetensors interchange format for KV caches.

pub mod codec;
pub mod interchange;

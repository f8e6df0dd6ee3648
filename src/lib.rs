//! libcachegen: CacheGen-style KV-cache compression for LLM serving.
//!
//! Layers, with dependencies pointing one way:
//! - [`codec`]: pure functions from KV tensors to bytes and back.
//! - [`layout`]: an engine's paged KV memory as data (base addresses and
//!   byte strides), and gather/scatter between pages and codec chunks.
//! - [`store`]: storage tiers for compressed chunks (memory, disk, Redis).
//! - [`pipeline`]: the background threads and jobs (fetch → verify → decode
//!   → scatter for loads; gather → encode → write for stores).
//! - [`connector`]: the engine-facing context (config, namespace, tiers,
//!   store / lookup / load, leases, statistics).
//! - [`ffi`]: the C ABI over the connector (`include/cachegen.h`).
//! - [`gpu`]: device memory, CUDA kernels and streams.
//! - [`keys`]: deterministic token-chain chunk keys with namespace, salt and TP rank.
//! - [`interchange`]: the safetensors interchange format for KV caches.
//! - [`profile`]: a model's calibrated per-(layer, K/V) step multipliers.

pub mod codec;
pub mod connector;
pub mod ffi;
pub mod gpu;
pub mod interchange;
pub mod keys;
pub mod layout;
pub mod pipeline;
pub mod profile;
pub mod store;
pub mod streaming;

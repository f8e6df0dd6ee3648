//! The CacheGen KV codec: pure functions from KV tensors to bytes and back.
//! No I/O, no threads, no globals. The container is specified byte by byte
//! in `docs/FORMAT.md`; `format` is the only code that knows byte offsets.
//!
//! Encoding a chunk: convert each (K/V, layer) tensor to an f32 plane
//! `[tokens, channels]` (`channels = heads * head_dim`), quantize it with the
//! level's bins and scale grouping (`quant`), model each channel's symbols
//! with a frequency table (`table`), and rANS-code them in segments of 32
//! lanes (`rans`). The lossless level codes the raw bits as byte planes.

pub mod decode;
pub mod encode;
pub mod format;
pub mod fp8;
pub mod levels;
pub mod quant;
pub mod rans;
pub mod table;

pub use decode::{decode, decode_with_limits, Container, DecodeLimits};
pub use encode::{calibrate_tables, encode, EncodeOptions, TableSet, Tables};
pub use levels::Level;

/// Element type of KV tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F16,
    Bf16,
    F32,
    /// FP8 E4M3 (`fp8::`), e.g. vLLM's `--kv-cache-dtype fp8`, coded in its
    /// stored units (the engine's per-layer scales are not applied).
    F8E4M3,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::F8E4M3 => 1,
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
        }
    }
    pub fn code(self) -> u8 {
        match self {
            Dtype::F16 => 1,
            Dtype::Bf16 => 2,
            Dtype::F32 => 3,
            Dtype::F8E4M3 => 4,
        }
    }
    pub fn from_code(c: u8) -> Option<Dtype> {
        match c {
            1 => Some(Dtype::F16),
            2 => Some(Dtype::Bf16),
            3 => Some(Dtype::F32),
            4 => Some(Dtype::F8E4M3),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Dtype::F16 => "f16",
            Dtype::Bf16 => "bf16",
            Dtype::F32 => "f32",
            Dtype::F8E4M3 => "f8e4m3",
        }
    }
}

/// Whether a layer holds separate keys and values, or one latent tensor
/// (MLA: one head of `kv_lora_rank + rope_dim`, no K/V split).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KvKind {
    KeyValue,
    Latent,
}

impl KvKind {
    pub fn streams(self) -> usize {
        match self {
            KvKind::KeyValue => 2,
            KvKind::Latent => 1,
        }
    }
}

/// Shape of one chunk of KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvShape {
    pub kind: KvKind,
    pub layers: usize,
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl KvShape {
    pub fn channels(&self) -> usize {
        self.heads * self.head_dim
    }
    /// Elements in one (stream, layer) tensor.
    pub fn plane_elems(&self) -> usize {
        self.tokens * self.channels()
    }
    /// Number of (stream, layer) tensors.
    pub fn tensors(&self) -> usize {
        self.layers * self.kind.streams()
    }
    /// All elements of the chunk.
    pub fn elems(&self) -> usize {
        self.tensors() * self.plane_elems()
    }
}

/// A chunk of KV cache on the host: for each layer and stream (key then
/// value, or the latent), a `[tokens, heads, head_dim]` tensor as raw
/// little-endian bytes of `dtype`. Tensor `i` is layer `i / streams`,
/// stream `i % streams`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvTensors {
    pub shape: KvShape,
    pub dtype: Dtype,
    pub tensors: Vec<Vec<u8>>,
}

impl KvTensors {
    /// Check that the buffers match the shape and dtype.
    pub fn validate(&self) -> Result<(), Error> {
        let s = &self.shape;
        if s.layers == 0 || s.tokens == 0 || s.heads == 0 || s.head_dim == 0 {
            return Err(Error::Shape("layers, tokens, heads and head_dim must all be non-zero".into()));
        }
        if s.layers > u16::MAX as usize || s.heads > u16::MAX as usize || s.head_dim > u16::MAX as usize {
            return Err(Error::Shape("layers, heads and head_dim must each fit 16 bits".into()));
        }
        if s.tokens > u32::MAX as usize {
            return Err(Error::Shape("tokens must fit 32 bits".into()));
        }
        if s.kind == KvKind::Latent && s.heads != 1 {
            return Err(Error::Shape("a latent (MLA) cache has exactly one head".into()));
        }
        if self.tensors.len() != s.tensors() {
            return Err(Error::Shape(format!("expected {} tensors, got {}", s.tensors(), self.tensors.len())));
        }
        let want = s.plane_elems() * self.dtype.size();
        for (i, t) in self.tensors.iter().enumerate() {
            if t.len() != want {
                return Err(Error::Shape(format!("tensor {i} has {} bytes, expected {want}", t.len())));
            }
        }
        Ok(())
    }

    /// Tensor `i` as f32 values.
    pub fn tensor_f32(&self, i: usize) -> Vec<f32> {
        quant::to_f32(self.dtype, &self.tensors[i])
    }
}

/// Everything that can go wrong in the codec. Bad input is an error, never
/// a panic.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid shape: {0}")]
    Shape(String),
    #[error("input contains NaN or infinity (only the lossless level can store them)")]
    NonFinite,
    #[error("not a cachegen stream (bad magic)")]
    BadMagic,
    #[error("unsupported format version {0}")]
    Version(u16),
    #[error("corrupt stream: {0}")]
    Corrupt(&'static str),
    #[error("checksum mismatch: stream is corrupt")]
    Checksum,
    #[error("decoded size {0} bytes exceeds the limit of {1} bytes")]
    TooLarge(u64, u64),
    #[error("stream references table set {0:016x}, which was not provided")]
    MissingTables(u64),
    #[error("table set {got:016x} does not match the stream's {want:016x}")]
    WrongTables { got: u64, want: u64 },
    #[error("{0}")]
    Invalid(String),
}

//! Paged KV block geometry, as data, and gather/scatter between an engine's
//! paged blocks and the codec's canonical chunk ([`KvTensors`]).
//!
//! An engine keeps its KV cache in fixed-size blocks of `block_size` tokens;
//! a request's tokens live in a list of block ids (vLLM: token `i` is in block
//! `block_ids[i / block_size]`, slot `i % block_size`). Engines differ only in
//! where a block, the K/V half, a token and a head sit in memory, so a
//! [`KvLayout`] records that as a base address per layer plus byte strides.
//! Element (layer `l`, stream `s`, block `b`, token-in-block `t`, head `h`,
//! dim `d`) lives at
//!
//! ```text
//! layer_base[l] + l*stride_layer + b*stride_block + s*stride_kv
//!               + t*stride_token + h*stride_head + d*dtype.size()
//! ```
//!
//! (`head_dim` is always contiguous). Stream 0 is the key (or the MLA latent),
//! stream 1 the value. The constructors ([`KvLayout::vllm_flash_attn`],
//! [`KvLayout::flashinfer`], [`KvLayout::vllm_cross_layer`],
//! [`KvLayout::trtllm_pool`], [`KvLayout::mla`]) derive the strides from the
//! engines' tensor shapes; anything else can be written as a struct literal
//! from the engine tensor's `data_ptr()` and `stride()` and then checked with
//! [`KvLayout::validate`].
//!
//! [`KvLayout::gather`] and [`KvLayout::scatter`] copy between blocks and a
//! canonical chunk: per layer and stream a `[tokens, heads, head_dim]` tensor.
//! Because every layout normalises to the same chunk, a chunk gathered from
//! one engine's layout scatters into another's.
//!
//! The safe operations take the engine memory as a byte slice (the *arena*):
//! the layout's addresses (`layer_base[l]` plus offsets) are then byte
//! offsets into it, every access is bounds-checked before anything is copied,
//! and a bad request is an error, never a panic or a partial write. The
//! `unsafe` variants [`KvLayout::gather_raw`] and [`KvLayout::scatter_raw`]
//! take the addresses as real host pointers (pinned staging buffers, CPU
//! engines). Device memory is not touched here: GPU copies use the same
//! geometry in CUDA kernels.
//!
//! FP8 E4M3 caches ([`Dtype::F8E4M3`], vLLM `--kv-cache-dtype fp8`) are
//! 1-byte elements, copied in their stored units: the engine's per-layer
//! scales are not applied (`codec::fp8`). Not covered: fp8 E5M2 and vLLM's
//! `fp8_ds_mla` (fp32 scales stored inside each token's 656 bytes).

use crate::codec::{Dtype, KvKind, KvShape, KvTensors};

/// Everything that can go wrong describing a layout or copying through it.
/// Every error is detected before any byte is written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A dimension is zero, `layer_base` has the wrong length, a latent
    /// layout has more than one head, or an address computation overflows.
    #[error("invalid layout: {0}")]
    Invalid(String),
    /// Two distinct elements of one layer could share bytes (or two layers
    /// start at the same address).
    #[error("layout elements may overlap: {0}")]
    Aliasing(String),
    /// A layer's bytes do not lie within the memory region.
    #[error("layer {layer} occupies bytes {start}..{end}, outside the memory region of {len} bytes")]
    OutOfBounds { layer: usize, start: i128, end: i128, len: usize },
    /// A block id is not below `num_blocks`.
    #[error("block id {id} is out of range (the layout has {num_blocks} blocks)")]
    BlockOutOfRange { id: u32, num_blocks: usize },
    /// `scatter` was given the same block twice among the blocks it writes.
    #[error("block id {0} appears twice")]
    DuplicateBlock(u32),
    /// More tokens than the given blocks hold, or zero tokens.
    #[error("{tokens} tokens do not fit in {blocks} blocks of {block_size} tokens (or are zero)")]
    Tokens { tokens: usize, blocks: usize, block_size: usize },
    /// The chunk's dtype or shape does not match the layout, or the chunk is
    /// malformed.
    #[error("chunk does not match the layout: {0}")]
    Mismatch(String),
}

/// Which address space a layout's `layer_base` entries are in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Memory {
    /// Host pointers (or arena offsets for the safe operations).
    #[default]
    Host,
    /// Device addresses on CUDA device `device`: only the GPU path
    /// (`crate::gpu`) touches them; the host operations here refuse.
    Cuda { device: usize },
}

/// An engine's paged KV memory, described once: geometry plus byte strides.
/// See the module documentation for the address formula.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Where `layer_base` points: host memory unless set otherwise.
    pub memory: Memory,
    /// `KeyValue` (two streams, K then V) or `Latent` (MLA: one stream, one head).
    pub kind: KvKind,
    pub dtype: Dtype,
    pub layers: usize,
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Base address of each layer's tensor (a byte offset into the arena for
    /// the safe operations). For a pool shared by all layers every entry is
    /// the pool's base and `stride_layer` is non-zero.
    pub layer_base: Vec<usize>,
    pub stride_block: isize,
    /// Between key and value (ignored for `Latent`).
    pub stride_kv: isize,
    pub stride_token: isize,
    /// Between heads (ignored when `heads == 1`).
    pub stride_head: isize,
    /// Added once per layer index; 0 when each layer has its own tensor.
    pub stride_layer: isize,
}

/// Byte strides of a tensor stored contiguously (row-major) with `shape`
/// and elements of `es` bytes; `None` on overflow.
fn contiguous_strides<const N: usize>(shape: [usize; N], es: usize) -> Option<[isize; N]> {
    let mut out = [0isize; N];
    let mut acc = es;
    for i in (0..N).rev() {
        out[i] = isize::try_from(acc).ok()?;
        acc = acc.checked_mul(shape[i])?;
    }
    isize::try_from(acc).ok()?;
    Some(out)
}

fn overflow() -> LayoutError {
    LayoutError::Invalid("layout size overflows the address space".into())
}

impl KvLayout {
    /// vLLM FlashAttention backend, one tensor per layer at `base[l]`, logical
    /// shape `(2, num_blocks, block_size, num_kv_heads, head_size)`
    /// (`FlashAttentionBackend.get_kv_cache_shape`). With `hnd` the stride order
    /// is `(0, 1, 3, 2, 4)`: physically `(2, num_blocks, num_kv_heads,
    /// block_size, head_size)`. `layers = base.len()`.
    pub fn vllm_flash_attn(
        base: Vec<usize>,
        num_blocks: usize,
        block_size: usize,
        heads: usize,
        head_dim: usize,
        dtype: Dtype,
        hnd: bool,
    ) -> Result<KvLayout, LayoutError> {
        let es = dtype.size();
        let (kv, block, token, head) = if hnd {
            let [kv, b, h, t, _] = contiguous_strides([2, num_blocks, heads, block_size, head_dim], es).ok_or_else(overflow)?;
            (kv, b, t, h)
        } else {
            let [kv, b, t, h, _] = contiguous_strides([2, num_blocks, block_size, heads, head_dim], es).ok_or_else(overflow)?;
            (kv, b, t, h)
        };
        Self::per_layer(KvKind::KeyValue, base, num_blocks, block_size, heads, head_dim, dtype, [block, kv, token, head])
    }

    /// FlashInfer (and vLLM's Triton backend), one tensor per layer at
    /// `base[l]`: `(num_blocks, 2, block_size, num_kv_heads, head_size)`; with
    /// `hnd` physically `(num_blocks, 2, num_kv_heads, block_size, head_size)`.
    /// `layers = base.len()`.
    pub fn flashinfer(
        base: Vec<usize>,
        num_blocks: usize,
        block_size: usize,
        heads: usize,
        head_dim: usize,
        dtype: Dtype,
        hnd: bool,
    ) -> Result<KvLayout, LayoutError> {
        let es = dtype.size();
        let (kv, block, token, head) = if hnd {
            let [b, kv, h, t, _] = contiguous_strides([num_blocks, 2, heads, block_size, head_dim], es).ok_or_else(overflow)?;
            (kv, b, t, h)
        } else {
            let [b, kv, t, h, _] = contiguous_strides([num_blocks, 2, block_size, heads, head_dim], es).ok_or_else(overflow)?;
            (kv, b, t, h)
        };
        Self::per_layer(KvKind::KeyValue, base, num_blocks, block_size, heads, head_dim, dtype, [block, kv, token, head])
    }

    /// vLLM cross-layer KV cache (`register_cross_layers_kv_cache`): one
    /// tensor at `base` for all layers, block-major. NHD: physically
    /// `(num_blocks, num_layers, 2, block_size, num_kv_heads, head_size)`;
    /// `hnd`: `(num_blocks, num_kv_heads, num_layers, 2, block_size, head_size)`.
    #[allow(clippy::too_many_arguments)]
    pub fn vllm_cross_layer(
        base: usize,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        heads: usize,
        head_dim: usize,
        dtype: Dtype,
        hnd: bool,
    ) -> Result<KvLayout, LayoutError> {
        let es = dtype.size();
        let (block, layer, kv, token, head) = if hnd {
            let [b, h, l, kv, t, _] =
                contiguous_strides([num_blocks, heads, layers, 2, block_size, head_dim], es).ok_or_else(overflow)?;
            (b, l, kv, t, h)
        } else {
            let [b, l, kv, t, h, _] =
                contiguous_strides([num_blocks, layers, 2, block_size, heads, head_dim], es).ok_or_else(overflow)?;
            (b, l, kv, t, h)
        };
        Self::pooled(KvKind::KeyValue, base, layers, num_blocks, block_size, heads, head_dim, dtype, [block, kv, token, head, layer])
    }

    /// TensorRT-LLM primary KV pool at `base` (`WindowBlockManager::allocatePools`,
    /// one pool for all layers of a window size): NHD
    /// `[num_blocks, num_layers, 2 (kv_factor), tokens_per_block, num_kv_heads, head_dim]`.
    /// TRT-LLM's in-block order is configurable (`kv_layout="NHD"|"HND"`, and
    /// its native attention kernel is reported to be head-major); `hnd` gives
    /// `[num_blocks, num_layers, 2, num_kv_heads, tokens_per_block, head_dim]`.
    /// Other orders are a struct literal away. MLA pools (`kv_factor` 1) are
    /// [`KvKind::Latent`] with `heads = 1` and `stride_kv` unused.
    #[allow(clippy::too_many_arguments)]
    pub fn trtllm_pool(
        base: usize,
        layers: usize,
        num_blocks: usize,
        tokens_per_block: usize,
        heads: usize,
        head_dim: usize,
        dtype: Dtype,
        hnd: bool,
    ) -> Result<KvLayout, LayoutError> {
        let es = dtype.size();
        let (block, layer, kv, token, head) = if hnd {
            let [b, l, kv, h, t, _] =
                contiguous_strides([num_blocks, layers, 2, heads, tokens_per_block, head_dim], es).ok_or_else(overflow)?;
            (b, l, kv, t, h)
        } else {
            let [b, l, kv, t, h, _] =
                contiguous_strides([num_blocks, layers, 2, tokens_per_block, heads, head_dim], es).ok_or_else(overflow)?;
            (b, l, kv, t, h)
        };
        Self::pooled(KvKind::KeyValue, base, layers, num_blocks, tokens_per_block, heads, head_dim, dtype, [block, kv, token, head, layer])
    }

    /// vLLM MLA backends (DeepSeek V2/V3, Kimi: Triton-MLA, FlashMLA), one
    /// tensor per layer at `base[l]`: `(num_blocks, block_size, head_size)`
    /// with `head_size = width = kv_lora_rank + rope_dim` (576 for DeepSeek);
    /// [`KvKind::Latent`], one head, no K/V split. `layers = base.len()`.
    pub fn mla(base: Vec<usize>, num_blocks: usize, block_size: usize, width: usize, dtype: Dtype) -> Result<KvLayout, LayoutError> {
        let [b, t, _] = contiguous_strides([num_blocks, block_size, width], dtype.size()).ok_or_else(overflow)?;
        Self::per_layer(KvKind::Latent, base, num_blocks, block_size, 1, width, dtype, [b, 0, t, t])
    }

    #[allow(clippy::too_many_arguments)]
    fn per_layer(
        kind: KvKind,
        base: Vec<usize>,
        num_blocks: usize,
        block_size: usize,
        heads: usize,
        head_dim: usize,
        dtype: Dtype,
        [stride_block, stride_kv, stride_token, stride_head]: [isize; 4],
    ) -> Result<KvLayout, LayoutError> {
        let l = KvLayout {
            memory: Memory::Host,
            kind,
            dtype,
            layers: base.len(),
            num_blocks,
            block_size,
            heads,
            head_dim,
            layer_base: base,
            stride_block,
            stride_kv,
            stride_token,
            stride_head,
            stride_layer: 0,
        };
        l.validate()?;
        Ok(l)
    }

    #[allow(clippy::too_many_arguments)]
    fn pooled(
        kind: KvKind,
        base: usize,
        layers: usize,
        num_blocks: usize,
        block_size: usize,
        heads: usize,
        head_dim: usize,
        dtype: Dtype,
        [stride_block, stride_kv, stride_token, stride_head, stride_layer]: [isize; 5],
    ) -> Result<KvLayout, LayoutError> {
        let l = KvLayout {
            memory: Memory::Host,
            kind,
            dtype,
            layers,
            num_blocks,
            block_size,
            heads,
            head_dim,
            layer_base: vec![base; layers],
            stride_block,
            stride_kv,
            stride_token,
            stride_head,
            stride_layer,
        };
        l.validate()?;
        Ok(l)
    }

    /// The raw host operations must never dereference device addresses.
    fn check_host(&self) -> Result<(), LayoutError> {
        match self.memory {
            Memory::Host => Ok(()),
            Memory::Cuda { device } => Err(LayoutError::Invalid(format!("the layout is in the memory of CUDA device {device}; host copies cannot reach it"))),
        }
    }

    /// Streams per layer: 2 (K, V) or 1 (latent).
    pub fn streams(&self) -> usize {
        self.kind.streams()
    }

    /// Tokens that `blocks` blocks hold.
    pub fn capacity(&self, blocks: usize) -> usize {
        blocks.saturating_mul(self.block_size)
    }

    /// The shape of a chunk of `tokens` tokens in this layout.
    pub fn chunk_shape(&self, tokens: usize) -> KvShape {
        KvShape { kind: self.kind, layers: self.layers, tokens, heads: self.heads, head_dim: self.head_dim }
    }

    /// The dimensions of one layer that matter (extent > 1) as
    /// `(name, extent, stride)`, innermost (`head_dim`) first.
    fn layer_dims(&self) -> Vec<(&'static str, usize, isize)> {
        let es = self.dtype.size() as isize;
        let all = [
            ("head_dim", self.head_dim, es),
            ("heads", self.heads, self.stride_head),
            ("block_size", self.block_size, self.stride_token),
            ("kv", self.streams(), self.stride_kv),
            ("num_blocks", self.num_blocks, self.stride_block),
        ];
        all.into_iter().filter(|d| d.1 > 1).collect()
    }

    /// Lowest and one-past-highest byte offset of one layer, relative to its
    /// effective base (`layer_base[l] + l * stride_layer`).
    fn layer_extent(&self) -> Option<(i128, i128)> {
        let (mut lo, mut hi) = (0i128, 0i128);
        for (_, n, s) in self.layer_dims() {
            let reach = (n as i128 - 1).checked_mul(s as i128)?;
            if reach < 0 {
                lo += reach;
            } else {
                hi += reach;
            }
        }
        Some((lo, hi + self.dtype.size() as i128))
    }

    /// Effective base of layer `l`: `layer_base[l] + l * stride_layer`.
    fn effective_base(&self, l: usize) -> i128 {
        self.layer_base[l] as i128 + l as i128 * self.stride_layer as i128
    }

    /// Check that the layout is usable. Checked:
    /// - `layers`, `num_blocks`, `block_size`, `heads`, `head_dim` are non-zero
    ///   and `layer_base.len() == layers`; a `Latent` layout has one head;
    /// - no two distinct elements of one layer share a byte. This is checked
    ///   conservatively (sufficient, not necessary): the dimensions with
    ///   extent > 1 (head_dim with stride `dtype.size()`, heads, tokens, K/V,
    ///   blocks) are sorted by |stride|, and each |stride| must be at least the
    ///   span of all smaller ones (`|stride_i| * (n_i - 1) + span_{i-1}`, from
    ///   one element's bytes). Negative strides are allowed (this rule treats
    ///   them like their absolute values, which is exact for aliasing). Layouts
    ///   with interleaved dimensions that happen not to collide are rejected;
    /// - for a pool shared by layers (`stride_layer != 0` and all `layer_base`
    ///   equal) the layer index is one more dimension in that check; in every
    ///   case no two layers may start at the same effective address. Other
    ///   overlaps between layers are *not* checked (vLLM hybrid models share
    ///   raw tensors between layers of different KV-cache groups);
    /// - every layer's bytes lie in `0..=isize::MAX` (no address arithmetic
    ///   overflows). Whether they lie in a given memory region is checked by
    ///   each operation.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if self.layers == 0 || self.num_blocks == 0 || self.block_size == 0 || self.heads == 0 || self.head_dim == 0 {
            return Err(LayoutError::Invalid(format!(
                "layers ({}), num_blocks ({}), block_size ({}), heads ({}) and head_dim ({}) must all be non-zero",
                self.layers, self.num_blocks, self.block_size, self.heads, self.head_dim
            )));
        }
        if self.layer_base.len() != self.layers {
            return Err(LayoutError::Invalid(format!(
                "layer_base has {} entries for {} layers",
                self.layer_base.len(),
                self.layers
            )));
        }
        if self.kind == KvKind::Latent && self.heads != 1 {
            return Err(LayoutError::Invalid(format!("a latent (MLA) layout has one head, not {}", self.heads)));
        }
        // Aliasing within a layer (and across layers of a shared pool).
        let mut dims = self.layer_dims();
        let pool = self.stride_layer != 0 && self.layer_base.iter().all(|&b| b == self.layer_base[0]);
        if pool && self.layers > 1 {
            dims.push(("layers", self.layers, self.stride_layer));
        }
        dims.sort_by_key(|d| d.2.unsigned_abs());
        let mut span: u128 = self.dtype.size() as u128; // bytes covered by the dims checked so far
        for (name, n, s) in dims {
            let s = s.unsigned_abs() as u128;
            if s < span {
                return Err(LayoutError::Aliasing(format!(
                    "stride of {name} ({s} bytes) is smaller than the {span} bytes spanned by the smaller dimensions"
                )));
            }
            span += s * (n as u128 - 1);
        }
        // Address range of every layer, and distinct layer starts.
        let (lo, hi) = self.layer_extent().ok_or_else(overflow)?;
        let mut starts = Vec::with_capacity(self.layers);
        for l in 0..self.layers {
            let eb = self.effective_base(l);
            if eb + lo < 0 || eb + hi > isize::MAX as i128 {
                return Err(LayoutError::Invalid(format!(
                    "layer {l} occupies addresses {}..{}, outside 0..=isize::MAX",
                    eb + lo,
                    eb + hi
                )));
            }
            starts.push(eb);
        }
        starts.sort_unstable();
        if starts.windows(2).any(|w| w[0] == w[1]) {
            return Err(LayoutError::Aliasing("two layers start at the same address".into()));
        }
        Ok(())
    }

    /// Bytes from the lowest to the highest byte of one layer (all blocks,
    /// streams, tokens and heads), inclusive. For a per-layer tensor stored
    /// densely this is the tensor's size; for a shared pool it is the part of
    /// the pool one layer stretches over. 0 if it overflows.
    pub fn span_bytes_per_layer(&self) -> usize {
        match self.layer_extent() {
            Some((lo, hi)) => usize::try_from(hi - lo).unwrap_or(0),
            None => 0,
        }
    }

    /// Check that every layer lies within `0..len`.
    fn check_region(&self, len: usize) -> Result<(), LayoutError> {
        let (lo, hi) = self.layer_extent().ok_or_else(overflow)?;
        for l in 0..self.layers {
            let eb = self.effective_base(l);
            let (start, end) = (eb + lo, eb + hi);
            if start < 0 || end > len as i128 {
                return Err(LayoutError::OutOfBounds { layer: l, start, end, len });
            }
        }
        Ok(())
    }

    /// Checks shared by every operation, before any copy: a valid layout,
    /// block ids in range, `0 < tokens <= capacity`. Returns the number of
    /// blocks the tokens use.
    fn check_request(&self, block_ids: &[u32], tokens: usize, unique: bool) -> Result<usize, LayoutError> {
        self.validate()?;
        if tokens == 0 || tokens > self.capacity(block_ids.len()) {
            return Err(LayoutError::Tokens { tokens, blocks: block_ids.len(), block_size: self.block_size });
        }
        if let Some(&id) = block_ids.iter().find(|&&id| id as usize >= self.num_blocks) {
            return Err(LayoutError::BlockOutOfRange { id, num_blocks: self.num_blocks });
        }
        let used = tokens.div_ceil(self.block_size);
        if unique {
            let mut ids = block_ids[..used].to_vec();
            ids.sort_unstable();
            if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
                return Err(LayoutError::DuplicateBlock(w[0]));
            }
        }
        Ok(used)
    }

    /// Check a chunk against the layout's dtype and shape.
    fn check_chunk(&self, chunk: &KvTensors) -> Result<(), LayoutError> {
        chunk.validate().map_err(|e| LayoutError::Mismatch(e.to_string()))?;
        if chunk.dtype != self.dtype {
            return Err(LayoutError::Mismatch(format!("chunk dtype {} != layout dtype {}", chunk.dtype.name(), self.dtype.name())));
        }
        let want = self.chunk_shape(chunk.shape.tokens);
        if chunk.shape != want {
            return Err(LayoutError::Mismatch(format!("chunk shape {:?} != layout shape {:?}", chunk.shape, want)));
        }
        Ok(())
    }

    /// Call `f(tensor, chunk_offset, address, len)` for every contiguous run
    /// of the first `tokens` tokens of `block_ids` (already checked), where
    /// `tensor` is the chunk's tensor index (`layer * streams + stream`),
    /// `chunk_offset` a byte offset into it and `address` the run's address in
    /// the layout's address space. Runs are a head (`head_dim` elements), or a
    /// token's heads, or a block's tokens when those are contiguous.
    fn for_each_run(&self, block_ids: &[u32], tokens: usize, f: impl FnMut(usize, usize, usize, usize)) {
        self.for_each_run_in(0..self.layers, block_ids, tokens, f)
    }

    /// [`KvLayout::for_each_run`] restricted to the layers in `layers`.
    fn for_each_run_in(&self, layers: std::ops::Range<usize>, block_ids: &[u32], tokens: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
        let row = self.head_dim * self.dtype.size();
        let token_bytes = self.heads * row;
        let heads_contig = self.heads == 1 || self.stride_head == row as isize;
        let streams = self.streams();
        for l in layers {
            // validate() and the region check keep every address in 0..=isize::MAX.
            let layer_addr = self.effective_base(l) as isize;
            for s in 0..streams {
                let tensor = l * streams + s;
                let stream_addr = layer_addr + s as isize * self.stride_kv;
                for (bi, &b) in block_ids.iter().enumerate() {
                    let first = bi * self.block_size;
                    if first >= tokens {
                        break;
                    }
                    let ntok = (tokens - first).min(self.block_size);
                    let block_addr = stream_addr + b as isize * self.stride_block;
                    let chunk_off = first * token_bytes;
                    if heads_contig && (ntok == 1 || self.stride_token == token_bytes as isize) {
                        f(tensor, chunk_off, block_addr as usize, ntok * token_bytes);
                    } else if heads_contig {
                        for t in 0..ntok {
                            f(tensor, chunk_off + t * token_bytes, (block_addr + t as isize * self.stride_token) as usize, token_bytes);
                        }
                    } else {
                        for t in 0..ntok {
                            let tok_addr = block_addr + t as isize * self.stride_token;
                            for h in 0..self.heads {
                                f(tensor, chunk_off + t * token_bytes + h * row, (tok_addr + h as isize * self.stride_head) as usize, row);
                            }
                        }
                    }
                }
            }
        }
    }

    fn empty_chunk(&self, tokens: usize) -> KvTensors {
        let shape = self.chunk_shape(tokens);
        let bytes = shape.plane_elems() * self.dtype.size();
        KvTensors { shape, dtype: self.dtype, tensors: vec![vec![0u8; bytes]; shape.tensors()] }
    }

    /// Copy the first `tokens` tokens held in `block_ids` (in order: token `i`
    /// is slot `i % block_size` of block `block_ids[i / block_size]`) out of
    /// `arena` into a canonical chunk. The layout's addresses are byte offsets
    /// into `arena`. Errors: an invalid layout, a layer outside the arena
    /// (the whole layout must fit, not only the blocks read), a block id
    /// `>= num_blocks` (every id given is checked, used or not), `tokens == 0`
    /// or `tokens > block_ids.len() * block_size`.
    pub fn gather(&self, arena: &[u8], block_ids: &[u32], tokens: usize) -> Result<KvTensors, LayoutError> {
        self.check_request(block_ids, tokens, false)?;
        self.check_region(arena.len())?;
        let mut chunk = self.empty_chunk(tokens);
        self.for_each_run(block_ids, tokens, |ti, co, addr, len| {
            chunk.tensors[ti][co..co + len].copy_from_slice(&arena[addr..addr + len]);
        });
        Ok(chunk)
    }

    /// Copy `chunk` into the first `chunk.shape.tokens` token slots of
    /// `block_ids` in `arena` (the reverse of [`KvLayout::gather`]); bytes
    /// of the arena outside those slots are left as they are, including the
    /// unused slots of a last, partial block. Errors, all detected before
    /// any write: those of `gather`, a chunk whose dtype or shape (kind,
    /// layers, heads, head_dim) differs from the layout, and a block id used
    /// twice among the blocks written.
    pub fn scatter(&self, arena: &mut [u8], block_ids: &[u32], chunk: &KvTensors) -> Result<(), LayoutError> {
        self.check_chunk(chunk)?;
        self.check_request(block_ids, chunk.shape.tokens, true)?;
        self.check_region(arena.len())?;
        self.for_each_run(block_ids, chunk.shape.tokens, |ti, co, addr, len| {
            arena[addr..addr + len].copy_from_slice(&chunk.tensors[ti][co..co + len]);
        });
        Ok(())
    }

    /// [`KvLayout::gather`] from host memory at real addresses: `layer_base`
    /// entries are pointers (as `usize`).
    ///
    /// # Safety
    /// Every byte of every layer (the `span_bytes_per_layer()` bytes from each
    /// layer's lowest address) must be valid for reads for the duration of the
    /// call, and must not be written concurrently.
    pub unsafe fn gather_raw(&self, block_ids: &[u32], tokens: usize) -> Result<KvTensors, LayoutError> {
        self.check_host()?;
        self.check_request(block_ids, tokens, false)?;
        let mut chunk = self.empty_chunk(tokens);
        self.for_each_run(block_ids, tokens, |ti, co, addr, len| {
            let dst = &mut chunk.tensors[ti][co..co + len];
            // SAFETY: the caller guarantees [addr, addr + len) is readable; dst is
            // a fresh buffer of ours, so the two cannot overlap.
            unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, dst.as_mut_ptr(), len) };
        });
        Ok(chunk)
    }

    /// [`KvLayout::scatter`] into host memory at real addresses: `layer_base`
    /// entries are pointers (as `usize`).
    ///
    /// # Safety
    /// Every byte of every layer must be valid for writes for the duration of
    /// the call, not accessed by anything else meanwhile, and must not overlap
    /// `chunk`'s buffers.
    pub unsafe fn scatter_raw(&self, block_ids: &[u32], chunk: &KvTensors) -> Result<(), LayoutError> {
        self.check_host()?;
        self.check_chunk(chunk)?;
        self.check_request(block_ids, chunk.shape.tokens, true)?;
        self.for_each_run(block_ids, chunk.shape.tokens, |ti, co, addr, len| {
            let src = &chunk.tensors[ti][co..co + len];
            // SAFETY: the caller guarantees [addr, addr + len) is writable and
            // disjoint from the chunk.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr as *mut u8, len) };
        });
        Ok(())
    }

    /// Copy one layer of a chunk into host memory at real addresses: the
    /// layer's streams (key then value, or the latent), each a
    /// `[tokens, heads, head_dim]` tensor of the layout's dtype, go to the
    /// first `tokens` token slots of `block_ids`. This is how the load
    /// pipeline writes a chunk layer by layer (and can skip a chunk's first
    /// blocks by passing suffixes of the block list and of the tensors).
    /// Errors, all detected before any write: those of
    /// [`KvLayout::scatter_raw`], `layer >= layers`, and stream buffers of
    /// the wrong number or length.
    ///
    /// # Safety
    /// As for [`KvLayout::scatter_raw`], for the bytes of layer `layer`.
    pub unsafe fn scatter_layer_raw(&self, layer: usize, block_ids: &[u32], tokens: usize, streams: &[&[u8]]) -> Result<(), LayoutError> {
        self.check_host()?;
        self.check_request(block_ids, tokens, true)?;
        if layer >= self.layers {
            return Err(LayoutError::Mismatch(format!("layer {layer} of a {}-layer layout", self.layers)));
        }
        let want = tokens * self.heads * self.head_dim * self.dtype.size();
        if streams.len() != self.streams() || streams.iter().any(|s| s.len() != want) {
            return Err(LayoutError::Mismatch(format!(
                "expected {} stream buffers of {want} bytes, got {:?}",
                self.streams(),
                streams.iter().map(|s| s.len()).collect::<Vec<_>>()
            )));
        }
        let streams_per_layer = self.streams();
        self.for_each_run_in(layer..layer + 1, block_ids, tokens, |ti, co, addr, len| {
            let src = &streams[ti - layer * streams_per_layer][co..co + len];
            // SAFETY: the caller guarantees [addr, addr + len) is writable and
            // disjoint from the source buffers.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), addr as *mut u8, len) };
        });
        Ok(())
    }
}

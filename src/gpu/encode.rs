//! The GPU encoder: an engine's paged KV blocks (device memory) to `.cg`
//! containers, byte-identical to [`crate::codec::encode`] of the gathered
//! chunk with the same [`EncodeOptions`].
//!
//! Kernels (`cuda/encode.cu`, compiled at run time with NVRTC), all on one
//! stream, for every chunk of a batch at once:
//!
//! 1. `cg_enc_rows`: per (tensor, token) row, gathered through the layout:
//!    the two sums of squares the CPU makes (8 f32 lanes summed in f64, for
//!    the step; a sequential f64 sum, for the outlier norms), max |v|, and
//!    the non-finite check.
//! 2. `cg_enc_medians`: per (chunk, tensor), the median row norm (rank
//!    counting) and each token's outlier term (`quant::det_ln`).
//! 3. `cg_enc_outliers`: exact ("sink") tokens as `quant::outlier_tokens`
//!    (the terms summed in tensor order, ranking).
//! 4. `cg_enc_steps`: each tensor's step (`StepRule::Rms`, bf16 rounded up).
//! 5. `cg_enc_quant`: symbols, per-channel histograms and compact tables.
//! 6. `cg_enc_rans`: every segment, a warp each, a lane per channel.
//! 7. `cg_enc_sizes`, 8. `cg_enc_sections`, 9. `cg_enc_payload`: section
//!    offsets (scans) and the container assembled in device memory.
//!
//! The host then copies each container back (its exact size) and writes
//! the 64-byte header and the two XXH3-64 values (the header's `table_id`
//! over the table section, and the trailing checksum): that is the only
//! host step, no compaction.
//!
//! A call is cut into batches of about [`BATCH_SYMBOLS`] symbols, run as a
//! pipeline: while the GPU runs the kernels of later batches, a copy stream
//! brings batch b's containers into pinned memory and host threads finish
//! them. At most [`RING`] batches hold device scratch at once (each batch
//! reuses the arena of the batch `RING` before it), so a call's device
//! memory is bounded by the batch size, not by the call's length.
//!
//! Supported: the lossy levels (Compact, Default, High) with embedded tables
//! or a model-level table set (`Tables::External`: channels the set cannot
//! code get patches, as on the CPU; a chunk whose patch needs more symbols
//! than the set's precision allows is encoded with embedded tables, as the
//! CPU encoder does, by a second pass over those chunks), with or without a
//! profile (per-tensor step multipliers), outlier protection on or off,
//! `prob_bits` overrides; f16, bf16, f32; K/V and MLA latent layouts. Not
//! supported (an error, nothing launched): the lossless level, custom
//! `plan`/`rules`, a table set whose plan is not the level's.
//!
//! One bit of the CPU encoder is not plain arithmetic: the 4-bit table codes
//! round `2 log2(max / count)` with the host's libm `log2`. The encoder finds,
//! once, with that very function, the 14 thresholds on `max / count` where
//! the rounded value steps, and the kernel compares against them.

use std::ffi::c_void;
use std::sync::Mutex;
use std::time::Instant;

use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::codec::encode::choose_segments;
use crate::codec::format::{Header, FLAG_EXTERNAL_TABLES};
use crate::codec::quant::StepRule;
use crate::codec::{Dtype, EncodeOptions, Error as CodecError, KvKind, Level, TableSet, Tables};
use crate::layout::KvLayout;

use super::driver::{self, DeviceBuffer, Event, Module, Stream};
use super::{nvrtc, Gpu, GpuError};

/// The kernel source, compiled at run time (cuda/README.md).
pub const ENCODE_CU: &str = include_str!("../../cuda/encode.cu");

const TAB_STRIDE: u64 = 132;
const ERR_NONFINITE: u32 = 1;
const ERR_FALLBACK: u32 = 4;
/// u16 per table of an uploaded table set: `lo`, `n`, then the n + 1 starts.
const SET_STRIDE: usize = 260;

// Mirrors of the structs in cuda/encode.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Geo {
    layers: u32,
    streams: u32,
    heads: u32,
    head_dim: u32,
    channels: u32,
    tensors: u32,
    groups: u32,
    dtype: u32,
    es: u32,
    block_size: u32,
    protect: u32,
    base_pb: u32,
    max: u32,
    nchunks: u32,
    vec16: u32,
    ext: u32,
    stride_block: i64,
    stride_kv: i64,
    stride_token: i64,
    stride_head: i64,
    stride_layer: i64,
    layer_base: u64,
    alpha: u64,
    thresholds: u64,
    set: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct EChunk {
    block_ids: u64,
    out: u64,
    words: u64,
    sym: u64,
    tokens: u32,
    seg_tokens: u32,
    seg_groups: u32,
    token_blocks: u32,
    spp: u32,
    seg_first: u32,
    row_first: u32,
    tok_first: u32,
    seg_words: u32,
    segs: u32,
    pad0: u32,
    pad1: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SegDesc {
    chunk: u32,
    plane: u32,
    k: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Bufs {
    chunks: u64,
    segs: u64,
    info: u64,
    rowsq: u64,
    rownorm: u64,
    rowabs: u64,
    score: u64,
    isx: u64,
    exact_idx: u64,
    step: u64,
    sym: u64,
    codes: u64,
    tablen: u64,
    taboff: u64,
    words: u64,
    states: u64,
    seglen: u64,
    segn: u64,
    segoff: u64,
    out: u64,
}

fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: T is a #[repr(C)] struct of integers (or a primitive number)
    // with explicit padding fields, so every byte is initialised.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// What one call measured (milliseconds).
#[derive(Clone, Copy, Debug, Default)]
pub struct EncodeTimings {
    /// Host checks, descriptors, device allocation and uploads, before the
    /// first launch.
    pub setup_ms: f64,
    /// From the first batch's start to the last batch's last kernel, by
    /// device events (includes any wait of the GPU for the host).
    pub kernels_ms: f64,
    /// Each kernel ([`KERNEL_NAMES`]), summed over the batches.
    pub per_kernel_ms: [f64; KERNELS],
    /// After the last kernel: that batch's copy to the host, headers and
    /// hashes (the part the pipeline cannot hide).
    pub finish_ms: f64,
    /// Batches the call was cut into.
    pub batches: usize,
    /// Time the launching thread waited for kernels, for device-to-host
    /// copies, and for host workers to free a staging slot.
    pub wait_gpu_ms: f64,
    pub wait_copy_ms: f64,
    pub wait_workers_ms: f64,
    /// Host workers' time finishing containers, summed over the workers.
    pub worker_busy_ms: f64,
    /// Host workers.
    pub workers: usize,
    /// Chunks encoded again with embedded tables because a patch did not
    /// fit the table set's precision (what the CPU encoder does too).
    pub fallback_chunks: usize,
}

/// GPU encoder; see the module documentation.
pub struct GpuEncoder {
    gpu: Gpu,
    _module: Module,
    f: [cudarc::driver::sys::CUfunction; KERNELS],
    thresholds: DeviceBuffer,
    /// The kernels' stream (when the caller passes none) and the copy stream.
    stream: Mutex<(Stream, Stream)>,
    /// Pinned staging ([`SLOTS`] slots) for the device-to-host copy of the
    /// containers, kept between calls (pinning is slow) and grown as needed.
    staging: Mutex<[Option<super::PinnedBuffer>; SLOTS]>,
    /// Symbols per batch ([`BATCH_SYMBOLS`] unless set).
    batch_symbols: u64,
    /// The last table set used, uploaded (its id, the buffer): engines store
    /// with one set per model, so it is uploaded once.
    set: Mutex<Option<(u64, std::sync::Arc<DeviceBuffer>)>>,
}

// SAFETY: CUfunction handles are usable from any thread with the context current;
// the stream is used under the mutex.
unsafe impl Send for GpuEncoder {}
unsafe impl Sync for GpuEncoder {}

/// `table::codes_from_histogram`'s rounding, as written there.
fn half_octaves(q: f64) -> f64 {
    (2.0 * q.log2()).round()
}

/// For k = 1..=14 the smallest f64 `q >= 1` with `half_octaves(q) >= k`,
/// found with this process's libm (bisection over the bit patterns, which
/// order positive doubles by value), and checked to be a clean step over a
/// window around it. A code is then `15 - #{k : q >= t_k}`.
pub(crate) fn code_thresholds() -> Result<[f64; 14], GpuError> {
    let mut out = [0f64; 14];
    for (i, slot) in out.iter_mut().enumerate() {
        let k = (i + 1) as f64;
        let (mut lo, mut hi) = (1.0f64.to_bits(), 1024.0f64.to_bits());
        // Invariant: half_octaves(lo) < k <= half_octaves(hi).
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if half_octaves(f64::from_bits(mid)) >= k {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        for d in 1..=4096u64 {
            if half_octaves(f64::from_bits(hi - d)) >= k || half_octaves(f64::from_bits(hi + d)) < k {
                return Err(GpuError::Unsupported("the host's log2 is not monotone near a table-code threshold".into()));
            }
        }
        *slot = f64::from_bits(hi);
    }
    Ok(out)
}

/// The 4-bit code the kernel (`code_of`) computes for count `x` against maximum `mx`.
#[cfg(test)]
fn code_by_thresholds(x: u32, mx: u32, th: &[f64; 14]) -> u8 {
    if x == 0 {
        return 0;
    }
    let q = mx as f64 / x as f64;
    15 - th.iter().filter(|&&t| q >= t).count() as u8
}

struct Plan<'a> {
    level: Level,
    prob_bits: u32,
    alpha: Vec<f32>,
    protect: bool,
    set: Option<&'a TableSet>,
}

fn plan<'a>(layout: &KvLayout, opts: &EncodeOptions<'a>) -> Result<Plan<'a>, GpuError> {
    let level = opts.level.unwrap_or(Level::Default);
    if level == Level::Lossless {
        return Err(GpuError::Unsupported("the lossless level (GPU encode covers the lossy levels)".into()));
    }
    if layout.dtype == Dtype::F8E4M3 {
        return Err(GpuError::Unsupported("fp8 KV (GPU encode reads f16, bf16 and f32; fp8 stores gather on the device and encode on the host)".into()));
    }
    if opts.plan.is_some() || opts.rules.is_some() {
        return Err(GpuError::Unsupported("custom plans or step rules".into()));
    }
    let shape = layout.chunk_shape(1);
    let t = shape.tensors();
    let set = match opts.tables {
        Tables::External(set) => {
            // The CPU encoder's check, then what the kernels assume: the
            // level's planes (per-tensor, symmetric, max 127).
            if set.channels != shape.channels() || set.plan.len() != t {
                return Err(GpuError::Invalid("table set was calibrated for another shape or level".into()));
            }
            if set.plan != level.plan(&shape, layout.dtype) {
                return Err(GpuError::Unsupported("a table set whose plan is not the level's".into()));
            }
            Some(set)
        }
        Tables::Embedded => None,
    };
    let prob_bits = match set {
        Some(s) => s.prob_bits,
        None => opts.prob_bits.unwrap_or(level.prob_bits()),
    };
    if !(8..=10).contains(&prob_bits) {
        return Err(GpuError::Invalid("prob_bits must be in 8..=10".into()));
    }
    if let Some(p) = &opts.profile {
        if p.len() != t || p.iter().any(|m| !(m.is_finite() && *m > 0.0)) {
            return Err(GpuError::Invalid(format!("profile needs {t} positive multipliers (one per tensor)")));
        }
    }
    let alpha = level
        .step_rules(&shape, opts.profile.as_deref())
        .into_iter()
        .map(|r| match r {
            StepRule::Rms(a) => Ok(a),
            StepRule::Range => Err(GpuError::Unsupported("range step rules".into())),
        })
        .collect::<Result<Vec<f32>, _>>()?;
    Ok(Plan { level, prob_bits, alpha, protect: opts.protect_outliers.unwrap_or(true), set })
}

/// A table set as the kernels read it: per (plane, channel) `SET_STRIDE`
/// u16: `lo`, the number of frequencies n, then the n + 1 cumulative starts.
fn set_image(set: &TableSet) -> Result<Vec<u16>, GpuError> {
    let tables = set.tables().map_err(|e| GpuError::Invalid(format!("table set: {e}")))?;
    let n: usize = tables.iter().map(|p| p.len()).sum();
    let mut img = vec![0u16; n * SET_STRIDE];
    for (t, slot) in tables.iter().flatten().zip(img.chunks_mut(SET_STRIDE)) {
        if t.freq.len() + 3 > SET_STRIDE {
            return Err(GpuError::Invalid("table set: a table wider than the alphabet".into()));
        }
        slot[0] = t.lo as u16;
        slot[1] = t.freq.len() as u16;
        let mut start = 0u32;
        for (j, &f) in t.freq.iter().enumerate() {
            slot[2 + j] = start as u16;
            start += f as u32;
        }
        // The total, 2^prob_bits <= 2^10 (checked by the plan).
        slot[2 + t.freq.len()] = start as u16;
    }
    Ok(img)
}

impl GpuEncoder {
    /// Compile the kernels for this device.
    pub fn new(gpu: &Gpu) -> Result<GpuEncoder, GpuError> {
        gpu.bind()?;
        let (maj, min) = gpu.compute_capability();
        // CACHEGEN_ENCODE_SRC: another kernel source with the same interface (development).
        let src = match std::env::var("CACHEGEN_ENCODE_SRC") {
            Ok(p) => std::fs::read_to_string(&p).map_err(|e| GpuError::Compile(format!("CACHEGEN_ENCODE_SRC={p}: {e}")))?,
            Err(_) => ENCODE_CU.to_string(),
        };
        // No FMA contraction anywhere (the kernels also use explicit _rn intrinsics).
        let (cubin, _log) = nvrtc::compile(&src, "encode.cu", maj, min, &["--fmad=false".to_string()])?;
        let module = Module::load(&cubin)?;
        let mut f = [std::ptr::null_mut(); KERNELS];
        for (slot, name) in f.iter_mut().zip(KERNEL_NAMES) {
            *slot = module.function(name)?;
        }
        let th = code_thresholds()?;
        let thresholds = gpu.alloc(8 * 14)?;
        thresholds.write(0, as_bytes(&th))?;
        Ok(GpuEncoder {
            gpu: gpu.clone(),
            _module: module,
            f,
            thresholds,
            stream: Mutex::new((Stream::new()?, Stream::new()?)),
            staging: Mutex::new(Default::default()),
            batch_symbols: BATCH_SYMBOLS,
            set: Mutex::new(None),
        })
    }

    /// Cut calls into batches of at most `symbols` symbols (at least one
    /// chunk each) instead of [`BATCH_SYMBOLS`]: smaller batches hold less
    /// device memory and overlap more, larger ones launch fewer kernels.
    /// The containers do not depend on it.
    pub fn with_batch_symbols(mut self, symbols: u64) -> GpuEncoder {
        self.batch_symbols = symbols.max(1);
        self
    }

    /// `set` on the device (`set_image`), uploaded unless it was the last one used.
    fn uploaded(&self, set: &TableSet) -> Result<std::sync::Arc<DeviceBuffer>, GpuError> {
        let mut last = self.set.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((id, buf)) = last.as_ref() {
            if *id == set.id() {
                return Ok(std::sync::Arc::clone(buf));
            }
        }
        let img = set_image(set)?;
        let buf = self.gpu.alloc(2 * img.len())?;
        buf.write(0, as_bytes(&img))?;
        let buf = std::sync::Arc::new(buf);
        *last = Some((set.id(), std::sync::Arc::clone(&buf)));
        Ok(buf)
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Encode chunks straight from paged blocks: one container per chunk;
    /// chunk i is `(block ids, tokens)`, tokens filling the blocks in order
    /// (as [`KvLayout::gather`]). Each container equals
    /// `codec::encode(&layout.gather(..), opts)` byte for byte.
    /// `stream`: a `CUstream` to run on (the engine's), else the encoder's own.
    ///
    /// # Safety
    /// `layout.layer_base` must be device addresses of this GPU's context and
    /// every element the layout and block ids address must be readable
    /// device memory, not written while the call runs.
    pub unsafe fn encode_blocks(&self, layout: &KvLayout, chunks: &[(&[u32], usize)], opts: &EncodeOptions, stream: Option<u64>) -> Result<Vec<Vec<u8>>, GpuError> {
        // SAFETY: forwarded.
        unsafe { self.encode_blocks_timed(layout, chunks, opts, stream) }.map(|r| r.0)
    }

    /// [`GpuEncoder::encode_blocks`], also returning what each part took.
    ///
    /// # Safety
    /// As [`GpuEncoder::encode_blocks`].
    pub unsafe fn encode_blocks_timed(
        &self,
        layout: &KvLayout,
        chunks: &[(&[u32], usize)],
        opts: &EncodeOptions,
        stream: Option<u64>,
    ) -> Result<(Vec<Vec<u8>>, EncodeTimings), GpuError> {
        let t_setup = Instant::now();
        layout.validate().map_err(|e| GpuError::Invalid(e.to_string()))?;
        let plan = plan(layout, opts)?;
        if chunks.is_empty() {
            return Ok((Vec::new(), EncodeTimings::default()));
        }
        if layout.layers > u16::MAX as usize || layout.heads > u16::MAX as usize || layout.head_dim > u16::MAX as usize {
            return Err(GpuError::Codec { chunk: 0, source: CodecError::Shape("layers, heads and head_dim must each fit 16 bits".into()) });
        }
        let p = layout.layers * layout.streams();
        let c = layout.heads * layout.head_dim;
        let es = layout.dtype.size();
        let groups = c.div_ceil(32);
        let bs = layout.block_size;

        // Every chunk is checked before anything is launched; then the chunks
        // are cut into batches (see BATCH_SYMBOLS).
        let mut batches: Vec<Batch> = Vec::new();
        let mut batch = Batch::default();
        for (ci, &(blocks, tokens)) in chunks.iter().enumerate() {
            if tokens == 0 || tokens > layout.capacity(blocks.len()) {
                return Err(GpuError::Invalid(format!("chunk {ci}: {tokens} tokens do not fit in {} blocks of {bs} tokens (or are zero)", blocks.len())));
            }
            let used = tokens.div_ceil(bs);
            if let Some(&id) = blocks[..used].iter().find(|&&id| id as usize >= layout.num_blocks) {
                return Err(GpuError::Invalid(format!("chunk {ci}: block id {id} is out of range ({} blocks)", layout.num_blocks)));
            }
            if tokens > u32::MAX as usize {
                return Err(GpuError::Codec { chunk: ci, source: CodecError::Shape("tokens must fit 32 bits".into()) });
            }
            let (seg_tokens, seg_groups) = choose_segments(tokens, c);
            let tb = tokens.div_ceil(seg_tokens);
            let spp = groups.div_ceil(seg_groups) * tb;
            let s = p * spp;
            let seg_words = seg_tokens * seg_groups * 32;
            let emax = if plan.protect && tokens >= 8 { (tokens / 64).max(1) } else { 0 };
            let syms = (p * tokens * c) as u64;
            // Worst case: every symbol flushes a word; every table is a
            // patch (index + compact table) after a patch count.
            let worst = 64 + 6 * p as u64 + 4 * emax as u64 + (emax * p * c * es) as u64 + 4 + p as u64 * c as u64 * (4 + TAB_STRIDE) + 4 * s as u64 + 128 * s as u64 + 2 * syms;
            if 2 * syms + 128 * s as u64 > u32::MAX as u64 || worst > u32::MAX as u64 {
                return Err(GpuError::Unsupported(format!("chunk {ci}: {tokens} tokens could exceed a 4 GiB container; use smaller chunks")));
            }
            if !batch.descs.is_empty() && batch.sym_len + syms > self.batch_symbols {
                let next = Batch { first: ci, ..Default::default() };
                batches.push(std::mem::replace(&mut batch, next));
            }
            // Offsets are relative to the batch's own buffers, chunk and
            // segment indices to the batch (each batch is launched alone).
            batch.descs.push(EChunk {
                block_ids: 4 * batch.ids.len() as u64, // made absolute at launch
                out: batch.out_len,
                words: batch.words_len,
                sym: batch.sym_len,
                tokens: tokens as u32,
                seg_tokens: seg_tokens as u32,
                seg_groups: seg_groups as u32,
                token_blocks: tb as u32,
                spp: spp as u32,
                seg_first: batch.segs.len() as u32,
                row_first: batch.rows as u32,
                tok_first: batch.toks as u32,
                seg_words: seg_words as u32,
                segs: s as u32,
                ..Default::default()
            });
            let bc = (ci - batch.first) as u32;
            for plane in 0..p {
                for k in 0..spp {
                    batch.segs.push(SegDesc { chunk: bc, plane: plane as u32, k: k as u32 });
                }
            }
            batch.ids.extend_from_slice(&blocks[..used]);
            batch.out_len += worst.div_ceil(16) * 16;
            batch.words_len += (s * seg_words) as u64;
            batch.sym_len += syms;
            batch.rows += (p * tokens) as u64;
            batch.toks += tokens as u64;
            batch.max_t = batch.max_t.max(tokens as u32);
            if batch.rows > u32::MAX as u64 || batch.segs.len() as u64 > u32::MAX as u64 || batch.toks > u32::MAX as u64 || (batch.descs.len() * p * c) as u64 > u32::MAX as u64 {
                return Err(GpuError::Unsupported("a chunk too large for one kernel launch; use smaller chunks".into()));
            }
        }
        batches.push(batch);
        let n = chunks.len();
        for b in &mut batches {
            b.arena = arena_layout(b, p, c);
        }
        let arena_len = batches.iter().map(|b| b.arena.total).max().unwrap_or(0);

        let g = &self.gpu;
        g.bind()?;
        let set_buf = match plan.set {
            Some(set) => Some(self.uploaded(set)?),
            None => None,
        };
        let d_base = g.alloc(8 * layout.layers)?;
        let d_alpha = g.alloc(4 * p)?;
        // At most RING batches hold device scratch at once: batch b reuses
        // the arena of batch b - RING, launched only after that batch's
        // containers were copied out.
        let arenas: Vec<DeviceBuffer> = (0..RING.min(batches.len())).map(|_| g.alloc(arena_len as usize)).collect::<Result<_, _>>()?;

        let bases: Vec<u64> = layout.layer_base.iter().map(|&b| b as u64).collect();
        let mut geo = Geo {
            layers: layout.layers as u32,
            streams: layout.streams() as u32,
            heads: layout.heads as u32,
            head_dim: layout.head_dim as u32,
            channels: c as u32,
            tensors: p as u32,
            groups: groups as u32,
            dtype: match layout.dtype {
                Dtype::F16 => 0,
                Dtype::Bf16 => 1,
                Dtype::F32 => 2,
                Dtype::F8E4M3 => return Err(GpuError::Unsupported("fp8 KV".into())), // refused by plan() already
            },
            es: es as u32,
            block_size: bs as u32,
            protect: plan.protect as u32,
            base_pb: plan.prob_bits,
            max: 127,
            stride_block: layout.stride_block as i64,
            stride_kv: if layout.kind == KvKind::Latent { 0 } else { layout.stride_kv as i64 },
            stride_token: layout.stride_token as i64,
            stride_head: layout.stride_head as i64,
            stride_layer: layout.stride_layer as i64,
            layer_base: d_base.ptr(),
            alpha: d_alpha.ptr(),
            thresholds: self.thresholds.ptr(),
            ext: set_buf.is_some() as u32,
            set: set_buf.as_ref().map_or(0, |b| b.ptr()),
            ..Default::default()
        };
        // Rows can be read 16 bytes at a time when every row and head starts
        // 16-byte aligned and a head is a whole number of 8-element steps.
        let a16 = |v: i64| v.rem_euclid(16) == 0;
        geo.vec16 = (layout.head_dim % 8 == 0) as u32
            & (0..layout.layers).all(|l| a16(bases[l] as i64 + l as i64 * geo.stride_layer)) as u32
            & [geo.stride_block, geo.stride_kv, geo.stride_token, geo.stride_head].iter().all(|&v| a16(v)) as u32;

        let streams = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let (own, copy) = (&streams.0, &streams.1);
        let borrowed;
        let s: &Stream = match stream {
            Some(raw) => {
                borrowed = Stream::borrowed(raw);
                &borrowed
            }
            None => own,
        };
        // Per batch: its start, then the end of each of its kernels.
        let ev: Vec<Vec<Event>> = (0..batches.len()).map(|_| (0..=KERNELS).map(|_| Event::new(true)).collect::<Result<_, _>>()).collect::<Result<_, _>>()?;
        // SAFETY: both destinations were allocated above with these lengths;
        // the sources outlive the synchronisation at the end of this call.
        unsafe {
            driver::copy_htod(d_base.ptr(), as_bytes(&bases), s)?;
            driver::copy_htod(d_alpha.ptr(), as_bytes(&plan.alpha), s)?;
        }
        let setup_ms = t_setup.elapsed().as_secs_f64() * 1e3;

        // Launch batch `bi` into arena `bi % RING` (uploads, kernels, events).
        let launch_batch = |bi: usize| -> Result<(), GpuError> {
            let b = &batches[bi];
            let base = arenas[bi % RING].ptr();
            let a = &b.arena;
            let mut descs = b.descs.clone();
            for d in descs.iter_mut() {
                d.block_ids += base + a.ids;
            }
            let nb = b.descs.len() as u32;
            ev[bi][0].record(s)?;
            let mut geo = geo;
            geo.nchunks = nb;
            let mut bufs = a.bufs.rebased(base);
            // SAFETY: the arena holds every range (arena_layout); the host
            // sources are copied (pageable memory) before the calls return.
            unsafe {
                driver::copy_htod(bufs.chunks, as_bytes(&descs), s)?;
                driver::copy_htod(bufs.segs, as_bytes(&b.segs), s)?;
                driver::copy_htod(base + a.ids, as_bytes(&b.ids), s)?;
                driver::memset(bufs.info, 0, 32 * b.descs.len(), s)?;
            }
            let mut params = [&mut geo as *mut Geo as *mut c_void, &mut bufs as *mut Bufs as *mut c_void];
            let launches: [((u32, u32, u32), u32); KERNELS] = [
                (((p as u32 * b.max_t).div_ceil(128), nb, 1), 128),
                ((p as u32, nb, 1), 256),
                ((nb, 1, 1), 256),
                (((p as u32).div_ceil(128), nb, 1), 128),
                ((groups as u32, p as u32, nb), 256),
                ((b.segs.len() as u32, 1, 1), 32),
                ((nb, 1, 1), 1024),
                ((64, nb, 1), 256),
                ((b.segs.len() as u32, 1, 1), 128),
            ];
            for (k, (f, (grid, block))) in self.f.iter().zip(launches).enumerate() {
                // SAFETY: every kernel takes (Geo, Bufs) by value; the arena
                // is sized for the indices the kernels compute from them.
                unsafe { driver::launch(*f, grid, (block, 1, 1), 0, s, &mut params)? };
                ev[bi][k + 1].record(s)?;
            }
            Ok(())
        };

        // Pinned staging: batch b copies into slot b % SLOTS once the
        // containers of batch b - SLOTS are finished. Kept between calls
        // (pinning is slow), grown as needed.
        let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        // Host workers finish containers (header, hashes, copy out of the
        // pinned slot) while this thread keeps the GPU and the copies fed;
        // one core stays for it.
        // CACHEGEN_NO_HUGE_PAGES=1: no huge-page hint (for comparison).
        let huge_pages = std::env::var_os("CACHEGEN_NO_HUGE_PAGES").is_none();
        let workers = std::thread::available_parallelism().map_or(1, |t| t.get()).saturating_sub(1).max(1);
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); n];
        let mut per_kernel_ms = [0f64; KERNELS];
        let mut t_tail = Instant::now();
        let (mut wait_gpu_ms, mut wait_copy_ms, mut wait_workers_ms) = (0f64, 0f64, 0f64);
        // Chunks to encode again with embedded tables (ERR_FALLBACK).
        let mut fallback: Vec<usize> = Vec::new();
        let worker_busy_ns = std::sync::atomic::AtomicU64::new(0);
        let run = std::thread::scope(|sc| -> Result<(), GpuError> {
            let (job_tx, job_rx) = crossbeam_channel::unbounded::<Finish>();
            let (done_tx, done_rx) = crossbeam_channel::unbounded::<(usize, usize, Vec<u8>)>();
            for _ in 0..workers {
                let (jobs, done, busy) = (job_rx.clone(), done_tx.clone(), &worker_busy_ns);
                sc.spawn(move || {
                    for job in jobs {
                        let (bi, ci) = (job.batch, job.chunk);
                        let t = Instant::now();
                        // SAFETY: the slot is neither written nor freed until
                        // this job's result is received (below, or at the end).
                        let bytes = unsafe { job.run() };
                        busy.fetch_add(t.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
                        if done.send((bi, ci, bytes)).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(done_tx);
            let mut pending = vec![0usize; batches.len()];
            let receive = |pending: &mut [usize], out: &mut [Vec<u8>]| -> Result<(), GpuError> {
                let (bi, ci, bytes) = done_rx.recv().map_err(|_| GpuError::Driver("a thread finishing containers stopped".into()))?;
                pending[bi] -= 1;
                out[ci] = bytes;
                Ok(())
            };
            for bi in 0..RING.min(batches.len()) {
                launch_batch(bi)?;
            }
            for (bi, b) in batches.iter().enumerate() {
                let nb = b.descs.len();
                let t_wait = Instant::now();
                ev[bi][KERNELS].sync()?;
                wait_gpu_ms += t_wait.elapsed().as_secs_f64() * 1e3;
                if bi + 1 == batches.len() {
                    t_tail = Instant::now();
                }
                let arena = &arenas[bi % RING];
                let mut info = vec![0u8; 32 * nb];
                arena.read(b.arena.bufs.info as usize, &mut info)?;
                let word = |ci: usize, k: usize| u32::from_le_bytes(info[32 * ci + 4 * k..32 * ci + 4 * k + 4].try_into().unwrap());
                // Sizes and errors first: where each container goes in the
                // staging slot, none for a chunk that falls back to embedded
                // tables.
                let mut at: Vec<Option<usize>> = Vec::with_capacity(nb);
                let mut staged = 0usize;
                for ci in 0..nb {
                    let err = word(ci, 0);
                    if err & ERR_NONFINITE != 0 {
                        return Err(GpuError::Codec { chunk: b.first + ci, source: CodecError::NonFinite });
                    }
                    if err & ERR_FALLBACK != 0 {
                        fallback.push(b.first + ci);
                        at.push(None);
                        continue;
                    }
                    if err != 0 {
                        return Err(GpuError::Driver(format!("chunk {}: encode kernel error bits {err:#x}", b.first + ci)));
                    }
                    at.push(Some(staged));
                    staged += word(ci, 6) as usize;
                }
                let slot = bi % SLOTS;
                let t_wait = Instant::now();
                if bi >= SLOTS {
                    while pending[bi - SLOTS] > 0 {
                        receive(&mut pending, &mut out)?;
                    }
                }
                wait_workers_ms += t_wait.elapsed().as_secs_f64() * 1e3;
                if staging[slot].as_ref().map_or(true, |buf| buf.len() < staged) {
                    staging[slot] = None;
                    staging[slot] = Some(g.alloc_pinned(staged + staged / 4)?);
                }
                let host = staging[slot].as_mut().expect("allocated above").as_mut_slice();
                for ci in 0..nb {
                    let Some(at) = at[ci] else { continue };
                    let total = word(ci, 6) as usize;
                    let dst = &mut host[at..at + total];
                    let src = arena.ptr() + b.arena.bufs.out + b.descs[ci].out;
                    // SAFETY: the device range lies in the chunk's region of
                    // the arena (total <= its worst case); the kernels that
                    // wrote it are done (event above); dst is pinned and
                    // outlives the synchronisation below.
                    driver::call("cuMemcpyDtoHAsync", || unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, copy.raw) })?;
                }
                let t_wait = Instant::now();
                driver::call("cuStreamSynchronize", || unsafe { cudarc::driver::result::stream::synchronize(copy.raw) })?;
                wait_copy_ms += t_wait.elapsed().as_secs_f64() * 1e3;
                // The arena is free again: launch the batch that reuses it.
                if bi + RING < batches.len() {
                    launch_batch(bi + RING)?;
                }
                for (k, slot_ms) in per_kernel_ms.iter_mut().enumerate() {
                    *slot_ms += ev[bi][k + 1].since(&ev[bi][k])? as f64;
                }
                let mut jobs = 0;
                for ci in 0..nb {
                    let Some(at) = at[ci] else { continue };
                    let (exact, prob_bits, tables_len, payload_len, total) = (word(ci, 2) as usize, word(ci, 3), word(ci, 4) as usize, word(ci, 5) as usize, word(ci, 6) as usize);
                    let header = Header {
                        flags: if plan.set.is_some() { FLAG_EXTERNAL_TABLES } else { 0 },
                        dtype: layout.dtype,
                        shape: layout.chunk_shape(b.descs[ci].tokens as usize),
                        level: plan.level.number(),
                        prob_bits,
                        seg_tokens: b.descs[ci].seg_tokens as usize,
                        seg_groups: b.descs[ci].seg_groups as usize,
                        table_id: plan.set.map_or(0, |s| s.id()), // else set by the worker: a hash of the table section
                        planes: p,
                        scales_len: 2 * p,
                        tables_len,
                        segments: b.descs[ci].segs as usize,
                        payload_len,
                        exact_tokens: exact,
                    };
                    let tables_at = 64 + 6 * p + 4 * exact + exact * p * c * es;
                    if tables_at + tables_len > total || total < 64 {
                        return Err(GpuError::Driver(format!("chunk {}: encode kernels reported inconsistent sizes", b.first + ci)));
                    }
                    let job = Finish { batch: bi, chunk: b.first + ci, bytes: SendBytes(host[at..].as_ptr(), total), header, tables_at, huge_pages };
                    job_tx.send(job).map_err(|_| GpuError::Driver("the threads finishing containers stopped".into()))?;
                    jobs += 1;
                }
                pending[bi] = jobs;
            }
            drop(job_tx);
            for _ in 0..pending.iter().sum::<usize>() {
                receive(&mut pending, &mut out)?;
            }
            Ok(())
        });
        // Whatever happened, nothing may still run on the arenas when they are freed.
        let synced = driver::call("cuStreamSynchronize", || unsafe { cudarc::driver::result::stream::synchronize(s.raw) });
        run?;
        synced?;
        let kernels_ms = ev[batches.len() - 1][KERNELS].since(&ev[0][0])? as f64;
        let finish_ms = t_tail.elapsed().as_secs_f64() * 1e3;
        drop(staging);
        drop(streams);
        let worker_busy_ms = worker_busy_ns.into_inner() as f64 / 1e6;
        let fallback_chunks = fallback.len();
        if !fallback.is_empty() {
            let again: Vec<(&[u32], usize)> = fallback.iter().map(|&i| chunks[i]).collect();
            let embedded = EncodeOptions { tables: Tables::Embedded, ..opts.clone() };
            // SAFETY: the caller's contract covers these chunks too.
            let (coded, _) = unsafe { self.encode_blocks_timed(layout, &again, &embedded, stream) }?;
            for (i, bytes) in fallback.into_iter().zip(coded) {
                out[i] = bytes;
            }
        }
        Ok((out, EncodeTimings { setup_ms, kernels_ms, per_kernel_ms, finish_ms, batches: batches.len(), wait_gpu_ms, wait_copy_ms, wait_workers_ms, worker_busy_ms, workers, fallback_chunks }))
    }
}

/// The kernels of `cuda/encode.cu`, in launch order.
pub const KERNEL_NAMES: [&str; KERNELS] = ["cg_enc_rows", "cg_enc_medians", "cg_enc_outliers", "cg_enc_steps", "cg_enc_quant", "cg_enc_rans", "cg_enc_sizes", "cg_enc_sections", "cg_enc_payload"];
const KERNELS: usize = 9;

/// Symbols per batch (about 8 chunks of 256 tokens of a Llama-3-8B-shaped
/// cache; 44 of SmolLM2's): big enough to fill the GPU, small enough that the
/// copy and the host's work on one batch hide behind the kernels of the next.
pub const BATCH_SYMBOLS: u64 = 1 << 27;
/// Batches holding device scratch at once (launched ahead of the host).
pub const RING: usize = 3;
/// Pinned staging slots (batches copied to the host and not yet finished).
const SLOTS: usize = 4;

/// Chunks encoded by one launch of the kernels, with their descriptors.
#[derive(Default)]
struct Batch {
    first: usize,
    descs: Vec<EChunk>,
    segs: Vec<SegDesc>,
    ids: Vec<u32>,
    out_len: u64,
    words_len: u64,
    sym_len: u64,
    rows: u64,
    toks: u64,
    max_t: u32,
    arena: ArenaLayout,
}

/// Where a batch's buffers lie in its arena (byte offsets, each 256-aligned).
#[derive(Default)]
struct ArenaLayout {
    /// The kernels' buffers, as offsets from the arena's start.
    bufs: Bufs,
    /// The batch's block ids.
    ids: u64,
    total: u64,
}

impl Bufs {
    /// These offsets as addresses in an arena starting at `base`.
    fn rebased(mut self, base: u64) -> Bufs {
        let Bufs { chunks, segs, info, rowsq, rownorm, rowabs, score, isx, exact_idx, step, sym, codes, tablen, taboff, words, states, seglen, segn, segoff, out } = &mut self;
        for f in [chunks, segs, info, rowsq, rownorm, rowabs, score, isx, exact_idx, step, sym, codes, tablen, taboff, words, states, seglen, segn, segoff, out] {
            *f += base;
        }
        self
    }
}

fn arena_layout(b: &Batch, p: usize, c: usize) -> ArenaLayout {
    let n = b.descs.len() as u64;
    let nt = n * (p * c) as u64;
    let ns = b.segs.len() as u64;
    let mut end = 0u64;
    let mut take = |len: u64| {
        let at = end;
        end += len.max(1).div_ceil(256) * 256;
        at
    };
    let ids = take(4 * b.ids.len() as u64);
    let bufs = Bufs {
        chunks: take(std::mem::size_of_val(&b.descs[..]) as u64),
        segs: take(std::mem::size_of_val(&b.segs[..]) as u64),
        info: take(32 * n),
        rowsq: take(8 * b.rows),
        rownorm: take(8 * b.rows),
        rowabs: take(4 * b.rows),
        score: take(8 * b.toks),
        isx: take(b.toks),
        exact_idx: take(4 * b.toks),
        step: take(4 * n * p as u64),
        sym: take(b.sym_len),
        codes: take(nt * TAB_STRIDE),
        tablen: take(4 * nt),
        taboff: take(4 * nt),
        words: take(2 * b.words_len),
        states: take(128 * ns),
        seglen: take(4 * ns),
        segn: take(4 * ns),
        segoff: take(4 * ns),
        out: take(b.out_len),
    };
    ArenaLayout { bufs, ids, total: end }
}

/// One container to finish on a host worker: its bytes as copied from the
/// device (header left blank), and its header but for `table_id`.
struct Finish {
    batch: usize,
    chunk: usize,
    bytes: SendBytes,
    header: Header,
    tables_at: usize,
    huge_pages: bool,
}

/// Ask Linux for transparent huge pages over the whole 2 MiB pages inside
/// `v`'s capacity: a fresh container is written once, end to end, and 4 KiB
/// page faults were the host's largest cost in finishing them.
fn advise_huge_pages(v: &mut Vec<u8>) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = v.as_mut_ptr() as usize;
        let (first, end) = (start.next_multiple_of(HUGE), (start + v.capacity()) / HUGE * HUGE);
        if end > first {
            // SAFETY: the range lies inside v's allocation; MADV_HUGEPAGE only
            // changes how the kernel backs it, never its contents. A failure
            // (THP disabled) is harmless and ignored.
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = v;
}

impl Finish {
    /// The finished container: header (`table_id` is the table section's
    /// hash for embedded tables; a table set's id is already in the header)
    /// and trailing checksum.
    ///
    /// # Safety
    /// `bytes` must be live and unwritten while this runs.
    unsafe fn run(mut self) -> Vec<u8> {
        // SAFETY: the caller's contract.
        let src = unsafe { self.bytes.slice() };
        if self.header.flags & FLAG_EXTERNAL_TABLES == 0 {
            self.header.table_id = xxh3_64(&src[self.tables_at..self.tables_at + self.header.tables_len]);
        }
        let mut h = Vec::with_capacity(64);
        self.header.write(&mut h);
        // One pass over the bytes: each piece is hashed while it is in cache
        // from being copied (the containers are far larger than the caches).
        let mut bytes = Vec::with_capacity(src.len() + 8);
        if self.huge_pages {
            advise_huge_pages(&mut bytes);
        }
        bytes.extend_from_slice(&h);
        let mut sum = Xxh3::new();
        sum.update(&h);
        for piece in src[64..].chunks(1 << 16) {
            bytes.extend_from_slice(piece);
            sum.update(piece);
        }
        bytes.extend_from_slice(&sum.digest().to_le_bytes());
        bytes
    }
}

/// A staging slot's filled bytes, handed to the threads that finish a batch.
#[derive(Clone, Copy)]
struct SendBytes(*const u8, usize);
// SAFETY: read-only pinned host memory; the owner keeps it alive and
// unwritten until the reading threads are joined.
unsafe impl Send for SendBytes {}
impl SendBytes {
    /// # Safety
    /// The memory must be live and unwritten for the returned lifetime.
    unsafe fn slice<'a>(self) -> &'a [u8] {
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts(self.0, self.1) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::table::codes_from_histogram;

    /// The thresholds reproduce `codes_from_histogram` (no GPU needed).
    #[test]
    fn table_codes_by_thresholds() {
        let th = code_thresholds().unwrap();
        let mut s = 0x9E3779B97F4A7C15u64;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for round in 0..2000 {
            let n = 1 + (next() % 60) as usize;
            let scale = [3u64, 100, 5000, 1 << 20, 1 << 31][round % 5];
            let hist: Vec<u32> = (0..n).map(|_| if next() % 4 == 0 { 0 } else { (next() % scale) as u32 }).collect();
            let (lo, codes) = codes_from_histogram(&hist);
            let mx = *hist.iter().max().unwrap();
            if mx == 0 {
                continue;
            }
            for (j, &code) in codes.iter().enumerate() {
                assert_eq!(code, code_by_thresholds(hist[lo as usize + j], mx, &th), "count {} max {mx}", hist[lo as usize + j]);
            }
        }
        // Around every threshold, both ways.
        for (k, &t) in th.iter().enumerate() {
            for d in [-2i64, -1, 0, 1, 2] {
                let q = f64::from_bits((t.to_bits() as i64 + d) as u64);
                let want = (15.0 - half_octaves(q)).clamp(1.0, 15.0) as u8;
                let got = 15 - th.iter().filter(|&&x| q >= x).count() as u8;
                assert_eq!(got, want, "threshold {k} offset {d}");
            }
        }
    }
}

//! The GPU encoder: an engine's paged KV blocks (device memory) to `.cg`
//! containers, byte-identical to [`crate::codec::encode`] of the gathered
//! chunk with the same [`EncodeOptions`].
//!
//! Kernels (`cuda/encode.cu`, compiled at run time with NVRTC), all on one
//! stream, for every chunk of the call at once:
//!
//! 1. `cg_enc_rows`: per (tensor, token) row, gathered through the layout:
//!    the two sums of squares the CPU makes (8 f32 lanes summed in f64, for
//!    the step; a sequential f64 sum, for the outlier norms), max |v|, and
//!    the non-finite check.
//! 2. `cg_enc_outliers`: exact ("sink") tokens as `quant::outlier_tokens`
//!    (median by rank counting, `quant::det_ln`, ranking).
//! 3. `cg_enc_steps`: each tensor's step (`StepRule::Rms`, bf16 rounded up).
//! 4. `cg_enc_quant`: symbols, per-channel histograms and compact tables.
//! 5. `cg_enc_rans`: every segment, a warp each, a lane per channel.
//! 6. `cg_enc_sizes`, 7. `cg_enc_sections`, 8. `cg_enc_payload`: section
//!    offsets (scans) and the container assembled in device memory.
//!
//! The host then copies each container back (its exact size) and writes
//! the 64-byte header and the two XXH3-64 values (the header's `table_id`
//! over the table section, and the trailing checksum): that is the only
//! host step, no compaction.
//!
//! Supported: the lossy levels (Compact, Default, High) with embedded tables,
//! with or without a profile (per-tensor step multipliers), outlier
//! protection on or off, `prob_bits` overrides; f16, bf16, f32; K/V and MLA
//! latent layouts. Not supported (an error, nothing launched): the lossless
//! level, custom `plan`/`rules`, external table sets.
//!
//! One bit of the CPU encoder is not plain arithmetic: the 4-bit table codes
//! round `2 log2(max / count)` with the host's libm `log2`. The encoder finds,
//! once, with that very function, the 14 thresholds on `max / count` where
//! the rounded value steps, and the kernel compares against them.

use std::ffi::c_void;
use std::sync::Mutex;
use std::time::Instant;

use xxhash_rust::xxh3::xxh3_64;

use crate::codec::encode::choose_segments;
use crate::codec::format::Header;
use crate::codec::quant::StepRule;
use crate::codec::{Dtype, EncodeOptions, Error as CodecError, KvKind, Level, Tables};
use crate::layout::KvLayout;

use super::driver::{self, DeviceBuffer, Event, Module, Stream};
use super::{nvrtc, Gpu, GpuError};

/// The kernel source, compiled at run time (cuda/README.md).
pub const ENCODE_CU: &str = include_str!("../../cuda/encode.cu");

const TAB_STRIDE: u64 = 132;
const ERR_NONFINITE: u32 = 1;

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
    pad1: u32,
    stride_block: i64,
    stride_kv: i64,
    stride_token: i64,
    stride_head: i64,
    stride_layer: i64,
    layer_base: u64,
    alpha: u64,
    thresholds: u64,
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
    /// Host checks, descriptors, device allocation and uploads.
    pub setup_ms: f64,
    /// All kernels, by device events.
    pub kernels_ms: f64,
    /// Each kernel (rows, outliers, steps, quant, rans, sizes, sections, payload).
    pub per_kernel_ms: [f64; 8],
    /// Device-to-host copies of the containers plus header and hashes.
    pub finish_ms: f64,
}

/// GPU encoder; see the module documentation.
pub struct GpuEncoder {
    gpu: Gpu,
    _module: Module,
    f: [cudarc::driver::sys::CUfunction; 8],
    thresholds: DeviceBuffer,
    stream: Mutex<Stream>,
    /// Pinned staging for the device-to-host copy of the containers, kept
    /// between calls (pinning is slow) and grown as needed.
    staging: Mutex<Option<super::PinnedBuffer>>,
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

struct Plan {
    level: Level,
    prob_bits: u32,
    alpha: Vec<f32>,
    protect: bool,
}

fn plan(layout: &KvLayout, opts: &EncodeOptions) -> Result<Plan, GpuError> {
    let level = opts.level.unwrap_or(Level::Default);
    if level == Level::Lossless {
        return Err(GpuError::Unsupported("the lossless level (GPU encode covers the lossy levels)".into()));
    }
    if opts.plan.is_some() || opts.rules.is_some() {
        return Err(GpuError::Unsupported("custom plans or step rules".into()));
    }
    if let Tables::External(_) = opts.tables {
        return Err(GpuError::Unsupported("external table sets".into()));
    }
    let prob_bits = opts.prob_bits.unwrap_or(level.prob_bits());
    if !(8..=10).contains(&prob_bits) {
        return Err(GpuError::Invalid("prob_bits must be in 8..=10".into()));
    }
    let shape = layout.chunk_shape(1);
    let t = shape.tensors();
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
    Ok(Plan { level, prob_bits, alpha, protect: opts.protect_outliers.unwrap_or(true) })
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
        let names = ["cg_enc_rows", "cg_enc_outliers", "cg_enc_steps", "cg_enc_quant", "cg_enc_rans", "cg_enc_sizes", "cg_enc_sections", "cg_enc_payload"];
        let mut f = [std::ptr::null_mut(); 8];
        for (slot, name) in f.iter_mut().zip(names) {
            *slot = module.function(name)?;
        }
        let th = code_thresholds()?;
        let thresholds = gpu.alloc(8 * 14)?;
        thresholds.write(0, as_bytes(&th))?;
        Ok(GpuEncoder { gpu: gpu.clone(), _module: module, f, thresholds, stream: Mutex::new(Stream::new()?), staging: Mutex::new(None) })
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

        // Per-chunk geometry and the offsets of everything in the device buffers.
        let mut descs = Vec::with_capacity(chunks.len());
        let mut segs: Vec<SegDesc> = Vec::new();
        let mut ids: Vec<u32> = Vec::new();
        let (mut out_len, mut words_len, mut sym_len, mut rows, mut toks) = (0u64, 0u64, 0u64, 0u64, 0u64);
        let mut region = Vec::with_capacity(chunks.len());
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
            // Worst case: every symbol flushes a word.
            let worst = 64 + 6 * p as u64 + 4 * emax as u64 + (emax * p * c * es) as u64 + p as u64 * c as u64 * TAB_STRIDE + 4 * s as u64 + 128 * s as u64 + 2 * syms;
            if 2 * syms + 128 * s as u64 > u32::MAX as u64 || worst > u32::MAX as u64 {
                return Err(GpuError::Unsupported(format!("chunk {ci}: {tokens} tokens could exceed a 4 GiB container; use smaller chunks")));
            }
            descs.push(EChunk {
                block_ids: 4 * ids.len() as u64, // made absolute below
                out: out_len,
                words: words_len,
                sym: sym_len,
                tokens: tokens as u32,
                seg_tokens: seg_tokens as u32,
                seg_groups: seg_groups as u32,
                token_blocks: tb as u32,
                spp: spp as u32,
                seg_first: segs.len() as u32,
                row_first: rows as u32,
                tok_first: toks as u32,
                seg_words: seg_words as u32,
                segs: s as u32,
                ..Default::default()
            });
            region.push((out_len, seg_tokens, seg_groups));
            for plane in 0..p {
                for k in 0..spp {
                    segs.push(SegDesc { chunk: ci as u32, plane: plane as u32, k: k as u32 });
                }
            }
            ids.extend_from_slice(&blocks[..used]);
            out_len += worst.div_ceil(16) * 16;
            words_len += (s * seg_words) as u64;
            sym_len += syms;
            rows += (p * tokens) as u64;
            toks += tokens as u64;
        }
        if rows > u32::MAX as u64 || segs.len() as u64 > u32::MAX as u64 || toks > u32::MAX as u64 {
            return Err(GpuError::Unsupported("too many chunks in one call; split it".into()));
        }
        let n = chunks.len();
        let nt = (n * p * c) as u64;
        // The kernels index tables with u32.
        if nt > u32::MAX as u64 {
            return Err(GpuError::Unsupported("too many chunks in one call; split it".into()));
        }
        let g = &self.gpu;
        g.bind()?;
        let alloc = |len: u64| g.alloc(len as usize);
        let d_base = alloc(8 * layout.layers as u64)?;
        let d_alpha = alloc(4 * p as u64)?;
        let d_ids = alloc(4 * ids.len() as u64)?;
        for d in descs.iter_mut() {
            d.block_ids += d_ids.ptr();
        }
        let d_chunks = alloc(std::mem::size_of_val(&descs[..]) as u64)?;
        let d_segs = alloc(std::mem::size_of_val(&segs[..]) as u64)?;
        let d_info = alloc(32 * n as u64)?;
        let d_rowsq = alloc(8 * rows)?;
        let d_rownorm = alloc(8 * rows)?;
        let d_rowabs = alloc(4 * rows)?;
        let d_score = alloc(8 * toks)?;
        let d_isx = alloc(toks)?;
        let d_exact = alloc(4 * toks)?;
        let d_step = alloc(4 * (n * p) as u64)?;
        let d_sym = alloc(sym_len)?;
        let d_codes = alloc(nt * TAB_STRIDE)?;
        let d_tablen = alloc(4 * nt)?;
        let d_taboff = alloc(4 * nt)?;
        let d_words = alloc(2 * words_len)?;
        let ns = segs.len() as u64;
        let d_states = alloc(128 * ns)?;
        let d_seglen = alloc(4 * ns)?;
        let d_segn = alloc(4 * ns)?;
        let d_segoff = alloc(4 * ns)?;
        let d_out = alloc(out_len)?;

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
            },
            es: es as u32,
            block_size: bs as u32,
            protect: plan.protect as u32,
            base_pb: plan.prob_bits,
            max: 127,
            nchunks: n as u32,
            stride_block: layout.stride_block as i64,
            stride_kv: if layout.kind == KvKind::Latent { 0 } else { layout.stride_kv as i64 },
            stride_token: layout.stride_token as i64,
            stride_head: layout.stride_head as i64,
            stride_layer: layout.stride_layer as i64,
            layer_base: d_base.ptr(),
            alpha: d_alpha.ptr(),
            thresholds: self.thresholds.ptr(),
            ..Default::default()
        };
        // Rows can be read 16 bytes at a time when every row and head starts
        // 16-byte aligned and a head is a whole number of 8-element steps.
        let a16 = |v: i64| v.rem_euclid(16) == 0;
        geo.vec16 = (layout.head_dim % 8 == 0) as u32
            & (0..layout.layers).all(|l| a16(bases[l] as i64 + l as i64 * geo.stride_layer)) as u32
            & [geo.stride_block, geo.stride_kv, geo.stride_token, geo.stride_head].iter().all(|&v| a16(v)) as u32;
        let mut bufs = Bufs {
            chunks: d_chunks.ptr(),
            segs: d_segs.ptr(),
            info: d_info.ptr(),
            rowsq: d_rowsq.ptr(),
            rownorm: d_rownorm.ptr(),
            rowabs: d_rowabs.ptr(),
            score: d_score.ptr(),
            isx: d_isx.ptr(),
            exact_idx: d_exact.ptr(),
            step: d_step.ptr(),
            sym: d_sym.ptr(),
            codes: d_codes.ptr(),
            tablen: d_tablen.ptr(),
            taboff: d_taboff.ptr(),
            words: d_words.ptr(),
            states: d_states.ptr(),
            seglen: d_seglen.ptr(),
            segn: d_segn.ptr(),
            segoff: d_segoff.ptr(),
            out: d_out.ptr(),
        };
        let own = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let borrowed;
        let s: &Stream = match stream {
            Some(raw) => {
                borrowed = Stream::borrowed(raw);
                &borrowed
            }
            None => &own,
        };
        let ev: Vec<Event> = (0..9).map(|_| Event::new(true)).collect::<Result<_, _>>()?;
        // SAFETY: every destination was allocated above with at least the
        // copied length; the host sources live until the stream is synchronised below.
        unsafe {
            driver::copy_htod(d_base.ptr(), as_bytes(&bases), s)?;
            driver::copy_htod(d_alpha.ptr(), as_bytes(&plan.alpha), s)?;
            driver::copy_htod(d_ids.ptr(), as_bytes(&ids), s)?;
            driver::copy_htod(d_chunks.ptr(), as_bytes(&descs), s)?;
            driver::copy_htod(d_segs.ptr(), as_bytes(&segs), s)?;
            driver::memset(d_info.ptr(), 0, 32 * n, s)?;
        }
        let setup_ms = t_setup.elapsed().as_secs_f64() * 1e3;
        ev[0].record(s)?;
        let max_t = chunks.iter().map(|c| c.1).max().unwrap_or(1) as u32;
        let n32 = n as u32;
        let mut params = [&mut geo as *mut Geo as *mut c_void, &mut bufs as *mut Bufs as *mut c_void];
        let launches: [((u32, u32, u32), u32); 8] = [
            (((p as u32 * max_t).div_ceil(128), n32, 1), 128),
            ((n32, 1, 1), 256),
            (((p as u32).div_ceil(128), n32, 1), 128),
            ((groups as u32, p as u32, n32), 256),
            ((segs.len() as u32, 1, 1), 32),
            ((n32, 1, 1), 1024),
            ((64, n32, 1), 256),
            ((segs.len() as u32, 1, 1), 128),
        ];
        for (k, (f, (grid, block))) in self.f.iter().zip(launches).enumerate() {
            // SAFETY: every kernel takes (Geo, Bufs) by value; the buffers
            // above are sized for the indices the kernels compute from them.
            unsafe { driver::launch(*f, grid, (block, 1, 1), 0, s, &mut params)? };
            ev[k + 1].record(s)?;
        }
        ev[8].sync()?;
        let kernels_ms = ev[8].since(&ev[0])? as f64;
        let mut per_kernel_ms = [0f64; 8];
        for (k, slot) in per_kernel_ms.iter_mut().enumerate() {
            *slot = ev[k + 1].since(&ev[k])? as f64;
        }
        let t_finish = Instant::now();
        let mut info = vec![0u8; 32 * n];
        d_info.read(0, &mut info)?;
        let word = |ci: usize, k: usize| u32::from_le_bytes(info[32 * ci + 4 * k..32 * ci + 4 * k + 4].try_into().unwrap());
        // Sizes and errors first; then every container into pinned memory
        // (one asynchronous copy each, exact length), then header and hashes
        // on all cores.
        let mut at = Vec::with_capacity(n);
        let mut staged = 0usize;
        for ci in 0..n {
            let err = word(ci, 0);
            if err & ERR_NONFINITE != 0 {
                return Err(GpuError::Codec { chunk: ci, source: CodecError::NonFinite });
            }
            if err != 0 {
                return Err(GpuError::Driver(format!("chunk {ci}: encode kernel error bits {err:#x}")));
            }
            at.push(staged);
            staged += word(ci, 6) as usize;
        }
        let mut pin = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if pin.as_ref().map_or(true, |b| b.len() < staged) {
            *pin = None;
            *pin = Some(g.alloc_pinned(staged)?);
        }
        let host = pin.as_mut().expect("allocated above").as_mut_slice();
        for ci in 0..n {
            let total = word(ci, 6) as usize;
            let dst = &mut host[at[ci]..at[ci] + total];
            let src = d_out.ptr() + region[ci].0;
            // SAFETY: the device range lies in the chunk's region of d_out
            // (total <= its worst case); dst is pinned and outlives the sync below.
            driver::call("cuMemcpyDtoHAsync", || unsafe { cudarc::driver::result::memcpy_dtoh_async(dst, src, s.raw) })?;
        }
        driver::call("cuStreamSynchronize", || unsafe { cudarc::driver::result::stream::synchronize(s.raw) })?;
        let host: &[u8] = host;
        let finish_one = |ci: usize| -> Vec<u8> {
            let tokens = chunks[ci].1;
            let (exact, prob_bits, tables_len, payload_len, total) = (word(ci, 2) as usize, word(ci, 3), word(ci, 4) as usize, word(ci, 5) as usize, word(ci, 6) as usize);
            let (_, seg_tokens, seg_groups) = region[ci];
            let mut bytes = Vec::with_capacity(total + 8);
            bytes.extend_from_slice(&host[at[ci]..at[ci] + total]);
            let tables_at = 64 + 6 * p + 4 * exact + exact * p * c * es;
            let header = Header {
                flags: 0,
                dtype: layout.dtype,
                shape: layout.chunk_shape(tokens),
                level: plan.level.number(),
                prob_bits,
                seg_tokens,
                seg_groups,
                table_id: xxh3_64(&bytes[tables_at..tables_at + tables_len]),
                planes: p,
                scales_len: 2 * p,
                tables_len,
                segments: descs[ci].segs as usize,
                payload_len,
                exact_tokens: exact,
            };
            let mut h = Vec::with_capacity(64);
            header.write(&mut h);
            bytes[..64].copy_from_slice(&h);
            let sum = xxh3_64(&bytes);
            bytes.extend_from_slice(&sum.to_le_bytes());
            bytes
        };
        let threads = std::thread::available_parallelism().map_or(1, |t| t.get()).min(n);
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); n];
        if threads <= 1 {
            for (ci, o) in out.iter_mut().enumerate() {
                *o = finish_one(ci);
            }
        } else {
            let per = n.div_ceil(threads);
            std::thread::scope(|sc| {
                for (k, part) in out.chunks_mut(per).enumerate() {
                    let f = &finish_one;
                    sc.spawn(move || {
                        for (j, o) in part.iter_mut().enumerate() {
                            *o = f(k * per + j);
                        }
                    });
                }
            });
        }
        drop(pin);
        let finish_ms = t_finish.elapsed().as_secs_f64() * 1e3;
        drop(own);
        Ok((out, EncodeTimings { setup_ms, kernels_ms, per_kernel_ms, finish_ms }))
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

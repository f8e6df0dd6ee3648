//! The fused GPU decoder: `.cg` containers to an engine's paged KV blocks.
//!
//! Two steps, so that host work and copies can be placed where the caller
//! wants them:
//!
//! 1. [`GpuDecoder::stage`] (host only): validates every container as the
//!    CPU decoder does (`Container::parse`: header, checksum, sections,
//!    scales, and every table check, without building the tables: the
//!    kernel normalises them) plus the per-segment checks that are cheap on
//!    the host (FORMAT.md 2.2 items 33 and 34), and lays the containers and
//!    small descriptors (segment offsets, table offsets, plane parameters)
//!    out in pinned host memory, in batches. A corrupt container is rejected
//!    here, before anything is launched.
//! 2. [`GpuDecoder::decode_staged`]: copies each batch to the device on a
//!    copy stream while the previous batch decodes, launches the fused kernel
//!    per batch (one warp per segment: rANS with one lane per channel, the
//!    lane's table normalised and expanded into a shared-memory lookup,
//!    dequantization, and the store into the paged block through the layout)
//!    and a small kernel that writes the exact (outlier) token rows, then
//!    waits and checks the device-side error flags (items 35 and 36).
//!
//! [`GpuDecoder::decode_into`] does both. [`GpuDecoder::decode_layered`]
//! is the stream-ordered variant for engines: it enqueues the decode layer by
//! layer on the engine's stream and returns one CUDA event per layer
//! ([`LayerEvents`]) without waiting. The output is bit-identical to
//! `codec::decode` + `KvLayout::scatter` (tests/gpu_decode.rs).
//!
//! Streams that reference a model's table set (`Tables::External`) decode
//! from the set's prebuilt lookups on the device ([`GpuDecoder::upload_tables`],
//! [`GpuDecoder::stage_with_tables`]). FP8 (E4M3) chunks decode into fp8
//! blocks, converted on the device exactly as `codec::fp8::f32_to_e4m3`.

use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;

use crate::codec::decode::check_scales;
use crate::codec::encode::walk_patches;
use crate::codec::format::{self, PlaneKind};
use crate::codec::rans::RANS_L;
use crate::codec::{DecodeLimits, Dtype, Error as CodecError, KvShape, TableSet};
use crate::layout::KvLayout;

use super::driver::{self, DeviceBuffer, Event, Module, PinnedBuffer, Stream};
use super::{nvrtc, Gpu, GpuError};

/// A block id that means "do not write" (SKIP_BLOCK in cuda/decode.cu): a
/// chunk's leading tokens that the engine already holds map to it.
pub const SKIP_BLOCK: u32 = u32::MAX;

/// The kernel source, compiled at run time (cuda/README.md).
pub const DECODE_CU: &str = include_str!("../../cuda/decode.cu");

// Mirrors of the structs in cuda/decode.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct ChunkDesc {
    bytes: u64,
    tokens: u32,
    heads: u32,
    head_dim: u32,
    channels: u32,
    seg_tokens: u32,
    seg_groups: u32,
    groups: u32,
    token_blocks: u32,
    prob_bits: u32,
    planes_per_tensor: u32,
    streams: u32,
    exact_n: u32,
    scales_off: u32,
    exact_idx_off: u32,
    exact_rows_off: u32,
    plane_first: u32,
    tab_first: u32,
    index: u32,
    dtype_size: u32,
    is_bf16: u32,
    tensors: u32,
    /// 1: the chunk's tables come from its table set (FROM_SET entries in `tab`).
    external: u32,
    /// The set's symbol rows per block, and where its lookups start, in u32
    /// words from the call's lowest set address: a call may mix chunks of
    /// several sets (an adaptive load's levels).
    set_kmax: u32,
    set_off: u32,
}

// cuda/decode.cu's `Chunk` is 104 bytes.
const _: () = assert!(std::mem::size_of::<ChunkDesc>() == 104);

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct PlaneDesc {
    group: u32,
    asym: u32,
    max: u32,
    scale_start: u32,
    byte_shift: u32,
    shared: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct SegDesc {
    chunk: u32,
    plane: u32,
    k: u32,
    off: u32,
    nwords: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default, Debug)]
struct DestDesc {
    layer_base: u64,
    block_ids: u64,
    block_first: u64,
    stride_block: i64,
    stride_kv: i64,
    stride_token: i64,
    stride_head: i64,
    stride_layer: i64,
    block_size: u32,
    pad: u32,
}

fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: T is a plain #[repr(C)] struct of integers (no padding is read uninitialised:
    // every struct here is made of u32/u64 fields with explicit padding).
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// One container, validated, with its device descriptors.
#[derive(Clone)]
struct Prep {
    desc: ChunkDesc,
    planes: Vec<PlaneDesc>,
    segs: Vec<SegDesc>,
    tab: Vec<u32>,
    payload_start: usize,
    shape: KvShape,
    dtype: Dtype,
    symbols: u64,
    /// Most non-zero symbols in one of the chunk's tables (sizes the kernel's per-symbol lookup).
    max_nz: u32,
    /// The table set an external-tables chunk reads.
    tables: Option<GpuTableSet>,
}

fn codec_err(chunk: usize) -> impl Fn(CodecError) -> GpuError {
    move |source| GpuError::Codec { chunk, source }
}

/// `tab` entry of a channel whose table comes from the table set (FROM_SET in cuda/decode.cu).
const FROM_SET: u32 = u32::MAX;

/// The `tab` entries of a chunk with external tables, from one entry per
/// (plane, channel) (`FROM_SET` or a patch's offset): one entry per (plane,
/// 32-channel group), `FROM_SET` when no lane of the group is patched, else
/// the index (from the chunk's first entry) of the group's 32 lane entries
/// that follow. A 32K-token Llama-shaped request then stages 8 KiB per chunk
/// instead of 256 KiB of mostly `FROM_SET` entries.
fn patch_index(full: &[u32], planes: usize, channels: usize) -> Vec<u32> {
    let groups = channels.div_ceil(32);
    let mut out = vec![FROM_SET; planes * groups];
    for p in 0..planes {
        for g in 0..groups {
            let lanes = &full[p * channels + 32 * g..p * channels + (32 * g + 32).min(channels)];
            if lanes.iter().any(|&o| o != FROM_SET) {
                out[p * groups + g] = out.len() as u32;
                out.extend_from_slice(lanes);
                out.resize(out.len() + 32 - lanes.len(), FROM_SET);
            }
        }
    }
    out
}

/// Symbol rows of a table set's lookups kept in shared memory (the most
/// frequent first); rarer rows are read from global memory. Calibrated sets
/// cover each channel's widened support (up to 128 symbols in an 8-bit set,
/// more in a 9-bit one), which in shared memory would cut the resident warps
/// by a third or more.
const SET_SHARED_ROWS: u32 = 64;

/// [`SET_SHARED_ROWS`], or CACHEGEN_SET_SHARED_ROWS (a development knob, 1..=256).
fn set_shared_rows() -> u32 {
    static ROWS: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *ROWS.get_or_init(|| std::env::var("CACHEGEN_SET_SHARED_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(SET_SHARED_ROWS).clamp(1, 256))
}

/// Check the compact table at `pos` of `tb` (the checks of table::read_compact
/// and table::table_from_codes that need no normalisation) and return its
/// number of non-zero symbols and its length in bytes.
fn check_compact(tb: &[u8], pos: usize, nsym: usize, half: u32) -> Result<(u32, usize), CodecError> {
    let truncated = || CodecError::Corrupt("table section truncated");
    let head = tb.get(pos..pos + 2).ok_or_else(truncated)?;
    let (lo, n) = (head[0] as usize, head[1] as usize + 1);
    if lo + n > nsym {
        return Err(CodecError::Corrupt("table covers symbols outside the plane's alphabet"));
    }
    // Non-zero symbols: codes other than 0 (table::WEIGHT_OF_CODE).
    let codes = tb.get(pos + 2..pos + 2 + n.div_ceil(2)).ok_or_else(truncated)?;
    if n % 2 == 1 && codes[n / 2] & 15 != 0 {
        return Err(CodecError::Corrupt("table padding nibble is not zero"));
    }
    let nz: u32 = codes.iter().map(|&b| (b >> 4 != 0) as u32 + (b & 15 != 0) as u32).sum();
    if nz == 0 {
        return Err(CodecError::Corrupt("frequency table has no symbol"));
    }
    if nz > half {
        return Err(CodecError::Corrupt("frequency table has more symbols than prob_bits allows"));
    }
    Ok((nz, 2 + n.div_ceil(2)))
}

fn prepare(bytes: &[u8], index: usize, limits: DecodeLimits, set: Option<&SetInfo>) -> Result<Prep, GpuError> {
    let err = codec_err(index);
    if bytes.len() > u32::MAX as usize {
        return Err(GpuError::Unsupported("containers of 4 GiB or more".into()));
    }
    // The CPU decoder's checks (Container::parse) except building the
    // tables: the kernel normalises each table itself, and the walk below
    // applies every check that building them would (table::read_compact,
    // table::table_from_codes).
    let lay = format::parse(bytes, limits.max_output_bytes).map_err(&err)?;
    let external = lay.header.external_tables();
    if external {
        // The checks of Container::parse for a stream that references a set.
        let set = set.ok_or_else(|| err(CodecError::MissingTables(lay.header.table_id)))?;
        if set.id != lay.header.table_id {
            return Err(err(CodecError::WrongTables { got: set.id, want: lay.header.table_id }));
        }
        if set.plan != lay.planes || set.channels != lay.header.shape.channels() || set.prob_bits != lay.header.prob_bits {
            return Err(err(CodecError::Corrupt("table set does not match the stream's planes")));
        }
    }
    check_scales(bytes, &lay).map_err(&err)?;
    let h = &lay.header;
    let shape = h.shape;
    let channels = shape.channels();
    let e = h.dtype.size();
    let per_tensor = lay.planes.len() / shape.tensors();
    // Planes and their scale offsets.
    let mut planes = Vec::with_capacity(lay.planes.len());
    let mut scale_start = 0usize;
    for p in &lay.planes {
        planes.push(match p {
            PlaneKind::Quantized(q) => PlaneDesc {
                group: q.group.code() as u32,
                asym: q.asymmetric as u32,
                max: q.max as u32,
                scale_start: scale_start as u32,
                ..Default::default()
            },
            PlaneKind::Raw { index, shared } => PlaneDesc { byte_shift: (e - 1 - *index as usize) as u32, shared: *shared as u32, ..Default::default() },
        });
        scale_start += p.scale_values(&shape);
    }
    let tb = &bytes[lay.tables.clone()];
    let half = 1u32 << (h.prob_bits - 1);
    let mut tab = Vec::with_capacity(lay.planes.len() * channels);
    let mut max_nz = 1u32;
    if external {
        // The patch section (encode::walk_patches, as encode::apply_patches
        // reads it). Unpatched channels read the set's prebuilt lookups.
        let set = set.expect("checked above");
        max_nz = set.kmax.min(set_shared_rows());
        tab.resize(lay.planes.len() * channels, FROM_SET);
        walk_patches(tb, &lay.planes, channels, |plane, k, pos| {
            let p = &lay.planes[plane];
            let (nz, len) = check_compact(tb, pos, p.nsym(), half)?;
            max_nz = max_nz.max(nz);
            let at = (lay.tables.start + pos) as u32;
            if p.tables(channels) == channels {
                tab[plane * channels + k] = at;
            } else {
                // One table for the plane: every channel uses the patch.
                tab[plane * channels..(plane + 1) * channels].fill(at);
            }
            Ok(pos + len)
        })
        .map_err(&err)?;
        tab = patch_index(&tab, lay.planes.len(), channels);
    } else {
        // Table offsets, and the checks of table::read_compact and
        // table::table_from_codes.
        let mut pos = 0usize;
        for p in &lay.planes {
            let first = tab.len();
            let nsym = p.nsym();
            for j in 0..p.tables(channels) {
                let (nz, len) = check_compact(tb, pos, nsym, half).map_err(&err)?;
                if j == 0 || p.tables(channels) == channels {
                    tab.push((lay.tables.start + pos) as u32);
                }
                max_nz = max_nz.max(nz);
                pos += len;
            }
            // Shared tables: every channel uses the plane's one table.
            let t0 = tab[first];
            tab.resize(first + channels, t0);
        }
        if pos != tb.len() {
            return Err(err(CodecError::Corrupt("table section has trailing bytes")));
        }
    }
    // Segments, with the checks that need no decoding (items 33 and 34).
    let spp = h.segments_per_plane();
    let mut segs = Vec::with_capacity(lay.segments.len());
    let mut symbols = 0u64;
    for (s, &(a, b)) in lay.segments.iter().enumerate() {
        let (plane, k) = (s / spp, s % spp);
        let geo = h.segment_geometry(k);
        let lanes = geo.lanes();
        let words = b - a - 4 * lanes; // format::parse checked b - a >= 4 * lanes
        if words % 2 != 0 {
            return Err(err(CodecError::Corrupt("segment length does not match its lanes")));
        }
        for l in 0..lanes {
            let x = u32::from_le_bytes(bytes[a + 4 * l..a + 4 * l + 4].try_into().unwrap());
            if x < RANS_L {
                return Err(err(CodecError::Corrupt("rANS state below its normalised range")));
            }
        }
        symbols += geo.symbols() as u64;
        segs.push(SegDesc { chunk: 0, plane: plane as u32, k: k as u32, off: a as u32, nwords: (words / 2) as u32 });
    }
    let payload_start = lay.segments.first().map(|s| s.0).unwrap_or(0);
    let n_exact = lay.exact_tokens.len();
    let desc = ChunkDesc {
        bytes: 0,
        tokens: shape.tokens as u32,
        heads: shape.heads as u32,
        head_dim: shape.head_dim as u32,
        channels: channels as u32,
        seg_tokens: h.seg_tokens as u32,
        seg_groups: h.seg_groups as u32,
        groups: h.groups() as u32,
        token_blocks: shape.tokens.div_ceil(h.seg_tokens) as u32,
        prob_bits: h.prob_bits,
        planes_per_tensor: per_tensor as u32,
        streams: shape.kind.streams() as u32,
        exact_n: n_exact as u32,
        scales_off: lay.scales.start as u32,
        exact_idx_off: (lay.exact_rows.start - 4 * n_exact) as u32,
        exact_rows_off: lay.exact_rows.start as u32,
        plane_first: 0,
        tab_first: 0,
        index: index as u32,
        dtype_size: e as u32,
        is_bf16: (h.dtype == Dtype::Bf16) as u32,
        tensors: shape.tensors() as u32,
        external: external as u32,
        set_kmax: 0,
        set_off: 0,
    };
    Ok(Prep { desc, planes, segs, tab, payload_start, shape, dtype: h.dtype, symbols, max_nz: max_nz.min(256), tables: None })
}

/// [`prepare`] against a table set on the device: the result keeps the set
/// when the chunk references it (the kernel launch needs its lookups).
fn prepare_with(bytes: &[u8], index: usize, limits: DecodeLimits, tables: Option<&GpuTableSet>) -> Result<Prep, GpuError> {
    let mut prep = prepare(bytes, index, limits, tables.map(|t| &t.inner.info))?;
    if prep.desc.external != 0 {
        prep.tables = tables.cloned();
    }
    Ok(prep)
}

/// A model's table set ([`TableSet`]) on the device, as prebuilt lookups:
/// chunks that reference it by id skip both the tables' bytes (smaller
/// copies) and the per-chunk normalisation (the kernel copies a (plane,
/// 32-channel group)'s lookups into shared memory instead of building them).
/// Upload it once per model namespace with [`GpuDecoder::upload_tables`];
/// cheap to clone.
#[derive(Clone)]
pub struct GpuTableSet {
    inner: Arc<TableSetInner>,
}

struct TableSetInner {
    info: SetInfo,
    luts: DeviceBuffer,
}

/// What the host checks of a chunk need to know of a table set.
#[derive(Clone, Debug)]
pub(crate) struct SetInfo {
    pub(crate) id: u64,
    pub(crate) plan: Vec<PlaneKind>,
    pub(crate) channels: usize,
    pub(crate) prob_bits: u32,
    /// Most non-zero symbols in one of the set's tables.
    pub(crate) kmax: u32,
}

impl GpuTableSet {
    /// The set's id (what streams store as `table_id`).
    pub fn id(&self) -> u64 {
        self.inner.info.id
    }
    /// Most non-zero symbols in one of the set's tables.
    pub fn max_table_symbols(&self) -> u32 {
        self.inner.info.kmax
    }
    /// Device bytes of the prebuilt lookups.
    pub fn device_bytes(&self) -> usize {
        self.inner.luts.len()
    }
    fn ptr(&self) -> u64 {
        self.inner.luts.ptr()
    }
}

/// The kernel's lookups for every (plane, 32-channel group) of `set`, in the
/// shared-memory layout of `build_lut` (cuda/decode.cu): per block, 2^pb / 4
/// slot words then `kmax` symbol rows, each lane-interleaved (word `w` of lane
/// `j` at `w * 32 + j`). Returns the words and `kmax`.
pub(crate) fn set_lookups(set: &TableSet) -> Result<(Vec<u32>, u32), GpuError> {
    let tables = set.tables().map_err(|source| GpuError::Codec { chunk: 0, source })?;
    let channels = set.channels;
    let m = 1usize << set.prob_bits;
    let kmax = tables.iter().flatten().map(|t| t.freq.iter().filter(|&&f| f > 0).count()).max().unwrap_or(1).max(1);
    if kmax > 256 || m > 1 << 13 {
        return Err(GpuError::Unsupported("table sets with more than 256 symbols or over 13 probability bits".into()));
    }
    let groups = channels.div_ceil(32);
    let slw = 32 * m / 4;
    let block = slw + 32 * kmax;
    let mut out = vec![0u32; set.plan.len() * groups * block];
    for (p, plane) in set.plan.iter().enumerate() {
        let per_channel = plane.tables(channels) == channels;
        for g in 0..groups {
            let b = &mut out[(p * groups + g) * block..][..block];
            for j in 0..32 {
                let c = 32 * g + j;
                if c >= channels {
                    continue; // idle lane: slot 0 -> row 0 (zero), never read for output
                }
                let t = &tables[p][if per_channel { c } else { 0 }];
                // Rows by falling frequency (ties: by symbol), so that the
                // kernel keeps the frequent ones in shared memory and reads
                // the rare ones (row >= SET_SHARED_ROWS) from global memory.
                let mut order: Vec<usize> = (0..t.freq.len()).filter(|&i| t.freq[i] > 0).collect();
                order.sort_by_key(|&i| (std::cmp::Reverse(t.freq[i]), i));
                let mut row = vec![0usize; t.freq.len()];
                for (q, &i) in order.iter().enumerate() {
                    row[i] = q;
                }
                let mut cum = 0usize;
                for (i, &f) in t.freq.iter().enumerate() {
                    let f = f as usize;
                    if f == 0 {
                        continue;
                    }
                    if f > 0x7FF {
                        return Err(GpuError::Unsupported("a table set frequency above 2047 (the kernel's field)".into()));
                    }
                    let (sym, q) = (t.lo as usize + i, row[i]);
                    b[slw + q * 32 + j] = (sym | f << 8 | cum << 19) as u32;
                    for s in cum..cum + f {
                        b[(s >> 2) * 32 + j] |= (q as u32) << ((s & 3) * 8);
                    }
                    cum += f;
                }
                if cum != m {
                    return Err(GpuError::Codec { chunk: 0, source: CodecError::Corrupt("table set frequencies do not sum to 2^prob_bits") });
                }
            }
        }
    }
    Ok((out, kmax as u32))
}

/// One container checked for the device, owning its bytes: everything
/// [`GpuDecoder::stage`] checks, done once, where the bytes arrive (the
/// connector's fetch threads), so that staging is only a copy.
pub struct PreparedChunk {
    bytes: Bytes,
    prep: Prep,
}

impl PreparedChunk {
    /// Check `bytes` as [`GpuDecoder::stage`] does (header, checksum,
    /// sections, scales, table structure, lane states).
    /// Takes the bytes without copying them (a `Vec` or shared `Bytes`).
    pub fn new(bytes: impl Into<Bytes>, limits: DecodeLimits) -> Result<PreparedChunk, GpuError> {
        PreparedChunk::with_tables(bytes, limits, None)
    }
    /// [`PreparedChunk::new`] for a container that may reference `tables`
    /// (a model's table set on the device) instead of embedding its own.
    pub fn with_tables(bytes: impl Into<Bytes>, limits: DecodeLimits, tables: Option<&GpuTableSet>) -> Result<PreparedChunk, GpuError> {
        let bytes = bytes.into();
        let prep = prepare_with(&bytes, 0, limits, tables)?;
        Ok(PreparedChunk { bytes, prep })
    }
    /// The container's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
    /// Shape of the KV it holds.
    pub fn shape(&self) -> KvShape {
        self.prep.shape
    }
    /// Element type of the KV it holds.
    pub fn dtype(&self) -> Dtype {
        self.prep.dtype
    }
}

/// A batch of chunks inside a [`Staged`] image: copied and decoded together.
#[derive(Clone, Debug)]
struct Batch {
    off: usize,
    len: usize,
    chunks_off: usize,
    planes_off: usize,
    segs_off: usize,
    tab_off: usize,
    nchunks: u32,
    nsegs: u32,
    max_prob_bits: u32,
    /// Most non-zero symbols in a table of the batch.
    kmax: u32,
    /// Largest (tensors x exact tokens x channels) of a chunk: 0 = no exact tokens.
    exact_work: u64,
    /// The batch's segments are ordered by layer: those of layer `l` are
    /// `layer_first[l]..layer_first[l + 1]`.
    layer_first: Vec<u32>,
}

static NEXT_STAGED: AtomicU64 = AtomicU64::new(1);

/// Containers validated and laid out for the device in pinned host memory
/// ([`GpuDecoder::stage`]). Reusable: decode it as often as needed.
pub struct Staged {
    id: u64,
    /// The pinned image (`len` bytes used); returned to the decoder's pool on drop.
    image: Option<PinnedBuffer>,
    len: usize,
    pool: Weak<Mutex<Vec<PinnedBuffer>>>,
    batches: Vec<Batch>,
    shapes: Vec<(KvShape, Dtype)>,
    compressed: usize,
    symbols: u64,
    /// The table sets of its external-tables chunks (kept on the device while staged).
    _tables: Vec<GpuTableSet>,
    /// The lowest of their addresses (chunks hold offsets from it).
    set_base: u64,
}

impl Staged {
    /// Number of chunks.
    pub fn chunks(&self) -> usize {
        self.shapes.len()
    }
    /// Bytes of the containers.
    pub fn compressed_bytes(&self) -> usize {
        self.compressed
    }
    /// Bytes copied to the device (containers plus descriptors).
    pub fn staged_bytes(&self) -> usize {
        self.len
    }
    fn bytes(&self) -> &[u8] {
        &self.image.as_ref().expect("the image lives until drop").as_slice()[..self.len]
    }
    /// Symbols (coded values) in all chunks.
    pub fn symbols(&self) -> u64 {
        self.symbols
    }
    /// Most non-zero symbols in one table of a batch (sets the kernel's
    /// shared memory per warp: cuda/README.md).
    pub fn max_table_symbols(&self) -> u32 {
        self.batches.iter().map(|b| b.kmax).max().unwrap_or(0)
    }
    /// Bytes written to the KV blocks (elements x element size).
    pub fn output_bytes(&self) -> u64 {
        self.shapes.iter().map(|(s, d)| (s.elems() * d.size()) as u64).sum()
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Back to the decoder's pool, which keeps the two largest images.
        if let (Some(img), Some(pool)) = (self.image.take(), self.pool.upgrade()) {
            let mut pool = pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.push(img);
            pool.sort_by_key(|b| std::cmp::Reverse(b.len()));
            pool.truncate(2);
        }
    }
}

/// Device-side time of one decode call, from CUDA events on the compute stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timings {
    /// From the start of the call's first copy to the end of its last kernel.
    pub gpu_ms: f32,
}

struct State {
    region: Option<DeviceBuffer>,
    dest: Option<DeviceBuffer>,
    dest_host: Option<PinnedBuffer>,
    errors: Option<DeviceBuffer>,
    copy: Stream,
    own: Stream,
    /// Second compute stream: every other batch of a one-launch decode runs
    /// on it, so that a batch's kernel fills the SMs its predecessor's tail
    /// leaves idle (`fork`/`join` order it inside the call's stream).
    aux: Stream,
    fork: Event,
    join: Event,
    batch_events: Vec<Event>,
    start: Event,
    end: Event,
    resident: u64,
    /// A layered decode may still run (`end` is recorded after it).
    pending: bool,
}

/// How `GpuDecoder::launch` runs: `upload` copies the staged containers to
/// the device first (else they must be resident), `layered` enqueues the
/// decode layer by layer with one event per layer and returns without
/// waiting, `after` is a raw `CUevent` the decode waits for on the device.
#[derive(Clone, Copy)]
struct LaunchMode {
    upload: bool,
    layered: bool,
    after: Option<u64>,
}

/// What a layered launch leaves running: one event per layer and the
/// call's own device error flags.
type LayeredWork = (Vec<Event>, DeviceBuffer);

/// Decodes containers on one GPU into paged KV blocks. Thread-safe; calls
/// are serialised.
pub struct GpuDecoder {
    gpu: Gpu,
    _module: Module,
    f_decode: cudarc::driver::sys::CUfunction,
    f_exact: cudarc::driver::sys::CUfunction,
    state: Mutex<State>,
    /// Pinned images of finished calls, reused by `stage` (at most two).
    pinned_pool: Arc<Mutex<Vec<PinnedBuffer>>>,
    smem_extra: u32,
    max_warps: u32,
    /// Target bytes of containers per batch (copy/decode overlap granularity).
    pub batch_bytes: usize,
}

// SAFETY: CUfunction handles are usable from any thread with the context current.
unsafe impl Send for GpuDecoder {}
unsafe impl Sync for GpuDecoder {}

impl GpuDecoder {
    /// Compile the kernels for this device and set up streams.
    pub fn new(gpu: &Gpu) -> Result<GpuDecoder, GpuError> {
        gpu.bind()?;
        let (maj, min) = gpu.compute_capability();
        // Development knobs: CACHEGEN_CUDA_SRC (a kernel source file to use
        // instead of the embedded one, with the same interface) and
        // CACHEGEN_NVRTC_OPTS (extra NVRTC options, space separated).
        let src = match std::env::var("CACHEGEN_CUDA_SRC") {
            Ok(p) => std::fs::read_to_string(&p).map_err(|e| GpuError::Compile(format!("CACHEGEN_CUDA_SRC={p}: {e}")))?,
            Err(_) => DECODE_CU.to_string(),
        };
        let extra: Vec<String> = std::env::var("CACHEGEN_NVRTC_OPTS").map(|o| o.split_whitespace().map(String::from).collect()).unwrap_or_default();
        let (cubin, _log) = nvrtc::compile(&src, "decode.cu", maj, min, &extra)?;
        let module = Module::load(&cubin)?;
        let f_decode = module.function("cg_decode")?;
        let f_exact = module.function("cg_exact")?;
        driver::set_max_dynamic_smem(f_decode, gpu.inner.smem_optin)?;
        let state = State {
            region: None,
            dest: None,
            dest_host: None,
            errors: None,
            copy: Stream::new()?,
            own: Stream::new()?,
            aux: Stream::new()?,
            fork: Event::new(false)?,
            join: Event::new(false)?,
            batch_events: Vec::new(),
            start: Event::new(true)?,
            end: Event::new(true)?,
            resident: 0,
            pending: false,
        };
        let knob = |name: &str, default: u32| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
        Ok(GpuDecoder {
            gpu: gpu.clone(),
            _module: module,
            f_decode,
            f_exact,
            state: Mutex::new(state),
            pinned_pool: Arc::new(Mutex::new(Vec::new())),
            // 256 bytes per warp for the word ring (SMEM_EXTRA in decode.cu).
            smem_extra: knob("CACHEGEN_SMEM_EXTRA", 256),
            max_warps: knob("CACHEGEN_MAX_WARPS", 8).max(1),
            // 32 MB: at 32K tokens on an H200, copy and decode end 0.3 ms
            // sooner than with 48 MB for about 1% more kernel time; at 24 MB
            // the embedded-table kernels take 20% longer (docs/BENCHMARKS.md,
            // "Decoder batch size").
            batch_bytes: 32 << 20,
        })
    }

    /// The device.
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// Warps per block of the decode kernel for a warp's shared memory of
    /// `per_warp` bytes: the most warps per SM that shared memory allows
    /// (an SM holds the opt-in block maximum plus 1 KiB reserved per block).
    fn warps_per_block(&self, per_warp: u32) -> u32 {
        let optin = self.gpu.inner.smem_optin.max(0) as u32;
        let sm = optin + 1024;
        let mut best = (0u32, 1u32);
        for w in 1..=self.max_warps {
            if w * per_warp > optin {
                break;
            }
            let resident = sm / (w * per_warp + 1024) * w;
            if resident >= best.0 {
                best = (resident, w);
            }
        }
        best.1
    }

    /// Shared memory per warp for tables of `prob_bits` with at most `kmax`
    /// non-zero symbols: 32 lanes x (2^prob_bits one-byte slot entries +
    /// `kmax` u32 symbol entries), plus `smem_extra` bytes (the kernel's
    /// word ring; CACHEGEN_SMEM_EXTRA overrides it for kernel variants
    /// built with a matching -DSMEM_EXTRA).
    fn smem_per_warp(&self, prob_bits: u32, kmax: u32) -> u32 {
        (32u32 << prob_bits) + 128 * kmax + self.smem_extra
    }

    /// Put a model's table set on the device as prebuilt lookups, for
    /// chunks encoded with `Tables::External(set)`. Keep the result for as
    /// long as such chunks are decoded (one per model namespace).
    pub fn upload_tables(&self, set: &TableSet) -> Result<GpuTableSet, GpuError> {
        let (words, kmax) = set_lookups(set)?;
        self.gpu.bind()?;
        let luts = self.gpu.alloc((words.len() * 4).max(16))?;
        luts.write(0, as_bytes(&words))?;
        Ok(GpuTableSet {
            inner: Arc::new(TableSetInner { info: SetInfo { id: set.id(), plan: set.plan.clone(), channels: set.channels, prob_bits: set.prob_bits, kmax }, luts }),
        })
    }

    /// Validate `chunks` on the host and lay them out in pinned memory
    /// (uses all CPU cores). Errors name the first bad chunk; nothing is
    /// launched.
    pub fn stage(&self, chunks: &[&[u8]]) -> Result<Staged, GpuError> {
        self.stage_with_tables(chunks, None)
    }

    /// [`GpuDecoder::stage`] for containers that may reference `tables` (a
    /// model's table set uploaded with [`GpuDecoder::upload_tables`]).
    pub fn stage_with_tables(&self, chunks: &[&[u8]], tables: Option<&GpuTableSet>) -> Result<Staged, GpuError> {
        if chunks.is_empty() {
            return Err(GpuError::Invalid("no chunks".into()));
        }
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(chunks.len());
        let mut preps: Vec<Option<Result<Prep, GpuError>>> = (0..chunks.len()).map(|_| None).collect();
        std::thread::scope(|s| {
            for (t, part) in preps.chunks_mut(chunks.len().div_ceil(threads)).enumerate() {
                let base = t * chunks.len().div_ceil(threads);
                s.spawn(move || {
                    for (j, slot) in part.iter_mut().enumerate() {
                        *slot = Some(prepare_with(chunks[base + j], base + j, DecodeLimits::default(), tables));
                    }
                });
            }
        });
        let preps: Vec<Prep> = preps.into_iter().map(|p| p.unwrap()).collect::<Result<_, _>>()?;
        self.assemble(preps, chunks)
    }

    /// [`GpuDecoder::stage`] for containers already checked by
    /// [`PreparedChunk::new`] (e.g. as each was fetched): only the layout in
    /// pinned memory is left to do.
    pub fn stage_prepared(&self, chunks: &[&PreparedChunk]) -> Result<Staged, GpuError> {
        if chunks.is_empty() {
            return Err(GpuError::Invalid("no chunks".into()));
        }
        let preps: Vec<Prep> = chunks
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut p = c.prep.clone();
                p.desc.index = i as u32;
                p
            })
            .collect();
        let bytes: Vec<&[u8]> = chunks.iter().map(|c| c.bytes()).collect();
        self.assemble(preps, &bytes)
    }

    /// Batches, offsets and the pinned image of checked containers.
    fn assemble(&self, mut preps: Vec<Prep>, chunks: &[&[u8]]) -> Result<Staged, GpuError> {
        let t0 = std::time::Instant::now();
        // The sets the chunks read (kept on the device while staged). The
        // kernel takes the lowest set address as a read-only parameter and
        // each chunk its set's offset from it (a pointer in the descriptor
        // made the kernel's loads of it slower).
        let mut tables: Vec<GpuTableSet> = Vec::new();
        for p in &preps {
            if let Some(t) = &p.tables {
                if !tables.iter().any(|have| have.id() == t.id()) {
                    tables.push(t.clone());
                }
            }
        }
        let set_base = tables.iter().map(|t| t.ptr()).min().unwrap_or(0);
        for p in &mut preps {
            if let Some(t) = &p.tables {
                let words = (t.ptr() - set_base) / 4;
                p.desc.set_off = u32::try_from(words).map_err(|_| GpuError::Unsupported("table sets more than 16 GiB apart in device memory; decode their chunks in separate calls".into()))?;
                p.desc.set_kmax = t.inner.info.kmax;
            }
        }
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).min(chunks.len());
        // Batches and offsets.
        let align = |x: usize, a: usize| x.div_ceil(a) * a;
        let mut batches = Vec::new();
        let mut placements = vec![0usize; chunks.len()]; // absolute image offset of each container
        let mut off = 0usize;
        let mut i = 0usize;
        // The first and the last chunk of a request of several batches get a
        // batch of their own: the copy before the first decode and the decode
        // after the last copy are then one chunk's, not a whole batch's.
        let total_over = chunks.len() > 1 && chunks.iter().map(|c| c.len()).sum::<usize>() > self.batch_bytes;
        while i < chunks.len() {
            let mut j = i;
            let mut bytes = 0usize;
            while j < chunks.len() && (j == i || (bytes + chunks[j].len() <= self.batch_bytes && !(total_over && (i == 0 || j == chunks.len() - 1)))) {
                bytes += chunks[j].len();
                j += 1;
            }
            let n_planes: usize = preps[i..j].iter().map(|p| p.planes.len()).sum();
            let n_segs: usize = preps[i..j].iter().map(|p| p.segs.len()).sum();
            let n_tab: usize = preps[i..j].iter().map(|p| p.tab.len()).sum();
            let chunks_off = 0usize;
            let planes_off = align(chunks_off + (j - i) * std::mem::size_of::<ChunkDesc>(), 16);
            let segs_off = align(planes_off + n_planes * std::mem::size_of::<PlaneDesc>(), 16);
            let tab_off = align(segs_off + n_segs * std::mem::size_of::<SegDesc>(), 16);
            let mut at = align(tab_off + n_tab * 4, 16);
            let (mut pf, mut tf) = (0u32, 0u32);
            let mut max_pb = 8;
            let mut kmax = 1u32;
            let mut exact_work = 0u64;
            for (local, k) in (i..j).enumerate() {
                // Place the container so that its payload starts 16-byte aligned
                // (segments are then 2-byte aligned: their lengths are even).
                let ps = preps[k].payload_start;
                let mut start = align(at, 16) + (16 - ps % 16) % 16;
                if start < at {
                    start += 16;
                }
                placements[k] = off + start;
                let p = &mut preps[k];
                p.desc.bytes = start as u64;
                p.desc.plane_first = pf;
                p.desc.tab_first = tf;
                pf += p.planes.len() as u32;
                tf += p.tab.len() as u32;
                for s in &mut p.segs {
                    s.chunk = local as u32;
                }
                max_pb = max_pb.max(p.desc.prob_bits);
                kmax = kmax.max(p.max_nz);
                exact_work = exact_work.max(p.desc.tensors as u64 * p.desc.exact_n as u64 * p.desc.channels as u64);
                at = start + chunks[k].len();
            }
            let len = align(at, 16);
            batches.push(Batch {
                off,
                len,
                chunks_off,
                planes_off,
                segs_off,
                tab_off,
                nchunks: (j - i) as u32,
                nsegs: n_segs as u32,
                max_prob_bits: max_pb,
                kmax,
                exact_work,
                layer_first: Vec::new(),
            });
            off += len;
            i = j;
        }
        // Pinned memory is slow to allocate (about as slow as copying the
        // bytes several times over): reuse the images of earlier calls.
        let t_layout = t0.elapsed();
        let reused = {
            let mut pool = self.pinned_pool.lock().unwrap_or_else(|p| p.into_inner());
            pool.iter().position(|b| b.len() >= off).map(|i| pool.swap_remove(i))
        };
        let mut image = match reused {
            Some(b) => b,
            None => self.gpu.alloc_pinned(off)?,
        };
        let t_alloc = t0.elapsed();
        let t_desc;
        {
            let img = &mut image.as_mut_slice()[..off];
            // Descriptors, batch by batch on all threads (each batch's part
            // of the image is its own slice), then containers copied by all
            // threads.
            let mut work: Vec<(&mut Batch, &mut [u8], usize)> = Vec::with_capacity(batches.len());
            let (mut rest, mut first) = (&mut *img, 0usize);
            for b in batches.iter_mut() {
                let (mine, r) = std::mem::take(&mut rest).split_at_mut(b.len);
                rest = r;
                let n = b.nchunks as usize;
                work.push((b, mine, first));
                first += n;
            }
            let per = work.len().div_ceil(threads.max(1));
            let preps = &preps;
            std::thread::scope(|sc| {
                for group in work.chunks_mut(per) {
                    sc.spawn(move || {
                        for (b, img, first) in group.iter_mut() {
                            describe_batch(b, img, &preps[*first..*first + b.nchunks as usize]);
                        }
                    });
                }
            });
            t_desc = t0.elapsed();
            let base = img.as_mut_ptr() as usize;
            let img_len = img.len();
            std::thread::scope(|s| {
                let per = chunks.len().div_ceil(threads);
                for t in 0..threads {
                    let placements = &placements;
                    s.spawn(move || {
                        for k in t * per..((t + 1) * per).min(chunks.len()) {
                            assert!(placements[k] + chunks[k].len() <= img_len);
                            // SAFETY: containers occupy disjoint ranges of the image (checked in bounds above).
                            unsafe { std::ptr::copy_nonoverlapping(chunks[k].as_ptr(), (base + placements[k]) as *mut u8, chunks[k].len()) };
                        }
                    });
                }
            });
        }
        tracing::debug!(
            chunks = chunks.len(),
            bytes = off,
            threads,
            layout_ms = t_layout.as_secs_f64() * 1e3,
            pinned_ms = (t_alloc - t_layout).as_secs_f64() * 1e3,
            descriptors_ms = (t_desc - t_alloc).as_secs_f64() * 1e3,
            copy_ms = (t0.elapsed() - t_desc).as_secs_f64() * 1e3,
            "staged for the GPU"
        );
        Ok(Staged {
            id: NEXT_STAGED.fetch_add(1, Ordering::Relaxed),
            image: Some(image),
            len: off,
            pool: Arc::downgrade(&self.pinned_pool),
            batches,
            shapes: preps.iter().map(|p| (p.shape, p.dtype)).collect(),
            compressed: chunks.iter().map(|c| c.len()).sum(),
            symbols: preps.iter().map(|p| p.symbols).sum(),
            _tables: tables,
            set_base,
        })
    }

    /// Decode `chunks` into the blocks `block_ids[i]` of `layout` (chunk `i`'s
    /// token `t` goes to slot `t % block_size` of block
    /// `block_ids[i][t / block_size]`, as in [`KvLayout::scatter`]). The
    /// work runs on `stream` (a raw `CUstream` of this device's primary
    /// context) or on the decoder's own stream; the call returns when it is
    /// done and the device-side checks have passed.
    ///
    /// # Safety
    /// `layout.layer_base` must hold device addresses such that every element
    /// of every block named in `block_ids` is valid device memory of this
    /// GPU that nothing else accesses during the call.
    pub unsafe fn decode_into(&self, chunks: &[&[u8]], layout: &KvLayout, block_ids: &[&[u32]], stream: Option<u64>) -> Result<Timings, GpuError> {
        let staged = self.stage(chunks)?;
        // SAFETY: forwarded to the caller.
        unsafe { self.decode_staged(&staged, layout, block_ids, stream) }
    }

    /// Copy `staged` to the device (batch by batch, overlapped with decoding)
    /// and decode it into `layout`; see [`GpuDecoder::decode_into`].
    ///
    /// # Safety
    /// As for [`GpuDecoder::decode_into`].
    pub unsafe fn decode_staged(&self, staged: &Staged, layout: &KvLayout, block_ids: &[&[u32]], stream: Option<u64>) -> Result<Timings, GpuError> {
        // SAFETY: forwarded.
        unsafe { self.run(staged, layout, block_ids, stream, true) }
    }

    /// Decode `staged` again without copying it: the last call on this
    /// decoder must have copied this same `staged` (for benchmarks of the
    /// kernels alone).
    ///
    /// # Safety
    /// As for [`GpuDecoder::decode_into`].
    pub unsafe fn decode_resident(&self, staged: &Staged, layout: &KvLayout, block_ids: &[&[u32]], stream: Option<u64>) -> Result<Timings, GpuError> {
        // SAFETY: forwarded.
        unsafe { self.run(staged, layout, block_ids, stream, false) }
    }

    /// Host checks of a request against the layout, and the destination
    /// descriptor data: layer bases (u64), then per chunk the start of its
    /// block ids (u32), then the block ids.
    fn destination(&self, staged: &Staged, layout: &KvLayout, block_ids: &[&[u32]]) -> Result<(Vec<u8>, usize, usize), GpuError> {
        layout.validate().map_err(|e| GpuError::Invalid(e.to_string()))?;
        if block_ids.len() != staged.chunks() {
            return Err(GpuError::Invalid(format!("{} chunks but {} block id lists", staged.chunks(), block_ids.len())));
        }
        let mut data: Vec<u8> = Vec::new();
        for &b in &layout.layer_base {
            data.extend_from_slice(&(b as u64).to_le_bytes());
        }
        let first_at = data.len();
        let mut acc = 0u32;
        for ids in block_ids {
            data.extend_from_slice(&acc.to_le_bytes());
            acc += ids.len() as u32;
        }
        let ids_at = data.len();
        for (i, (ids, (shape, dtype))) in block_ids.iter().zip(&staged.shapes).enumerate() {
            if *dtype != layout.dtype {
                return Err(GpuError::Invalid(format!("chunk {i} is {} but the layout holds {}", dtype.name(), layout.dtype.name())));
            }
            if layout.chunk_shape(shape.tokens) != *shape {
                return Err(GpuError::Invalid(format!("chunk {i} has shape {shape:?}, the layout {:?}", layout.chunk_shape(shape.tokens))));
            }
            let used = shape.tokens.div_ceil(layout.block_size);
            if ids.len() < used {
                return Err(GpuError::Invalid(format!("chunk {i}: {} tokens do not fit {} blocks of {}", shape.tokens, ids.len(), layout.block_size)));
            }
            if let Some(&id) = ids.iter().find(|&&id| id != SKIP_BLOCK && id as usize >= layout.num_blocks) {
                return Err(GpuError::Invalid(format!("chunk {i}: block id {id} out of range ({} blocks)", layout.num_blocks)));
            }
            let mut u: Vec<u32> = ids[..used].iter().copied().filter(|&id| id != SKIP_BLOCK).collect();
            u.sort_unstable();
            if let Some(w) = u.windows(2).find(|w| w[0] == w[1]) {
                return Err(GpuError::Invalid(format!("chunk {i}: block id {} appears twice", w[0])));
            }
            for id in *ids {
                data.extend_from_slice(&id.to_le_bytes());
            }
        }
        Ok((data, first_at, ids_at))
    }

    unsafe fn run(&self, staged: &Staged, layout: &KvLayout, block_ids: &[&[u32]], stream: Option<u64>, upload: bool) -> Result<Timings, GpuError> {
        // SAFETY: forwarded.
        unsafe { self.launch(staged, layout, block_ids, stream, LaunchMode { upload, layered: false, after: None }) }.map(|(t, _)| t)
    }

    /// Stream-ordered decode, layer by layer: the call copies `staged` and
    /// enqueues the decode of layer 0 of every chunk, then layer 1, and so on,
    /// on `stream` (a raw `CUstream` of this device's primary context, or the
    /// decoder's own stream), records one CUDA event after each layer and
    /// returns without waiting. An engine makes its compute stream wait for
    /// layer `l` with `cuStreamWaitEvent(stream, events.raw(l), 0)` (what
    /// vLLM's `wait_for_layer_load(l)` needs); [`LayerEvents::synchronize`]
    /// waits on the host. The device-side checks (FORMAT.md 2.2 items 35 and
    /// 36) are read by [`LayerEvents::finish`]; until then a corrupt stream
    /// goes undetected (the host checks of [`GpuDecoder::stage`] have run).
    ///
    /// Each layer is one kernel launch per batch of `staged`: with the
    /// default 32 MB batches a launch is too small to fill the GPU, so stage
    /// layered requests with a decoder whose `batch_bytes` covers the whole
    /// request (8K tokens on an H100: all layers in 15.9 ms instead of
    /// 79.8 ms, docs/BENCHMARKS.md).
    ///
    /// The events borrow the decoder and `staged` (whose pinned bytes are
    /// being copied); dropping them waits for the whole decode. The
    /// decoder's next call also waits for it first.
    ///
    /// # Safety
    /// As for [`GpuDecoder::decode_into`], for as long as the work runs.
    pub unsafe fn decode_layered<'a>(&'a self, staged: &'a Staged, layout: &KvLayout, block_ids: &[&[u32]], stream: Option<u64>) -> Result<LayerEvents<'a>, GpuError> {
        // SAFETY: forwarded.
        let (_, ev) = unsafe { self.launch(staged, layout, block_ids, stream, LaunchMode { upload: true, layered: true, after: None }) }?;
        let (events, errors) = ev.expect("layered launch returns its events");
        Ok(LayerEvents { events, errors, nchunks: staged.chunks(), gpu: self.gpu.clone(), _keep: None, _borrow: std::marker::PhantomData })
    }

    /// [`GpuDecoder::decode_layered`] on the decoder's own stream, for a
    /// caller that cannot hold borrows across threads (the connector's
    /// pipeline): the events own `staged` and a reference to the decoder.
    /// When `after` (a raw `CUevent`, e.g. recorded on the engine's stream
    /// when the load was asked for) is given, the decode waits for it on the
    /// device before writing any block.
    ///
    /// # Safety
    /// As for [`GpuDecoder::decode_into`], for as long as the work runs;
    /// `after` must be a live event of this device's primary context.
    pub unsafe fn decode_layered_owned(
        self: &std::sync::Arc<Self>,
        staged: Staged,
        layout: &KvLayout,
        block_ids: &[&[u32]],
        after: Option<u64>,
    ) -> Result<LayerEvents<'static>, GpuError> {
        // SAFETY: forwarded.
        let (_, ev) = unsafe { self.launch(&staged, layout, block_ids, None, LaunchMode { upload: true, layered: true, after }) }?;
        let (events, errors) = ev.expect("layered launch returns its events");
        let nchunks = staged.chunks();
        Ok(LayerEvents {
            events,
            errors,
            nchunks,
            gpu: self.gpu.clone(),
            _keep: Some(Box::new((std::sync::Arc::clone(self), staged))),
            _borrow: std::marker::PhantomData,
        })
    }

    /// Wait for a layered decode still running (it may use the region and destination buffers).
    fn settle(&self, st: &mut State) -> Result<(), GpuError> {
        if st.pending {
            st.end.sync()?;
            st.pending = false;
        }
        Ok(())
    }

    unsafe fn launch(
        &self,
        staged: &Staged,
        layout: &KvLayout,
        block_ids: &[&[u32]],
        stream: Option<u64>,
        mode: LaunchMode,
    ) -> Result<(Timings, Option<LayeredWork>), GpuError> {
        let LaunchMode { upload, layered, after } = mode;
        let (dest_data, first_at, ids_at) = self.destination(staged, layout, block_ids)?;
        self.gpu.bind()?;
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let st = &mut *guard;
        self.settle(st)?;
        if !upload && st.resident != staged.id {
            return Err(GpuError::Invalid("decode_resident: this staged set is not on the device".into()));
        }
        let need = staged.len;
        if st.region.as_ref().map_or(true, |r| r.len() < need) {
            st.region = None;
            st.resident = 0;
            st.region = Some(self.gpu.alloc(need)?);
        }
        if st.dest.as_ref().map_or(true, |r| r.len() < dest_data.len()) {
            st.dest = None;
            st.dest = Some(self.gpu.alloc(dest_data.len().max(4096))?);
            st.dest_host = None;
            st.dest_host = Some(self.gpu.alloc_pinned(dest_data.len().max(4096))?);
        }
        let nchunks = staged.chunks();
        if st.errors.as_ref().map_or(true, |r| r.len() < 4 * nchunks) {
            st.errors = None;
            st.errors = Some(self.gpu.alloc(4 * nchunks)?);
        }
        while st.batch_events.len() < staged.batches.len() {
            st.batch_events.push(Event::new(false)?);
        }
        // A layered call's error flags outlive the call: they get their own buffer.
        let own_errors = if layered { Some(self.gpu.alloc(4 * nchunks)?) } else { None };
        let layers = staged.shapes.first().map(|s| s.0.layers).unwrap_or(1);
        let mut layer_events = Vec::new();
        if layered {
            for _ in 0..layers {
                layer_events.push(Event::new(false)?);
            }
        }
        let borrowed;
        let compute: &Stream = match stream {
            Some(s) => {
                borrowed = Stream::borrowed(s);
                &borrowed
            }
            None => &st.own,
        };
        let region = st.region.as_ref().unwrap().ptr();
        let dest = st.dest.as_ref().unwrap().ptr();
        let errors = own_errors.as_ref().unwrap_or_else(|| st.errors.as_ref().unwrap()).ptr();
        {
            let host = st.dest_host.as_mut().unwrap().as_mut_slice();
            host[..dest_data.len()].copy_from_slice(&dest_data);
        }
        let dest_host = &st.dest_host.as_ref().unwrap().as_slice()[..dest_data.len()];
        if let Some(ev) = after {
            compute.wait_raw(ev)?;
        }
        st.start.record(compute)?;
        // SAFETY: all device ranges below were allocated above with these sizes.
        unsafe {
            driver::copy_htod(dest, dest_host, compute)?;
            driver::memset(errors, 0, 4 * nchunks, compute)?;
        }
        let desc = DestDesc {
            layer_base: dest,
            block_ids: dest + ids_at as u64,
            block_first: dest + first_at as u64,
            stride_block: layout.stride_block as i64,
            stride_kv: layout.stride_kv as i64,
            stride_token: layout.stride_token as i64,
            stride_head: layout.stride_head as i64,
            stride_layer: layout.stride_layer as i64,
            block_size: layout.block_size as u32,
            pad: 0,
        };
        if upload {
            // The copy stream must not overwrite the region while an earlier
            // call's kernels (on another stream) might still read it: they
            // have all completed, since every call waits for its work (a
            // layered call's, through `settle` above).
            st.resident = 0;
        }
        // Decode segments `lo..hi` of batch `b` and its exact rows of tensors `t_lo..t_hi`.
        let launch_range = |on: &Stream, b: &Batch, lo: u32, hi: u32, t_lo: u32, t_hi: u32, exact_work: u64| -> Result<(), GpuError> {
            let base = region + b.off as u64;
            let mut p_region = base;
            let mut p_chunks = base + b.chunks_off as u64;
            let mut p_planes = base + b.planes_off as u64;
            let mut p_segs = base + b.segs_off as u64 + lo as u64 * std::mem::size_of::<SegDesc>() as u64;
            let mut p_tab = base + b.tab_off as u64;
            let mut nsegs = hi - lo;
            let mut geo = b.max_prob_bits | b.kmax << 8;
            let mut d = desc;
            let mut p_errors = errors;
            let mut p_set = staged.set_base;
            let per_warp = self.smem_per_warp(b.max_prob_bits, b.kmax);
            let w = self.warps_per_block(per_warp);
            let smem = w * per_warp;
            if nsegs > 0 {
                let mut params: [*mut c_void; 10] = [
                    &mut p_region as *mut _ as *mut c_void,
                    &mut p_chunks as *mut _ as *mut c_void,
                    &mut p_planes as *mut _ as *mut c_void,
                    &mut p_segs as *mut _ as *mut c_void,
                    &mut p_tab as *mut _ as *mut c_void,
                    &mut nsegs as *mut _ as *mut c_void,
                    &mut geo as *mut _ as *mut c_void,
                    &mut d as *mut _ as *mut c_void,
                    &mut p_errors as *mut _ as *mut c_void,
                    &mut p_set as *mut _ as *mut c_void,
                ];
                // SAFETY: the parameters match cg_decode's signature; the descriptors
                // in the region address only the region, and the destination is the
                // caller's promise.
                unsafe { driver::launch(self.f_decode, (nsegs.div_ceil(w), 1, 1), (32 * w, 1, 1), smem, on, &mut params)? };
            }
            if exact_work > 0 {
                let (mut t_lo, mut t_hi) = (t_lo, t_hi);
                let mut params: [*mut c_void; 5] = [
                    &mut p_region as *mut _ as *mut c_void,
                    &mut p_chunks as *mut _ as *mut c_void,
                    &mut d as *mut _ as *mut c_void,
                    &mut t_lo as *mut _ as *mut c_void,
                    &mut t_hi as *mut _ as *mut c_void,
                ];
                let gx = (exact_work.div_ceil(256)).clamp(1, 4096) as u32;
                // SAFETY: as above, for cg_exact.
                unsafe { driver::launch(self.f_exact, (gx, b.nchunks, 1), (256, 1, 1), 0, on, &mut params)? };
            }
            Ok(())
        };
        // One-launch decodes alternate batches between the call's stream and
        // `aux` (forked from it here, joined back below).
        let two = !layered && staged.batches.len() > 1;
        if two {
            st.fork.record(compute)?;
            st.aux.wait(&st.fork)?;
        }
        for (bi, b) in staged.batches.iter().enumerate() {
            let on = if two && bi % 2 == 1 { &st.aux } else { compute };
            if upload {
                let base = region + b.off as u64;
                // SAFETY: the image range is inside the region allocation; the
                // pinned image outlives the work (we wait before returning, or
                // the layered call's events borrow it).
                unsafe { driver::copy_htod(base, &staged.bytes()[b.off..b.off + b.len], &st.copy)? };
                st.batch_events[bi].record(&st.copy)?;
                on.wait(&st.batch_events[bi])?;
            }
            if !layered {
                launch_range(on, b, 0, b.nsegs, 0, u32::MAX, b.exact_work)?;
            }
        }
        if two {
            st.join.record(&st.aux)?;
            compute.wait(&st.join)?;
        }
        if layered {
            let streams = staged.shapes.first().map(|s| s.0.kind.streams()).unwrap_or(1) as u32;
            for (l, ev) in layer_events.iter().enumerate() {
                for b in &staged.batches {
                    let (lo, hi) = (b.layer_first[l], b.layer_first[l + 1]);
                    let t_lo = l as u32 * streams;
                    launch_range(compute, b, lo, hi, t_lo, t_lo + streams, b.exact_work.div_ceil(layers as u64))?;
                }
                ev.record(compute)?;
            }
            st.end.record(compute)?;
            st.pending = true;
            return Ok((Timings { gpu_ms: f32::NAN }, Some((layer_events, own_errors.unwrap()))));
        }
        st.end.record(compute)?;
        st.end.sync()?;
        if upload {
            st.resident = staged.id;
        }
        // Event timing can be unavailable (a driver without the entry point
        // cudarc binds); the decode itself does not depend on it.
        let gpu_ms = st.end.since(&st.start).unwrap_or(f32::NAN);
        let mut errs = vec![0u8; 4 * nchunks];
        st.errors.as_ref().unwrap().read(0, &mut errs)?;
        check_errors(&errs)?;
        Ok((Timings { gpu_ms }, None))
    }

    /// Device-to-device copy of `n` bytes on the decoder's own stream,
    /// timed with events (a bandwidth reference for benchmarks).
    pub fn timed_copy(&self, dst: &DeviceBuffer, src: &DeviceBuffer, n: usize) -> Result<f32, GpuError> {
        if n > dst.len() || n > src.len() {
            return Err(GpuError::Invalid("copy larger than its buffers".into()));
        }
        self.gpu.bind()?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.settle(&mut st)?;
        let t = std::time::Instant::now();
        st.start.record(&st.own)?;
        // SAFETY: both ranges are inside live allocations.
        unsafe { driver::copy_dtod(dst.ptr(), src.ptr(), n, &st.own)? };
        st.end.record(&st.own)?;
        st.end.sync()?;
        let wall = t.elapsed().as_secs_f32() * 1e3;
        Ok(st.end.since(&st.start).unwrap_or(wall))
    }

    /// Host-to-device copy of `src` (pinned) on the decoder's own stream, timed with events.
    pub fn timed_upload(&self, dst: &DeviceBuffer, src: &PinnedBuffer) -> Result<f32, GpuError> {
        if src.len() > dst.len() {
            return Err(GpuError::Invalid("copy larger than its buffers".into()));
        }
        self.gpu.bind()?;
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.settle(&mut st)?;
        let t = std::time::Instant::now();
        st.start.record(&st.own)?;
        // SAFETY: dst holds src.len() bytes; src is pinned and outlives the wait below.
        unsafe { driver::copy_htod(dst.ptr(), src.as_slice(), &st.own)? };
        st.end.record(&st.own)?;
        st.end.sync()?;
        let wall = t.elapsed().as_secs_f32() * 1e3;
        Ok(st.end.since(&st.start).unwrap_or(wall))
    }
}

fn check_errors(errs: &[u8]) -> Result<(), GpuError> {
    if let Some((chunk, bits)) = errs.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).enumerate().find(|&(_, b)| b != 0) {
        return Err(GpuError::CorruptOnDevice { chunk, bits });
    }
    Ok(())
}

/// One CUDA event per layer of a stream-ordered decode
/// ([`GpuDecoder::decode_layered`]): event `l` completes when every chunk's
/// layer `l` (and all layers before it) is in the blocks. Owns the events
/// (destroyed on drop) and the call's device error flags. Dropping it waits
/// for the whole decode.
pub struct LayerEvents<'a> {
    events: Vec<Event>,
    errors: DeviceBuffer,
    nchunks: usize,
    gpu: Gpu,
    /// What an owned decode keeps alive until it is done (the decoder and the staged bytes).
    _keep: Option<Box<dyn std::any::Any + Send + Sync>>,
    _borrow: std::marker::PhantomData<&'a Staged>,
}

impl LayerEvents<'_> {
    /// Number of layers (events).
    pub fn len(&self) -> usize {
        self.events.len()
    }
    /// True when there are no layers.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }
    /// The raw `CUevent` of layer `l`, for `cuStreamWaitEvent` on an
    /// engine's stream. Valid while `self` lives.
    pub fn raw(&self, l: usize) -> u64 {
        self.events[l].raw()
    }
    /// The raw `CUevent` of every layer, in layer order.
    pub fn handles(&self) -> Vec<u64> {
        self.events.iter().map(|e| e.raw()).collect()
    }
    /// True once layer `l` is decoded (`cuEventQuery`, does not block).
    pub fn query(&self, l: usize) -> Result<bool, GpuError> {
        self.gpu.bind()?;
        self.events[l].query()
    }
    /// Block the host until layer `l` is decoded (`cuEventSynchronize`).
    pub fn synchronize(&self, l: usize) -> Result<(), GpuError> {
        self.gpu.bind()?;
        self.events[l].sync()
    }
    /// Make the engine's `stream` (a raw `CUstream` of this device's primary
    /// context; 0 is the legacy default stream) wait on the device for layer
    /// `l`, without blocking the host.
    pub fn wait_on(&self, l: usize, stream: u64) -> Result<(), GpuError> {
        self.gpu.bind()?;
        Stream::borrowed(stream).wait(&self.events[l])
    }
    /// Wait for every layer, then the device-side error bits of each chunk
    /// (0: it decoded cleanly; FORMAT.md 2.2 items 35 and 36 otherwise).
    pub fn chunk_errors(&self) -> Result<Vec<u32>, GpuError> {
        self.gpu.bind()?;
        if let Some(e) = self.events.last() {
            e.sync()?;
        }
        let mut errs = vec![0u8; 4 * self.nchunks];
        self.errors.read(0, &mut errs)?;
        Ok(errs.chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap())).collect())
    }
    /// Wait for every layer, then read the device-side checks of the call:
    /// `GpuError::CorruptOnDevice` names the first corrupt chunk (its blocks
    /// must then be discarded).
    pub fn finish(&self) -> Result<(), GpuError> {
        self.gpu.bind()?;
        if let Some(e) = self.events.last() {
            e.sync()?;
        }
        let mut errs = vec![0u8; 4 * self.nchunks];
        self.errors.read(0, &mut errs)?;
        check_errors(&errs)
    }
}

impl Drop for LayerEvents<'_> {
    fn drop(&mut self) {
        // The decode reads the borrowed staged bytes and writes the error flags freed here.
        if self.gpu.bind().is_ok() {
            if let Some(e) = self.events.last() {
                let _ = e.sync();
            }
        }
    }
}

/// Writes batch `b`'s descriptors (chunks, planes, segments by layer, table
/// entries) into `img`, the batch's part of the pinned image, and sets its
/// per-layer segment ranges.
fn describe_batch(b: &mut Batch, img: &mut [u8], ps: &[Prep]) {
    let put = |img: &mut [u8], at: usize, src: &[u8]| img[at..at + src.len()].copy_from_slice(src);
    let descs: Vec<ChunkDesc> = ps.iter().map(|p| p.desc).collect();
    put(img, b.chunks_off, as_bytes(&descs));
    let mut at = b.planes_off;
    for p in ps {
        put(img, at, as_bytes(&p.planes));
        at += std::mem::size_of_val(&p.planes[..]);
    }
    // Segments by layer (stable: by chunk, plane and position within a layer),
    // so that one layer of the batch is one contiguous range.
    let layer_of = |p: &Prep, s: &SegDesc| s.plane / p.desc.planes_per_tensor / p.desc.streams;
    let layers = ps.iter().map(|p| p.shape.layers).max().unwrap_or(1);
    let mut segs: Vec<(u32, SegDesc)> = ps.iter().flat_map(|p| p.segs.iter().map(move |s| (layer_of(p, s), *s))).collect();
    segs.sort_by_key(|&(l, _)| l);
    let mut layer_first = vec![0u32; layers + 1];
    for &(l, _) in &segs {
        layer_first[l as usize + 1] += 1;
    }
    for l in 0..layers {
        layer_first[l + 1] += layer_first[l];
    }
    b.layer_first = layer_first;
    let segs: Vec<SegDesc> = segs.into_iter().map(|(_, s)| s).collect();
    put(img, b.segs_off, as_bytes(&segs));
    let mut at = b.tab_off;
    for p in ps {
        put(img, at, as_bytes(&p.tab));
        at += 4 * p.tab.len();
    }
}

#[cfg(test)]
mod tests {
    //! Host side of external tables (no GPU needed): the prebuilt lookups
    //! and the checks of chunks that reference a set.
    use super::*;
    use crate::codec::{calibrate_tables, encode, quant, Container, EncodeOptions, KvKind, KvTensors, Level, Tables};

    fn synthetic(shape: KvShape, tokens_seed: u64) -> KvTensors {
        let mut s = tokens_seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        let mut rnd = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 53) as f64
        };
        let c = shape.channels();
        let tensors = (0..shape.tensors())
            .map(|t| {
                let mut out = vec![0u8; shape.plane_elems() * 2];
                for i in 0..shape.tokens * c {
                    let ch = i % c;
                    let lap = -(rnd() + 1e-12).ln() + (rnd() + 1e-12).ln();
                    let scale = if ch % 29 == 3 { 6.0 } else { 0.3 + (ch % 7) as f64 * 0.1 + t as f64 * 0.05 };
                    quant::store(Dtype::F16, &mut out, i, (scale * lap + (ch % 5) as f64 * 0.2) as f32);
                }
                out
            })
            .collect();
        KvTensors { shape, dtype: Dtype::F16, tensors }
    }

    fn info(set: &TableSet) -> SetInfo {
        let (_, kmax) = set_lookups(set).unwrap();
        SetInfo { id: set.id(), plan: set.plan.clone(), channels: set.channels, prob_bits: set.prob_bits, kmax }
    }

    const SHAPES: [KvShape; 2] = [
        KvShape { kind: KvKind::KeyValue, layers: 2, tokens: 96, heads: 3, head_dim: 64 },
        // 80 channels: a partial last group of 16 lanes.
        KvShape { kind: KvKind::Latent, layers: 2, tokens: 96, heads: 1, head_dim: 80 },
    ];

    #[test]
    fn set_lookups_give_every_slot_its_symbol_and_cumulative_frequency() {
        for shape in SHAPES {
            for level in [Level::Compact, Level::Default, Level::High, Level::Lossless] {
                let set = calibrate_tables(&[&synthetic(shape, 1)], &EncodeOptions::level(level)).unwrap();
                let tables = set.tables().unwrap();
                let (words, kmax) = set_lookups(&set).unwrap();
                let m = 1usize << set.prob_bits;
                let (slw, groups) = (32 * m / 4, set.channels.div_ceil(32));
                let block = slw + 32 * kmax as usize;
                assert_eq!(words.len(), set.plan.len() * groups * block);
                for (p, plane) in set.plan.iter().enumerate() {
                    for c in 0..groups * 32 {
                        let (g, j) = (c / 32, c % 32);
                        let b = &words[(p * groups + g) * block..][..block];
                        if c >= set.channels {
                            assert!((0..slw / 32).all(|w| b[w * 32 + j] == 0) && (0..kmax as usize).all(|q| b[slw + q * 32 + j] == 0));
                            continue;
                        }
                        let t = &tables[p][if plane.tables(set.channels) == set.channels { c } else { 0 }];
                        let cum = t.cumulative();
                        // Rows by falling frequency: the frequent ones stay in shared memory.
                        let nz = t.freq.iter().filter(|&&f| f > 0).count();
                        let fr: Vec<u32> = (0..nz).map(|q| (b[slw + q * 32 + j] >> 8) & 0x7FF).collect();
                        assert!(fr.windows(2).all(|w| w[0] >= w[1]), "{level:?} plane {p} channel {c}: rows not by falling frequency");
                        for s in 0..m {
                            let q = (b[(s >> 2) * 32 + j] >> ((s & 3) * 8)) & 0xFF;
                            assert!(q < kmax, "{level:?} plane {p} channel {c} slot {s}");
                            let e = b[slw + q as usize * 32 + j];
                            let (sym, f, c0) = (e & 0xFF, (e >> 8) & 0x7FF, e >> 19);
                            assert_eq!(f, t.freq_of(sym as u8), "{level:?} plane {p} channel {c} slot {s}");
                            assert_eq!(c0, cum[sym as usize], "{level:?} plane {p} channel {c} slot {s}");
                            assert!(c0 as usize <= s && s < (c0 + f) as usize, "{level:?} plane {p} channel {c} slot {s}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn external_streams_pass_the_host_checks_with_patches_pointing_at_their_tables() {
        for shape in SHAPES {
            for level in [Level::Compact, Level::Default, Level::High] {
                // Calibrated on 8 tokens of another sample: narrow supports, so
                // the chunk needs patches for some channels.
                let calib = synthetic(KvShape { tokens: 8, ..shape }, 2);
                let set = calibrate_tables(&[&calib], &EncodeOptions::level(level)).unwrap();
                let b = encode(&synthetic(shape, 3), &EncodeOptions { tables: Tables::External(&set), ..EncodeOptions::level(level) }).unwrap();
                let cpu = Container::parse(&b, Some(&set), DecodeLimits::default()).unwrap();
                let lay = format::parse(&b, u64::MAX).unwrap();
                let patches = u32::from_le_bytes(b[lay.tables.start..lay.tables.start + 4].try_into().unwrap()) as usize;
                assert!(patches > 0, "{level:?}: the test needs patches");
                let inf = info(&set);
                let p = prepare(&b, 0, DecodeLimits::default(), Some(&inf)).unwrap();
                assert_eq!(p.desc.external, 1);
                assert!(p.max_nz >= inf.kmax.min(SET_SHARED_ROWS));
                // The kernel's view: per (plane, channel), FROM_SET or the patch's offset.
                let channels = shape.channels();
                let groups = channels.div_ceil(32);
                let lane_tab: Vec<u32> = (0..lay.planes.len() * channels)
                    .map(|i| {
                        let (plane, c) = (i / channels, i % channels);
                        let h = p.tab[plane * groups + c / 32];
                        if h == FROM_SET { FROM_SET } else { p.tab[h as usize + c % 32] }
                    })
                    .collect();
                let mut patched: Vec<u32> = lane_tab.iter().copied().filter(|&o| o != FROM_SET).collect();
                patched.sort_unstable();
                patched.dedup();
                assert_eq!(patched.len(), patches, "{level:?}");
                // Each patched offset holds the compact table the CPU decoder uses for that channel.
                for (i, &o) in lane_tab.iter().enumerate() {
                    if o == FROM_SET {
                        continue;
                    }
                    let (plane, c) = (i / channels, i % channels);
                    let mut pos = o as usize;
                    let t = crate::codec::table::read_compact(&b, &mut pos, lay.planes[plane].nsym(), lay.header.prob_bits).unwrap();
                    assert_eq!(t, cpu.table(plane, c), "{level:?} plane {plane} channel {c}");
                }
                // Without the set, or with another one: the CPU decoder's errors.
                assert!(matches!(prepare(&b, 0, DecodeLimits::default(), None), Err(GpuError::Codec { source: CodecError::MissingTables(_), .. })));
                let other = info(&calibrate_tables(&[&synthetic(shape, 9)], &EncodeOptions::level(level)).unwrap());
                assert!(matches!(prepare(&b, 0, DecodeLimits::default(), Some(&other)), Err(GpuError::Codec { source: CodecError::WrongTables { .. }, .. })));
            }
        }
    }

    #[test]
    fn host_checks_of_external_streams_reject_what_the_cpu_parser_rejects() {
        let shape = SHAPES[0];
        let calib = synthetic(KvShape { tokens: 8, ..shape }, 2);
        let set = calibrate_tables(&[&calib], &EncodeOptions::level(Level::Default)).unwrap();
        let inf = info(&set);
        let b = encode(&synthetic(shape, 3), &EncodeOptions { tables: Tables::External(&set), ..EncodeOptions::level(Level::Default) }).unwrap();
        let lay = format::parse(&b, u64::MAX).unwrap();
        let mut rejected = 0;
        for i in 0..lay.segments[0].0 {
            for flip in [0x01u8, 0x10, 0x80] {
                let mut c = b.clone();
                c[i] ^= flip;
                let n = c.len() - 8;
                let sum = xxhash_rust::xxh3::xxh3_64(&c[..n]);
                c[n..].copy_from_slice(&sum.to_le_bytes());
                if let Err(e) = Container::parse(&c, Some(&set), DecodeLimits::default()) {
                    rejected += 1;
                    assert!(prepare(&c, 0, DecodeLimits::default(), Some(&inf)).is_err(), "byte {i} flip {flip:#x}: the CPU parser says {e}, the GPU checks accept it");
                }
            }
        }
        assert!(rejected > 100, "only {rejected} changes rejected");
    }
}

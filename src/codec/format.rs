//! The container, byte by byte (docs/FORMAT.md is the specification; this
//! file is its only implementation of offsets). Everything little-endian.
//!
//! ```text
//! header            64 bytes (Header)
//! plane descriptors 4 bytes per plane
//! scales            scales_len bytes of bf16
//! exact tokens      4 bytes per exact token (indices), then their raw rows
//! tables            tables_len bytes: compact tables of every plane, or with
//!                   external tables a patch list (count, then index + compact table)
//! segment ends      4 bytes per segment: end offset of each segment in the payload
//! payload           payload_len bytes
//! checksum          8 bytes: XXH3-64 (seed 0) of every byte before it
//! ```

use xxhash_rust::xxh3::xxh3_64;

use super::quant::{QuantSpec, ScaleGroup};
use super::rans::{SegmentGeometry, LANES};
use super::{Dtype, Error, KvKind, KvShape};

pub const MAGIC: [u8; 4] = *b"CGKV";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 64;
pub const CHECKSUM_LEN: usize = 8;
/// Flag bit 0: tables are not in the stream but in a table set named by `table_id`.
pub const FLAG_EXTERNAL_TABLES: u16 = 1;
pub const MIN_PROB_BITS: u32 = 8;
/// Version 1 bounds `prob_bits` so that a decode lookup entry fits 32 bits.
pub const MAX_PROB_BITS: u32 = 10;

/// How one plane is coded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlaneKind {
    /// Quantized values with per-group scales; per-channel tables.
    Quantized(QuantSpec),
    /// Byte `index` (0 = most significant) of the raw element bits;
    /// `shared` = one table for all channels, else one per channel.
    Raw { index: u8, shared: bool },
}

impl PlaneKind {
    pub fn nsym(&self) -> usize {
        match self {
            PlaneKind::Quantized(q) => q.nsym(),
            PlaneKind::Raw { .. } => 256,
        }
    }
    /// Tables this plane uses.
    pub fn tables(&self, channels: usize) -> usize {
        match self {
            PlaneKind::Raw { shared: true, .. } => 1,
            _ => channels,
        }
    }
    /// Table of channel `c`.
    #[inline(always)]
    pub fn table_index(&self, c: usize) -> usize {
        match self {
            PlaneKind::Raw { shared: true, .. } => 0,
            _ => c,
        }
    }
    /// bf16 scale values stored for this plane.
    pub fn scale_values(&self, shape: &KvShape) -> usize {
        match self {
            PlaneKind::Quantized(q) => q.group.count(shape.tokens, shape.channels(), shape.head_dim) * q.params_per_group(),
            PlaneKind::Raw { .. } => 0,
        }
    }
    fn to_bytes(self) -> [u8; 4] {
        match self {
            PlaneKind::Quantized(q) => [1, q.group.code() | if q.asymmetric { 0x80 } else { 0 }, 0, (q.nsym() - 1) as u8],
            PlaneKind::Raw { index, shared } => [2, index, shared as u8, 255],
        }
    }
    fn from_bytes(b: [u8; 4]) -> Result<PlaneKind, Error> {
        match b[0] {
            1 => {
                let group = ScaleGroup::from_code(b[1] & 0x7f).ok_or(Error::Corrupt("unknown scale group"))?;
                if b[2] != 0 {
                    return Err(Error::Corrupt("quantized plane must use per-channel tables"));
                }
                if b[3] % 2 != 0 || b[3] == 0 {
                    return Err(Error::Corrupt("quantized alphabet must be odd and at least 3"));
                }
                Ok(PlaneKind::Quantized(QuantSpec { group, max: b[3] / 2, asymmetric: b[1] & 0x80 != 0 }))
            }
            2 => {
                if b[2] > 1 || b[3] != 255 {
                    return Err(Error::Corrupt("bad raw plane descriptor"));
                }
                Ok(PlaneKind::Raw { index: b[1], shared: b[2] == 1 })
            }
            _ => Err(Error::Corrupt("unknown plane kind")),
        }
    }
}

/// The fixed 64-byte header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub flags: u16,
    pub dtype: Dtype,
    pub shape: KvShape,
    /// Nominal level the encoder was asked for (informational).
    pub level: u8,
    pub prob_bits: u32,
    pub seg_tokens: usize,
    pub seg_groups: usize,
    pub table_id: u64,
    pub planes: usize,
    pub scales_len: usize,
    pub tables_len: usize,
    pub segments: usize,
    pub payload_len: usize,
    /// Tokens stored exactly (raw input bits) instead of quantized.
    pub exact_tokens: usize,
}

impl Header {
    pub fn external_tables(&self) -> bool {
        self.flags & FLAG_EXTERNAL_TABLES != 0
    }

    pub fn write(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&self.flags.to_le_bytes());
        out.push(self.dtype.code());
        out.push(self.shape.kind.streams() as u8);
        out.push(self.level);
        out.push(self.prob_bits as u8);
        out.extend_from_slice(&(self.shape.layers as u16).to_le_bytes());
        out.extend_from_slice(&(self.shape.heads as u16).to_le_bytes());
        out.extend_from_slice(&(self.shape.head_dim as u16).to_le_bytes());
        out.extend_from_slice(&(self.seg_tokens as u16).to_le_bytes());
        out.extend_from_slice(&(self.shape.tokens as u32).to_le_bytes());
        out.extend_from_slice(&(self.seg_groups as u16).to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.table_id.to_le_bytes());
        for v in [self.planes, self.scales_len, self.tables_len, self.segments, self.payload_len, self.exact_tokens] {
            out.extend_from_slice(&(v as u32).to_le_bytes());
        }
        out.resize(start + HEADER_LEN, 0);
    }

    /// Parse and check the header's own fields (not yet against the data).
    pub fn parse(b: &[u8]) -> Result<Header, Error> {
        if b.len() < 4 || b[0..4] != MAGIC {
            return Err(Error::BadMagic);
        }
        if b.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(Error::Corrupt("stream shorter than header and checksum"));
        }
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let version = u16_at(4);
        if version != VERSION {
            return Err(Error::Version(version));
        }
        let flags = u16_at(6);
        if flags & !FLAG_EXTERNAL_TABLES != 0 {
            return Err(Error::Corrupt("unknown flag bits set"));
        }
        let dtype = Dtype::from_code(b[8]).ok_or(Error::Corrupt("unknown dtype"))?;
        let kind = match b[9] {
            2 => KvKind::KeyValue,
            1 => KvKind::Latent,
            _ => return Err(Error::Corrupt("streams per layer must be 1 or 2")),
        };
        let level = b[10];
        let prob_bits = b[11] as u32;
        if !(MIN_PROB_BITS..=MAX_PROB_BITS).contains(&prob_bits) {
            return Err(Error::Corrupt("prob_bits out of range"));
        }
        let shape = KvShape {
            kind,
            layers: u16_at(12) as usize,
            heads: u16_at(14) as usize,
            head_dim: u16_at(16) as usize,
            tokens: u32_at(20) as usize,
        };
        let seg_tokens = u16_at(18) as usize;
        let seg_groups = u16_at(24) as usize;
        if u16_at(26) != 0 || b[60..64].iter().any(|&x| x != 0) {
            return Err(Error::Corrupt("reserved header bytes are not zero"));
        }
        if shape.layers == 0 || shape.heads == 0 || shape.head_dim == 0 || shape.tokens == 0 {
            return Err(Error::Corrupt("zero dimension in header"));
        }
        if kind == KvKind::Latent && shape.heads != 1 {
            return Err(Error::Corrupt("latent cache must have one head"));
        }
        if seg_tokens == 0 || seg_groups == 0 {
            return Err(Error::Corrupt("zero segment size"));
        }
        let table_id = u64::from_le_bytes(b[28..36].try_into().unwrap());
        Ok(Header {
            flags,
            dtype,
            shape,
            level,
            prob_bits,
            seg_tokens,
            seg_groups,
            table_id,
            planes: u32_at(36) as usize,
            scales_len: u32_at(40) as usize,
            tables_len: u32_at(44) as usize,
            segments: u32_at(48) as usize,
            payload_len: u32_at(52) as usize,
            exact_tokens: u32_at(56) as usize,
        })
    }

    /// Channel groups of 32 lanes in a plane.
    pub fn groups(&self) -> usize {
        self.shape.channels().div_ceil(LANES)
    }

    /// Segments per plane.
    pub fn segments_per_plane(&self) -> usize {
        self.groups().div_ceil(self.seg_groups) * self.shape.tokens.div_ceil(self.seg_tokens)
    }

    /// Geometry of segment `k` of a plane (segments ordered by group block,
    /// then token block).
    pub fn segment_geometry(&self, k: usize) -> SegmentGeometry {
        let tb = self.shape.tokens.div_ceil(self.seg_tokens);
        let (gb, t) = (k / tb, k % tb);
        SegmentGeometry {
            group_begin: gb * self.seg_groups,
            group_end: ((gb + 1) * self.seg_groups).min(self.groups()),
            token_begin: t * self.seg_tokens,
            token_end: ((t + 1) * self.seg_tokens).min(self.shape.tokens),
            channels: self.shape.channels(),
        }
    }
}

/// Byte ranges of the sections of a validated stream.
#[derive(Clone, Debug)]
pub struct Layout {
    pub header: Header,
    pub planes: Vec<PlaneKind>,
    pub scales: std::ops::Range<usize>,
    /// Indices of the exact tokens (ascending).
    pub exact_tokens: Vec<usize>,
    /// Their raw rows: for each tensor, for each exact token, one row.
    pub exact_rows: std::ops::Range<usize>,
    pub tables: std::ops::Range<usize>,
    /// Start and end of each segment in the stream (absolute offsets).
    pub segments: Vec<(usize, usize)>,
}

/// Expected plane list for a stream of this header: all quantized, or the
/// raw byte planes of every tensor (most significant first).
fn check_planes(h: &Header, planes: &[PlaneKind]) -> Result<(), Error> {
    let tensors = h.shape.tensors();
    let quantized = planes.iter().all(|p| matches!(p, PlaneKind::Quantized(_)));
    if quantized && planes.len() == tensors {
        return Ok(());
    }
    let bytes = h.dtype.size();
    if planes.len() == tensors * bytes {
        for (i, p) in planes.iter().enumerate() {
            match p {
                PlaneKind::Raw { index, .. } if *index as usize == i % bytes => {}
                _ => return Err(Error::Corrupt("raw planes out of order")),
            }
        }
        return Ok(());
    }
    Err(Error::Corrupt("plane count does not match the shape"))
}

/// Validate every field against the data before anything is allocated in
/// proportion to the header's claims. `max_output` bounds the decoded size.
pub fn parse(b: &[u8], max_output: u64) -> Result<Layout, Error> {
    let h = Header::parse(b)?;
    let body = b.len() - CHECKSUM_LEN;
    let stored = u64::from_le_bytes(b[body..].try_into().unwrap());
    if xxh3_64(&b[..body]) != stored {
        return Err(Error::Checksum);
    }
    let out_bytes = (h.shape.layers as u64)
        .checked_mul(h.shape.kind.streams() as u64)
        .and_then(|v| v.checked_mul(h.shape.tokens as u64))
        .and_then(|v| v.checked_mul(h.shape.channels() as u64))
        .and_then(|v| v.checked_mul(h.dtype.size() as u64))
        .ok_or(Error::Corrupt("decoded size overflows"))?;
    if out_bytes > max_output {
        return Err(Error::TooLarge(out_bytes, max_output));
    }
    // Sections must fit the data before we size anything by them.
    let mut pos = HEADER_LEN;
    let take = |pos: &mut usize, len: u64| -> Result<std::ops::Range<usize>, Error> {
        let end = (*pos as u64).checked_add(len).filter(|&e| e <= body as u64).ok_or(Error::Corrupt("section runs past the end of the stream"))?;
        let r = *pos..end as usize;
        *pos = end as usize;
        Ok(r)
    };
    let desc = take(&mut pos, 4 * h.planes as u64)?;
    let planes = parse_plane_descriptors(&b[desc])?;
    check_planes(&h, &planes)?;
    let scale_values: u64 = planes.iter().map(|p| p.scale_values(&h.shape) as u64).sum();
    if h.scales_len as u64 != 2 * scale_values {
        return Err(Error::Corrupt("scales length does not match the planes"));
    }
    let scales = take(&mut pos, h.scales_len as u64)?;
    let quantized = matches!(planes[0], PlaneKind::Quantized(_));
    if h.exact_tokens > h.shape.tokens || (!quantized && h.exact_tokens > 0) {
        return Err(Error::Corrupt("exact token count out of range"));
    }
    let idx = take(&mut pos, 4 * h.exact_tokens as u64)?;
    let exact_tokens: Vec<usize> = b[idx].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap()) as usize).collect();
    if exact_tokens.windows(2).any(|w| w[0] >= w[1]) || exact_tokens.last().is_some_and(|&t| t >= h.shape.tokens) {
        return Err(Error::Corrupt("exact token indices are not ascending and in range"));
    }
    let row_bytes = (h.shape.channels() * h.dtype.size()) as u64;
    let exact_rows = take(&mut pos, h.exact_tokens as u64 * h.shape.tensors() as u64 * row_bytes)?;
    if h.external_tables() && h.tables_len < 4 {
        return Err(Error::Corrupt("external-table stream lacks its patch count"));
    }
    let tables = take(&mut pos, h.tables_len as u64)?;
    let want_segments = planes.len() as u64 * h.segments_per_plane() as u64;
    if h.segments as u64 != want_segments {
        return Err(Error::Corrupt("segment count does not match the shape"));
    }
    let ends = take(&mut pos, 4 * h.segments as u64)?;
    let payload = take(&mut pos, h.payload_len as u64)?;
    if pos != body {
        return Err(Error::Corrupt("stream length does not match its sections"));
    }
    let mut segments = Vec::with_capacity(h.segments);
    let mut prev = 0usize;
    for (k, e) in b[ends].chunks_exact(4).enumerate() {
        let end = u32::from_le_bytes(e.try_into().unwrap()) as usize;
        let geo = h.segment_geometry(k % h.segments_per_plane());
        if end < prev || end - prev < 4 * geo.lanes() || end > h.payload_len {
            return Err(Error::Corrupt("segment offsets are not consistent"));
        }
        segments.push((payload.start + prev, payload.start + end));
        prev = end;
    }
    if prev != h.payload_len {
        return Err(Error::Corrupt("last segment does not end at the payload end"));
    }
    Ok(Layout { header: h, planes, scales, exact_tokens, exact_rows, tables, segments })
}

/// Assemble a stream from its parts and append the checksum.
pub fn assemble(header: &Header, planes: &[PlaneKind], scales: &[u8], exact: &[u8], tables: &[u8], segment_ends: &[u32], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 4 * planes.len() + scales.len() + exact.len() + tables.len() + 4 * segment_ends.len() + payload.len() + CHECKSUM_LEN);
    header.write(&mut out);
    out.extend_from_slice(&plane_descriptors(planes));
    out.extend_from_slice(scales);
    out.extend_from_slice(exact);
    out.extend_from_slice(tables);
    for e in segment_ends {
        out.extend_from_slice(&e.to_le_bytes());
    }
    out.extend_from_slice(payload);
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

/// The plane descriptor bytes of a plan (4 bytes per plane).
pub fn plane_descriptors(planes: &[PlaneKind]) -> Vec<u8> {
    planes.iter().flat_map(|p| p.to_bytes()).collect()
}

/// Parse plane descriptors (4 bytes per plane).
pub fn parse_plane_descriptors(b: &[u8]) -> Result<Vec<PlaneKind>, Error> {
    if b.len() % 4 != 0 {
        return Err(Error::Corrupt("plane descriptors truncated"));
    }
    b.chunks_exact(4).map(|c| PlaneKind::from_bytes([c[0], c[1], c[2], c[3]])).collect()
}

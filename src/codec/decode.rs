//! Decoder: a container back to KV tensors. Every field is validated
//! against the data before anything is sized by it (`format::parse`).

use std::mem::MaybeUninit;

use half::bf16;

use super::encode::{apply_patches, TableSet};
use super::format::{self, Header, Layout, PlaneKind};
use super::quant::{self, GroupParams, QuantSpec, ScaleGroup};
use super::rans::{as_uninit, decode_segment, decode_segment_pair_values, decode_segment_values_uninit, DecodeScratch, PlaneLuts, SegmentGeometry, LANES};
use super::table::{self, FreqTable};
use super::{Error, KvTensors};

/// Bounds on what a decoder will produce from an untrusted stream.
#[derive(Clone, Copy, Debug)]
pub struct DecodeLimits {
    /// Largest decoded chunk, in bytes of the output dtype.
    pub max_output_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        // A 32K-token Llama-3-70B chunk in f16 is 10 GiB; chunks are normally far smaller.
        DecodeLimits { max_output_bytes: 16 << 30 }
    }
}

/// A validated stream with its tables parsed, ready to decode tensor by
/// tensor (tensors are independent, so callers may decode them in parallel).
pub struct Container<'a> {
    bytes: &'a [u8],
    layout: Layout,
    tables: Tables,
    /// Index of each plane's first bf16 in the scale section.
    scale_start: Vec<usize>,
}

impl<'a> Container<'a> {
    /// Validate `bytes`. Streams with external tables need `tables`.
    pub fn parse(bytes: &'a [u8], tables: Option<&TableSet>, limits: DecodeLimits) -> Result<Container<'a>, Error> {
        let layout = format::parse(bytes, limits.max_output_bytes)?;
        let h = &layout.header;
        let channels = h.shape.channels();
        let tables = if h.external_tables() {
            let set = tables.ok_or(Error::MissingTables(h.table_id))?;
            if set.id() != h.table_id {
                return Err(Error::WrongTables { got: set.id(), want: h.table_id });
            }
            if set.plan != layout.planes || set.channels != channels || set.prob_bits != h.prob_bits {
                return Err(Error::Corrupt("table set does not match the stream's planes"));
            }
            let mut t = set.tables()?;
            apply_patches(&bytes[layout.tables.clone()], &layout.planes, channels, h.prob_bits, &mut t)?;
            Tables::from_nested(&t)
        } else {
            Tables::parse_compact(&bytes[layout.tables.clone()], &layout.planes, channels, h.prob_bits)?
        };
        let mut scale_start = Vec::with_capacity(layout.planes.len());
        let mut acc = 0;
        for p in &layout.planes {
            scale_start.push(acc);
            acc += p.scale_values(&h.shape);
        }
        check_scales(bytes, &layout)?;
        Ok(Container { bytes, layout, tables, scale_start })
    }

    pub fn header(&self) -> &Header {
        &self.layout.header
    }

    pub fn planes(&self) -> &[PlaneKind] {
        &self.layout.planes
    }

    /// The frequency table that channel `c` of plane `p` is decoded with
    /// (a plane's one shared table, or the channel's own).
    pub fn table(&self, p: usize, c: usize) -> FreqTable {
        let (first, n) = self.tables.plane(p);
        let (lo, freq) = self.tables.get(first + if n == 1 { 0 } else { c });
        FreqTable { lo, freq: freq.to_vec() }
    }

    /// Sizes of the sections, for `inspect` and the benchmark.
    pub fn section_sizes(&self) -> SectionSizes {
        let h = &self.layout.header;
        SectionSizes {
            total: self.bytes.len(),
            header: format::HEADER_LEN + 4 * h.planes,
            scales: h.scales_len,
            exact: self.layout.exact_rows.end - self.layout.scales.end,
            tables: h.tables_len,
            offsets: 4 * h.segments,
            payload: h.payload_len,
            checksum: format::CHECKSUM_LEN,
        }
    }

    /// Bytes of one decoded tensor.
    pub fn tensor_bytes(&self) -> usize {
        self.header().shape.plane_elems() * self.header().dtype.size()
    }

    /// Tokens stored exactly rather than quantized.
    pub fn exact_tokens(&self) -> &[usize] {
        &self.layout.exact_tokens
    }

    /// The stored reconstruction parameters of a quantized plane's groups.
    pub fn group_params(&self, plane: usize, spec: &QuantSpec) -> Vec<GroupParams> {
        let sc = &self.bytes[self.layout.scales.clone()];
        let s = &self.header().shape;
        let n = spec.group.count(s.tokens, s.channels(), s.head_dim);
        let at = |i: usize| bf16::from_le_bytes([sc[2 * i], sc[2 * i + 1]]).to_f32();
        let base = self.scale_start[plane];
        (0..n)
            .map(|g| {
                if spec.asymmetric {
                    GroupParams { offset: at(base + 2 * g), step: at(base + 2 * g + 1) }
                } else {
                    GroupParams { offset: 0.0, step: at(base + g) }
                }
            })
            .collect()
    }

    fn decode_plane<F: FnMut(usize, &SegmentGeometry, &[u8], usize)>(&self, plane: usize, scratch: &mut (DecodeScratch, PlaneLuts), mut sink: F) -> Result<(), Error> {
        let h = self.header();
        let kind = &self.layout.planes[plane];
        let (scratch, luts) = scratch;
        // Lookup tables once per plane, shared by all of its segments.
        let (first, count) = self.tables.plane(plane);
        luts.build_with(count, |t| self.tables.get(first + t))?;
        let per_plane = h.segments_per_plane();
        for k in 0..per_plane {
            let (a, b) = self.layout.segments[plane * per_plane + k];
            let geo = h.segment_geometry(k);
            decode_segment(&geo, &self.bytes[a..b], luts, |c| kind.table_index(c), scratch, |g, tile, lanes| sink(g, &geo, tile, lanes))?;
        }
        Ok(())
    }

    /// Decode tensor `i` (layer `i / streams`, stream `i % streams`) into
    /// `out`, which must hold `tensor_bytes()` bytes.
    pub fn decode_tensor(&self, i: usize, out: &mut [u8]) -> Result<(), Error> {
        self.decode_tensor_with(i, out, &mut (DecodeScratch::new(), PlaneLuts::new(self.header().prob_bits)))
    }

    /// `decode_tensor` with scratch buffers reused from earlier tensors (the
    /// lookup tables of a plane are a few hundred KiB to allocate and fault in).
    fn decode_tensor_with(&self, i: usize, out: &mut [u8], scratch: &mut (DecodeScratch, PlaneLuts)) -> Result<(), Error> {
        let h = self.header();
        let shape = h.shape;
        if i >= shape.tensors() || out.len() != self.tensor_bytes() {
            return Err(Error::Invalid("tensor index or output size out of range".into()));
        }
        let channels = shape.channels();
        let head_dim = shape.head_dim;
        let dtype = h.dtype;
        let size = dtype.size();
        let per_tensor = self.layout.planes.len() / shape.tensors();
        match self.layout.planes[i * per_tensor] {
            PlaneKind::Quantized(spec) if spec.group == ScaleGroup::PerTensor => {
                if self.decode_valued(i, as_uninit(out), scratch)? {
                    return Ok(());
                }
                // One step for the whole tensor: every symbol has one output
                // value, so dequantization is a 256-entry table lookup.
                let lut = self.value_lut(i, &spec);
                // Element sizes as constants, so each store is one move.
                fn run<const N: usize>(c: &Container, i: usize, scratch: &mut (DecodeScratch, PlaneLuts), lut: &[u8], out: &mut [u8], channels: usize) -> Result<(), Error> {
                    let lut: Vec<[u8; N]> = lut.chunks_exact(N).take(256).map(|b| b.try_into().unwrap()).collect();
                    c.decode_plane(i, scratch, |g, geo, tile, lanes| {
                        let c0 = LANES * g;
                        for (r, row) in tile.chunks_exact(LANES).enumerate() {
                            let at = ((geo.token_begin + r) * channels + c0) * N;
                            for (dst, &s) in out[at..at + lanes * N].chunks_exact_mut(N).zip(&row[..lanes]) {
                                let dst: &mut [u8; N] = dst.try_into().unwrap();
                                *dst = lut[s as usize];
                            }
                        }
                    })
                }
                match size {
                    1 => run::<1>(self, i, &mut *scratch, &lut, out, channels)?,
                    2 => run::<2>(self, i, &mut *scratch, &lut, out, channels)?,
                    _ => run::<4>(self, i, &mut *scratch, &lut, out, channels)?,
                }
                self.overwrite_exact_tokens(i, as_uninit(out));
                Ok(())
            }
            PlaneKind::Quantized(spec) => {
                let params = self.group_params(i, &spec);
                // x = s * step + base, with base = offset (asymmetric) or -max * step.
                let coef = |p: GroupParams| if spec.asymmetric { (p.step, p.offset) } else { (p.step, -(spec.max as f32) * p.step) };
                let mut vals = [0f32; LANES];
                self.decode_plane(i, &mut *scratch, |g, geo, tile, lanes| {
                    let c0 = LANES * g;
                    let per_lane: Vec<(f32, f32)> = match spec.group {
                        ScaleGroup::PerChannel => (0..lanes).map(|l| coef(params[c0 + l])).collect(),
                        _ => Vec::new(),
                    };
                    for (r, row) in tile.chunks_exact(LANES).enumerate() {
                        let t = geo.token_begin + r;
                        match spec.group {
                            ScaleGroup::PerChannel => {
                                for l in 0..lanes {
                                    vals[l] = row[l] as f32 * per_lane[l].0 + per_lane[l].1;
                                }
                            }
                            ScaleGroup::PerToken | ScaleGroup::PerTensor => {
                                let (step, base) = coef(params[spec.group.index(t, 0, channels, head_dim)]);
                                for l in 0..lanes {
                                    vals[l] = row[l] as f32 * step + base;
                                }
                            }
                            ScaleGroup::PerTokenHead => {
                                for l in 0..lanes {
                                    let (step, base) = coef(params[ScaleGroup::PerTokenHead.index(t, c0 + l, channels, head_dim)]);
                                    vals[l] = row[l] as f32 * step + base;
                                }
                            }
                        }
                        let at = (t * channels + c0) * size;
                        quant::store_row(dtype, &vals[..lanes], &mut out[at..at + lanes * size]);
                    }
                })?;
                self.overwrite_exact_tokens(i, as_uninit(out));
                Ok(())
            }
            PlaneKind::Raw { .. } => {
                for b in 0..per_tensor {
                    let byte = size - 1 - b;
                    self.decode_plane(i * per_tensor + b, &mut *scratch, |g, geo, tile, lanes| {
                        for (r, row) in tile.chunks_exact(LANES).enumerate() {
                            let at = ((geo.token_begin + r) * channels + LANES * g) * size + byte;
                            for (l, &s) in row[..lanes].iter().enumerate() {
                                out[at + l * size] = s;
                            }
                        }
                    })?;
                }
                Ok(())
            }
        }
    }

    /// Output value of every symbol of a per-tensor-step plane, as `dtype` bytes.
    fn value_lut(&self, i: usize, spec: &QuantSpec) -> [u8; 256 * 4] {
        let p = self.group_params(i, spec)[0];
        let mut lut = [0u8; 256 * 4];
        for s in 0..256usize {
            let v = if spec.asymmetric { s as f32 * p.step + p.offset } else { s as f32 * p.step + -(spec.max as f32) * p.step };
            quant::store(self.header().dtype, &mut lut, s, v);
        }
        lut
    }

    /// Tensor `i` by the decoder that writes output values straight from
    /// its lookup tables, where it applies (a per-tensor step, 16-bit
    /// values, `prob_bits` 8); Ok(false) where it does not, with `out`
    /// untouched. On Ok(true) every byte of `out` (`tensor_bytes()` long)
    /// has been written: the segments of a plane tile its tokens and
    /// channels (`Header::segment_geometry`), each is written whole by
    /// `decode_segment_values_uninit` or its pair form, and the exact
    /// tokens' rows are then written over.
    fn decode_valued(&self, i: usize, out: &mut [MaybeUninit<u8>], scratch: &mut (DecodeScratch, PlaneLuts)) -> Result<bool, Error> {
        let h = self.header();
        let per_tensor = self.layout.planes.len() / h.shape.tensors();
        let spec = match self.layout.planes[i * per_tensor] {
            PlaneKind::Quantized(spec) if spec.group == ScaleGroup::PerTensor && h.dtype.size() == 2 && h.prob_bits == 8 => spec,
            _ => return Ok(false),
        };
        if out.len() != self.tensor_bytes() {
            return Err(Error::Invalid("tensor index or output size out of range".into()));
        }
        let lut = self.value_lut(i, &spec);
        // The output values go into the lookup entries: the decoder writes
        // the output directly, no symbol tile.
        let value: [u16; 256] = std::array::from_fn(|s| u16::from_le_bytes([lut[2 * s], lut[2 * s + 1]]));
        let (scratch, luts) = &mut *scratch;
        let (first, count) = self.tables.plane(i);
        luts.build_valued(count, |t| self.tables.get(first + t), &value)?;
        let per_plane = h.segments_per_plane();
        let channels = h.shape.channels();
        let simd = super::rans::simd_enabled();
        // Token blocks of a channel block two at a time (their
        // dependency chains overlap), then any single one left.
        let seg = |k: usize| {
            let (a, b) = self.layout.segments[i * per_plane + k];
            (h.segment_geometry(k), &self.bytes[a..b])
        };
        let mut k = 0;
        while k < per_plane {
            let (ga, ba) = seg(k);
            if k + 1 < per_plane {
                let (gb, bb) = seg(k + 1);
                if gb.group_begin == ga.group_begin {
                    decode_segment_pair_values([&ga, &gb], [ba, bb], luts, |c| c, scratch, out, channels, simd)?;
                    k += 2;
                    continue;
                }
            }
            decode_segment_values_uninit(&ga, ba, luts, |c| c, scratch, out, channels, simd)?;
            k += 1;
        }
        self.overwrite_exact_tokens(i, out);
        Ok(true)
    }

    /// Exact tokens: their raw rows replace the placeholder symbols.
    fn overwrite_exact_tokens(&self, i: usize, out: &mut [MaybeUninit<u8>]) {
        let row = self.header().shape.channels() * self.header().dtype.size();
        let n = self.layout.exact_tokens.len();
        let raw = &self.bytes[self.layout.exact_rows.clone()];
        for (k, &t) in self.layout.exact_tokens.iter().enumerate() {
            let src = &raw[(i * n + k) * row..(i * n + k + 1) * row];
            for (d, &b) in out[t * row..(t + 1) * row].iter_mut().zip(src) {
                d.write(b);
            }
        }
    }

    /// Decode every tensor.
    pub fn decode(&self) -> Result<KvTensors, Error> {
        let h = self.header();
        let mut tensors = Vec::with_capacity(h.shape.tensors());
        let mut scratch = (DecodeScratch::new(), PlaneLuts::new(h.prob_bits));
        let n = self.tensor_bytes();
        for i in 0..h.shape.tensors() {
            // Not zeroed first where the decoder writes every byte anyway.
            let mut out = Vec::with_capacity(n);
            if self.decode_valued(i, &mut out.spare_capacity_mut()[..n], &mut scratch)? {
                // SAFETY: decode_valued returned true, so it wrote all n bytes.
                unsafe { out.set_len(n) };
            } else {
                out.resize(n, 0);
                self.decode_tensor_with(i, &mut out, &mut scratch)?;
            }
            tensors.push(out);
        }
        Ok(KvTensors { shape: h.shape, dtype: h.dtype, tensors })
    }
}

/// The frequency tables of every plane, flat (one allocation per field
/// rather than one per table: a stream has a table per channel of every
/// plane, 11,520 in a 30-layer chunk of 192 channels).
struct Tables {
    lo: Vec<u8>,
    /// End of table `t`'s frequencies in `freq`.
    end: Vec<u32>,
    freq: Vec<u16>,
    /// Index of each plane's first table, and one past the last plane's.
    plane_first: Vec<usize>,
}

impl Tables {
    /// Parse a stream's compact tables: exactly the checks (and errors) of
    /// `encode::parse_tables` with `TableEncoding::Compact`.
    fn parse_compact(bytes: &[u8], plan: &[PlaneKind], channels: usize, prob_bits: u32) -> Result<Tables, Error> {
        let total: usize = plan.iter().map(|p| p.tables(channels)).sum();
        // Each compact table is at least 3 bytes (checked per plane below;
        // this only bounds the allocations).
        let cap = total.min(bytes.len() / 3);
        let mut t = Tables { lo: Vec::with_capacity(cap), end: Vec::with_capacity(cap), freq: Vec::with_capacity(bytes.len() * 2), plane_first: Vec::with_capacity(plan.len() + 1) };
        let mut pos = 0;
        for p in plan {
            let n = p.tables(channels);
            if bytes.len() - pos < 3 * n {
                return Err(Error::Corrupt("table section truncated"));
            }
            t.plane_first.push(t.lo.len());
            for _ in 0..n {
                t.lo.push(table::read_compact_into(bytes, &mut pos, p.nsym(), prob_bits, &mut t.freq)?);
                t.end.push(t.freq.len() as u32);
            }
        }
        if pos != bytes.len() {
            return Err(Error::Corrupt("table section has trailing bytes"));
        }
        t.plane_first.push(t.lo.len());
        Ok(t)
    }

    fn from_nested(planes: &[Vec<FreqTable>]) -> Tables {
        let mut t = Tables { lo: Vec::new(), end: Vec::new(), freq: Vec::new(), plane_first: Vec::with_capacity(planes.len() + 1) };
        for p in planes {
            t.plane_first.push(t.lo.len());
            for tab in p {
                t.lo.push(tab.lo);
                t.freq.extend_from_slice(&tab.freq);
                t.end.push(t.freq.len() as u32);
            }
        }
        t.plane_first.push(t.lo.len());
        t
    }

    /// First table and table count of plane `p`.
    fn plane(&self, p: usize) -> (usize, usize) {
        (self.plane_first[p], self.plane_first[p + 1] - self.plane_first[p])
    }

    /// `(lo, freq)` of table `t` (global index).
    fn get(&self, t: usize) -> (u8, &[u16]) {
        let a = if t == 0 { 0 } else { self.end[t - 1] as usize };
        (self.lo[t], &self.freq[a..self.end[t] as usize])
    }
}

/// Steps must be finite and non-negative, offsets finite: the encoder never
/// writes anything else, and such values would reach the output. Part of
/// [`Container::parse`]; decoders that build their own tables (the GPU's)
/// call it after [`format::parse`].
pub fn check_scales(bytes: &[u8], layout: &Layout) -> Result<(), Error> {
    let sc = &bytes[layout.scales.clone()];
    let shape = &layout.header.shape;
    let at = |i: usize| bf16::from_le_bytes([sc[2 * i], sc[2 * i + 1]]).to_f32();
    let mut base = 0;
    for p in &layout.planes {
        if let PlaneKind::Quantized(spec) = p {
            let n = spec.group.count(shape.tokens, shape.channels(), shape.head_dim);
            let bad = if spec.asymmetric {
                (0..n).any(|g| !(at(base + 2 * g).is_finite() && at(base + 2 * g + 1).is_finite() && at(base + 2 * g + 1) >= 0.0))
            } else {
                (0..n).any(|g| !(at(base + g).is_finite() && at(base + g) >= 0.0))
            };
            if bad {
                return Err(Error::Corrupt("scale is not finite and non-negative"));
            }
        }
        base += p.scale_values(shape);
    }
    Ok(())
}

/// Byte counts of a stream's sections.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SectionSizes {
    pub total: usize,
    /// Header plus plane descriptors.
    pub header: usize,
    pub scales: usize,
    /// Exact-token indices and rows.
    pub exact: usize,
    pub tables: usize,
    pub offsets: usize,
    pub payload: usize,
    pub checksum: usize,
}

/// Decode a self-contained stream (or one whose table set is given).
pub fn decode(bytes: &[u8], tables: Option<&TableSet>) -> Result<KvTensors, Error> {
    decode_with_limits(bytes, tables, DecodeLimits::default())
}

pub fn decode_with_limits(bytes: &[u8], tables: Option<&TableSet>, limits: DecodeLimits) -> Result<KvTensors, Error> {
    Container::parse(bytes, tables, limits)?.decode()
}

/// Read-only views of a validated stream for decoders outside this module
/// (the GPU decoder in `src/gpu` builds its device descriptors from them).
impl<'a> Container<'a> {
    /// Byte ranges of the stream's sections (validated by `parse`).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The stream's bytes.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
}

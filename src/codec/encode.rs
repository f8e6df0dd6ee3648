//! Encoder: KV tensors to a container (see `format`).

use xxhash_rust::xxh3::xxh3_64;

use super::format::{self, Header, PlaneKind, FLAG_EXTERNAL_TABLES, MAX_PROB_BITS, MIN_PROB_BITS};
use super::quant::{self, GroupParams, QuantSpec};
use super::rans::{encode_segment, LANES};
use super::table::{self, EncSymbol, FreqTable, TableEncoding};
use super::{Error, KvShape, KvTensors, Level};

/// Where the probability tables go.
#[derive(Clone, Copy, Debug, Default)]
pub enum Tables<'a> {
    /// Built from this chunk and stored in the stream (self-contained).
    #[default]
    Embedded,
    /// Calibrated once, stored once elsewhere, referenced by id.
    External(&'a TableSet),
}

/// Encoder settings.
#[derive(Clone, Debug, Default)]
pub struct EncodeOptions<'a> {
    pub level: Option<Level>,
    /// Override the level's per-plane coding (experiments, baselines).
    pub plan: Option<Vec<PlaneKind>>,
    pub prob_bits: Option<u32>,
    pub tables: Tables<'a>,
}

impl EncodeOptions<'_> {
    pub fn level(level: Level) -> Self {
        EncodeOptions { level: Some(level), ..Default::default() }
    }
}

/// Probability tables calibrated once (per model namespace and level) and
/// referenced from streams by `id`, so chunks need not carry them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSet {
    pub prob_bits: u32,
    pub channels: usize,
    pub plan: Vec<PlaneKind>,
    /// Exact tables of every plane, in plane order.
    pub table_bytes: Vec<u8>,
}

const TABLESET_MAGIC: [u8; 4] = *b"CGTS";

impl TableSet {
    /// XXH3-64 of the table bytes: what streams store as `table_id`.
    pub fn id(&self) -> u64 {
        xxh3_64(&self.table_bytes)
    }

    /// Parse into per-plane tables.
    pub fn tables(&self) -> Result<Vec<Vec<FreqTable>>, Error> {
        parse_tables(&self.table_bytes, &self.plan, self.channels, self.prob_bits, TableEncoding::Exact)
    }

    /// Self-describing bytes for storage: magic, prob_bits, channels, plane
    /// count, plane descriptors, table length, tables, XXH3-64 checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&TABLESET_MAGIC);
        out.push(self.prob_bits as u8);
        out.extend_from_slice(&(self.channels as u32).to_le_bytes());
        out.extend_from_slice(&(self.plan.len() as u32).to_le_bytes());
        let desc = format::plane_descriptors(&self.plan);
        out.extend_from_slice(&desc);
        out.extend_from_slice(&(self.table_bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.table_bytes);
        let sum = xxh3_64(&out);
        out.extend_from_slice(&sum.to_le_bytes());
        out
    }

    pub fn from_bytes(b: &[u8]) -> Result<TableSet, Error> {
        let bad = Error::Corrupt("table set truncated or malformed");
        if b.len() < 4 + 1 + 8 + 4 + 8 || b[..4] != TABLESET_MAGIC {
            return Err(Error::BadMagic);
        }
        let body = b.len() - 8;
        if xxh3_64(&b[..body]) != u64::from_le_bytes(b[body..].try_into().unwrap()) {
            return Err(Error::Checksum);
        }
        let prob_bits = b[4] as u32;
        if !(MIN_PROB_BITS..=MAX_PROB_BITS).contains(&prob_bits) {
            return Err(Error::Corrupt("prob_bits out of range"));
        }
        let channels = u32::from_le_bytes(b[5..9].try_into().unwrap()) as usize;
        let planes = u32::from_le_bytes(b[9..13].try_into().unwrap()) as usize;
        let desc_end = 13usize.checked_add(planes.checked_mul(4).ok_or(Error::Corrupt("plane count overflows"))?).filter(|&e| e + 4 <= body).ok_or(bad)?;
        let plan = format::parse_plane_descriptors(&b[13..desc_end])?;
        let tlen = u32::from_le_bytes(b[desc_end..desc_end + 4].try_into().unwrap()) as usize;
        if desc_end + 4 + tlen != body {
            return Err(Error::Corrupt("table set length does not match"));
        }
        let set = TableSet { prob_bits, channels, plan, table_bytes: b[desc_end + 4..body].to_vec() };
        set.tables()?;
        Ok(set)
    }
}

/// Parse the tables of every plane; the bytes must be consumed exactly.
pub fn parse_tables(bytes: &[u8], plan: &[PlaneKind], channels: usize, prob_bits: u32, encoding: TableEncoding) -> Result<Vec<Vec<FreqTable>>, Error> {
    let mut pos = 0;
    let mut out = Vec::with_capacity(plan.len());
    for p in plan {
        let n = p.tables(channels);
        // Each compact table is at least 3 bytes: refuse before allocating.
        if bytes.len() - pos < 3 * n {
            return Err(Error::Corrupt("table section truncated"));
        }
        let mut tables = Vec::with_capacity(n);
        for _ in 0..n {
            tables.push(match encoding {
                TableEncoding::Compact => table::read_compact(bytes, &mut pos, p.nsym(), prob_bits)?,
                TableEncoding::Exact => table::read_exact(bytes, &mut pos, p.nsym(), prob_bits)?,
            });
        }
        out.push(tables);
    }
    if pos != bytes.len() {
        return Err(Error::Corrupt("table section has trailing bytes"));
    }
    Ok(out)
}

/// Symbols and scale bytes of one plane.
struct PlaneSymbols {
    symbols: Vec<u8>,
    scales: Vec<u8>,
}

fn quantize_tensor(values: &[f32], shape: &KvShape, spec: &QuantSpec) -> Result<PlaneSymbols, Error> {
    let (t, c, d) = (shape.tokens, shape.channels(), shape.head_dim);
    let params = quant::group_params(values, t, c, d, spec)?;
    let symbols = quant::quantize_plane(values, t, c, d, spec, &params);
    Ok(PlaneSymbols { symbols, scales: scale_bytes(&params, spec) })
}

fn scale_bytes(params: &[GroupParams], spec: &QuantSpec) -> Vec<u8> {
    let mut out = Vec::with_capacity(params.len() * 4);
    for p in params {
        if spec.asymmetric {
            out.extend_from_slice(&half::bf16::from_f32(p.offset).to_le_bytes());
        }
        out.extend_from_slice(&half::bf16::from_f32(p.step).to_le_bytes());
    }
    out
}

/// Byte `index` (0 = most significant) of every element.
fn raw_byte_plane(bytes: &[u8], elem: usize, index: usize) -> Vec<u8> {
    bytes.chunks_exact(elem).map(|e| e[elem - 1 - index]).collect()
}

/// Segment size: about 1024 symbols per lane so the per-lane state (4 bytes)
/// stays near 1% of the lane, and token blocks of at most 256 so a GPU gets
/// enough segments from long chunks.
pub fn choose_segments(tokens: usize, channels: usize) -> (usize, usize) {
    let blocks = tokens.div_ceil(256);
    let seg_tokens = tokens.div_ceil(blocks);
    let groups = channels.div_ceil(LANES);
    let seg_groups = 1024usize.div_ceil(seg_tokens).clamp(1, groups);
    (seg_tokens, seg_groups)
}

fn plan_for(kv: &KvTensors, opts: &EncodeOptions) -> Result<(Vec<PlaneKind>, u32, Level), Error> {
    let level = opts.level.unwrap_or(Level::Default);
    let plan = match (&opts.plan, opts.tables) {
        (Some(p), _) => p.clone(),
        (None, Tables::External(set)) => set.plan.clone(),
        (None, Tables::Embedded) => level.plan(&kv.shape, kv.dtype),
    };
    let prob_bits = match opts.tables {
        Tables::External(set) => set.prob_bits,
        Tables::Embedded => opts.prob_bits.unwrap_or(level.prob_bits()),
    };
    if !(MIN_PROB_BITS..=MAX_PROB_BITS).contains(&prob_bits) {
        return Err(Error::Invalid(format!("prob_bits must be in {MIN_PROB_BITS}..={MAX_PROB_BITS}")));
    }
    let t = kv.shape.tensors();
    let bytes = kv.dtype.size();
    let ok = (plan.len() == t && plan.iter().all(|p| matches!(p, PlaneKind::Quantized(q) if q.max >= 1 && q.max <= 127)))
        || (plan.len() == t * bytes && plan.iter().enumerate().all(|(i, p)| matches!(p, PlaneKind::Raw { index, .. } if *index as usize == i % bytes)));
    if !ok {
        return Err(Error::Invalid("plan does not match the tensors and dtype".into()));
    }
    Ok((plan, prob_bits, level))
}

fn plane_symbols(kv: &KvTensors, plan: &[PlaneKind]) -> Result<Vec<PlaneSymbols>, Error> {
    let per_tensor = plan.len() / kv.shape.tensors();
    let mut out = Vec::with_capacity(plan.len());
    for (i, p) in plan.iter().enumerate() {
        let tensor = &kv.tensors[i / per_tensor];
        out.push(match p {
            PlaneKind::Quantized(spec) => quantize_tensor(&quant::to_f32(kv.dtype, tensor), &kv.shape, spec)?,
            PlaneKind::Raw { index, .. } => PlaneSymbols { symbols: raw_byte_plane(tensor, kv.dtype.size(), *index as usize), scales: Vec::new() },
        });
    }
    Ok(out)
}

/// Histogram of each table of a plane.
fn histograms(sym: &[u8], plane: &PlaneKind, channels: usize) -> Vec<[u32; 256]> {
    let mut h = vec![[0u32; 256]; plane.tables(channels)];
    for row in sym.chunks_exact(channels) {
        for (c, &s) in row.iter().enumerate() {
            h[plane.table_index(c)][s as usize] += 1;
        }
    }
    h
}

/// Encode one chunk.
pub fn encode(kv: &KvTensors, opts: &EncodeOptions) -> Result<Vec<u8>, Error> {
    kv.validate()?;
    let (plan, prob_bits, level) = plan_for(kv, opts)?;
    let shape = kv.shape;
    let channels = shape.channels();
    let planes = plane_symbols(kv, &plan)?;

    // Probability tables: from this chunk, or the external set.
    let mut table_bytes = Vec::new();
    let tables: Vec<Vec<FreqTable>> = match opts.tables {
        Tables::Embedded => {
            let mut all = Vec::with_capacity(plan.len());
            for (p, ps) in plan.iter().zip(&planes) {
                let mut tabs = Vec::new();
                for h in histograms(&ps.symbols, p, channels) {
                    let (lo, codes) = table::codes_from_histogram(&h[..p.nsym()]);
                    table::write_compact(&mut table_bytes, lo, &codes);
                    tabs.push(table::table_from_codes(lo, &codes, prob_bits)?);
                }
                all.push(tabs);
            }
            all
        }
        Tables::External(set) => {
            if set.channels != channels || set.plan != plan {
                return Err(Error::Invalid("table set was calibrated for another shape or level".into()));
            }
            let all = set.tables()?;
            for ((p, ps), tabs) in plan.iter().zip(&planes).zip(&all) {
                for (k, h) in histograms(&ps.symbols, p, channels).iter().enumerate() {
                    if (0..256).any(|s| h[s] > 0 && tabs[k].freq_of(s as u8) == 0) {
                        return Err(Error::Invalid("table set gives zero probability to a symbol in this chunk".into()));
                    }
                }
            }
            all
        }
    };

    // Entropy-code every segment.
    let (seg_tokens, seg_groups) = choose_segments(shape.tokens, channels);
    let mut header = Header {
        flags: 0,
        dtype: kv.dtype,
        shape,
        level: level.number(),
        prob_bits,
        seg_tokens,
        seg_groups,
        table_id: 0,
        planes: plan.len(),
        scales_len: planes.iter().map(|p| p.scales.len()).sum(),
        tables_len: table_bytes.len(),
        segments: 0,
        payload_len: 0,
    };
    let per_plane = header.segments_per_plane();
    let mut payload = Vec::new();
    let mut ends = Vec::with_capacity(per_plane * plan.len());
    let mut words = Vec::new();
    for ((p, ps), tabs) in plan.iter().zip(&planes).zip(&tables) {
        let enc: Vec<Box<[EncSymbol; 256]>> = tabs.iter().map(|t| enc_symbols(t, prob_bits)).collect();
        let by_channel: Vec<&[EncSymbol; 256]> = (0..channels).map(|c| &*enc[p.table_index(c)]).collect();
        for k in 0..per_plane {
            let geo = header.segment_geometry(k);
            encode_segment(&geo, &ps.symbols, channels, &by_channel, prob_bits, &mut payload, &mut words);
            if payload.len() > u32::MAX as usize {
                return Err(Error::Invalid("encoded chunk exceeds 4 GiB; use smaller chunks".into()));
            }
            ends.push(payload.len() as u32);
        }
    }
    header.segments = ends.len();
    header.payload_len = payload.len();
    if let Tables::External(set) = opts.tables {
        header.flags |= FLAG_EXTERNAL_TABLES;
        header.table_id = set.id();
        header.tables_len = 0;
    } else {
        header.table_id = xxh3_64(&table_bytes);
    }
    let scales: Vec<u8> = planes.iter().flat_map(|p| p.scales.iter().copied()).collect();
    Ok(format::assemble(&header, &plan, &scales, &table_bytes, &ends, &payload))
}

fn enc_symbols(t: &FreqTable, prob_bits: u32) -> Box<[EncSymbol; 256]> {
    let mut out = Box::new([EncSymbol::default(); 256]);
    let cum = t.cumulative();
    for s in 0..256 {
        let f = cum[s + 1] - cum[s];
        if f > 0 {
            out[s] = EncSymbol::new(cum[s], f, prob_bits);
        }
    }
    out
}

/// Calibrate model-level tables for `level` from sample chunks (all of one
/// shape and dtype). Every symbol of each plane's alphabet gets a non-zero
/// probability, so any later chunk can be coded with the set.
pub fn calibrate_tables(samples: &[&KvTensors], level: Level) -> Result<TableSet, Error> {
    let first = samples.first().ok_or_else(|| Error::Invalid("calibration needs at least one sample".into()))?;
    let channels = first.shape.channels();
    let plan = level.plan(&first.shape, first.dtype);
    let prob_bits = level.prob_bits();
    let mut hist: Vec<Vec<[u64; 256]>> = plan.iter().map(|p| vec![[0u64; 256]; p.tables(channels)]).collect();
    for kv in samples {
        kv.validate()?;
        if kv.shape.channels() != channels || kv.shape.tensors() != first.shape.tensors() || kv.dtype != first.dtype {
            return Err(Error::Invalid("calibration samples differ in shape or dtype".into()));
        }
        let planes = plane_symbols(kv, &plan)?;
        for ((p, ps), hs) in plan.iter().zip(&planes).zip(hist.iter_mut()) {
            for (k, h) in histograms(&ps.symbols, p, channels).iter().enumerate() {
                for s in 0..256 {
                    hs[k][s] += h[s] as u64;
                }
            }
        }
    }
    let mut table_bytes = Vec::new();
    for (p, hs) in plan.iter().zip(&hist) {
        for h in hs {
            // Scale counts to about 2^20 and add 1 everywhere in the
            // alphabet: unseen symbols stay codable at the smallest frequency.
            let total: u64 = h[..p.nsym()].iter().sum::<u64>().max(1);
            let weights: Vec<u32> = h[..p.nsym()].iter().map(|&c| ((c << 20) / total) as u32 + 1).collect();
            let freq = table::normalize(&weights, prob_bits)?;
            table::write_exact(&mut table_bytes, &FreqTable { lo: 0, freq });
        }
    }
    Ok(TableSet { prob_bits, channels, plan, table_bytes })
}

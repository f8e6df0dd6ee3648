//! Encoder: KV tensors to a container (see `format`).

use xxhash_rust::xxh3::xxh3_64;

use super::format::{self, Header, PlaneKind, FLAG_EXTERNAL_TABLES, MAX_PROB_BITS, MIN_PROB_BITS};
use super::quant::{self, GroupParams, QuantSpec, ScaleGroup, StepRule};
use super::rans::{self, encode_segment, encode_segment_flat, FlatEncTables, LANES};
use super::table::{self, EncTable, FreqTable, TableEncoding};
use super::{Dtype, Error, KvShape, KvTensors, Level};

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
    /// Per-tensor step multipliers (a model's sensitivity profile), in
    /// tensor order (layer-major, key then value).
    pub profile: Option<Vec<f32>>,
    /// Override how steps are chosen for a custom `plan` (default: range).
    pub rules: Option<Vec<StepRule>>,
    /// Store attention-sink-like outlier tokens exactly (default: on for lossy levels).
    pub protect_outliers: Option<bool>,
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
    /// Exact tables of every plane, in plane order (private: `id` is
    /// derived from them once, at construction).
    table_bytes: Vec<u8>,
    /// XXH3-64 of `table_bytes`. Every chunk encoded or decoded with the set
    /// checks it; hashing megabytes of tables per chunk would cost more than
    /// the chunk's header and patches.
    id: u64,
}

const TABLESET_MAGIC: [u8; 4] = *b"CGTS";

impl TableSet {
    fn new(prob_bits: u32, channels: usize, plan: Vec<PlaneKind>, table_bytes: Vec<u8>) -> TableSet {
        let id = xxh3_64(&table_bytes);
        TableSet { prob_bits, channels, plan, table_bytes, id }
    }

    /// XXH3-64 of the table bytes: what streams store as `table_id`.
    pub fn id(&self) -> u64 {
        self.id
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
        let set = TableSet::new(prob_bits, channels, plan, b[desc_end + 4..body].to_vec());
        set.tables()?;
        Ok(set)
    }
}

/// Apply a stream's table patches (count, then per patch a u32 global table
/// index, ascending, and a compact table) to tables from a set.
pub fn apply_patches(bytes: &[u8], plan: &[PlaneKind], channels: usize, prob_bits: u32, tables: &mut [Vec<FreqTable>]) -> Result<(), Error> {
    walk_patches(bytes, plan, channels, |plane, k, mut pos| {
        tables[plane][k] = table::read_compact(bytes, &mut pos, plan[plane].nsym(), prob_bits)?;
        Ok(pos)
    })
}

/// Walk a patch section: check its count, the order and range of its table
/// indices, and that its bytes are consumed exactly; for each patch call
/// `table(plane, table index within the plane, position of its compact
/// table)`, which reads (or checks) that table and returns where it ends.
/// Shared by [`apply_patches`] and the GPU decoder's host checks.
pub fn walk_patches(bytes: &[u8], plan: &[PlaneKind], channels: usize, mut table: impl FnMut(usize, usize, usize) -> Result<usize, Error>) -> Result<(), Error> {
    let count = u32::from_le_bytes(bytes.get(..4).ok_or(Error::Corrupt("patch count missing"))?.try_into().unwrap()) as usize;
    let total: usize = plan.iter().map(|p| p.tables(channels)).sum();
    // Each patch is at least 4 + 3 bytes: refuse impossible counts up front.
    if count > total || count.saturating_mul(7) > bytes.len() - 4 {
        return Err(Error::Corrupt("patch count out of range"));
    }
    let mut pos = 4;
    let mut prev: Option<usize> = None;
    // The plane holding the current index and its first global index
    // (indices ascend, so the search only moves forward).
    let (mut plane, mut base) = (0usize, 0usize);
    for _ in 0..count {
        let idx = u32::from_le_bytes(bytes.get(pos..pos + 4).ok_or(Error::Corrupt("patch truncated"))?.try_into().unwrap()) as usize;
        pos += 4;
        if idx >= total || prev.is_some_and(|p| idx <= p) {
            return Err(Error::Corrupt("patch indices are not ascending and in range"));
        }
        prev = Some(idx);
        while base + plan[plane].tables(channels) <= idx {
            base += plan[plane].tables(channels);
            plane += 1;
        }
        pos = table(plane, idx - base, pos)?;
    }
    if pos != bytes.len() {
        return Err(Error::Corrupt("patch section has trailing bytes"));
    }
    Ok(())
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

/// Symbols and scale bytes of one plane, the weight codes `(lo, codes)` of
/// each of its tables, and (only where asked for) each table's histogram.
struct PlaneSymbols {
    symbols: Vec<u8>,
    scales: Vec<u8>,
    hist: Vec<[u32; 256]>,
    /// Every table's codes, one after another (no allocation per table).
    codes: Vec<u8>,
    /// Each table's `lo` and the end of its codes in `codes`.
    code_tabs: Vec<(u8, u32)>,
}

impl PlaneSymbols {
    /// The weight codes of each table, in order.
    fn table_codes(&self) -> impl Iterator<Item = (u8, &[u8])> + '_ {
        let starts = std::iter::once(0).chain(self.code_tabs.iter().map(|&(_, e)| e as usize));
        self.code_tabs.iter().zip(starts).map(|(&(lo, end), start)| (lo, &self.codes[start..end as usize]))
    }

    /// `hists` yields each table's histogram as `(offset, part)`: the part
    /// from symbol `offset` on, outside which it is zero.
    fn new(symbols: Vec<u8>, scales: Vec<u8>, hist: Vec<[u32; 256]>, hists: &mut dyn Iterator<Item = (usize, &[u32])>) -> PlaneSymbols {
        let mut codes = Vec::new();
        let mut code_tabs = Vec::new();
        for (offset, h) in hists {
            let lo = table::codes_from_histogram_window(h, offset, &mut codes);
            code_tabs.push((lo, codes.len() as u32));
        }
        PlaneSymbols { symbols, scales, hist, codes, code_tabs }
    }
}

/// The frequencies of one plane's tables, one after another.
#[derive(Default)]
struct PlaneFreqs {
    lo: Vec<u8>,
    /// End of table `k`'s frequencies in `freq`.
    end: Vec<u32>,
    freq: Vec<u16>,
}

impl PlaneFreqs {
    fn clear(&mut self) {
        self.lo.clear();
        self.end.clear();
        self.freq.clear();
    }
    fn table(&self, k: usize) -> (u8, &[u16]) {
        let start = if k == 0 { 0 } else { self.end[k - 1] as usize };
        (self.lo[k], &self.freq[start..self.end[k] as usize])
    }
}

/// Each channel's smallest and largest symbol in a plane, kept while
/// counting (a few vector min/max per row), so that building the codes
/// reads only the used part of each histogram.
struct ChannelRanges {
    lo: Vec<u8>,
    hi: Vec<u8>,
}

impl ChannelRanges {
    fn new(channels: usize) -> ChannelRanges {
        ChannelRanges { lo: vec![u8::MAX; channels], hi: vec![0; channels] }
    }

    /// Widen each channel's range to its symbol in `row`.
    #[inline]
    fn add_row(&mut self, row: &[u8]) {
        for ((lo, hi), &s) in self.lo.iter_mut().zip(self.hi.iter_mut()).zip(row) {
            *lo = (*lo).min(s);
            *hi = (*hi).max(s);
        }
    }
}

/// One channel's histogram while counting, padded to 1056 bytes: with
/// 1024-byte histograms the same symbol of channels 4 apart sits at the same
/// address modulo 4 KiB, and the CPU then stalls each count's load on the
/// unrelated store before it (4K aliasing).
#[derive(Clone, Copy)]
#[repr(C)]
struct PaddedHist([u32; 256], [u32; 8]);

/// Quantize one tensor (`x`, raw `dtype` bytes) and count each channel's
/// symbols (into `hist`, one histogram per channel, which must be zero) in
/// the same pass, while the row is in cache. With `rows` (each row's
/// `quant::row_absmax_sq`, for planes with `quant::symmetric_by_rows`) the
/// steps come from those and each row is converted to f32 as it is
/// quantized; otherwise the tensor is converted into `values` first.
/// Returns the symbols, the scale bytes and each channel's symbol range.
#[allow(clippy::too_many_arguments)]
fn quantize_tensor(x: &[u8], dtype: Dtype, rows: Option<&[(u32, f64)]>, values: &mut Vec<f32>, shape: &KvShape, spec: &QuantSpec, rule: StepRule, exact: &[usize], hist: &mut [PaddedHist]) -> Result<(Vec<u8>, Vec<u8>, ChannelRanges), Error> {
    let (t, c, d) = (shape.tokens, shape.channels(), shape.head_dim);
    let params = match rows {
        Some(rows) => quant::group_params_from_rows(rows, c, d, spec, rule, exact)?,
        None => {
            quant::to_f32_into(dtype, x, values);
            quant::group_params_with(values, t, c, d, spec, rule, exact)?
        }
    };
    let row_bytes = c * dtype.size();
    let mut ranges = ChannelRanges::new(c);
    let symbols = match spec.group {
        ScaleGroup::PerToken | ScaleGroup::PerTensor => {
            let mut out = Vec::with_capacity(t * c);
            for tt in 0..t {
                let start = out.len();
                if exact.contains(&tt) {
                    // Stored exactly elsewhere: the symbol of zero.
                    out.resize(start + c, if spec.asymmetric { 0 } else { spec.max });
                } else if rows.is_some() {
                    quant::quantize_row_raw(dtype, &x[tt * row_bytes..(tt + 1) * row_bytes], params[spec.group.index(tt, 0, c, d)], spec, values, &mut out);
                } else {
                    quant::quantize_row(&values[tt * c..(tt + 1) * c], params[spec.group.index(tt, 0, c, d)], spec, &mut out);
                }
                for (h, &s) in hist.iter_mut().zip(&out[start..]) {
                    h.0[s as usize] += 1;
                }
                ranges.add_row(&out[start..]);
            }
            out
        }
        _ => {
            let out = quant::quantize_plane_skip(values, t, c, d, spec, &params, exact);
            for row in out.chunks_exact(c) {
                for (h, &s) in hist.iter_mut().zip(row) {
                    h.0[s as usize] += 1;
                }
                ranges.add_row(row);
            }
            out
        }
    };
    Ok((symbols, scale_bytes(&params, spec), ranges))
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

struct Plan {
    planes: Vec<PlaneKind>,
    rules: Vec<StepRule>,
    prob_bits: u32,
    level: Level,
    protect: bool,
}

fn plan_for(kv: &KvTensors, opts: &EncodeOptions) -> Result<Plan, Error> {
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
    if let Some(p) = &opts.profile {
        if p.len() != t || p.iter().any(|m| !(m.is_finite() && *m > 0.0)) {
            return Err(Error::Invalid(format!("profile needs {t} positive multipliers (one per tensor)")));
        }
    }
    let rules = match (&opts.rules, &opts.plan) {
        (Some(r), _) if r.len() == t => r.clone(),
        (Some(_), _) => return Err(Error::Invalid("rules need one entry per tensor".into())),
        (None, Some(_)) => vec![StepRule::Range; t],
        (None, None) => level.step_rules(&kv.shape, opts.profile.as_deref()),
    };
    let lossy = matches!(plan[0], PlaneKind::Quantized(_));
    let protect = lossy && opts.protect_outliers.unwrap_or(true);
    Ok(Plan { planes: plan, rules, prob_bits, level, protect })
}

/// Symbols of every plane, and the exact tokens (indices, then raw rows).
/// Histograms are kept only with `keep_hist` (every plane gets its codes).
/// After each plane, `each(planes so far)` runs (its last element is the
/// new plane), so a caller can entropy-code a plane while its symbols are
/// still in cache.
fn plane_symbols(kv: &KvTensors, plan: &Plan, keep_hist: bool, each: &mut dyn FnMut(&[PlaneSymbols]) -> Result<(), Error>) -> Result<(Vec<PlaneSymbols>, Vec<u8>), Error> {
    let shape = &kv.shape;
    let per_tensor = plan.planes.len() / shape.tensors();
    // Raw byte planes (the lossless level; one per tensor for fp8).
    if matches!(plan.planes[0], PlaneKind::Raw { .. }) {
        let mut out = Vec::with_capacity(plan.planes.len());
        for (i, p) in plan.planes.iter().enumerate() {
            let PlaneKind::Raw { index, .. } = p else { unreachable!("checked by plan_for") };
            let symbols = raw_byte_plane(&kv.tensors[i / per_tensor], kv.dtype.size(), *index as usize);
            let hist = histograms(&symbols, p, shape.channels());
            let mut hists = hist.iter().map(|h| (0, &h[..p.nsym()]));
            let ps = PlaneSymbols::new(symbols, Vec::new(), Vec::new(), &mut hists);
            out.push(PlaneSymbols { hist: if keep_hist { hist } else { Vec::new() }, ..ps });
            each(&out)?;
        }
        return Ok((out, Vec::new()));
    }
    let (t, c) = (shape.tokens, shape.channels());
    let protect = plan.protect && t >= 8;
    // One pass over each tensor, a few rows at a time (they stay in L1):
    // its row norms for the outlier tokens and, where a plane's steps need
    // only per-row statistics, those; the quantizing pass then converts one
    // row at a time instead of the whole tensor.
    let mut values = Vec::new();
    let mut norms = Vec::new();
    let mut rows: Vec<Vec<(u32, f64)>> = Vec::with_capacity(plan.planes.len());
    let row_bytes = c * kv.dtype.size();
    for (p, x) in plan.planes.iter().zip(&kv.tensors) {
        let PlaneKind::Quantized(spec) = p else { unreachable!("checked by plan_for") };
        let by_rows = quant::symmetric_by_rows(spec);
        let mut tensor_norms = Vec::with_capacity(if protect { t } else { 0 });
        let mut tensor_rows = Vec::with_capacity(if by_rows { t } else { 0 });
        if protect || by_rows {
            for block in x.chunks(quant::STATS_ROWS * row_bytes) {
                quant::row_stats_into(kv.dtype, block, c, &mut values, protect.then_some(&mut tensor_norms), by_rows.then_some(&mut tensor_rows));
            }
        }
        if protect {
            norms.push(tensor_norms);
        }
        rows.push(tensor_rows);
    }
    let exact = if protect { quant::outlier_tokens_from_norms(&norms, t) } else { Vec::new() };
    let mut out = Vec::with_capacity(plan.planes.len());
    let mut hist = vec![PaddedHist([0; 256], [0; 8]); c];
    for (((p, rule), x), rows) in plan.planes.iter().zip(&plan.rules).zip(&kv.tensors).zip(&rows) {
        let PlaneKind::Quantized(spec) = p else { unreachable!("checked by plan_for") };
        let rows = quant::symmetric_by_rows(spec).then_some(&rows[..]);
        let (symbols, scales, ranges) = quantize_tensor(x, kv.dtype, rows, &mut values, shape, spec, *rule, &exact, &mut hist)?;
        let kept = if keep_hist { hist.iter().map(|h| h.0).collect() } else { Vec::new() };
        // Every channel has a symbol (tokens > 0), so lo <= hi.
        let mut windows = hist.iter().zip(ranges.lo.iter().zip(&ranges.hi)).map(|(h, (&lo, &hi))| (lo as usize, &h.0[lo as usize..=hi as usize]));
        let ps = PlaneSymbols::new(symbols, scales, kept, &mut windows);
        // Zero the histograms for the next plane: only their non-zero
        // ranges, which the codes cover (not 1 KiB per channel).
        let starts = std::iter::once(0).chain(ps.code_tabs.iter().map(|&(_, e)| e as usize));
        for (h, (&(lo, end), start)) in hist.iter_mut().zip(ps.code_tabs.iter().zip(starts)) {
            h.0[lo as usize..lo as usize + (end as usize - start)].fill(0);
        }
        debug_assert!(hist.iter().all(|h| h.0.iter().all(|&c| c == 0)));
        out.push(ps);
        each(&out)?;
    }
    let row = c * kv.dtype.size();
    let mut exact_bytes: Vec<u8> = exact.iter().flat_map(|&t| (t as u32).to_le_bytes()).collect();
    for tensor in &kv.tensors {
        for &t in &exact {
            exact_bytes.extend_from_slice(&tensor[t * row..(t + 1) * row]);
        }
    }
    Ok((out, exact_bytes))
}

/// The symbols `encode` would entropy-code for each plane (`[tokens,
/// channels]` each), for baselines and experiments on the same symbols.
pub fn plane_symbols_for(kv: &KvTensors, opts: &EncodeOptions) -> Result<Vec<Vec<u8>>, Error> {
    kv.validate()?;
    let recipe = plan_for(kv, opts)?;
    Ok(plane_symbols(kv, &recipe, false, &mut |_| Ok(()))?.0.into_iter().map(|p| p.symbols).collect())
}

/// The most distinct symbols any table of the chunk needs.
fn max_used_symbols(planes: &[PlaneSymbols]) -> usize {
    // A code is non-zero exactly where the histogram is (codes_from_histogram).
    planes.iter().flat_map(|ps| ps.table_codes()).map(|(_, q)| q.iter().filter(|&&c| c > 0).count()).max().unwrap_or(1)
}

/// Smallest precision whose normalisation can hold `symbols` distinct symbols.
fn needed_prob_bits(symbols: usize) -> u32 {
    let mut pb = MIN_PROB_BITS;
    while (1usize << pb) / 2 < symbols && pb < MAX_PROB_BITS {
        pb += 1;
    }
    pb
}

/// Histogram of each table of a plane.
fn histograms(sym: &[u8], plane: &PlaneKind, channels: usize) -> Vec<[u32; 256]> {
    let mut h = vec![[0u32; 256]; plane.tables(channels)];
    if h.len() == 1 {
        for &s in sym {
            h[0][s as usize] += 1;
        }
    } else {
        for row in sym.chunks_exact(channels) {
            for (hc, &s) in h.iter_mut().zip(row) {
                hc[s as usize] += 1;
            }
        }
    }
    h
}

/// Entropy-codes planes into one payload, reusing its buffers and tables
/// from plane to plane.
struct PlaneCoder {
    payload: Vec<u8>,
    ends: Vec<u32>,
    words: Vec<u16>,
    /// The vectorised encoder on flat tables where the CPU has AVX2; the
    /// reference encoder otherwise (or with CACHEGEN_NO_SIMD=1). Same bytes.
    simd: bool,
    flat: FlatEncTables,
    lane_base: Vec<i32>,
    freqs: PlaneFreqs,
}

impl PlaneCoder {
    fn new(channels: usize) -> PlaneCoder {
        PlaneCoder {
            payload: Vec::new(),
            ends: Vec::new(),
            words: Vec::new(),
            simd: rans::simd_enabled(),
            flat: FlatEncTables::new(),
            lane_base: Vec::with_capacity(channels),
            freqs: PlaneFreqs::default(),
        }
    }

    /// Forget every plane coded so far.
    fn reset(&mut self) {
        self.payload.clear();
        self.ends.clear();
    }

    /// Code every segment of plane `p` with its own tables (from the codes in
    /// `ps`) or, when given, `tables`.
    fn code(&mut self, header: &Header, p: &PlaneKind, ps: &PlaneSymbols, prob_bits: u32, tables: Option<&[FreqTable]>) -> Result<(), Error> {
        let channels = header.shape.channels();
        let per_plane = header.segments_per_plane();
        let freqs = &mut self.freqs;
        freqs.clear();
        match tables {
            None => {
                for (lo, codes) in ps.table_codes() {
                    table::freqs_from_codes(codes, prob_bits, &mut freqs.freq)?;
                    freqs.lo.push(lo);
                    freqs.end.push(freqs.freq.len() as u32);
                }
            }
            Some(tabs) => {
                for t in tabs {
                    freqs.freq.extend_from_slice(&t.freq);
                    freqs.lo.push(t.lo);
                    freqs.end.push(freqs.freq.len() as u32);
                }
            }
        }
        let ntab = freqs.lo.len();
        if self.simd {
            self.flat.build_with(ntab, prob_bits, |k| freqs.table(k));
            self.lane_base.clear();
            self.lane_base.extend((0..channels).map(|c| self.flat.base(p.table_index(c))));
            for k in 0..per_plane {
                let geo = header.segment_geometry(k);
                encode_segment_flat(&geo, &ps.symbols, channels, &self.flat, &self.lane_base, &mut self.payload, &mut self.words);
                if self.payload.len() > u32::MAX as usize {
                    return Err(Error::Invalid("encoded chunk exceeds 4 GiB; use smaller chunks".into()));
                }
                self.ends.push(self.payload.len() as u32);
            }
            return Ok(());
        }
        let enc: Vec<EncTable> = (0..ntab)
            .map(|k| {
                let (lo, freq) = freqs.table(k);
                EncTable::new(&FreqTable { lo, freq: freq.to_vec() }, prob_bits)
            })
            .collect();
        let by_channel: Vec<&EncTable> = (0..channels).map(|c| &enc[p.table_index(c)]).collect();
        for k in 0..per_plane {
            let geo = header.segment_geometry(k);
            encode_segment(&geo, &ps.symbols, channels, &by_channel, prob_bits, &mut self.payload, &mut self.words);
            if self.payload.len() > u32::MAX as usize {
                return Err(Error::Invalid("encoded chunk exceeds 4 GiB; use smaller chunks".into()));
            }
            self.ends.push(self.payload.len() as u32);
        }
        Ok(())
    }
}

/// Encode one chunk. With `Tables::External`, channels whose symbols fall
/// outside the calibrated tables' support carry their own compact tables
/// (patches), so encoding never fails for that reason.
pub fn encode(kv: &KvTensors, opts: &EncodeOptions) -> Result<Vec<u8>, Error> {
    kv.validate()?;
    let recipe = plan_for(kv, opts)?;
    let level = recipe.level;
    let shape = kv.shape;
    let channels = shape.channels();
    let (seg_tokens, seg_groups) = choose_segments(shape.tokens, channels);
    let mut header = Header {
        flags: 0,
        dtype: kv.dtype,
        shape,
        level: level.number(),
        prob_bits: recipe.prob_bits,
        seg_tokens,
        seg_groups,
        table_id: 0,
        planes: recipe.planes.len(),
        scales_len: 0,
        tables_len: 0,
        segments: 0,
        payload_len: 0,
        exact_tokens: 0,
    };
    let mut coder = PlaneCoder::new(channels);
    // Room for about a byte per symbol (lossy levels need well under
    // half), so the payload is not copied as it grows.
    coder.payload.reserve(shape.tokens * channels * recipe.planes.len());
    let mut table_bytes = Vec::new();
    let (planes, exact) = match opts.tables {
        Tables::Embedded => {
            // Each plane is entropy-coded as soon as it is quantized, while
            // its symbols are in cache. The precision must hold every
            // table's distinct symbols (table::normalize needs at most half
            // the slots): planes are coded at the level's precision until
            // one needs more, and then every plane so far again at the
            // wider one (the symbols are kept), so the result is what
            // coding all planes at the widest precision gives. (Recycling
            // one symbol buffer and restarting the chunk instead made the
            // `high` level, which needs 9 bits on real KV, 20% slower.)
            let mut prob_bits = recipe.prob_bits;
            let plan = &recipe.planes;
            let head = &header;
            let coded = plane_symbols(kv, &recipe, false, &mut |planes: &[PlaneSymbols]| {
                let i = planes.len() - 1;
                let need = needed_prob_bits(max_used_symbols(&planes[i..]));
                if need > prob_bits {
                    prob_bits = need;
                    coder.reset();
                    for (p, ps) in plan.iter().zip(planes) {
                        coder.code(head, p, ps, prob_bits, None)?;
                    }
                    return Ok(());
                }
                coder.code(head, &plan[i], &planes[i], prob_bits, None)
            })?;
            header.prob_bits = prob_bits;
            for ps in &coded.0 {
                for (lo, codes) in ps.table_codes() {
                    table::write_compact(&mut table_bytes, lo, codes);
                }
            }
            coded
        }
        Tables::External(set) => {
            // Patching against external tables reads the histograms.
            let (planes, exact) = plane_symbols(kv, &recipe, true, &mut |_| Ok(()))?;
            let plan = &recipe.planes;
            let prob_bits = recipe.prob_bits;
            if set.channels != channels || set.plan != *plan {
                return Err(Error::Invalid("table set was calibrated for another shape or level".into()));
            }
            // Channels whose symbols the calibrated table cannot code get a
            // compact table of their own in the stream (a patch).
            let mut all = set.tables()?;
            let mut patches: Vec<(u32, Vec<u8>)> = Vec::new();
            let mut global = 0u32;
            for ((p, ps), tabs) in plan.iter().zip(&planes).zip(all.iter_mut()) {
                for (k, h) in ps.hist.iter().enumerate() {
                    if (0..256).any(|s| h[s] > 0 && tabs[k].freq_of(s as u8) == 0) {
                        let (lo, codes) = table::codes_from_histogram(&h[..p.nsym()]);
                        let mut b = Vec::new();
                        table::write_compact(&mut b, lo, &codes);
                        match table::table_from_codes(lo, &codes, prob_bits) {
                            Ok(t) => tabs[k] = t,
                            // Too many distinct symbols for the set's precision:
                            // this chunk carries all its own tables instead.
                            Err(_) => return encode(kv, &EncodeOptions { tables: Tables::Embedded, ..opts.clone() }),
                        }
                        patches.push((global + k as u32, b));
                    }
                }
                global += tabs.len() as u32;
            }
            table_bytes.extend_from_slice(&(patches.len() as u32).to_le_bytes());
            for (idx, b) in patches {
                table_bytes.extend_from_slice(&idx.to_le_bytes());
                table_bytes.extend_from_slice(&b);
            }
            for ((p, ps), tabs) in plan.iter().zip(&planes).zip(&all) {
                coder.code(&header, p, ps, prob_bits, Some(tabs))?;
            }
            (planes, exact)
        }
    };
    let plan = recipe.planes;
    header.exact_tokens = if exact.is_empty() { 0 } else { exact.len() / (4 + shape.tensors() * channels * kv.dtype.size()) };
    header.scales_len = planes.iter().map(|p| p.scales.len()).sum();
    header.tables_len = table_bytes.len();
    header.segments = coder.ends.len();
    header.payload_len = coder.payload.len();
    if let Tables::External(set) = opts.tables {
        header.flags |= FLAG_EXTERNAL_TABLES;
        header.table_id = set.id();
    } else {
        header.table_id = xxh3_64(&table_bytes);
    }
    let scales: Vec<u8> = planes.iter().flat_map(|p| p.scales.iter().copied()).collect();
    Ok(format::assemble(&header, &plan, &scales, &exact, &table_bytes, &coder.ends, &coder.payload))
}

/// Calibrate model-level tables from sample chunks (all of one shape and
/// dtype), for the level and profile in `opts`. Every symbol of each plane's
/// alphabet gets a non-zero probability, so any later chunk can be coded
/// with the set.
pub fn calibrate_tables(samples: &[&KvTensors], opts: &EncodeOptions) -> Result<TableSet, Error> {
    let first = samples.first().ok_or_else(|| Error::Invalid("calibration needs at least one sample".into()))?;
    let channels = first.shape.channels();
    let recipe = plan_for(first, &EncodeOptions { tables: Tables::Embedded, ..opts.clone() })?;
    let plan = recipe.planes.clone();
    let prob_bits = recipe.prob_bits;
    let mut hist: Vec<Vec<[u64; 256]>> = plan.iter().map(|p| vec![[0u64; 256]; p.tables(channels)]).collect();
    for kv in samples {
        kv.validate()?;
        if kv.shape.channels() != channels || kv.shape.tensors() != first.shape.tensors() || kv.dtype != first.dtype {
            return Err(Error::Invalid("calibration samples differ in shape or dtype".into()));
        }
        let (planes, _) = plane_symbols(kv, &recipe, true, &mut |_| Ok(()))?;
        for (ps, hs) in planes.iter().zip(hist.iter_mut()) {
            for (k, h) in ps.hist.iter().enumerate() {
                for s in 0..256 {
                    hs[k][s] += h[s] as u64;
                }
            }
        }
    }
    // Each table's observed range of symbols.
    let ranges: Vec<Vec<(usize, usize)>> = plan
        .iter()
        .zip(&hist)
        .map(|(p, hs)| {
            hs.iter()
                .map(|h| {
                    let h = &h[..p.nsym()];
                    let lo = h.iter().position(|&c| c > 0).unwrap_or(p.nsym() / 2);
                    (lo, h.iter().rposition(|&c| c > 0).unwrap_or(lo))
                })
                .collect()
        })
        .collect();
    // The set keeps the level's precision, so the GPU decoder gets 8-bit
    // lookups (half the shared memory of 9-bit ones, and entries that carry
    // the output value; 9 bits would make chunks about 1.5% smaller). The
    // few tables whose observed range is wider than that precision holds
    // are cut to their densest window; chunks that use the rest carry
    // patches. Where more than 1% of the tables would be cut (the high
    // level: 9% on SmolLM2), the precision is raised instead.
    let cap = 1usize << (prob_bits - 1);
    let tables = ranges.iter().map(Vec::len).sum::<usize>();
    let wide = ranges.iter().flatten().filter(|(lo, hi)| hi - lo + 1 > cap).count();
    let cap = if wide * 100 > tables { usize::MAX } else { cap };
    let mut supports = Vec::new();
    for ((p, hs), rs) in plan.iter().zip(&hist).zip(&ranges) {
        for (h, &(lo_seen, hi_seen)) in hs.iter().zip(rs) {
            let h = &h[..p.nsym()];
            let seen = hi_seen - lo_seen + 1;
            // Support: the observed range widened by an eighth of its width
            // (at least 3 symbols) each side, within the cap. Counts are
            // scaled to about 2^20 and 1 is added across the support, so
            // symbols a little outside what calibration saw stay codable at
            // the smallest frequency without spreading probability over the
            // whole alphabet. Every such symbol takes slots from the others
            // in every chunk, so the margin is narrow (a quarter or a half of
            // the width made SmolLM2 chunks larger: docs/BENCHMARKS.md, "Table
            // sets at 8 bits"). A chunk outside the support carries a patch
            // for that table.
            let (lo, hi) = if seen > cap {
                let lo = (0..=p.nsym() - cap).max_by_key(|&a| h[a..a + cap].iter().sum::<u64>()).unwrap_or(0);
                (lo, lo + cap - 1)
            } else {
                let margin = ((seen - 1) / 8).max(3).min((cap - seen) / 2);
                (lo_seen.saturating_sub(margin), (hi_seen + margin).min(p.nsym() - 1))
            };
            let total: u64 = h.iter().sum::<u64>().max(1);
            let weights: Vec<u32> = h[lo..=hi].iter().map(|&c| ((c << 20) / total) as u32 + 1).collect();
            supports.push((lo, weights));
        }
    }
    let prob_bits = prob_bits.max(needed_prob_bits(supports.iter().map(|(_, w)| w.len()).max().unwrap_or(1)));
    let mut table_bytes = Vec::new();
    for (lo, weights) in supports {
        let freq = table::normalize(&weights, prob_bits)?;
        table::write_exact(&mut table_bytes, &FreqTable { lo: lo as u8, freq });
    }
    Ok(TableSet::new(prob_bits, channels, plan, table_bytes))
}

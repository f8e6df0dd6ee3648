//! Uniform scalar quantization with per-group scales, and dtype conversion.
//!
//! A plane `[tokens, channels]` is split into scale groups (per token, per
//! token and head, or per channel over the chunk's tokens). Each group gets
//! a step (and, when asymmetric, a minimum) stored as bf16, rounded so that
//! every value of the group stays within half a step of its reconstruction.
//! The arithmetic is f32 with IEEE division and round-half-to-even, so a GPU
//! encoder can reproduce the symbols bit for bit.

use half::{bf16, f16};

use super::{Dtype, Error};

/// How values are grouped under one scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScaleGroup {
    /// One scale per token over all channels of the layer (LMCache, KIVI values).
    PerToken,
    /// One scale per token and head.
    PerTokenHead,
    /// One scale per channel over the chunk's tokens (KIVI keys).
    PerChannel,
    /// One scale for the whole (K/V, layer) tensor of the chunk.
    PerTensor,
}

impl ScaleGroup {
    pub fn code(self) -> u8 {
        match self {
            ScaleGroup::PerToken => 1,
            ScaleGroup::PerTokenHead => 2,
            ScaleGroup::PerChannel => 3,
            ScaleGroup::PerTensor => 4,
        }
    }
    pub fn from_code(c: u8) -> Option<ScaleGroup> {
        match c {
            1 => Some(ScaleGroup::PerToken),
            2 => Some(ScaleGroup::PerTokenHead),
            3 => Some(ScaleGroup::PerChannel),
            4 => Some(ScaleGroup::PerTensor),
            _ => None,
        }
    }
    /// Number of groups in a plane.
    pub fn count(self, tokens: usize, channels: usize, head_dim: usize) -> usize {
        match self {
            ScaleGroup::PerToken => tokens,
            ScaleGroup::PerTokenHead => tokens * (channels / head_dim),
            ScaleGroup::PerChannel => channels,
            ScaleGroup::PerTensor => 1,
        }
    }
    /// Group of element `(t, c)`.
    #[inline(always)]
    pub fn index(self, t: usize, c: usize, channels: usize, head_dim: usize) -> usize {
        match self {
            ScaleGroup::PerToken => t,
            ScaleGroup::PerTokenHead => t * (channels / head_dim) + c / head_dim,
            ScaleGroup::PerChannel => c,
            ScaleGroup::PerTensor => 0,
        }
    }
}

/// Quantizer of one plane: `2 * max + 1` symbols.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub group: ScaleGroup,
    /// Largest symbol distance from the centre; the alphabet has `2*max+1` symbols.
    pub max: u8,
    /// Asymmetric: `x = min + sym * step` over `[min, max]` of the group;
    /// symmetric: `x = (sym - max) * step` over `[-absmax, absmax]`.
    pub asymmetric: bool,
}

impl QuantSpec {
    pub fn nsym(&self) -> usize {
        2 * self.max as usize + 1
    }
    /// bf16 values stored per group.
    pub fn params_per_group(&self) -> usize {
        if self.asymmetric {
            2
        } else {
            1
        }
    }
}

/// Reconstruction parameters of one group, exactly as stored (bf16 values).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    pub offset: f32,
    pub step: f32,
}

/// Smallest bf16 at or above a finite `v`.
pub fn bf16_round_up(v: f32) -> f32 {
    let b = bf16::from_f32(v);
    if b.to_f32() >= v {
        return b.to_f32();
    }
    // One bf16 step towards +infinity.
    let bits = b.to_bits();
    let up = if bits & 0x8000 == 0 {
        bits + 1
    } else if bits == 0x8000 {
        0x0001
    } else {
        bits - 1
    };
    bf16::from_bits(up).to_f32()
}

/// Largest bf16 at or below a finite `v`.
pub fn bf16_round_down(v: f32) -> f32 {
    -bf16_round_up(-v)
}

/// How the encoder picks a group's step (the decoder only reads steps).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum StepRule {
    /// The group's range fills the alphabet (LMCache-style bins).
    Range,
    /// `alpha` times the group's RMS, widened where needed so the group's
    /// absmax still fits the alphabet. With an entropy coder the step, not
    /// the alphabet, sets rate and error; outliers cost bits only where they occur.
    Rms(f32),
}

/// Compute each group's parameters over the tokens not in `skip` (stored
/// exactly elsewhere). Fails on NaN or infinity.
pub fn group_params(plane: &[f32], tokens: usize, channels: usize, head_dim: usize, spec: &QuantSpec) -> Result<Vec<GroupParams>, Error> {
    group_params_with(plane, tokens, channels, head_dim, spec, StepRule::Range, &[])
}

pub fn group_params_with(plane: &[f32], tokens: usize, channels: usize, head_dim: usize, spec: &QuantSpec, rule: StepRule, skip: &[usize]) -> Result<Vec<GroupParams>, Error> {
    if symmetric_by_rows(spec) {
        let rows: Vec<(u32, f64)> = (0..tokens).map(|t| row_absmax_sq(&plane[t * channels..(t + 1) * channels])).collect();
        return group_params_from_rows(&rows, channels, head_dim, spec, rule, skip);
    }
    let n = spec.group.count(tokens, channels, head_dim);
    let mut lo = vec![f32::INFINITY; n];
    let mut hi = vec![f32::NEG_INFINITY; n];
    let mut sq = vec![0f64; n];
    let mut cnt = vec![0u64; n];
    for t in 0..tokens {
        let row = &plane[t * channels..(t + 1) * channels];
        // A fold, not `any`: no early exit, so the check vectorises.
        if row.iter().fold(false, |bad, v| bad | !v.is_finite()) {
            return Err(Error::NonFinite);
        }
        if skip.contains(&t) {
            continue;
        }
        match spec.group {
            // One group per row: reduce the row in f32 lanes, then once into f64.
            ScaleGroup::PerToken | ScaleGroup::PerTensor => {
                let g = spec.group.index(t, 0, channels, head_dim);
                let (mut l8, mut h8, mut s8) = ([f32::INFINITY; 8], [f32::NEG_INFINITY; 8], [0f32; 8]);
                let chunks = row.chunks_exact(8);
                let rest = chunks.remainder();
                for ch in chunks {
                    for k in 0..8 {
                        l8[k] = l8[k].min(ch[k]);
                        h8[k] = h8[k].max(ch[k]);
                        s8[k] += ch[k] * ch[k];
                    }
                }
                for (k, &v) in rest.iter().enumerate() {
                    l8[k] = l8[k].min(v);
                    h8[k] = h8[k].max(v);
                    s8[k] += v * v;
                }
                lo[g] = l8.iter().fold(lo[g], |a, &b| a.min(b));
                hi[g] = h8.iter().fold(hi[g], |a, &b| a.max(b));
                sq[g] += s8.iter().map(|&v| v as f64).sum::<f64>();
                cnt[g] += channels as u64;
            }
            _ => {
                for (c, &v) in row.iter().enumerate() {
                    let g = spec.group.index(t, c, channels, head_dim);
                    lo[g] = lo[g].min(v);
                    hi[g] = hi[g].max(v);
                    sq[g] += (v as f64) * (v as f64);
                    cnt[g] += 1;
                }
            }
        }
    }
    params_from_stats(&lo, &hi, &sq, &cnt, spec, rule)
}

/// Whether a plane's steps come from per-row statistics alone
/// ([`row_absmax_sq`], [`group_params_from_rows`]): symmetric, one group
/// per token or per tensor.
pub fn symmetric_by_rows(spec: &QuantSpec) -> bool {
    !spec.asymmetric && matches!(spec.group, ScaleGroup::PerToken | ScaleGroup::PerTensor)
}

/// What a symmetric step needs of one row: the largest `|v|` (the largest
/// of the bit patterns with the sign cleared, ordered like the values for
/// finite floats, so the loop vectorises; a pattern at or above
/// infinity's is a non-finite value) and the sum of squares (in f32 lanes,
/// then once into f64). The encoder takes these while a row is in cache
/// for its outlier norms, and later quantizes without another pass.
#[inline]
pub fn row_absmax_sq(row: &[f32]) -> (u32, f64) {
    let (mut m8, mut s8) = ([0u32; 8], [0f32; 8]);
    let chunks = row.chunks_exact(8);
    let rest = chunks.remainder();
    for ch in chunks {
        for k in 0..8 {
            m8[k] = m8[k].max(ch[k].to_bits() & 0x7fff_ffff);
            s8[k] += ch[k] * ch[k];
        }
    }
    for (k, &v) in rest.iter().enumerate() {
        m8[k] = m8[k].max(v.to_bits() & 0x7fff_ffff);
        s8[k] += v * v;
    }
    absmax_sq_of_lanes(&m8, &s8)
}

/// `row_absmax_sq`'s result from its eight lanes.
#[inline]
fn absmax_sq_of_lanes(m8: &[u32; 8], s8: &[f32; 8]) -> (u32, f64) {
    (m8.iter().fold(0, |a, &b| a.max(b)), s8.iter().map(|&v| v as f64).sum::<f64>())
}

/// `group_params_with` of a plane with `symmetric_by_rows`, from each row's
/// `row_absmax_sq` (rows in token order): the same steps, bit for bit
/// (each group's absmax is `max(|lo|, |hi|)` of the general statistics,
/// and the sums of squares are added in the same order).
pub fn group_params_from_rows(rows: &[(u32, f64)], channels: usize, head_dim: usize, spec: &QuantSpec, rule: StepRule, skip: &[usize]) -> Result<Vec<GroupParams>, Error> {
    debug_assert!(symmetric_by_rows(spec));
    let n = spec.group.count(rows.len(), channels, head_dim);
    let mut absmax = vec![0u32; n];
    let mut sq = vec![0f64; n];
    let mut cnt = vec![0u64; n];
    for (t, &(m, s)) in rows.iter().enumerate() {
        if m >= 0x7f80_0000 {
            return Err(Error::NonFinite);
        }
        if skip.contains(&t) {
            continue;
        }
        let g = spec.group.index(t, 0, channels, head_dim);
        absmax[g] = absmax[g].max(m);
        sq[g] += s;
        cnt[g] += channels as u64;
    }
    let hi: Vec<f32> = absmax.iter().map(|&b| f32::from_bits(b)).collect();
    let lo: Vec<f32> = hi.iter().map(|&h| -h).collect();
    params_from_stats(&lo, &hi, &sq, &cnt, spec, rule)
}

/// Each group's parameters from its minimum, maximum, sum of squares and
/// count (a group with no values gets step 0).
fn params_from_stats(lo: &[f32], hi: &[f32], sq: &[f64], cnt: &[u64], spec: &QuantSpec, rule: StepRule) -> Result<Vec<GroupParams>, Error> {
    let max = spec.max as f32;
    let mut out = Vec::with_capacity(lo.len());
    for g in 0..lo.len() {
        if cnt[g] == 0 {
            // Every token of the group is stored exactly.
            out.push(GroupParams { offset: 0.0, step: 0.0 });
            continue;
        }
        let p = if let (StepRule::Rms(alpha), false) = (rule, spec.asymmetric) {
            let absmax = lo[g].abs().max(hi[g].abs());
            let rms = (sq[g] / cnt[g] as f64).sqrt() as f32;
            GroupParams { offset: 0.0, step: bf16_round_up((alpha * rms).max(absmax / max)) }
        } else if spec.asymmetric {
            let offset = bf16_round_down(lo[g]);
            let range = hi[g] - offset;
            let step = bf16_round_up(range / (2.0 * max));
            GroupParams { offset, step }
        } else {
            let absmax = lo[g].abs().max(hi[g].abs());
            GroupParams { offset: 0.0, step: bf16_round_up(absmax / max) }
        };
        if !p.step.is_finite() || !p.offset.is_finite() {
            return Err(Error::NonFinite);
        }
        out.push(p);
    }
    Ok(out)
}

/// Symbol of value `v` under group parameters `p`.
#[inline(always)]
pub fn quantize_value(v: f32, p: GroupParams, spec: &QuantSpec) -> u8 {
    if p.step == 0.0 {
        return if spec.asymmetric { 0 } else { spec.max };
    }
    let top = 2.0 * spec.max as f32;
    if spec.asymmetric {
        ((v - p.offset) / p.step).round_ties_even().clamp(0.0, top) as u8
    } else {
        (v / p.step + spec.max as f32).round_ties_even().clamp(0.0, top) as u8
    }
}

/// Reconstruction of symbol `s`.
#[inline(always)]
pub fn dequantize_value(s: u8, p: GroupParams, spec: &QuantSpec) -> f32 {
    if spec.asymmetric {
        p.offset + s as f32 * p.step
    } else {
        (s as f32 - spec.max as f32) * p.step
    }
}

/// Quantize one row under one group's parameters, appending to `out`:
/// `quantize_value` of each element, with the group's constants hoisted so
/// the loop vectorises (the same IEEE operations in the same order, so the
/// same symbols). Appending rather than filling a zeroed buffer saves
/// zeroing every symbol first.
#[inline]
pub fn quantize_row(row: &[f32], p: GroupParams, spec: &QuantSpec, out: &mut Vec<u8>) {
    if p.step == 0.0 {
        out.resize(out.len() + row.len(), if spec.asymmetric { 0 } else { spec.max });
        return;
    }
    let top = 2.0 * spec.max as f32;
    let step = p.step;
    // Clamping before rounding gives the same integer as `quantize_value`'s
    // round-then-clamp (the bounds are integers), and adding 2^23 to a
    // value in [0, 254] rounds it half-to-even into the low bits (the ulp
    // at 2^23 is 1): so the same byte, with a conversion that vectorises
    // (a saturating `f32 as u8` does not).
    const MAGIC: f32 = 8_388_608.0;
    if spec.asymmetric {
        let offset = p.offset;
        out.extend(row.iter().map(|&v| (((v - offset) / step).clamp(0.0, top) + MAGIC).to_bits() as u8));
    } else {
        let centre = spec.max as f32;
        out.extend(row.iter().map(|&v| ((v / step + centre).clamp(0.0, top) + MAGIC).to_bits() as u8));
    }
}

/// The features of the f16 row paths that read the bytes directly.
#[cfg(target_arch = "x86_64")]
fn has_avx2_f16c() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c")
}

/// `quantize_row` of a row of raw `dtype` bytes, converted through
/// `values` where needed. Symmetric rows of f16 (a multiple of 32 values)
/// are converted in registers with F16C, and 32 symbols are packed and
/// stored at a time.
pub fn quantize_row_raw(dtype: Dtype, row: &[u8], p: GroupParams, spec: &QuantSpec, values: &mut Vec<f32>, out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if dtype == Dtype::F16 && !spec.asymmetric && p.step != 0.0 && row.len() % 64 == 0 && has_avx2_f16c() {
        // SAFETY: the features are present; the row holds a multiple of 32
        // f16 values.
        unsafe { f16_quantize_row_symmetric(row, p.step, spec.max, out) };
        return;
    }
    to_f32_into(dtype, row, values);
    quantize_row(values, p, spec, out);
}

/// `quantize_row` of symmetric f16 values: the same IEEE operations in
/// the same order, on 8 values per vector.
///
/// # Safety
/// AVX2 and F16C; `row.len()` is a multiple of 64 bytes (32 values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_quantize_row_symmetric(row: &[u8], step: f32, max: u8, out: &mut Vec<u8>) {
    use std::arch::x86_64::*;
    debug_assert!(row.len() % 64 == 0);
    let n = row.len() / 2;
    out.reserve(n);
    let dst = out.as_mut_ptr().add(out.len());
    let step = _mm256_set1_ps(step);
    let centre = _mm256_set1_ps(max as f32);
    let top = _mm256_set1_ps(2.0 * max as f32);
    let zero = _mm256_setzero_ps();
    let magic = _mm256_set1_ps(8_388_608.0);
    let low_byte = _mm256_set1_epi32(0xff);
    // The packs below work within 128-bit halves: put the 4-byte groups back in order.
    let in_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for i in (0..n).step_by(32) {
        let q: [__m256i; 4] = std::array::from_fn(|k| {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(row.as_ptr().add(2 * (i + 8 * k)) as *const __m128i));
            // As `quantize_row`: clamp, then round half to even by adding 2^23.
            let y = _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_div_ps(v, step), centre), zero), top);
            _mm256_and_si256(_mm256_castps_si256(_mm256_add_ps(y, magic)), low_byte)
        });
        let bytes = _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]), _mm256_packus_epi32(q[2], q[3]));
        _mm256_storeu_si256(dst.add(i) as *mut __m256i, _mm256_permutevar8x32_epi32(bytes, in_order));
    }
    out.set_len(out.len() + n);
}

/// Quantize a plane to symbols `[tokens, channels]`; tokens in `skip` get
/// the symbol of zero (their values are stored exactly elsewhere).
pub fn quantize_plane(plane: &[f32], tokens: usize, channels: usize, head_dim: usize, spec: &QuantSpec, params: &[GroupParams]) -> Vec<u8> {
    quantize_plane_skip(plane, tokens, channels, head_dim, spec, params, &[])
}

pub fn quantize_plane_skip(plane: &[f32], tokens: usize, channels: usize, head_dim: usize, spec: &QuantSpec, params: &[GroupParams], skip: &[usize]) -> Vec<u8> {
    let mut out = vec![0u8; tokens * channels];
    for t in 0..tokens {
        let row = &plane[t * channels..(t + 1) * channels];
        let dst = &mut out[t * channels..(t + 1) * channels];
        if skip.contains(&t) {
            dst.fill(if spec.asymmetric { 0 } else { spec.max });
            continue;
        }
        match spec.group {
            // The common groupings get loops the compiler can vectorise.
            ScaleGroup::PerToken | ScaleGroup::PerTensor => {
                let p = params[spec.group.index(t, 0, channels, head_dim)];
                for (d, &v) in dst.iter_mut().zip(row) {
                    *d = quantize_value(v, p, spec);
                }
            }
            ScaleGroup::PerChannel => {
                for ((d, &v), &p) in dst.iter_mut().zip(row).zip(params) {
                    *d = quantize_value(v, p, spec);
                }
            }
            ScaleGroup::PerTokenHead => {
                for (c, (d, &v)) in dst.iter_mut().zip(row).enumerate() {
                    *d = quantize_value(v, params[spec.group.index(t, c, channels, head_dim)], spec);
                }
            }
        }
    }
    out
}

/// Tokens whose KV is far from the chunk's typical magnitude in most
/// tensors (attention sinks): the model is very sensitive to them, and
/// they are few, so they are stored exactly. `score[t]` is the mean over
/// tensors of `|ln(norm_t / median norm)|`; tokens above 1.0 qualify,
/// highest first, at most `max(1, tokens / 64)`; none below 8 tokens.
pub fn outlier_tokens(tensors: &[Vec<f32>], tokens: usize, channels: usize) -> Vec<usize> {
    if tokens < 8 || tensors.is_empty() {
        return Vec::new();
    }
    let norms: Vec<Vec<f64>> = tensors.iter().map(|x| row_norms(x, tokens, channels)).collect();
    outlier_tokens_from_norms(&norms, tokens)
}

/// The L2 norm of each row `[channels]` of a plane, as `outlier_tokens`
/// computes it: squares in f64 summed in channel order from 0, then `sqrt`.
/// Eight rows are summed side by side (each still in channel order, so the
/// same bits) to hide the latency of the f64 additions.
pub fn row_norms(x: &[f32], tokens: usize, channels: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(tokens);
    row_norms_into(x, tokens, channels, &mut out);
    out
}

/// Rows `row_norms` sums side by side.
pub const NORM_ROWS: usize = 8;

/// `row_norms`, appending to `out`. Each row's norm depends on that row
/// alone, so a plane may be given a few rows at a time.
#[allow(clippy::needless_range_loop)] // c indexes eight rows at once
pub fn row_norms_into(x: &[f32], tokens: usize, channels: usize, out: &mut Vec<f64>) {
    const R: usize = NORM_ROWS;
    let mut t = 0;
    while t + R <= tokens {
        let rows: [&[f32]; R] = std::array::from_fn(|k| &x[(t + k) * channels..(t + k + 1) * channels]);
        let mut acc = [0f64; R];
        for c in 0..channels {
            for k in 0..R {
                let v = rows[k][c] as f64;
                acc[k] += v * v;
            }
        }
        out.extend(acc.iter().map(|a| a.sqrt()));
        t += R;
    }
    for r in x[t * channels..tokens * channels].chunks_exact(channels.max(1)) {
        out.push(r.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt());
    }
}

/// Rows `row_stats_into` takes at a time.
pub const STATS_ROWS: usize = 16;

/// What the encoder's first pass needs of each row of `block` (whole rows
/// of raw `dtype` bytes, at most `STATS_ROWS`, `channels` each): the
/// `row_norms` (appended to `norms`, where given) and the `row_absmax_sq`
/// (appended to `rows`, where given), bit for bit. Full blocks of f16 with
/// channels a multiple of 8 are read straight from the bytes with F16C and
/// AVX2; others go through f32 `values`.
pub fn row_stats_into(dtype: Dtype, block: &[u8], channels: usize, values: &mut Vec<f32>, norms: Option<&mut Vec<f64>>, rows: Option<&mut Vec<(u32, f64)>>) {
    let n = block.len() / (channels * dtype.size());
    debug_assert!(n <= STATS_ROWS && block.len() == n * channels * dtype.size());
    #[cfg(target_arch = "x86_64")]
    if dtype == Dtype::F16 && n == STATS_ROWS && channels % 8 == 0 && has_avx2_f16c() {
        // SAFETY: the features are present; the block holds STATS_ROWS
        // rows of `channels` (a multiple of 8) f16 values.
        // The rows first: their pass reads the block in order (the first
        // touch of the input, which the prefetcher follows); the norms then
        // read 16 rows at once from L1.
        unsafe {
            if let Some(rows) = rows {
                for row in block.chunks_exact(2 * channels) {
                    rows.push(f16_row_absmax_sq(row));
                }
            }
            if let Some(norms) = norms {
                f16_row_norms(block, channels, norms);
            }
        }
        return;
    }
    to_f32_into(dtype, block, values);
    if let Some(norms) = norms {
        row_norms_into(values, n, channels, norms);
    }
    if let Some(rows) = rows {
        rows.extend(values.chunks_exact(channels).map(row_absmax_sq));
    }
}

/// `row_norms_into` of `STATS_ROWS` rows of f16 values: each 8-channel
/// chunk of 8 rows is converted and transposed, so one f64 vector adds a
/// channel's squares to 4 rows' sums (each row's sum still in channel
/// order); 16 rows keep 4 independent chains of additions in flight.
///
/// # Safety
/// AVX2 and F16C; `bytes` holds `STATS_ROWS * channels` f16 values,
/// `channels` a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_row_norms(bytes: &[u8], channels: usize, norms: &mut Vec<f64>) {
    use std::arch::x86_64::*;
    debug_assert!(channels % 8 == 0 && bytes.len() == 2 * STATS_ROWS * channels);
    let p = bytes.as_ptr();
    let mut acc = [_mm256_setzero_pd(); STATS_ROWS / 4];
    for c in (0..channels).step_by(8) {
        for half in 0..STATS_ROWS / 8 {
            let v: [__m256; 8] = std::array::from_fn(|k| _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * ((8 * half + k) * channels + c)) as *const __m128i)));
            // 8x8 transpose: t[j] holds channel c + j of the 8 rows.
            let a: [__m256; 8] = std::array::from_fn(|k| if k % 2 == 0 { _mm256_unpacklo_ps(v[k], v[k + 1]) } else { _mm256_unpackhi_ps(v[k - 1], v[k]) });
            let b: [__m256; 8] = std::array::from_fn(|k| {
                let i = (k / 4) * 4 + (k % 4) / 2;
                if k % 2 == 0 {
                    _mm256_shuffle_ps(a[i], a[i + 2], 0b01_00_01_00)
                } else {
                    _mm256_shuffle_ps(a[i], a[i + 2], 0b11_10_11_10)
                }
            });
            for j in 0..8 {
                let t = if j < 4 { _mm256_permute2f128_ps(b[j], b[j + 4], 0x20) } else { _mm256_permute2f128_ps(b[j - 4], b[j], 0x31) };
                let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(t));
                let hi = _mm256_cvtps_pd(_mm256_extractf128_ps(t, 1));
                acc[2 * half] = _mm256_add_pd(acc[2 * half], _mm256_mul_pd(lo, lo));
                acc[2 * half + 1] = _mm256_add_pd(acc[2 * half + 1], _mm256_mul_pd(hi, hi));
            }
        }
    }
    let mut sums = [0f64; STATS_ROWS];
    for (h, &a) in acc.iter().enumerate() {
        _mm256_storeu_pd(sums.as_mut_ptr().add(4 * h), a);
    }
    norms.extend(sums.iter().map(|s| s.sqrt()));
}

/// `row_absmax_sq` of one row of f16 values, converted 8 at a time in
/// registers.
///
/// # Safety
/// AVX2 and F16C; the row's length is a multiple of 16 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn f16_row_absmax_sq(row: &[u8]) -> (u32, f64) {
    use std::arch::x86_64::*;
    debug_assert!(row.len() % 16 == 0);
    let abs = _mm256_set1_epi32(0x7fff_ffff);
    let mut m8 = _mm256_setzero_si256();
    let mut s8 = _mm256_setzero_ps();
    for ch in row.chunks_exact(16) {
        let x = _mm256_cvtph_ps(_mm_loadu_si128(ch.as_ptr() as *const __m128i));
        m8 = _mm256_max_epu32(m8, _mm256_and_si256(_mm256_castps_si256(x), abs));
        s8 = _mm256_add_ps(s8, _mm256_mul_ps(x, x));
    }
    let (mut m, mut s) = ([0u32; 8], [0f32; 8]);
    _mm256_storeu_si256(m.as_mut_ptr() as *mut __m256i, m8);
    _mm256_storeu_ps(s.as_mut_ptr(), s8);
    absmax_sq_of_lanes(&m, &s)
}

/// `outlier_tokens` from each tensor's `row_norms`.
pub fn outlier_tokens_from_norms(all_norms: &[Vec<f64>], tokens: usize) -> Vec<usize> {
    if tokens < 8 || all_norms.is_empty() {
        return Vec::new();
    }
    let tensors = all_norms;
    let mut score = vec![0f64; tokens];
    for norms in all_norms {
        // Only the median is needed: a selection, not a sort (the same
        // element, since `total_cmp` is a total order).
        let mut work = norms.clone();
        let med = *work.select_nth_unstable_by(tokens / 2, |a, b| a.total_cmp(b)).1;
        for (s, n) in score.iter_mut().zip(norms) {
            *s += det_ln((n + 1e-6) / (med + 1e-6)).abs();
        }
    }
    let mut picked: Vec<usize> = (0..tokens).filter(|&t| score[t] / tensors.len() as f64 > 1.0).collect();
    picked.sort_by(|&a, &b| score[b].total_cmp(&score[a]).then(a.cmp(&b)));
    picked.truncate((tokens / 64).max(1));
    picked.sort_unstable();
    picked
}

/// Natural logarithm of a positive finite `x` from IEEE basic operations
/// in a fixed order (exponent split, then the atanh series, no libm), so the
/// GPU encoder (cuda/encode.cu `det_ln`) gets the same bits: libm's `ln`
/// and CUDA's `log` may differ in the last place, which could change which
/// tokens `outlier_tokens` picks. Relative error about 1e-16.
pub fn det_ln(x: f64) -> f64 {
    let mut bits = x.to_bits();
    let mut e: i64 = 0;
    if (bits >> 52) & 0x7ff == 0 {
        // Subnormal: scale by 2^54 (exact) first.
        bits = (x * 18014398509481984.0).to_bits();
        e = -54;
    }
    e += ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > std::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.172: 13 odd terms.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut p = 1.0 / 25.0;
    for k in (0..12).rev() {
        p = p * s2 + 1.0 / (2 * k + 1) as f64;
    }
    e as f64 * std::f64::consts::LN_2 + 2.0 * s * p
}

/// Raw little-endian bytes of `dtype` to f32, into `out` (resized; reused
/// across tensors so the encoder converts each tensor while it is in cache).
pub fn to_f32_into(dtype: Dtype, bytes: &[u8], out: &mut Vec<f32>) {
    use half::slice::HalfFloatSliceExt;
    let n = bytes.len() / dtype.size();
    out.resize(n, 0.0);
    match dtype {
        Dtype::F16 => {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("f16c") && std::arch::is_x86_feature_detected!("avx") {
                // SAFETY: the features are present; `bytes` holds 2 * n bytes.
                unsafe { f16_to_f32_f16c(&bytes[..2 * n], out) };
                return;
            }
            const N: usize = 64;
            for (src, dst) in bytes.chunks(2 * N).zip(out.chunks_mut(N)) {
                let mut h = [f16::ZERO; N];
                for (d, b) in h.iter_mut().zip(src.chunks_exact(2)) {
                    *d = f16::from_bits(u16::from_le_bytes([b[0], b[1]]));
                }
                h[..dst.len()].convert_to_f32_slice(dst);
            }
        }
        Dtype::Bf16 => {
            for (d, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *d = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
            }
        }
        Dtype::F32 => {
            for (d, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        Dtype::F8E4M3 => {
            for (d, &b) in out.iter_mut().zip(bytes) {
                *d = super::fp8::e4m3_to_f32(b);
            }
        }
    }
}

/// Little-endian f16 bytes to f32 with F16C, 8 values per instruction
/// straight from the bytes (the `half` slice conversion went through two
/// copies). The same values: the conversion is exact (a NaN may come out
/// quiet, and the encoder rejects NaN anyway).
///
/// # Safety
/// F16C and AVX; `bytes.len() == 2 * out.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "f16c,avx")]
unsafe fn f16_to_f32_f16c(bytes: &[u8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    debug_assert_eq!(bytes.len(), 2 * out.len());
    let n = out.len();
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm_loadu_si128(bytes.as_ptr().add(2 * i) as *const __m128i);
        _mm256_storeu_ps(out.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        i += 8;
    }
    for (d, b) in out[i..].iter_mut().zip(bytes[2 * i..].chunks_exact(2)) {
        *d = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    }
}

/// Raw little-endian bytes of `dtype` to f32.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        Dtype::F16 => {
            // Through an aligned copy so the slice conversion can use F16C.
            let h: Vec<f16> = bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
            let mut out = vec![0f32; h.len()];
            h.convert_to_f32_slice(&mut out);
            out
        }
        Dtype::Bf16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        Dtype::F8E4M3 => bytes.iter().map(|&b| super::fp8::e4m3_to_f32(b)).collect(),
    }
}

/// Write `v` as `dtype` (round to nearest even) at element `i` of `out`.
#[inline(always)]
pub fn store(dtype: Dtype, out: &mut [u8], i: usize, v: f32) {
    match dtype {
        Dtype::F16 => out[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes()),
        Dtype::Bf16 => out[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
        Dtype::F32 => out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
        Dtype::F8E4M3 => out[i] = super::fp8::f32_to_e4m3(v),
    }
}

/// Write `vals` as consecutive elements of `dtype` (round to nearest even).
#[inline]
pub fn store_row(dtype: Dtype, vals: &[f32], out: &mut [u8]) {
    use half::slice::HalfFloatSliceExt;
    const N: usize = 32;
    for (vals, out) in vals.chunks(N).zip(out.chunks_mut(N * dtype.size())) {
        let n = vals.len();
        match dtype {
            Dtype::F16 => {
                let mut h = [f16::ZERO; N];
                h[..n].convert_from_f32_slice(vals);
                let bits: [u16; N] = h.map(|v| v.to_bits().to_le());
                out[..2 * n].copy_from_slice(&as_bytes(&bits)[..2 * n]);
            }
            Dtype::Bf16 => {
                let mut h = [bf16::ZERO; N];
                h[..n].convert_from_f32_slice(vals);
                let bits: [u16; N] = h.map(|v| v.to_bits().to_le());
                out[..2 * n].copy_from_slice(&as_bytes(&bits)[..2 * n]);
            }
            Dtype::F32 => {
                for (dst, v) in out.chunks_exact_mut(4).zip(vals) {
                    dst.copy_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::F8E4M3 => {
                for (dst, &v) in out.iter_mut().zip(vals) {
                    *dst = super::fp8::f32_to_e4m3(v);
                }
            }
        }
    }
}

/// The bytes of a u16 array (already in little-endian order).
fn as_bytes(v: &[u16; 32]) -> &[u8; 64] {
    // SAFETY: [u16; 32] and [u8; 64] have the same size, u8 has no
    // alignment requirement, and every bit pattern is a valid u8.
    unsafe { &*(v as *const [u16; 32] as *const [u8; 64]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_matches_half_on_every_value() {
        // Every f16 bit pattern, at an odd length so the scalar tail runs too.
        let bytes: Vec<u8> = (0..=u16::MAX).chain([0x3c00, 0x8001, 0x7bff]).flat_map(|b| b.to_le_bytes()).collect();
        let mut out = Vec::new();
        to_f32_into(Dtype::F16, &bytes, &mut out);
        assert_eq!(out.len(), bytes.len() / 2);
        for (b, &v) in bytes.chunks_exact(2).zip(&out) {
            let want = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            assert!(want.to_bits() == v.to_bits() || (want.is_nan() && v.is_nan()), "{b:?}");
        }
    }

    #[test]
    fn quantize_row_matches_quantize_value() {
        // Ties (k + 0.5 steps), values just beside them, both clamps, signed
        // zeros and huge values, under both symmetries and several alphabets.
        let mut vals = vec![0.0f32, -0.0, 1e30, -1e30, f32::MAX, f32::MIN, 1e-40, -1e-40];
        for k in -300..300 {
            let x = k as f32 * 0.5;
            vals.extend([x, f32::from_bits(x.to_bits() + 1), f32::from_bits(x.to_bits().wrapping_sub(1))]);
        }
        let mut state = 0x2545f4914f6cdd1du64;
        for _ in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            vals.push(f32::from_bits(state as u32) % 1000.0);
        }
        vals.retain(|v| v.is_finite());
        for max in [1u8, 7, 15, 127] {
            for asymmetric in [false, true] {
                let spec = QuantSpec { group: ScaleGroup::PerTensor, max, asymmetric };
                for (step, offset) in [(1.0f32, 0.0f32), (0.5, -3.0), (0.37, 1.25), (3.0e-39, 0.0), (1e-3, -0.5)] {
                    let p = GroupParams { offset: if asymmetric { offset } else { 0.0 }, step };
                    let mut got = Vec::new();
                    quantize_row(&vals, p, &spec, &mut got);
                    for (&v, &g) in vals.iter().zip(&got) {
                        assert_eq!(g, quantize_value(v, p, &spec), "v {v} step {step} max {max} asym {asymmetric}");
                    }
                }
            }
        }
    }

    #[test]
    fn f16_row_paths_match_the_f32_paths() {
        // Finite f16 bit patterns of every magnitude (subnormals, zeros,
        // the largest), STATS_ROWS rows of 64 channels.
        let channels = 64;
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut bytes = Vec::new();
        for _ in 0..STATS_ROWS * channels {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut b = (state >> 16) as u16;
            if b & 0x7c00 == 0x7c00 {
                b &= !0x4000;
            }
            bytes.extend_from_slice(&b.to_le_bytes());
        }
        let values = to_f32(Dtype::F16, &bytes);
        let (mut norms, mut rows, mut scratch) = (Vec::new(), Vec::new(), Vec::new());
        row_stats_into(Dtype::F16, &bytes, channels, &mut scratch, Some(&mut norms), Some(&mut rows));
        let want: Vec<u64> = row_norms(&values, STATS_ROWS, channels).iter().map(|n| n.to_bits()).collect();
        assert_eq!(norms.iter().map(|n| n.to_bits()).collect::<Vec<_>>(), want);
        for (r, &(m, s)) in rows.iter().enumerate() {
            let (wm, ws) = row_absmax_sq(&values[r * channels..(r + 1) * channels]);
            assert_eq!((m, s.to_bits()), (wm, ws.to_bits()), "row {r}");
        }
        for max in [1u8, 7, 127] {
            let spec = QuantSpec { group: ScaleGroup::PerTensor, max, asymmetric: false };
            for step in [1.0f32, 0.37, 3.0e-39, 1e-3, 600.0] {
                let p = GroupParams { offset: 0.0, step };
                for r in 0..STATS_ROWS {
                    let (mut got, mut want) = (vec![7u8], vec![7u8]);
                    quantize_row_raw(Dtype::F16, &bytes[2 * r * channels..2 * (r + 1) * channels], p, &spec, &mut scratch, &mut got);
                    quantize_row(&values[r * channels..(r + 1) * channels], p, &spec, &mut want);
                    assert_eq!(got, want, "max {max} step {step} row {r}");
                }
            }
        }
    }

    #[test]
    fn bf16_rounding_brackets_value() {
        for v in [0.0f32, 1e-30, 0.3, 1.0, 3.3, 1234.567, 6.0e4, -0.3, -77.7] {
            let up = bf16_round_up(v);
            let down = bf16_round_down(v);
            assert!(up >= v && down <= v, "{v}: {down} {up}");
            assert_eq!(bf16::from_f32(up).to_f32(), up);
            assert_eq!(bf16::from_f32(down).to_f32(), down);
        }
    }

    #[test]
    fn det_ln_matches_libm() {
        for x in [1e-300, 3e-310, 1e-6, 0.37, 0.999999, 1.0, 1.0000001, std::f64::consts::SQRT_2, 1.5, 2.0, 7.25, 1e6, 3.4e38, 1e300] {
            let (a, b) = (det_ln(x), x.ln());
            assert!((a - b).abs() <= 4e-16 * b.abs().max(1.0), "{x}: {a} vs {b}");
        }
        assert_eq!(det_ln(1.0), 0.0);
    }

    #[test]
    fn error_within_half_step() {
        let tokens = 7;
        let channels = 6;
        let plane: Vec<f32> = (0..tokens * channels).map(|i| ((i * 37 % 23) as f32 - 9.3) * 0.71).collect();
        for group in [ScaleGroup::PerToken, ScaleGroup::PerTokenHead, ScaleGroup::PerChannel] {
            for asymmetric in [false, true] {
                for max in [1u8, 7, 15, 127] {
                    let spec = QuantSpec { group, max, asymmetric };
                    let params = group_params(&plane, tokens, channels, 3, &spec).unwrap();
                    let sym = quantize_plane(&plane, tokens, channels, 3, &spec, &params);
                    for t in 0..tokens {
                        for c in 0..channels {
                            let p = params[group.index(t, c, channels, 3)];
                            let s = sym[t * channels + c];
                            assert!((s as usize) < spec.nsym());
                            let err = (dequantize_value(s, p, &spec) - plane[t * channels + c]).abs();
                            assert!(err <= p.step * 0.5 * (1.0 + 1e-5) + 1e-6, "{spec:?} err {err} step {}", p.step);
                        }
                    }
                }
            }
        }
    }
}

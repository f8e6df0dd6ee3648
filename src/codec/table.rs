//! Frequency tables: how a symbol histogram becomes the integer frequencies
//! the rANS coder uses, and how tables are serialised compactly.
//!
//! A table covers symbols `lo .. lo + n`; symbols outside have frequency 0.
//! Frequencies sum to exactly `1 << prob_bits`. In the compact form each
//! symbol's weight is a 4-bit code (0 = absent, 1..=15 = half-octave steps
//! below the most frequent symbol), so a 31-symbol table costs 18 bytes.

use super::Error;

/// Integer weight of each 4-bit code: `round(256 * 2^((q - 15) / 2))`.
/// Part of the format (FORMAT.md, "Compact tables"): never change.
pub const WEIGHT_OF_CODE: [u32; 16] = [0, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128, 181, 256];

/// One frequency table, normalised to `1 << prob_bits`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreqTable {
    /// First symbol with a (possibly zero) stored weight.
    pub lo: u8,
    /// `freq[i]` is the frequency of symbol `lo + i`.
    pub freq: Vec<u16>,
}

impl FreqTable {
    pub fn freq_of(&self, sym: u8) -> u32 {
        let i = sym as usize;
        let lo = self.lo as usize;
        if i < lo || i >= lo + self.freq.len() {
            0
        } else {
            self.freq[i - lo] as u32
        }
    }

    /// Cumulative frequencies for every symbol `0..=255` plus the total (257 entries).
    pub fn cumulative(&self) -> [u32; 257] {
        let mut cum = [0u32; 257];
        for s in 0..256usize {
            cum[s + 1] = cum[s] + self.freq_of(s as u8);
        }
        cum
    }
}

/// Quantise a histogram to 4-bit weight codes: the most frequent symbol gets
/// 15, a symbol `k` half-octaves rarer gets `15 - k` (at least 1); absent
/// symbols get 0. Returns `(lo, codes)` trimmed to the non-zero range.
pub fn codes_from_histogram(hist: &[u32]) -> (u8, Vec<u8>) {
    let mut codes = Vec::new();
    let lo = codes_from_histogram_into(hist, &mut codes);
    (lo, codes)
}

/// `codes_from_histogram`, appending the codes to `out` and returning `lo`.
pub fn codes_from_histogram_into(hist: &[u32], out: &mut Vec<u8>) -> u8 {
    codes_from_histogram_window(hist, 0, out)
}

/// `codes_from_histogram_into` of a histogram that is zero outside the
/// part `hist`, which starts at symbol `offset`: only that part is read
/// (the encoder knows each channel's symbol range).
pub fn codes_from_histogram_window(hist: &[u32], offset: usize, out: &mut Vec<u8>) -> u8 {
    let first = first_nonzero(hist);
    let Some(first) = first else {
        // Empty histogram: a single symbol 0 carries all probability.
        out.push(15);
        return 0;
    };
    let last = last_nonzero(hist).unwrap();
    let max_count = hist[first..=last].iter().fold(0, |a, &c| a.max(c));
    let max = max_count as f64;
    let range = &hist[first..=last];
    let start = out.len();
    out.resize(start + range.len(), 0);
    let dst = &mut out[start..];
    // Every count through `code_flat` without a branch (so the loop
    // vectorises), absent symbols masked to 0; if any count lands in the
    // guard band, the table again count by count through `code_of_count`.
    let mut near = false;
    for (d, &c) in dst.iter_mut().zip(range) {
        let (code, n) = code_flat(max, c);
        *d = if c == 0 { 0 } else { code };
        near |= n & (c != 0);
    }
    if near {
        for (d, &c) in dst.iter_mut().zip(range) {
            *d = if c == 0 { 0 } else { code_of_count(max, c) };
        }
    }
    (offset + first) as u8
}

/// The weight code of a non-zero count `c` under the histogram's largest
/// count `max`: `clamp(15 - round(2 * log2(max / c)), 1, 15)`, evaluated in
/// f64 as written (`code_exact`). `r = max / c` is at least 1; with `r = m *
/// 2^e` (`m` in [1, 2)), `2 * log2(r) = 2e + 2 * log2(m)`, which rounds to
/// `2e + [m >= 2^(1/4)] + [m >= 2^(3/4)]`. So the mantissa of `r` is
/// compared with the two constants instead of calling `log2`, except
/// within 1e-9 (relative) of either, where `log2`'s rounding could decide
/// and the formula itself is evaluated (never on the fixture's counts; a
/// test compares the two on every count pair up to 4096 and on random
/// large ones).
#[inline]
fn code_of_count(max: f64, c: u32) -> u8 {
    match code_flat(max, c) {
        (_, true) => code_exact(max, c),
        (code, false) => code,
    }
}

/// `code_of_count`'s mantissa comparison, without its branch: the code,
/// and whether the mantissa is within the guard band (where the code must
/// come from `code_exact` instead). For `c = 0` (r infinite) both are
/// meaningless but computed without a fault, so a loop can mask them.
#[inline(always)]
fn code_flat(max: f64, c: u32) -> (u8, bool) {
    const Q1: f64 = 1.189_207_115_002_721; // 2^(1/4)
    const Q3: f64 = 1.681_792_830_507_429; // 2^(3/4)
    const GUARD: f64 = 1e-9;
    let r = max / c as f64;
    let bits = r.to_bits();
    let e = (bits >> 52) as i64 - 1023;
    let m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    let near = ((m - Q1).abs() < GUARD) | ((m - Q3).abs() < GUARD);
    let half_octaves = 2 * e + (m >= Q1) as i64 + (m >= Q3) as i64;
    ((15 - half_octaves).clamp(1, 15) as u8, near)
}

/// `codes_from_histogram`'s formula for one non-zero count, through `log2`.
fn code_exact(max: f64, c: u32) -> u8 {
    let half_octaves = (2.0 * (max / c as f64).log2()).round();
    (15.0 - half_octaves).clamp(1.0, 15.0) as u8
}

/// `hist.iter().position(|&c| c > 0)`, 16 counts at a time (a histogram
/// of quantized symbols is empty for about half its length on each side).
fn first_nonzero(hist: &[u32]) -> Option<usize> {
    let mut chunks = hist.chunks_exact(16);
    let mut at = 0;
    for ch in &mut chunks {
        if ch.iter().fold(0, |a, &c| a | c) != 0 {
            break;
        }
        at += 16;
    }
    hist[at..].iter().position(|&c| c > 0).map(|i| at + i)
}

/// `hist.iter().rposition(|&c| c > 0)`, 16 counts at a time.
fn last_nonzero(hist: &[u32]) -> Option<usize> {
    let mut end = hist.len();
    while end >= 16 && hist[end - 16..end].iter().fold(0, |a, &c| a | c) == 0 {
        end -= 16;
    }
    hist[..end].iter().rposition(|&c| c > 0)
}

/// Normalise integer weights to frequencies summing to `1 << prob_bits`,
/// every non-zero weight getting at least 1. Deterministic integer
/// arithmetic, specified in FORMAT.md so that every decoder builds the same
/// table.
pub fn normalize(weights: &[u32], prob_bits: u32) -> Result<Vec<u16>, Error> {
    let total: u64 = 1 << prob_bits;
    let nonzero = weights.iter().filter(|&&w| w > 0).count() as u64;
    let sum: u64 = weights.iter().map(|&w| w as u64).sum();
    if nonzero == 0 {
        return Err(Error::Corrupt("frequency table has no symbol"));
    }
    if nonzero > total / 2 {
        return Err(Error::Corrupt("frequency table has more symbols than prob_bits allows"));
    }
    let mut freq: Vec<u16> = Vec::with_capacity(weights.len());
    let mut assigned: u64 = 0;
    // floor(w * total / sum) by an f64 division: exact here, because the
    // numerator is below 2^47 and the sum below 2^40 (at most 256 weights
    // of 32 bits), so a quotient that is not an integer lies at least
    // 2^-48 (relative) below the next integer, far more than f64 rounding
    // (2^-53) can cross; integer quotients are exact. Much faster than a
    // 64-bit integer division per symbol (tests compare the two).
    debug_assert!(sum < 1 << 40 && total <= 1 << 15);
    let sum_f = sum as f64;
    for &w in weights {
        let f = if w == 0 { 0 } else { (((w as u64 * total) as f64 / sum_f) as u64).max(1) };
        assigned += f;
        freq.push(f as u16); // f <= total <= 2^15
    }
    settle(&mut freq, assigned, total);
    Ok(freq)
}

/// The last step of `normalize`: give the rounding remainder to (or take
/// the excess from) the largest frequency, lowest index on ties. Taking is
/// repeated because the largest may not be able to give everything while
/// staying >= 1.
fn settle(freq: &mut [u16], mut assigned: u64, total: u64) {
    while assigned != total {
        let (imax, fmax) = freq.iter().enumerate().fold((0, 0u16), |(bi, bf), (i, &f)| if f > bf { (i, f) } else { (bi, bf) });
        if assigned < total {
            freq[imax] += (total - assigned) as u16;
            assigned = total;
        } else {
            let take = (assigned - total).min(fmax as u64 - 1);
            freq[imax] -= take as u16;
            assigned -= take;
        }
    }
}

/// Build a table from 4-bit codes.
/// Exactly `normalize` of the codes' weights, computed per distinct code:
/// a compact table has at most 15 distinct weights, so at most 15
/// divisions instead of one per symbol (tests compare the two).
pub fn table_from_codes(lo: u8, codes: &[u8], prob_bits: u32) -> Result<FreqTable, Error> {
    let mut freq = Vec::with_capacity(codes.len());
    freqs_from_codes(codes, prob_bits, &mut freq)?;
    Ok(FreqTable { lo, freq })
}

/// `floor(WEIGHT_OF_CODE[q] << prob_bits / sum)` for every code `q`, for
/// `sum` in `1..=2^16` (at most 256 weights of at most 256) and `prob_bits`
/// up to 15: an f64 multiply by `1 / sum`, then an exact integer
/// correction by one either way (numerators below 2^24, so every product
/// fits 32 bits). No division per code; a test compares it with the integer
/// division for every sum and precision.
#[inline]
fn code_quotients(sum: u32, prob_bits: u32) -> [u32; 16] {
    debug_assert!((1..=1 << 16).contains(&sum) && prob_bits <= 15);
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    {
        let mut out = [0u32; 16];
        // SAFETY: AVX2 is enabled for the whole build (the cfg above); the
        // stores write out[8h..8h + 8], within its 16 elements.
        unsafe {
            use std::arch::x86_64::*;
            for (h, q) in code_quotient_vectors(sum, prob_bits).into_iter().enumerate() {
                _mm256_storeu_si256(out.as_mut_ptr().add(8 * h) as *mut __m256i, q);
            }
        }
        out
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    let inv = 1.0 / sum as f64;
    #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
    std::array::from_fn(|q| {
        let a = WEIGHT_OF_CODE[q] << prob_bits;
        let q0 = (a as f64 * inv) as u32;
        let q0 = q0 - (q0 * sum > a) as u32;
        q0 + ((q0 + 1) * sum <= a) as u32
    })
}

/// `code_quotients` as two vectors (codes 0-7, then 8-15).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline]
fn code_quotient_vectors(sum: u32, prob_bits: u32) -> [std::arch::x86_64::__m256i; 2] {
    use std::arch::x86_64::*;
    let inv = 1.0 / sum as f64;
    // The same steps on eight codes per vector (a scalar form compiles to
    // one conversion at a time): numerators, quotients and products stay
    // below 2^25, so the i32 conversions truncate exactly and signed
    // compares order them correctly.
    // SAFETY: AVX2 is enabled for the whole build (the cfg above); the
    // loads read WEIGHT_OF_CODE[8h..8h + 8], within its 16 elements.
    unsafe {
        let vinv = _mm256_set1_pd(inv);
        let vsum = _mm256_set1_epi32(sum as i32);
        let one = _mm256_set1_epi32(1);
        let shift = _mm_cvtsi32_si128(prob_bits as i32);
        std::array::from_fn(|h| {
            let a = _mm256_sll_epi32(_mm256_loadu_si256(WEIGHT_OF_CODE.as_ptr().add(8 * h) as *const __m256i), shift);
            let lo = _mm256_cvttpd_epi32(_mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_castsi256_si128(a)), vinv));
            let hi = _mm256_cvttpd_epi32(_mm256_mul_pd(_mm256_cvtepi32_pd(_mm256_extracti128_si256(a, 1)), vinv));
            let q0 = _mm256_set_m128i(hi, lo);
            // q0 -= (q0 * sum > a); q0 += ((q0 + 1) * sum <= a)
            let q0 = _mm256_add_epi32(q0, _mm256_cmpgt_epi32(_mm256_mullo_epi32(q0, vsum), a));
            let q1 = _mm256_add_epi32(q0, one);
            _mm256_add_epi32(q0, _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_mullo_epi32(q1, vsum), a), one))
        })
    }
}

/// `table_from_codes`, appending the frequencies to `out` (no allocation
/// per table: a stream has one table per channel of every plane). On error
/// `out` is unchanged.
pub fn freqs_from_codes(codes: &[u8], prob_bits: u32, out: &mut Vec<u16>) -> Result<(), Error> {
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    if codes.len() <= 256 {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 is enabled for the whole build (the cfg above). Each
        // load reads 16 bytes of `codes` (whole chunks, or its last 16), or
        // 16 of SHIFT_DOWN from index 16 - rest (at most 16 + 15 < 32); at
        // most 16 vectors for 256 codes.
        unsafe {
            let nib = _mm_set1_epi8(15);
            let mut v = [_mm_setzero_si128(); 16];
            let mut chunks = codes.chunks_exact(16);
            let mut k = 0;
            for ch in &mut chunks {
                v[k] = _mm_and_si128(_mm_loadu_si128(ch.as_ptr() as *const __m128i), nib);
                k += 1;
            }
            let rest = chunks.remainder().len();
            if rest > 0 {
                let len = codes.len();
                let tail = if len >= 16 {
                    // The last 16 codes, moved down by 16 - rest bytes
                    // (zeros shifted in): the rest at the bottom.
                    let last = _mm_loadu_si128(codes[len - 16..].as_ptr() as *const __m128i);
                    _mm_shuffle_epi8(last, _mm_loadu_si128(SHIFT_DOWN[16 - rest..].as_ptr() as *const __m128i))
                } else if len > 8 {
                    // Codes 8..len: the last 8 shifted down by 16 - len bytes.
                    let hi = u64::from_le_bytes(codes[len - 8..].try_into().unwrap()) >> (8 * (16 - len));
                    _mm_set_epi64x(hi as i64, u64::from_le_bytes(codes[..8].try_into().unwrap()) as i64)
                } else if len == 8 {
                    _mm_cvtsi64_si128(u64::from_le_bytes(codes[..8].try_into().unwrap()) as i64)
                } else {
                    _mm_cvtsi64_si128(tail_u64(codes) as i64)
                };
                v[k] = _mm_and_si128(tail, nib);
                k += 1;
            }
            return freqs_from_code_vectors(&v[..k], codes.len(), prob_bits, out);
        }
    }
    freqs_from_codes_scalar(codes, prob_bits, out)
}

/// `freqs_from_codes` by counting each code (the form for builds without
/// AVX2 and for more than 256 codes).
fn freqs_from_codes_scalar(codes: &[u8], prob_bits: u32, out: &mut Vec<u16>) -> Result<(), Error> {
    // Four sets of counters, so that runs of one code do not wait on each
    // other's increments.
    let mut counts = [[0u32; 16]; 4];
    let mut quads = codes.chunks_exact(4);
    for q4 in &mut quads {
        for (k, &q) in q4.iter().enumerate() {
            counts[k][q as usize & 15] += 1;
        }
    }
    for &q in quads.remainder() {
        counts[0][q as usize & 15] += 1;
    }
    let count: [u32; 16] = std::array::from_fn(|q| counts[0][q] + counts[1][q] + counts[2][q] + counts[3][q]);
    freqs_from_counts(&count, prob_bits, out, |of_code, out| out.extend(codes.iter().map(|&q| of_code[q as usize & 15])))
}

/// `freqs_from_codes` of the `n` codes packed two per byte in `body` (the
/// compact form's body: high nibble first; when `n` is odd the last low
/// nibble is padding, which must be zero), without unpacking them first.
pub fn freqs_from_packed(body: &[u8], n: usize, prob_bits: u32, out: &mut Vec<u16>) -> Result<(), Error> {
    debug_assert!(body.len() == n.div_ceil(2) && (n % 2 == 0 || body[n / 2] & 15 == 0));
    #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
    if n <= 256 && body.len() == n.div_ceil(2) {
        use std::arch::x86_64::*;
        // SAFETY: AVX2 is enabled for the whole build (the cfg above). Each
        // load reads 8 bytes of `body` (whole chunks); at most 16 vectors
        // for 128 bytes.
        unsafe {
            let nib = _mm_set1_epi8(15);
            // 8 bytes to their 16 codes in order: high nibble, low nibble.
            let unpack = |x: __m128i| _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(x, 4), nib), _mm_and_si128(x, nib));
            let mut v = [_mm_setzero_si128(); 16];
            let mut chunks = body.chunks_exact(8);
            let mut k = 0;
            for ch in &mut chunks {
                v[k] = unpack(_mm_loadl_epi64(ch.as_ptr() as *const __m128i));
                k += 1;
            }
            let rest = chunks.remainder();
            if !rest.is_empty() {
                let len = body.len();
                // The rest's bytes at the bottom of a u64, zeros above: the
                // last 8 bytes shifted down where there are 8.
                let tail = if len >= 8 { u64::from_le_bytes(body[len - 8..].try_into().unwrap()) >> (8 * (8 - rest.len())) } else { tail_u64(body) };
                v[k] = unpack(_mm_cvtsi64_si128(tail as i64));
                k += 1;
            }
            return freqs_from_code_vectors(&v[..k], n, prob_bits, out);
        }
    }
    freqs_from_packed_scalar(body, n, prob_bits, out)
}

/// `freqs_from_packed` by counting each code (the form for builds
/// without AVX2).
fn freqs_from_packed_scalar(body: &[u8], n: usize, prob_bits: u32, out: &mut Vec<u16>) -> Result<(), Error> {
    let mut counts = [[0u32; 16]; 4];
    let mut pairs = body.chunks_exact(2);
    for p in &mut pairs {
        counts[0][(p[0] >> 4) as usize] += 1;
        counts[1][(p[0] & 15) as usize] += 1;
        counts[2][(p[1] >> 4) as usize] += 1;
        counts[3][(p[1] & 15) as usize] += 1;
    }
    for &b in pairs.remainder() {
        counts[0][(b >> 4) as usize] += 1;
        counts[1][(b & 15) as usize] += 1;
    }
    // A padding nibble counts as code 0, which no step below reads.
    let count: [u32; 16] = std::array::from_fn(|q| counts[0][q] + counts[1][q] + counts[2][q] + counts[3][q]);
    freqs_from_counts(&count, prob_bits, out, |of_code, out| {
        let start = out.len();
        out.resize(start + 2 * body.len(), 0);
        for (d, &b) in out[start..].chunks_exact_mut(2).zip(body) {
            d[0] = of_code[(b >> 4) as usize];
            d[1] = of_code[(b & 15) as usize];
        }
        out.truncate(start + n);
    })
}

/// `b` (fewer than 8 bytes) as the low bytes of a u64, zeros above, by at
/// most three loads (a copy of variable length is a call to `memcpy`).
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
fn tail_u64(b: &[u8]) -> u64 {
    let l = b.len();
    debug_assert!(l < 8);
    if l >= 4 {
        // Two overlapping 4-byte loads: each byte lands at its own place.
        let a = u32::from_le_bytes(b[..4].try_into().unwrap()) as u64;
        let z = u32::from_le_bytes(b[l - 4..].try_into().unwrap()) as u64;
        a | z << (8 * (l - 4))
    } else if l > 0 {
        b[0] as u64 | (b[l / 2] as u64) << (8 * (l / 2)) | (b[l - 1] as u64) << (8 * (l - 1))
    } else {
        0
    }
}

/// Shuffle control for moving a vector down by `k` bytes (16 from index
/// `k`): bytes k..16 to 0..16 - k, zeros (0x80) above.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
static SHIFT_DOWN: [u8; 32] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80];

/// `freqs_from_counts` (the same checks, errors and frequencies) from the
/// codes themselves, 16 per vector (each `0..=15`; lanes past the `n`-th
/// code are 0), without counting each code: the weight sum and the number
/// of non-zero codes by byte lookups and sums, the frequencies by byte
/// lookups of each code's (its low and high bytes), and what was assigned
/// and the largest frequency from the frequencies written. The frequency
/// of a code that is absent is never written, so giving every code its
/// quotient (not 0 when absent, as `freqs_from_counts` does) changes
/// nothing, and padding lanes (code 0) get 0 and count for nothing.
///
/// # Safety
/// AVX2; `v.len() == n.div_ceil(16)`, at most 16.
#[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
#[inline(always)]
unsafe fn freqs_from_code_vectors(v: &[std::arch::x86_64::__m128i], n: usize, prob_bits: u32, out: &mut Vec<u16>) -> Result<(), Error> {
    use std::arch::x86_64::*;
    debug_assert!(v.len() == n.div_ceil(16) && v.len() <= 16);
    let zero = _mm_setzero_si128();
    let fifteen = _mm_set1_epi8(15);
    // WEIGHT_OF_CODE's low bytes: every weight is below 256 except code
    // 15's, which is 256 (low byte 0) and is added by its count.
    let weight_lo = _mm_setr_epi8(0, 2, 3, 4, 6, 8, 11, 16, 23, 32, 45, 64, 91, 128u8 as i8, 181u8 as i8, 0);
    let mut wsum = _mm_setzero_si128();
    let (mut zeros, mut fifteens) = (0u32, 0u32);
    for &c in v {
        wsum = _mm_add_epi64(wsum, _mm_sad_epu8(_mm_shuffle_epi8(weight_lo, c), zero));
        zeros += (_mm_movemask_epi8(_mm_cmpeq_epi8(c, zero)) as u32).count_ones();
        fifteens += (_mm_movemask_epi8(_mm_cmpeq_epi8(c, fifteen)) as u32).count_ones();
    }
    let total: u64 = 1 << prob_bits;
    // Padding lanes are code 0, so they are among the zeros.
    let nonzero = (16 * v.len()) as u64 - zeros as u64;
    let sum = _mm_cvtsi128_si64(wsum) as u64 + _mm_extract_epi64(wsum, 1) as u64 + 256 * fifteens as u64;
    if nonzero == 0 {
        return Err(Error::Corrupt("frequency table has no symbol"));
    }
    if nonzero > total / 2 {
        return Err(Error::Corrupt("frequency table has more symbols than prob_bits allows"));
    }
    // Each code's frequency, max(quotient, 1) and 0 for code 0, as 16-bit
    // values in code order (packus interleaves the 128-bit halves,
    // permute4x64 puts them back; present codes' frequencies are at most
    // `total`, so the saturation only touches absent codes), then split
    // into a table of low bytes and one of high bytes.
    let [q0, q1] = code_quotient_vectors(sum as u32, prob_bits);
    let one = _mm256_set1_epi32(1);
    let q0 = _mm256_blend_epi32(_mm256_max_epu32(q0, one), _mm256_setzero_si256(), 1);
    let q1 = _mm256_max_epu32(q1, one);
    let of_code = _mm256_permute4x64_epi64(_mm256_packus_epi32(q0, q1), 0b11_01_10_00);
    let split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15, 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    let bytes = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(of_code, split), 0b11_01_10_00);
    let lo_bytes = _mm256_castsi256_si128(bytes);
    let hi_bytes = _mm256_extracti128_si256(bytes, 1);
    out.reserve(16 * v.len());
    let start = out.len();
    let dst = out.as_mut_ptr().add(start);
    let mut acc = _mm256_setzero_si256();
    let mut fmax = _mm_setzero_si128();
    for (k, &c) in v.iter().enumerate() {
        let (lo, hi) = (_mm_shuffle_epi8(lo_bytes, c), _mm_shuffle_epi8(hi_bytes, c));
        let (a, b) = (_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi));
        // Within the capacity reserved above (16 per vector).
        _mm_storeu_si128(dst.add(16 * k) as *mut __m128i, a);
        _mm_storeu_si128(dst.add(16 * k + 8) as *mut __m128i, b);
        acc = _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_cvtepu16_epi32(a), _mm256_cvtepu16_epi32(b)));
        fmax = _mm_max_epu16(fmax, _mm_max_epu16(a, b));
    }
    // The first n were written above (n <= 16 * v.len()).
    out.set_len(start + n);
    let acc = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    let acc = _mm_add_epi32(acc, _mm_unpackhi_epi64(acc, acc));
    let mut assigned = (_mm_cvtsi128_si32(acc) as u32 as u64) + (_mm_extract_epi32(acc, 1) as u32 as u64);
    // Only with `assigned < total`: as in freqs_from_counts, the largest
    // frequency (of a present code: absent codes write nothing, padding
    // writes 0) is given the remainder, at the first symbol that has it.
    // There is one: the present codes' frequencies are all written, and at
    // least one code is present. Read through `dst` (the 16 * v.len()
    // values written) before `freq` borrows the first n.
    let mut imax = 0;
    if assigned < total {
        let m: [u16; 8] = std::mem::transmute(fmax);
        let fmax = _mm_set1_epi16(m.iter().copied().max().unwrap_or(0) as i16);
        for k in 0..2 * v.len() {
            let hit = _mm_movemask_epi8(_mm_cmpeq_epi16(_mm_loadu_si128(dst.add(8 * k) as *const __m128i), fmax));
            if hit != 0 {
                imax = 8 * k + hit.trailing_zeros() as usize / 2;
                break;
            }
        }
    }
    let freq = &mut out[start..];
    if assigned < total {
        // (imax < n but for a non-zero padding nibble, which the callers rule out.)
        let imax = if imax < n { imax } else { 0 };
        freq[imax] += (total - assigned) as u16;
        assigned = total;
    }
    settle(freq, assigned, total);
    Ok(())
}

/// The rest of `freqs_from_codes` from the number of each code (`count[0]`
/// is not read): the checks, each code's frequency, then `extend(of_code,
/// out)` appends `of_code[q]` for each code `q` in order, and the remainder
/// is settled on what it appended.
#[inline]
fn freqs_from_counts(count: &[u32; 16], prob_bits: u32, out: &mut Vec<u16>, extend: impl FnOnce(&[u16; 16], &mut Vec<u16>)) -> Result<(), Error> {
    let total: u64 = 1 << prob_bits;
    let nonzero: u64 = count[1..].iter().map(|&c| c as u64).sum();
    let sum: u64 = (1..16).map(|q| count[q] as u64 * WEIGHT_OF_CODE[q] as u64).sum();
    if nonzero == 0 {
        return Err(Error::Corrupt("frequency table has no symbol"));
    }
    if nonzero > total / 2 {
        return Err(Error::Corrupt("frequency table has more symbols than prob_bits allows"));
    }
    // Computed for every code without a branch (absent codes get 0).
    let quot = code_quotients(sum as u32, prob_bits);
    let of_code: [u16; 16] = std::array::from_fn(|q| if q > 0 && count[q] > 0 { quot[q].max(1) as u16 } else { 0 });
    let mut assigned: u64 = (1..16).map(|q| count[q] as u64 * of_code[q] as u64).sum();
    let start = out.len();
    extend(&of_code, out);
    let freq = &mut out[start..];
    if assigned < total {
        // settle's first step without its scan for the largest: the
        // largest frequency is the largest of the present codes' (absent
        // codes have 0), at the first symbol that has it.
        let fmax = of_code.iter().copied().max().unwrap_or(0);
        let imax = freq.iter().position(|&f| f == fmax).unwrap_or(0);
        freq[imax] += (total - assigned) as u16;
        assigned = total;
    }
    settle(freq, assigned, total);
    Ok(())
}

/// Serialised size of a compact table with `n` symbols.
pub fn compact_len(n: usize) -> usize {
    2 + n.div_ceil(2)
}

/// Append the compact form: `lo`, `n - 1`, then the codes two per byte, high
/// nibble first, the last byte's low nibble zero when `n` is odd.
pub fn write_compact(out: &mut Vec<u8>, lo: u8, codes: &[u8]) {
    debug_assert!(!codes.is_empty() && codes.len() <= 256);
    out.push(lo);
    out.push((codes.len() - 1) as u8);
    for pair in codes.chunks(2) {
        let hi = pair[0] & 15;
        let lo_nib = pair.get(1).copied().unwrap_or(0) & 15;
        out.push((hi << 4) | lo_nib);
    }
}

/// Parse one compact table at `buf[*pos..]`, checking it fits an alphabet
/// of `nsym` symbols. Advances `pos`.
pub fn read_compact(buf: &[u8], pos: &mut usize, nsym: usize, prob_bits: u32) -> Result<FreqTable, Error> {
    let mut freq = Vec::new();
    let lo = read_compact_into(buf, pos, nsym, prob_bits, &mut freq)?;
    Ok(FreqTable { lo, freq })
}

/// `read_compact`, appending the table's frequencies to `freq` and
/// returning its `lo` (the same checks; on error `freq` is unchanged).
pub fn read_compact_into(buf: &[u8], pos: &mut usize, nsym: usize, prob_bits: u32, freq: &mut Vec<u16>) -> Result<u8, Error> {
    let head = buf.get(*pos..*pos + 2).ok_or(Error::Corrupt("table section truncated"))?;
    let lo = head[0];
    let n = head[1] as usize + 1;
    if lo as usize + n > nsym {
        return Err(Error::Corrupt("table covers symbols outside the plane's alphabet"));
    }
    let body = buf
        .get(*pos + 2..*pos + compact_len(n))
        .ok_or(Error::Corrupt("table section truncated"))?;
    if n % 2 == 1 && body[n / 2] & 15 != 0 {
        return Err(Error::Corrupt("table padding nibble is not zero"));
    }
    *pos += compact_len(n);
    freqs_from_packed(body, n, prob_bits, freq)?;
    Ok(lo)
}

/// How a table section stores its tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEncoding {
    /// 4-bit weight codes (streams that carry their own tables).
    Compact,
    /// Exact 16-bit frequencies (calibrated table sets, stored once).
    Exact,
}

/// Append the exact form: `lo`, `n - 1`, then `n` little-endian u16 frequencies.
pub fn write_exact(out: &mut Vec<u8>, t: &FreqTable) {
    out.push(t.lo);
    out.push((t.freq.len() - 1) as u8);
    for f in &t.freq {
        out.extend_from_slice(&f.to_le_bytes());
    }
}

/// Parse one exact table; frequencies must sum to `1 << prob_bits`.
pub fn read_exact(buf: &[u8], pos: &mut usize, nsym: usize, prob_bits: u32) -> Result<FreqTable, Error> {
    let head = buf.get(*pos..*pos + 2).ok_or(Error::Corrupt("table section truncated"))?;
    let lo = head[0];
    let n = head[1] as usize + 1;
    if lo as usize + n > nsym {
        return Err(Error::Corrupt("table covers symbols outside the plane's alphabet"));
    }
    let body = buf.get(*pos + 2..*pos + 2 + 2 * n).ok_or(Error::Corrupt("table section truncated"))?;
    let freq: Vec<u16> = body.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
    if freq.iter().map(|&f| f as u32).sum::<u32>() != 1 << prob_bits {
        return Err(Error::Corrupt("table frequencies do not sum to 2^prob_bits"));
    }
    *pos += 2 + 2 * n;
    Ok(FreqTable { lo, freq })
}

/// Per-symbol encoder constants (16 bytes). The encoder divides the state
/// by the frequency with a multiply (Granlund and Montgomery 1994, exact for
/// every 32-bit state), since a hardware divide per symbol would cap it.
#[derive(Clone, Copy, Default, Debug)]
pub struct EncSymbol {
    pub rcp_freq: u32,
    pub bias: u32,
    pub freq: u16,
    pub cmpl_freq: u16,
    pub rcp_shift: u32,
}

impl EncSymbol {
    pub fn new(start: u32, freq: u32, prob_bits: u32) -> EncSymbol {
        debug_assert!(freq > 0 && start + freq <= 1 << prob_bits && prob_bits <= 15);
        let cmpl_freq = ((1u32 << prob_bits) - freq) as u16;
        if freq == 1 {
            // The quotient comes out as x - 1; the bias adds the missing M - 1.
            EncSymbol { rcp_freq: u32::MAX, rcp_shift: 0, bias: start + (1 << prob_bits) - 1, freq: 1, cmpl_freq }
        } else {
            let l = 32 - (freq - 1).leading_zeros(); // ceil(log2(freq))
            let m = ((1u64 << 32) * ((1u64 << l) - freq as u64) / freq as u64 + 1) as u32;
            EncSymbol { rcp_freq: m, rcp_shift: l - 1, bias: start, freq: freq as u16, cmpl_freq }
        }
    }

    /// Whether state `x` must flush a 16-bit word before coding this symbol:
    /// `x >= ((RANS_L >> prob_bits) << 16) * freq`, written without overflow.
    #[inline(always)]
    pub fn must_flush(&self, x: u32, prob_bits: u32) -> bool {
        (x >> (32 - prob_bits)) >= self.freq as u32
    }

    /// The coder step `C(s, x) = (x / f) * M + x % f + start`.
    #[inline(always)]
    pub fn encode(&self, x: u32) -> u32 {
        let t = ((x as u64 * self.rcp_freq as u64) >> 32) as u32;
        let q = (t + ((x - t) >> 1)) >> self.rcp_shift;
        x.wrapping_add(self.bias).wrapping_add(q.wrapping_mul(self.cmpl_freq as u32))
    }
}

/// Encoder constants of one table, indexed by `symbol - lo`.
pub struct EncTable {
    pub lo: u8,
    pub symbols: Vec<EncSymbol>,
}

/// `(rcp_freq, rcp_shift)` of every frequency `1..2^prob_bits` for the
/// encoder's precisions, computed once: the reciprocal depends on the
/// frequency alone, and a 64-bit division per symbol of every table made
/// building encoder tables a sizeable part of encoding.
fn reciprocals(prob_bits: u32) -> Option<&'static [(u32, u32)]> {
    static TABLES: std::sync::OnceLock<Vec<Vec<(u32, u32)>>> = std::sync::OnceLock::new();
    let all = TABLES.get_or_init(|| {
        (8..=10u32)
            .map(|pb| (0..1u32 << pb).map(|f| if f == 0 { (0, 0) } else { let e = EncSymbol::new(0, f, pb); (e.rcp_freq, e.rcp_shift) }).collect())
            .collect()
    });
    all.get(prob_bits.checked_sub(8)? as usize).map(|v| &v[..])
}

/// The constants of a symbol at `start` with frequency `freq > 0`: those of
/// `EncSymbol::new`, the reciprocal taken from a precomputed table where
/// there is one.
#[inline]
pub fn enc_symbol(start: u32, freq: u32, prob_bits: u32) -> EncSymbol {
    match reciprocals(prob_bits) {
        // Same constants as EncSymbol::new (tests compare them).
        Some(r) if freq < (1 << prob_bits) && freq > 1 => {
            let (rcp_freq, rcp_shift) = r[freq as usize];
            EncSymbol { rcp_freq, rcp_shift, bias: start, freq: freq as u16, cmpl_freq: ((1u32 << prob_bits) - freq) as u16 }
        }
        _ => EncSymbol::new(start, freq, prob_bits),
    }
}

/// For the flat encoder tables (`rans::FlatEncTables`): per frequency `f`
/// in `0..=2^prob_bits`, the entry word without the start (`f - 1`, the
/// bias beyond the start in bits 10-20, the reciprocal's shift in bits
/// 21-24) and the reciprocal, both from `EncSymbol::new`; `f = 0` gives
/// zeros. The entry of a symbol at `start` is `word + (start << 10)`.
pub fn flat_constants(prob_bits: u32) -> &'static [(u32, u32)] {
    static TABLES: std::sync::OnceLock<Vec<Vec<(u32, u32)>>> = std::sync::OnceLock::new();
    let all = TABLES.get_or_init(|| {
        (8..=10u32)
            .map(|pb| {
                (0..=1u32 << pb)
                    .map(|f| {
                        if f == 0 {
                            return (0, 0);
                        }
                        let e = EncSymbol::new(0, f, pb);
                        ((f - 1) | (e.bias << 10) | (e.rcp_shift << 21), e.rcp_freq)
                    })
                    .collect()
            })
            .collect()
    });
    &all[(prob_bits - 8) as usize]
}

impl EncTable {
    pub fn new(t: &FreqTable, prob_bits: u32) -> EncTable {
        let mut start = 0u32;
        let symbols = t
            .freq
            .iter()
            .map(|&f| {
                let e = if f == 0 { EncSymbol::default() } else { enc_symbol(start, f as u32, prob_bits) };
                start += f as u32;
                e
            })
            .collect();
        EncTable { lo: t.lo, symbols }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_of_count_matches_the_log2_formula() {
        for max in 1..=4096u32 {
            for c in 1..=max {
                assert_eq!(code_of_count(max as f64, c), code_exact(max as f64, c), "max {max} c {c}");
            }
        }
        let mut state = 0x9e3779b97f4a7c15u64;
        for _ in 0..2_000_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let max = (state >> 32) as u32 >> (state % 24) as u32;
            let c = ((state as u32) % max.max(1)).max(1).min(max.max(1));
            let max = max.max(c);
            assert_eq!(code_of_count(max as f64, c), code_exact(max as f64, c), "max {max} c {c}");
        }
    }

    #[test]
    fn normalize_sums_to_total_and_keeps_every_symbol() {
        for pb in [8u32, 10, 12] {
            let w = [1u32, 1000000, 3, 0, 7, 1];
            let f = normalize(&w, pb).unwrap();
            assert_eq!(f.iter().map(|&x| x as u32).sum::<u32>(), 1 << pb);
            for (wi, fi) in w.iter().zip(&f) {
                assert_eq!(*wi == 0, *fi == 0);
            }
        }
    }

    #[test]
    fn float_quotient_matches_integer_division() {
        // The f64 floor in `normalize` against 64-bit integer division, on
        // the weight ranges the format produces and on extreme ones.
        let mut state = 0x9e3779b97f4a7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..200_000u64 {
            let n = (next() % 256 + 1) as usize;
            let shift = [8, 16, 21, 32][(i % 4) as usize];
            let w: Vec<u32> = (0..n).map(|_| (next() % (1u64 << shift)) as u32).collect();
            let sum: u64 = w.iter().map(|&x| x as u64).sum();
            if sum == 0 {
                continue;
            }
            for pb in [8u32, 10, 12, 15] {
                let total = 1u64 << pb;
                for &x in &w {
                    let exact = (x as u64 * total) / sum;
                    let float = ((x as u64 * total) as f64 / sum as f64) as u64;
                    assert_eq!(exact, float, "w {x} sum {sum} pb {pb}");
                }
            }
        }
        // Numerators one below a multiple of the sum: the closest a
        // non-integer quotient gets to the next integer.
        for sum in [3u64, 255, 65_535, (1 << 20) + 7, (1 << 32) - 5, (1 << 40) - 1] {
            for k in [1u64, 2, 3, 1000, 32_767, 1 << 15, 1 << 20] {
                let a = k * sum - 1;
                if a >= 1 << 47 {
                    continue;
                }
                assert_eq!((a as f64 / sum as f64) as u64, k - 1, "a {a} sum {sum}");
            }
        }
        // Exact multiples and the largest values.
        for (x, sum) in [(u32::MAX as u64, 256 * u32::MAX as u64), (3, 3), (1, 1 << 39), ((1 << 32) - 1, (1 << 32) - 1)] {
            assert_eq!((x << 15) / sum, ((x << 15) as f64 / sum as f64) as u64);
        }
    }

    #[test]
    fn table_from_codes_is_normalize_of_the_weights() {
        let mut state = 0x2545f4914f6cdd1du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for i in 0..20_000 {
            let n = (next() % 256 + 1) as usize;
            // Mostly small tables with a peak, some flat, some sparse.
            let codes: Vec<u8> = (0..n).map(|_| if i % 3 == 0 { (next() % 16) as u8 } else { (15 - (next() % 6).min(next() % 16)) as u8 }).collect();
            let weights: Vec<u32> = codes.iter().map(|&q| WEIGHT_OF_CODE[q as usize]).collect();
            for pb in [8u32, 9, 10, 12, 15] {
                let want = normalize(&weights, pb);
                let got = table_from_codes(7, &codes, pb);
                match (want, got) {
                    (Ok(f), Ok(t)) => assert_eq!(t, FreqTable { lo: 7, freq: f }, "codes {codes:?} pb {pb}"),
                    (Err(_), Err(_)) => {}
                    (w, g) => panic!("codes {codes:?} pb {pb}: normalize {w:?}, table_from_codes {g:?}"),
                }
                // The packed form (the decoder's) gives the same frequencies and errors.
                let packed: Vec<u8> = codes.chunks(2).map(|p| p[0] << 4 | p.get(1).copied().unwrap_or(0)).collect();
                let (mut a, mut b) = (vec![9u16], vec![9u16]);
                let ra = freqs_from_codes(&codes, pb, &mut a);
                let rb = freqs_from_packed(&packed, n, pb, &mut b);
                assert_eq!(format!("{ra:?}"), format!("{rb:?}"), "codes {codes:?} pb {pb}");
                assert_eq!(a, b, "codes {codes:?} pb {pb}");
                // The counting forms (builds without AVX2) agree too.
                let (mut c, mut d) = (vec![9u16], vec![9u16]);
                let rc = freqs_from_codes_scalar(&codes, pb, &mut c);
                let rd = freqs_from_packed_scalar(&packed, n, pb, &mut d);
                assert_eq!(format!("{ra:?}"), format!("{rc:?}"), "codes {codes:?} pb {pb}");
                assert_eq!(format!("{ra:?}"), format!("{rd:?}"), "codes {codes:?} pb {pb}");
                assert_eq!((&a, &a), (&c, &d), "codes {codes:?} pb {pb}");
            }
        }
    }

    #[test]
    fn code_quotients_match_integer_division_exhaustively() {
        // Every weight of a code, every possible sum of up to 256 weights,
        // every precision: `code_quotients` is exact.
        for sum in 1..=256u32 * 256 {
            for pb in 8..=15u32 {
                let got = code_quotients(sum, pb);
                for (q, &w) in WEIGHT_OF_CODE.iter().enumerate() {
                    assert_eq!(got[q], (w << pb) / sum, "w {w} sum {sum} pb {pb}");
                }
            }
        }
    }

    #[test]
    fn nonzero_scans_match_position_and_rposition() {
        let mut state = 0x9e3779b97f4a7c15u64;
        for len in [0usize, 1, 15, 16, 17, 31, 32, 33, 255, 256] {
            for _ in 0..500 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let mut h = vec![0u32; len];
                if len > 0 {
                    for k in 0..(state % 4) {
                        let i = ((state >> (8 * k + 3)) as usize) % len;
                        h[i] = (state >> 40) as u32 | 1;
                    }
                }
                assert_eq!(first_nonzero(&h), h.iter().position(|&c| c > 0), "{h:?}");
                assert_eq!(last_nonzero(&h), h.iter().rposition(|&c| c > 0), "{h:?}");
            }
        }
    }

    #[test]
    fn normalize_rejects_too_many_symbols() {
        let w = vec![1u32; 200];
        assert!(normalize(&w, 8).is_err());
        assert!(normalize(&w, 9).is_ok());
    }

    #[test]
    fn compact_round_trip() {
        let hist = [0u32, 0, 5, 100, 3000, 90, 0, 1, 0];
        let (lo, codes) = codes_from_histogram(&hist);
        assert_eq!(lo, 2);
        assert_eq!(codes.len(), 6);
        let mut buf = Vec::new();
        write_compact(&mut buf, lo, &codes);
        assert_eq!(buf.len(), compact_len(6));
        let mut pos = 0;
        let t = read_compact(&buf, &mut pos, 9, 10).unwrap();
        assert_eq!(pos, buf.len());
        assert_eq!(t, table_from_codes(lo, &codes, 10).unwrap());
        assert_eq!(t.freq_of(6), 0);
        assert!(t.freq_of(4) > t.freq_of(3));
    }

    #[test]
    fn cached_reciprocals_match_per_symbol_constants() {
        for pb in 8u32..=10 {
            let n = 1u32 << pb;
            // Tables [f, n - f]: every frequency from 1 to n - 1 appears.
            for f in 1..n {
                let t = FreqTable { lo: 3, freq: vec![f as u16, (n - f) as u16] };
                let enc = EncTable::new(&t, pb);
                let mut start = 0;
                for (e, &f) in enc.symbols.iter().zip(&t.freq) {
                    let want = EncSymbol::new(start, f as u32, pb);
                    assert_eq!((e.rcp_freq, e.rcp_shift, e.bias, e.freq, e.cmpl_freq), (want.rcp_freq, want.rcp_shift, want.bias, want.freq, want.cmpl_freq), "pb {pb} f {f}");
                    start += f as u32;
                }
            }
        }
    }

    #[test]
    fn encoder_reciprocal_matches_division() {
        for pb in [10u32, 12] {
            for freq in [1u32, 2, 3, 4, 7, 100, 1 << (pb - 1), (1 << pb) - 5] {
                let start = 1;
                let s = EncSymbol::new(start, freq, pb);
                let x_max = (((super::super::rans::RANS_L >> pb) as u64) << 16) * freq as u64;
                for x in [super::super::rans::RANS_L as u64, 123456789, 3_000_000_000, x_max - 1, x_max, u32::MAX as u64] {
                    let x = x.min(u32::MAX as u64);
                    assert_eq!(s.must_flush(x as u32, pb), x >= x_max, "flush at x {x} freq {freq}");
                    if x >= x_max {
                        continue;
                    }
                    let x = x as u32;
                    let got = s.encode(x);
                    let want = ((x / freq) << pb) + (x % freq) + start;
                    assert_eq!(got, want, "freq {freq} x {x}");
                }
            }
        }
    }
}

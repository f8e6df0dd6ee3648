//! Interleaved rANS over one segment: up to 32 lanes, one per channel, each
//! with its own table, sharing one stream of 16-bit words.
//!
//! Decode order (the order everything else is defined by): for each channel
//! group of the segment, for each token of the token block, for each active
//! lane in ascending order, decode one symbol and, if the state fell below
//! `RANS_L`, refill it with the next word. A GPU warp runs exactly this with
//! one lane per thread (refills become a ballot + prefix count); the CPU runs
//! the same loop. The encoder walks the same order backwards.

use super::table::{EncTable, FreqTable};
use super::Error;

/// Lower bound of the normalised state interval `[RANS_L, 2^32)`.
pub const RANS_L: u32 = 1 << 16;
/// Lanes per segment: one warp.
pub const LANES: usize = 32;

/// Geometry of one segment within its plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentGeometry {
    /// First channel group (channel = 32 * group + lane).
    pub group_begin: usize,
    pub group_end: usize,
    pub token_begin: usize,
    pub token_end: usize,
    /// Channels in the plane.
    pub channels: usize,
}

impl SegmentGeometry {
    /// Lanes active in group `g`.
    pub fn lanes_in_group(&self, g: usize) -> usize {
        (self.channels - LANES * g).min(LANES)
    }
    /// Lanes with at least one symbol (those that store a state).
    pub fn lanes(&self) -> usize {
        self.lanes_in_group(self.group_begin)
    }
    pub fn symbols(&self) -> usize {
        let t = self.token_end - self.token_begin;
        (self.group_begin..self.group_end).map(|g| self.lanes_in_group(g) * t).sum()
    }
}

/// Encode one segment. `symbols` is the plane `[tokens, channels_stride]`;
/// `enc_tables[c]` holds the encoder constants of channel `c`'s table.
/// Appends the segment bytes (lane states, then words) to `out`.
pub fn encode_segment(
    geo: &SegmentGeometry,
    symbols: &[u8],
    channels_stride: usize,
    enc_tables: &[&EncTable],
    prob_bits: u32,
    out: &mut Vec<u8>,
    words: &mut Vec<u16>,
) {
    let lanes = geo.lanes();
    let mut x = [RANS_L; LANES];
    // At most one word per symbol: write unconditionally, advance by the
    // flush bit (branch-free; flushes are too irregular to predict).
    words.clear();
    words.resize(geo.symbols() + 1, 0);
    let mut n = 0usize;
    // Walk the decode order backwards; a word flushed here is the word the
    // decoder reads at the same event, so reversing `words` gives decode order.
    for g in (geo.group_begin..geo.group_end).rev() {
        let active = geo.lanes_in_group(g);
        let c0 = LANES * g;
        let tables = &enc_tables[c0..c0 + active];
        for t in (geo.token_begin..geo.token_end).rev() {
            let row = &symbols[t * channels_stride + c0..t * channels_stride + c0 + active];
            for l in (0..active).rev() {
                let table = tables[l];
                let s = &table.symbols[row[l].wrapping_sub(table.lo) as usize];
                let xl = x[l];
                let flush = s.must_flush(xl, prob_bits);
                words[n] = xl as u16;
                n += flush as usize;
                x[l] = s.encode(if flush { xl >> 16 } else { xl });
            }
        }
    }
    words.truncate(n);
    for &state in &x[..lanes] {
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.reserve(words.len() * 2);
    for &w in words.iter().rev() {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Largest `prob_bits` the packed lookup entries can hold.
pub const MAX_DECODE_PROB_BITS: u32 = 10;

/// Decoder scratch, reused across segments: per-lane lookup tables for the
/// group being decoded, the segment's words, and a tile of decoded symbols.
///
/// A lookup entry packs everything one decode step needs, so a step is one
/// load: `symbol | freq << 8 | (slot - cum) << 19` (11-bit fields, which is
/// why streams with more than `MAX_DECODE_PROB_BITS` are refused).
pub struct DecodeScratch {
    lut: Vec<u32>,
    words: Vec<u16>,
    tile: Vec<u8>,
    prob_bits: u32,
}

impl DecodeScratch {
    pub fn new(prob_bits: u32) -> DecodeScratch {
        DecodeScratch { lut: vec![0u32; LANES << prob_bits], words: Vec::new(), tile: Vec::new(), prob_bits }
    }

    fn load(&mut self, lane: usize, table: &FreqTable) {
        let n = 1usize << self.prob_bits;
        let lut = &mut self.lut[lane * n..(lane + 1) * n];
        let mut start = 0usize;
        for (i, &f) in table.freq.iter().enumerate() {
            let sym = (table.lo as usize + i) as u32;
            let f = f as usize;
            for (j, e) in lut[start..start + f].iter_mut().enumerate() {
                *e = sym | (f as u32) << 8 | (j as u32) << 19;
            }
            start += f;
        }
        debug_assert_eq!(start, n);
    }
}

/// Decode one segment. After each channel group, `sink(group, tile, lanes)`
/// receives the group's symbols as `tile[(t - token_begin) * LANES + lane]`.
/// `table_of(c)` returns channel `c`'s table. Fails unless the bytes decode
/// to exactly the segment's symbols with every lane back in its initial state.
pub fn decode_segment<'t>(
    geo: &SegmentGeometry,
    bytes: &[u8],
    table_of: impl Fn(usize) -> &'t FreqTable,
    scratch: &mut DecodeScratch,
    sink: impl FnMut(usize, &[u8], usize),
) -> Result<(), Error> {
    #[cfg(target_arch = "x86_64")]
    let simd = simd::enabled();
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    decode_segment_with(geo, bytes, table_of, scratch, sink, simd)
}

/// `decode_segment` with the SIMD path allowed or not (both must give the
/// same result; tests compare them).
pub fn decode_segment_with<'t>(
    geo: &SegmentGeometry,
    bytes: &[u8],
    table_of: impl Fn(usize) -> &'t FreqTable,
    scratch: &mut DecodeScratch,
    mut sink: impl FnMut(usize, &[u8], usize),
    allow_simd: bool,
) -> Result<(), Error> {
    let prob_bits = scratch.prob_bits;
    if prob_bits > MAX_DECODE_PROB_BITS {
        return Err(Error::Corrupt("prob_bits above what this decoder supports"));
    }
    let lanes = geo.lanes();
    let state_bytes = 4 * lanes;
    if bytes.len() < state_bytes || (bytes.len() - state_bytes) % 2 != 0 {
        return Err(Error::Corrupt("segment length does not match its lanes"));
    }
    let mut x = [RANS_L; LANES];
    for (l, s) in x.iter_mut().take(lanes).enumerate() {
        *s = u32::from_le_bytes(bytes[4 * l..4 * l + 4].try_into().unwrap());
        if *s < RANS_L {
            return Err(Error::Corrupt("rANS state below its normalised range"));
        }
    }
    let nwords = (bytes.len() - state_bytes) / 2;
    scratch.words.clear();
    scratch.words.extend(bytes[state_bytes..].chunks_exact(2).map(|w| u16::from_le_bytes([w[0], w[1]])));
    // Zero padding: reading past the end (only in a corrupt stream, caught
    // by the count check below) stays in bounds; 8 words for the SIMD path.
    scratch.words.extend_from_slice(&[0u16; 8]);
    let tokens = geo.token_end - geo.token_begin;
    scratch.tile.resize(tokens * LANES, 0);
    let mask = (1u32 << prob_bits) - 1;
    let mut pos = 0usize;
    for g in geo.group_begin..geo.group_end {
        let active = geo.lanes_in_group(g);
        for l in 0..active {
            scratch.load(l, table_of(LANES * g + l));
        }
        let DecodeScratch { lut, words, tile, .. } = &mut *scratch;
        assert!(lut.len() == LANES << prob_bits && words.len() == nwords + 8 && tile.len() == tokens * LANES);
        #[cfg(target_arch = "x86_64")]
        if active == LANES && allow_simd && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present; the buffers have the sizes asserted above.
            pos = unsafe { simd::decode_rounds(&mut x, lut, words, nwords, pos, tile, prob_bits) };
            sink(g, &scratch.tile, active);
            continue;
        }
        for row in tile.chunks_exact_mut(LANES) {
            // Two passes per round so lanes do not wait on each other: first
            // every lane decodes its symbol (independent work), then lanes
            // that fell below RANS_L take words in lane order, each at the
            // position given by the count of refilling lanes before it
            // (a warp's ballot and popcount on a GPU).
            let mut need = 0u32;
            for l in 0..active {
                // SAFETY: slot <= mask < 2^prob_bits and l < LANES, so the
                // index is below LANES << prob_bits (asserted above).
                let e = unsafe { *lut.get_unchecked((l << prob_bits) + (x[l] & mask) as usize) };
                let xl = ((e >> 8) & 0x7ff) * (x[l] >> prob_bits) + (e >> 19);
                x[l] = xl;
                need |= ((xl < RANS_L) as u32) << l;
                row[l] = e as u8;
            }
            if need != 0 {
                for l in 0..active {
                    let before = (need & ((1u32 << l) - 1)).count_ones() as usize;
                    // SAFETY: the index is clamped to nwords and words has nwords + 8 entries.
                    let w = unsafe { *words.get_unchecked((pos + before).min(nwords)) } as u32;
                    // Branch-free select: refills are too irregular to predict.
                    let take = 0u32.wrapping_sub((need >> l) & 1);
                    x[l] = (x[l] & !take) | (((x[l] << 16) | w) & take);
                }
                pos += need.count_ones() as usize;
            }
        }
        sink(g, &scratch.tile, active);
    }
    if pos != nwords {
        return Err(Error::Corrupt("segment word count does not match its symbols"));
    }
    if x[..lanes].iter().any(|&s| s != RANS_L) {
        return Err(Error::Corrupt("rANS lanes did not end in their initial state"));
    }
    Ok(())
}

/// AVX2 decoding of full 32-lane rounds: eight lanes per vector, table
/// lookups by gather, refills by a permutation chosen by the refill mask.
/// Produces exactly what the scalar loop produces.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    use super::LANES;

    /// For each 8-bit refill mask, the index among refilling lanes of each
    /// lane (the number of refilling lanes before it).
    const fn refill_permutations() -> [[u32; 8]; 256] {
        let mut t = [[0u32; 8]; 256];
        let mut m = 0;
        while m < 256 {
            let mut l = 0;
            while l < 8 {
                t[m][l] = ((m as u32) & ((1u32 << l) - 1)).count_ones();
                l += 1;
            }
            m += 1;
        }
        t
    }
    static PERM: [[u32; 8]; 256] = refill_permutations();

    /// Whether to take the AVX2 path: the CPU has it, and it was not
    /// turned off with CACHEGEN_NO_SIMD=1 (to compare the two paths).
    pub fn enabled() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::env::var_os("CACHEGEN_NO_SIMD").is_none()
    }

    /// Decode every row of `tile` (LANES symbols per row); returns the new
    /// word position (unclamped, for the caller's count check).
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn decode_rounds(x: &mut [u32; LANES], lut: &[u32], words: &[u16], nwords: usize, mut pos: usize, tile: &mut [u8], prob_bits: u32) -> usize {
        let mask = _mm256_set1_epi32(((1u32 << prob_bits) - 1) as i32);
        let field = _mm256_set1_epi32(0x7ff);
        let shift = _mm_cvtsi32_si128(prob_bits as i32);
        let pick_low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        let mut state = [_mm256_setzero_si256(); 4];
        let mut lut_base = [_mm256_setzero_si256(); 4];
        for v in 0..4 {
            state[v] = _mm256_loadu_si256(x.as_ptr().add(8 * v) as *const __m256i);
            let lanes = _mm256_add_epi32(_mm256_set1_epi32(8 * v as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            lut_base[v] = _mm256_sll_epi32(lanes, shift);
        }
        let lut_ptr = lut.as_ptr() as *const i32;
        for row in tile.chunks_exact_mut(LANES) {
            for v in 0..4 {
                let xv = state[v];
                let slot = _mm256_and_si256(xv, mask);
                let e = _mm256_i32gather_epi32(lut_ptr, _mm256_add_epi32(lut_base[v], slot), 4);
                let s = e;
                let freq = _mm256_and_si256(_mm256_srli_epi32(e, 8), field);
                let xn = _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srl_epi32(xv, shift)), _mm256_srli_epi32(e, 19));
                // Lanes below RANS_L (top 16 bits zero) take a word.
                let need = _mm256_cmpeq_epi32(_mm256_srli_epi32(xn, 16), _mm256_setzero_si256());
                let m = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize;
                let at = pos.min(nwords);
                let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(words.as_ptr().add(at) as *const __m128i));
                let w = _mm256_permutevar8x32_epi32(w, _mm256_loadu_si256(PERM[m].as_ptr() as *const __m256i));
                let refilled = _mm256_or_si256(_mm256_slli_epi32(xn, 16), w);
                state[v] = _mm256_blendv_epi8(xn, refilled, need);
                pos += (m as u32).count_ones() as usize;
                // Symbols: the low byte of each 32-bit lane, 8 bytes.
                let b = _mm256_shuffle_epi8(s, pick_low_bytes);
                let lo = _mm_cvtsi128_si32(_mm256_castsi256_si128(b)) as u32 as u64;
                let hi = _mm_cvtsi128_si32(_mm256_extracti128_si256(b, 1)) as u32 as u64;
                std::ptr::write_unaligned(row.as_mut_ptr().add(8 * v) as *mut u64, lo | (hi << 32));
            }
        }
        for v in 0..4 {
            _mm256_storeu_si256(x.as_mut_ptr().add(8 * v) as *mut __m256i, state[v]);
        }
        pos
    }
}

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
use std::mem::MaybeUninit;

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

/// Encoder constants of one plane's tables in one flat array, for the
/// vectorised encoder (one 64-bit gather per 4 lanes): symbol `s` of table
/// `k` is entry `base(k) + s`. An entry packs `freq - 1` (bits 0-9), the
/// bias of `EncSymbol::encode` (bits 10-20) and the reciprocal's shift
/// (bits 21-24) in its low half and the reciprocal in its high half. The
/// same constants as `EncTable` (tests compare the encoders' bytes). 256
/// entries of padding on each side keep every `base(k) + s` (any byte `s`)
/// inside the array.
#[derive(Default)]
pub struct FlatEncTables {
    prob_bits: u32,
    entries: Vec<u64>,
    base: Vec<i32>,
}

const FLAT_PAD: usize = 256;

impl FlatEncTables {
    pub fn new() -> FlatEncTables {
        FlatEncTables::default()
    }

    /// Rebuild from `tables` (reusing the allocations).
    pub fn build(&mut self, tables: &[FreqTable], prob_bits: u32) {
        self.build_with(tables.len(), prob_bits, |k| (tables[k].lo, &tables[k].freq[..]));
    }

    /// `build` from tables given as `table(k) = (lo, freq)`, `k < count`;
    /// the frequencies must sum to `2^prob_bits` (prob_bits 8 to 10).
    pub fn build_with<'t>(&mut self, count: usize, prob_bits: u32, table: impl Fn(usize) -> (u8, &'t [u16])) {
        assert!((8..=10).contains(&prob_bits));
        let consts = super::table::flat_constants(prob_bits);
        self.prob_bits = prob_bits;
        self.entries.clear();
        self.base.clear();
        self.entries.resize(FLAT_PAD, 0);
        for k in 0..count {
            let (lo, freq) = table(k);
            self.base.push(self.entries.len() as i32 - lo as i32);
            let mut start = 0u32;
            // One `extend` of a sized iterator: no capacity check per entry.
            self.entries.extend(freq.iter().map(|&f| {
                // Absent symbols (f = 0) get an entry that is never used.
                let (p, r) = consts[f as usize];
                let entry = (p + (start << 10)) as u64 | (r as u64) << 32;
                start += f as u32;
                entry
            }));
            assert!(start == 1 << prob_bits, "frequencies must sum to 2^prob_bits");
        }
        self.entries.resize(self.entries.len() + FLAT_PAD, 0);
    }

    /// Entry index base of table `k`.
    pub fn base(&self, k: usize) -> i32 {
        self.base[k]
    }

    /// One coder step of a lane on the flat constants (the scalar form of
    /// the vector step): flush a word to `words[*pos - 1]` when due.
    #[inline(always)]
    fn step(&self, x: u32, idx: usize, words: &mut [u16], pos: &mut usize) -> u32 {
        let e = self.entries[idx];
        let (a, r) = (e as u32, (e >> 32) as u32);
        let mut x = x;
        if (x >> (32 - self.prob_bits)) > (a & 0x3ff) {
            *pos -= 1;
            words[*pos] = x as u16;
            x >>= 16;
        }
        let t = ((x as u64 * r as u64) >> 32) as u32;
        let q = (t + ((x - t) >> 1)) >> (a >> 21);
        let cmpl = (1u32 << self.prob_bits) - 1 - (a & 0x3ff);
        x.wrapping_add((a >> 10) & 0x7ff).wrapping_add(q.wrapping_mul(cmpl))
    }
}

/// `encode_segment` on flat tables: channel `c` uses table
/// `lane_table[c]`'s entries (`lane_base[c] = tables.base(table of c)`).
/// Takes the AVX2 path where `simd_enabled()`, else a scalar loop; both
/// write exactly the bytes of `encode_segment`. The words are written
/// backwards into `words` (the decoder's order), so there is no reversal
/// pass. Symbols must lie in their tables' ranges (as for
/// `encode_segment`); others give wrong bytes, never an out-of-bounds access.
pub fn encode_segment_flat(geo: &SegmentGeometry, symbols: &[u8], channels_stride: usize, tables: &FlatEncTables, lane_base: &[i32], out: &mut Vec<u8>, words: &mut Vec<u16>) {
    encode_segment_flat_with(geo, symbols, channels_stride, tables, lane_base, out, words, simd_enabled())
}

/// `encode_segment_flat`, choosing the path (`allow_simd`; tests compare them).
#[allow(clippy::too_many_arguments)]
pub fn encode_segment_flat_with(geo: &SegmentGeometry, symbols: &[u8], channels_stride: usize, tables: &FlatEncTables, lane_base: &[i32], out: &mut Vec<u8>, words: &mut Vec<u16>, allow_simd: bool) {
    let (tb, te) = (geo.token_begin, geo.token_end);
    assert!(te > tb && geo.group_end > geo.group_begin);
    assert!(symbols.len() >= (te - 1) * channels_stride + geo.channels && channels_stride >= geo.channels);
    assert!(lane_base.len() >= geo.channels);
    // Every index base + byte stays inside the padded arrays.
    assert!(lane_base[..geo.channels].iter().all(|&b| b >= 0 && b as usize + 256 <= tables.entries.len()));
    let n = geo.symbols();
    // 8 words of slack below: a vector stores 8 words ending at the write
    // position. Only words written here are read back, so the buffer is
    // not cleared between segments.
    let end = n + 8;
    if words.len() < end {
        words.resize(end, 0);
    }
    let words = &mut words[..end];
    let mut pos = end;
    let mut x = [RANS_L; LANES];
    let mut g = geo.group_end;
    while g > geo.group_begin {
        g -= 1;
        let active = geo.lanes_in_group(g);
        let c0 = LANES * g;
        #[cfg(target_arch = "x86_64")]
        if allow_simd && active == LANES {
            // SAFETY: AVX2 is present (simd_enabled); rows t in [tb, te) have
            // 32 symbols from c0 (asserted above); indices stay in the arrays.
            unsafe { simd::encode_group(&mut x, symbols, channels_stride, c0, tb, te, tables, &lane_base[c0..c0 + LANES], words, &mut pos) };
            continue;
        }
        for t in (tb..te).rev() {
            let row = &symbols[t * channels_stride + c0..t * channels_stride + c0 + active];
            for l in (0..active).rev() {
                let idx = (lane_base[c0 + l] + row[l] as i32) as usize;
                x[l] = tables.step(x[l], idx, words, &mut pos);
            }
        }
    }
    let lanes = geo.lanes();
    out.reserve(4 * lanes + 2 * (end - pos));
    for &state in &x[..lanes] {
        out.extend_from_slice(&state.to_le_bytes());
    }
    extend_u16_le(out, &words[pos..]);
}

/// Append `words` as little-endian bytes.
fn extend_u16_le(out: &mut Vec<u8>, words: &[u16]) {
    #[cfg(target_endian = "little")]
    {
        // SAFETY: u16 has no padding and any byte pattern is a valid u8;
        // on a little-endian target the memory is the little-endian bytes.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(words.as_ptr() as *const u8, 2 * words.len()) });
    }
    #[cfg(not(target_endian = "little"))]
    for &w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Largest `prob_bits` the packed lookup entries can hold.
pub const MAX_DECODE_PROB_BITS: u32 = 10;

/// Slot-to-symbol lookup tables of one plane, built once per plane (not per
/// segment or channel group): `luts.lut(t)` is table `t`'s `2^prob_bits`
/// entries.
///
/// An entry packs everything one decode step needs, so a step is one load:
/// `symbol | freq << 8 | (slot - cum) << 19` (11-bit fields, which is why
/// streams with more than `MAX_DECODE_PROB_BITS` are refused).
pub struct PlaneLuts {
    prob_bits: u32,
    tables: usize,
    /// Built by `build_valued` (entries carry output values).
    valued: bool,
    data: Vec<u32>,
}

impl PlaneLuts {
    pub fn new(prob_bits: u32) -> PlaneLuts {
        PlaneLuts { prob_bits, tables: 0, valued: false, data: Vec::new() }
    }

    pub fn prob_bits(&self) -> u32 {
        self.prob_bits
    }

    /// Build the lookup tables of `tables` (reusing this allocation). Fails
    /// if a table's frequencies do not sum to `2^prob_bits`.
    pub fn build(&mut self, tables: &[FreqTable]) -> Result<(), Error> {
        self.build_with(tables.len(), |t| (tables[t].lo, &tables[t].freq[..]))
    }

    /// `build` from tables given as `table(t) = (lo, freq)`, `t < count`.
    pub fn build_with<'t>(&mut self, count: usize, table: impl Fn(usize) -> (u8, &'t [u16])) -> Result<(), Error> {
        if self.prob_bits > MAX_DECODE_PROB_BITS {
            return Err(Error::Corrupt("prob_bits above what this decoder supports"));
        }
        self.valued = false;
        let n = 1usize << self.prob_bits;
        // 8 entries of padding: runs are written 8 entries at a time, the
        // excess overwritten by the next run (or table, built after).
        self.data.resize(count * n + 8, 0);
        self.tables = count;
        const IOTA: [u32; 8] = [0, 1 << 19, 2 << 19, 3 << 19, 4 << 19, 5 << 19, 6 << 19, 7 << 19];
        for t in 0..count {
            let (lo, freq) = table(t);
            // Check the table before writing: frequencies sum to exactly n.
            check_table(lo, freq, n)?;
            let mut at = self.data[t * n..].as_mut_ptr();
            for (sym, &f) in (lo as u32..).zip(freq) {
                let e0 = sym | (f as u32) << 8;
                let mut j = 0u32;
                while j < f as u32 {
                    let base = e0 | j << 19;
                    // SAFETY: the run starts at most n - 1 entries into table
                    // t and data has 8 entries of padding after the last table.
                    unsafe {
                        let chunk = &mut *(at.add(j as usize) as *mut [u32; 8]);
                        for k in 0..8 {
                            chunk[k] = base + IOTA[k];
                        }
                    }
                    j += 8;
                }
                // SAFETY: stays within table t (the sum was checked).
                at = unsafe { at.add(f as usize) };
            }
        }
        Ok(())
    }

    /// Lookup tables whose entries carry each symbol's 16-bit output value
    /// instead of the symbol (`prob_bits` 8 only): `value[symbol] |
    /// (freq - 1) << 16 | (slot - cum) << 24`. For planes whose symbols map
    /// to one output value each (a per-tensor step), so that the decoder
    /// writes the output directly ([`decode_segment_values`]). The same
    /// checks as `build_with`.
    pub fn build_valued<'t>(&mut self, count: usize, table: impl Fn(usize) -> (u8, &'t [u16]), value: &[u16; 256]) -> Result<(), Error> {
        if self.prob_bits != 8 {
            return Err(Error::Corrupt("valued lookup tables need prob_bits 8"));
        }
        self.valued = true;
        const N: usize = 256;
        // 32 entries of padding: every run writes at least 32 entries (16
        // without AVX2; the excess is overwritten by the runs and tables
        // written after it).
        self.data.resize(count * N + 32, 0);
        self.tables = count;
        const IOTA: [u32; 8] = [0, 1 << 24, 2 << 24, 3 << 24, 4 << 24, 5 << 24, 6 << 24, 7 << 24];
        for t in 0..count {
            let (lo, freq) = table(t);
            check_table(lo, freq, N)?;
            let mut at = self.data[t * N..].as_mut_ptr();
            for (i, &f) in freq.iter().enumerate() {
                // f <= 256 (the sum), so f - 1 and every j < f fit 8 bits.
                // (A zero-frequency symbol writes garbage that the next run
                // overwrites: `at` does not move.)
                let e0 = value[lo as usize + i] as u32 | (f as u32).wrapping_sub(1) << 16;
                // SAFETY (both forms): a run starts at most N - 1 entries into
                // table t (the sum was checked) and data has 32 entries of
                // padding after the last table; AVX2 is enabled for the whole
                // build where its form is compiled. The first 32 entries (16
                // without AVX2) are written without a branch: run lengths are
                // too irregular to predict, and most runs are shorter.
                // (With AVX2 also: entry j of the run is e0 + j << 24, as
                // e0's top byte is clear whenever the run has entries past
                // its 16th, so each 8 entries are the previous 8 plus 8 << 24:
                // one vector add and store, where the compiler built every
                // vector from the scalar form lane by lane.)
                #[cfg(all(target_arch = "x86_64", target_feature = "avx2"))]
                unsafe {
                    use std::arch::x86_64::*;
                    let step = _mm256_set1_epi32(8 << 24);
                    let mut e = _mm256_add_epi32(_mm256_set1_epi32(e0 as i32), _mm256_loadu_si256(IOTA.as_ptr() as *const __m256i));
                    _mm256_storeu_si256(at as *mut __m256i, e);
                    e = _mm256_add_epi32(e, step);
                    _mm256_storeu_si256(at.add(8) as *mut __m256i, e);
                    e = _mm256_add_epi32(e, step);
                    _mm256_storeu_si256(at.add(16) as *mut __m256i, e);
                    e = _mm256_add_epi32(e, step);
                    _mm256_storeu_si256(at.add(24) as *mut __m256i, e);
                    let mut j = 32u32;
                    while j < f as u32 {
                        e = _mm256_add_epi32(e, step);
                        _mm256_storeu_si256(at.add(j as usize) as *mut __m256i, e);
                        j += 8;
                    }
                    at = at.add(f as usize);
                }
                #[cfg(not(all(target_arch = "x86_64", target_feature = "avx2")))]
                unsafe {
                    let chunk = &mut *(at as *mut [u32; 16]);
                    for k in 0..8 {
                        chunk[k] = e0.wrapping_add(IOTA[k]);
                        chunk[k + 8] = e0.wrapping_add(8 << 24).wrapping_add(IOTA[k]);
                    }
                    let mut j = 16u32;
                    while j < f as u32 {
                        let chunk = &mut *(at.add(j as usize) as *mut [u32; 8]);
                        for k in 0..8 {
                            chunk[k] = (e0 | j << 24).wrapping_add(IOTA[k]);
                        }
                        j += 8;
                    }
                    at = at.add(f as usize);
                }
            }
        }
        Ok(())
    }

    /// Table `t`'s entries.
    pub fn lut(&self, t: usize) -> &[u32] {
        let n = 1usize << self.prob_bits;
        &self.data[t * n..(t + 1) * n]
    }
}

/// A table the lookup builders can write: frequencies summing to exactly
/// `n` over symbols that fit a byte (the runs they write rely on both).
fn check_table(lo: u8, freq: &[u16], n: usize) -> Result<(), Error> {
    if freq.iter().map(|&f| f as usize).sum::<usize>() != n || lo as usize + freq.len() > 256 {
        return Err(Error::Corrupt("table frequencies do not sum to 2^prob_bits"));
    }
    Ok(())
}

/// Decoder scratch, reused across segments: the segment's words and a tile
/// of decoded symbols.
#[derive(Default)]
pub struct DecodeScratch {
    words: Vec<u16>,
    tile: Vec<u8>,
    /// The second segment's words when two are decoded side by side.
    words_b: Vec<u16>,
}

impl DecodeScratch {
    pub fn new() -> DecodeScratch {
        DecodeScratch::default()
    }
}

/// Whether the AVX2 path may be used: the CPU has it, and it was not turned
/// off with CACHEGEN_NO_SIMD=1 (to compare the two paths). Read once.
pub fn simd_enabled() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(simd::enabled)
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Decode one segment. After each channel group, `sink(group, tile, lanes)`
/// receives the group's symbols as `tile[(t - token_begin) * LANES + lane]`.
/// Channel `c` uses table `lut_index(c)` of `luts`. Fails unless the bytes
/// decode to exactly the segment's symbols with every lane back in its
/// initial state.
pub fn decode_segment(
    geo: &SegmentGeometry,
    bytes: &[u8],
    luts: &PlaneLuts,
    lut_index: impl Fn(usize) -> usize,
    scratch: &mut DecodeScratch,
    sink: impl FnMut(usize, &[u8], usize),
) -> Result<(), Error> {
    decode_segment_with(geo, bytes, luts, lut_index, scratch, sink, simd_enabled())
}

/// `decode_segment` with the SIMD path allowed or not (both must give the
/// same result; tests compare them).
pub fn decode_segment_with(
    geo: &SegmentGeometry,
    bytes: &[u8],
    luts: &PlaneLuts,
    lut_index: impl Fn(usize) -> usize,
    scratch: &mut DecodeScratch,
    mut sink: impl FnMut(usize, &[u8], usize),
    allow_simd: bool,
) -> Result<(), Error> {
    let prob_bits = luts.prob_bits;
    if !(8..=MAX_DECODE_PROB_BITS).contains(&prob_bits) {
        return Err(Error::Corrupt("prob_bits outside what this decoder supports"));
    }
    if luts.valued {
        return Err(Error::Invalid("lookup tables built for decode_segment_values".into()));
    }
    let (mut x, nwords) = start_segment(geo, bytes, &mut scratch.words)?;
    let tokens = geo.token_end - geo.token_begin;
    scratch.tile.resize(tokens * LANES, 0);
    let mut pos = 0usize;
    let mut base = [0u32; LANES];
    for g in geo.group_begin..geo.group_end {
        let active = geo.lanes_in_group(g);
        for (l, b) in base.iter_mut().enumerate().take(active) {
            let t = lut_index(LANES * g + l);
            if t >= luts.tables {
                return Err(Error::Corrupt("channel has no table"));
            }
            *b = (t << prob_bits) as u32;
        }
        let DecodeScratch { words, tile, .. } = &mut *scratch;
        let lut = &luts.data[..];
        assert!(lut.len() >= luts.tables << prob_bits && words.len() == nwords + LANES && tile.len() == tokens * LANES);
        #[cfg(target_arch = "x86_64")]
        if active == LANES && allow_simd && std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: AVX2 is present; every base is below lut.len() minus a
            // table, and words/tile have the sizes asserted above.
            pos = unsafe { simd::decode_rounds(&mut x, &base, lut, words, nwords, pos, tile, prob_bits) }.ok_or(Error::Corrupt("segment word count does not match its symbols"))?;
            sink(g, &scratch.tile, active);
            continue;
        }
        // SAFETY (all arms): PB is the tables' prob_bits, so each base + slot
        // indexes within lut (checked above); words/tile have the sizes
        // asserted above.
        pos = unsafe {
            match (prob_bits, active) {
                (8, LANES) => scalar_rounds::<8>(&mut x, &base, LANES, lut, words, nwords, pos, tile),
                (8, _) => scalar_rounds::<8>(&mut x, &base, active, lut, words, nwords, pos, tile),
                (9, _) => scalar_rounds::<9>(&mut x, &base, active, lut, words, nwords, pos, tile),
                _ => scalar_rounds::<10>(&mut x, &base, active, lut, words, nwords, pos, tile),
            }
        }
        .ok_or(Error::Corrupt("segment word count does not match its symbols"))?;
        sink(g, &scratch.tile, active);
    }
    finish_segment(geo, &x, pos, nwords)
}

/// The checks at the end of a segment: every word used, every lane back in
/// its initial state.
fn finish_segment(geo: &SegmentGeometry, x: &[u32; LANES], pos: usize, nwords: usize) -> Result<(), Error> {
    if pos != nwords {
        return Err(Error::Corrupt("segment word count does not match its symbols"));
    }
    if x[..geo.lanes()].iter().any(|&s| s != RANS_L) {
        return Err(Error::Corrupt("rANS lanes did not end in their initial state"));
    }
    Ok(())
}

/// Read a segment's lane states, and its words into `scratch.words` (with
/// `LANES` words of zero padding). Returns the states and the word count.
fn start_segment(geo: &SegmentGeometry, bytes: &[u8], words: &mut Vec<u16>) -> Result<([u32; LANES], usize), Error> {
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
    words.clear();
    words.extend(bytes[state_bytes..].chunks_exact(2).map(|w| u16::from_le_bytes([w[0], w[1]])));
    // Zero padding: a round starts only while pos <= nwords and takes at most
    // LANES words, so reads stay in bounds; a corrupt stream that runs past
    // nwords is refused at the next round.
    words.extend_from_slice(&[0u16; LANES]);
    Ok((x, nwords))
}

/// Decode one segment with lookup tables from [`PlaneLuts::build_valued`]
/// straight into a plane of little-endian 16-bit values: the value of the
/// symbol of channel `c` at token `t` goes to element `t * row_stride + c`
/// of `out` (a plane `[tokens, row_stride]`, `row_stride >= channels`). Channel `c` uses
/// table `lut_index(c)`. The same checks, in the same order, as
/// `decode_segment`; on error `out` may be partly written.
#[allow(clippy::too_many_arguments)]
pub fn decode_segment_values(
    geo: &SegmentGeometry,
    bytes: &[u8],
    luts: &PlaneLuts,
    lut_index: impl Fn(usize) -> usize,
    scratch: &mut DecodeScratch,
    out: &mut [u8],
    row_stride: usize,
    allow_simd: bool,
) -> Result<(), Error> {
    decode_segment_values_uninit(geo, bytes, luts, lut_index, scratch, as_uninit(out), row_stride, allow_simd)
}

/// `out` as possibly uninitialised bytes, for the decoders that only write it.
pub fn as_uninit(out: &mut [u8]) -> &mut [MaybeUninit<u8>] {
    // SAFETY: MaybeUninit<u8> has the layout of u8, and the callers of this
    // module's `_uninit` decoders only write initialised bytes through it,
    // so `out` stays initialised.
    unsafe { &mut *(out as *mut [u8] as *mut [MaybeUninit<u8>]) }
}

/// `decode_segment_values` into possibly uninitialised output: when it
/// returns Ok, it has written both bytes of the element of every channel
/// of the segment's groups at every token of the segment (so segments
/// that tile a plane leave all of it initialised).
#[allow(clippy::too_many_arguments)]
pub fn decode_segment_values_uninit(
    geo: &SegmentGeometry,
    bytes: &[u8],
    luts: &PlaneLuts,
    lut_index: impl Fn(usize) -> usize,
    scratch: &mut DecodeScratch,
    out: &mut [MaybeUninit<u8>],
    row_stride: usize,
    allow_simd: bool,
) -> Result<(), Error> {
    if !luts.valued || luts.prob_bits != 8 {
        return Err(Error::Invalid("decode_segment_values needs valued lookup tables".into()));
    }
    let (mut x, nwords) = start_segment(geo, bytes, &mut scratch.words)?;
    let tokens = geo.token_end - geo.token_begin;
    assert!(row_stride >= geo.channels && out.len() >= 2 * geo.token_end * row_stride);
    let words = &scratch.words[..];
    let lut = &luts.data[..];
    assert!(lut.len() >= luts.tables << 8 && words.len() == nwords + LANES);
    let mut pos = 0usize;
    let mut base = [0u32; LANES];
    for g in geo.group_begin..geo.group_end {
        let active = geo.lanes_in_group(g);
        for (l, b) in base.iter_mut().enumerate().take(active) {
            let t = lut_index(LANES * g + l);
            if t >= luts.tables {
                return Err(Error::Corrupt("channel has no table"));
            }
            *b = (t << 8) as u32;
        }
        // Row r of this group: out[(token_begin + r) * row_stride + 32 g ..][..active].
        let first = geo.token_begin * row_stride + LANES * g;
        #[cfg(target_arch = "x86_64")]
        if active == LANES && allow_simd && simd_enabled_cpu() {
            // SAFETY: AVX2 is present; every base is a table start within
            // lut; words has nwords + LANES entries; rows first + r *
            // row_stride .. + 32 lie within out (asserted above: the group's
            // channels are below channels <= row_stride, tokens below token_end).
            pos = unsafe { simd::decode_rounds_values(&mut x, &base, lut, words, nwords, pos, out.as_mut_ptr().add(2 * first) as *mut u16, row_stride, tokens) }
                .ok_or(Error::Corrupt("segment word count does not match its symbols"))?;
            continue;
        }
        for r in 0..tokens {
            if pos > nwords {
                return Err(Error::Corrupt("segment word count does not match its symbols"));
            }
            let at = 2 * (first + r * row_stride);
            let row = &mut out[at..at + 2 * active];
            for l in 0..active {
                let xl = x[l];
                let e = lut[(base[l] + (xl & 0xff)) as usize];
                let xn = ((e >> 16 & 0xff) + 1) * (xl >> 8) + (e >> 24);
                let v = (e as u16).to_le_bytes();
                row[2 * l].write(v[0]);
                row[2 * l + 1].write(v[1]);
                let w = words[pos] as u32;
                let need = xn < RANS_L;
                let m = 0u32.wrapping_sub(need as u32);
                x[l] = xn ^ ((xn ^ ((xn << 16) | w)) & m);
                pos += need as usize;
            }
        }
    }
    finish_segment(geo, &x, pos, nwords)
}

/// Two segments of one plane with the same channel groups and token count
/// (token blocks side by side), decoded as by two `decode_segment_values`
/// calls but in lockstep on the AVX2 path, so that the two segments'
/// dependency chains overlap. Falls back to the two calls otherwise. The
/// same checks; which of the two segments' errors is reported may differ.
/// Like `decode_segment_values_uninit`, on Ok it has written every element
/// of both segments.
#[allow(clippy::too_many_arguments)]
pub fn decode_segment_pair_values(
    geo: [&SegmentGeometry; 2],
    bytes: [&[u8]; 2],
    luts: &PlaneLuts,
    lut_index: impl Fn(usize) -> usize,
    scratch: &mut DecodeScratch,
    out: &mut [MaybeUninit<u8>],
    row_stride: usize,
    allow_simd: bool,
) -> Result<(), Error> {
    let [ga, gb] = geo;
    let tokens = ga.token_end - ga.token_begin;
    // The lockstep kernel also wants each group's tables in channel order
    // (lane l's table is the group's first plus l, as with `|c| c`), so
    // that one vector of lane offsets serves all four of a segment's
    // vectors.
    let paired = allow_simd
        && ga.group_begin == gb.group_begin
        && ga.group_end == gb.group_end
        && ga.channels == gb.channels
        && tokens == gb.token_end - gb.token_begin
        && ga.lanes_in_group(ga.group_end - 1) == LANES
        && (ga.group_begin..ga.group_end).all(|g| (1..LANES).all(|l| lut_index(LANES * g + l) == lut_index(LANES * g).wrapping_add(l)));
    #[cfg(target_arch = "x86_64")]
    if paired && simd_enabled_cpu() {
        if !luts.valued || luts.prob_bits != 8 {
            return Err(Error::Invalid("decode_segment_values needs valued lookup tables".into()));
        }
        let (mut xa, na) = start_segment(ga, bytes[0], &mut scratch.words)?;
        let (mut xb, nb) = start_segment(gb, bytes[1], &mut scratch.words_b)?;
        assert!(row_stride >= ga.channels && out.len() >= 2 * ga.token_end.max(gb.token_end) * row_stride);
        let lut = &luts.data[..];
        assert!(lut.len() >= luts.tables << 8 && scratch.words.len() == na + LANES && scratch.words_b.len() == nb + LANES);
        let mut pos = [0usize; 2];
        let mut base = [0u32; LANES];
        for g in ga.group_begin..ga.group_end {
            for (l, b) in base.iter_mut().enumerate() {
                let t = lut_index(LANES * g + l);
                if t >= luts.tables {
                    return Err(Error::Corrupt("channel has no table"));
                }
                *b = (t << 8) as u32;
            }
            let first = [ga.token_begin * row_stride + LANES * g, gb.token_begin * row_stride + LANES * g];
            // SAFETY: AVX2 is present; every base is a table start within
            // lut, and base[l] = base[0] + (l << 8) (lut_index(32 g + l) =
            // lut_index(32 g) + l, checked in `paired`); each words has its
            // nwords + LANES entries; the rows of both segments lie within
            // out (asserted above).
            pos = unsafe {
                let o = out.as_mut_ptr();
                simd::decode_rounds_values2(
                    [&mut xa, &mut xb],
                    base[0] as usize,
                    lut,
                    [&scratch.words[..], &scratch.words_b[..]],
                    [na, nb],
                    pos,
                    [o.add(2 * first[0]) as *mut u16, o.add(2 * first[1]) as *mut u16],
                    row_stride,
                    tokens,
                )
            }
            .ok_or(Error::Corrupt("segment word count does not match its symbols"))?;
        }
        finish_segment(ga, &xa, pos[0], na)?;
        return finish_segment(gb, &xb, pos[1], nb);
    }
    let _ = paired;
    decode_segment_values_uninit(ga, bytes[0], luts, &lut_index, scratch, out, row_stride, allow_simd)?;
    decode_segment_values_uninit(gb, bytes[1], luts, &lut_index, scratch, out, row_stride, allow_simd)
}

#[cfg(target_arch = "x86_64")]
fn simd_enabled_cpu() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

/// The scalar decoder: for each round (token), lane by lane, decode a symbol
/// and refill the lane if it fell below `RANS_L`. Lane `l` takes the word at
/// `pos` plus the number of refilling lanes before it, exactly the order the
/// format defines; the lanes are independent dependency chains, so the CPU
/// overlaps them. Returns the new word position, or None once it runs past
/// `nwords` (a corrupt stream).
///
/// # Safety
/// `lut` holds tables of `2^PB` entries and every `base[l]` (l < active) is
/// the start of one; `words` has `nwords + LANES` entries.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn scalar_rounds<const PB: u32>(x: &mut [u32; LANES], base: &[u32; LANES], active: usize, lut: &[u32], words: &[u16], nwords: usize, mut pos: usize, tile: &mut [u8]) -> Option<usize> {
    let mask = (1u32 << PB) - 1;
    let active = active.min(LANES);
    for row in tile.chunks_exact_mut(LANES) {
        if pos > nwords {
            return None;
        }
        for l in 0..active {
            let xl = x[l];
            // In bounds: base[l] + slot < lut.len() (the caller's contract).
            debug_assert!(((base[l] + (xl & mask)) as usize) < lut.len());
            let e = *lut.get_unchecked((base[l] + (xl & mask)) as usize);
            let xn = ((e >> 8) & 0x7ff) * (xl >> PB) + (e >> 19);
            row[l] = e as u8;
            // In bounds: pos <= nwords + l and words has nwords + LANES entries.
            let w = *words.get_unchecked(pos) as u32;
            let need = xn < RANS_L;
            // Branch-free select: refills are too irregular to predict.
            let m = 0u32.wrapping_sub(need as u32);
            x[l] = xn ^ ((xn ^ ((xn << 16) | w)) & m);
            pos += need as usize;
        }
    }
    Some(pos)
}

/// AVX2 decoding of full 32-lane rounds: eight lanes per vector, table
/// lookups by gather, refills by a permutation or a byte shuffle chosen by
/// the refill mask.
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

    /// For each 8-bit refill mask, the byte shuffle (of 8 words broadcast
    /// to both 128-bit halves) that puts the k-th word in the low half of
    /// the k-th refilling lane's 32 bits and zeros everywhere else.
    const fn refill_shuffles() -> [[u8; 32]; 256] {
        let mut t = [[0x80u8; 32]; 256];
        let mut m = 0;
        while m < 256 {
            let mut l = 0;
            while l < 8 {
                if m & (1 << l) != 0 {
                    let k = ((m as u32) & ((1u32 << l) - 1)).count_ones() as u8;
                    t[m][4 * l] = 2 * k;
                    t[m][4 * l + 1] = 2 * k + 1;
                }
                l += 1;
            }
            m += 1;
        }
        t
    }
    static REFILL: [[u8; 32]; 256] = refill_shuffles();

    /// For each 8-bit flush mask: the byte shuffle that moves the low 16
    /// bits of the flushing lanes (as 8 words in lane order) to the top of
    /// a 16-byte vector, in ascending lane order; the rest is zeroed. The
    /// mask is in the encoder's vector order (`encode_group`): bit `i` is
    /// lane `VECTOR_LANE[i]`.
    const fn compress_shuffles() -> [[u8; 16]; 256] {
        let mut t = [[0x80u8; 16]; 256];
        let mut m = 0;
        while m < 256 {
            let k = (m as u32).count_ones() as usize;
            let mut j = 8 - k;
            let mut lane = 0;
            while lane < 8 {
                if m & (1 << VECTOR_POSITION[lane]) != 0 {
                    t[m][2 * j] = 2 * lane as u8;
                    t[m][2 * j + 1] = 2 * lane as u8 + 1;
                    j += 1;
                }
                lane += 1;
            }
            m += 1;
        }
        t
    }
    /// The lane at each position of an encoder state vector: the order in
    /// which two 64-bit gathers (lanes 0-3, 4-7) and one `shuffle_ps`
    /// deliver the lanes' constants. It is its own inverse.
    const VECTOR_LANE: [usize; 8] = [0, 1, 4, 5, 2, 3, 6, 7];
    const VECTOR_POSITION: [usize; 8] = VECTOR_LANE;
    static COMPRESS: [[u8; 16]; 256] = compress_shuffles();

    /// Encode one full 32-lane channel group of a segment (tokens `te - 1`
    /// down to `tb`, lanes 31 down to 0 as in `encode_segment`), eight lanes
    /// per vector: the per-symbol constants by two 64-bit gathers (half the
    /// elements of two 32-bit ones), the division by the reciprocal multiply
    /// on even and odd lanes, and the flushed words of a vector packed by a
    /// shuffle chosen by the flush mask and stored below `*pos` (the words
    /// are written backwards). The state vectors hold their lanes in
    /// `VECTOR_LANE` order, the order the gathered constants come in.
    ///
    /// # Safety
    /// AVX2; rows `t` in `[tb, te)` have 32 symbols at `t * stride + c0`;
    /// every `lane_base[l] + byte` indexes `tables`' entries; `*pos - 8 >=
    /// 0` and at least 32 words per token fit below `*pos` plus 8 of slack.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    pub unsafe fn encode_group(x: &mut [u32; LANES], symbols: &[u8], stride: usize, c0: usize, tb: usize, te: usize, tables: &super::FlatEncTables, lane_base: &[i32], words: &mut [u16], pos: &mut usize) {
        debug_assert!(lane_base.len() == LANES && symbols.len() >= (te - 1) * stride + c0 + LANES);
        debug_assert!(*pos >= 32 * (te - tb) + 8);
        let pb = tables.prob_bits;
        let shr = _mm_cvtsi32_si128(32 - pb as i32);
        let fm1_mask = _mm256_set1_epi32(0x3ff);
        let bias_mask = _mm256_set1_epi32(0x7ff);
        let m_minus_1 = _mm256_set1_epi32((1i32 << pb) - 1);
        // The low 16 bits of each state, as words in lane order.
        let lo16 = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
        let words_in_lane_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 3, 6, 7);
        // Natural lane order to VECTOR_LANE order (and back: 64-bit blocks 0 2 1 3).
        const SWAP_MIDDLE: i32 = 0b11_01_10_00;
        let entries = tables.entries.as_ptr() as *const i64;
        let mut state = [_mm256_setzero_si256(); 4];
        let mut base = [_mm256_setzero_si256(); 4];
        for v in 0..4 {
            state[v] = _mm256_permute4x64_epi64(_mm256_loadu_si256(x.as_ptr().add(8 * v) as *const __m256i), SWAP_MIDDLE);
            base[v] = _mm256_loadu_si256(lane_base.as_ptr().add(8 * v) as *const __m256i);
        }
        let out = words.as_mut_ptr();
        let mut p = *pos;
        let mut t = te;
        while t > tb {
            t -= 1;
            let row = symbols.as_ptr().add(t * stride + c0);
            // The rows are walked downwards: fetch a few ahead (a hint only,
            // so an address before the plane is harmless).
            _mm_prefetch(row.wrapping_sub(8 * stride) as *const i8, _MM_HINT_T0);
            for v in (0..4).rev() {
                let s = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(8 * v) as *const __m128i));
                let idx = _mm256_add_epi32(base[v], s);
                let e03 = _mm256_castsi256_ps(_mm256_i32gather_epi64(entries, _mm256_castsi256_si128(idx), 8));
                let e47 = _mm256_castsi256_ps(_mm256_i32gather_epi64(entries, _mm256_extracti128_si256(idx, 1), 8));
                let a = _mm256_castps_si256(_mm256_shuffle_ps(e03, e47, 0b10_00_10_00));
                let r = _mm256_castps_si256(_mm256_shuffle_ps(e03, e47, 0b11_01_11_01));
                let fm1 = _mm256_and_si256(a, fm1_mask);
                let xv = state[v];
                // x >> (32 - prob_bits) >= freq: flush the low 16 bits.
                let flush = _mm256_cmpgt_epi32(_mm256_srl_epi32(xv, shr), fm1);
                let m = _mm256_movemask_ps(_mm256_castsi256_ps(flush)) as usize;
                let w = _mm256_permutevar8x32_epi32(_mm256_shuffle_epi8(xv, lo16), words_in_lane_order);
                let w = _mm_shuffle_epi8(_mm256_castsi256_si128(w), _mm_loadu_si128(COMPRESS[m].as_ptr() as *const __m128i));
                _mm_storeu_si128(out.add(p - 8) as *mut __m128i, w);
                p -= m.count_ones() as usize;
                let xv = _mm256_blendv_epi8(xv, _mm256_srli_epi32(xv, 16), flush);
                // q = x / freq: the high half of x * rcp on even and odd lanes.
                let even = _mm256_srli_epi64(_mm256_mul_epu32(xv, r), 32);
                let odd = _mm256_mul_epu32(_mm256_srli_epi64(xv, 32), _mm256_srli_epi64(r, 32));
                let th = _mm256_blend_epi32(even, odd, 0b1010_1010);
                let q = _mm256_srlv_epi32(_mm256_add_epi32(th, _mm256_srli_epi32(_mm256_sub_epi32(xv, th), 1)), _mm256_srli_epi32(a, 21));
                let bias = _mm256_and_si256(_mm256_srli_epi32(a, 10), bias_mask);
                let cmpl = _mm256_sub_epi32(m_minus_1, fm1);
                state[v] = _mm256_add_epi32(_mm256_add_epi32(xv, bias), _mm256_mullo_epi32(q, cmpl));
            }
        }
        *pos = p;
        for (v, &sv) in state.iter().enumerate() {
            _mm256_storeu_si256(x.as_mut_ptr().add(8 * v) as *mut __m256i, _mm256_permute4x64_epi64(sv, SWAP_MIDDLE));
        }
    }

    /// Whether to take the AVX2 path: the CPU has it, and it was not
    /// turned off with CACHEGEN_NO_SIMD=1 (to compare the two paths).
    pub fn enabled() -> bool {
        std::arch::is_x86_feature_detected!("avx2") && std::env::var_os("CACHEGEN_NO_SIMD").is_none()
    }

    /// Decode every row of `tile` (LANES symbols per row); returns the new
    /// word position, or None once it runs past `nwords` (a corrupt stream).
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn decode_rounds(x: &mut [u32; LANES], base: &[u32; LANES], lut: &[u32], words: &[u16], nwords: usize, mut pos: usize, tile: &mut [u8], prob_bits: u32) -> Option<usize> {
        let mask = _mm256_set1_epi32(((1u32 << prob_bits) - 1) as i32);
        let field = _mm256_set1_epi32(0x7ff);
        let shift = _mm_cvtsi32_si128(prob_bits as i32);
        let pick_low_bytes = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, 0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        let mut state = [_mm256_setzero_si256(); 4];
        let mut lut_base = [_mm256_setzero_si256(); 4];
        for v in 0..4 {
            state[v] = _mm256_loadu_si256(x.as_ptr().add(8 * v) as *const __m256i);
            lut_base[v] = _mm256_loadu_si256(base.as_ptr().add(8 * v) as *const __m256i);
        }
        let lut_ptr = lut.as_ptr() as *const i32;
        for row in tile.chunks_exact_mut(LANES) {
            // A round takes at most LANES words; words has nwords + LANES.
            if pos > nwords {
                return None;
            }
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
                // (The byte-shuffle refill of the value decoders made
                // this decoder slower on the lossless level's planes.)
                let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(words.as_ptr().add(pos) as *const __m128i));
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
        for (v, &sv) in state.iter().enumerate() {
            _mm256_storeu_si256(x.as_mut_ptr().add(8 * v) as *mut __m256i, sv);
        }
        Some(pos)
    }

    /// `decode_rounds` with valued lookup entries (prob_bits 8, see
    /// `PlaneLuts::build_valued`): row `r`'s 32 values go to `out + r *
    /// row_stride`. Returns the new word position, or None once it runs
    /// past `nwords`.
    ///
    /// # Safety
    /// AVX2; every `base[l]` is a table start within `lut`; `words` has
    /// `nwords + LANES` entries; `out + r * row_stride .. + 32` is writable
    /// for every `r < rows`.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    pub unsafe fn decode_rounds_values(x: &mut [u32; LANES], base: &[u32; LANES], lut: &[u32], words: &[u16], nwords: usize, mut pos: usize, out: *mut u16, row_stride: usize, rows: usize) -> Option<usize> {
        let mask = _mm256_set1_epi32(0xff);
        let one = _mm256_set1_epi32(1);
        let low16 = _mm256_set1_epi32(0xffff);
        let sixteen = _mm256_set1_epi32(16);
        let mut state = [_mm256_setzero_si256(); 4];
        let mut lut_base = [_mm256_setzero_si256(); 4];
        for v in 0..4 {
            state[v] = _mm256_loadu_si256(x.as_ptr().add(8 * v) as *const __m256i);
            lut_base[v] = _mm256_loadu_si256(base.as_ptr().add(8 * v) as *const __m256i);
        }
        let lut_ptr = lut.as_ptr() as *const i32;
        for r in 0..rows {
            // A round takes at most LANES words; words has nwords + LANES.
            if pos > nwords {
                return None;
            }
            let mut vals = [_mm256_setzero_si256(); 4];
            for v in 0..4 {
                let xv = state[v];
                let slot = _mm256_and_si256(xv, mask);
                let e = _mm256_i32gather_epi32(lut_ptr, _mm256_add_epi32(lut_base[v], slot), 4);
                vals[v] = e;
                let freq = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(e, 16), mask), one);
                let xn = _mm256_add_epi32(_mm256_mullo_epi32(freq, _mm256_srli_epi32(xv, 8)), _mm256_srli_epi32(e, 24));
                let need = _mm256_cmpeq_epi32(_mm256_srli_epi32(xn, 16), _mm256_setzero_si256());
                let m = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize;
                // Refill as in decode_rounds_values2.
                let w = _mm256_broadcastsi128_si256(_mm_loadu_si128(words.as_ptr().add(pos) as *const __m128i));
                let w = _mm256_shuffle_epi8(w, _mm256_loadu_si256(REFILL[m].as_ptr() as *const __m256i));
                state[v] = _mm256_or_si256(_mm256_sllv_epi32(xn, _mm256_and_si256(need, sixteen)), w);
                pos += (m as u32).count_ones() as usize;
            }
            // Low 16 bits of each entry, lanes in order: packus interleaves
            // the 128-bit halves, permute4x64 puts them back.
            let dst = out.add(r * row_stride);
            for h in 0..2 {
                let a = _mm256_and_si256(vals[2 * h], low16);
                let b = _mm256_and_si256(vals[2 * h + 1], low16);
                let p = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0b11_01_10_00);
                _mm256_storeu_si256(dst.add(16 * h) as *mut __m256i, p);
            }
        }
        for (v, &sv) in state.iter().enumerate() {
            _mm256_storeu_si256(x.as_mut_ptr().add(8 * v) as *mut __m256i, sv);
        }
        Some(pos)
    }

    /// `decode_rounds_values` of two segments in lockstep (the same
    /// tables, rows of each segment at its own `out`), where lane `l`'s
    /// table starts at entry `base0 + (l << 8)` of `lut`; returns both
    /// word positions, or None once either runs past its word count.
    ///
    /// Lane offsets are one vector (`k << 8`), each vector of lanes its
    /// own gather base (`base0 + 2048 v`), and each pair of vectors' values
    /// is stored as soon as it is decoded, so that less is kept on the
    /// stack (with four base vectors and four value vectors live, the
    /// compiler kept half the states there).
    ///
    /// # Safety
    /// As `decode_rounds_values`, for each segment, with `base[l] = base0
    /// + (l << 8)`.
    #[target_feature(enable = "avx2")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    pub unsafe fn decode_rounds_values2(x: [&mut [u32; LANES]; 2], base0: usize, lut: &[u32], words: [&[u16]; 2], nwords: [usize; 2], mut pos: [usize; 2], out: [*mut u16; 2], row_stride: usize, rows: usize) -> Option<[usize; 2]> {
        let mask = _mm256_set1_epi32(0xff);
        let low16 = _mm256_set1_epi32(0xffff);
        let lane_offset = _mm256_setr_epi32(0, 1 << 8, 2 << 8, 3 << 8, 4 << 8, 5 << 8, 6 << 8, 7 << 8);
        let sixteen = _mm256_set1_epi32(16);
        let mut state = [[_mm256_setzero_si256(); 4]; 2];
        for v in 0..4 {
            for s in 0..2 {
                state[s][v] = _mm256_loadu_si256(x[s].as_ptr().add(8 * v) as *const __m256i);
            }
        }
        // Vector v's lanes 8v..8v + 8 have their tables at base0 + 2048 v
        // + (k << 8): within lut, as lane 31's table is.
        let lut_ptr = lut.as_ptr().add(base0) as *const i32;
        for r in 0..rows {
            if pos[0] > nwords[0] || pos[1] > nwords[1] {
                return None;
            }
            for s in 0..2 {
                let dst = out[s].add(r * row_stride);
                for h in 0..2 {
                    let mut vals = [_mm256_setzero_si256(); 2];
                    for u in 0..2 {
                        let v = 2 * h + u;
                        let xv = state[s][v];
                        let slot = _mm256_add_epi32(_mm256_and_si256(xv, mask), lane_offset);
                        let e = _mm256_i32gather_epi32(lut_ptr.add(2048 * v), slot, 4);
                        vals[u] = e;
                        // freq * (x >> 8) + (slot - cum), freq - 1 in bits 16-23.
                        let xs = _mm256_srli_epi32(xv, 8);
                        let fm1 = _mm256_srli_epi32(_mm256_slli_epi32(e, 8), 24);
                        let xn = _mm256_add_epi32(_mm256_add_epi32(_mm256_mullo_epi32(fm1, xs), xs), _mm256_srli_epi32(e, 24));
                        let need = _mm256_cmpeq_epi32(_mm256_srli_epi32(xn, 16), _mm256_setzero_si256());
                        let m = _mm256_movemask_ps(_mm256_castsi256_ps(need)) as usize;
                        // Refill: the next words into the refilling lanes
                        // (zero elsewhere) by one in-lane shuffle of the 8
                        // words in both halves, over the state shifted up
                        // by 16 in those lanes only.
                        let w = _mm256_broadcastsi128_si256(_mm_loadu_si128(words[s].as_ptr().add(pos[s]) as *const __m128i));
                        let w = _mm256_shuffle_epi8(w, _mm256_loadu_si256(REFILL[m].as_ptr() as *const __m256i));
                        state[s][v] = _mm256_or_si256(_mm256_sllv_epi32(xn, _mm256_and_si256(need, sixteen)), w);
                        pos[s] += (m as u32).count_ones() as usize;
                    }
                    let a = _mm256_and_si256(vals[0], low16);
                    let b = _mm256_and_si256(vals[1], low16);
                    let p = _mm256_permute4x64_epi64(_mm256_packus_epi32(a, b), 0b11_01_10_00);
                    _mm256_storeu_si256(dst.add(16 * h) as *mut __m256i, p);
                }
            }
        }
        for v in 0..4 {
            for s in 0..2 {
                _mm256_storeu_si256(x[s].as_mut_ptr().add(8 * v) as *mut __m256i, state[s][v]);
            }
        }
        Some(pos)
    }
}

//! Interleaved rANS over one segment: up to 32 lanes, one per channel, each
//! with its own table, sharing one stream of 16-bit words.
//!
//! Decode order (the order everything else is defined by): for each channel
//! group of the segment, for each token of the token block, for each active
//! lane in ascending order, decode one symbol and, if the state fell below
//! `RANS_L`, refill it with the next word. A GPU warp runs exactly this with
//! one lane per thread (refills become a ballot + prefix count); the CPU runs
//! the same loop. The encoder walks the same order backwards.

use super::table::{EncSymbol, FreqTable};
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

/// Encode one segment. `symbol(t, c)` gives the symbol at token `t` and
/// channel `c`; `enc_tables[c]` holds the encoder constants of channel `c`'s
/// table for every symbol. Appends the segment bytes (lane states, then
/// words) to `out`.
pub fn encode_segment(
    geo: &SegmentGeometry,
    symbols: &[u8],
    channels_stride: usize,
    enc_tables: &[&[EncSymbol; 256]],
    prob_bits: u32,
    out: &mut Vec<u8>,
    words: &mut Vec<u16>,
) {
    let lanes = geo.lanes();
    let mut x = [RANS_L; LANES];
    words.clear();
    // Walk the decode order backwards; a word flushed here is the word the
    // decoder reads at the same event, so reversing `words` gives decode order.
    for g in (geo.group_begin..geo.group_end).rev() {
        let active = geo.lanes_in_group(g);
        let c0 = LANES * g;
        for t in (geo.token_begin..geo.token_end).rev() {
            let row = &symbols[t * channels_stride + c0..t * channels_stride + c0 + active];
            for l in (0..active).rev() {
                let s = &enc_tables[c0 + l][row[l] as usize];
                let mut xl = x[l];
                if xl as u64 >= s.x_max {
                    words.push(xl as u16);
                    xl >>= 16;
                }
                x[l] = s.encode(xl);
            }
        }
    }
    let _ = prob_bits;
    for &state in &x[..lanes] {
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.reserve(words.len() * 2);
    for &w in words.iter().rev() {
        out.extend_from_slice(&w.to_le_bytes());
    }
}

/// Decoder scratch, reused across segments: per-lane lookup tables for the
/// group being decoded, the segment's words, and a tile of decoded symbols.
pub struct DecodeScratch {
    lut: Vec<u8>,
    freq_cum: Vec<u32>,
    words: Vec<u16>,
    tile: Vec<u8>,
    prob_bits: u32,
}

impl DecodeScratch {
    pub fn new(prob_bits: u32) -> DecodeScratch {
        DecodeScratch { lut: vec![0u8; LANES << prob_bits], freq_cum: vec![0u32; LANES * 256], words: Vec::new(), tile: Vec::new(), prob_bits }
    }

    fn load(&mut self, lane: usize, table: &FreqTable) {
        let n = 1usize << self.prob_bits;
        let fc: &mut [u32; 256] = (&mut self.freq_cum[lane * 256..(lane + 1) * 256]).try_into().unwrap();
        super::table::fill_decode_lut(table, self.prob_bits, &mut self.lut[lane * n..(lane + 1) * n], fc);
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
    mut sink: impl FnMut(usize, &[u8], usize),
) -> Result<(), Error> {
    let prob_bits = scratch.prob_bits;
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
    // Words, plus one zero so that reading past the end (only possible in a
    // corrupt stream, caught by the count check below) stays in bounds.
    let nwords = (bytes.len() - state_bytes) / 2;
    scratch.words.clear();
    scratch.words.extend(bytes[state_bytes..].chunks_exact(2).map(|w| u16::from_le_bytes([w[0], w[1]])));
    scratch.words.push(0);
    let tokens = geo.token_end - geo.token_begin;
    scratch.tile.resize(tokens * LANES, 0);
    let mask = (1u32 << prob_bits) - 1;
    let mut pos = 0usize;
    for g in geo.group_begin..geo.group_end {
        let active = geo.lanes_in_group(g);
        for l in 0..active {
            scratch.load(l, table_of(LANES * g + l));
        }
        let DecodeScratch { lut, freq_cum, words, tile, .. } = &mut *scratch;
        assert!(lut.len() == LANES << prob_bits && freq_cum.len() == LANES * 256 && words.len() == nwords + 1 && tile.len() == tokens * LANES);
        for row in tile.chunks_exact_mut(LANES) {
            for l in 0..active {
                // SAFETY: slot <= mask < 2^prob_bits and l < LANES, so the LUT
                // index is below LANES << prob_bits (asserted above); s < 256
                // so the freq_cum index is below LANES * 256; pos is clamped
                // to nwords and words has nwords + 1 entries.
                unsafe {
                    let xl = *x.get_unchecked(l);
                    let slot = xl & mask;
                    let s = *lut.get_unchecked((l << prob_bits) + slot as usize);
                    let e = *freq_cum.get_unchecked(l * 256 + s as usize);
                    let xl = (e & 0xffff) * (xl >> prob_bits) + slot - (e >> 16);
                    let need = xl < RANS_L;
                    let w = *words.get_unchecked(pos.min(nwords)) as u32;
                    *x.get_unchecked_mut(l) = if need { (xl << 16) | w } else { xl };
                    pos += need as usize;
                    *row.get_unchecked_mut(l) = s;
                }
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

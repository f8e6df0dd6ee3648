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
}

impl ScaleGroup {
    pub fn code(self) -> u8 {
        match self {
            ScaleGroup::PerToken => 1,
            ScaleGroup::PerTokenHead => 2,
            ScaleGroup::PerChannel => 3,
        }
    }
    pub fn from_code(c: u8) -> Option<ScaleGroup> {
        match c {
            1 => Some(ScaleGroup::PerToken),
            2 => Some(ScaleGroup::PerTokenHead),
            3 => Some(ScaleGroup::PerChannel),
            _ => None,
        }
    }
    /// Number of groups in a plane.
    pub fn count(self, tokens: usize, channels: usize, head_dim: usize) -> usize {
        match self {
            ScaleGroup::PerToken => tokens,
            ScaleGroup::PerTokenHead => tokens * (channels / head_dim),
            ScaleGroup::PerChannel => channels,
        }
    }
    /// Group of element `(t, c)`.
    #[inline(always)]
    pub fn index(self, t: usize, c: usize, channels: usize, head_dim: usize) -> usize {
        match self {
            ScaleGroup::PerToken => t,
            ScaleGroup::PerTokenHead => t * (channels / head_dim) + c / head_dim,
            ScaleGroup::PerChannel => c,
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

/// Compute each group's parameters. Fails on NaN or infinity.
pub fn group_params(plane: &[f32], tokens: usize, channels: usize, head_dim: usize, spec: &QuantSpec) -> Result<Vec<GroupParams>, Error> {
    let n = spec.group.count(tokens, channels, head_dim);
    let mut lo = vec![f32::INFINITY; n];
    let mut hi = vec![f32::NEG_INFINITY; n];
    for t in 0..tokens {
        let row = &plane[t * channels..(t + 1) * channels];
        for (c, &v) in row.iter().enumerate() {
            if !v.is_finite() {
                return Err(Error::NonFinite);
            }
            let g = spec.group.index(t, c, channels, head_dim);
            lo[g] = lo[g].min(v);
            hi[g] = hi[g].max(v);
        }
    }
    let max = spec.max as f32;
    let mut out = Vec::with_capacity(n);
    for g in 0..n {
        let p = if spec.asymmetric {
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

/// Quantize a plane to symbols `[tokens, channels]`.
pub fn quantize_plane(plane: &[f32], tokens: usize, channels: usize, head_dim: usize, spec: &QuantSpec, params: &[GroupParams]) -> Vec<u8> {
    let mut out = vec![0u8; tokens * channels];
    for t in 0..tokens {
        for c in 0..channels {
            let p = params[spec.group.index(t, c, channels, head_dim)];
            out[t * channels + c] = quantize_value(plane[t * channels + c], p, spec);
        }
    }
    out
}

/// Raw little-endian bytes of `dtype` to f32.
pub fn to_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F16 => bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::Bf16 => bytes.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
    }
}

/// Write `v` as `dtype` (round to nearest even) at element `i` of `out`.
#[inline(always)]
pub fn store(dtype: Dtype, out: &mut [u8], i: usize, v: f32) {
    match dtype {
        Dtype::F16 => out[2 * i..2 * i + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes()),
        Dtype::Bf16 => out[2 * i..2 * i + 2].copy_from_slice(&bf16::from_f32(v).to_le_bytes()),
        Dtype::F32 => out[4 * i..4 * i + 4].copy_from_slice(&v.to_le_bytes()),
    }
}

/// Write `vals` as consecutive elements of `dtype` (round to nearest even).
#[inline]
pub fn store_row(dtype: Dtype, vals: &[f32], out: &mut [u8]) {
    use half::slice::HalfFloatSliceExt;
    const N: usize = 32;
    for (vals, out) in vals.chunks(N).zip(out.chunks_mut(N * dtype.size())) {
        match dtype {
            Dtype::F16 => {
                let mut h = [f16::ZERO; N];
                h[..vals.len()].convert_from_f32_slice(vals);
                for (dst, v) in out.chunks_exact_mut(2).zip(&h) {
                    dst.copy_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::Bf16 => {
                let mut h = [bf16::ZERO; N];
                h[..vals.len()].convert_from_f32_slice(vals);
                for (dst, v) in out.chunks_exact_mut(2).zip(&h) {
                    dst.copy_from_slice(&v.to_le_bytes());
                }
            }
            Dtype::F32 => {
                for (dst, v) in out.chunks_exact_mut(4).zip(vals) {
                    dst.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_brackets_value() {
        for v in [0.0f32, 1e-30, 0.3, 1.0, 3.14159, 1234.567, 6.0e4] {
            let up = bf16_round_up(v);
            let down = bf16_round_down(v);
            assert!(up >= v && down <= v, "{v}: {down} {up}");
            assert_eq!(bf16::from_f32(up).to_f32(), up);
            assert_eq!(bf16::from_f32(down).to_f32(), down);
        }
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

//! FP8 E4M3 ("fn": no infinities, NaN = S.1111.111; OCP FP8, PyTorch
//! `float8_e4m3fn`, vLLM's `--kv-cache-dtype fp8`): 1 sign bit, 4 exponent
//! bits (bias 7), 3 mantissa bits; largest finite value 448, smallest
//! subnormal 2^-9.
//!
//! The codec treats an fp8 cache in its stored units: the engine's per-layer
//! scale (stored value = real value / scale) is neither needed nor applied,
//! since the quantizer's steps are relative to each tensor's RMS and decoded
//! values go back into the same units. Converting to f32 is exact; back is
//! round to nearest even, saturating to ±448 (PTX `cvt.rn.satfinite`
//! semantics: a decoded value a quantization step beyond the largest fp8
//! value stays finite), NaN to `sign | 0x7F`. The GPU decoder
//! (`cuda/decode.cu`, `f32_to_e4m3`) does the same integer steps.

/// The value of the E4M3 byte `b` (exact).
#[inline]
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0f32 } else { 1.0 };
    let e = (b >> 3) & 15;
    let m = (b & 7) as f32;
    if e == 15 && b & 7 == 7 {
        return f32::from_bits(if b & 0x80 != 0 { 0xFFC0_0000 } else { 0x7FC0_0000 });
    }
    if e == 0 {
        // subnormal: m * 2^-9
        sign * m * (1.0 / 512.0)
    } else {
        sign * (1.0 + m / 8.0) * f32::from_bits((e as u32 + 127 - 7) << 23)
    }
}

/// `v` as an E4M3 byte: round to nearest even, saturating to ±448; NaN gives
/// `sign | 0x7F`.
#[inline]
pub fn f32_to_e4m3(v: f32) -> u8 {
    let bits = v.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    if v.is_nan() {
        return sign | 0x7F;
    }
    let a = v.abs();
    if a >= 448.0 {
        return sign | 0x7E;
    }
    if a < 1.0 / 64.0 {
        // Subnormal grid, step 2^-9 (exact scaling); 8 steps is the
        // smallest normal, whose code is also 8.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let mut exp = ((bits >> 23) & 0xFF) as i32 - 127; // -6..=8
    let man = bits & 0x7F_FFFF;
    let mut r = man >> 20;
    let rem = man & 0xF_FFFF;
    if rem > 0x8_0000 || (rem == 0x8_0000 && r & 1 == 1) {
        r += 1;
        if r == 8 {
            r = 0;
            exp += 1;
        }
    }
    // a < 448 rounds to at most 448 (exp 8, r 6): never the NaN code.
    sign | (((exp + 7) as u8) << 3) | r as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_converts_and_finite_bytes_round_trip() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if b & 0x7F == 0x7F {
                assert!(v.is_nan(), "{b:#x}");
                assert_eq!(f32_to_e4m3(v), b, "{b:#x}");
            } else {
                assert!(v.is_finite());
                assert_eq!(f32_to_e4m3(v), b, "{b:#x} = {v}");
            }
        }
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x01), 1.0 / 512.0);
        assert_eq!(e4m3_to_f32(0x08), 1.0 / 64.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
    }

    /// Against the definition: the nearest finite E4M3 value, ties to the
    /// even code, saturating; checked on every f32 whose top 20 bits vary
    /// (with several low patterns) across the whole range.
    #[test]
    fn rounding_is_nearest_even_and_saturating() {
        // Codes 0..=0x7E are the non-negative finite values in rising order.
        let finite: Vec<f32> = (0..=0x7Eu8).map(e4m3_to_f32).collect();
        let reference = |a: f32| -> u8 {
            if a >= 448.0 {
                return 0x7E;
            }
            let hi = finite.partition_point(|&x| x < a); // first value >= a
            if finite[hi] == a || hi == 0 {
                return hi as u8;
            }
            let lo = hi - 1;
            // Both differences are exact (the neighbours are within a
            // factor of 2 of a, or a is far from the tie).
            let (dl, dh) = (a - finite[lo], finite[hi] - a);
            if dl < dh || (dl == dh && lo & 1 == 0) {
                lo as u8
            } else {
                hi as u8
            }
        };
        for hi in 0..(1u32 << 19) {
            for lo in [0u32, 1, 0x7FF, 0x800, 0x801, 0xFFF] {
                let bits = (hi << 12) | lo;
                let a = f32::from_bits(bits);
                if !a.is_finite() || a > 1000.0 {
                    continue;
                }
                let want = reference(a);
                assert_eq!(f32_to_e4m3(a), want, "{a:e} ({bits:#x})");
                assert_eq!(f32_to_e4m3(-a), want | 0x80, "-{a:e}");
            }
        }
        assert_eq!(f32_to_e4m3(f32::INFINITY), 0x7E);
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xFE);
        assert_eq!(f32_to_e4m3(1e30), 0x7E);
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
        assert_eq!(f32_to_e4m3(-f32::NAN), 0xFF);
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
    }
}

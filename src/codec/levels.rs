//! Quality levels: which quantizer each (K/V, layer) plane gets.
//!
//! The decoder never needs this file: every plane's quantizer is written
//! into the stream. Levels only choose what the encoder writes; the
//! numbers below were chosen by measurement on real SmolLM2 KV
//! (docs/BENCHMARKS.md, "Choosing the levels"): with an entropy coder, one
//! uniform step per (K/V, layer) tensor beats per-token or per-channel
//! absmax bins at equal size, because the model weighs absolute errors in
//! every channel alike and rare large values cost bits only where they occur.

use super::format::PlaneKind;
use super::quant::{QuantSpec, ScaleGroup, StepRule};
use super::{Dtype, Error, KvShape};

/// A quality level. Higher is larger and closer to the original.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Level {
    /// Smallest: for slow links.
    Compact,
    /// What `encode` uses when no level is given.
    Default,
    /// int8-class quality.
    High,
    /// Bit-exact for the input dtype: entropy coding of the raw bits.
    Lossless,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Compact, Level::Default, Level::High, Level::Lossless];

    pub fn number(self) -> u8 {
        match self {
            Level::Compact => 1,
            Level::Default => 2,
            Level::High => 3,
            Level::Lossless => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Level::Compact => "compact",
            Level::Default => "default",
            Level::High => "high",
            Level::Lossless => "lossless",
        }
    }

    /// Parse `1`..`4` or a level name.
    pub fn parse(s: &str) -> Result<Level, Error> {
        Level::ALL
            .into_iter()
            .find(|l| s == l.name() || s == l.number().to_string())
            .ok_or_else(|| Error::Invalid(format!("unknown level '{s}': use 1-4 or compact, default, high, lossless")))
    }

    pub fn from_number(n: u8) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.number() == n)
    }

    /// Probability precision of the entropy coder's tables.
    /// 8 bits cost under 0.3% of size on real KV against 12, and keep the
    /// per-lane lookup tables small (1 KiB) for CPU caches and GPU shared memory.
    pub fn prob_bits(self) -> u32 {
        match self {
            Level::Lossless => 10,
            _ => 8,
        }
    }

    /// Step factor `alpha`: the step is `alpha * m * rms` of each (K/V,
    /// layer) tensor, `m` from the model's profile (1 without one).
    pub fn alpha(self) -> Option<f32> {
        match self {
            Level::Compact => Some(0.59),
            Level::Default => Some(0.22),
            Level::High => Some(0.063),
            Level::Lossless => None,
        }
    }

    /// How the encoder picks each tensor's step.
    pub fn step_rules(self, shape: &KvShape, profile: Option<&[f32]>) -> Vec<StepRule> {
        (0..shape.tensors())
            .map(|i| match self.alpha() {
                Some(a) => StepRule::Rms(a * profile.map_or(1.0, |p| p[i])),
                None => StepRule::Range,
            })
            .collect()
    }

    /// The coding of every plane for a chunk of this shape and dtype.
    pub fn plan(self, shape: &KvShape, dtype: Dtype) -> Vec<PlaneKind> {
        match self {
            Level::Lossless => lossless_plan(shape, dtype),
            // One step per (K/V, layer) tensor, symmetric, 255 symbols.
            _ => vec![PlaneKind::Quantized(QuantSpec { group: ScaleGroup::PerTensor, max: 127, asymmetric: false }); shape.tensors()],
        }
    }
}

/// Lossless: each tensor's bytes as planes, most significant first. The top
/// byte (sign, exponent, leading mantissa bits) gets per-channel tables; the
/// lower bytes are close to uniform and share one table per plane.
fn lossless_plan(shape: &KvShape, dtype: Dtype) -> Vec<PlaneKind> {
    let bytes = dtype.size();
    (0..shape.tensors() * bytes).map(|i| PlaneKind::Raw { index: (i % bytes) as u8, shared: i % bytes != 0 }).collect()
}

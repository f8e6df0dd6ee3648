//! Quality levels: which quantizer each (K/V, layer) plane gets.
//!
//! The decoder never needs this file: every plane's quantizer is written
//! into the stream. Levels only choose what the encoder writes; the
//! numbers below were chosen by measurement on real SmolLM2 KV
//! (docs/BENCHMARKS.md, "Choosing the levels").

use super::format::PlaneKind;
use super::quant::{QuantSpec, ScaleGroup};
use super::{Dtype, Error, KvKind, KvShape};

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
    pub fn prob_bits(self) -> u32 {
        match self {
            Level::Lossless => 12,
            _ => 10,
        }
    }

    /// The coding of every plane for a chunk of this shape and dtype.
    pub fn plan(self, shape: &KvShape, dtype: Dtype) -> Vec<PlaneKind> {
        match self.recipe() {
            None => lossless_plan(shape, dtype),
            Some(r) => r.plan(shape),
        }
    }

    fn recipe(self) -> Option<Recipe> {
        match self {
            Level::Compact => Some(Recipe { key_max: [7, 5], value_max: [7, 5], early_key: 0.34, early_value: 0.1 }),
            Level::Default => Some(Recipe { key_max: [11, 9], value_max: [11, 9], early_key: 0.34, early_value: 0.1 }),
            Level::High => Some(Recipe { key_max: [31, 31], value_max: [31, 31], early_key: 0.34, early_value: 0.1 }),
            Level::Lossless => None,
        }
    }
}

/// A lossy level: keys get per-channel asymmetric scales (post-RoPE keys
/// carry outlier channels that a per-token scale would spread over every
/// channel); values get per-token scales. Early layers, which the model is
/// more sensitive to, get finer steps.
#[derive(Clone, Copy, Debug)]
struct Recipe {
    /// `max` (alphabet `2*max+1`) for [early layers, later layers].
    key_max: [u8; 2],
    value_max: [u8; 2],
    /// Fraction of layers counted as early (rounded up).
    early_key: f64,
    early_value: f64,
}

impl Recipe {
    fn plan(&self, shape: &KvShape) -> Vec<PlaneKind> {
        let early = |frac: f64| (shape.layers as f64 * frac).ceil() as usize;
        let (ek, ev) = (early(self.early_key), early(self.early_value));
        let mut planes = Vec::with_capacity(shape.tensors());
        for layer in 0..shape.layers {
            for stream in 0..shape.kind.streams() {
                let is_value = shape.kind == KvKind::KeyValue && stream == 1;
                let spec = if is_value {
                    QuantSpec { group: ScaleGroup::PerToken, max: self.value_max[(layer >= ev) as usize], asymmetric: false }
                } else {
                    QuantSpec { group: ScaleGroup::PerChannel, max: self.key_max[(layer >= ek) as usize], asymmetric: true }
                };
                planes.push(PlaneKind::Quantized(spec));
            }
        }
        planes
    }
}

/// Lossless: each tensor's bytes as planes, most significant first. The top
/// byte (sign, exponent, leading mantissa bits) gets per-channel tables; the
/// lower bytes are close to uniform and share one table per plane.
fn lossless_plan(shape: &KvShape, dtype: Dtype) -> Vec<PlaneKind> {
    let bytes = dtype.size();
    (0..shape.tensors() * bytes).map(|i| PlaneKind::Raw { index: (i % bytes) as u8, shared: i % bytes != 0 }).collect()
}

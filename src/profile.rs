//! A model's sensitivity profile: per-(layer, K/V) step multipliers,
//! calibrated once per model (scripts/model/calibrate_profile.py) so that
//! the layers the model is most sensitive to get finer steps.

use serde::Deserialize;

use crate::codec::{KvKind, KvShape};

/// Multipliers as stored in a profile JSON file (other fields are ignored).
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Profile {
    #[serde(default)]
    pub key: Vec<f32>,
    #[serde(default)]
    pub value: Vec<f32>,
    /// For latent (MLA) caches.
    #[serde(default)]
    pub latent: Vec<f32>,
}

impl Profile {
    pub fn from_json(text: &str) -> Result<Profile, String> {
        serde_json::from_str(text).map_err(|e| format!("not a profile: {e}"))
    }

    /// Multipliers in the codec's tensor order (layer-major; key, value).
    pub fn multipliers(&self, shape: &KvShape) -> Result<Vec<f32>, String> {
        let lists: Vec<&Vec<f32>> = match shape.kind {
            KvKind::KeyValue => vec![&self.key, &self.value],
            KvKind::Latent => vec![&self.latent],
        };
        if lists.iter().any(|l| l.len() != shape.layers) {
            return Err(format!("profile has {} key / {} value / {} latent multipliers; the cache has {} layers", self.key.len(), self.value.len(), self.latent.len(), shape.layers));
        }
        if lists.iter().any(|l| l.iter().any(|m| !(m.is_finite() && *m > 0.0))) {
            return Err("profile multipliers must be positive".into());
        }
        Ok((0..shape.layers).flat_map(|l| lists.iter().map(move |list| list[l])).collect())
    }
}

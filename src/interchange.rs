//! The interchange format: a safetensors file with tensors
//! `layers.{i}.key` and `layers.{i}.value` (or `layers.{i}.latent` for MLA),
//! each `[tokens, num_kv_heads, head_dim]` in f16, bf16 or f32.
//! Conversion only; reading and writing files is the caller's business.

use std::collections::HashMap;

use safetensors::tensor::{Dtype as StDtype, TensorView};
use safetensors::SafeTensors;

use crate::codec::{Dtype, KvKind, KvShape, KvTensors};

/// Why a safetensors file is not a KV cache in the interchange format.
#[derive(Debug, thiserror::Error)]
pub enum InterchangeError {
    #[error("not a safetensors file: {0}")]
    Safetensors(String),
    #[error("{0}")]
    Layout(String),
}

fn dtype_from(d: StDtype) -> Result<Dtype, InterchangeError> {
    match d {
        StDtype::F16 => Ok(Dtype::F16),
        StDtype::BF16 => Ok(Dtype::Bf16),
        StDtype::F32 => Ok(Dtype::F32),
        StDtype::F8_E4M3 => Ok(Dtype::F8E4M3),
        other => Err(InterchangeError::Layout(format!("unsupported dtype {other:?}: use f16, bf16, f32 or f8_e4m3"))),
    }
}

fn dtype_to(d: Dtype) -> StDtype {
    match d {
        Dtype::F16 => StDtype::F16,
        Dtype::Bf16 => StDtype::BF16,
        Dtype::F32 => StDtype::F32,
        Dtype::F8E4M3 => StDtype::F8_E4M3,
    }
}

/// Tensor names of layer `layer`, in stream order.
pub fn tensor_names(kind: KvKind, layer: usize) -> Vec<String> {
    match kind {
        KvKind::KeyValue => vec![format!("layers.{layer}.key"), format!("layers.{layer}.value")],
        KvKind::Latent => vec![format!("layers.{layer}.latent")],
    }
}

/// A KV cache read from the interchange format, with the file's metadata.
pub struct Loaded {
    pub kv: KvTensors,
    pub metadata: HashMap<String, String>,
}

/// Parse safetensors bytes into KV tensors, checking names, shapes and dtypes.
pub fn from_safetensors(bytes: &[u8]) -> Result<Loaded, InterchangeError> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| InterchangeError::Safetensors(e.to_string()))?;
    let names: Vec<String> = st.names().into_iter().cloned().collect();
    let kind = if names.iter().any(|n| n.ends_with(".latent")) { KvKind::Latent } else { KvKind::KeyValue };
    let streams = kind.streams();
    if names.is_empty() || names.len() % streams != 0 {
        return Err(InterchangeError::Layout("expected tensors layers.{i}.key and layers.{i}.value (or layers.{i}.latent)".into()));
    }
    let layers = names.len() / streams;
    let mut tensors = Vec::with_capacity(names.len());
    let mut shape: Option<(Vec<usize>, Dtype)> = None;
    for layer in 0..layers {
        for name in tensor_names(kind, layer) {
            let t = st.tensor(&name).map_err(|_| InterchangeError::Layout(format!("missing tensor '{name}' (found {})", names.join(", "))))?;
            let dt = dtype_from(t.dtype())?;
            if t.shape().len() != 3 {
                return Err(InterchangeError::Layout(format!("tensor '{name}' has shape {:?}; expected [tokens, kv_heads, head_dim]", t.shape())));
            }
            match &shape {
                None => shape = Some((t.shape().to_vec(), dt)),
                Some((s, d)) if s.as_slice() != t.shape() || *d != dt => {
                    return Err(InterchangeError::Layout(format!(
                        "tensor '{name}' is {:?} {}, but others are {s:?} {}",
                        t.shape(),
                        dt.name(),
                        d.name()
                    )))
                }
                _ => {}
            }
            tensors.push(t.data().to_vec());
        }
    }
    let (dims, dtype) = shape.expect("at least one tensor");
    let kv = KvTensors { shape: KvShape { kind, layers, tokens: dims[0], heads: dims[1], head_dim: dims[2] }, dtype, tensors };
    kv.validate().map_err(|e| InterchangeError::Layout(e.to_string()))?;
    let metadata = SafeTensors::read_metadata(bytes)
        .map(|(_, m)| m.metadata().clone().unwrap_or_default())
        .map_err(|e| InterchangeError::Safetensors(e.to_string()))?;
    Ok(Loaded { kv, metadata })
}

/// Serialise KV tensors to safetensors bytes.
pub fn to_safetensors(kv: &KvTensors, metadata: Option<HashMap<String, String>>) -> Result<Vec<u8>, InterchangeError> {
    let s = kv.shape;
    let mut views = Vec::with_capacity(kv.tensors.len());
    for layer in 0..s.layers {
        for (stream, name) in tensor_names(s.kind, layer).into_iter().enumerate() {
            let data = &kv.tensors[layer * s.kind.streams() + stream];
            let view = TensorView::new(dtype_to(kv.dtype), vec![s.tokens, s.heads, s.head_dim], data).map_err(|e| InterchangeError::Layout(e.to_string()))?;
            views.push((name, view));
        }
    }
    safetensors::serialize(views, &metadata).map_err(|e| InterchangeError::Safetensors(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let shape = KvShape { kind: KvKind::KeyValue, layers: 2, tokens: 3, heads: 2, head_dim: 4 };
        let kv = KvTensors { shape, dtype: Dtype::Bf16, tensors: (0..4).map(|i| vec![i as u8; 48]).collect() };
        let bytes = to_safetensors(&kv, None).unwrap();
        assert_eq!(from_safetensors(&bytes).unwrap().kv, kv);

        let mut missing = kv.clone();
        missing.shape.layers = 1;
        missing.tensors.truncate(2);
        let views: Vec<(String, TensorView)> = vec![
            ("layers.0.key".into(), TensorView::new(StDtype::BF16, vec![3, 2, 4], &kv.tensors[0]).unwrap()),
            ("layers.1.value".into(), TensorView::new(StDtype::BF16, vec![3, 2, 4], &kv.tensors[1]).unwrap()),
        ];
        let bad = safetensors::serialize(views, &None).unwrap();
        let err = from_safetensors(&bad).err().unwrap().to_string();
        assert!(err.contains("missing tensor 'layers.0.value'"), "{err}");
        assert!(from_safetensors(b"not safetensors").is_err());
    }
}

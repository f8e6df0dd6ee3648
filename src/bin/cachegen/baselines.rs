//! Baselines measured beside the codec in `cachegen bench`.

use std::time::Instant;

use cachegen::codec::quant;
use cachegen::codec::table;
use cachegen::codec::{Dtype, KvShape, KvTensors};
use constriction::stream::model::{SmallNonContiguousCategoricalEncoderModel, SmallNonContiguousLookupDecoderModel};
use constriction::stream::stack::SmallAnsCoder;
use constriction::stream::{Decode, Encode};

/// Best (smallest) wall time of `repeat` runs, in seconds.
pub fn best_time<T>(repeat: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..repeat.max(1) {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        out = Some(r);
    }
    (best, out.unwrap())
}

/// A baseline's result: stored size and the reconstruction, with timings.
pub struct BaselineResult {
    pub bytes: usize,
    pub decoded: Option<KvTensors>,
    pub encode_s: Option<f64>,
    pub decode_s: Option<f64>,
}

fn map_tensors(kv: &KvTensors, f: impl Fn(usize, &[f32]) -> Vec<f32>) -> KvTensors {
    let tensors = (0..kv.tensors.len())
        .map(|i| {
            let vals = f(i, &kv.tensor_f32(i));
            let mut out = vec![0u8; vals.len() * kv.dtype.size()];
            for (j, v) in vals.iter().enumerate() {
                quant::store(kv.dtype, &mut out, j, *v);
            }
            out
        })
        .collect();
    KvTensors { shape: kv.shape, dtype: kv.dtype, tensors }
}

/// int8 with one absmax scale per (layer, token) over all channels (the
/// CacheGen paper's quantization baseline): 1 byte per element plus an
/// fp16 scale per (tensor, token).
pub fn int8_absmax(kv: &KvTensors, repeat: usize) -> BaselineResult {
    let s = kv.shape;
    let c = s.channels();
    let inputs: Vec<Vec<f32>> = (0..kv.tensors.len()).map(|i| kv.tensor_f32(i)).collect();
    let (enc, (codes, scales)) = best_time(repeat, || {
        let mut codes = Vec::with_capacity(s.elems());
        let mut scales = Vec::with_capacity(s.tensors() * s.tokens);
        for x in &inputs {
            for row in x.chunks_exact(c) {
                let m = row.iter().fold(0f32, |a, v| a.max(v.abs()));
                let scale = half::f16::from_f32(m / 127.0).to_f32();
                scales.push(scale);
                codes.extend(row.iter().map(|v| if scale > 0.0 { (v / scale).round_ties_even().clamp(-127.0, 127.0) as i8 } else { 0 }));
            }
        }
        (codes, scales)
    });
    let (dec, values) = best_time(repeat, || codes.chunks_exact(c).zip(&scales).flat_map(|(row, &sc)| row.iter().map(move |&q| q as f32 * sc)).collect::<Vec<f32>>());
    let per = s.plane_elems();
    let decoded = map_tensors(kv, |i, _| values[i * per..(i + 1) * per].to_vec());
    BaselineResult { bytes: s.elems() + 2 * scales.len(), decoded: Some(decoded), encode_s: Some(enc), decode_s: Some(dec) }
}

/// LMCache's production CacheGen serde, as read from its source: per
/// 256-token chunk, per-(layer, token) absmax over all channels; keys 32
/// bins for layers [0, 10) then 16, values 32 bins for [0, 2) then 16; one
/// 16-bit CDF of 33 entries per (K/V, layer, channel) shipped with every
/// chunk, int32 stream lengths and fp16 scales. The arithmetic-coded
/// payload is sized from the exact code lengths under that CDF plus the
/// coder's flush (2 bits) and byte rounding per stream.
pub fn lmcache(kv: &KvTensors, chunk_tokens: usize) -> BaselineResult {
    let s = kv.shape;
    let c = s.channels();
    let streams = s.kind.streams();
    let mut bytes = 0usize;
    let mut decoded: Vec<Vec<f32>> = (0..s.tensors()).map(|_| Vec::with_capacity(s.plane_elems())).collect();
    for (i, dec) in decoded.iter_mut().enumerate() {
        let x = kv.tensor_f32(i);
        let layer = i / streams;
        let is_value = streams == 2 && i % streams == 1;
        let max = if is_value { if layer < 2 { 15.0 } else { 7.0 } } else if layer < 10 { 15.0 } else { 7.0 };
        for t0 in (0..s.tokens).step_by(chunk_tokens) {
            let t1 = (t0 + chunk_tokens).min(s.tokens);
            let n = t1 - t0;
            let mut sym = vec![0u8; n * c];
            for t in t0..t1 {
                let row = &x[t * c..(t + 1) * c];
                let absmax = half::f16::from_f32(row.iter().fold(0f32, |a, v| a.max(v.abs()))).to_f32();
                for (ch, &v) in row.iter().enumerate() {
                    let q = if absmax > 0.0 { (v * max / absmax + max).round_ties_even() } else { max };
                    let q = q.clamp(0.0, 2.0 * max);
                    sym[(t - t0) * c + ch] = q as u8;
                    dec.push((q - max) / max * absmax);
                }
                bytes += 2; // fp16 scale for this (tensor, token)
            }
            // Per-channel CDF over Lp = 33 entries: cdf[i] = floor((0xFFFF - 32) * cum[i] / n) + i.
            for ch in 0..c {
                let mut hist = [0u32; 32];
                for t in 0..n {
                    hist[sym[t * c + ch] as usize] += 1;
                }
                let mut cdf = [0u64; 33];
                let mut cum = 0u64;
                for (k, entry) in cdf.iter_mut().enumerate() {
                    *entry = (0xFFFF - 32) * cum / n as u64 + k as u64;
                    if k < 32 {
                        cum += hist[k] as u64;
                    }
                }
                cdf[32] = 0x10000;
                let bits: f64 = hist.iter().enumerate().filter(|(_, &h)| h > 0).map(|(k, &h)| h as f64 * (65536.0 / (cdf[k + 1] - cdf[k]) as f64).log2()).sum();
                bytes += ((bits + 2.0) / 8.0).ceil() as usize;
            }
            bytes += c * 33 * 2 + c * 4; // CDF and stream lengths of this tensor in this chunk
        }
    }
    let decoded = map_tensors(kv, |i, _| decoded[i].clone());
    BaselineResult { bytes, decoded: Some(decoded), encode_s: None, decode_s: None }
}

/// zstd on the fp16 bytes.
pub fn zstd_fp16(kv: &KvTensors, level: i32, repeat: usize) -> BaselineResult {
    let raw: Vec<u8> = if kv.dtype == Dtype::F16 {
        kv.tensors.concat()
    } else {
        (0..kv.tensors.len()).flat_map(|i| kv.tensor_f32(i)).flat_map(|v| half::f16::from_f32(v).to_le_bytes()).collect()
    };
    let (enc, z) = best_time(repeat, || zstd::bulk::compress(&raw, level).expect("zstd compress"));
    let (dec, back) = best_time(repeat, || zstd::bulk::decompress(&z, raw.len()).expect("zstd decompress"));
    assert_eq!(back, raw);
    BaselineResult { bytes: z.len(), decoded: None, encode_s: Some(enc), decode_s: Some(dec) }
}

/// The codec's default-level symbols coded as one stream with
/// `constriction` (ANS, 12-bit lookup models built from each channel's
/// exact histogram; tables not counted). The bit-rate reference for our
/// coder, and the single-stream speed reference.
pub struct ConstrictionResult {
    pub payload_bytes: usize,
    pub entropy_bits: f64,
    pub encode_s: f64,
    pub decode_s: f64,
}

pub fn constriction_reference(s: &KvShape, symbols: &[Vec<u8>], repeat: usize) -> ConstrictionResult {
    let (t, c) = (s.tokens, s.channels());
    // Per (plane, channel) models from exact histograms at 12 bits.
    let mut enc_models = Vec::new();
    let mut dec_models = Vec::new();
    let mut entropy_bits = 0.0;
    for sym in symbols {
        for ch in 0..c {
            let mut hist = [0u32; 256];
            for row in sym.chunks_exact(c) {
                hist[row[ch] as usize] += 1;
            }
            let present: Vec<u8> = (0..256).filter(|&k| hist[k] > 0).map(|k| k as u8).collect();
            let weights: Vec<u32> = present.iter().map(|&k| hist[k as usize]).collect();
            entropy_bits += weights.iter().map(|&h| h as f64 * (t as f64 / h as f64).log2()).sum::<f64>();
            let freq: Vec<u16> = if present.len() == 1 { vec![4096] } else { table::normalize(&weights, 12).expect("histogram") };
            enc_models.push(SmallNonContiguousCategoricalEncoderModel::from_symbols_and_nonzero_fixed_point_probabilities(present.iter().copied(), freq.iter().copied(), false).expect("model"));
            dec_models.push(SmallNonContiguousLookupDecoderModel::from_symbols_and_nonzero_fixed_point_probabilities(present.iter().copied(), freq.iter().copied(), false).expect("model"));
        }
    }
    // Symbol order: plane, token, channel; ANS encodes in reverse.
    let (enc, compressed) = best_time(repeat, || {
        let mut coder = SmallAnsCoder::new();
        for (p, sym) in symbols.iter().enumerate().rev() {
            for (k, &x) in sym.iter().enumerate().rev() {
                coder.encode_symbol(x, &enc_models[p * c + k % c]).expect("encodable");
            }
        }
        coder.into_compressed().expect("compressed")
    });
    let (dec, out) = best_time(repeat, || {
        let mut coder = SmallAnsCoder::from_compressed(compressed.clone()).expect("stream");
        let mut out = Vec::with_capacity(s.elems());
        for p in 0..symbols.len() {
            for k in 0..t * c {
                out.push(coder.decode_symbol(&dec_models[p * c + k % c]).expect("decodable"));
            }
        }
        out
    });
    assert_eq!(out, symbols.concat(), "constriction round trip");
    ConstrictionResult { payload_bytes: compressed.len() * 2, entropy_bits, encode_s: enc, decode_s: dec }
}

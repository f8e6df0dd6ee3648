//! Round-trip properties of the codec over shapes, dtypes and levels.

use cachegen::codec::format::PlaneKind;
use cachegen::codec::quant::{self, QuantSpec, ScaleGroup};

#[test]
fn sink_like_token_is_detected_and_stored_exactly() {
    let shape = KvShape { kind: KvKind::KeyValue, layers: 2, tokens: 100, heads: 3, head_dim: 64 };
    let kv = synthetic(shape, Dtype::F16, 7);
    let bytes = encode(&kv, &EncodeOptions::level(Level::Default)).unwrap();
    let c = codec::Container::parse(&bytes, None, Default::default()).unwrap();
    // synthetic() scales token 0 by 20 in every tensor.
    assert_eq!(c.exact_tokens(), &[0]);
    let none = encode(&kv, &EncodeOptions { level: Some(Level::Default), protect_outliers: Some(false), ..Default::default() }).unwrap();
    assert!(codec::Container::parse(&none, None, Default::default()).unwrap().exact_tokens().is_empty());
    check_lossy(&kv, &bytes);
    check_lossy(&kv, &none);
}
use cachegen::codec::{self, calibrate_tables, decode, encode, Dtype, EncodeOptions, KvKind, KvShape, KvTensors, Level, Tables};
use proptest::prelude::*;

fn xorshift(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Deterministic KV-like data: per-channel offsets and scales that belong
/// to the "model" (the same for every seed, as real channel statistics
/// are), heavy-tailed token noise from `seed`, a few outlier channels and an
/// attention-sink-like first token.
fn synthetic(shape: KvShape, dtype: Dtype, seed: u64) -> KvTensors {
    synthetic_with(shape, dtype, seed, true)
}

fn synthetic_with(shape: KvShape, dtype: Dtype, seed: u64, sink: bool) -> KvTensors {
    let mut model = xorshift(12345);
    let mut rnd = xorshift(seed);
    let c = shape.channels();
    let tensors = (0..shape.tensors())
        .map(|_| {
            let offs: Vec<f64> = (0..c).map(|_| (model() - 0.5) * 2.0).collect();
            let scl: Vec<f64> = (0..c).map(|i| if i % 37 == 5 { 8.0 } else { 0.2 + model() }).collect();
            let mut out = vec![0u8; shape.plane_elems() * dtype.size()];
            for t in 0..shape.tokens {
                for ch in 0..c {
                    // Laplace-ish: difference of two exponentials.
                    let lap = (-(rnd() + 1e-12).ln()) - (-(rnd() + 1e-12).ln());
                    let mut v = offs[ch] + scl[ch] * lap;
                    if sink && t == 0 {
                        v *= 20.0;
                    }
                    quant::store(dtype, &mut out, t * c + ch, v as f32);
                }
            }
            out
        })
        .collect();
    KvTensors { shape, dtype, tensors }
}

fn check_lossy(kv: &KvTensors, bytes: &[u8]) {
    let container = codec::Container::parse(bytes, None, Default::default()).unwrap();
    let out = container.decode().unwrap();
    assert_eq!(out.shape, kv.shape);
    assert_eq!(out.dtype, kv.dtype);
    // Error bound: half a step; plus the f32 rounding of a value's position
    // before it is rounded to a symbol (the encoder rounds v / step + centre,
    // whose ulp is up to 2^-16 at 128..256, so a value within 2^-17 steps of
    // a half-step boundary may go either way: up to 2^-16 steps allowed);
    // plus rounding to the output dtype.
    let shape = kv.shape;
    let (c, d) = (shape.channels(), shape.head_dim);
    for (i, plane) in container.planes().iter().enumerate() {
        let PlaneKind::Quantized(spec) = plane else { panic!("lossy plane expected") };
        let orig = kv.tensor_f32(i);
        let got = out.tensor_f32(i);
        let params = container.group_params(i, spec);
        let exact = container.exact_tokens();
        for t in 0..shape.tokens {
            if exact.contains(&t) {
                let row = c * kv.dtype.size();
                assert_eq!(out.tensors[i][t * row..(t + 1) * row], kv.tensors[i][t * row..(t + 1) * row], "exact token {t}");
                continue;
            }
            for ch in 0..c {
                let p = params[spec.group.index(t, ch, c, d)];
                let e = (orig[t * c + ch] - got[t * c + ch]).abs();
                // (relative half-ulp, absolute half-ulp of the subnormals)
                let (dtype_eps, dtype_abs) = match kv.dtype {
                    Dtype::F16 => (1.0 / 1024.0, 1e-7),
                    Dtype::Bf16 => (1.0 / 128.0, 1e-7),
                    Dtype::F32 => (1e-6, 1e-7),
                    Dtype::F8E4M3 => (1.0 / 16.0, 1.0 / 1024.0),
                };
                let bound = p.step * (0.5 + 1.0 / 65536.0) + dtype_eps * got[t * c + ch].abs().max(1e-4) + dtype_abs;
                assert!(e <= bound, "tensor {i} t {t} c {ch}: |{} - {}| = {e} > {bound} (step {}, offset {}, spec {:?})", orig[t * c + ch], got[t * c + ch], p.step, p.offset, spec);
            }
        }
    }
}

fn shapes() -> impl Strategy<Value = (KvShape, Dtype)> {
    let kind = prop_oneof![Just(KvKind::KeyValue), Just(KvKind::Latent)];
    let dtype = prop_oneof![Just(Dtype::F16), Just(Dtype::Bf16), Just(Dtype::F32), Just(Dtype::F8E4M3)];
    (kind, 1usize..4, 1usize..300, 1usize..6, prop_oneof![Just(8usize), Just(13), Just(64), Just(256)], dtype).prop_map(
        |(kind, layers, tokens, heads, head_dim, dtype)| {
            let heads = if kind == KvKind::Latent { 1 } else { heads };
            (KvShape { kind, layers, tokens, heads, head_dim }, dtype)
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn lossy_levels_stay_within_half_a_step((shape, dtype) in shapes(), seed in any::<u64>(), level in 1u8..=3) {
        let kv = synthetic(shape, dtype, seed);
        let bytes = encode(&kv, &EncodeOptions::level(Level::from_number(level).unwrap())).unwrap();
        check_lossy(&kv, &bytes);
    }

    #[test]
    fn lossless_is_bit_exact((shape, dtype) in shapes(), seed in any::<u64>()) {
        let kv = synthetic(shape, dtype, seed);
        let bytes = encode(&kv, &EncodeOptions::level(Level::Lossless)).unwrap();
        prop_assert_eq!(decode(&bytes, None).unwrap(), kv);
    }
}

#[test]
fn lossless_keeps_nan_and_infinity_while_lossy_rejects_them() {
    let shape = KvShape { kind: KvKind::KeyValue, layers: 1, tokens: 5, heads: 1, head_dim: 8 };
    let mut kv = synthetic(shape, Dtype::F16, 3);
    kv.tensors[0][0..2].copy_from_slice(&half::f16::NAN.to_le_bytes());
    kv.tensors[1][4..6].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    let bytes = encode(&kv, &EncodeOptions::level(Level::Lossless)).unwrap();
    assert_eq!(decode(&bytes, None).unwrap(), kv);
    assert!(matches!(encode(&kv, &EncodeOptions::level(Level::Default)), Err(codec::Error::NonFinite)));
}

#[test]
fn every_scale_grouping_and_symmetry_round_trips() {
    let shape = KvShape { kind: KvKind::KeyValue, layers: 2, tokens: 77, heads: 3, head_dim: 64 };
    let kv = synthetic(shape, Dtype::Bf16, 11);
    for group in [ScaleGroup::PerToken, ScaleGroup::PerTokenHead, ScaleGroup::PerChannel, ScaleGroup::PerTensor] {
        for asymmetric in [false, true] {
            let plan = vec![PlaneKind::Quantized(QuantSpec { group, max: 9, asymmetric }); shape.tensors()];
            let opts = EncodeOptions { plan: Some(plan), ..Default::default() };
            check_lossy(&kv, &encode(&kv, &opts).unwrap());
        }
    }
}

#[test]
fn constant_and_zero_tensors_round_trip() {
    let shape = KvShape { kind: KvKind::KeyValue, layers: 1, tokens: 40, heads: 2, head_dim: 64 };
    let zeros = KvTensors { shape, dtype: Dtype::F16, tensors: vec![vec![0u8; shape.plane_elems() * 2]; 2] };
    for level in Level::ALL {
        let bytes = encode(&zeros, &EncodeOptions::level(level)).unwrap();
        assert_eq!(decode(&bytes, None).unwrap(), zeros, "{level:?}");
    }
}

#[test]
fn external_tables_round_trip_and_are_required() {
    let shape = KvShape { kind: KvKind::KeyValue, layers: 3, tokens: 256, heads: 3, head_dim: 64 };
    // Stationary statistics (no sink token), as within one model's chunks.
    let calib: Vec<KvTensors> = (1..=6).map(|seed| synthetic_with(shape, Dtype::F16, seed, false)).collect();
    let set = calibrate_tables(&calib.iter().collect::<Vec<_>>(), &EncodeOptions::level(Level::Default)).unwrap();
    let set = codec::TableSet::from_bytes(&set.to_bytes()).unwrap();
    let kv = synthetic_with(shape, Dtype::F16, 99, false);
    let opts = EncodeOptions { level: Some(Level::Default), tables: Tables::External(&set), ..Default::default() };
    let external = encode(&kv, &opts).unwrap();
    let embedded = encode(&kv, &EncodeOptions::level(Level::Default)).unwrap();
    assert!(external.len() < embedded.len(), "external {} embedded {}", external.len(), embedded.len());
    // Same reconstruction either way: tables change the bits, not the values.
    assert_eq!(decode(&external, Some(&set)).unwrap(), decode(&embedded, None).unwrap());
    assert!(matches!(decode(&external, None), Err(codec::Error::MissingTables(_))));
    let other = calibrate_tables(&[&synthetic(shape, Dtype::F16, 5)], &EncodeOptions::level(Level::Default)).unwrap();
    assert!(matches!(decode(&external, Some(&other)), Err(codec::Error::WrongTables { .. })));
}

/// Small Laplace-like noise in every channel, and `wide` channels per
/// tensor spread uniformly over about 360 steps at the high level (clipped
/// to the 255-symbol alphabet).
fn with_wide_channels(shape: KvShape, seed: u64, wide: usize) -> KvTensors {
    let mut rnd = xorshift(seed);
    let c = shape.channels();
    let tensors = (0..shape.tensors())
        .map(|_| {
            let mut out = vec![0u8; shape.plane_elems() * 2];
            for t in 0..shape.tokens {
                for ch in 0..c {
                    let v = if ch % (c / wide) == 7 { 2.0 * rnd() - 1.0 } else { 0.01 * ((-(rnd() + 1e-12).ln()) - (-(rnd() + 1e-12).ln())) };
                    quant::store(Dtype::F16, &mut out, t * c + ch, v as f32);
                }
            }
            out
        })
        .collect();
    KvTensors { shape, dtype: Dtype::F16, tensors }
}

#[test]
fn calibration_keeps_8_bits_by_cutting_a_few_wide_tables_and_widens_for_many() {
    let shape = KvShape { kind: KvKind::KeyValue, layers: 2, tokens: 256, heads: 2, head_dim: 64 };
    let opts = EncodeOptions::level(Level::High);
    let support = |t: &codec::table::FreqTable| t.freq.iter().filter(|&&f| f > 0).count();
    // One wide channel per tensor: 4 of 512 tables (under 1%) are cut to
    // their densest 128 symbols and the set stays at 8 bits.
    let calib: Vec<KvTensors> = (1..=3).map(|seed| with_wide_channels(shape, seed, 1)).collect();
    let set = calibrate_tables(&calib.iter().collect::<Vec<_>>(), &opts).unwrap();
    assert_eq!(set.prob_bits, 8);
    let tables = set.tables().unwrap();
    for tabs in &tables {
        assert_eq!(support(&tabs[7]), 128, "the wide channel is cut to 128 symbols");
        assert!(tabs.iter().enumerate().all(|(k, t)| k == 7 || (support(t) >= 7 && support(t) < 128)), "{:?}", tabs.iter().map(support).collect::<Vec<_>>());
    }
    // A later chunk codes with the set (its wide channel cannot: that
    // chunk carries its own tables) and decodes as with embedded tables.
    let kv = with_wide_channels(shape, 9, 1);
    let external = encode(&kv, &EncodeOptions { tables: Tables::External(&set), ..opts.clone() }).unwrap();
    assert_eq!(decode(&external, Some(&set)).unwrap(), decode(&encode(&kv, &opts).unwrap(), None).unwrap());
    // A wide channel in every 8 (16 of 128 per tensor, 12.5%): the set keeps
    // every observed range and takes the 9 bits that needs.
    let calib: Vec<KvTensors> = (1..=3).map(|seed| with_wide_channels(shape, seed, 16)).collect();
    let set = calibrate_tables(&calib.iter().collect::<Vec<_>>(), &opts).unwrap();
    assert_eq!(set.prob_bits, 9);
    assert!(set.tables().unwrap().iter().all(|tabs| support(&tabs[7]) > 128));
}

#[test]
fn scalar_and_simd_decoders_agree_symbol_for_symbol() {
    use cachegen::codec::format;
    use cachegen::codec::rans::{decode_segment_with, DecodeScratch, PlaneLuts};
    use cachegen::codec::table::TableEncoding;
    let shape = KvShape { kind: KvKind::KeyValue, layers: 2, tokens: 300, heads: 5, head_dim: 64 };
    for level in [Level::Compact, Level::High, Level::Lossless] {
        let bytes = encode(&synthetic(shape, Dtype::F16, 21), &EncodeOptions::level(level)).unwrap();
        let layout = format::parse(&bytes, u64::MAX).unwrap();
        let h = &layout.header;
        let tables = codec::encode::parse_tables(&bytes[layout.tables.clone()], &layout.planes, h.shape.channels(), h.prob_bits, TableEncoding::Compact).unwrap();
        let per = h.segments_per_plane();
        for (k, &(a, b)) in layout.segments.iter().enumerate() {
            let (p, geo) = (k / per, h.segment_geometry(k % per));
            let kind = layout.planes[p];
            let mut out = [Vec::new(), Vec::new()];
            let mut luts = PlaneLuts::new(h.prob_bits);
            luts.build(&tables[p]).unwrap();
            for (simd, o) in [false, true].into_iter().zip(out.iter_mut()) {
                let mut scratch = DecodeScratch::new();
                decode_segment_with(&geo, &bytes[a..b], &luts, |c| kind.table_index(c), &mut scratch, |_, tile, _| o.extend_from_slice(tile), simd).unwrap();
            }
            assert_eq!(out[0], out[1], "{level:?} segment {k}");
        }
    }
}

#[test]
fn mla_latent_576_wide_round_trips_at_every_level() {
    // DeepSeek-style MLA: one latent "head" of 512 + 64 = 576, no K/V split.
    let shape = KvShape { kind: KvKind::Latent, layers: 3, tokens: 130, heads: 1, head_dim: 576 };
    for dtype in [Dtype::Bf16, Dtype::F16] {
        let kv = synthetic(shape, dtype, 5);
        for level in [Level::Compact, Level::Default, Level::High] {
            check_lossy(&kv, &encode(&kv, &EncodeOptions::level(level)).unwrap());
        }
        assert_eq!(decode(&encode(&kv, &EncodeOptions::level(Level::Lossless)).unwrap(), None).unwrap(), kv);
    }
}

#[test]
fn value_decoder_agrees_with_symbol_decoder() {
    // decode_segment_values (lookup entries carrying output values) against
    // decode_segment (symbols) mapped through the same values, scalar and
    // AVX2, on full and partial channel groups.
    use cachegen::codec::format;
    use cachegen::codec::rans::{as_uninit, decode_segment_pair_values, decode_segment_values, decode_segment_with, DecodeScratch, PlaneLuts};
    use cachegen::codec::table::TableEncoding;
    let value: [u16; 256] = std::array::from_fn(|s| (s as u16).wrapping_mul(0x9e37) ^ 0x5a5a);
    for (heads, head_dim, tokens) in [(5, 64, 300), (3, 80, 77), (1, 16, 9)] {
        let shape = KvShape { kind: KvKind::KeyValue, layers: 2, tokens, heads, head_dim };
        for level in [Level::Compact, Level::Default, Level::High] {
            let bytes = encode(&synthetic(shape, Dtype::F16, 33), &EncodeOptions::level(level)).unwrap();
            let layout = format::parse(&bytes, u64::MAX).unwrap();
            let h = &layout.header;
            assert_eq!(h.prob_bits, 8);
            let c = h.shape.channels();
            let tables = codec::encode::parse_tables(&bytes[layout.tables.clone()], &layout.planes, c, h.prob_bits, TableEncoding::Compact).unwrap();
            let per = h.segments_per_plane();
            assert_eq!(tables.len(), layout.planes.len());
            for (p, pt) in tables.iter().enumerate() {
                let mut luts = PlaneLuts::new(8);
                luts.build(pt).unwrap();
                let mut want = vec![0u8; 2 * c * tokens];
                for k in 0..per {
                    let (a, b) = layout.segments[p * per + k];
                    let geo = h.segment_geometry(k);
                    let mut scratch = DecodeScratch::new();
                    decode_segment_with(&geo, &bytes[a..b], &luts, |c| c, &mut scratch, |g, tile, lanes| {
                        for (r, row) in tile.chunks_exact(32).enumerate() {
                            for (l, &s) in row[..lanes].iter().enumerate() {
                                let at = 2 * ((geo.token_begin + r) * c + 32 * g + l);
                                want[at..at + 2].copy_from_slice(&value[s as usize].to_le_bytes());
                            }
                        }
                    }, false).unwrap();
                }
                let mut vluts = PlaneLuts::new(8);
                vluts.build_valued(pt.len(), |t| (pt[t].lo, &pt[t].freq[..]), &value).unwrap();
                for simd in [false, true] {
                    let mut got = vec![0u8; 2 * c * tokens];
                    for k in 0..per {
                        let (a, b) = layout.segments[p * per + k];
                        let mut scratch = DecodeScratch::new();
                        decode_segment_values(&h.segment_geometry(k), &bytes[a..b], &vluts, |c| c, &mut scratch, &mut got, c, simd).unwrap();
                    }
                    assert!(got == want, "{level:?} {heads}x{head_dim} plane {p} simd {simd}");
                }
                // Token blocks two at a time (decode_segment_pair_values),
                // tables in channel order (its lockstep kernel) and the same
                // tables in reverse order (lut_index not channel order: its
                // fallback), scalar and AVX2.
                let rev: Vec<_> = pt.iter().rev().cloned().collect();
                let mut rluts = PlaneLuts::new(8);
                rluts.build_valued(rev.len(), |t| (rev[t].lo, &rev[t].freq[..]), &value).unwrap();
                let n = pt.len();
                for simd in [false, true] {
                    for (luts, reversed) in [(&vluts, false), (&rluts, true)] {
                        let index = |c: usize| if reversed { n - 1 - c } else { c };
                        let mut got = vec![0u8; 2 * c * tokens];
                        let mut scratch = DecodeScratch::new();
                        let mut k = 0;
                        while k < per {
                            let (a, b) = layout.segments[p * per + k];
                            let (ga, gb) = (h.segment_geometry(k), h.segment_geometry(k + 1));
                            if k + 1 < per && gb.group_begin == ga.group_begin {
                                let (a2, b2) = layout.segments[p * per + k + 1];
                                decode_segment_pair_values([&ga, &gb], [&bytes[a..b], &bytes[a2..b2]], luts, index, &mut scratch, as_uninit(&mut got), c, simd).unwrap();
                                k += 2;
                            } else {
                                decode_segment_values(&ga, &bytes[a..b], luts, index, &mut scratch, &mut got, c, simd).unwrap();
                                k += 1;
                            }
                        }
                        assert!(got == want, "{level:?} {heads}x{head_dim} plane {p} simd {simd} reversed {reversed}");
                    }
                }
            }
        }
    }
}

#[test]
fn flat_encoders_agree_with_the_reference_encoder() {
    // encode_segment_flat (AVX2 and scalar) against encode_segment, byte
    // for byte: full and partial lane groups, one and several groups per
    // segment, token blocks that start inside the plane, shared and
    // per-channel tables, skewed and near-uniform symbols, prob_bits 8-10
    // (including single-symbol tables and frequency-1 symbols).
    use cachegen::codec::rans::{encode_segment, encode_segment_flat_with, FlatEncTables, SegmentGeometry};
    use cachegen::codec::table::{codes_from_histogram, table_from_codes, EncTable, FreqTable};
    let mut rnd = xorshift(7);
    for (case, &(channels, tokens, shared, spread)) in [(192usize, 40usize, false, 6.0f64), (240, 33, false, 3.0), (96, 7, true, 80.0), (33, 12, false, 1.0), (64, 20, false, 0.0), (480, 9, false, 30.0)].iter().enumerate() {
        for pb in 8..=10u32 {
            // Symbols around 127 with a per-channel spread; channel 5 is constant.
            let symbols: Vec<u8> = (0..tokens * channels)
                .map(|i| {
                    let c = i % channels;
                    if c == 5 || spread == 0.0 {
                        127
                    } else {
                        let u = rnd() + rnd() + rnd() - 1.5;
                        (127.0 + u * spread * (1.0 + (c % 7) as f64 / 3.0)).round().clamp(0.0, 254.0) as u8
                    }
                })
                .collect();
            let ntab = if shared { 1 } else { channels };
            let mut hist = vec![[0u32; 256]; ntab];
            for (i, &s) in symbols.iter().enumerate() {
                hist[if shared { 0 } else { i % channels }][s as usize] += 1;
            }
            let tables: Result<Vec<FreqTable>, _> = hist
                .iter()
                .map(|h| {
                    let (lo, codes) = codes_from_histogram(h);
                    table_from_codes(lo, &codes, pb)
                })
                .collect();
            // Too many distinct symbols for this precision (the wide shared case at 8).
            let Ok(tables) = tables else {
                assert!(pb < 10, "case {case}");
                continue;
            };
            let enc: Vec<EncTable> = tables.iter().map(|t| EncTable::new(t, pb)).collect();
            let by_channel: Vec<&EncTable> = (0..channels).map(|c| &enc[if shared { 0 } else { c }]).collect();
            let mut flat = FlatEncTables::new();
            flat.build(&tables, pb);
            let lane_base: Vec<i32> = (0..channels).map(|c| flat.base(if shared { 0 } else { c })).collect();
            let groups = channels.div_ceil(32);
            let splits = [(0, tokens, 0, groups), (tokens / 3, tokens, groups / 2, groups), (1, 2.min(tokens), 0, 1)];
            for &(tb, te, gb, ge) in &splits {
                if tb >= te || gb >= ge {
                    continue;
                }
                let geo = SegmentGeometry { group_begin: gb, group_end: ge, token_begin: tb, token_end: te, channels };
                let (mut want, mut w) = (Vec::new(), Vec::new());
                encode_segment(&geo, &symbols, channels, &by_channel, pb, &mut want, &mut w);
                for simd in [false, true] {
                    let mut got = vec![0xAAu8; 3];
                    encode_segment_flat_with(&geo, &symbols, channels, &flat, &lane_base, &mut got, &mut w, simd);
                    assert!(got[..3] == [0xAA; 3] && got[3..] == want[..], "case {case} pb {pb} {geo:?} simd {simd}");
                }
            }
        }
    }
}

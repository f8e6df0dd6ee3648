//! GPU decode (issue 5): the fused kernel's output, written through every
//! layout kind into device memory, must equal `codec::decode` followed by
//! `KvLayout::scatter` byte for byte, including the bytes it must not touch.
//!
//! On a machine without a GPU every test prints `SKIPPED: no GPU (<reason>)`
//! and passes, so CPU-only CI stays green.

use std::sync::OnceLock;

use cachegen::codec::format::PlaneKind;
use cachegen::codec::quant::{self, QuantSpec, ScaleGroup};
use cachegen::codec::{self, calibrate_tables, encode, Dtype, EncodeOptions, KvKind, KvShape, KvTensors, Level, Tables};
use cachegen::gpu::{Gpu, GpuDecoder, GpuError, GpuTableSet, PreparedChunk};
use cachegen::layout::KvLayout;

static DECODER: OnceLock<Result<GpuDecoder, String>> = OnceLock::new();

/// The shared decoder, or `None` after printing why the test is skipped.
fn decoder() -> Option<&'static GpuDecoder> {
    let d = DECODER.get_or_init(|| match Gpu::open(0) {
        Ok(g) => {
            eprintln!("GPU: {} (sm_{}{})", g.name(), g.compute_capability().0, g.compute_capability().1);
            Ok(GpuDecoder::new(&g).unwrap_or_else(|e| panic!("GPU present but the decoder failed to start: {e}")))
        }
        Err(GpuError::NoGpu(reason)) => Err(reason),
        Err(e) => panic!("GPU present but unusable: {e}"),
    });
    match d {
        Ok(d) => Some(d),
        Err(reason) => {
            println!("SKIPPED: no GPU ({reason})");
            None
        }
    }
}

fn xorshift(seed: u64) -> impl FnMut() -> f64 {
    let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// KV-like data: per-channel offsets and scales, Laplace noise, a few
/// outlier channels and an attention-sink-like first token.
fn synthetic(shape: KvShape, dtype: Dtype, seed: u64) -> KvTensors {
    let mut model = xorshift(777);
    let mut rnd = xorshift(seed);
    let c = shape.channels();
    let tensors = (0..shape.tensors())
        .map(|_| {
            let offs: Vec<f64> = (0..c).map(|_| (model() - 0.5) * 2.0).collect();
            let scl: Vec<f64> = (0..c).map(|i| if i % 37 == 5 { 8.0 } else { 0.2 + model() }).collect();
            let mut out = vec![0u8; shape.plane_elems() * dtype.size()];
            for t in 0..shape.tokens {
                for ch in 0..c {
                    let lap = (-(rnd() + 1e-12).ln()) - (-(rnd() + 1e-12).ln());
                    let mut v = offs[ch] + scl[ch] * lap;
                    if t == 0 {
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

/// Tokens `t0..t1` of a chunk.
fn slice_tokens(kv: &KvTensors, t0: usize, t1: usize) -> KvTensors {
    let row = kv.shape.channels() * kv.dtype.size();
    KvTensors { shape: KvShape { tokens: t1 - t0, ..kv.shape }, dtype: kv.dtype, tensors: kv.tensors.iter().map(|t| t[t0 * row..t1 * row].to_vec()).collect() }
}

/// The same values in another dtype.
fn convert(kv: &KvTensors, dtype: Dtype) -> KvTensors {
    let tensors = (0..kv.tensors.len())
        .map(|i| {
            let v = kv.tensor_f32(i);
            let mut out = vec![0u8; v.len() * dtype.size()];
            for (j, &x) in v.iter().enumerate() {
                quant::store(dtype, &mut out, j, x);
            }
            out
        })
        .collect();
    KvTensors { shape: kv.shape, dtype, tensors }
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    FlashAttn(bool),
    FlashInfer(bool),
    CrossLayer(bool),
    TrtPool(bool),
    Mla,
}

const ALL_KINDS: [Kind; 9] = [
    Kind::FlashAttn(false),
    Kind::FlashAttn(true),
    Kind::FlashInfer(false),
    Kind::FlashInfer(true),
    Kind::CrossLayer(false),
    Kind::CrossLayer(true),
    Kind::TrtPool(false),
    Kind::TrtPool(true),
    Kind::Mla,
];

/// A layout of `kind` with arena offsets starting at 0, and the arena size.
fn make_layout(kind: Kind, layers: usize, num_blocks: usize, block_size: usize, heads: usize, head_dim: usize, dtype: Dtype) -> (KvLayout, usize) {
    let e = dtype.size();
    let per_layer = |kv: usize| kv * num_blocks * block_size * heads * head_dim * e;
    let bases = |size: usize| (0..layers).map(|l| l * size).collect::<Vec<_>>();
    let l = match kind {
        Kind::FlashAttn(hnd) => KvLayout::vllm_flash_attn(bases(per_layer(2)), num_blocks, block_size, heads, head_dim, dtype, hnd),
        Kind::FlashInfer(hnd) => KvLayout::flashinfer(bases(per_layer(2)), num_blocks, block_size, heads, head_dim, dtype, hnd),
        Kind::CrossLayer(hnd) => KvLayout::vllm_cross_layer(0, layers, num_blocks, block_size, heads, head_dim, dtype, hnd),
        Kind::TrtPool(hnd) => KvLayout::trtllm_pool(0, layers, num_blocks, block_size, heads, head_dim, dtype, hnd),
        Kind::Mla => KvLayout::mla(bases(per_layer(1)), num_blocks, block_size, head_dim, dtype),
    }
    .unwrap();
    let size = match kind {
        Kind::Mla => per_layer(1) * layers,
        _ => per_layer(2) * layers,
    };
    (l, size)
}

/// Distinct random block ids for each chunk.
fn block_ids(rnd: &mut impl FnMut() -> f64, num_blocks: usize, per_chunk: &[usize]) -> Vec<Vec<u32>> {
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        let j = (rnd() * (i + 1) as f64) as usize;
        ids.swap(i, j.min(i));
    }
    let mut at = 0;
    per_chunk
        .iter()
        .map(|&n| {
            let v = ids[at..at + n].to_vec();
            at += n;
            v
        })
        .collect()
}

/// Decode `streams` with the CPU (decode + scatter) and the GPU (into a
/// device arena filled with the same garbage) and compare the arenas.
fn check(dec: &GpuDecoder, kind: Kind, streams: &[Vec<u8>], what: &str) {
    check_with(dec, kind, streams, what, None)
}

/// [`check`] for streams that may reference a table set (CPU: the set;
/// GPU: its uploaded lookups).
fn check_with(dec: &GpuDecoder, kind: Kind, streams: &[Vec<u8>], what: &str, set: Option<(&codec::TableSet, &GpuTableSet)>) {
    check_sets(dec, kind, streams, what, set.as_slice(), false)
}

/// [`check_with`] for chunks that may reference any of `sets`: staged with
/// [`GpuDecoder::stage_with_tables`] (at most one set), or, with `prepared`,
/// each chunk prepared with the set it references and all staged together.
fn check_sets(dec: &GpuDecoder, kind: Kind, streams: &[Vec<u8>], what: &str, sets: &[(&codec::TableSet, &GpuTableSet)], prepared: bool) {
    let set_of = |b: &[u8]| {
        let h = codec::format::Header::parse(b).unwrap();
        sets.iter().find(|s| h.external_tables() && s.0.id() == h.table_id).copied()
    };
    let cpu_decode = |b: &[u8]| codec::Container::parse(b, set_of(b).map(|s| s.0), Default::default()).and_then(|c| c.decode()).unwrap();
    let first = cpu_decode(&streams[0]);
    let s = first.shape;
    let block_size = 16;
    let per_chunk: Vec<usize> = streams.iter().map(|b| codec::format::Header::parse(b).unwrap().shape.tokens.div_ceil(block_size)).collect();
    let num_blocks = per_chunk.iter().sum::<usize>() + 3;
    let (layout, size) = make_layout(kind, s.layers, num_blocks, block_size, s.heads, s.head_dim, first.dtype);
    let mut rnd = xorshift(size as u64);
    let ids = block_ids(&mut rnd, num_blocks, &per_chunk);
    let garbage: Vec<u8> = (0..size).map(|_| (rnd() * 256.0) as u8).collect();
    let mut want = garbage.clone();
    for (b, ids) in streams.iter().zip(&ids) {
        layout.scatter(&mut want, ids, &cpu_decode(b)).unwrap();
    }
    let arena = dec.gpu().alloc(size).unwrap();
    arena.write(0, &garbage).unwrap();
    let mut dev_layout = layout.clone();
    for b in &mut dev_layout.layer_base {
        *b += arena.ptr() as usize;
    }
    let refs: Vec<&[u8]> = streams.iter().map(|b| b.as_slice()).collect();
    let id_refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    let staged = if prepared {
        let preps: Vec<PreparedChunk> = streams.iter().map(|b| PreparedChunk::with_tables(b.clone(), Default::default(), set_of(b).map(|s| s.1)).unwrap()).collect();
        dec.stage_prepared(&preps.iter().collect::<Vec<_>>())
    } else {
        assert!(sets.len() <= 1);
        dec.stage_with_tables(&refs, sets.first().map(|s| s.1))
    }
    .unwrap_or_else(|e| panic!("{what} {kind:?}: {e}"));
    // SAFETY: the arena holds the whole layout and nothing else uses it.
    unsafe { dec.decode_staged(&staged, &dev_layout, &id_refs, None) }.unwrap_or_else(|e| panic!("{what} {kind:?}: {e}"));
    let mut got = vec![0u8; size];
    arena.read(0, &mut got).unwrap();
    if got != want {
        let diffs: Vec<usize> = (0..size).filter(|&i| got[i] != want[i]).collect();
        panic!(
            "{what} {kind:?} {:?}: {} of {size} bytes differ, first at {} (got {:#04x}, want {:#04x}, was {:#04x})",
            first.dtype,
            diffs.len(),
            diffs[0],
            got[diffs[0]],
            want[diffs[0]],
            garbage[diffs[0]]
        );
    }
}

fn shape_for(kind: Kind, tokens: usize) -> KvShape {
    match kind {
        Kind::Mla => KvShape { kind: KvKind::Latent, layers: 2, tokens, heads: 1, head_dim: 96 },
        _ => KvShape { kind: KvKind::KeyValue, layers: 2, tokens, heads: 3, head_dim: 64 },
    }
}

#[test]
fn every_layout_kind_dtype_and_level_matches_the_cpu() {
    let Some(dec) = decoder() else { return };
    let mut n = 0;
    for kind in ALL_KINDS {
        for dtype in [Dtype::F16, Dtype::Bf16, Dtype::F32, Dtype::F8E4M3] {
            for level in [Level::Compact, Level::Default, Level::High, Level::Lossless] {
                // Two chunks in one call, the second not a multiple of the block size.
                let streams: Vec<Vec<u8>> = [77usize, 40]
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| encode(&synthetic(shape_for(kind, t), dtype, 1 + i as u64), &EncodeOptions::level(level)).unwrap())
                    .collect();
                check(dec, kind, &streams, &format!("{level:?}"));
                n += 1;
            }
        }
    }
    println!("{n} combinations matched");
}

#[test]
fn partial_channel_groups_and_long_chunks_match() {
    let Some(dec) = decoder() else { return };
    // 2 heads x 40 = 80 channels: the last lane group has 16 lanes. 600 tokens:
    // several token blocks per plane.
    for (heads, head_dim, tokens) in [(2usize, 40usize, 600usize), (5, 24, 33), (1, 8, 300)] {
        let shape = KvShape { kind: KvKind::KeyValue, layers: 3, tokens, heads, head_dim };
        for level in [Level::Default, Level::Lossless] {
            let s = vec![encode(&synthetic(shape, Dtype::F16, 9), &EncodeOptions::level(level)).unwrap()];
            check(dec, Kind::FlashAttn(false), &s, &format!("{heads}x{head_dim} {tokens} tokens {level:?}"));
            check(dec, Kind::TrtPool(true), &s, &format!("{heads}x{head_dim} {tokens} tokens {level:?}"));
        }
    }
}

#[test]
fn every_scale_grouping_and_symmetry_matches() {
    let Some(dec) = decoder() else { return };
    let shape = KvShape { kind: KvKind::KeyValue, layers: 2, tokens: 77, heads: 3, head_dim: 64 };
    for dtype in [Dtype::F16, Dtype::Bf16, Dtype::F8E4M3] {
        let kv = synthetic(shape, dtype, 11);
        for group in [ScaleGroup::PerToken, ScaleGroup::PerTokenHead, ScaleGroup::PerChannel, ScaleGroup::PerTensor] {
            for asymmetric in [false, true] {
                for max in [9u8, 127] {
                    let plan = vec![PlaneKind::Quantized(QuantSpec { group, max, asymmetric }); shape.tensors()];
                    let opts = EncodeOptions { plan: Some(plan), ..Default::default() };
                    let s = vec![encode(&kv, &opts).unwrap()];
                    check(dec, Kind::FlashInfer(false), &s, &format!("{group:?} asym={asymmetric} max={max}"));
                }
            }
        }
    }
}

#[test]
fn real_kv_fixture_matches_at_every_level() {
    let Some(dec) = decoder() else { return };
    let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/smollm2-kernel-doc-320.safetensors")).unwrap();
    let kv = cachegen::interchange::from_safetensors(&bytes).unwrap().kv;
    for dtype in [Dtype::F16, Dtype::Bf16, Dtype::F8E4M3] {
        let kv = if dtype == kv.dtype { kv.clone() } else { convert(&kv, dtype) };
        for level in [Level::Compact, Level::Default, Level::High, Level::Lossless] {
            let whole = vec![encode(&kv, &EncodeOptions::level(level)).unwrap()];
            check(dec, Kind::FlashAttn(false), &whole, &format!("fixture {level:?}"));
            // 256 + 64 tokens, as a connector would chunk it.
            let parts: Vec<Vec<u8>> = [(0, 256), (256, 320)].iter().map(|&(a, b)| encode(&slice_tokens(&kv, a, b), &EncodeOptions::level(level)).unwrap()).collect();
            check(dec, Kind::CrossLayer(true), &parts, &format!("fixture chunks {level:?}"));
        }
    }
}

/// Run a request that must fail; the arena must be untouched when `untouched`.
fn expect_err(dec: &GpuDecoder, streams: &[Vec<u8>], dtype: Dtype, untouched: bool) -> GpuError {
    let s = shape_for(Kind::FlashAttn(false), 77);
    let (layout, size) = make_layout(Kind::FlashAttn(false), s.layers, 16, 16, s.heads, s.head_dim, dtype);
    let arena = dec.gpu().alloc(size).unwrap();
    let garbage: Vec<u8> = (0..size).map(|i| (i * 7 + 3) as u8).collect();
    arena.write(0, &garbage).unwrap();
    let mut dev_layout = layout.clone();
    for b in &mut dev_layout.layer_base {
        *b += arena.ptr() as usize;
    }
    let refs: Vec<&[u8]> = streams.iter().map(|b| b.as_slice()).collect();
    let ids: Vec<Vec<u32>> = (0..streams.len()).map(|i| (0..5).map(|j| (i * 5 + j) as u32).collect()).collect();
    let id_refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
    // SAFETY: the arena holds the whole layout.
    let e = unsafe { dec.decode_into(&refs, &dev_layout, &id_refs, None) }.expect_err("must fail");
    if untouched {
        let mut got = vec![0u8; size];
        arena.read(0, &mut got).unwrap();
        assert!(got == garbage, "a rejected request wrote to the blocks ({e})");
    }
    e
}

fn with_checksum(mut b: Vec<u8>) -> Vec<u8> {
    let n = b.len() - 8;
    let sum = xxhash_rust::xxh3::xxh3_64(&b[..n]);
    b[n..].copy_from_slice(&sum.to_le_bytes());
    b
}

#[test]
fn corrupt_containers_are_rejected() {
    let Some(dec) = decoder() else { return };
    let kv = synthetic(shape_for(Kind::FlashAttn(false), 77), Dtype::F16, 3);
    let good = encode(&kv, &EncodeOptions::level(Level::Default)).unwrap();
    let h = codec::Container::parse(&good, None, Default::default()).unwrap();
    let seg0 = h.layout().segments[0];
    drop(h);
    // A flipped payload byte: the checksum catches it on the host, before launch.
    let mut bad = good.clone();
    bad[seg0.1 - 1] ^= 0x40;
    let e = expect_err(dec, &[good.clone(), bad], Dtype::F16, true);
    assert!(matches!(e, GpuError::Codec { chunk: 1, .. }), "{e}");
    // Truncated.
    let e = expect_err(dec, &[good[..good.len() - 9].to_vec()], Dtype::F16, true);
    assert!(matches!(e, GpuError::Codec { chunk: 0, .. }), "{e}");
    // A lane state below 2^16 with a valid checksum: caught on the host too.
    let mut bad = good.clone();
    bad[seg0.0 + 2..seg0.0 + 4].copy_from_slice(&[0, 0]);
    let e = expect_err(dec, &[with_checksum(bad)], Dtype::F16, true);
    assert!(matches!(e, GpuError::Codec { chunk: 0, .. }), "{e}");
    // Corrupt words with a valid checksum: only decoding can tell; the device
    // reports it (the blocks may then have been written and are discarded).
    let mut bad = good.clone();
    for b in &mut bad[seg0.0 + 4 * 32..seg0.1] {
        *b = b.wrapping_mul(31).wrapping_add(7);
    }
    let bad = with_checksum(bad);
    assert!(codec::decode(&bad, None).is_err(), "the CPU decoder must reject it too");
    let e = expect_err(dec, &[good.clone(), bad], Dtype::F16, false);
    assert!(matches!(e, GpuError::CorruptOnDevice { chunk: 1, .. } | GpuError::Codec { chunk: 1, .. }), "{e}");
    // A layout of another dtype: rejected before launch.
    let e = expect_err(dec, std::slice::from_ref(&good), Dtype::Bf16, true);
    assert!(matches!(e, GpuError::Invalid(_)), "{e}");
}

#[test]
fn streams_with_external_tables_match_the_cpu() {
    let Some(dec) = decoder() else { return };
    for kind in [Kind::FlashAttn(false), Kind::CrossLayer(true), Kind::Mla] {
        for level in [Level::Compact, Level::Default, Level::High, Level::Lossless] {
            // A set calibrated on 8 tokens of another sample (narrow supports:
            // many channels carry patches) and one on 200 tokens (few).
            for (calib_tokens, dtype) in [(8, Dtype::F16), (200, Dtype::F16), (200, Dtype::F8E4M3)] {
                let calib = synthetic(shape_for(kind, calib_tokens), dtype, 4);
                let set = calibrate_tables(&[&calib], &EncodeOptions::level(level)).unwrap();
                let gset = dec.upload_tables(&set).unwrap();
                assert_eq!(gset.id(), set.id());
                let ext = EncodeOptions { tables: Tables::External(&set), ..EncodeOptions::level(level) };
                // Two chunks referencing the set and one with its own tables, in one call.
                let streams = vec![
                    encode(&synthetic(shape_for(kind, 256), dtype, 5), &ext).unwrap(),
                    encode(&synthetic(shape_for(kind, 77), dtype, 6), &ext).unwrap(),
                    encode(&synthetic(shape_for(kind, 40), dtype, 7), &EncodeOptions::level(level)).unwrap(),
                ];
                check_with(dec, kind, &streams, &format!("external tables {level:?} {dtype:?} calibrated on {calib_tokens} tokens"), Some((&set, &gset)));
            }
        }
    }
    // The real fixture: a set calibrated on its first 256 tokens, the last 64 referencing it.
    let bytes = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/smollm2-kernel-doc-320.safetensors")).unwrap();
    let kv = cachegen::interchange::from_safetensors(&bytes).unwrap().kv;
    let mut wide = 0;
    for level in [Level::Compact, Level::Default, Level::High] {
        let set = calibrate_tables(&[&slice_tokens(&kv, 0, 256)], &EncodeOptions::level(level)).unwrap();
        let gset = dec.upload_tables(&set).unwrap();
        // Tables wider than the rows kept in shared memory (64): the kernel
        // reads their rare rows from global memory.
        wide += (gset.max_table_symbols() > 64) as usize;
        let ext = EncodeOptions { tables: Tables::External(&set), ..EncodeOptions::level(level) };
        let streams = vec![encode(&slice_tokens(&kv, 256, 320), &ext).unwrap(), encode(&slice_tokens(&kv, 0, 256), &ext).unwrap()];
        check_with(dec, Kind::FlashAttn(true), &streams, &format!("fixture, external tables {level:?}"), Some((&set, &gset)));
    }
    assert!(wide > 0, "no set had tables wider than the shared rows: the global-row path went untested");
}

#[test]
fn many_batches_alternating_between_two_streams_match_the_cpu() {
    let Some(dec) = decoder() else { return };
    // Every chunk its own batch: batches alternate between the call's stream
    // and the decoder's second one, each waiting for its own copy.
    let mut small = GpuDecoder::new(dec.gpu()).unwrap();
    small.batch_bytes = 1;
    for level in [Level::Default, Level::Lossless] {
        let streams: Vec<Vec<u8>> = (0..7).map(|i| encode(&synthetic(shape_for(Kind::FlashAttn(false), 40 + 31 * i), Dtype::F16, 60 + i as u64), &EncodeOptions::level(level)).unwrap()).collect();
        check(&small, Kind::FlashAttn(false), &streams, &format!("7 batches {level:?}"));
        check(&small, Kind::TrtPool(true), &streams, &format!("7 batches {level:?}"));
    }
}

#[test]
fn external_table_errors_are_the_cpu_decoders() {
    let Some(dec) = decoder() else { return };
    let shape = shape_for(Kind::FlashAttn(false), 64);
    let set = calibrate_tables(&[&synthetic(shape, Dtype::F16, 4)], &EncodeOptions::level(Level::Default)).unwrap();
    let other = calibrate_tables(&[&synthetic(shape, Dtype::F16, 8)], &EncodeOptions::level(Level::Default)).unwrap();
    let gother = dec.upload_tables(&other).unwrap();
    let opts = EncodeOptions { level: Some(Level::Default), tables: Tables::External(&set), ..Default::default() };
    let s = encode(&synthetic(shape, Dtype::F16, 5), &opts).unwrap();
    let e = dec.stage(&[&s]).err().expect("a stream that references a set needs it");
    assert!(matches!(e, GpuError::Codec { chunk: 0, source: codec::Error::MissingTables(_) }), "{e}");
    let e = dec.stage_with_tables(&[&s], Some(&gother)).err().expect("another set is refused");
    assert!(matches!(e, GpuError::Codec { chunk: 0, source: codec::Error::WrongTables { .. } }), "{e}");
}

#[test]
fn one_call_decodes_chunks_of_several_table_sets() {
    let Some(dec) = decoder() else { return };
    // An adaptive load mixes levels, each with its own set (and chunks with
    // embedded tables), in one call: every chunk reads its own set.
    for kind in [Kind::FlashAttn(false), Kind::TrtPool(true), Kind::Mla] {
        let levels = [Level::Compact, Level::Default, Level::High];
        let sets: Vec<codec::TableSet> =
            levels.iter().enumerate().map(|(i, &l)| calibrate_tables(&[&synthetic(shape_for(kind, 40 + 60 * i), Dtype::F16, 70 + i as u64)], &EncodeOptions::level(l)).unwrap()).collect();
        let gsets: Vec<GpuTableSet> = sets.iter().map(|s| dec.upload_tables(s).unwrap()).collect();
        let pairs: Vec<(&codec::TableSet, &GpuTableSet)> = sets.iter().zip(&gsets).collect();
        let mut streams = Vec::new();
        for (i, t) in [256usize, 77, 130, 64, 200, 33].into_iter().enumerate() {
            let l = i % 3;
            let kv = synthetic(shape_for(kind, t), Dtype::F16, 80 + i as u64);
            let opts = if i == 4 { EncodeOptions::level(levels[l]) } else { EncodeOptions { tables: Tables::External(&sets[l]), ..EncodeOptions::level(levels[l]) } };
            streams.push(encode(&kv, &opts).unwrap());
        }
        check_sets(dec, kind, &streams, "three sets and embedded tables in one call", &pairs, true);
    }
}

#[test]
fn layered_decode_completes_layer_events_in_order_with_each_layer_correct() {
    let Some(dec) = decoder() else { return };
    // 12 layers, 3 chunks (the last not a multiple of the block size), f16 and the lossless level.
    for level in [Level::Default, Level::Lossless] {
        let layers = 12;
        let streams: Vec<Vec<u8>> = [256usize, 256, 77]
            .iter()
            .enumerate()
            .map(|(i, &t)| {
                let shape = KvShape { kind: KvKind::KeyValue, layers, tokens: t, heads: 4, head_dim: 64 };
                encode(&synthetic(shape, Dtype::F16, 40 + i as u64), &EncodeOptions::level(level)).unwrap()
            })
            .collect();
        let block_size = 16;
        let per_chunk: Vec<usize> = [256usize, 256, 77].iter().map(|t| t.div_ceil(block_size)).collect();
        let num_blocks = per_chunk.iter().sum::<usize>() + 5;
        let (layout, size) = make_layout(Kind::FlashAttn(false), layers, num_blocks, block_size, 4, 64, Dtype::F16);
        let per_layer = size / layers;
        let mut rnd = xorshift(99);
        let ids = block_ids(&mut rnd, num_blocks, &per_chunk);
        let garbage: Vec<u8> = (0..size).map(|_| (rnd() * 256.0) as u8).collect();
        let mut want = garbage.clone();
        for (b, ids) in streams.iter().zip(&ids) {
            layout.scatter(&mut want, ids, &codec::decode(b, None).unwrap()).unwrap();
        }
        let arena = dec.gpu().alloc(size).unwrap();
        arena.write(0, &garbage).unwrap();
        let mut dev_layout = layout.clone();
        for b in &mut dev_layout.layer_base {
            *b += arena.ptr() as usize;
        }
        let refs: Vec<&[u8]> = streams.iter().map(|b| b.as_slice()).collect();
        let id_refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
        let staged = dec.stage(&refs).unwrap();
        // SAFETY: the arena holds the whole layout and nothing else uses it.
        let events = unsafe { dec.decode_layered(&staged, &dev_layout, &id_refs, None) }.unwrap();
        assert_eq!(events.len(), layers);
        let handles = events.handles();
        assert_eq!(handles.len(), layers);
        assert!(handles.iter().all(|&h| h != 0));
        let mut later_pending = 0;
        for l in 0..layers {
            events.synchronize(l).unwrap();
            for e in 0..=l {
                assert!(events.query(e).unwrap(), "{level:?}: layer {l} done but layer {e} is not");
            }
            if l + 1 < layers && !events.query(layers - 1).unwrap() {
                later_pending += 1;
            }
            let mut got = vec![0u8; per_layer];
            arena.read(l * per_layer, &mut got).unwrap();
            assert!(got == want[l * per_layer..(l + 1) * per_layer], "{level:?}: layer {l} differs once its event completed");
        }
        events.finish().unwrap();
        drop(events);
        let mut got = vec![0u8; size];
        arena.read(0, &mut got).unwrap();
        assert!(got == want, "{level:?}: arena differs after the layered decode");
        println!("{level:?}: {layers} layer events in order, each layer correct at its event (last layer still pending at {later_pending} of them)");
        // The decoder is usable right after (it waits for the layered work first).
        check(dec, Kind::FlashAttn(false), &streams, "after layered");
    }
}

//! GPU encode (issue 5): containers encoded on the GPU straight from paged
//! blocks must equal `codec::encode` of the same chunk byte for byte, over
//! layouts, dtypes, head counts and dims, levels and chunk sizes; GPU
//! encode -> CPU decode and CPU encode -> GPU decode round trips; bad input
//! is an error.
//!
//! On a machine without a GPU every test prints `SKIPPED: no GPU (<reason>)`
//! and passes, so CPU-only CI stays green.

use std::sync::OnceLock;

use cachegen::codec::quant;
use cachegen::codec::{self, encode, Dtype, EncodeOptions, KvKind, KvShape, KvTensors, Level};
use cachegen::gpu::{Gpu, GpuDecoder, GpuEncoder, GpuError};
use cachegen::layout::KvLayout;

static CODERS: OnceLock<Result<(GpuEncoder, GpuDecoder), String>> = OnceLock::new();

/// The shared encoder and decoder, or `None` after printing why the test is skipped.
fn coders() -> Option<&'static (GpuEncoder, GpuDecoder)> {
    let d = CODERS.get_or_init(|| match Gpu::open(0) {
        Ok(g) => {
            eprintln!("GPU: {} (sm_{}{})", g.name(), g.compute_capability().0, g.compute_capability().1);
            let enc = GpuEncoder::new(&g).unwrap_or_else(|e| panic!("GPU present but the encoder failed to start: {e}"));
            let dec = GpuDecoder::new(&g).unwrap_or_else(|e| panic!("GPU present but the decoder failed to start: {e}"));
            Ok((enc, dec))
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
/// outlier channels and attention-sink-like tokens (0 and `tokens / 3`).
fn synthetic(shape: KvShape, dtype: Dtype, seed: u64) -> KvTensors {
    let mut model = xorshift(777 + seed);
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
                    if t == 0 || t == shape.tokens / 3 {
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

#[derive(Clone, Copy, Debug)]
enum Kind {
    FlashAttn(bool),
    FlashInfer(bool),
    CrossLayer(bool),
    TrtPool(bool),
    Mla,
}

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

/// Tokens `t0..t1` of a chunk.
fn slice_tokens(kv: &KvTensors, t0: usize, t1: usize) -> KvTensors {
    let row = kv.shape.channels() * kv.dtype.size();
    KvTensors { shape: KvShape { tokens: t1 - t0, ..kv.shape }, dtype: kv.dtype, tensors: kv.tensors.iter().map(|t| t[t0 * row..t1 * row].to_vec()).collect() }
}

/// Put `kv` into a device arena of `kind` (random garbage elsewhere), cut
/// into chunks of `chunk` tokens over shuffled blocks of `block_size`;
/// encode the chunks on the GPU and each chunk on the CPU; compare.
/// Returns the GPU containers.
fn check(kind: Kind, kv: &KvTensors, chunk: usize, block_size: usize, opts: &EncodeOptions, what: &str) -> Vec<Vec<u8>> {
    check_on(&coders().unwrap().0, kind, kv, chunk, block_size, opts, what)
}

/// [`check`] with a given encoder.
fn check_on(enc: &GpuEncoder, kind: Kind, kv: &KvTensors, chunk: usize, block_size: usize, opts: &EncodeOptions, what: &str) -> Vec<Vec<u8>> {
    let s = kv.shape;
    let cuts: Vec<(usize, usize)> = (0..s.tokens.div_ceil(chunk)).map(|i| (i * chunk, ((i + 1) * chunk).min(s.tokens))).collect();
    let per_chunk: Vec<usize> = cuts.iter().map(|(a, b)| (b - a).div_ceil(block_size)).collect();
    let num_blocks = per_chunk.iter().sum::<usize>() + 5;
    let (layout, size) = make_layout(kind, s.layers, num_blocks, block_size, s.heads, s.head_dim, kv.dtype);
    let mut rnd = xorshift(size as u64 ^ chunk as u64);
    let mut ids: Vec<u32> = (0..num_blocks as u32).collect();
    for i in (1..ids.len()).rev() {
        ids.swap(i, ((rnd() * (i + 1) as f64) as usize).min(i));
    }
    let mut arena: Vec<u8> = (0..size).map(|_| (rnd() * 256.0) as u8).collect();
    let mut chunk_ids = Vec::new();
    let mut at = 0;
    let mut want = Vec::new();
    for (&(a, b), &n) in cuts.iter().zip(&per_chunk) {
        let part = slice_tokens(kv, a, b);
        let bl = ids[at..at + n].to_vec();
        at += n;
        layout.scatter(&mut arena, &bl, &part).unwrap();
        // The CPU reference: encode of what the layout gathers.
        assert_eq!(layout.gather(&arena, &bl, b - a).unwrap().tensors, part.tensors);
        want.push(encode(&part, opts).unwrap());
        chunk_ids.push((bl, b - a));
    }
    let dev = enc.gpu().alloc(size).unwrap();
    dev.write(0, &arena).unwrap();
    let mut dev_layout = layout.clone();
    for b in &mut dev_layout.layer_base {
        *b += dev.ptr() as usize;
    }
    let req: Vec<(&[u32], usize)> = chunk_ids.iter().map(|(b, t)| (b.as_slice(), *t)).collect();
    // SAFETY: the arena holds the whole layout and nothing else uses it.
    let got = unsafe { enc.encode_blocks(&dev_layout, &req, opts, None) }.unwrap_or_else(|e| panic!("{what} {kind:?}: {e}"));
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if g != w {
            let first = g.iter().zip(w.iter()).position(|(a, b)| a != b).unwrap_or(g.len().min(w.len()));
            panic!(
                "{what} {kind:?} {:?} chunk {i}: GPU container ({} bytes) differs from the CPU's ({} bytes) first at byte {first} ({})",
                kv.dtype,
                g.len(),
                w.len(),
                section_of(w, first)
            );
        }
        // GPU encode -> CPU decode.
        let set = match opts.tables {
            codec::Tables::External(set) => Some(set),
            codec::Tables::Embedded => None,
        };
        let back = codec::decode(g, set).unwrap();
        assert_eq!(back.shape.tokens, cuts[i].1 - cuts[i].0);
    }
    got
}

/// Which section of container `b` byte `at` is in (for failure messages).
fn section_of(b: &[u8], at: usize) -> String {
    let Ok(l) = codec::format::parse(b, u64::MAX) else { return "unparsable".into() };
    let h = &l.header;
    if at < 64 {
        return format!("header; CPU header {h:?}");
    }
    if l.scales.contains(&at) {
        return "scales".into();
    }
    if at < l.exact_rows.start {
        return format!("plane descriptors or exact indices ({} exact tokens)", h.exact_tokens);
    }
    if l.exact_rows.contains(&at) {
        return "exact rows".into();
    }
    if l.tables.contains(&at) {
        return format!("tables, byte {} of {}", at - l.tables.start, h.tables_len);
    }
    match l.segments.iter().position(|&(a, e)| a <= at && at < e) {
        Some(k) => format!("payload segment {k} of {}, byte {} of {}", l.segments.len(), at - l.segments[k].0, l.segments[k].1 - l.segments[k].0),
        None => "segment ends or checksum".into(),
    }
}

fn lossy() -> [Level; 3] {
    [Level::Compact, Level::Default, Level::High]
}

#[test]
fn gpu_encode_equals_cpu_encode_across_layouts_dtypes_and_levels() {
    if coders().is_none() {
        return;
    }
    // (kind, layers, heads, head_dim, dtype, tokens, chunk, block size)
    let cases = [
        (Kind::FlashAttn(false), 2, 3, 64, Dtype::F16, 300, 256, 16),
        (Kind::FlashAttn(true), 2, 5, 128, Dtype::Bf16, 200, 96, 16),
        (Kind::FlashInfer(false), 3, 1, 256, Dtype::F32, 77, 77, 8),
        (Kind::FlashInfer(true), 1, 7, 64, Dtype::F16, 513, 256, 32),
        (Kind::CrossLayer(false), 2, 2, 128, Dtype::Bf16, 130, 64, 16),
        (Kind::CrossLayer(true), 2, 3, 64, Dtype::F32, 50, 20, 16),
        (Kind::TrtPool(false), 2, 8, 128, Dtype::F16, 40, 40, 8),
        (Kind::TrtPool(true), 2, 1, 256, Dtype::Bf16, 90, 45, 16),
        (Kind::Mla, 3, 1, 576, Dtype::Bf16, 150, 100, 64),
        (Kind::Mla, 2, 1, 192, Dtype::F16, 33, 33, 16),
    ];
    for (n, &(kind, layers, heads, head_dim, dtype, tokens, chunk, bs)) in cases.iter().enumerate() {
        let shape = KvShape { kind: if matches!(kind, Kind::Mla) { KvKind::Latent } else { KvKind::KeyValue }, layers, tokens, heads, head_dim };
        let kv = synthetic(shape, dtype, 100 + n as u64);
        for level in lossy() {
            check(kind, &kv, chunk, bs, &EncodeOptions::level(level), &format!("case {n} {level:?}"));
        }
    }
}

#[test]
fn gpu_encode_options_profile_outliers_prob_bits_and_tiny_chunks() {
    if coders().is_none() {
        return;
    }
    let shape = KvShape { kind: KvKind::KeyValue, layers: 2, tokens: 260, heads: 3, head_dim: 64 };
    let kv = synthetic(shape, Dtype::F16, 9);
    let profile: Vec<f32> = (0..shape.tensors()).map(|i| 0.5 + 0.37 * i as f32).collect();
    let opts = [
        EncodeOptions { profile: Some(profile), ..EncodeOptions::level(Level::Default) },
        EncodeOptions { protect_outliers: Some(false), ..EncodeOptions::level(Level::Default) },
        EncodeOptions { prob_bits: Some(10), ..EncodeOptions::level(Level::High) },
        EncodeOptions::default(),
    ];
    for (i, o) in opts.iter().enumerate() {
        check(Kind::FlashAttn(false), &kv, 256, 16, o, &format!("options {i}"));
    }
    // Chunks under 8 tokens (no outlier detection) and of 1 token.
    check(Kind::FlashAttn(true), &kv, 7, 4, &EncodeOptions::level(Level::Compact), "7-token chunks");
    check(Kind::FlashInfer(false), &slice_tokens(&kv, 0, 3), 1, 16, &EncodeOptions::level(Level::Default), "1-token chunks");
    // Constant data (a zero step).
    let zero = KvTensors { shape: KvShape { tokens: 40, ..shape }, dtype: Dtype::F16, tensors: vec![vec![0u8; 40 * 192 * 2]; 4] };
    check(Kind::FlashAttn(false), &zero, 40, 16, &EncodeOptions::level(Level::Default), "zeros");
}

#[test]
fn gpu_encode_real_fixture_and_round_trips() {
    let Some((_, dec)) = coders() else { return };
    let kv = cachegen::interchange::from_safetensors(&std::fs::read("fixtures/smollm2-kernel-doc-320.safetensors").unwrap()).unwrap().kv;
    for level in lossy() {
        let streams = check(Kind::FlashAttn(false), &kv, 256, 16, &EncodeOptions::level(level), &format!("fixture {level:?}"));
        // CPU encode (== these bytes) -> GPU decode equals CPU decode.
        let s = kv.shape;
        let (layout, size) = make_layout(Kind::FlashInfer(true), s.layers, 40, 16, s.heads, s.head_dim, kv.dtype);
        let ids: Vec<Vec<u32>> = vec![(0..16).rev().collect(), (20..24).collect()];
        let mut want = vec![0u8; size];
        for (b, ids) in streams.iter().zip(&ids) {
            layout.scatter(&mut want, ids, &codec::decode(b, None).unwrap()).unwrap();
        }
        let arena = dec.gpu().alloc(size).unwrap();
        arena.write(0, &vec![0u8; size]).unwrap();
        let mut dl = layout.clone();
        for b in &mut dl.layer_base {
            *b += arena.ptr() as usize;
        }
        let refs: Vec<&[u8]> = streams.iter().map(|b| b.as_slice()).collect();
        let id_refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
        // SAFETY: the arena holds the whole layout.
        unsafe { dec.decode_into(&refs, &dl, &id_refs, None) }.unwrap();
        let mut got = vec![0u8; size];
        arena.read(0, &mut got).unwrap();
        assert!(got == want, "fixture {level:?}: GPU decode of the GPU-encoded chunks differs from the CPU decode");
    }
}

/// A call cut into many batches (one chunk each: more batches than device
/// arenas in the ring and pinned staging slots, so both are reused) gives
/// the CPU encoder's containers, and a bad chunk in a late batch is reported
/// with its own index.
#[test]
fn gpu_encode_in_many_batches_equals_the_cpu_encoder() {
    let Some((enc, _)) = coders() else { return };
    let small = GpuEncoder::new(enc.gpu()).unwrap().with_batch_symbols(1);
    let kv = cachegen::interchange::from_safetensors(&std::fs::read("fixtures/smollm2-kernel-doc-320.safetensors").unwrap()).unwrap().kv;
    for level in lossy() {
        let opts = EncodeOptions::level(level);
        // 32-token chunks of 320 tokens: 10 chunks, one call, 10 batches.
        let many = check_on(&small, Kind::FlashAttn(false), &kv, 32, 16, &opts, &format!("10 batches {level:?}"));
        let one = check(Kind::FlashAttn(false), &kv, 32, 16, &opts, &format!("1 batch {level:?}"));
        assert_eq!(many.len(), 10);
        assert!(many == one, "{level:?}: containers depend on the batching");
    }
    let (layout, size) = make_layout(Kind::FlashAttn(false), 1, 12, 16, 2, 64, Dtype::F16);
    let kv = synthetic(KvShape { kind: KvKind::KeyValue, layers: 1, tokens: 160, heads: 2, head_dim: 64 }, Dtype::F16, 5);
    let mut bad = kv.clone();
    // Token 7 * 16 + 3: chunk 7 of 10.
    bad.tensors[0][(7 * 16 + 3) * 256 + 10..(7 * 16 + 3) * 256 + 12].copy_from_slice(&half::f16::INFINITY.to_le_bytes());
    let ids: Vec<u32> = (0..10).rev().collect();
    let mut host = vec![0u8; size];
    layout.scatter(&mut host, &ids, &bad).unwrap();
    let dev = enc.gpu().alloc(size).unwrap();
    dev.write(0, &host).unwrap();
    let mut dl = layout.clone();
    dl.layer_base[0] += dev.ptr() as usize;
    let req: Vec<(&[u32], usize)> = ids.chunks(1).map(|b| (b, 16)).collect();
    // SAFETY: the arena holds the layout.
    let e = unsafe { small.encode_blocks(&dl, &req, &EncodeOptions::level(Level::Default), None) }.unwrap_err();
    assert!(matches!(e, GpuError::Codec { chunk: 7, source: codec::Error::NonFinite }), "{e}");
    // The encoder is usable after the failed call.
    host.fill(0);
    layout.scatter(&mut host, &ids, &kv).unwrap();
    dev.write(0, &host).unwrap();
    // SAFETY: as above.
    let got = unsafe { small.encode_blocks(&dl, &req, &EncodeOptions::level(Level::Default), None) }.unwrap();
    for (i, g) in got.iter().enumerate() {
        let want = encode(&slice_tokens(&kv, 16 * i, 16 * i + 16), &EncodeOptions::level(Level::Default)).unwrap();
        assert!(*g == want, "chunk {i} after a failed call differs from the CPU encoder's");
    }
}

#[test]
fn gpu_encode_rejects_bad_input() {
    let Some((enc, _)) = coders() else { return };
    let (layout, size) = make_layout(Kind::FlashAttn(false), 1, 4, 16, 2, 64, Dtype::F16);
    let dev = enc.gpu().alloc(size).unwrap();
    let mut host = vec![0u8; size];
    let kv = synthetic(KvShape { kind: KvKind::KeyValue, layers: 1, tokens: 20, heads: 2, head_dim: 64 }, Dtype::F16, 3);
    let mut bad = kv.clone();
    bad.tensors[1][2 * 17 * 128 + 6..2 * 17 * 128 + 8].copy_from_slice(&half::f16::NAN.to_le_bytes());
    layout.scatter(&mut host, &[2, 0], &bad).unwrap();
    dev.write(0, &host).unwrap();
    let mut dl = layout.clone();
    dl.layer_base[0] += dev.ptr() as usize;
    let opts = EncodeOptions::level(Level::Default);
    // SAFETY (all calls): the arena holds the layout.
    let e = unsafe { enc.encode_blocks(&dl, &[(&[2, 0], 20)], &opts, None) }.unwrap_err();
    assert!(matches!(e, GpuError::Codec { chunk: 0, source: codec::Error::NonFinite }), "{e}");
    assert!(encode(&bad, &opts).is_err());
    let e = unsafe { enc.encode_blocks(&dl, &[(&[2, 9], 20)], &opts, None) }.unwrap_err();
    assert!(matches!(e, GpuError::Invalid(_)), "{e}");
    let e = unsafe { enc.encode_blocks(&dl, &[(&[2], 20)], &opts, None) }.unwrap_err();
    assert!(matches!(e, GpuError::Invalid(_)), "{e}");
    let e = unsafe { enc.encode_blocks(&dl, &[(&[2], 0)], &opts, None) }.unwrap_err();
    assert!(matches!(e, GpuError::Invalid(_)), "{e}");
    let e = unsafe { enc.encode_blocks(&dl, &[(&[2, 0], 20)], &EncodeOptions::level(Level::Lossless), None) }.unwrap_err();
    assert!(matches!(e, GpuError::Unsupported(_)), "{e}");
    let e = unsafe { enc.encode_blocks(&dl, &[(&[2, 0], 20)], &EncodeOptions { profile: Some(vec![1.0]), ..opts.clone() }, None) }.unwrap_err();
    assert!(matches!(e, GpuError::Invalid(_)), "{e}");
}

/// Patch count of a table-set container (None: it carries its own tables).
fn patches(b: &[u8]) -> Option<u32> {
    let l = codec::format::parse(b, u64::MAX).unwrap();
    (l.header.flags & codec::format::FLAG_EXTERNAL_TABLES != 0).then(|| u32::from_le_bytes(b[l.tables.start..l.tables.start + 4].try_into().unwrap()))
}

/// With a model-level table set the GPU gives the CPU encoder's containers:
/// sets calibrated on other data (8 tokens: most channels patched; 200
/// tokens: a few) and on the chunks themselves (no patches), across layouts
/// and levels; GPU encode -> CPU decode with the set (in `check`).
#[test]
fn gpu_encode_with_a_table_set_equals_the_cpu_encoder() {
    if coders().is_none() {
        return;
    }
    let cases = [(Kind::FlashAttn(false), Dtype::F16, 3, 64), (Kind::CrossLayer(true), Dtype::Bf16, 2, 128), (Kind::Mla, Dtype::F16, 1, 192)];
    for (n, &(kind, dtype, heads, head_dim)) in cases.iter().enumerate() {
        let latent = matches!(kind, Kind::Mla);
        let shape = KvShape { kind: if latent { KvKind::Latent } else { KvKind::KeyValue }, layers: 2, tokens: 300, heads, head_dim };
        let kv = synthetic(shape, dtype, 40 + n as u64);
        let other = synthetic(KvShape { tokens: 200, ..shape }, dtype, 90 + n as u64);
        for level in lossy() {
            let opts = EncodeOptions::level(level);
            let sets = [
                ("8 other tokens", codec::calibrate_tables(&[&slice_tokens(&other, 0, 8)], &opts).unwrap()),
                ("200 other tokens", codec::calibrate_tables(&[&other], &opts).unwrap()),
                ("the chunks", codec::calibrate_tables(&[&slice_tokens(&kv, 0, 256), &slice_tokens(&kv, 256, 300)], &opts).unwrap()),
            ];
            for (what, set) in &sets {
                let o = EncodeOptions { tables: codec::Tables::External(set), ..opts.clone() };
                let got = check(kind, &kv, 256, 16, &o, &format!("case {n} {level:?}, set from {what}"));
                let counts: Vec<u32> = got.iter().map(|b| patches(b).expect("a table-set container")).collect();
                match *what {
                    "the chunks" => assert!(counts.iter().all(|&c| c == 0), "{level:?}: patches {counts:?} against a set calibrated on the same chunks"),
                    "8 other tokens" => assert!(counts.iter().all(|&c| c > 0), "{level:?}: no patches against a set from 8 tokens"),
                    _ => {}
                }
            }
        }
    }
}

/// A chunk whose patch has more distinct symbols than the set's precision
/// holds is encoded with embedded tables, as the CPU encoder does, while the
/// other chunk of the same call keeps the set.
#[test]
fn gpu_encode_falls_back_to_embedded_tables_as_the_cpu_does() {
    if coders().is_none() {
        return;
    }
    let shape = KvShape { kind: KvKind::KeyValue, layers: 1, tokens: 4096, heads: 1, head_dim: 64 };
    // Every 8th token cycles through the 255 values (t * 37 + c) mod 255,
    // the others are 0 (64 of the non-zero rows are stored exactly): about
    // 160 distinct symbols per channel at the high level, more than the 128
    // a set of 8-bit precision allows.
    let mut wide = vec![0u8; 4096 * 64 * 2];
    for t in (0..4096).step_by(8) {
        for c in 0..64 {
            let v = (((t * 37 + c) % 255) as f32 - 127.0) / 127.0;
            quant::store(Dtype::F16, &mut wide, t * 64 + c, v);
        }
    }
    // Then 2048 tokens of zeros, which a set calibrated on zeros codes as is.
    let kv = KvTensors { shape: KvShape { tokens: 6144, ..shape }, dtype: Dtype::F16, tensors: vec![[wide, vec![0u8; 2048 * 64 * 2]].concat(); 2] };
    let opts = EncodeOptions::level(Level::High);
    let set = codec::calibrate_tables(&[&slice_tokens(&kv, 4096, 6144)], &opts).unwrap();
    assert_eq!(set.prob_bits, 8);
    let o = EncodeOptions { tables: codec::Tables::External(&set), ..opts };
    // Chunks of 4096 tokens: the wide one, then the 2048 zeros.
    let got = check(Kind::FlashAttn(false), &kv, 4096, 16, &o, "fallback");
    assert_eq!(patches(&got[0]), None, "the wide chunk should carry its own tables");
    assert_eq!(patches(&got[1]), Some(0), "the chunk the set was calibrated on");
}

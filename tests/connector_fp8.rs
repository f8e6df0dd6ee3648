//! FP8 E4M3 KV caches through the connector on host memory: the real KV
//! fixture converted to e4m3 (as an engine with `--kv-cache-dtype fp8` and
//! unit scales would hold it) is stored from a vLLM layout and loaded into
//! another layout and a TensorRT-LLM pool. Lossy levels come back within half
//! a step plus half an fp8 ulp of the stored values; the lossless level
//! byte-exact. The dtype names the namespace accepts, and that FP8 chunks and
//! f16 layouts do not mix.

use std::sync::Arc;
use std::time::Duration;

use cachegen::codec::fp8::f32_to_e4m3;
use cachegen::codec::format::PlaneKind;
use cachegen::codec::{self, Dtype, EncodeOptions, KvTensors, Level};
use cachegen::connector::{Config, Context};
use cachegen::pipeline::Stage;

#[path = "common/engine.rs"]
mod engine;
use engine::*;

fn config(kv_dtype: &str, level: &str) -> String {
    format!(
        r#"{{"namespace": {{"model": "smollm2-test", "kv_dtype": "{kv_dtype}", "block_size": {BS}}}, "chunk_tokens": {CHUNK}, "level": "{level}", "decode_threads": 2}}"#
    )
}

/// The fixture's values as e4m3 bytes (round to nearest even, saturating).
fn fp8_fixture() -> KvTensors {
    let kv = fixture();
    let tensors = (0..kv.tensors.len()).map(|i| kv.tensor_f32(i).into_iter().map(f32_to_e4m3).collect()).collect();
    KvTensors { shape: kv.shape, dtype: Dtype::F8E4M3, tensors }
}

/// Stores `kv`'s first `chunks` chunks from a vLLM NHD layout, then loads them
/// into an HND layout and a TensorRT-LLM pool with another block order;
/// returns what each destination holds.
fn store_and_load(ctx: &Context, kv: &KvTensors, chunks: usize, seed: u32) -> Vec<KvTensors> {
    let n_tok = chunks * CHUNK;
    let n_blocks = n_tok / BS;
    let toks = tokens(n_tok, seed);
    let mut src = Engine::vllm(kv, 2 * n_blocks, false);
    let src_blocks: Vec<u32> = (0..n_blocks as u32).map(|i| 2 * n_blocks as u32 - 1 - 2 * i).collect();
    src.fill(kv, &src_blocks, n_tok);
    let job = unsafe { ctx.store(Arc::clone(&src.layout), &toks, &src_blocks, b"") }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(120))));
    let p = job.progress();
    assert_eq!((p.chunks_ok, p.chunks_failed), (chunks, 0), "{:?}", p.errors);
    assert_eq!(ctx.lookup(&toks, b"", None).tokens, n_tok);

    let dst_blocks: Vec<u32> = (0..n_blocks as u32).map(|i| (i * 7 + 3) % n_blocks as u32).collect();
    let mut out = Vec::new();
    for mut dst in [Engine::vllm(kv, n_blocks, true), Engine::trtllm(kv, n_blocks)] {
        let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &dst_blocks, 0, b"", 0) }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(120))));
        let p = job.progress();
        assert_eq!((p.chunks_ok, p.chunks_failed), (chunks, 0), "{:?}", p.errors);
        assert!(p.failed_blocks.is_empty());
        out.push(dst.read(&dst_blocks, n_tok));
        dst.bufs.clear();
    }
    out
}

/// Each loaded value is within half a quantization step (plus the encoder's
/// f32 rounding, as in codec_roundtrip.rs) plus half an fp8 ulp of the stored
/// value; exact tokens are byte-exact.
fn assert_within_half_a_step(kv: &KvTensors, got: &KvTensors, level: Level) {
    assert_eq!((got.shape, got.dtype), (kv.shape, kv.dtype));
    let (c, d) = (kv.shape.channels(), kv.shape.head_dim);
    let chunks = kv.shape.tokens / CHUNK;
    let mut checked = 0usize;
    for chunk in 0..chunks {
        let part = slice_tokens(kv, chunk * CHUNK, (chunk + 1) * CHUNK);
        let loaded = slice_tokens(got, chunk * CHUNK, (chunk + 1) * CHUNK);
        let bytes = codec::encode(&part, &EncodeOptions::level(level)).unwrap();
        let container = codec::Container::parse(&bytes, None, Default::default()).unwrap();
        let exact = container.exact_tokens().to_vec();
        for (i, plane) in container.planes().iter().enumerate() {
            let PlaneKind::Quantized(spec) = plane else { panic!("lossy plane expected") };
            let params = container.group_params(i, spec);
            let (orig, out) = (part.tensor_f32(i), loaded.tensor_f32(i));
            for t in 0..CHUNK {
                if exact.contains(&t) {
                    assert_eq!(loaded.tensors[i][t * c..(t + 1) * c], part.tensors[i][t * c..(t + 1) * c], "exact token {t}");
                    continue;
                }
                for ch in 0..c {
                    let p = params[spec.group.index(t, ch, c, d)];
                    let (a, b) = (orig[t * c + ch], out[t * c + ch]);
                    assert!(b.is_finite() && b.abs() <= 448.0, "chunk {chunk} tensor {i}: {b} is not a finite e4m3 value");
                    // Half an e4m3 ulp: 1/16 relative (3 mantissa bits), 2^-10 absolute for subnormals.
                    let bound = p.step * (0.5 + 1.0 / 65536.0) + b.abs().max(1e-4) / 16.0 + 1.0 / 1024.0;
                    assert!((a - b).abs() <= bound, "chunk {chunk} tensor {i} t {t} c {ch}: |{a} - {b}| > {bound} (step {})", p.step);
                    checked += 1;
                }
            }
        }
    }
    assert!(checked > kv.tensors.len() * kv.shape.tokens * c / 2, "only {checked} values checked");
}

#[test]
fn fp8_lossy_levels_store_and_load_within_half_a_step() {
    let kv = slice_tokens(&fp8_fixture(), 0, 3 * CHUNK);
    // The fixture's range fits e4m3 well: most values are normal, not zero.
    let nonzero = kv.tensors.iter().flatten().filter(|&&b| b & 0x7F != 0).count();
    assert!(nonzero * 10 > kv.tensors.iter().map(Vec::len).sum::<usize>() * 9, "fp8 fixture mostly zero");
    for (level, seed) in [(Level::Compact, 11), (Level::Default, 12), (Level::High, 13)] {
        let ctx = Context::from_json(&config("fp8", level.name())).unwrap();
        let want = expected(&kv, 3, level);
        for got in store_and_load(&ctx, &kv, 3, seed) {
            // What the codec decodes, byte for byte, whichever layout it went through...
            assert_eq!(got, want, "level {}: loaded bytes differ from the codec's decoded output", level.name());
            // ...and that is close to the stored fp8 values.
            assert_within_half_a_step(&kv, &got, level);
        }
        assert_ne!(want, kv, "level {} should be lossy on this data", level.name());
    }
}

#[test]
fn fp8_lossless_level_loads_the_stored_bytes() {
    let kv = slice_tokens(&fp8_fixture(), 0, 2 * CHUNK);
    let ctx = Context::from_json(&config("float8_e4m3fn", "lossless")).unwrap();
    for got in store_and_load(&ctx, &kv, 2, 21) {
        assert_eq!(got, kv, "lossless fp8 must be byte-exact");
    }
    // Every byte value survives, NaN (0x7F, 0xFF) and -0 included.
    let mut all = kv.clone();
    all.shape.tokens = CHUNK;
    for (i, t) in all.tensors.iter_mut().enumerate() {
        t.truncate(CHUNK * kv.shape.channels());
        for (j, b) in t.iter_mut().enumerate() {
            *b = (j * 31 + i * 7) as u8;
        }
    }
    for got in store_and_load(&ctx, &all, 1, 22) {
        assert_eq!(got, all, "lossless fp8 must keep every byte value");
    }
}

#[test]
fn fp8_dtype_names_share_one_namespace_and_e5m2_is_refused() {
    for name in ["fp8", "fp8_e4m3", "f8e4m3", "float8_e4m3fn"] {
        let c = Config::from_json(&config(name, "default")).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(c.dtype(), Dtype::F8E4M3, "{name}");
        assert_eq!(c.key_namespace().kv_dtype, "f8e4m3", "{name}");
    }
    for name in ["fp8_e5m2", "float8_e5m2"] {
        let e = Config::from_json(&config(name, "default")).unwrap_err();
        assert!(e.contains("E5M2") && e.contains("not supported"), "{name}: {e}");
    }
    let e = Config::from_json(&config("int8", "default")).unwrap_err();
    assert!(e.contains("fp8"), "{e}");

    // Stored through one alias, found and loaded through another.
    let kv = slice_tokens(&fp8_fixture(), 0, CHUNK);
    let dir = tempfile::tempdir().unwrap();
    let with_disk = |name: &str| {
        let cfg = config(name, "default").replace(r#""decode_threads": 2"#, &format!(r#""decode_threads": 2, "tiers": {{"disk": {{"path": "{}", "bytes": 100000000}}}}"#, dir.path().display()));
        Context::from_json(&cfg).unwrap()
    };
    let a = with_disk("fp8");
    let toks = tokens(CHUNK, 31);
    let mut src = Engine::vllm(&kv, 4, false);
    let blocks: Vec<u32> = (0..4).collect();
    src.fill(&kv, &blocks, CHUNK);
    let job = unsafe { a.store(Arc::clone(&src.layout), &toks, &blocks, b"") }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(job.progress().chunks_ok, 1);
    drop(a);
    let b = with_disk("float8_e4m3fn");
    assert_eq!(b.lookup(&toks, b"", None).tokens, CHUNK);
    // An f16 namespace does not see fp8 chunks.
    let f16 = Context::from_json(&config("f16", "default").replace(r#""decode_threads": 2"#, &format!(r#""decode_threads": 2, "tiers": {{"disk": {{"path": "{}", "bytes": 100000000}}}}"#, dir.path().display()))).unwrap();
    assert_eq!(f16.lookup(&toks, b"", None).tokens, 0);
    // An f16 layout is refused by an fp8 context, and an fp8 layout by an f16 one.
    let f16_kv = fixture();
    let f16_engine = Engine::vllm(&f16_kv, 4, false);
    assert!(unsafe { b.load(Arc::clone(&f16_engine.layout), &toks, &blocks, 0, b"", 0) }.is_err());
    assert!(unsafe { f16.store(Arc::clone(&src.layout), &toks, &blocks, b"") }.is_err());
    src.bufs.clear();
}

//! GPU decode benchmark (issue 5): a Llama-3-8B-shaped KV cache (32 layers,
//! 8 KV heads, head_dim 128) built by tiling the real SmolLM2 fixture (30
//! layers x 3 heads x 64 dims x 320 tokens; layer, head, dim and token
//! indices wrap around), cut into 256-token chunks and encoded on the CPU at
//! the default level, then decoded on the GPU into vLLM FlashAttention NHD
//! paged blocks (block size 16, shuffled block ids).
//!
//! Since 5 x 256 = 4 x 320 tokens, the tiled cache repeats every 5 chunks:
//! only 5 distinct chunks are encoded and their bytes reused, but every chunk
//! is staged, copied and decoded separately.
//!
//! Measured, per cache size: host staging (validation + layout in pinned
//! memory); the fused decode kernels alone (data already on the device);
//! end to end from pinned host memory (H2D of the compressed bytes overlapped
//! with decoding); a device-to-device copy of the output size and a pinned
//! H2D of the staged bytes, in the same run; the layered (stream-ordered)
//! decode's first and last layer events; and the CPU decoder. The 8K
//! result is compared byte for byte with CPU decode + scatter.
//!
//! Encode (GpuEncoder): the same cache put into the paged blocks, encoded
//! on the GPU straight from the blocks at the default level; every container
//! is compared byte for byte with the CPU encoder's; kernels alone (device
//! events) and end to end (including the device-to-host copy of the
//! containers and the host's header and hashes); the CPU encoder in the
//! same run (one thread and all threads).
//!
//! With `--tables-from KV.safetensors` (another text's KV), the decode rows
//! are measured twice in the same run: chunks with their own (embedded)
//! tables, and chunks referencing a model-level table set calibrated on that
//! text (tiled the same way), uploaded once as prebuilt lookups.
//! `--level` picks the level (default: the default level).
//!
//! Usage: cachegen-gpu-bench [--fixture PATH] [--tokens 8192,32768] [--repeat N] [--out FILE.json] [--skip-decode] [--skip-encode] [--encode-batch-symbols N]
//!        [--level compact|default|high|lossless] [--tables-from PATH] [--batch-mb N (the decoder's batch size, default 32)] [--set-only]
//!        [--dtype bf16|f32|fp8 (decode into blocks of that type; fp8 skips encode)]

use std::time::Instant;

use cachegen::codec::{self, calibrate_tables, encode, Container, Dtype, EncodeOptions, KvKind, KvShape, KvTensors, Level, TableSet, Tables};
use cachegen::gpu::{Gpu, GpuDecoder, GpuEncoder, GpuError};
use cachegen::layout::KvLayout;
use serde_json::json;

const LAYERS: usize = 32;
const HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const CHUNK: usize = 256;
const BLOCK: usize = 16;

fn tile(src: &KvTensors, t0: usize, tokens: usize) -> KvTensors {
    let s = src.shape;
    let e = src.dtype.size();
    let c = HEADS * HEAD_DIM;
    let mut tensors = Vec::with_capacity(LAYERS * 2);
    for l in 0..LAYERS {
        for st in 0..2 {
            let from = &src.tensors[(l % s.layers) * 2 + st];
            let mut out = vec![0u8; tokens * c * e];
            for t in 0..tokens {
                let ts = (t0 + t) % s.tokens;
                for h in 0..HEADS {
                    for d in 0..HEAD_DIM {
                        let cs = (h % s.heads) * s.head_dim + d % s.head_dim;
                        let si = (ts * s.channels() + cs) * e;
                        let di = (t * c + h * HEAD_DIM + d) * e;
                        out[di..di + e].copy_from_slice(&from[si..si + e]);
                    }
                }
            }
            tensors.push(out);
        }
    }
    KvTensors { shape: KvShape { kind: KvKind::KeyValue, layers: LAYERS, tokens, heads: HEADS, head_dim: HEAD_DIM }, dtype: src.dtype, tensors }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn shuffled(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    let mut v: Vec<u32> = (0..n as u32).collect();
    for i in (1..n).rev() {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        v.swap(i, (s % (i as u64 + 1)) as usize);
    }
    v
}

fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let fixture = arg("--fixture").unwrap_or_else(|| "fixtures/smollm2-kernel-doc-320.safetensors".into());
    let sizes: Vec<usize> = arg("--tokens").unwrap_or_else(|| "8192,32768".into()).split(',').map(|s| s.parse().unwrap()).collect();
    let repeat: usize = arg("--repeat").map(|s| s.parse().unwrap()).unwrap_or(10);
    let out = arg("--out");
    let skip_decode = args.iter().any(|a| a == "--skip-decode");
    let skip_encode = args.iter().any(|a| a == "--skip-encode");
    let level = match arg("--level") {
        Some(l) => Level::parse(&l)?,
        None => Level::Default,
    };
    let tables_from = arg("--tables-from");

    let gpu = match Gpu::open(0) {
        Ok(g) => g,
        Err(GpuError::NoGpu(r)) => {
            println!("SKIPPED: no GPU ({r})");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    let t = Instant::now();
    let mut dec = GpuDecoder::new(&gpu)?;
    if let Some(mb) = arg("--batch-mb") {
        dec.batch_bytes = mb.parse::<usize>()? << 20;
    }
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let (maj, min) = gpu.compute_capability();
    println!("device: {} (sm_{maj}{min}, {} SMs); kernels compiled in {compile_ms:.0} ms (NVRTC {:?})", gpu.name(), gpu.multiprocessors(), cachegen::gpu::nvrtc::version()?);

    let src = cachegen::interchange::from_safetensors(&std::fs::read(&fixture)?)?.kv;
    // --dtype: decode into blocks of another element type (the fixture's
    // values converted first; the GPU encoder takes f16, bf16 and f32 only).
    let src = match arg("--dtype") {
        Some(name) => {
            let dtype = cachegen::connector::config::parse_dtype(&name).ok_or(format!("unknown --dtype {name}"))?;
            let tensors = (0..src.tensors.len())
                .map(|i| {
                    let v = src.tensor_f32(i);
                    let mut out = vec![0u8; v.len() * dtype.size()];
                    cachegen::codec::quant::store_row(dtype, &v, &mut out);
                    out
                })
                .collect();
            KvTensors { shape: src.shape, dtype, tensors }
        }
        None => src,
    };
    let skip_encode = skip_encode || src.dtype == Dtype::F8E4M3;
    let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    // The 5 distinct chunks of the tiled cache.
    let t = Instant::now();
    let distinct: Vec<Vec<u8>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..5).map(|i| {
            let src = &src;
            s.spawn(move || encode(&tile(src, i * CHUNK, CHUNK), &EncodeOptions::level(level)).unwrap())
        }).collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let encode_s = t.elapsed().as_secs_f64();
    let chunk_syms = (LAYERS * 2 * CHUNK * HEADS * HEAD_DIM) as f64;
    let ratio = chunk_syms * 2.0 * 5.0 / distinct.iter().map(|b| b.len()).sum::<usize>() as f64;
    println!("encoded 5 distinct {CHUNK}-token chunks in {encode_s:.2} s; {:.2} MB each on average, {ratio:.2}x vs f16", distinct.iter().map(|b| b.len()).sum::<usize>() as f64 / 5e6);

    // CPU decoder reference: one chunk on one thread, and all threads.
    let t = Instant::now();
    let reps = 3;
    for i in 0..reps {
        std::hint::black_box(codec::decode(&distinct[i % 5], None)?);
    }
    let cpu_1t = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    let njobs = threads * 2;
    std::thread::scope(|s| {
        for i in 0..threads {
            let distinct = &distinct;
            s.spawn(move || {
                for j in (i..njobs).step_by(threads) {
                    std::hint::black_box(codec::decode(&distinct[j % 5], None).unwrap());
                }
            });
        }
    });
    let cpu_all = t.elapsed().as_secs_f64() / njobs as f64;
    println!(
        "CPU decode: {:.3} Gsym/s on 1 thread, {:.3} Gsym/s on {threads} threads",
        chunk_syms / cpu_1t / 1e9,
        chunk_syms / cpu_all / 1e9
    );

    // Model-level tables: calibrated on another text's KV, tiled the same way.
    let mut model_tables: Option<(TableSet, Vec<Vec<u8>>, cachegen::gpu::GpuTableSet)> = None;
    if let Some(path) = &tables_from {
        let calib = cachegen::interchange::from_safetensors(&std::fs::read(path)?)?.kv;
        let n = (calib.shape.tokens / CHUNK).max(1);
        let chunks: Vec<KvTensors> = (0..n).map(|i| tile(&calib, i * CHUNK, CHUNK)).collect();
        let refs: Vec<&KvTensors> = chunks.iter().collect();
        let t = Instant::now();
        let set = calibrate_tables(&refs, &EncodeOptions::level(level))?;
        let ext: Vec<Vec<u8>> = (0..5).map(|i| encode(&tile(&src, i * CHUNK, CHUNK), &EncodeOptions { tables: Tables::External(&set), ..EncodeOptions::level(level) })).collect::<Result<_, _>>()?;
        let gset = dec.upload_tables(&set)?;
        let r = chunk_syms * 2.0 * 5.0 / ext.iter().map(|b| b.len()).sum::<usize>() as f64;
        println!(
            "model-level tables calibrated on {n} chunks of {path} ({} bytes stored, {:.1} MB of device lookups) in {:.2} s; chunks referencing them: {:.2} MB each on average, {r:.2}x vs f16",
            set.to_bytes().len(),
            gset.device_bytes() as f64 / 1e6,
            t.elapsed().as_secs_f64(),
            ext.iter().map(|b| b.len()).sum::<usize>() as f64 / 5e6
        );
        model_tables = Some((set, ext, gset));
    }
    let mut variants: Vec<DecodeVariant> = vec![("embedded tables", &distinct, None, None)];
    if let Some((set, ext, gset)) = &model_tables {
        variants.push(("model-level tables", ext, Some(set), Some(gset)));
        // --set-only: decode only the table-set chunks (e.g. to profile them).
        if args.iter().any(|a| a == "--set-only") {
            variants.remove(0);
        }
    }

    let mut results = Vec::new();
    for &(variant, distinct, set, gset) in variants.iter().filter(|_| !skip_decode) {
    for &tokens in sizes.iter() {
        let nchunks = tokens / CHUNK;
        let streams: Vec<&[u8]> = (0..nchunks).map(|c| distinct[c % 5].as_slice()).collect();
        println!("== decode, {variant}, {tokens} tokens");
        let num_blocks = tokens / BLOCK;
        let per_layer = 2 * num_blocks * BLOCK * HEADS * HEAD_DIM * src.dtype.size();
        let arena = gpu.alloc(per_layer * LAYERS)?;
        let layout = KvLayout::vllm_flash_attn((0..LAYERS).map(|l| arena.ptr() as usize + l * per_layer).collect(), num_blocks, BLOCK, HEADS, HEAD_DIM, src.dtype, false)?;
        let perm = shuffled(num_blocks, tokens as u64);
        let ids: Vec<&[u32]> = perm.chunks(CHUNK / BLOCK).collect();

        let mut stage_ms = Vec::new();
        let mut staged = None;
        for _ in 0..3 {
            let t = Instant::now();
            staged = Some(dec.stage_with_tables(&streams, gset)?);
            stage_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let staged = staged.unwrap();
        let syms = staged.symbols() as f64;
        println!("{tokens} tokens: at most {} non-zero symbols in a table", staged.max_table_symbols());
        let out_bytes = staged.output_bytes() as f64;

        // End to end from pinned memory (first call allocates; not timed).
        // SAFETY: the arena holds the whole layout; nothing else uses it.
        unsafe { dec.decode_staged(&staged, &layout, &ids, None)? };
        let (mut e2e_wall, mut e2e_gpu) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            let t = Instant::now();
            // SAFETY: as above.
            let tm = unsafe { dec.decode_staged(&staged, &layout, &ids, None)? };
            e2e_wall.push(t.elapsed().as_secs_f64() * 1e3);
            e2e_gpu.push(tm.gpu_ms as f64);
        }
        // Kernels alone.
        let mut kern = Vec::new();
        for _ in 0..repeat {
            // SAFETY: as above.
            let t = Instant::now();
            let tm = unsafe { dec.decode_resident(&staged, &layout, &ids, None)? };
            let wall = t.elapsed().as_secs_f64() * 1e3;
            kern.push(if tm.gpu_ms.is_nan() { wall } else { tm.gpu_ms as f64 });
        }
        // Layered (stream-ordered, one event per layer) from pinned memory:
        // host wall clock until layer 0's event and until the last layer's.
        let (mut lay_first, mut lay_last) = (Vec::new(), Vec::new());
        for _ in 0..repeat {
            let t = Instant::now();
            // SAFETY: as above.
            let ev = unsafe { dec.decode_layered(&staged, &layout, &ids, None)? };
            ev.synchronize(0)?;
            lay_first.push(t.elapsed().as_secs_f64() * 1e3);
            ev.finish()?;
            lay_last.push(t.elapsed().as_secs_f64() * 1e3);
        }
        // The same with the whole cache staged as one batch (a second decoder
        // with unbounded batches): each layer's launch then covers every chunk.
        let (mut lay1_first, mut lay1_last) = (Vec::new(), Vec::new());
        {
            let mut dec1 = GpuDecoder::new(&gpu)?;
            dec1.batch_bytes = usize::MAX;
            let staged1 = dec1.stage_with_tables(&streams, gset)?;
            for _ in 0..repeat {
                let t = Instant::now();
                // SAFETY: as above.
                let ev = unsafe { dec1.decode_layered(&staged1, &layout, &ids, None)? };
                ev.synchronize(0)?;
                lay1_first.push(t.elapsed().as_secs_f64() * 1e3);
                ev.finish()?;
                lay1_last.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        println!(
            "{tokens} tokens: layered, one batch: layer 0 ready at {:.2} ms, all at {:.2} ms",
            median(lay1_first.clone()),
            median(lay1_last.clone())
        );
        // References in the same run: D2D copy of the output size, pinned H2D of the staged bytes.
        let copy_dst = gpu.alloc(out_bytes as usize)?;
        let mut d2d = Vec::new();
        for _ in 0..repeat {
            d2d.push(dec.timed_copy(&copy_dst, &arena, out_bytes as usize)? as f64);
        }
        drop(copy_dst);
        let pinned = gpu.alloc_pinned(staged.staged_bytes())?;
        let h2d_dst = gpu.alloc(staged.staged_bytes())?;
        let mut h2d = Vec::new();
        for _ in 0..repeat {
            h2d.push(dec.timed_upload(&h2d_dst, &pinned)? as f64);
        }
        drop((pinned, h2d_dst));

        // Correctness at scale (8K only: the CPU reference takes a while).
        let mut verified = serde_json::Value::Null;
        if tokens <= 8192 {
            let host_layout = KvLayout { layer_base: (0..LAYERS).map(|l| l * per_layer).collect(), ..layout.clone() };
            let mut want = vec![0u8; per_layer * LAYERS];
            arena.read(0, &mut want)?; // untouched bytes: whatever the GPU left there
            for (c, s) in streams.iter().enumerate() {
                host_layout.scatter(&mut want, ids[c], &Container::parse(s, set, Default::default())?.decode()?)?;
            }
            let mut got = vec![0u8; per_layer * LAYERS];
            arena.read(0, &mut got)?;
            let same = got == want;
            println!("{tokens} tokens: GPU output {} CPU decode + scatter", if same { "identical to" } else { "DIFFERS from" });
            verified = json!(same);
        }

        let k = median(kern.clone());
        let e = median(e2e_wall.clone());
        let r = json!({
            "variant": variant,
            "tokens": tokens,
            "chunks": nchunks,
            "symbols": syms,
            "compressed_bytes": staged.compressed_bytes(),
            "staged_bytes": staged.staged_bytes(),
            "output_bytes": out_bytes,
            "stage_host_ms_median": median(stage_ms.clone()),
            "max_table_symbols": staged.max_table_symbols(),
            "kernel_ms_median": k,
            "kernel_ms_all": kern,
            "kernel_gsym_s": syms / k / 1e6,
            "kernel_output_gb_s": out_bytes / k / 1e6,
            "e2e_wall_ms_median": e,
            "e2e_wall_ms_all": e2e_wall,
            "e2e_gpu_ms_median": median(e2e_gpu.clone()),
            "layered_first_layer_ms_median": median(lay_first.clone()),
            "layered_all_layers_ms_median": median(lay_last.clone()),
            "layered_one_batch_first_layer_ms_median": median(lay1_first.clone()),
            "layered_one_batch_all_layers_ms_median": median(lay1_last.clone()),
            "d2d_copy_ms_median": median(d2d.clone()),
            "d2d_copy_gb_s_read_plus_write": 2.0 * out_bytes / median(d2d.clone()) / 1e6,
            "h2d_pinned_ms_median": median(h2d.clone()),
            "h2d_pinned_gb_s": staged.staged_bytes() as f64 / median(h2d.clone()) / 1e6,
            "cpu_decode_ms_1_thread_estimate": cpu_1t * 1e3 * nchunks as f64,
            "cpu_decode_ms_all_threads_estimate": cpu_all * 1e3 * nchunks as f64,
            "verified_against_cpu": verified,
        });
        println!(
            "{tokens} tokens ({nchunks} chunks, {:.1} MB compressed, {:.2} GB out): kernels {k:.2} ms = {:.1} Gsym/s, {:.0} GB/s out; \
             end to end from pinned {e:.2} ms (GPU events {:.2} ms); layered: layer 0 ready at {:.2} ms, all at {:.2} ms; D2D copy of the output {:.2} ms ({:.0} GB/s r+w); \
             pinned H2D {:.2} ms ({:.1} GB/s); host staging {:.0} ms; CPU decode {:.0} ms on {threads} threads",
            staged.compressed_bytes() as f64 / 1e6,
            out_bytes / 1e9,
            syms / k / 1e6,
            out_bytes / k / 1e6,
            median(e2e_gpu),
            median(lay_first),
            median(lay_last),
            median(d2d.clone()),
            2.0 * out_bytes / median(d2d) / 1e6,
            median(h2d.clone()),
            staged.staged_bytes() as f64 / median(h2d) / 1e6,
            median(stage_ms),
            cpu_all * 1e3 * nchunks as f64,
        );
        results.push(r);
    }
    }
    let encode_results = if skip_encode {
        Vec::new()
    } else {
        let mut variants: Vec<EncodeVariant> = vec![("embedded tables", &distinct, None)];
        if let Some((set, ext, _)) = &model_tables {
            variants.push(("model-level tables", ext, Some(set)));
        }
        bench_encode(&gpu, &src, &variants, &sizes, repeat, threads, level, arg("--encode-batch-symbols").map(|s| s.parse()).transpose()?)?
    };
    let doc = json!({
        "device": gpu.name(),
        "compute_capability": format!("{maj}.{min}"),
        "multiprocessors": gpu.multiprocessors(),
        "kernel_compile_ms": compile_ms,
        "fixture": fixture,
        "shape": {"layers": LAYERS, "kv_heads": HEADS, "head_dim": HEAD_DIM, "chunk_tokens": CHUNK, "block_size": BLOCK, "dtype": "f16", "layout": "vLLM flash-attn NHD"},
        "level": level.name(),
        "batch_bytes": dec.batch_bytes,
        "compression_ratio_vs_f16": ratio,
        "cpu_threads": threads,
        "cpu_decode_gsym_s_1_thread": chunk_syms / cpu_1t / 1e9,
        "cpu_decode_gsym_s_all_threads": chunk_syms / cpu_all / 1e9,
        "results": results,
        "encode_results": encode_results,
    });
    let text = serde_json::to_string_pretty(&doc)?;
    if let Some(p) = out {
        std::fs::write(&p, &text)?;
        println!("wrote {p}");
    } else {
        println!("{text}");
    }
    Ok(())
}

/// A decode variant: name, the 5 distinct containers, their table set on the
/// host and on the device (none: embedded tables).
type DecodeVariant<'a> = (&'a str, &'a [Vec<u8>], Option<&'a TableSet>, Option<&'a cachegen::gpu::GpuTableSet>);
/// An encode variant: name, the CPU encoder's 5 distinct containers, the
/// table set (none: embedded tables).
type EncodeVariant<'a> = (&'a str, &'a [Vec<u8>], Option<&'a TableSet>);

/// GPU encode straight from paged blocks vs the CPU encoder (see the top).
/// One row per (variant, size); a variant is (name, the CPU encoder's 5
/// distinct containers, the table set or none for embedded tables).
#[allow(clippy::too_many_arguments)]
fn bench_encode(gpu: &Gpu, src: &KvTensors, variants: &[EncodeVariant], sizes: &[usize], repeat: usize, threads: usize, level: Level, batch_symbols: Option<u64>) -> Result<Vec<serde_json::Value>, Box<dyn std::error::Error>> {
    let t = Instant::now();
    let mut enc = GpuEncoder::new(gpu)?;
    if let Some(n) = batch_symbols {
        enc = enc.with_batch_symbols(n);
    }
    println!("encode kernels compiled in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    let mut results = Vec::new();
    for &(variant, distinct, set) in variants {
        let opts = EncodeOptions { tables: set.map_or(Tables::Embedded, Tables::External), ..EncodeOptions::level(level) };
        println!("encode, {variant}:");
        let chunks: Vec<KvTensors> = (0..5).map(|i| tile(src, i * CHUNK, CHUNK)).collect();
        let chunk_syms = (LAYERS * 2 * CHUNK * HEADS * HEAD_DIM) as f64;
        // CPU encoder in the same run: one chunk on one thread, and all threads.
        let reps = 3;
        let t = Instant::now();
        for i in 0..reps {
            std::hint::black_box(encode(&chunks[i % 5], &opts)?);
        }
        let cpu_1t = t.elapsed().as_secs_f64() / reps as f64;
        let njobs = threads * 2;
        let t = Instant::now();
        std::thread::scope(|s| {
            for i in 0..threads {
                let (chunks, opts) = (&chunks, &opts);
                s.spawn(move || {
                    for j in (i..njobs).step_by(threads) {
                        std::hint::black_box(encode(&chunks[j % 5], opts).unwrap());
                    }
                });
            }
        });
        let cpu_all = t.elapsed().as_secs_f64() / njobs as f64;
        println!("CPU encode: {:.3} Gsym/s on 1 thread, {:.3} Gsym/s on {threads} threads", chunk_syms / cpu_1t / 1e9, chunk_syms / cpu_all / 1e9);
        for &tokens in sizes {
            let nchunks = tokens / CHUNK;
            let num_blocks = tokens / BLOCK;
            let per_layer = 2 * num_blocks * BLOCK * HEADS * HEAD_DIM * 2;
            let host_layout = KvLayout::vllm_flash_attn((0..LAYERS).map(|l| l * per_layer).collect(), num_blocks, BLOCK, HEADS, HEAD_DIM, Dtype::F16, false)?;
            let perm = shuffled(num_blocks, tokens as u64 + 1);
            let ids: Vec<&[u32]> = perm.chunks(CHUNK / BLOCK).collect();
            let mut host = vec![0u8; per_layer * LAYERS];
            for (c, b) in ids.iter().enumerate() {
                host_layout.scatter(&mut host, b, &chunks[c % 5])?;
            }
            let arena = gpu.alloc(host.len())?;
            arena.write(0, &host)?;
            drop(host);
            let layout = KvLayout { layer_base: (0..LAYERS).map(|l| arena.ptr() as usize + l * per_layer).collect(), ..host_layout };
            let req: Vec<(&[u32], usize)> = ids.iter().map(|b| (*b, CHUNK)).collect();
            // First call: compared with the CPU encoder's containers, chunk by chunk.
            // SAFETY: the arena holds the whole layout; nothing else writes it.
            let (first, _) = unsafe { enc.encode_blocks_timed(&layout, &req, &opts, None)? };
            let identical = first.iter().enumerate().all(|(c, b)| *b == distinct[c % 5]);
            let compressed: usize = first.iter().map(|b| b.len()).sum();
            drop(first);
            println!("{tokens} tokens: GPU containers {} the CPU encoder's", if identical { "identical to" } else { "DIFFER from" });
            let (mut kern, mut wall, mut setup, mut finish) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            let mut per_kernel: Vec<Vec<f64>> = vec![Vec::new(); cachegen::gpu::KERNEL_NAMES.len()];
            let mut batches = 0;
            let mut waits: Vec<[f64; 5]> = Vec::new();
            for _ in 0..repeat {
                let t = Instant::now();
                // SAFETY: as above.
                let (out, tm) = unsafe { enc.encode_blocks_timed(&layout, &req, &opts, None)? };
                wall.push(t.elapsed().as_secs_f64() * 1e3);
                std::hint::black_box(out);
                kern.push(tm.kernels_ms);
                for (v, &m) in per_kernel.iter_mut().zip(&tm.per_kernel_ms) {
                    v.push(m);
                }
                setup.push(tm.setup_ms);
                finish.push(tm.finish_ms);
                batches = tm.batches;
                waits.push([tm.wait_gpu_ms, tm.wait_copy_ms, tm.wait_workers_ms, tm.worker_busy_ms, tm.workers as f64]);
            }
            let syms = chunk_syms * nchunks as f64;
            let (k, w) = (median(kern.clone()), median(wall.clone()));
            let names = cachegen::gpu::KERNEL_NAMES.map(|n| n.trim_start_matches("cg_enc_"));
            let per: serde_json::Map<String, serde_json::Value> = names.iter().zip(&per_kernel).map(|(n, v)| (n.to_string(), json!(median(v.clone())))).collect();
            println!("{tokens} tokens encode, per kernel (ms): {}", names.iter().zip(&per_kernel).map(|(n, v)| format!("{n} {:.2}", median(v.clone()))).collect::<Vec<_>>().join(", "));
            println!(
                "{tokens} tokens encode ({nchunks} chunks, {:.1} MB out): kernels {k:.2} ms = {:.1} Gsym/s; end to end {w:.2} ms = {:.1} Gsym/s \
                 (setup {:.2} ms, after the last kernel {:.2} ms, {} batches); CPU encoder {:.0} ms on {threads} threads = {:.2} Gsym/s",
                compressed as f64 / 1e6,
                syms / k / 1e6,
                syms / w / 1e6,
                median(setup.clone()),
                median(finish.clone()),
                batches,
                cpu_all * 1e3 * nchunks as f64,
                chunk_syms / cpu_all / 1e9,
            );
            if let Some(w) = waits.last() {
                println!("{tokens} tokens encode, last call: launcher waited {:.1} ms for kernels, {:.1} ms for copies, {:.1} ms for workers; workers busy {:.1} ms in all ({} workers)", w[0], w[1], w[2], w[3], w[4]);
            }
            results.push(json!({
                "variant": variant,
                "tokens": tokens,
                "chunks": nchunks,
                "symbols": syms,
                "compressed_bytes": compressed,
                "identical_to_cpu": identical,
                "kernel_ms_median": k,
                "kernel_ms_all": kern,
                "kernel_ms_per_kernel_median": per,
                "kernel_gsym_s": syms / k / 1e6,
                "e2e_wall_ms_median": w,
                "e2e_wall_ms_all": wall,
                "e2e_gsym_s": syms / w / 1e6,
                "setup_ms_median": median(setup),
                "finish_ms_median": median(finish),
                "batches": batches,
                "launcher_wait_gpu_copy_workers_ms_and_worker_busy_ms_and_workers": waits,
                "cpu_encode_gsym_s_1_thread": chunk_syms / cpu_1t / 1e9,
                "cpu_encode_gsym_s_all_threads": chunk_syms / cpu_all / 1e9,
                "cpu_encode_ms_all_threads_estimate": cpu_all * 1e3 * nchunks as f64,
            }));
        }
    }
    Ok(results)
}

//! The connector with the engine's KV cache in GPU memory (issue 5): loads
//! decode on the GPU into paged device blocks, per-layer waits are enqueued
//! on the engine's stream, stores gather from device blocks. Each result is
//! compared byte for byte with the host path on the same request.
//!
//! Without a GPU the device tests print `SKIPPED: no GPU (<reason>)` and
//! pass; the tests of what happens without a GPU run everywhere.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cachegen::connector::{ConnectorError, Context};
use cachegen::ffi;
use cachegen::gpu::{DeviceBuffer, Gpu, GpuError, GpuGather};
use cachegen::layout::{KvLayout, Memory};
use cachegen::pipeline::Stage;

#[path = "common/engine.rs"]
mod engine;
use engine::*;

static GPU: OnceLock<Result<Gpu, String>> = OnceLock::new();

/// The GPU, or `None` after printing why the test is skipped.
fn gpu() -> Option<&'static Gpu> {
    let g = GPU.get_or_init(|| match Gpu::open(0) {
        Ok(g) => {
            eprintln!("GPU: {} (sm_{}{})", g.name(), g.compute_capability().0, g.compute_capability().1);
            Ok(g)
        }
        Err(GpuError::NoGpu(reason)) => Err(reason),
        Err(e) => panic!("GPU present but unusable: {e}"),
    });
    match g {
        Ok(g) => Some(g),
        Err(reason) => {
            println!("SKIPPED: no GPU ({reason})");
            None
        }
    }
}

fn config(extra: &str) -> String {
    format!(r#"{{"namespace": {{"model": "smollm2-test", "kv_dtype": "f16", "block_size": {BS}}}, "chunk_tokens": {CHUNK}, "decode_threads": 2 {extra}}}"#)
}

/// A host engine's paged cache mirrored in device memory: same geometry,
/// same byte offsets, one device buffer per host buffer.
struct DeviceEngine {
    bufs: Vec<DeviceBuffer>,
    layout: Arc<KvLayout>,
}

impl DeviceEngine {
    fn mirror(gpu: &Gpu, host: &Engine) -> DeviceEngine {
        let bufs: Vec<DeviceBuffer> = host
            .bufs
            .iter()
            .map(|b| {
                let d = gpu.alloc(b.len()).unwrap();
                d.write(0, b).unwrap();
                d
            })
            .collect();
        // Each layer base keeps its offset within its host buffer.
        let rebase = |a: usize| -> usize {
            let (i, b) = host.bufs.iter().enumerate().find(|(_, b)| (b.as_ptr() as usize..b.as_ptr() as usize + b.len()).contains(&a)).unwrap();
            bufs[i].ptr() as usize + (a - b.as_ptr() as usize)
        };
        let layout = KvLayout { memory: Memory::Cuda { device: 0 }, layer_base: host.layout.layer_base.iter().map(|&a| rebase(a)).collect(), ..(*host.layout).clone() };
        DeviceEngine { bufs, layout: Arc::new(layout) }
    }

    /// Every byte of the device buffers (synchronous copies on the legacy
    /// default stream).
    fn download(&self) -> Vec<Vec<u8>> {
        self.bufs
            .iter()
            .map(|d| {
                let mut v = vec![0u8; d.len()];
                d.read(0, &mut v).unwrap();
                v
            })
            .collect()
    }
}

/// A context holding the 5 chunks of the fixture's 320 tokens, stored from host memory.
fn stored_context(toks: &[u32]) -> Context {
    let kv = fixture();
    let ctx = Context::from_json(&config("")).unwrap();
    let mut src = Engine::vllm(&kv, 20, false);
    let blocks: Vec<u32> = (0..20).collect();
    src.fill(&kv, &blocks, toks.len());
    let job = unsafe { ctx.store(Arc::clone(&src.layout), toks, &blocks, b"") }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(job.progress().chunks_ok, toks.len() / CHUNK);
    ctx
}

#[test]
fn gpu_load_equals_host_load_with_per_layer_stream_waits() {
    let Some(gpu) = gpu() else { return };
    let kv = fixture();
    let toks = tokens(320, 1);
    let ctx = stored_context(&toks);
    let mut dst_blocks: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 24).collect();
    dst_blocks.reverse();
    for hnd in [false, true] {
        // The host path's result, with untouched blocks holding a marker.
        let mut host = Engine::vllm(&kv, 24, hnd);
        for b in &mut host.bufs {
            b.fill(0x3c);
        }
        let dev = DeviceEngine::mirror(gpu, &host);
        let job = unsafe { ctx.load(Arc::clone(&host.layout), &toks, &dst_blocks, 0, b"", 0) }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        assert_eq!(job.progress().chunks_ok, 5, "{:?}", job.progress().errors);

        let job = unsafe { ctx.load_on(Arc::clone(&dev.layout), &toks, &dst_blocks, 0, b"", 0, Some(0)) }.unwrap();
        // The legacy default stream waits for every layer on the device; the
        // synchronous copies below run on it, after the decode.
        for l in 0..kv.shape.layers {
            assert_eq!(job.wait_layer_on_stream(l, 0, Some(Duration::from_secs(60))), Ok(true));
        }
        let got = dev.download();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        let p = job.progress();
        assert_eq!((p.chunks_ok, p.chunks_failed), (5, 0), "{:?}", p.errors);
        assert!(got == host.bufs, "GPU load (hnd={hnd}) differs from the host load");
        // After the job, waits return at once.
        assert!(job.wait_layer(kv.shape.layers - 1, Some(Duration::from_secs(1))));
    }
}

#[test]
fn gpu_load_leaves_the_engines_blocks_alone_and_reports_missing_chunks() {
    let Some(gpu) = gpu() else { return };
    let kv = fixture();
    let toks = tokens(320, 2);
    // Only the first 3 chunks are stored; the load asks for 5 and starts at
    // token 48 (the engine holds 3 blocks).
    let ctx = stored_context(&toks[..192]);
    let blocks: Vec<u32> = (0..20).collect();
    let mut host = Engine::vllm(&kv, 20, false);
    for b in &mut host.bufs {
        b.fill(0x55);
    }
    let dev = DeviceEngine::mirror(gpu, &host);
    let job = unsafe { ctx.load(Arc::clone(&host.layout), &toks, &blocks, 48, b"", 0) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    let job_gpu = unsafe { ctx.load_on(Arc::clone(&dev.layout), &toks, &blocks, 48, b"", 0, None) }.unwrap();
    for l in 0..kv.shape.layers {
        assert!(job_gpu.wait_layer(l, Some(Duration::from_secs(60))));
    }
    assert!(job_gpu.wait(Stage::Done, Some(Duration::from_secs(60))));
    let (p, q) = (job.progress(), job_gpu.progress());
    assert_eq!((q.chunks_ok, q.chunks_failed), (3, 2), "{:?}", q.errors);
    assert_eq!(q.failed_blocks, (12..20).collect::<Vec<u32>>());
    assert_eq!(q.failed_blocks, p.failed_blocks);
    assert!(dev.download() == host.bufs, "GPU partial load differs from the host's");
    // The marker in the engine's first 3 blocks survived on both.
    let marker = host.read(&blocks[..3], 48);
    assert!(marker.tensors.iter().all(|t| t.iter().all(|&b| b == 0x55)));
}

#[test]
fn gpu_store_gathers_what_the_host_store_gathers() {
    let Some(gpu) = gpu() else { return };
    let kv = fixture();
    let toks = tokens(320, 3);
    let src_blocks: Vec<u32> = (0..20).map(|i| 39 - 2 * i).collect();
    for make in [|kv: &_| Engine::vllm(kv, 40, false), |kv: &_| Engine::vllm(kv, 40, true), |kv: &_| Engine::trtllm(kv, 40)] {
        let mut src = make(&kv);
        src.fill(&kv, &src_blocks, 320);
        let dev = DeviceEngine::mirror(gpu, &src);
        // The gather kernel alone equals the host gather.
        let gather = GpuGather::new(gpu).unwrap();
        let refs: Vec<&[u32]> = src_blocks.chunks(CHUNK / BS).collect();
        let got = unsafe { gather.gather(&dev.layout, &refs, CHUNK, None) }.unwrap();
        for (c, g) in got.iter().enumerate() {
            assert_eq!(*g, src.read(refs[c], CHUNK), "chunk {c} gathered on the GPU differs");
        }
        // A store from device memory (encoded on the GPU) and one from host
        // memory write the same files; a host load gives the codec's output.
        let (ctx, _gdir) = store_both_ways(&|d| config(&disk_tier(d)), &dev, &src, &toks, &src_blocks, "GPU-encoded");
        let mut dst = Engine::vllm(&kv, 20, false);
        let dst_blocks: Vec<u32> = (0..20).collect();
        let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &dst_blocks, 0, b"", 0) }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        assert_eq!(dst.read(&dst_blocks, 320), expected(&kv, 5, cachegen::codec::Level::Default));
        dst.bufs.clear();
    }
}

/// The config entry for a disk tier at `d`.
fn disk_tier(d: &std::path::Path) -> String {
    format!(r#", "tiers": {{"disk": {{"path": "{}", "bytes": 100000000}}}}"#, d.display())
}

/// Stores `toks` from `dev` (device memory, through `store_on`) and from
/// `src` (host memory), each with the config `cfg(dir)` of a fresh
/// directory, and asserts that the device store stored every chunk and that
/// both wrote the same files. Returns the device store's context and its
/// directory (keep it while the context is used).
fn store_both_ways(cfg: &dyn Fn(&std::path::Path) -> String, dev: &DeviceEngine, src: &Engine, toks: &[u32], blocks: &[u32], what: &str) -> (Context, tempfile::TempDir) {
    let (gdir, hdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ctx = Context::from_json(&cfg(gdir.path())).unwrap();
    let job = unsafe { ctx.store_on(Arc::clone(&dev.layout), toks, blocks, b"", Some(0)) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(job.progress().chunks_ok, toks.len() / CHUNK, "{what}: {:?}", job.progress().errors);
    let hctx = Context::from_json(&cfg(hdir.path())).unwrap();
    let job = unsafe { hctx.store(Arc::clone(&src.layout), toks, blocks, b"") }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    let (g, h) = (files(gdir.path()), files(hdir.path()));
    assert!(g.len() >= toks.len() / CHUNK && g == h, "{what}: the device store differs from the host store ({} and {} files)", g.len(), h.len());
    (ctx, gdir)
}

/// Every file under `d` (path relative to `d`, contents), sorted.
fn files(d: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = walk(d).into_iter().map(|p| (p.strip_prefix(d).unwrap().to_path_buf(), std::fs::read(&p).unwrap())).collect();
    v.sort();
    v
}

fn walk(d: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn gpu_store_at_the_lossless_level_gathers_on_the_gpu_and_round_trips_exactly() {
    let Some(gpu) = gpu() else { return };
    let kv = fixture();
    let toks = tokens(320, 5);
    let blocks: Vec<u32> = (0..20).collect();
    let mut src = Engine::vllm(&kv, 20, true);
    src.fill(&kv, &blocks, 320);
    let dev = DeviceEngine::mirror(gpu, &src);
    let ctx = Context::from_json(&config(r#", "level": "lossless""#)).unwrap();
    let job = unsafe { ctx.store_on(Arc::clone(&dev.layout), &toks, &blocks, b"", Some(0)) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(job.progress().chunks_ok, 5, "{:?}", job.progress().errors);
    // Loaded back on the GPU into another layout: the original bytes.
    let mut host_dst = Engine::trtllm(&kv, 20);
    let dst = DeviceEngine::mirror(gpu, &host_dst);
    let job = unsafe { ctx.load_on(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", 0, Some(0)) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(job.progress().chunks_ok, 5, "{:?}", job.progress().errors);
    for (b, d) in host_dst.bufs.iter_mut().zip(dst.download()) {
        b.copy_from_slice(&d);
    }
    assert_eq!(host_dst.read(&blocks, 320), slice_tokens(&kv, 0, 320));
}

#[test]
fn device_layouts_without_a_gpu_or_with_host_pointers_are_refused() {
    let kv = fixture();
    let mut host = Engine::vllm(&kv, 20, false);
    let toks = tokens(128, 4);
    let blocks: Vec<u32> = (0..8).collect();
    host.fill(&kv, &blocks, 128);
    // A host buffer labelled as device memory.
    let fake = Arc::new(KvLayout { memory: Memory::Cuda { device: 0 }, ..(*host.layout).clone() });
    let ctx = Context::from_json(&config("")).unwrap();
    if gpu().is_none() {
        // No GPU here: every job on device memory is refused up front.
        let e = unsafe { ctx.store(Arc::clone(&fake), &toks, &blocks, b"") }.err().expect("store refused");
        assert!(matches!(e, ConnectorError::NoGpu(_)), "{e}");
        let e = unsafe { ctx.load(Arc::clone(&fake), &toks, &blocks, 0, b"", 0) }.err();
        // Nothing stored: the load has no chunks and needs no GPU.
        assert!(e.is_none() || matches!(e, Some(ConnectorError::NoGpu(_))));
    }
    // Through the C ABI: CG_ERR_NO_GPU without a GPU, CG_ERR_INVALID_ARGUMENT
    // for host pointers on a GPU machine; never a layout handle.
    let bases: Vec<u64> = host.layout.layer_base.iter().map(|&b| b as u64).collect();
    let l = &host.layout;
    let desc = ffi::cg_layout_desc {
        kind: ffi::CG_KIND_KEY_VALUE,
        dtype: ffi::CG_DTYPE_F16,
        memory: ffi::CG_MEMORY_CUDA,
        layers: l.layers as u32,
        num_blocks: l.num_blocks as u32,
        block_size: l.block_size as u32,
        heads: l.heads as u32,
        head_dim: l.head_dim as u32,
        layer_base: bases.as_ptr(),
        stride_block: l.stride_block as i64,
        stride_kv: l.stride_kv as i64,
        stride_token: l.stride_token as i64,
        stride_head: l.stride_head as i64,
        stride_layer: l.stride_layer as i64,
    };
    let mut out: *mut ffi::cg_layout = std::ptr::null_mut();
    let rc = unsafe { ffi::cg_layout_new(&desc, &mut out) };
    let msg = unsafe { std::ffi::CStr::from_ptr(ffi::cg_last_error_message()) }.to_string_lossy().into_owned();
    let want = if gpu().is_some() { ffi::CG_ERR_INVALID_ARGUMENT } else { ffi::CG_ERR_NO_GPU };
    assert_eq!(rc, want, "{msg}");
    assert!(out.is_null());
    assert!(msg.contains("CG_MEMORY_CUDA"), "{msg}");
}

#[test]
fn table_set_chunks_load_on_the_gpu_as_on_the_host_mixing_sets_in_one_load() {
    let Some(gpu) = gpu() else { return };
    use cachegen::codec::Level;
    use cachegen::store::{DiskTier, Tier};
    let kv = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (_, entries) = table_set_files(&kv, dir.path(), &[Level::Compact, Level::Default]);
    let tables = entries.join(", ");
    let toks = tokens(320, 8);
    let blocks: Vec<u32> = (0..20).collect();
    let mut src = Engine::vllm(&kv, 20, false);
    src.fill(&kv, &blocks, 320);
    let dev_src = DeviceEngine::mirror(gpu, &src);
    let disk = |d: &std::path::Path| format!(r#", "tiers": {{"disk": {{"path": "{}", "bytes": 100000000}}}}"#, d.display());

    // One level: a store from device memory (encoded by the GPU encoder with
    // the set) writes what a store from host memory writes.
    let (gdir, hdir) = (dir.path().join("g"), dir.path().join("h"));
    let one = |d: &std::path::Path| config(&format!(r#"{}, "tables": {{{}}}"#, disk(d), entries[1]));
    let ctx = Context::from_json(&one(&gdir)).unwrap();
    let job = unsafe { ctx.store_on(Arc::clone(&dev_src.layout), &toks, &blocks, b"", Some(0)) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(job.progress().chunks_ok, 5, "{:?}", job.progress().errors);
    let hctx = Context::from_json(&one(&hdir)).unwrap();
    let job = unsafe { hctx.store(Arc::clone(&src.layout), &toks, &blocks, b"") }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    let (g, h) = (files(&gdir), files(&hdir));
    assert!(g.len() >= 5 && g == h, "GPU-side store with a set differs from the host store ({} and {} files)", g.len(), h.len());

    // Two levels, each with its set, stored from device memory (gathered
    // there, every level encoded on the host): the same files as from host
    // memory. Then the default level of chunks 1 and 3 is removed, so the
    // load takes them at the compact level: one device call decodes chunks
    // of both sets.
    let (mdir, mhdir) = (dir.path().join("m"), dir.path().join("mh"));
    let multi_in = |d: &std::path::Path| config(&format!(r#"{}, "tables": {{{tables}}}, "levels": ["compact", "default"], "level": "default""#, disk(d)));
    let multi = multi_in(&mdir);
    {
        let hctx = Context::from_json(&multi_in(&mhdir)).unwrap();
        let job = unsafe { hctx.store(Arc::clone(&src.layout), &toks, &blocks, b"") }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        assert_eq!(job.progress().chunks_ok, 5, "{:?}", job.progress().errors);
        let ctx = Context::from_json(&multi).unwrap();
        let job = unsafe { ctx.store_on(Arc::clone(&dev_src.layout), &toks, &blocks, b"", Some(0)) }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        assert_eq!(job.progress().chunks_ok, 5, "{:?}", job.progress().errors);
        let (g, h) = (files(&mdir), files(&mhdir));
        assert!(g.len() >= 10 && g == h, "multi-level store from device memory differs from the host's ({} and {} files)", g.len(), h.len());
        let ns = ctx.config().level_namespace(Level::Default);
        let chain = cachegen::keys::chunk_chain(&ns, b"", &toks);
        let tier = DiskTier::open(&mdir, 100_000_000).unwrap();
        for c in [1, 3] {
            tier.remove(&cachegen::keys::shard_key(&chain[c], 0)).unwrap();
        }
    }
    let ctx = Context::from_json(&multi).unwrap();
    for hnd in [false, true] {
        let mut host = Engine::vllm(&kv, 24, hnd);
        for b in &mut host.bufs {
            b.fill(0x3c);
        }
        let dev = DeviceEngine::mirror(gpu, &host);
        let job = unsafe { ctx.load(Arc::clone(&host.layout), &toks, &blocks, 0, b"", 0) }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        assert_eq!(job.progress().chunks_ok, 5, "{:?}", job.progress().errors);
        let levels: Vec<_> = job.chunk_decisions().iter().map(|d| format!("{:?}", d.outcome)).collect();
        assert_eq!(levels.iter().filter(|l| l.contains("Compact")).count(), 2, "{levels:?}");
        let job = unsafe { ctx.load_on(Arc::clone(&dev.layout), &toks, &blocks, 0, b"", 0, Some(0)) }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        let p = job.progress();
        assert_eq!((p.chunks_ok, p.chunks_failed), (5, 0), "{:?}", p.errors);
        assert!(dev.download() == host.bufs, "GPU load of two sets' chunks (hnd={hnd}) differs from the host load");
    }
}

/// The fixture's values as fp8 (E4M3) elements, in their own units.
fn fixture_fp8() -> cachegen::codec::KvTensors {
    let kv = fixture();
    let tensors = (0..kv.tensors.len())
        .map(|i| kv.tensor_f32(i).iter().map(|&x| cachegen::codec::fp8::f32_to_e4m3(x)).collect())
        .collect();
    cachegen::codec::KvTensors { shape: kv.shape, dtype: cachegen::codec::Dtype::F8E4M3, tensors }
}

#[test]
fn fp8_caches_store_from_and_load_into_device_memory_as_on_the_host() {
    let Some(gpu) = gpu() else { return };
    let kv = fixture_fp8();
    let toks = tokens(320, 11);
    let blocks: Vec<u32> = (0..20).map(|i| 19 - i).collect();
    let mut src = Engine::vllm(&kv, 20, false);
    src.fill(&kv, &blocks, 320);
    let dev = DeviceEngine::mirror(gpu, &src);
    for level in ["default", "lossless"] {
        // From device memory (gathered on the GPU, encoded on the host) and
        // from host memory: the same files.
        let cfg = |d: &std::path::Path| config(&format!(r#", "level": "{level}"{}"#, disk_tier(d))).replace(r#""kv_dtype": "f16""#, r#""kv_dtype": "fp8""#);
        let (ctx, _gdir) = store_both_ways(&cfg, &dev, &src, &toks, &blocks, &format!("fp8 {level}"));
        // Loaded on the GPU into a TensorRT-LLM pool: the codec's output
        // (the original bytes at the lossless level).
        let mut host_dst = Engine::trtllm(&kv, 20);
        let dst = DeviceEngine::mirror(gpu, &host_dst);
        let job = unsafe { ctx.load_on(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", 0, Some(0)) }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        assert_eq!(job.progress().chunks_ok, 5, "{level}: {:?}", job.progress().errors);
        for (b, d) in host_dst.bufs.iter_mut().zip(dst.download()) {
            b.copy_from_slice(&d);
        }
        let want = if level == "lossless" { slice_tokens(&kv, 0, 320) } else { expected(&kv, 5, cachegen::codec::Level::Default) };
        assert_eq!(host_dst.read(&blocks, 320), want, "{level}");
    }
}

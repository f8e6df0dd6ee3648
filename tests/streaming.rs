//! Adaptive streaming on the real KV fixture: multi-level store and its
//! storage cost, level choice under an emulated link (fast → top level, slow
//! → lower levels, very slow → recompute), a link that stalls mid-load ends
//! in recompute within the SLO with nothing left hanging, and the link
//! emulation itself (shared bandwidth, latency, traces).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachegen::codec::Level;
use cachegen::connector::Context;
use cachegen::keys::{chunk_chain, shard_key};
use cachegen::pipeline::{LoadChunk, LoadSpec, Pipeline, Stage, StreamPlan};
use cachegen::store::{DiskTier, Tier, TierStack};
use cachegen::streaming::adaptive::Planner;
use cachegen::streaming::link::gbps;
use cachegen::streaming::{Choice, Estimator, Link, Schedule, ShapedTier, StreamStats};

#[path = "common/engine.rs"]
mod engine;
use engine::*;

/// These tests time real transfers through an emulated link: run them one
/// at a time so that they do not compete for the CPU with each other.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Releases a stalled link even when an assertion fails, so that the
/// pipeline's threads can finish and a failing test cannot hang.
struct CloseOnDrop(Arc<Link>);
impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

const LEVELS: &str = r#""levels": ["compact", "default", "high"]"#;

fn config(extra: &str) -> String {
    format!(
        r#"{{"namespace": {{"model": "smollm2-stream", "kv_dtype": "f16", "block_size": {BS}}}, "chunk_tokens": {CHUNK}, "decode_threads": 2, {LEVELS} {extra}}}"#
    )
}

/// Stores the fixture's 5 chunks at three levels through a context on `dir`.
fn store_all(dir: &std::path::Path, toks: &[u32]) -> serde_json::Value {
    let kv = fixture();
    let ctx = Context::from_json(&config(&format!(r#", "tiers": {{"disk": {{"path": "{}", "bytes": 100000000}}}}"#, dir.display()))).unwrap();
    let mut src = Engine::vllm(&kv, 20, false);
    let blocks: Vec<u32> = (0..20).collect();
    src.fill(&kv, &blocks, 320);
    let job = unsafe { ctx.store(Arc::clone(&src.layout), toks, &blocks, b"") }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(120))));
    let p = job.progress();
    assert_eq!((p.chunks_ok, p.chunks_failed), (5, 0), "{:?}", p.errors);
    serde_json::from_str(&ctx.stats_json()).unwrap()
}

#[test]
fn multi_level_store_reports_its_cost_and_loads_the_fixed_level() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let toks = tokens(320, 1);
    let stats = store_all(dir.path(), &toks);
    let s = &stats["streaming"];
    for l in ["compact", "default", "high"] {
        assert_eq!(s["stored_chunks"][l], 5, "{s}");
    }
    let (c, d, h) = (s["stored_bytes"]["compact"].as_u64().unwrap(), s["stored_bytes"]["default"].as_u64().unwrap(), s["stored_bytes"]["high"].as_u64().unwrap());
    assert!(c < d && d < h, "{s}");
    assert_eq!(s["level_set_bytes"].as_u64().unwrap(), c + d + h);
    let x = s["level_set_x_fp16"].as_f64().unwrap();
    // At 64-token chunks embedded tables are a large share: the three levels
    // together cost about as much as fp16.
    assert!(x > 0.5 && x < 3.0, "{x}");

    // A non-adaptive context loads the fixed level (default).
    let kv = fixture();
    let ctx = Context::from_json(&config(&format!(r#", "tiers": {{"disk": {{"path": "{}", "bytes": 100000000}}}}"#, dir.path().display()))).unwrap();
    assert_eq!(ctx.lookup(&toks, b"", None).tokens, 320);
    let blocks: Vec<u32> = (0..20).collect();
    let dst = Engine::vllm(&kv, 20, true);
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", 0) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(job.progress().chunks_ok, 5, "{:?}", job.progress().errors);
    assert_eq!(dst.read(&blocks, 320), expected(&kv, 5, Level::Default));
    let d = job.chunk_decisions();
    assert_eq!(d.len(), 5);
    assert!(d.iter().all(|d| d.outcome == Choice::Level(Level::Default)), "{d:?}");

    // Lookup counts a chunk stored at any one level: remove chunk 2's
    // default and high entries, keep compact.
    let disk = DiskTier::open(dir.path(), 100_000_000).unwrap();
    let cfg = ctx.config();
    for l in [Level::Default, Level::High] {
        let chain = chunk_chain(&cfg.level_namespace(l), b"", &toks);
        disk.remove(&shard_key(&chain[2], 0)).unwrap();
    }
    drop(disk);
    let ctx = Context::from_json(&config(&format!(r#", "tiers": {{"disk": {{"path": "{}", "bytes": 100000000}}}}"#, dir.path().display()))).unwrap();
    assert_eq!(ctx.lookup(&toks, b"", None).tokens, 320);
    // ... and the fixed-level load falls back to it for that chunk.
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", 0) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(job.progress().chunks_ok, 5);
    assert_eq!(job.chunk_decisions()[2].outcome, Choice::Level(Level::Compact));
    let got = dst.read(&blocks, 320);
    let want_c = expected(&kv, 5, Level::Compact);
    assert_eq!(slice_tokens(&got, 128, 192), slice_tokens(&want_c, 128, 192));
}

/// An adaptive load through a context whose disk tier sits behind a link.
fn adaptive_load(dir: &std::path::Path, toks: &[u32], link_gbps: f64, slo_ms: f64, prefill: f64, initial_gbps: f64) -> (cachegen::pipeline::Progress, Vec<cachegen::streaming::ChunkDecision>, serde_json::Value, Duration, Engine) {
    let kv = fixture();
    let cfg = config(&format!(
        r#", "tiers": {{"disk": {{"path": "{}", "bytes": 100000000, "link": {{"gbps": {link_gbps}, "latency_ms": 0.2}}}}}},
           "adaptive": {{"ttft_slo_ms": {slo_ms}, "prefill_tokens_per_s": {prefill}, "initial_gbps": {initial_gbps}}}"#,
        dir.display()
    ));
    let ctx = Context::from_json(&cfg).unwrap();
    let blocks: Vec<u32> = (0..20).collect();
    let dst = Engine::vllm(&kv, 20, false);
    let t0 = Instant::now();
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), toks, &blocks, 0, b"", 0) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(30))));
    let took = t0.elapsed();
    let stats = serde_json::from_str(&ctx.stats_json()).unwrap();
    (job.progress(), job.chunk_decisions(), stats, took, dst)
}

#[test]
fn fast_link_loads_the_top_level() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let toks = tokens(320, 2);
    store_all(dir.path(), &toks);
    // 10 Gbps, 10 s SLO: the top level costs a fraction of a millisecond
    // more per chunk than the default, far under the planner's "nearly
    // free" allowance (2% of the SLO over the chunks left): even fetches
    // slowed 100x by a busy machine keep it.
    let (p, d, stats, _, dst) = adaptive_load(dir.path(), &toks, 10.0, 10000.0, 10000.0, 10.0);
    assert_eq!((p.chunks_ok, p.chunks_failed), (5, 0), "{:?}", p.errors);
    assert!(d.iter().all(|d| d.outcome == Choice::Level(Level::High)), "{d:?}");
    assert_eq!(stats["streaming"]["loaded_chunks"]["high"], 5, "{stats}");
    assert_eq!(dst.read(&(0..20).collect::<Vec<u32>>(), 320), expected(&fixture(), 5, Level::High));
}

#[test]
fn slow_link_loads_lower_levels() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let toks = tokens(320, 3);
    store_all(dir.path(), &toks);
    // 0.2 Gbps: compact ~10 ms, default ~16 ms, high ~23 ms a chunk; 5
    // chunks in 100 ms leave under 20 ms each (the top level never fits
    // a share on its own); recompute costs 64 ms a chunk, 3x compact even
    // when a busy machine doubles the fetch times.
    let (p, d, stats, took, dst) = adaptive_load(dir.path(), &toks, 0.2, 100.0, 1000.0, 0.2);
    eprintln!("slow link: {took:?} {d:?}\n{}", stats["streaming"]);
    assert_eq!(p.chunks_failed, 0, "{d:?} {:?}", p.errors);
    assert_eq!(d.len(), 5);
    assert!(d.iter().all(|d| matches!(d.outcome, Choice::Level(_))), "{d:?}");
    // Lower levels carry the load. (A late chunk may still take the top
    // level when the earlier ones left budget and the busy machine made
    // decoding, which every level pays, the larger cost.)
    let low = d.iter().filter(|d| matches!(d.outcome, Choice::Level(Level::Compact | Level::Default))).count();
    assert!(low >= 4, "{d:?}");
    assert!(d.iter().any(|d| d.outcome == Choice::Level(Level::Compact)), "{d:?}");
    // What was loaded is exactly what its level decodes to.
    let got = dst.read(&(0..20).collect::<Vec<u32>>(), 320);
    let kv = fixture();
    for x in &d {
        let Choice::Level(l) = x.outcome else { unreachable!() };
        let (s, e) = (x.chunk * CHUNK, (x.chunk + 1) * CHUNK);
        assert_eq!(slice_tokens(&got, s, e), slice_tokens(&expected(&kv, 5, l), s, e), "chunk {}", x.chunk);
    }
}

#[test]
fn very_slow_link_leaves_chunks_for_recompute() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let toks = tokens(320, 4);
    store_all(dir.path(), &toks);
    // 0.02 Gbps: even compact takes ~100 ms a chunk; recompute 6.4 ms.
    let (p, d, stats, took, _) = adaptive_load(dir.path(), &toks, 0.02, 100.0, 10000.0, 0.02);
    assert_eq!(p.chunks_failed, 5, "{d:?}");
    assert_eq!(p.failed_blocks, (0..20).collect::<Vec<u32>>());
    assert!(p.errors.iter().all(|e| e.contains("recompute")), "{:?}", p.errors);
    assert!(d.iter().all(|d| d.planned == Choice::Recompute && d.bytes == 0), "{d:?}");
    assert_eq!(stats["streaming"]["recomputed_chunks"], 5);
    assert!(took < Duration::from_secs(1), "nothing was fetched: {took:?}");
}

#[test]
fn a_link_that_stalls_mid_load_ends_in_recompute_within_the_slo() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let toks = tokens(320, 5);
    store_all(dir.path(), &toks);
    let kv = fixture();
    let probe = Context::from_json(&config("")).unwrap();
    let cfg = probe.config().clone();
    let levels = [Level::Compact, Level::Default, Level::High];
    let chains: Vec<Vec<[u8; 16]>> = levels.iter().map(|&l| chunk_chain(&cfg.level_namespace(l), b"", &toks)).collect();
    let keys: Vec<Vec<(Level, [u8; 16])>> = (0..5).map(|c| levels.iter().enumerate().map(|(i, &l)| (l, shard_key(&chains[i][c], 0))).collect()).collect();
    // 10 Gbps for two requests, then the link stalls (rate 0).
    let link = Link::new(Schedule::PerRequest(vec![gbps(10.0), gbps(10.0), 0.0, 0.0, 0.0]), Duration::from_micros(100));
    let tier: Arc<dyn Tier> = Arc::new(ShapedTier::new(Arc::new(DiskTier::open(dir.path(), 100_000_000).unwrap()), Arc::clone(&link)));
    let dst = Engine::vllm(&kv, 20, false);
    let pipeline = Pipeline::new(2, 2).unwrap();
    let _release = CloseOnDrop(Arc::clone(&link));
    let fetched = Arc::new(AtomicBool::new(false));
    let f2 = Arc::clone(&fetched);
    let slo = Duration::from_millis(600);
    let prefill = 20000.0; // 3.2 ms a chunk
    let stats = Arc::new(StreamStats::default());
    let t0 = Instant::now();
    let job = pipeline.load_streamed(
        LoadSpec {
            device: None,
            layout: Arc::clone(&dst.layout),
            chunk_tokens: CHUNK,
            chunks: (0..5).map(|c| LoadChunk { key: keys[c][1].1, skip_tokens: 0, blocks: (c as u32 * 4..c as u32 * 4 + 4).collect() }).collect(),
            timeout: Duration::from_secs(30),
            tiers: TierStack::new(vec![tier]),
            limits: Default::default(),
            on_fetched: Some(Box::new(move || f2.store(true, Ordering::SeqCst))),
        },
        StreamPlan {
            keys,
            planner: Some(Planner { slo_s: slo.as_secs_f64(), prefill_tokens_per_s: prefill, chunk_tokens: CHUNK, levels: levels.to_vec(), recompute_suffix: false }),
            prefer: Level::Default,
            estimator: Arc::new(Estimator::new(gbps(10.0))),
            stats: Arc::clone(&stats),
            decode_threads: 2,
        },
    );
    // It ends at the give-up point (SLO - 3 x 3.2 ms), not at the 30 s load
    // timeout and not when the stall ends (never).
    assert!(job.wait(Stage::Done, Some(slo + Duration::from_secs(2))), "the load must end soon after the SLO");
    let took = t0.elapsed();
    let p = job.progress();
    let d = job.chunk_decisions();
    // TTFT = load + recompute of what was left: within the SLO, up to the
    // watchdog's wake-up on a busy 2-core machine (150 ms allowed).
    let ttft = took.as_secs_f64() + p.chunks_failed as f64 * CHUNK as f64 / prefill;
    assert!(ttft <= slo.as_secs_f64() + 0.15, "ttft {ttft} s ({took:?}, {d:?})");
    // ... and not by giving up early: the stalled fetch was waited for
    // until its give-up point.
    assert!(took.as_secs_f64() >= slo.as_secs_f64() - 3.0 * CHUNK as f64 / prefill - 0.005, "{took:?} {d:?}");
    assert_eq!((p.chunks_ok, p.chunks_failed), (2, 3), "{d:?} {:?}", p.errors);
    assert_eq!(p.failed_blocks, (8..20).collect::<Vec<u32>>());
    assert!(p.errors.iter().all(|e| e.contains("recompute")), "{:?}", p.errors);
    // The hook (a lease's end) runs right after the last fetch resolves,
    // possibly just after the job reports done.
    let hook_deadline = Instant::now() + Duration::from_secs(1);
    while !fetched.load(Ordering::SeqCst) && Instant::now() < hook_deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(fetched.load(Ordering::SeqCst), "the fetched hook (lease end) ran");
    assert!(job.wait_layer(kv.shape.layers - 1, Some(Duration::ZERO)));
    assert_eq!(stats.abandoned_fetches.load(Ordering::SeqCst), 1);
    assert_eq!(stats.recomputed_chunks.load(Ordering::SeqCst), 3);
    // The chunks fetched before the stall are loaded, each exactly at the
    // level its decision reports (the top level unless a busy machine made
    // the fetches look slow).
    let got = dst.read(&(0..8).collect::<Vec<u32>>(), 128);
    for x in &d[..2] {
        let Choice::Level(l) = x.outcome else { panic!("{d:?}") };
        let (s, e) = (x.chunk * CHUNK, (x.chunk + 1) * CHUNK);
        assert_eq!(slice_tokens(&got, s, e), slice_tokens(&expected(&kv, 2, l), s, e), "chunk {}", x.chunk);
    }
    assert!(d[2..].iter().all(|x| x.outcome == Choice::Recompute), "{d:?}");
    // The stalled request is released; nothing hangs.
    link.close();
    let t1 = Instant::now();
    drop(pipeline);
    assert!(t1.elapsed() < Duration::from_secs(2));
}

#[test]
fn link_shares_bandwidth_adds_latency_and_replays_traces() {
    let _serial = serial();
    // 1 Gbps: 1.25 MB takes 10 ms; two at once share it (20 ms for both).
    let link = Link::gbps(1.0, Duration::from_millis(5));
    let t0 = Instant::now();
    let a = {
        let l = Arc::clone(&link);
        std::thread::spawn(move || l.transfer(1_250_000))
    };
    assert!(link.transfer(1_250_000));
    assert!(a.join().unwrap());
    let t = t0.elapsed();
    // Lower bounds are what the link guarantees; upper bounds only catch a
    // link that does not shape at all (generous: a busy machine).
    assert!(t >= Duration::from_millis(25) && t < Duration::from_millis(500), "{t:?}");
    // Per-request trace: 10 Gbps then 0.1 Gbps (1.25 MB: 1 ms, then 100 ms).
    let link = Link::new(Schedule::PerRequest(vec![gbps(10.0), gbps(0.1)]), Duration::ZERO);
    let t0 = Instant::now();
    link.transfer(1_250_000);
    let fast = t0.elapsed();
    let t1 = Instant::now();
    link.transfer(1_250_000);
    let slow = t1.elapsed();
    assert!(fast >= Duration::from_millis(1) && fast < Duration::from_millis(60) && slow >= Duration::from_millis(100), "{fast:?} {slow:?}");
    // Time slices: 0 for 30 ms (stalled), then 1 Gbps.
    let link = Link::new(Schedule::TimeSlices { slice: Duration::from_millis(30), rates: vec![0.0, gbps(1.0)] }, Duration::ZERO);
    let t0 = Instant::now();
    link.transfer(125_000);
    let t = t0.elapsed();
    assert!(t >= Duration::from_millis(31) && t < Duration::from_millis(500), "{t:?}");
}

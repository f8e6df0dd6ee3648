//! The connector core on host memory with the real KV fixture: store from
//! one layout, lookup, load into another layout and block order; failures
//! (missing, corrupt, timed out) come back as failed blocks; leases; a new
//! context finds disk entries; TP completeness; many threads at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cachegen::codec::{self, EncodeOptions, KvTensors, Level};
use cachegen::connector::Context;
use cachegen::pipeline::Stage;
use cachegen::store::{DiskTier, Tier, TierStack};
use cachegen::pipeline::{LoadChunk, LoadSpec, Pipeline};

#[path = "common/engine.rs"]
mod engine;
use engine::*;

fn config(extra: &str) -> String {
    format!(
        r#"{{"namespace": {{"model": "smollm2-test", "kv_dtype": "f16", "block_size": {BS}}}, "chunk_tokens": {CHUNK}, "decode_threads": 2 {extra}}}"#
    )
}


#[test]
fn store_lookup_load_across_layouts() {
    let kv = fixture();
    let n_tok = 320; // 5 chunks of 64
    let toks = tokens(n_tok, 1);
    let ctx = Context::from_json(&config("")).unwrap();

    let mut src = Engine::vllm(&kv, 40, false);
    let src_blocks: Vec<u32> = (0..20).map(|i| 39 - 2 * i).collect();
    src.fill(&kv, &src_blocks, n_tok);

    assert_eq!(ctx.lookup(&toks, b"", None).tokens, 0);
    let job = unsafe { ctx.store(Arc::clone(&src.layout), &toks, &src_blocks, b"") }.unwrap();
    assert!(job.wait(Stage::Reusable, Some(Duration::from_secs(60))));
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    let p = job.progress();
    assert_eq!((p.chunks_ok, p.chunks_failed), (5, 0), "{:?}", p.errors);
    assert_eq!(ctx.lookup(&toks, b"", None).tokens, 320);
    // A longer request with the same prefix matches the stored chunks; a
    // different salt or a changed token does not.
    let mut longer = toks.clone();
    longer.extend(tokens(100, 9));
    assert_eq!(ctx.lookup(&longer, b"", None).tokens, 320);
    assert_eq!(ctx.lookup(&toks, b"lora-7", None).tokens, 0);
    let mut changed = toks.clone();
    changed[130] ^= 1;
    assert_eq!(ctx.lookup(&changed, b"", None).tokens, 128);

    // Storing again writes nothing.
    let again = unsafe { ctx.store(Arc::clone(&src.layout), &toks, &src_blocks, b"") }.unwrap();
    assert!(again.wait(Stage::Done, Some(Duration::from_secs(10))));
    assert_eq!(again.progress().chunks_skipped, 5);

    let want = expected(&kv, 5, Level::Default);
    // Into HND with a shuffled block order, and into a TensorRT-LLM pool.
    let mut dst_blocks: Vec<u32> = (0..20).map(|i| (i * 7 + 3) % 20).collect();
    dst_blocks.reverse();
    for mut dst in [Engine::vllm(&kv, 20, true), Engine::trtllm(&kv, 20)] {
        let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &dst_blocks, 0, b"", 0) }.unwrap();
        for l in 0..kv.shape.layers {
            assert!(job.wait_layer(l, Some(Duration::from_secs(60))));
        }
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        let p = job.progress();
        assert_eq!((p.chunks_ok, p.chunks_failed), (5, 0), "{:?}", p.errors);
        assert!(p.failed_blocks.is_empty());
        assert_eq!(dst.read(&dst_blocks, 320), want, "loaded bytes differ from the codec's decoded output");
        dst.bufs.clear();
    }
    let stats: serde_json::Value = serde_json::from_str(&ctx.stats_json()).unwrap();
    assert_eq!(stats["counters"]["load_chunks_ok"], 10);
    assert_eq!(stats["counters"]["store_chunks_written"], 5);
    assert!(stats["throughput"]["compression_ratio"].as_f64().unwrap() > 3.0);
}

#[test]
fn partial_load_skips_blocks_the_engine_has() {
    let kv = fixture();
    let toks = tokens(256, 2);
    let ctx = Context::from_json(&config("")).unwrap();
    let mut src = Engine::vllm(&kv, 16, false);
    let blocks: Vec<u32> = (0..16).collect();
    src.fill(&kv, &blocks, 256);
    let job = unsafe { ctx.store(Arc::clone(&src.layout), &toks, &blocks, b"") }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));

    // The engine has the first 48 tokens (3 blocks): a marker there must survive.
    let mut dst = Engine::vllm(&kv, 16, false);
    let marker = slice_tokens(&kv, 0, 48);
    let mut marker = marker.clone();
    for t in &mut marker.tensors {
        t.fill(0x55);
    }
    unsafe { dst.layout.scatter_raw(&blocks[..3], &marker) }.unwrap();
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 48, b"", 0) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(job.progress().chunks_failed, 0);
    let got = dst.read(&blocks, 256);
    let want = expected(&kv, 4, Level::Default);
    assert_eq!(slice_tokens(&got, 0, 48), marker);
    assert_eq!(slice_tokens(&got, 48, 256), slice_tokens(&want, 48, 256));
    // A first token that is not block aligned is refused.
    assert!(unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 40, b"", 0) }.is_err());
    dst.bufs.clear();
}

#[test]
fn missing_and_corrupt_chunks_are_failed_blocks() {
    let kv = fixture();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&format!(r#", "tiers": {{"disk": {{"path": "{}", "bytes": 100000000}}}}"#, dir.path().display()));
    let toks = tokens(320, 3);
    let blocks: Vec<u32> = (0..20).collect();
    {
        let ctx = Context::from_json(&cfg).unwrap();
        let mut src = Engine::vllm(&kv, 20, false);
        src.fill(&kv, &blocks, 320);
        // Store only the first 192 tokens (3 chunks).
        let job = unsafe { ctx.store(Arc::clone(&src.layout), &toks[..192], &blocks, b"") }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        assert_eq!(job.progress().chunks_ok, 3);
    }
    // A new context finds the disk entries of the earlier one.
    let ctx = Context::from_json(&cfg).unwrap();
    assert_eq!(ctx.lookup(&toks, b"", None).tokens, 192);
    // Corrupt chunk 1's file (flip a byte in the middle of the payload).
    let disk = DiskTier::open(dir.path(), 100_000_000).unwrap();
    let ns = ctx.config().key_namespace();
    let chain = cachegen::keys::chunk_chain(&ns, b"", &toks);
    let path = disk.path_of(&cachegen::keys::shard_key(&chain[1], 0));
    drop(disk);
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&path, bytes).unwrap();

    let mut dst = Engine::vllm(&kv, 20, false);
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", 0) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    let p = job.progress();
    // Chunk 1 corrupt, chunks 3 and 4 missing: their blocks are failed.
    let mut want_failed: Vec<u32> = (4..8).chain(12..20).collect();
    want_failed.sort();
    assert_eq!(p.failed_blocks, want_failed, "{:?}", p.errors);
    assert_eq!((p.chunks_ok, p.chunks_failed), (2, 3));
    let got = dst.read(&blocks, 320);
    let want = expected(&kv, 3, Level::Default);
    assert_eq!(slice_tokens(&got, 0, 64), slice_tokens(&want, 0, 64));
    assert_eq!(slice_tokens(&got, 128, 192), slice_tokens(&want, 128, 192));
    // The corrupt entry is gone: lookup now stops at chunk 1.
    assert_eq!(ctx.lookup(&toks, b"", None).tokens, 64);
    dst.bufs.clear();
}

/// A tier that never answers within the load timeout.
struct StalledTier;
impl Tier for StalledTier {
    fn name(&self) -> &str {
        "stalled"
    }
    fn get(&self, _: &cachegen::store::Key) -> Result<Option<Vec<u8>>, cachegen::store::StoreError> {
        std::thread::sleep(Duration::from_secs(2));
        Ok(None)
    }
    fn put(&self, _: &cachegen::store::Key, _: &[u8]) -> Result<(), cachegen::store::StoreError> {
        Ok(())
    }
    fn contains(&self, _: &cachegen::store::Key) -> Result<bool, cachegen::store::StoreError> {
        Ok(true)
    }
    fn remove(&self, _: &cachegen::store::Key) -> Result<(), cachegen::store::StoreError> {
        Ok(())
    }
    fn stats(&self) -> cachegen::store::TierStats {
        Default::default()
    }
}

#[test]
fn a_stalled_tier_ends_in_failed_blocks_within_the_timeout() {
    let kv = fixture();
    let dst = Engine::vllm(&kv, 8, false);
    let pipeline = Pipeline::new(2, 2).unwrap();
    let chunks: Vec<LoadChunk> =
        (0..2).map(|c| LoadChunk { key: [c as u8; 16], skip_tokens: 0, blocks: (c * 4..c * 4 + 4).collect() }).collect();
    let t0 = Instant::now();
    let job = pipeline.load(LoadSpec {
        device: None,
        layout: Arc::clone(&dst.layout),
        chunk_tokens: CHUNK,
        chunks,
        timeout: Duration::from_millis(300),
        tiers: TierStack::new(vec![Arc::new(StalledTier)]),
        limits: Default::default(),
        tables: Default::default(),
        on_fetched: None,
    });
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(1))), "the load must end at its timeout");
    let waited = t0.elapsed();
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_millis(1000), "{waited:?}");
    let p = job.progress();
    assert_eq!(p.failed_blocks, (0..8).collect::<Vec<u32>>());
    assert!(p.errors.iter().all(|e| e.contains("timeout")), "{:?}", p.errors);
    assert!(job.wait_layer(kv.shape.layers - 1, Some(Duration::ZERO)));
    // Dropping the pipeline waits for the stalled fetches; nothing hangs.
    drop(pipeline);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn cancelling_a_load_fails_what_is_not_written() {
    let kv = fixture();
    let dst = Engine::vllm(&kv, 8, false);
    let pipeline = Pipeline::new(1, 1).unwrap();
    let job = pipeline.load(LoadSpec {
        device: None,
        layout: Arc::clone(&dst.layout),
        chunk_tokens: CHUNK,
        chunks: vec![LoadChunk { key: [1; 16], skip_tokens: 0, blocks: (0..4).collect() }],
        timeout: Duration::from_secs(60),
        tiers: TierStack::new(vec![Arc::new(StalledTier)]),
        limits: Default::default(),
        tables: Default::default(),
        on_fetched: None,
    });
    std::thread::sleep(Duration::from_millis(50));
    job.cancel();
    assert!(job.wait(Stage::Done, Some(Duration::from_millis(200))));
    assert_eq!(job.progress().failed_blocks, vec![0, 1, 2, 3]);
}

#[test]
fn leases_protect_entries_and_never_leak() {
    let kv = fixture();
    // A memory tier that holds about 3 chunks.
    let chunk_bytes = {
        let part = slice_tokens(&kv, 0, CHUNK);
        codec::encode(&part, &EncodeOptions::level(Level::Default)).unwrap().len()
    };
    let budget = chunk_bytes * 7 / 2;
    let ctx = Context::from_json(&config(&format!(r#", "tiers": {{"memory": {{"bytes": {budget}}}}}"#))).unwrap();
    let mut src = Engine::vllm(&kv, 20, false);
    let blocks: Vec<u32> = (0..20).collect();
    src.fill(&kv, &blocks, 320);
    let store = |toks: &[u32]| {
        let job = unsafe { ctx.store(Arc::clone(&src.layout), toks, &blocks, b"") }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        job.progress()
    };
    let a = tokens(128, 10);
    assert_eq!(store(&a).chunks_ok, 2);
    let found = ctx.lookup(&a, b"", Some(Duration::from_secs(60)));
    assert_eq!(found.tokens, 128);
    assert_ne!(found.lease, 0);
    assert_eq!(ctx.active_leases(), 1);
    // Two more requests' chunks: without the lease, `a` would be evicted.
    store(&tokens(64, 11));
    store(&tokens(64, 12));
    assert_eq!(ctx.lookup(&a, b"", None).tokens, 128, "leased entries were evicted");
    // A load given the lease ends it once fetched.
    let dst = Engine::vllm(&kv, 20, false);
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &a, &blocks, 0, b"", found.lease) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(job.progress().chunks_ok, 2);
    assert_eq!(ctx.active_leases(), 0);
    assert!(!ctx.release_lease(found.lease), "the load consumed the lease");
    // Short leases expire by themselves.
    let short = ctx.lookup(&a, b"", Some(Duration::from_millis(50)));
    assert_eq!(ctx.active_leases(), 1);
    std::thread::sleep(Duration::from_millis(80));
    assert_eq!(ctx.active_leases(), 0);
    assert!(!ctx.release_lease(short.lease));
    let s: serde_json::Value = serde_json::from_str(&ctx.stats_json()).unwrap();
    assert!(s["tiers"][0]["bytes"].as_u64().unwrap() <= budget as u64);
    drop(dst);
}

#[test]
fn a_chunk_counts_only_when_every_tp_rank_stored_it() {
    let kv = fixture();
    let dir = tempfile::tempdir().unwrap();
    let cfg = |rank: u32| {
        format!(
            r#"{{"namespace": {{"model": "smollm2-test", "block_size": {BS}, "tp_world_size": 2, "tp_rank": {rank}}}, "chunk_tokens": {CHUNK}, "decode_threads": 1,
               "tiers": {{"disk": {{"path": "{}", "bytes": 100000000}}}}}}"#,
            dir.path().display()
        )
    };
    let toks = tokens(128, 20);
    let blocks: Vec<u32> = (0..8).collect();
    let mut src = Engine::vllm(&kv, 8, false);
    src.fill(&kv, &blocks, 128);
    let rank0 = Context::from_json(&cfg(0)).unwrap();
    let job = unsafe { rank0.store(Arc::clone(&src.layout), &toks, &blocks, b"") }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(rank0.lookup(&toks, b"", None).tokens, 0, "rank 1's shards are missing");
    drop(rank0);
    let rank1 = Context::from_json(&cfg(1)).unwrap();
    let job = unsafe { rank1.store(Arc::clone(&src.layout), &toks, &blocks, b"") }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    assert_eq!(rank1.lookup(&toks, b"", None).tokens, 128);
}

#[test]
fn many_threads_store_lookup_and_load_at_once() {
    let kv = fixture();
    let budget = 2_000_000u64;
    let ctx = Arc::new(Context::from_json(&config(&format!(r#", "tiers": {{"memory": {{"bytes": {budget}}}}}"#))).unwrap());
    let want = expected(&kv, 2, Level::Default);
    let src = Arc::new(Engine::vllm(&kv, 8, false));
    {
        let blocks: Vec<u32> = (0..8).collect();
        let part = slice_tokens(&kv, 0, 128);
        unsafe { src.layout.scatter_raw(&blocks, &part) }.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(4);
    let threads: Vec<_> = (0..6)
        .map(|t| {
            let ctx = Arc::clone(&ctx);
            let src = Arc::clone(&src);
            let want = want.clone();
            let kv_shape = kv.shape;
            std::thread::spawn(move || {
                let mut loads_ok = 0;
                let mut round = 0u32;
                let dst = Engine::vllm(&kv_fixture_shape(kv_shape), 8, t % 2 == 0);
                let blocks: Vec<u32> = (0..8).rev().collect();
                while Instant::now() < deadline {
                    round += 1;
                    // A few prompts shared by all threads, so stores race on keys.
                    let toks = tokens(128, 100 + (round % 5));
                    let job = unsafe { ctx.store(Arc::clone(&src.layout), &toks, &(0..8).collect::<Vec<u32>>(), b"") }.unwrap();
                    assert!(job.wait(Stage::Done, Some(Duration::from_secs(30))));
                    let found = ctx.lookup(&toks, b"", Some(Duration::from_millis(500)));
                    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", found.lease) }.unwrap();
                    assert!(job.wait(Stage::Done, Some(Duration::from_secs(30))), "load hung");
                    let p = job.progress();
                    // Evicted meanwhile is allowed (reported); wrong data is not.
                    let got = dst.read(&blocks, 128);
                    for c in 0..2u32 {
                        let chunk_blocks: Vec<u32> = blocks[c as usize * 4..c as usize * 4 + 4].to_vec();
                        if chunk_blocks.iter().all(|b| !p.failed_blocks.contains(b)) {
                            let (s, e) = (c as usize * 64, c as usize * 64 + 64);
                            assert_eq!(slice_tokens(&got, s, e), slice_tokens(&want, s, e), "thread {t} round {round}");
                        }
                    }
                    if p.chunks_failed == 0 {
                        loads_ok += 1;
                    }
                }
                loads_ok
            })
        })
        .collect();
    let ok: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert!(ok > 0, "no load succeeded");
    let s: serde_json::Value = serde_json::from_str(&ctx.stats_json()).unwrap();
    assert!(s["tiers"][0]["bytes"].as_u64().unwrap() <= budget, "memory budget exceeded: {s}");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(ctx.active_leases(), 0, "leases leaked");
}

fn kv_fixture_shape(shape: codec::KvShape) -> KvTensors {
    KvTensors { shape, dtype: codec::Dtype::F16, tensors: Vec::new() }
}

#[test]
fn a_table_set_shrinks_chunks_and_a_chunk_of_another_set_is_failed() {
    let kv = fixture();
    let dir = tempfile::tempdir().unwrap();
    // Calibrated once per model and level, on other chunks than most of those stored.
    let (mut sets, entries) = table_set_files(&kv, dir.path(), &[Level::Default]);
    let set = sets.remove(0);
    let set_path = dir.path().join("default.cgts");
    let disk = dir.path().join("disk");
    let tiers = format!(r#", "tiers": {{"disk": {{"path": "{}", "bytes": 100000000}}}}"#, disk.display());
    let with = config(&format!(r#"{tiers}, "tables": {{{}}}"#, entries[0]));
    let without = config(&tiers);
    let toks = tokens(320, 11);
    let blocks: Vec<u32> = (0..20).collect();
    let mut src = Engine::vllm(&kv, 20, false);
    src.fill(&kv, &blocks, 320);

    let mut stored = Vec::new();
    for cfg in [&with, &without] {
        let ctx = Context::from_json(cfg).unwrap();
        let job = unsafe { ctx.store(Arc::clone(&src.layout), &toks, &blocks, b"") }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        let p = job.progress();
        // The set is part of the namespace: the second context finds none of the first one's chunks.
        assert_eq!((p.chunks_ok, p.chunks_skipped, p.chunks_failed), (5, 0, 0), "{:?}", p.errors);
        let stats: serde_json::Value = serde_json::from_str(&ctx.stats_json()).unwrap();
        stored.push(stats["counters"]["store_bytes_encoded"].as_u64().unwrap());
    }
    // 64-token chunks carry tables worth a large share of their bytes.
    assert!((stored[0] as f64) < 0.85 * stored[1] as f64, "with the set {} bytes, embedded {}", stored[0], stored[1]);

    // Every stored chunk references the set, and loads decode it to what the codec gives.
    let ctx = Context::from_json(&with).unwrap();
    let ns = ctx.config().key_namespace();
    assert_eq!(ns.tables, Some(set.id()));
    let chain = cachegen::keys::chunk_chain(&ns, b"", &toks);
    let keys: Vec<_> = chain.iter().map(|h| cachegen::keys::shard_key(h, 0)).collect();
    {
        let tier = DiskTier::open(&disk, 100_000_000).unwrap();
        for k in &keys {
            let h = codec::format::Header::parse(&tier.get(k).unwrap().unwrap()).unwrap();
            assert!(h.external_tables() && h.table_id == set.id());
        }
    }
    let want = expected(&kv, 5, Level::Default);
    let mut dst = Engine::vllm(&kv, 20, true);
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", 0) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    let p = job.progress();
    assert_eq!((p.chunks_ok, p.chunks_failed), (5, 0), "{:?}", p.errors);
    assert_eq!(dst.read(&blocks, 320), want, "a table-set chunk must decode to the same values as an embedded one");
    drop(ctx);

    // A chunk that references a set the context does not hold (here written
    // under its key by hand) is a failed chunk, never decoded with other tables.
    let other = codec::calibrate_tables(&[&slice_tokens(&kv, 4 * CHUNK, 5 * CHUNK)], &EncodeOptions::level(Level::Default)).unwrap();
    assert_ne!(other.id(), set.id());
    let part = slice_tokens(&kv, 2 * CHUNK, 3 * CHUNK);
    let bad = codec::encode(&part, &EncodeOptions { tables: codec::Tables::External(&other), ..EncodeOptions::level(Level::Default) }).unwrap();
    DiskTier::open(&disk, 100_000_000).unwrap().put(&keys[2], &bad).unwrap();
    let ctx = Context::from_json(&with).unwrap();
    for t in &mut dst.bufs {
        t.fill(0);
    }
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", 0) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    let p = job.progress();
    assert_eq!(p.failed_blocks, (8..12).collect::<Vec<u32>>(), "{:?}", p.errors);
    assert!(p.errors.iter().any(|e| e.contains(&format!("{:016x}", other.id()))), "{:?}", p.errors);
    let got = dst.read(&blocks, 320);
    assert_eq!(slice_tokens(&got, 0, 128), slice_tokens(&want, 0, 128));
    assert_eq!(slice_tokens(&got, 192, 320), slice_tokens(&want, 192, 320));

    // A set calibrated for another shape is refused at the first store or load.
    let mut narrow = kv.clone();
    narrow.shape.heads = 1;
    narrow.tensors = kv.tensors.iter().map(|t| t.chunks(kv.shape.channels() * 2).flat_map(|row| row[..kv.shape.head_dim * 2].to_vec()).collect()).collect();
    let small = Engine::vllm(&narrow, 20, false);
    let err = unsafe { ctx.load(Arc::clone(&small.layout), &toks, &blocks, 0, b"", 0) }.err().expect("refused");
    assert!(err.to_string().contains("table set"), "{err}");
    dst.bufs.clear();

    // Config errors name the field.
    for (json, want) in [
        (format!(r#", "tables": {{"high": "{}"}}"#, set_path.display()), "not stored"),
        (r#", "tables": {"default": "/nonexistent.cgts"}"#.to_string(), "tables.default"),
        (format!(r#", "tables": {{"default": "{}"}}"#, dir.path().join("disk").display()), "tables.default"),
    ] {
        let err = Context::from_json(&config(&json)).err().expect("refused").to_string();
        assert!(err.contains(want), "{err}");
    }
}

#[test]
fn levels_with_their_own_table_sets_load_each_chunk_with_its_levels_set() {
    let kv = fixture();
    let dir = tempfile::tempdir().unwrap();
    let (_, entries) = table_set_files(&kv, dir.path(), &[Level::Compact, Level::Default]);
    let disk = dir.path().join("disk");
    let cfg = config(&format!(
        r#", "tiers": {{"disk": {{"path": "{}", "bytes": 100000000}}}}, "levels": ["compact", "default"], "tables": {{{}}}"#,
        disk.display(),
        entries.join(", ")
    ));
    let toks = tokens(320, 12);
    let blocks: Vec<u32> = (0..20).collect();
    {
        let ctx = Context::from_json(&cfg).unwrap();
        let mut src = Engine::vllm(&kv, 20, false);
        src.fill(&kv, &blocks, 320);
        let job = unsafe { ctx.store(Arc::clone(&src.layout), &toks, &blocks, b"") }.unwrap();
        assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
        assert_eq!(job.progress().chunks_ok, 5, "{:?}", job.progress().errors);
        // Chunk 1 is gone at the default level: the load takes it at compact.
        let ns = ctx.config().level_namespace(Level::Default);
        let chain = cachegen::keys::chunk_chain(&ns, b"", &toks);
        let tier = DiskTier::open(&disk, 100_000_000).unwrap();
        tier.remove(&cachegen::keys::shard_key(&chain[1], 0)).unwrap();
        // Each level's chunks reference that level's set.
        for (i, level) in [Level::Compact, Level::Default].into_iter().enumerate() {
            let ns = ctx.config().level_namespace(level);
            let key = cachegen::keys::shard_key(&cachegen::keys::chunk_chain(&ns, b"", &toks)[0], 0);
            let h = codec::format::Header::parse(&tier.get(&key).unwrap().unwrap()).unwrap();
            assert!(h.external_tables() && Some(h.table_id) == ns.tables && h.level == level.number(), "{i}");
        }
    }
    let ctx = Context::from_json(&cfg).unwrap();
    let mut dst = Engine::vllm(&kv, 20, false);
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", 0) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    let p = job.progress();
    assert_eq!((p.chunks_ok, p.chunks_failed), (5, 0), "{:?}", p.errors);
    let got = dst.read(&blocks, 320);
    for c in 0..5 {
        let level = if c == 1 { Level::Compact } else { Level::Default };
        let part = slice_tokens(&kv, c * CHUNK, (c + 1) * CHUNK);
        let want = codec::decode(&codec::encode(&part, &EncodeOptions::level(level)).unwrap(), None).unwrap();
        assert_eq!(slice_tokens(&got, c * CHUNK, (c + 1) * CHUNK), want, "chunk {c} at {level:?}");
    }
    dst.bufs.clear();
}

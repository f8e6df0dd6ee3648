//! The connector with a real Redis server as the shared tier: two processes
//! share entries; Redis dying during a load ends in failed blocks within the
//! timeout and the next load works once it is back; a truncated value is a
//! failed chunk, never loaded.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cachegen::connector::Context;
use cachegen::pipeline::Stage;

#[path = "common/engine.rs"]
mod engine;
#[path = "common/redis_server.rs"]
mod redis_server;
use engine::*;
use redis_server::RedisServer;

fn redis_config(url: &str, memory: bool) -> String {
    let memory = if memory { r#""memory": {"bytes": 100000000},"# } else { "" };
    format!(
        r#"{{"namespace": {{"model": "smollm2-test", "kv_dtype": "f16", "block_size": {BS}}}, "chunk_tokens": {CHUNK},
            "decode_threads": 2, "load_timeout_ms": 3000,
            "tiers": {{{memory} "redis": {{"url": "{url}", "timeout_ms": 300}}}}}}"#
    )
}

fn store_all(ctx: &Context, src: &Engine, toks: &[u32], blocks: &[u32]) {
    let job = unsafe { ctx.store(Arc::clone(&src.layout), toks, blocks, b"") }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(60))));
    let p = job.progress();
    assert_eq!(p.chunks_failed, 0, "{:?}", p.errors);
}

#[test]
fn two_processes_share_entries_through_redis() {
    let server = RedisServer::start();
    let cfg = redis_config(&server.url(), true);
    let run = |mode: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cachegen"))
            .args(["connector", "--mode", mode, "--json", "--input", FIXTURE, "--config", &cfg])
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let stored = run("store");
    assert_eq!(stored["store"]["chunks_written"], 5);
    // Another process, with its own (empty) memory tier: everything comes from Redis.
    let loaded = run("load");
    assert_eq!(loaded["lookup"]["matched_tokens"], 320);
    assert_eq!(loaded["load"]["verified"], true);
    let tiers = loaded["load"]["stats"]["tiers"].as_array().unwrap();
    let redis = tiers.iter().find(|t| t["name"] == "redis").unwrap();
    assert_eq!(redis["hits"], 5);
}

#[test]
fn redis_dying_during_a_load_fails_blocks_in_time_and_recovers() {
    let mut server = RedisServer::start_with_args(&["--enable-debug-command", "yes"]);
    let kv = fixture();
    let toks = tokens(320, 40);
    let blocks: Vec<u32> = (0..20).collect();
    let mut src = Engine::vllm(&kv, 20, false);
    src.fill(&kv, &blocks, 320);
    let ctx = Context::from_json(&redis_config(&server.url(), false)).unwrap();
    store_all(&ctx, &src, &toks, &blocks);
    assert_eq!(ctx.lookup(&toks, b"", None).tokens, 320);

    // Freeze the server, start a load (its fetches hang on the frozen
    // server), then kill the server under it.
    let port = server.port();
    let sleeper = std::thread::spawn(move || redis_server::command(port, &["DEBUG", "SLEEP", "3"]));
    std::thread::sleep(Duration::from_millis(100));
    let dst = Engine::vllm(&kv, 20, false);
    let t0 = Instant::now();
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", 0) }.unwrap();
    std::thread::sleep(Duration::from_millis(150));
    server.stop();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(5))), "the load hung after Redis died");
    assert!(t0.elapsed() < Duration::from_millis(3500), "took {:?}, beyond the 3 s load timeout", t0.elapsed());
    let p = job.progress();
    assert_eq!(p.failed_blocks, blocks, "every block must be reported failed: {:?}", p.errors);
    let _ = sleeper.join();
    // Lookups while Redis is down find nothing, quickly, without errors.
    let t1 = Instant::now();
    assert_eq!(ctx.lookup(&toks, b"", None).tokens, 0);
    assert!(t1.elapsed() < Duration::from_secs(2));

    // Back up (empty: no persistence): store again, and the same context loads.
    server.restart();
    store_all(&ctx, &src, &toks, &blocks);
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", 0) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(30))));
    let p = job.progress();
    assert_eq!((p.chunks_ok, p.chunks_failed), (5, 0), "{:?}", p.errors);
    assert_eq!(dst.read(&blocks, 320), expected(&kv, 5, cachegen::codec::Level::Default));
}

#[test]
fn a_truncated_redis_value_is_a_failed_chunk() {
    let server = RedisServer::start();
    let kv = fixture();
    let toks = tokens(192, 41);
    let blocks: Vec<u32> = (0..12).collect();
    let mut src = Engine::vllm(&kv, 12, false);
    src.fill(&kv, &blocks, 192);
    let ctx = Context::from_json(&redis_config(&server.url(), false)).unwrap();
    store_all(&ctx, &src, &toks, &blocks);
    // Truncate chunk 2's value behind the library's back.
    let chain = cachegen::keys::chunk_chain(&ctx.config().key_namespace(), b"", &toks);
    let key = format!("cachegen:{}", cachegen::store::key_hex(&cachegen::keys::shard_key(&chain[2], 0)));
    let mut conn = redis::Client::open(server.url()).unwrap().get_connection().unwrap();
    let value: Vec<u8> = redis::cmd("GET").arg(&key).query(&mut conn).unwrap();
    assert!(!value.is_empty(), "the chunk is stored under {key}");
    let _: () = redis::cmd("SET").arg(&key).arg(&value[..value.len() / 2]).query(&mut conn).unwrap();

    let dst = Engine::vllm(&kv, 12, false);
    let job = unsafe { ctx.load(Arc::clone(&dst.layout), &toks, &blocks, 0, b"", 0) }.unwrap();
    assert!(job.wait(Stage::Done, Some(Duration::from_secs(30))));
    let p = job.progress();
    assert_eq!(p.failed_blocks, (8..12).collect::<Vec<u32>>(), "{:?}", p.errors);
    let got = dst.read(&blocks, 192);
    let want = expected(&kv, 3, cachegen::codec::Level::Default);
    assert_eq!(slice_tokens(&got, 0, 128), slice_tokens(&want, 0, 128));
    // The corrupt value was removed.
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut conn).unwrap();
    assert_eq!(exists, 0);
}

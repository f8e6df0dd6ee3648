//! The context's JSON configuration.
//!
//! ```json
//! {
//!   "namespace": {"model": "SmolLM2-135M-Instruct@<weights hash>", "kv_dtype": "f16",
//!                 "tp_world_size": 1, "tp_rank": 0, "block_size": 16},
//!   "chunk_tokens": 256,
//!   "level": "default",
//!   "profile": "profiles/smollm2-135m-instruct.json",
//!   "tables": {"default": "tables/smollm2-default.cgts"},
//!   "tiers": {"memory": {"bytes": 1073741824},
//!             "disk": {"path": "/var/cache/cachegen", "bytes": 10737418240},
//!             "redis": {"url": "redis://127.0.0.1:6379", "timeout_ms": 500}},
//!   "io_threads": 4, "decode_threads": 0, "load_timeout_ms": 30000,
//!   "levels": ["compact", "default", "high"],
//!   "adaptive": {"ttft_slo_ms": 1000, "prefill_tokens_per_s": 30000}
//! }
//! ```
//!
//! `tables` names, per level, a model-level table set file (`cachegen
//! calibrate`; docs/FORMAT.md section 8): chunks stored at that level
//! reference the set instead of carrying their own tables (smaller chunks,
//! less work per load). The set's id is part of the level's key namespace:
//! chunks stored with another set (or none) are never found, rather than
//! found and undecodable; a recalibrated set starts a new namespace.
//!
//! `levels` stores every chunk at each of these levels (keys of one
//! namespace per level); `adaptive` makes loads pick a level per chunk (or
//! leave it for the engine to recompute) from the measured bandwidth so that
//! time-to-first-token meets the SLO (see [`crate::streaming`]). A tier may
//! carry `"link": {"gbps": ..., "latency_ms": ...}` to emulate a network
//! link in front of it.
//!
//! Only `namespace.model` is required. Unknown fields are errors (a typo must
//! not silently fall back to a default). Tiers are tried fastest first
//! (memory, disk, redis); with no `tiers` a 1 GiB memory tier is used.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use std::sync::Arc;

use crate::codec::{Dtype, Level, TableSet};
use crate::keys::Namespace;

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub namespace: NamespaceConfig,
    pub chunk_tokens: usize,
    pub level: Level,
    /// Per-(layer, K/V) step multipliers, already loaded.
    pub profile: Option<crate::profile::Profile>,
    pub tiers: TiersConfig,
    /// Threads that fetch from and write to tiers (they may block on I/O).
    pub io_threads: usize,
    /// Threads that gather, encode, decode and scatter.
    pub decode_threads: usize,
    /// A load's chunks not fetched by then are reported failed.
    pub load_timeout: Duration,
    /// Levels every chunk is stored at, lowest first (always holds `level`).
    pub levels: Vec<Level>,
    /// Bandwidth-adaptive loads (per-chunk level choice and recompute).
    pub adaptive: Option<AdaptiveConfig>,
    /// Model-level table sets per level, already loaded.
    pub tables: Vec<(Level, Arc<TableSet>)>,
}

/// `"adaptive"`: the loader's time-to-first-token target.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdaptiveConfig {
    /// Time-to-first-token target of a load (load, then recompute of the
    /// chunks left to the engine), from the load call.
    pub ttft_slo_ms: f64,
    /// The engine's prefill rate: what recomputing a chunk costs.
    pub prefill_tokens_per_s: f64,
    /// Bandwidth assumed before anything was measured (Gbit/s).
    #[serde(default = "default_initial_gbps")]
    pub initial_gbps: f64,
    /// Once a chunk is left for recompute, leave every later chunk too
    /// (engines such as vLLM recompute from the first failed block on).
    #[serde(default)]
    pub recompute_suffix: bool,
}

fn default_initial_gbps() -> f64 {
    1.0
}

/// `"link"` on a tier: an emulated network link (see [`crate::streaming::link`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkConfig {
    pub gbps: f64,
    #[serde(default)]
    pub latency_ms: f64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Model and weights fingerprint.
    pub model: String,
    #[serde(default = "default_dtype")]
    pub kv_dtype: String,
    #[serde(default = "one")]
    pub tp_world_size: u32,
    #[serde(default)]
    pub tp_rank: u32,
    #[serde(default = "default_block")]
    pub block_size: u32,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TiersConfig {
    pub memory: Option<MemoryConfig>,
    pub disk: Option<DiskConfig>,
    pub redis: Option<RedisConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryConfig {
    pub bytes: u64,
    #[serde(default)]
    pub link: Option<LinkConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub bytes: u64,
    #[serde(default)]
    pub link: Option<LinkConfig>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    pub url: String,
    #[serde(default = "default_redis_timeout")]
    pub timeout_ms: u64,
    /// Expiry of stored entries in seconds (none: Redis' own eviction policy).
    #[serde(default)]
    pub ttl_s: Option<u64>,
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    #[serde(default)]
    pub link: Option<LinkConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    namespace: NamespaceConfig,
    #[serde(default = "default_chunk")]
    chunk_tokens: usize,
    #[serde(default)]
    level: Option<serde_json::Value>,
    #[serde(default)]
    levels: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    adaptive: Option<AdaptiveConfig>,
    #[serde(default)]
    profile: Option<PathBuf>,
    #[serde(default)]
    tables: Option<std::collections::BTreeMap<String, PathBuf>>,
    #[serde(default)]
    tiers: Option<TiersConfig>,
    #[serde(default = "default_io")]
    io_threads: usize,
    #[serde(default)]
    decode_threads: usize,
    #[serde(default = "default_timeout")]
    load_timeout_ms: u64,
}

/// Reads the table sets named in `tables` (level name → file).
fn load_tables(raw: &std::collections::BTreeMap<String, PathBuf>, levels: &[Level]) -> Result<Vec<(Level, Arc<TableSet>)>, String> {
    let mut out: Vec<(Level, Arc<TableSet>)> = Vec::new();
    for (name, path) in raw {
        let level = Level::parse(name).map_err(|e| format!("config: tables: {e}"))?;
        if !levels.contains(&level) {
            return Err(format!("config: tables: level {} is not stored (see levels)", level.name()));
        }
        if level == Level::Lossless {
            return Err("config: tables: the lossless level codes raw bytes and takes no table set".into());
        }
        if out.iter().any(|(l, _)| *l == level) {
            return Err(format!("config: tables: level {} is named twice", level.name()));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("config: tables.{name}: {}: {e}", path.display()))?;
        let set = TableSet::from_bytes(&bytes).map_err(|e| format!("config: tables.{name}: {}: not a table set: {e}", path.display()))?;
        out.push((level, Arc::new(set)));
    }
    Ok(out)
}

fn default_dtype() -> String {
    "f16".into()
}
fn one() -> u32 {
    1
}
fn default_block() -> u32 {
    16
}
fn default_chunk() -> usize {
    256
}
fn parse_level(v: &serde_json::Value) -> Result<Level, String> {
    match v {
        serde_json::Value::String(s) => Level::parse(s),
        serde_json::Value::Number(n) => Level::parse(&n.to_string()),
        other => return Err(format!("must be a name or number, not {other}")),
    }
    .map_err(|e| e.to_string())
}
fn default_io() -> usize {
    4
}
fn default_timeout() -> u64 {
    30_000
}
fn default_redis_timeout() -> u64 {
    500
}
fn default_prefix() -> String {
    "cachegen:".into()
}

/// The KV dtype names the namespace accepts, and the codec dtype they mean.
pub fn parse_dtype(name: &str) -> Option<Dtype> {
    match name {
        "f16" | "float16" | "half" => Some(Dtype::F16),
        "bf16" | "bfloat16" => Some(Dtype::Bf16),
        "f32" | "float32" | "float" => Some(Dtype::F32),
        // FP8 E4M3, coded in its stored units (the engine's scales are not applied).
        "fp8" | "fp8_e4m3" | "f8e4m3" | "float8_e4m3fn" => Some(Dtype::F8E4M3),
        _ => None,
    }
}

impl Config {
    /// Parse and check a JSON configuration. Errors name the offending field.
    pub fn from_json(text: &str) -> Result<Config, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| format!("config: {e}"))?;
        let ns = raw.namespace;
        if ns.model.is_empty() {
            return Err("config: namespace.model must not be empty".into());
        }
        if parse_dtype(&ns.kv_dtype).is_none() {
            if matches!(ns.kv_dtype.as_str(), "fp8_e5m2" | "float8_e5m2" | "f8e5m2") {
                return Err(format!(
                    "config: namespace.kv_dtype {:?}: FP8 E5M2 KV caches are not supported (FP8 E4M3 is: fp8, fp8_e4m3)",
                    ns.kv_dtype
                ));
            }
            return Err(format!("config: namespace.kv_dtype {:?} is not one of f16, bf16, f32, fp8 (e4m3)", ns.kv_dtype));
        }
        if ns.tp_world_size == 0 || ns.tp_rank >= ns.tp_world_size {
            return Err(format!("config: tp_rank {} must be below tp_world_size {}", ns.tp_rank, ns.tp_world_size));
        }
        if ns.block_size == 0 {
            return Err("config: namespace.block_size must be positive".into());
        }
        if raw.chunk_tokens == 0 || raw.chunk_tokens % ns.block_size as usize != 0 || raw.chunk_tokens > 1 << 20 {
            return Err(format!(
                "config: chunk_tokens ({}) must be a positive multiple of block_size ({})",
                raw.chunk_tokens, ns.block_size
            ));
        }
        let level = match &raw.level {
            Some(v) => Some(parse_level(v).map_err(|e| format!("config: level: {e}"))?),
            None => None,
        };
        let (level, levels) = match &raw.levels {
            None => {
                let l = level.unwrap_or(Level::Default);
                (l, vec![l])
            }
            Some(list) => {
                let mut levels = Vec::new();
                for v in list {
                    levels.push(parse_level(v).map_err(|e| format!("config: levels: {e}"))?);
                }
                levels.sort_by_key(|l| l.number());
                levels.dedup();
                if levels.is_empty() {
                    return Err("config: levels must name at least one level".into());
                }
                let l = match level {
                    Some(l) if !levels.contains(&l) => {
                        return Err(format!("config: level {} is not one of levels", l.name()));
                    }
                    Some(l) => l,
                    // The fixed level non-adaptive loads use: default if stored, else the highest.
                    None => *levels.iter().find(|&&l| l == Level::Default).unwrap_or(levels.last().expect("not empty")),
                };
                (l, levels)
            }
        };
        if let Some(a) = &raw.adaptive {
            if !(a.ttft_slo_ms > 0.0 && a.ttft_slo_ms.is_finite()) {
                return Err("config: adaptive.ttft_slo_ms must be positive".into());
            }
            if !(a.prefill_tokens_per_s > 0.0 && a.prefill_tokens_per_s.is_finite()) {
                return Err("config: adaptive.prefill_tokens_per_s must be positive".into());
            }
            if !(a.initial_gbps > 0.0 && a.initial_gbps.is_finite()) {
                return Err("config: adaptive.initial_gbps must be positive".into());
            }
        }
        let profile = match &raw.profile {
            None => None,
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| format!("config: profile {}: {e}", p.display()))?;
                Some(crate::profile::Profile::from_json(&text).map_err(|e| format!("config: profile {}: {e}", p.display()))?)
            }
        };
        let tables = match &raw.tables {
            None => Vec::new(),
            Some(t) => load_tables(t, &levels)?,
        };
        let tiers = raw.tiers.unwrap_or(TiersConfig { memory: Some(MemoryConfig { bytes: 1 << 30, link: None }), disk: None, redis: None });
        for link in [tiers.memory.as_ref().and_then(|t| t.link.as_ref()), tiers.disk.as_ref().and_then(|t| t.link.as_ref()), tiers.redis.as_ref().and_then(|t| t.link.as_ref())].into_iter().flatten() {
            if !(link.gbps > 0.0 && link.gbps.is_finite() && link.latency_ms >= 0.0 && link.latency_ms.is_finite()) {
                return Err("config: a tier's link needs gbps > 0 and latency_ms >= 0".into());
            }
        }
        if tiers.memory.is_none() && tiers.disk.is_none() && tiers.redis.is_none() {
            return Err("config: tiers must name at least one of memory, disk, redis".into());
        }
        if raw.io_threads == 0 || raw.io_threads > 256 || raw.decode_threads > 1024 {
            return Err("config: io_threads must be 1..=256 and decode_threads 0 (auto)..=1024".into());
        }
        let decode_threads = if raw.decode_threads == 0 {
            std::thread::available_parallelism().map_or(2, |n| n.get())
        } else {
            raw.decode_threads
        };
        if raw.load_timeout_ms == 0 {
            return Err("config: load_timeout_ms must be positive".into());
        }
        Ok(Config {
            namespace: ns,
            chunk_tokens: raw.chunk_tokens,
            level,
            profile,
            tiers,
            io_threads: raw.io_threads,
            decode_threads,
            load_timeout: Duration::from_millis(raw.load_timeout_ms),
            levels,
            adaptive: raw.adaptive,
            tables,
        })
    }

    /// The KV dtype the namespace declares.
    pub fn dtype(&self) -> Dtype {
        parse_dtype(&self.namespace.kv_dtype).expect("checked in from_json")
    }

    /// The namespace that keys are derived from (the dtype by its canonical
    /// name, so `half` and `f16` share entries).
    pub fn key_namespace(&self) -> Namespace {
        self.level_namespace(self.level)
    }

    /// The key namespace of chunks stored at `level`.
    pub fn level_namespace(&self, level: Level) -> Namespace {
        Namespace {
            model: self.namespace.model.clone(),
            kv_dtype: self.dtype().name().into(),
            tp_world_size: self.namespace.tp_world_size,
            block_size: self.namespace.block_size,
            chunk_tokens: self.chunk_tokens as u32,
            level: level.number(),
            tables: self.tables.iter().find(|(l, _)| *l == level).map(|(_, s)| s.id()),
        }
    }
}

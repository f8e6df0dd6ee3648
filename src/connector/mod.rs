//! The engine-facing core: a [`Context`] holds a configuration, the storage
//! tiers and the background pipeline, and turns an engine's requests
//! (token ids plus the block ids that hold them) into chunk jobs.
//!
//! - **store**: every full chunk of the tokens not stored yet is gathered from
//!   the engine's blocks, encoded and written to every tier.
//! - **lookup**: how many leading tokens are loadable (whole chunks whose
//!   shards from every TP rank are present); optionally leases them.
//! - **load**: full chunks are fetched, verified, decoded and scattered into
//!   the engine's blocks layer by layer; failures are reported per block.
//!
//! Token `i` of a request lives in block `block_ids[i / block_size]`; that is
//! the only mapping between tokens and memory, so the same chunk can be
//! stored from one layout and loaded into any other of the same namespace.

pub mod config;

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

pub use config::Config;

use crate::codec::{DecodeLimits, Dtype, Level};
use crate::keys::{chunk_chain, shard_key, Namespace};
use crate::gpu::GpuError;
use crate::layout::{KvLayout, LayoutError, Memory};
use crate::pipeline::{DeviceSide, DeviceTarget, Job, LoadChunk, LoadSpec, Pipeline, StatsSnapshot, StoreChunk, StoreSpec, StreamPlan, TableSets};
use crate::store::{DiskTier, Key, MemoryTier, RedisOptions, RedisTier, StoreError, Tier, TierStack};
use crate::streaming::adaptive::Planner;
use crate::streaming::{Estimator, Link, ShapedTier, StreamStats};

/// What a context call can fail with. Every error is detected before any
/// work is queued; failures of individual chunks are reported by the job.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("{0}")]
    Config(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("storage: {0}")]
    Store(#[from] StoreError),
    #[error("cannot start worker threads: {0}")]
    Threads(String),
    /// The layout is in GPU memory and the GPU path cannot run here.
    #[error("{0}")]
    NoGpu(String),
    /// A combination this build does not handle.
    #[error("not supported: {0}")]
    Unsupported(String),
}

/// What `lookup` found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LookupResult {
    /// Leading tokens that can be loaded (a multiple of the chunk size).
    pub tokens: usize,
    /// Lease id (0: none was asked for, or nothing was found).
    pub lease: u64,
}

struct Lease {
    keys: Vec<Key>,
    until: Instant,
}

#[derive(Default)]
struct Leases {
    next: u64,
    active: HashMap<u64, Lease>,
    /// Live leases per key.
    count: HashMap<Key, usize>,
}

impl Leases {
    /// Drops `id`, unpinning keys no other lease holds. Returns whether it existed.
    fn end(&mut self, id: u64, tiers: &TierStack) -> bool {
        let Some(lease) = self.active.remove(&id) else { return false };
        for k in lease.keys {
            if let Some(n) = self.count.get_mut(&k) {
                *n -= 1;
                if *n == 0 {
                    self.count.remove(&k);
                    tiers.unpin(&k);
                }
            }
        }
        true
    }

    fn expire(&mut self, now: Instant, tiers: &TierStack) {
        let dead: Vec<u64> = self.active.iter().filter(|(_, l)| l.until <= now).map(|(&id, _)| id).collect();
        for id in dead {
            self.end(id, tiers);
        }
    }
}

/// One engine's (or one TP rank's) connection to the cache.
pub struct Context {
    config: Config,
    ns: Namespace,
    dtype: Dtype,
    tiers: TierStack,
    pipeline: Pipeline,
    leases: Arc<Mutex<Leases>>,
    /// One key namespace per stored level, lowest level first.
    level_ns: Vec<(Level, Namespace)>,
    sstats: Arc<StreamStats>,
    estimator: Arc<Estimator>,
    /// GPU kernels per CUDA device, opened at the first job on that device.
    devices: Mutex<HashMap<usize, Arc<DeviceSide>>>,
    /// Model-level table sets from the config.
    tables: Arc<TableSets>,
}

/// `tier` behind an emulated link, if the config gives it one.
fn with_link(tier: Arc<dyn Tier>, link: Option<&config::LinkConfig>) -> Arc<dyn Tier> {
    match link {
        None => tier,
        Some(l) => Arc::new(ShapedTier::new(tier, Link::gbps(l.gbps, Duration::from_secs_f64(l.latency_ms / 1e3)))),
    }
}

fn init_tracing() {
    // Opt-in logging for programs that have no tracing subscriber of their
    // own (C, Python): CACHEGEN_LOG=info (or debug, trace) to stderr.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("CACHEGEN_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    }
}

impl Context {
    /// A context from JSON (see [`config`]).
    pub fn from_json(json: &str) -> Result<Context, ConnectorError> {
        Context::new(Config::from_json(json).map_err(ConnectorError::Config)?)
    }

    /// Opens the configured tiers (memory, disk, redis: fastest first) and
    /// starts the worker threads. A Redis server that is down does not fail
    /// this: its operations fail (and are reported) until it is back.
    pub fn new(config: Config) -> Result<Context, ConnectorError> {
        init_tracing();
        let mut tiers: Vec<Arc<dyn Tier>> = Vec::new();
        if let Some(m) = &config.tiers.memory {
            tiers.push(with_link(Arc::new(MemoryTier::new(m.bytes)), m.link.as_ref()));
        }
        if let Some(d) = &config.tiers.disk {
            tiers.push(with_link(Arc::new(DiskTier::open(&d.path, d.bytes)?), d.link.as_ref()));
        }
        if let Some(r) = &config.tiers.redis {
            let opts = RedisOptions {
                timeout: Duration::from_millis(r.timeout_ms),
                key_prefix: r.key_prefix.clone(),
                ttl: r.ttl_s.map(Duration::from_secs),
            };
            tiers.push(with_link(Arc::new(RedisTier::open(&r.url, opts)?), r.link.as_ref()));
        }
        let pipeline = Pipeline::new(config.io_threads, config.decode_threads).map_err(|e| ConnectorError::Threads(e.to_string()))?;
        tracing::info!(model = %config.namespace.model, tiers = tiers.len(), level = config.level.name(), "context created");
        let initial = config.adaptive.as_ref().map_or(1.0, |a| a.initial_gbps) * 1e9 / 8.0;
        Ok(Context {
            level_ns: config.levels.iter().map(|&l| (l, config.level_namespace(l))).collect(),
            sstats: Arc::new(StreamStats::default()),
            estimator: Arc::new(Estimator::new(initial)),
            ns: config.key_namespace(),
            dtype: config.dtype(),
            tiers: TierStack::new(tiers),
            pipeline,
            leases: Arc::new(Mutex::new(Leases::default())),
            devices: Mutex::new(HashMap::new()),
            tables: Arc::new(TableSets::new(&config.tables)),
            config,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// What loads have learned about the links and the decoder.
    pub fn estimator(&self) -> &Arc<Estimator> {
        &self.estimator
    }

    /// Whether chunks are stored at more than one level.
    fn multi_level(&self) -> bool {
        self.level_ns.len() > 1
    }

    /// Per chunk of `tokens`: the chain hash in each level's namespace,
    /// lowest level first.
    fn level_chains(&self, salt: &[u8], tokens: &[u32]) -> Vec<Vec<(Level, [u8; 16])>> {
        let per: Vec<(Level, Vec<[u8; 16]>)> = self.level_ns.iter().map(|(l, ns)| (*l, chunk_chain(ns, salt, tokens))).collect();
        let n = per.first().map_or(0, |p| p.1.len());
        (0..n).map(|c| per.iter().map(|(l, ch)| (*l, ch[c])).collect()).collect()
    }

    pub fn chunk_tokens(&self) -> usize {
        self.config.chunk_tokens
    }

    fn rank(&self) -> u32 {
        self.config.namespace.tp_rank
    }

    /// Checks that `layout` can serve this context: its block size and dtype
    /// are the namespace's, and its geometry is valid.
    pub fn check_layout(&self, layout: &KvLayout) -> Result<(), ConnectorError> {
        layout.validate()?;
        if layout.block_size != self.config.namespace.block_size as usize {
            return Err(ConnectorError::InvalidArgument(format!(
                "layout block_size {} differs from the namespace's {}",
                layout.block_size, self.config.namespace.block_size
            )));
        }
        if layout.dtype != self.dtype {
            return Err(ConnectorError::InvalidArgument(format!(
                "layout dtype {} differs from the namespace's {}",
                layout.dtype.name(),
                self.dtype.name()
            )));
        }
        // A table set fits only the shape it was calibrated for.
        let shape = layout.chunk_shape(1);
        for (level, set) in &self.config.tables {
            if set.channels != shape.channels() || set.plan != level.plan(&shape, self.dtype) {
                return Err(ConnectorError::InvalidArgument(format!(
                    "the {} table set {:016x} was calibrated for {} channels and {} planes of another coding; this layout has {} channels and {} tensors",
                    level.name(),
                    set.id(),
                    set.channels,
                    set.plan.len(),
                    shape.channels(),
                    shape.tensors()
                )));
            }
        }
        Ok(())
    }

    /// The GPU side for a job on `layout` (none for host memory), ordered
    /// after the work the engine enqueued on `stream` so far, if given.
    fn device_target(&self, layout: &KvLayout, stream: Option<u64>) -> Result<Option<DeviceTarget>, ConnectorError> {
        let Memory::Cuda { device } = layout.memory else {
            return Ok(None);
        };
        let side = {
            let mut devs = self.devices.lock();
            match devs.get(&device) {
                Some(s) => Arc::clone(s),
                None => {
                    let s = DeviceSide::open(device).map_err(|e| match e {
                        GpuError::NoGpu(m) => ConnectorError::NoGpu(format!("no GPU: {m}")),
                        e => ConnectorError::NoGpu(format!("GPU device {device} cannot be used: {e}")),
                    })?;
                    // Upload the table sets now: the first job on the device
                    // (usually a store) pays for it, not the first load.
                    for (level, set) in &self.config.tables {
                        if let Err(e) = s.tables(set) {
                            tracing::warn!(device, level = level.name(), error = %e, "table set upload failed; loads of its chunks will retry");
                        }
                    }
                    tracing::info!(device, name = s.gpu.name(), "GPU path ready");
                    devs.insert(device, Arc::clone(&s));
                    s
                }
            }
        };
        let after = match stream {
            Some(st) => Some(side.mark(st).map_err(|e| ConnectorError::InvalidArgument(format!("cannot record an event on the given CUDA stream: {e}")))?),
            None => None,
        };
        Ok(Some(DeviceTarget { side, after }))
    }

    /// Leading tokens of `tokens` that can be loaded: whole chunks, each
    /// present for every TP rank in some tier. Reads only key presence.
    /// With `lease`, this rank's entries found are pinned in the tiers that
    /// can pin (memory, disk) for that long, or until the lease is released
    /// or a load given the lease has fetched them.
    pub fn lookup(&self, tokens: &[u32], salt: &[u8], lease: Option<Duration>) -> LookupResult {
        let t0 = Instant::now();
        let _span = tracing::debug_span!("cachegen.lookup", tokens = tokens.len()).entered();
        let world = self.config.namespace.tp_world_size;
        let mut found = 0;
        // Per chunk found: this rank's keys present (the ones a lease pins).
        let mut present: Vec<Vec<Key>> = Vec::new();
        if self.multi_level() {
            // A chunk counts when every rank has it at some level.
            for levels in self.level_chains(salt, tokens) {
                let mut mine = Vec::new();
                let all = (0..world).all(|r| {
                    let mut any = false;
                    for (_, h) in &levels {
                        let k = shard_key(h, r);
                        if self.tiers.contains(&k) {
                            any = true;
                            if r == self.rank() {
                                mine.push(k);
                            } else {
                                break;
                            }
                        }
                    }
                    any
                });
                if !all {
                    break;
                }
                present.push(mine);
                found += 1;
            }
        } else {
            let chain = chunk_chain(&self.ns, salt, tokens);
            for h in &chain {
                if !(0..world).all(|r| self.tiers.contains(&shard_key(h, r))) {
                    break;
                }
                present.push(vec![shard_key(h, self.rank())]);
                found += 1;
            }
        }
        let stats = self.pipeline.stats();
        crate::pipeline::Stats::add(&stats.lookups, 1);
        crate::pipeline::Stats::add(&stats.lookup_chunks_hit, found as u64);
        crate::pipeline::Stats::add(&stats.lookup_tokens_hit, (found * self.chunk_tokens()) as u64);
        let mut lease_id = 0;
        if let (Some(ttl), true) = (lease, found > 0) {
            let until = Instant::now() + ttl;
            let keys: Vec<Key> = present.into_iter().flatten().collect();
            let mut leases = self.leases.lock();
            leases.expire(Instant::now(), &self.tiers);
            for k in &keys {
                self.tiers.pin(k, until);
                *leases.count.entry(*k).or_insert(0) += 1;
            }
            leases.next += 1;
            lease_id = leases.next;
            leases.active.insert(lease_id, Lease { keys, until });
            crate::pipeline::Stats::add(&stats.leases_granted, 1);
        }
        tracing::debug!(chunks = found, tokens = found * self.chunk_tokens(), lease = lease_id, us = t0.elapsed().as_micros() as u64, "lookup");
        LookupResult { tokens: found * self.chunk_tokens(), lease: lease_id }
    }

    /// Ends a lease early. Returns false if it had already ended (released,
    /// expired, or consumed by a load).
    pub fn release_lease(&self, id: u64) -> bool {
        let mut leases = self.leases.lock();
        leases.expire(Instant::now(), &self.tiers);
        leases.end(id, &self.tiers)
    }

    /// Leases not yet ended.
    pub fn active_leases(&self) -> usize {
        let mut leases = self.leases.lock();
        leases.expire(Instant::now(), &self.tiers);
        leases.active.len()
    }

    /// Blocks `block_ids[first..last]` for tokens `[start, end)`, checking
    /// that the list is long enough.
    fn blocks_for(&self, block_ids: &[u32], start: usize, end: usize) -> Result<Vec<u32>, ConnectorError> {
        let bs = self.config.namespace.block_size as usize;
        let (first, last) = (start / bs, end.div_ceil(bs));
        block_ids.get(first..last).map(|b| b.to_vec()).ok_or_else(|| {
            ConnectorError::InvalidArgument(format!("{} block ids cover {} tokens; {end} are needed", block_ids.len(), block_ids.len() * bs))
        })
    }

    fn check_blocks(layout: &KvLayout, blocks: &[u32]) -> Result<(), ConnectorError> {
        let mut seen = blocks.to_vec();
        seen.sort_unstable();
        if let Some(&b) = seen.last().filter(|&&b| b as usize >= layout.num_blocks) {
            return Err(LayoutError::BlockOutOfRange { id: b, num_blocks: layout.num_blocks }.into());
        }
        if let Some(w) = seen.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConnectorError::InvalidArgument(format!("block id {} is used twice", w[0])));
        }
        Ok(())
    }

    /// Starts storing every full chunk of `tokens` that is not stored yet,
    /// reading it from `block_ids` (token `i` in `block_ids[i / block_size]`).
    ///
    /// # Safety
    /// `layout`'s `layer_base` entries are host pointers (or device addresses
    /// for a `Memory::Cuda` layout); all of its memory must stay valid, and
    /// the blocks used unchanged, until the job is reusable.
    pub unsafe fn store(&self, layout: Arc<KvLayout>, tokens: &[u32], block_ids: &[u32], salt: &[u8]) -> Result<Arc<Job>, ConnectorError> {
        // SAFETY: forwarded.
        unsafe { self.store_on(layout, tokens, block_ids, salt, None) }
    }

    /// [`Context::store`]; for a layout in GPU memory, the gather is ordered
    /// after the work enqueued so far on the engine's CUDA `stream` (a raw
    /// `CUstream`; 0 is the legacy default stream).
    ///
    /// # Safety
    /// As for [`Context::store`]; `stream` must be a live stream of the
    /// layout's device (its primary context).
    pub unsafe fn store_on(&self, layout: Arc<KvLayout>, tokens: &[u32], block_ids: &[u32], salt: &[u8], stream: Option<u64>) -> Result<Arc<Job>, ConnectorError> {
        self.check_layout(&layout)?;
        let _span = tracing::debug_span!("cachegen.store", tokens = tokens.len()).entered();
        if self.multi_level() {
            return self.store_levels(layout, tokens, block_ids, salt, stream);
        }
        let chunk = self.chunk_tokens();
        let chain = chunk_chain(&self.ns, salt, tokens);
        let mut chunks = Vec::new();
        let mut skipped = 0;
        let mut used = Vec::new();
        for (c, h) in chain.iter().enumerate() {
            let blocks = self.blocks_for(block_ids, c * chunk, (c + 1) * chunk)?;
            used.extend_from_slice(&blocks);
            let key = shard_key(h, self.rank());
            if self.tiers.contains(&key) {
                skipped += 1;
            } else {
                chunks.push(StoreChunk { key, blocks });
            }
        }
        Self::check_blocks(&layout, &used)?;
        let multipliers = match &self.config.profile {
            Some(p) => Some(p.multipliers(&layout.chunk_shape(chunk)).map_err(ConnectorError::Config)?),
            None => None,
        };
        let device = if chunks.is_empty() { None } else { self.device_target(&layout, stream)? };
        Ok(self.pipeline.store(StoreSpec {
            device,
            layout,
            chunk_tokens: chunk,
            chunks,
            skipped,
            tiers: self.tiers.clone(),
            level: self.config.level,
            multipliers,
            tables: self.tables.for_store(self.config.level).cloned(),
        }))
    }

    /// The multi-level store: every chunk at every configured level.
    /// From GPU memory, the chunks are gathered on the device and every
    /// level is encoded on the host.
    unsafe fn store_levels(&self, layout: Arc<KvLayout>, tokens: &[u32], block_ids: &[u32], salt: &[u8], stream: Option<u64>) -> Result<Arc<Job>, ConnectorError> {
        let chunk = self.chunk_tokens();
        let mut chunks = Vec::new();
        let mut skipped = 0;
        let mut used = Vec::new();
        for (c, levels) in self.level_chains(salt, tokens).into_iter().enumerate() {
            let blocks = self.blocks_for(block_ids, c * chunk, (c + 1) * chunk)?;
            used.extend_from_slice(&blocks);
            let keys: Vec<(Level, Key)> =
                levels.iter().map(|(l, h)| (*l, shard_key(h, self.rank()))).filter(|(_, k)| !self.tiers.contains(k)).collect();
            if keys.is_empty() {
                skipped += 1;
            } else {
                chunks.push(crate::streaming::store::LevelChunk { keys, blocks });
            }
        }
        Self::check_blocks(&layout, &used)?;
        let multipliers = match &self.config.profile {
            Some(p) => Some(p.multipliers(&layout.chunk_shape(chunk)).map_err(ConnectorError::Config)?),
            None => None,
        };
        let device = if chunks.is_empty() { None } else { self.device_target(&layout, stream)? };
        Ok(crate::streaming::store::store_levels(
            &self.pipeline,
            crate::streaming::store::LevelStoreSpec {
                device,
                layout,
                chunk_tokens: chunk,
                chunks,
                skipped,
                tiers: self.tiers.clone(),
                multipliers,
                sstats: Arc::clone(&self.sstats),
                tables: Arc::clone(&self.tables),
            },
        ))
    }

    /// Starts loading the full chunks of `tokens` into `block_ids`, skipping
    /// the first `first_token` tokens (already in the engine; a multiple of
    /// the block size). Chunks that cannot be loaded are reported by the job
    /// as failed blocks. `lease` (from [`Context::lookup`]) ends once every
    /// chunk has been fetched.
    ///
    /// # Safety
    /// `layout`'s `layer_base` entries are host pointers (or device addresses
    /// for a `Memory::Cuda` layout); the destination blocks must stay valid
    /// and unused by anything else until the job is done (a layer's blocks:
    /// until that layer is complete).
    pub unsafe fn load(
        &self,
        layout: Arc<KvLayout>,
        tokens: &[u32],
        block_ids: &[u32],
        first_token: usize,
        salt: &[u8],
        lease: u64,
    ) -> Result<Arc<Job>, ConnectorError> {
        // SAFETY: forwarded.
        unsafe { self.load_on(layout, tokens, block_ids, first_token, salt, lease, None) }
    }

    /// [`Context::load`]; for a layout in GPU memory the decode runs on the
    /// GPU, ordered after the work enqueued so far on the engine's CUDA
    /// `stream`, and [`Job::wait_layer_on_stream`] makes the engine's stream
    /// wait for each layer.
    ///
    /// # Safety
    /// As for [`Context::load`]; `stream` must be a live stream of the
    /// layout's device (its primary context).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn load_on(
        &self,
        layout: Arc<KvLayout>,
        tokens: &[u32],
        block_ids: &[u32],
        first_token: usize,
        salt: &[u8],
        lease: u64,
        stream: Option<u64>,
    ) -> Result<Arc<Job>, ConnectorError> {
        self.check_layout(&layout)?;
        let _span = tracing::debug_span!("cachegen.load", tokens = tokens.len(), first_token).entered();
        let bs = self.config.namespace.block_size as usize;
        if first_token % bs != 0 {
            return Err(ConnectorError::InvalidArgument(format!("first_token {first_token} is not a multiple of the block size {bs}")));
        }
        let chunk = self.chunk_tokens();
        let chain = chunk_chain(&self.ns, salt, tokens);
        let streamed = self.multi_level() || self.config.adaptive.is_some();
        let level_chains = if streamed { self.level_chains(salt, tokens) } else { Vec::new() };
        let mut chunks = Vec::new();
        let mut level_keys = Vec::new();
        let mut used = Vec::new();
        for (c, h) in chain.iter().enumerate() {
            let (start, end) = (c * chunk, (c + 1) * chunk);
            if end <= first_token {
                continue;
            }
            let skip = first_token.saturating_sub(start);
            let blocks = self.blocks_for(block_ids, start + skip, end)?;
            used.extend_from_slice(&blocks);
            chunks.push(LoadChunk { key: shard_key(h, self.rank()), skip_tokens: skip, blocks });
            if streamed {
                level_keys.push(level_chains[c].iter().map(|(l, h)| (*l, shard_key(h, self.rank()))).collect::<Vec<_>>());
            }
        }
        Self::check_blocks(&layout, &used)?;
        let on_fetched: Option<Box<dyn FnOnce() + Send>> = if lease != 0 {
            let leases: Weak<Mutex<Leases>> = Arc::downgrade(&self.leases);
            let tiers = self.tiers.clone();
            Some(Box::new(move || {
                if let Some(l) = leases.upgrade() {
                    l.lock().end(lease, &tiers);
                }
            }))
        } else {
            None
        };
        let device = if chunks.is_empty() { None } else { self.device_target(&layout, stream)? };
        let spec = LoadSpec {
            device,
            layout,
            chunk_tokens: chunk,
            chunks,
            timeout: self.config.load_timeout,
            tiers: self.tiers.clone(),
            limits: DecodeLimits::default(),
            on_fetched,
            tables: Arc::clone(&self.tables),
        };
        if !streamed {
            return Ok(self.pipeline.load(spec));
        }
        let planner = self.config.adaptive.as_ref().map(|a| Planner {
            slo_s: a.ttft_slo_ms / 1e3,
            prefill_tokens_per_s: a.prefill_tokens_per_s,
            chunk_tokens: chunk,
            levels: self.config.levels.clone(),
            recompute_suffix: a.recompute_suffix,
        });
        Ok(self.pipeline.load_streamed(
            spec,
            StreamPlan {
                keys: level_keys,
                planner,
                prefer: self.config.level,
                estimator: Arc::clone(&self.estimator),
                stats: Arc::clone(&self.sstats),
                decode_threads: self.config.decode_threads,
            },
        ))
    }

    pub fn counters(&self) -> StatsSnapshot {
        self.pipeline.stats().snapshot()
    }

    /// Statistics as JSON: counters, derived throughputs, every tier's stats,
    /// leases and queue depths.
    pub fn stats_json(&self) -> String {
        let c = self.counters();
        let per_s = |bytes: u64, ns: u64| if ns == 0 { 0.0 } else { bytes as f64 / ns as f64 };
        let tiers: Vec<serde_json::Value> = self
            .tiers
            .stats()
            .into_iter()
            .map(|(name, s)| {
                let mut v = serde_json::to_value(s).unwrap_or_default();
                v["name"] = name.into();
                v
            })
            .collect();
        let (io_q, cpu_q) = self.pipeline.queued();
        serde_json::json!({
            "namespace": {
                "model": self.config.namespace.model,
                "kv_dtype": self.dtype.name(),
                "tp_world_size": self.config.namespace.tp_world_size,
                "tp_rank": self.config.namespace.tp_rank,
                "block_size": self.config.namespace.block_size,
                "chunk_tokens": self.chunk_tokens(),
                "level": self.config.level.name(),
            },
            "counters": c,
            "throughput": {
                "decode_gbytes_per_s": per_s(c.load_bytes_decoded, c.decode_ns),
                "encode_gbytes_per_s": per_s(c.store_bytes_raw, c.encode_ns),
                "compression_ratio": if c.store_bytes_encoded == 0 { 0.0 } else { c.store_bytes_raw as f64 / c.store_bytes_encoded as f64 },
            },
            "tiers": tiers,
            "streaming": self.sstats.json(&self.config.levels),
            "leases_active": self.active_leases(),
            "queued": {"io": io_q, "cpu": cpu_q},
        })
        .to_string()
    }
}

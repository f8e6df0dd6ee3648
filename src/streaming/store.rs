//! Multi-level store: gather each chunk once (on the GPU for a layout in
//! device memory), encode it at every configured level on the host, write
//! each level under its own key (one namespace per level).

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::StreamStats;
use crate::codec::{encode, EncodeOptions, KvTensors, Level, Tables};
use crate::layout::KvLayout;
use crate::pipeline::{gather_chunks, guarded, DeviceTarget, Job, JobKind, Pipeline, Stats, TableSets};
use crate::store::{Key, TierStack};

pub(crate) struct LevelChunk {
    /// The levels still to write, with their keys.
    pub keys: Vec<(Level, Key)>,
    pub blocks: Vec<u32>,
}

pub(crate) struct LevelStoreSpec {
    pub layout: Arc<KvLayout>,
    pub chunk_tokens: usize,
    pub chunks: Vec<LevelChunk>,
    pub skipped: usize,
    pub tiers: TierStack,
    pub multipliers: Option<Vec<f32>>,
    pub sstats: Arc<StreamStats>,
    /// The model-level table sets (per level, the one stores encode with).
    pub tables: Arc<TableSets>,
    /// Set when `layout` is in GPU memory: gather there, encode every level
    /// here.
    pub device: Option<DeviceTarget>,
}

/// Levels of a chunk not yet written, and the chunk's first error.
type ChunkLeft = (usize, Option<String>);

struct Run {
    job: Arc<Job>,
    spec: LevelStoreSpec,
    stats: Arc<Stats>,
    /// Chunks not yet done, and per chunk (levels not yet written, first error).
    left: Mutex<(usize, Vec<ChunkLeft>)>,
}

pub(crate) fn store_levels(p: &Pipeline, spec: LevelStoreSpec) -> Arc<Job> {
    let job = Arc::new(Job::new(p.job_id(), JobKind::Store, spec.layout.layers));
    let stats = Arc::clone(p.stats());
    Stats::add(&stats.stores, 1);
    Stats::add(&stats.store_chunks_skipped, spec.skipped as u64);
    let n = spec.chunks.len();
    job.update(|pr| pr.chunks_skipped = spec.skipped);
    tracing::debug!(job = job.id, chunks = n, skipped = spec.skipped, "multi-level store submitted");
    if n == 0 {
        job.update(|pr| {
            pr.reusable = true;
            pr.done = true;
        });
        return job;
    }
    let per: Vec<ChunkLeft> = spec.chunks.iter().map(|c| (c.keys.len(), None)).collect();
    let run = Arc::new(Run { job: Arc::clone(&job), spec, stats, left: Mutex::new((n, per)) });
    let cpu = p.cpu_tx();
    let io = p.io_tx();
    let cpu2 = cpu.clone();
    let _ = cpu.send(Box::new(move || {
        let t0 = Instant::now();
        let blocks: Vec<&[u32]> = run.spec.chunks.iter().map(|c| c.blocks.as_slice()).collect();
        // SAFETY: the engine keeps the source blocks valid and unchanged
        // until this job is reusable (set below).
        let gathered = unsafe { gather_chunks(&run.spec.layout, &blocks, run.spec.chunk_tokens, run.spec.device.as_ref()) };
        Stats::add(&run.stats.gather_ns, t0.elapsed().as_nanos() as u64);
        run.job.update(|pr| pr.reusable = true);
        for (i, g) in gathered.into_iter().enumerate() {
            match g {
                Err(why) => {
                    for _ in 0..run.spec.chunks[i].keys.len() {
                        run.level_done(i, Err(format!("gather: {why}")));
                    }
                }
                Ok(kv) => {
                    let raw = kv.tensors.iter().map(|t| t.len()).sum::<usize>() as u64;
                    Stats::add(&run.stats.store_bytes_raw, raw);
                    StreamStats::add(&run.spec.sstats.stored_raw_bytes, raw);
                    let kv = Arc::new(kv);
                    for li in 0..run.spec.chunks[i].keys.len() {
                        let (run, kv, io) = (Arc::clone(&run), Arc::clone(&kv), io.clone());
                        let _ = cpu2.send(Box::new(move || run.encode_level(i, li, &kv, &io)));
                    }
                }
            }
        }
    }));
    job
}

impl Run {
    fn encode_level(self: &Arc<Self>, i: usize, li: usize, kv: &KvTensors, io: &crossbeam_channel::Sender<crate::pipeline::Task>) {
        let (level, key) = self.spec.chunks[i].keys[li];
        let t0 = Instant::now();
        let encoded = guarded(|| {
            let tables = match self.spec.tables.for_store(level) {
                Some(set) => Tables::External(set),
                None => Tables::Embedded,
            };
            let opts = EncodeOptions { level: Some(level), profile: self.spec.multipliers.clone(), tables, ..Default::default() };
            encode(kv, &opts).map_err(|e| format!("encode {}: {e}", level.name()))
        });
        Stats::add(&self.stats.encode_ns, t0.elapsed().as_nanos() as u64);
        match encoded {
            Err(why) => self.level_done(i, Err(why)),
            Ok(bytes) => {
                let run = Arc::clone(self);
                let _ = io.send(Box::new(move || {
                    let t0 = Instant::now();
                    let (ok, errors) = run.spec.tiers.put_all(&key, &bytes);
                    Stats::add(&run.stats.write_ns, t0.elapsed().as_nanos() as u64);
                    for (tier, e) in &errors {
                        tracing::warn!(job = run.job.id, chunk = i, level = level.name(), tier = %tier, error = %e, "tier write failed");
                    }
                    let result = if ok > 0 {
                        Stats::add(&run.stats.store_bytes_encoded, bytes.len() as u64);
                        let li = level.number() as usize - 1;
                        StreamStats::add(&run.spec.sstats.stored_chunks[li], 1);
                        StreamStats::add(&run.spec.sstats.stored_bytes[li], bytes.len() as u64);
                        tracing::trace!(job = run.job.id, chunk = i, level = level.name(), bytes = bytes.len(), "level stored");
                        Ok(())
                    } else {
                        let msgs: Vec<String> = errors.iter().map(|(t, e)| format!("{t}: {e}")).collect();
                        Err(format!("no tier took level {}: {}", level.name(), msgs.join("; ")))
                    };
                    run.level_done(i, result);
                }));
            }
        }
    }

    /// One level of chunk `i` is written or failed; the chunk is done when
    /// all of its levels are (failed if any level failed).
    fn level_done(&self, i: usize, result: Result<(), String>) {
        let mut left = self.left.lock();
        let slot = &mut left.1[i];
        slot.0 -= 1;
        if let Err(e) = result {
            slot.1.get_or_insert(e);
        }
        if slot.0 > 0 {
            return;
        }
        match slot.1.take() {
            None => {
                Stats::add(&self.stats.store_chunks_written, 1);
                self.job.update(|p| p.chunks_ok += 1);
            }
            Some(why) => {
                tracing::warn!(job = self.job.id, chunk = i, reason = %why, "chunk store failed");
                Stats::add(&self.stats.store_chunks_failed, 1);
                self.job.update(|p| Job::fail_blocks(p, &self.spec.chunks[i].blocks, why));
            }
        }
        left.0 -= 1;
        if left.0 == 0 {
            let p = self.job.update(|p| {
                p.done = true;
                p.clone()
            });
            tracing::info!(job = self.job.id, chunks_ok = p.chunks_ok, chunks_failed = p.chunks_failed, skipped = p.chunks_skipped, "multi-level store done");
        }
    }
}

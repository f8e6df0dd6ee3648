//! Store: gather (then the blocks are reusable) → encode → write to every tier.

use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::{guarded, DeviceTarget, Job, JobKind, Pipeline, Stats};
use crate::codec::{encode, EncodeOptions, KvTensors, Level, TableSet, Tables};
use crate::layout::KvLayout;
use crate::store::{Key, TierStack};

/// One chunk to store.
#[derive(Clone, Debug)]
pub struct StoreChunk {
    pub key: Key,
    /// The blocks holding the chunk's tokens, in order.
    pub blocks: Vec<u32>,
}

/// A store request, resolved to chunks and blocks by the caller.
pub struct StoreSpec {
    /// Source memory; `layer_base` entries are host pointers.
    pub layout: Arc<KvLayout>,
    pub chunk_tokens: usize,
    pub chunks: Vec<StoreChunk>,
    /// Chunks the caller found already stored (reported, not written).
    pub skipped: usize,
    pub tiers: TierStack,
    pub level: Level,
    /// Per-tensor step multipliers (the model's profile), if any.
    pub multipliers: Option<Vec<f32>>,
    /// Set when `layout` is in GPU memory: gather there, encode here.
    pub device: Option<DeviceTarget>,
    /// The model-level table set to encode with (none: embedded tables).
    pub tables: Option<Arc<TableSet>>,
}

struct StoreRun {
    job: Arc<Job>,
    spec: StoreSpec,
    stats: Arc<Stats>,
    /// Chunks not yet written or failed.
    left: Mutex<usize>,
}

impl Pipeline {
    /// Starts a store. The source memory must stay valid and unchanged until
    /// the job reaches [`super::Stage::Reusable`].
    pub fn store(&self, spec: StoreSpec) -> Arc<Job> {
        let job = Arc::new(Job::new(self.job_id(), JobKind::Store, spec.layout.layers));
        Stats::add(&self.stats.stores, 1);
        Stats::add(&self.stats.store_chunks_skipped, spec.skipped as u64);
        let n = spec.chunks.len();
        job.update(|p| p.chunks_skipped = spec.skipped);
        tracing::debug!(job = job.id, chunks = n, skipped = spec.skipped, "store submitted");
        if n == 0 {
            job.update(|p| {
                p.reusable = true;
                p.done = true;
            });
            return job;
        }
        let run = Arc::new(StoreRun { job: Arc::clone(&job), spec, stats: Arc::clone(&self.stats), left: Mutex::new(n) });
        let cpu = self.cpu.tx.clone().expect("pool is running");
        let io = self.io.tx.clone().expect("pool is running");
        self.cpu.submit(Box::new(move || {
            if run.gpu_encode(&io) {
                return;
            }
            let t0 = Instant::now();
            let blocks: Vec<&[u32]> = run.spec.chunks.iter().map(|c| c.blocks.as_slice()).collect();
            // SAFETY: the engine keeps the source blocks valid and unchanged
            // until this job is reusable (set below).
            let gathered = unsafe { gather_chunks(&run.spec.layout, &blocks, run.spec.chunk_tokens, run.spec.device.as_ref()) };
            Stats::add(&run.stats.gather_ns, t0.elapsed().as_nanos() as u64);
            run.job.update(|p| p.reusable = true);
            for (i, g) in gathered.into_iter().enumerate() {
                match g {
                    Err(why) => run.chunk_done(i, Err(format!("gather: {why}"))),
                    Ok(kv) => {
                        let run = Arc::clone(&run);
                        let io = io.clone();
                        let _ = cpu.send(Box::new(move || run.encode_chunk(i, kv, &io)));
                    }
                }
            }
        }));
        job
    }
}

/// Gathers each chunk's blocks into host tensors: on the GPU for a device
/// layout (`device`, after the engine's recorded work), else on this thread.
///
/// # Safety
/// The layout's memory (host pointers, or device addresses of `device`'s GPU)
/// must be valid and the blocks unchanged during the call.
pub(crate) unsafe fn gather_chunks(layout: &KvLayout, blocks: &[&[u32]], chunk_tokens: usize, device: Option<&DeviceTarget>) -> Vec<Result<KvTensors, String>> {
    match device {
        Some(dev) => {
            let after = dev.after.as_ref().map(|e| e.raw());
            // SAFETY: the caller's contract; the context checked that the
            // layout's memory is on this device.
            match guarded(|| unsafe { dev.side.gather.gather(layout, blocks, chunk_tokens, after) }.map_err(|e| format!("GPU gather: {e}"))) {
                Ok(v) => v.into_iter().map(Ok).collect(),
                Err(why) => blocks.iter().map(|_| Err(why.clone())).collect(),
            }
        }
        None => blocks
            .iter()
            .map(|b| {
                guarded(|| {
                    // SAFETY: the caller's contract.
                    unsafe { layout.gather_raw(b, chunk_tokens) }.map_err(|e| e.to_string())
                })
            })
            .collect(),
    }
}

impl StoreRun {
    fn options(&self) -> EncodeOptions<'_> {
        let tables = match &self.spec.tables {
            Some(set) => Tables::External(set),
            None => Tables::Embedded,
        };
        EncodeOptions { level: Some(self.spec.level), profile: self.spec.multipliers.clone(), tables, ..Default::default() }
    }

    /// Stores from GPU memory at a lossy level: every chunk encoded on the
    /// device at once (then the blocks are reusable), written by the io
    /// threads. Returns false when the host path must run instead (host
    /// memory, or the lossless level or an fp8 cache, which the GPU encoder
    /// does not take: gathered on the device, encoded on the host).
    fn gpu_encode(self: &Arc<Self>, io: &crossbeam_channel::Sender<super::Task>) -> bool {
        let Some(dev) = &self.spec.device else { return false };
        if self.spec.level == Level::Lossless || self.spec.layout.dtype == crate::codec::Dtype::F8E4M3 {
            return false;
        }
        let t0 = Instant::now();
        let encoded = guarded(|| {
            // The engine's KV writes enqueued before the store was asked for
            // must be complete: wait for them here, on this worker thread.
            if let Some(e) = &dev.after {
                e.sync().map_err(|e| format!("waiting for the engine's stream: {e}"))?;
            }
            let chunks: Vec<(&[u32], usize)> = self.spec.chunks.iter().map(|c| (c.blocks.as_slice(), self.spec.chunk_tokens)).collect();
            // SAFETY: the context checked that the layout's memory is on this
            // device; the engine keeps the blocks unchanged until the job is
            // reusable (set below).
            unsafe { dev.side.encoder.encode_blocks(&self.spec.layout, &chunks, &self.options(), None) }.map_err(|e| format!("GPU encode: {e}"))
        });
        Stats::add(&self.stats.encode_ns, t0.elapsed().as_nanos() as u64);
        self.job.update(|p| p.reusable = true);
        match encoded {
            Err(why) => {
                for i in 0..self.spec.chunks.len() {
                    self.chunk_done(i, Err(why.clone()));
                }
            }
            Ok(all) => {
                let raw = self.spec.layout.chunk_shape(self.spec.chunk_tokens).elems() * self.spec.layout.dtype.size();
                for (i, bytes) in all.into_iter().enumerate() {
                    Stats::add(&self.stats.store_bytes_raw, raw as u64);
                    self.write_chunk(i, bytes, io);
                }
            }
        }
        true
    }

    fn encode_chunk(self: &Arc<Self>, i: usize, kv: KvTensors, io: &crossbeam_channel::Sender<super::Task>) {
        let t0 = Instant::now();
        let raw = kv.tensors.iter().map(|t| t.len()).sum::<usize>();
        let encoded = guarded(|| encode(&kv, &self.options()).map_err(|e| format!("encode: {e}")));
        drop(kv);
        Stats::add(&self.stats.encode_ns, t0.elapsed().as_nanos() as u64);
        match encoded {
            Err(why) => self.chunk_done(i, Err(why)),
            Ok(bytes) => {
                Stats::add(&self.stats.store_bytes_raw, raw as u64);
                self.write_chunk(i, bytes, io);
            }
        }
    }

    /// Writes chunk `i` to every tier on an io thread.
    fn write_chunk(self: &Arc<Self>, i: usize, bytes: Vec<u8>, io: &crossbeam_channel::Sender<super::Task>) {
        let run = Arc::clone(self);
        let _ = io.send(Box::new(move || {
            let t0 = Instant::now();
            let key = run.spec.chunks[i].key;
            let (ok, errors) = run.spec.tiers.put_all(&key, &bytes);
            Stats::add(&run.stats.write_ns, t0.elapsed().as_nanos() as u64);
            for (tier, e) in &errors {
                tracing::warn!(job = run.job.id, chunk = i, tier = %tier, error = %e, "tier write failed");
            }
            let result = if ok > 0 {
                Stats::add(&run.stats.store_bytes_encoded, bytes.len() as u64);
                Ok(())
            } else {
                let msgs: Vec<String> = errors.iter().map(|(t, e)| format!("{t}: {e}")).collect();
                Err(format!("no tier took the chunk: {}", msgs.join("; ")))
            };
            run.chunk_done(i, result);
        }));
    }

    fn chunk_done(&self, i: usize, result: Result<(), String>) {
        match result {
            Ok(()) => {
                Stats::add(&self.stats.store_chunks_written, 1);
                self.job.update(|p| p.chunks_ok += 1);
            }
            Err(why) => {
                tracing::warn!(job = self.job.id, chunk = i, reason = %why, "chunk store failed");
                Stats::add(&self.stats.store_chunks_failed, 1);
                self.job.update(|p| Job::fail_blocks(p, &self.spec.chunks[i].blocks, why));
            }
        }
        let mut left = self.left.lock();
        *left -= 1;
        if *left == 0 {
            let p = self.job.update(|p| {
                p.done = true;
                p.clone()
            });
            tracing::info!(
                job = self.job.id,
                chunks_ok = p.chunks_ok,
                chunks_failed = p.chunks_failed,
                skipped = p.chunks_skipped,
                ms = self.job.started.elapsed().as_secs_f64() * 1e3,
                "store done"
            );
        }
    }
}

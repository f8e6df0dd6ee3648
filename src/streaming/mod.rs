//! Adaptive KV streaming (CacheGen §3, built into stream-load):
//! - chunks are stored at several quality levels ([`store`]);
//! - a load measures the throughput each chunk was delivered at, estimates
//!   what the remaining chunks will get, and picks per chunk the highest
//!   level whose fetch and decode still fit the time-to-first-token SLO, or
//!   leaves the chunk for the engine to recompute ([`adaptive`]); then
//!   probes the chunk's own rate from its first bytes (a progressive read)
//!   and keeps it, trades it for a lower level, or leaves it for recompute;
//! - [`link`] emulates a network link (token-bucket shaper, latency, trace
//!   replay) in front of any tier, for tests and benchmarks.
//!
//! Chunks left for recompute come back as failed blocks (the engine's API
//! for "compute these yourself"); they are never written.

pub mod adaptive;
pub mod link;
pub(crate) mod store;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::codec::Level;
use crate::pipeline::Job;

pub use adaptive::{Estimator, Planner};
pub use link::{Link, Schedule, ShapedTier};

/// What the loader did with one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// Fetched at this level.
    Level(Level),
    /// Left for the engine to recompute (reported as failed blocks).
    Recompute,
}

impl Choice {
    pub fn name(self) -> &'static str {
        match self {
            Choice::Level(l) => l.name(),
            Choice::Recompute => "recompute",
        }
    }

    /// 1-4 for a level, 0 for recompute (what the C call reports).
    pub fn code(self) -> u8 {
        match self {
            Choice::Level(l) => l.number(),
            Choice::Recompute => 0,
        }
    }
}

/// One per-chunk decision of a load, in chunk order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChunkDecision {
    /// Index of the chunk in the load.
    pub chunk: usize,
    /// What was planned before the fetch.
    pub planned: Choice,
    /// What happened: the level actually delivered, or recompute (planned,
    /// or because the fetch failed or came too late).
    pub outcome: Choice,
    /// Bandwidth estimate the decision used (bytes/s).
    pub est_bytes_per_s: f64,
    /// Per-chunk time budget the decision used (s).
    pub budget_s: f64,
    /// Bytes fetched and how long the fetch took (0 when not fetched; a
    /// probe abandoned counts its bytes, a switch to a lower level adds the
    /// second request's).
    pub bytes: u64,
    pub fetch_s: f64,
    /// This chunk's rate as its probe measured it (bytes/s; 0 when the
    /// chunk was not probed or arrived whole before the decision point).
    pub probed_bytes_per_s: f64,
}

/// Counters of the streaming features of one context (reported by
/// `stats_json` under `streaming`).
#[derive(Default)]
pub struct StreamStats {
    /// Chunks written per level (index: level number - 1).
    pub stored_chunks: [AtomicU64; 4],
    /// Encoded bytes written per level.
    pub stored_bytes: [AtomicU64; 4],
    /// Raw bytes of the chunks stored (once per chunk, not per level).
    pub stored_raw_bytes: AtomicU64,
    /// Chunks loaded per level.
    pub loaded_chunks: [AtomicU64; 4],
    /// Chunks a load left for the engine to recompute (planned or too late).
    pub recomputed_chunks: AtomicU64,
    /// Of those, chunks whose fetch was given up at the SLO deadline.
    pub abandoned_fetches: AtomicU64,
    pub adaptive_loads: AtomicU64,
}

impl StreamStats {
    pub fn json(&self, levels: &[Level]) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Relaxed);
        let per = |arr: &[AtomicU64; 4]| -> serde_json::Map<String, serde_json::Value> {
            Level::ALL.iter().map(|l| (l.name().to_string(), g(&arr[l.number() as usize - 1]).into())).collect()
        };
        let raw = g(&self.stored_raw_bytes);
        let set_bytes: u64 = levels.iter().map(|l| g(&self.stored_bytes[l.number() as usize - 1])).sum();
        serde_json::json!({
            "levels": levels.iter().map(|l| l.name()).collect::<Vec<_>>(),
            "stored_chunks": per(&self.stored_chunks),
            "stored_bytes": per(&self.stored_bytes),
            "stored_raw_bytes": raw,
            "level_set_bytes": set_bytes,
            "level_set_x_fp16": if set_bytes == 0 { 0.0 } else { raw as f64 / set_bytes as f64 },
            "loaded_chunks": per(&self.loaded_chunks),
            "recomputed_chunks": g(&self.recomputed_chunks),
            "abandoned_fetches": g(&self.abandoned_fetches),
            "adaptive_loads": g(&self.adaptive_loads),
        })
    }

    pub(crate) fn add(a: &AtomicU64, v: u64) {
        a.fetch_add(v, Relaxed);
    }
}

type Decisions = Arc<Mutex<Vec<ChunkDecision>>>;

/// Attaches a streamed load's decision list to its job (once; the loader
/// keeps pushing to the same list). The decisions live and die with the job.
pub(crate) fn register(job: &Arc<Job>, decisions: Decisions) {
    let slot: Arc<dyn std::any::Any + Send + Sync> = decisions;
    if job.decisions.set(slot).is_err() {
        tracing::warn!(job = job.id, "chunk decisions attached twice; keeping the first");
    }
}

impl Job {
    /// The per-chunk decisions of a load that chose levels (multi-level or
    /// adaptive), in chunk order, as far as they were made; empty for other
    /// jobs.
    pub fn chunk_decisions(&self) -> Vec<ChunkDecision> {
        let Some(d) = self.decisions.get().and_then(|d| {
            let any: &(dyn std::any::Any + Send + Sync) = &**d;
            any.downcast_ref::<Mutex<Vec<ChunkDecision>>>()
        }) else {
            return Vec::new();
        };
        let mut v = d.lock().clone();
        v.sort_by_key(|d| d.chunk);
        v
    }
}

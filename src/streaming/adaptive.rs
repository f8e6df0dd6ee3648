//! Bandwidth estimation and the per-chunk level choice.
//!
//! The loader streams a load's chunks in order. Before each chunk it asks
//! the [`Planner`] what to fetch, given:
//! - the time left to the SLO (from the load call), minus the recompute
//!   time of chunks already left to the engine and the decode of the last
//!   chunk (the only decode not hidden behind later fetches);
//! - the chunks left, this one included: each gets an equal share of that
//!   time (CacheGen's rule, re-evaluated after every chunk, so a chunk that
//!   came early or late moves the later budgets);
//! - the [`Estimator`]'s delivered bandwidth (EWMA of per-chunk
//!   throughput, per tier and overall) and request latency, the expected
//!   size of the chunk at each level (learned from chunks fetched), and the
//!   measured decode throughput.
//!
//! It picks the highest level whose expected time (`max(fetch, decode)`:
//! fetches and decodes overlap) fits the share. If none fits, the cheaper
//! of the lowest level and recompute (`chunk_tokens / prefill rate`) is
//! taken, so a load that is behind catches up as fast as it can.

use parking_lot::Mutex;

use super::Choice;
use crate::codec::Level;

/// Compression ratio (fp16 bytes / stored bytes) assumed for a level before
/// one was measured (256-token chunks, docs/BENCHMARKS.md).
pub fn prior_ratio(l: Level) -> f64 {
    match l {
        Level::Compact => 6.0,
        Level::Default => 3.7,
        Level::High => 2.6,
        Level::Lossless => 0.95,
    }
}

#[derive(Clone, Debug, Default)]
struct EstState {
    /// EWMA of delivered bytes/s, overall and per tier index.
    bw: Option<f64>,
    tier_bw: Vec<Option<f64>>,
    /// EWMA of stored/raw size per level.
    size_ratio: [Option<f64>; 4],
    /// Decode throughput (raw bytes out per second, all decode threads).
    decode: Option<f64>,
}

/// What a context has learned about its links and its decoder (shared by
/// its loads, so a load starts from what the previous one measured).
pub struct Estimator {
    st: Mutex<EstState>,
    initial: f64,
    /// Weight of the newest sample.
    pub alpha: f64,
}

impl Estimator {
    /// `initial`: bytes/s assumed before anything was measured.
    pub fn new(initial: f64) -> Estimator {
        Estimator { st: Mutex::new(EstState::default()), initial, alpha: 0.5 }
    }

    /// Records a fetch of `bytes` that took `secs` (latency included) from tier `tier`.
    pub fn observe_fetch(&self, tier: usize, bytes: u64, secs: f64) {
        if secs <= 0.0 || bytes == 0 {
            return;
        }
        let r = bytes as f64 / secs;
        let a = self.alpha;
        let mut st = self.st.lock();
        st.bw = Some(st.bw.map_or(r, |b| a * r + (1.0 - a) * b));
        if st.tier_bw.len() <= tier {
            st.tier_bw.resize(tier + 1, None);
        }
        st.tier_bw[tier] = Some(st.tier_bw[tier].map_or(r, |b| a * r + (1.0 - a) * b));
    }

    pub fn observe_size(&self, level: Level, stored: u64, raw: u64) {
        if raw == 0 {
            return;
        }
        let r = stored as f64 / raw as f64;
        let mut st = self.st.lock();
        let s = &mut st.size_ratio[level.number() as usize - 1];
        *s = Some(s.map_or(r, |p| 0.5 * r + 0.5 * p));
    }

    /// Records a decode of `raw` output bytes that took `secs` on one thread
    /// (`threads` run in parallel).
    pub fn observe_decode(&self, raw: u64, secs: f64, threads: usize) {
        if secs <= 0.0 {
            return;
        }
        let r = raw as f64 / secs * threads.max(1) as f64;
        let mut st = self.st.lock();
        st.decode = Some(st.decode.map_or(r, |p| 0.2 * r + 0.8 * p));
    }

    /// Expected delivered bytes/s (of `tier` if measured, else overall).
    pub fn bandwidth(&self, tier: Option<usize>) -> f64 {
        let st = self.st.lock();
        tier.and_then(|t| st.tier_bw.get(t).copied().flatten()).or(st.bw).unwrap_or(self.initial)
    }

    pub fn size(&self, level: Level, raw: u64) -> f64 {
        let st = self.st.lock();
        raw as f64 * st.size_ratio[level.number() as usize - 1].unwrap_or(1.0 / prior_ratio(level))
    }

    /// Decode throughput in raw bytes/s (`None`: not measured yet).
    pub fn decode_rate(&self) -> Option<f64> {
        self.st.lock().decode
    }
}

/// The SLO policy of a load.
#[derive(Clone, Debug)]
pub struct Planner {
    pub slo_s: f64,
    pub prefill_tokens_per_s: f64,
    pub chunk_tokens: usize,
    /// Levels stored, lowest first.
    pub levels: Vec<Level>,
    /// After one recompute, recompute every later chunk.
    pub recompute_suffix: bool,
}

/// Everything the planner knows before chunk `i`.
#[derive(Clone, Debug)]
pub struct PlanInput {
    /// Seconds since the load started.
    pub elapsed_s: f64,
    /// Chunks not decided yet, this one included.
    pub chunks_left: usize,
    /// Chunks already left for recompute.
    pub recomputed: usize,
    /// Expected bytes/s for this chunk.
    pub bytes_per_s: f64,
    /// Added per request.
    pub latency_s: f64,
    /// Expected stored bytes per level (same order as `Planner::levels`).
    pub sizes: Vec<f64>,
    /// Raw bytes of a chunk and the decode rate (raw bytes/s; `None`: free).
    pub raw_bytes: f64,
    pub decode_bytes_per_s: Option<f64>,
    /// A previous chunk was left for recompute.
    pub after_recompute: bool,
}

/// A plan for one chunk.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub choice: Choice,
    /// The per-chunk share of the time left (s).
    pub budget_s: f64,
    /// Expected time of the choice (fetch and decode, or recompute).
    pub expected_s: f64,
}

impl Planner {
    pub fn recompute_s(&self) -> f64 {
        self.chunk_tokens as f64 / self.prefill_tokens_per_s
    }

    /// Time one chunk at level index `i` is expected to take in the pipeline.
    pub fn cost(&self, inp: &PlanInput, i: usize) -> f64 {
        let fetch = inp.latency_s + inp.sizes[i] / inp.bytes_per_s.max(1.0);
        let decode = inp.decode_bytes_per_s.map_or(0.0, |r| inp.raw_bytes / r);
        fetch.max(decode)
    }

    pub fn decode_s(&self, inp: &PlanInput) -> f64 {
        inp.decode_bytes_per_s.map_or(0.0, |r| inp.raw_bytes / r)
    }

    pub fn plan(&self, inp: &PlanInput) -> Plan {
        let recompute = self.recompute_s();
        if self.recompute_suffix && inp.after_recompute {
            return Plan { choice: Choice::Recompute, budget_s: 0.0, expected_s: recompute };
        }
        let left = self.slo_s - inp.elapsed_s - inp.recomputed as f64 * recompute - self.decode_s(inp);
        let budget = left / inp.chunks_left.max(1) as f64;
        for i in (0..self.levels.len()).rev() {
            let c = self.cost(inp, i);
            if c <= budget {
                return Plan { choice: Choice::Level(self.levels[i]), budget_s: budget, expected_s: c };
            }
        }
        let low = self.cost(inp, 0);
        if recompute < low {
            Plan { choice: Choice::Recompute, budget_s: budget, expected_s: recompute }
        } else {
            Plan { choice: Choice::Level(self.levels[0]), budget_s: budget, expected_s: low }
        }
    }

    /// Latest moment (s after the start) a fetch may still be waited for
    /// when `after` chunks (this one included) are still to come: past it,
    /// recomputing them all would miss the SLO.
    pub fn give_up_s(&self, recomputed: usize, after: usize) -> f64 {
        self.slo_s - (recomputed + after) as f64 * self.recompute_s()
    }
}

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
//! - the [`Estimator`]'s expected time per byte (EWMA of per-chunk fetch
//!   time / bytes, per tier and overall: averaging time per byte, not
//!   bytes per second, is what predicts the expected fetch time when the
//!   bandwidth varies), the expected size of the chunk at each level
//!   (learned from chunks fetched), and the measured decode throughput.
//!
//! Choice (expected time of a level = `max(fetch, decode)`: fetches and
//! decodes overlap):
//! 1. Up to the *target* level ([`Planner::target`]: `Level::Default`, the
//!    level a fixed-level load uses), the highest level that fits the share:
//!    quality is only given up to meet the SLO.
//! 2. A level above the target only when it fits the share and is
//!    (nearly) free: at most [`UPGRADE_REL`] slower per chunk than the
//!    target (decode- or latency-bound), or at most [`UPGRADE_SLO_SHARE`]
//!    of the SLO over all the chunks left. So an adaptive load is never
//!    meaningfully slower than the fixed target level (the old rule,
//!    "highest level that fits", filled the SLO with the top level and lost
//!    to the fixed level at 30-100 Gbps).
//! 3. If no level fits, the cheaper of the lowest level and recompute
//!    (`chunk_tokens / prefill rate`), so a load that is behind catches up
//!    as fast as it can.
//!
//! On a link whose rate jumps from chunk to chunk, the level actually read
//! ([`Planner::probe_level`]) is above the lowest only when that leaves a
//! reserve against the variance of the chunks left
//! ([`Planner::leaves_reserve`], judged at the long-run mean rate,
//! [`Estimator::mean_bandwidth`]).

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
    /// EWMA of fetch seconds per byte, overall and per tier index.
    spb: Option<f64>,
    /// Slow EWMA of fetch seconds per byte (weight [`Estimator::slow_alpha`],
    /// starting from the initial rate as a prior sample).
    slow_spb: Option<f64>,
    tier_spb: Vec<Option<f64>>,
    /// EWMA of |sample - estimate| / estimate of the overall time per byte.
    spread: Option<f64>,
    /// When the last fetch was observed.
    last_fetch: Option<std::time::Instant>,
    /// EWMA of stored/raw size per level.
    size_ratio: [Option<f64>; 4],
    /// Decode throughput (raw bytes out per second, all decode threads).
    decode: Option<f64>,
    /// EWMA of the time to first byte of a request.
    latency: Option<f64>,
}

/// What a context has learned about its links and its decoder (shared by
/// its loads, so a load starts from what the previous one measured).
pub struct Estimator {
    st: Mutex<EstState>,
    initial: f64,
    /// Weight of the newest sample.
    pub alpha: f64,
    /// Weight of the newest sample in the long-run mean
    /// ([`Estimator::mean_bandwidth`]; 0.05: about the last 20 reads).
    pub slow_alpha: f64,
    /// Without new fetches, the bandwidth estimate returns to `initial`
    /// with this half-life. Otherwise a context whose estimate collapsed
    /// (a stall) would leave every later load to recompute and, fetching
    /// nothing, never measure the link again.
    pub half_life: std::time::Duration,
}

impl Estimator {
    /// `initial`: bytes/s assumed before anything was measured.
    pub fn new(initial: f64) -> Estimator {
        Estimator { st: Mutex::new(EstState::default()), initial, alpha: 0.5, slow_alpha: 0.05, half_life: std::time::Duration::from_secs(10) }
    }

    /// Records a fetch of `bytes` that took `secs` (latency included) from
    /// tier `tier`. The estimate averages seconds per byte: the expected
    /// time of the next fetch is its size times the mean time per byte,
    /// which a mean of bytes/s overestimates the speed of when the rate
    /// varies (a 0.1 Gbps chunk costs 100x a 10 Gbps one).
    pub fn observe_fetch(&self, tier: usize, bytes: u64, secs: f64) {
        if secs <= 0.0 || bytes == 0 {
            return;
        }
        let r = secs / bytes as f64;
        let a = self.alpha;
        let mut st = self.st.lock();
        if let Some(b) = st.spb {
            let dev = (r - b).abs() / b;
            st.spread = Some(st.spread.map_or(dev, |d| a * dev + (1.0 - a) * d));
        }
        st.spb = Some(st.spb.map_or(r, |b| a * r + (1.0 - a) * b));
        let prior = st.slow_spb.unwrap_or(1.0 / self.initial);
        st.slow_spb = Some(self.slow_alpha * r + (1.0 - self.slow_alpha) * prior);
        st.last_fetch = Some(std::time::Instant::now());
        if st.tier_spb.len() <= tier {
            st.tier_spb.resize(tier + 1, None);
        }
        st.tier_spb[tier] = Some(st.tier_spb[tier].map_or(r, |b| a * r + (1.0 - a) * b));
    }

    /// Records a request's time to first byte (progressive reads: the
    /// latency, kept apart from the rate [`Estimator::observe_fetch`] sees).
    pub fn observe_latency(&self, secs: f64) {
        if !(secs >= 0.0 && secs.is_finite()) {
            return;
        }
        let mut st = self.st.lock();
        st.latency = Some(st.latency.map_or(secs, |p| 0.5 * secs + 0.5 * p));
    }

    /// Expected time to first byte of a request (0 before one was measured).
    pub fn latency(&self) -> f64 {
        self.st.lock().latency.unwrap_or(0.0)
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

    /// Expected delivered bytes/s (of `tier` if measured, else overall):
    /// bytes over the expected time per byte.
    pub fn bandwidth(&self, tier: Option<usize>) -> f64 {
        let st = self.st.lock();
        let Some(spb) = tier.and_then(|t| st.tier_spb.get(t).copied().flatten()).or(st.spb) else {
            return self.initial;
        };
        let age = st.last_fetch.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let w = 0.5f64.powf(age / self.half_life.as_secs_f64().max(1e-9));
        1.0 / (w * spb + (1.0 - w) / self.initial)
    }

    /// Long-run expected delivered bytes/s: like [`Estimator::bandwidth`]
    /// (overall), from a slow EWMA of the time per byte (weight
    /// [`Estimator::slow_alpha`], the initial rate counting as the first
    /// sample). On a link whose rate jumps from chunk to chunk,
    /// [`Estimator::bandwidth`] follows the last one or two chunks; this is
    /// what the chunks after the next one are expected to get on average.
    pub fn mean_bandwidth(&self) -> f64 {
        let st = self.st.lock();
        let Some(spb) = st.slow_spb else {
            return self.initial;
        };
        let age = st.last_fetch.map_or(0.0, |t| t.elapsed().as_secs_f64());
        let w = 0.5f64.powf(age / self.half_life.as_secs_f64().max(1e-9));
        1.0 / (w * spb + (1.0 - w) / self.initial)
    }

    /// How much the time per byte of recent fetches strayed from the
    /// estimate (EWMA of |sample - estimate| / estimate); infinite before
    /// two fetches were measured. About 0 on a steady link, about 1 on
    /// per-chunk traces uniform in 0.1-10 Gbps.
    pub fn spread(&self) -> f64 {
        self.st.lock().spread.unwrap_or(f64::INFINITY)
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

/// A level above the target is taken when it is at most this much slower
/// per chunk than the target (e.g. decode-bound: every level costs the same)...
pub const UPGRADE_REL: f64 = 0.10;
/// ... or when taking it for every chunk left costs at most this share of
/// the SLO in all.
pub const UPGRADE_SLO_SHARE: f64 = 0.02;

/// A link whose time per byte strays less than this (relative) from the
/// estimate counts as steady (see [`Planner::fetch_deadline_s`]).
pub const STEADY_SPREAD: f64 = 0.25;

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
    /// Expected bytes/s of the chunks after this one, on average
    /// ([`Estimator::mean_bandwidth`]; see [`Planner::leaves_reserve`]).
    pub mean_bytes_per_s: f64,
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

    /// Index (in `levels`) of the target level: `Level::Default` if stored,
    /// else the highest stored level below it, else the lowest stored.
    pub fn target(&self) -> usize {
        self.levels.iter().rposition(|l| l.number() <= Level::Default.number()).unwrap_or(0)
    }

    pub fn plan(&self, inp: &PlanInput) -> Plan {
        let recompute = self.recompute_s();
        if self.recompute_suffix && inp.after_recompute {
            return Plan { choice: Choice::Recompute, budget_s: 0.0, expected_s: recompute };
        }
        let left = self.slo_s - inp.elapsed_s - inp.recomputed as f64 * recompute - self.decode_s(inp);
        let budget = left / inp.chunks_left.max(1) as f64;
        let level = |i: usize, c: f64| Plan { choice: Choice::Level(self.levels[i]), budget_s: budget, expected_s: c };
        if self.levels.is_empty() {
            return Plan { choice: Choice::Recompute, budget_s: budget, expected_s: recompute };
        }
        let t = self.target();
        // 1. The highest level up to the target that fits.
        if let Some(i) = (0..=t).rev().find(|&i| self.cost(inp, i) <= budget) {
            if i < t {
                return level(i, self.cost(inp, i));
            }
            // 2. The target fits: a higher level only when (nearly) free.
            let base = self.cost(inp, t);
            for u in (t + 1..self.levels.len()).rev() {
                let c = self.cost(inp, u);
                let extra = (c - base).max(0.0);
                let free = extra <= UPGRADE_REL * base || extra * inp.chunks_left as f64 <= UPGRADE_SLO_SHARE * self.slo_s;
                if c <= budget && free {
                    return level(u, c);
                }
            }
            return level(t, base);
        }
        // 3. Nothing fits: the fastest way through this chunk.
        let low = self.cost(inp, 0);
        if recompute < low {
            Plan { choice: Choice::Recompute, budget_s: budget, expected_s: recompute }
        } else {
            level(0, low)
        }
    }

    /// Latest moment (s after the start) a fetch may still be waited for
    /// when `after` chunks (this one included) are still to come: past it,
    /// recomputing them all would miss the SLO. `decode_s`: the decode of
    /// one chunk, which may still run there (the last chunk fetched).
    pub fn give_up_s(&self, recomputed: usize, after: usize, decode_s: f64) -> f64 {
        self.slo_s - (recomputed + after) as f64 * self.recompute_s() - decode_s
    }

    /// When to abandon the fetch of a chunk planned at `elapsed_s` with
    /// expected time `expected_s` (`None`: never; the load is committed to
    /// fetching). Like [`Planner::give_up_s`], except for a fetch expected
    /// to end past the give-up point even on time: giving it up there
    /// recomputes every chunk left although the link is fine (at 30-100
    /// Gbps the give-up point sweeps past the elapsed time mid-load and
    /// caught a 1 ms fetch in about one load in ten). On a steady link
    /// (`spread`, [`Estimator::spread`], at most [`STEADY_SPREAD`]) such a
    /// fetch is given up only once it is overdue (twice its expected time;
    /// on a stall the SLO is then missed by at most that); on a link whose
    /// rate jumps from chunk to chunk the expected time says little, and
    /// the give-up point stays.
    ///
    /// The loader (`src/pipeline/load.rs`) arms this for every fetch it starts.
    pub fn fetch_deadline_s(&self, recomputed: usize, after: usize, elapsed_s: f64, expected_s: f64, spread: f64, decode_s: f64) -> Option<f64> {
        let g = self.give_up_s(recomputed, after, decode_s);
        if g <= elapsed_s {
            None
        } else if elapsed_s + expected_s <= g || spread > STEADY_SPREAD {
            Some(g)
        } else {
            Some(elapsed_s + 2.0 * expected_s)
        }
    }
}

/// Probing (per chunk): a chunk is read progressively through the tier
/// ([`crate::store::Tier::get_progressive`]) in pieces of [`PROBE_BYTES`].
/// Once at least [`PROBE_BYTES`] arrived and at least [`PROBE_MIN_S`] passed
/// since the first byte ([`probe_done`]), the loader knows this chunk's
/// delivered rate and decides once ([`Planner::after_probe`]): read the rest
/// in the same request, abandon it for a lower level (a new request), or
/// leave the chunk for recompute (a clearly slow chunk is abandoned earlier,
/// see [`PROBE_EARLY_MIN_S`]; both through [`Planner::probe_decision`]). A
/// chunk that arrives whole before that point is simply kept. The time floor keeps a fast chunk's rate from being
/// judged on a few microseconds (timer and scheduling noise).
pub const PROBE_BYTES: usize = 16 * 1024;
/// See [`PROBE_BYTES`].
pub const PROBE_MIN_S: f64 = 0.001;
/// A chunk planned for recompute is still probed (at the lowest level) when
/// the link's rate jumps from chunk to chunk (spread above
/// [`STEADY_SPREAD`]) and a probe costs at most this share of recomputing it.
pub const PROBE_RECOMPUTE_SHARE: f64 = 0.25;

/// Before [`PROBE_MIN_S`], from [`PROBE_EARLY_MIN_S`] after the first byte
/// on, a chunk is already abandoned when it would be even at
/// [`early_slow_margin`] times its measured rate ([`Planner::probe_decision`]):
/// a slow chunk (the usual case on a link whose rate jumps) then costs the
/// latency and 0.1-0.3 ms, not the latency and 1 ms. The margin keeps a
/// reader that reports a piece up to [`EARLY_READER_DELAY_S`] late from
/// abandoning a chunk that is in fact fast; a chunk that would be kept is
/// only judged at the full decision point.
pub const PROBE_EARLY_MIN_S: f64 = 0.0001;
/// See [`early_slow_margin`]: a third of [`PROBE_EARLY_MIN_S`].
pub const EARLY_READER_DELAY_S: f64 = PROBE_EARLY_MIN_S / 3.0;

/// The margin of an early abandon `since_first_byte_s` after the first byte
/// ([`PROBE_EARLY_MIN_S`]): a reader woken up `d` late reports, at time `t`,
/// the bytes that had arrived by `t - d` (the link kept sending; the pieces
/// behind them are reported right after), so its measured rate is at worst
/// the link's times `(t - d) / t`. With `d` up to [`EARLY_READER_DELAY_S`],
/// a chunk is abandoned early only when it would be even at `t / (t - d)`
/// times its measured rate: 1.5 at 0.1 ms, 1.2 at 0.2 ms, 1.07 at 0.5 ms.
/// (Until 2026-11-29 the margin was 1.5 at every time before the decision
/// point, which kept chunks a little slower than needed, 3-6 Gbps on the
/// benchmark's traces, to the 1 ms decision point.)
pub fn early_slow_margin(since_first_byte_s: f64) -> f64 {
    since_first_byte_s / (since_first_byte_s - EARLY_READER_DELAY_S).max(1e-9)
}

/// See [`Planner::probe_level`]: on a steady link, one chunk in this many
/// planned for recompute is still probed.
pub const REPROBE_AFTER: usize = 8;

/// See [`Planner::leaves_reserve`]: standard deviations of the time the
/// chunks left will take that a level above the lowest must leave free on a
/// link whose rate jumps. 2 (with [`Estimator::slow_alpha`] 0.05) was chosen
/// on the benchmark's traces at 7,500 tokens/s (docs/BENCHMARKS.md); 1-3 and
/// 0.03-0.1 give within 2 points of its violation rates.
pub const RESERVE_SIGMAS: f64 = 2.0;

/// See [`Planner::probe_deadline_s`].
pub const PROBE_STALL_MIN_S: f64 = 0.05;

/// Whether a progressive read that has `read` bytes, `since_first_byte_s`
/// after its first byte, has reached its decision point.
pub fn probe_done(read: usize, since_first_byte_s: f64) -> bool {
    read >= PROBE_BYTES && since_first_byte_s >= PROBE_MIN_S
}

/// Bytes read at the decision point of a chunk of `total` bytes delivered
/// at `bytes_per_s` (what [`probe_done`] gives with pieces of
/// [`PROBE_BYTES`]); `total` when the chunk is whole before it (no decision).
pub fn probe_point(bytes_per_s: f64, total: f64) -> f64 {
    let need = (PROBE_MIN_S * bytes_per_s / PROBE_BYTES as f64).ceil().max(1.0);
    (need * PROBE_BYTES as f64).min(total)
}

/// What to do with a chunk after its probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterProbe {
    /// Read the rest of the probed level (same request).
    Continue,
    /// Abandon it and fetch the level at this index (in `Planner::levels`).
    Switch(usize),
    /// Abandon it and leave the chunk for recompute.
    Recompute,
}

impl Planner {
    /// Which level (index in `levels`) to start reading chunk `inp` at, after
    /// [`Planner::plan`] gave `plan` from the running estimate: the planned
    /// level (on a link measured to jump, spread above [`STEADY_SPREAD`] and
    /// finite, the highest level up to it that leaves a reserve for the
    /// chunks after it, [`Planner::leaves_reserve`], else the lowest); for a
    /// planned recompute, the lowest level when the link is not
    /// steady (`spread`, see [`Estimator::spread`]), or when the load is
    /// behind and a probe may pay ([`Planner::behind_and_probe_may_pay`]),
    /// and a probe is cheap against recompute, else `None` (recompute
    /// without reading).
    ///
    /// `unread`: chunks left for recompute in a row without any read. After
    /// [`REPROBE_AFTER`] of them a chunk is probed even on a link that
    /// counts as steady: the spread is measured on reads only, and two
    /// similar rates in a row on a link whose rate jumps would otherwise
    /// leave every later chunk to recompute, unread (the estimate and the
    /// spread never change again).
    pub fn probe_level(&self, inp: &PlanInput, plan: &Plan, spread: f64, unread: usize) -> Option<usize> {
        match plan.choice {
            Choice::Level(l) => {
                let i = self.levels.iter().position(|&x| x == l)?;
                // Only on a link measured to jump (two reads or more).
                if i == 0 || !(spread.is_finite() && spread > STEADY_SPREAD) {
                    return Some(i);
                }
                Some((1..=i).rev().find(|&j| self.leaves_reserve(inp, j, spread)).unwrap_or(0))
            }
            Choice::Recompute => {
                let probe_s = inp.latency_s + PROBE_MIN_S;
                let worth = !(self.levels.is_empty() || self.recompute_suffix && inp.after_recompute)
                    && (spread > STEADY_SPREAD || unread >= REPROBE_AFTER || self.behind_and_probe_may_pay(inp, spread))
                    && probe_s <= PROBE_RECOMPUTE_SHARE * self.recompute_s();
                worth.then_some(0)
            }
        }
    }

    /// Whether reading this chunk at level index `i` (above the lowest) on a
    /// link whose rate jumps leaves a reserve for the chunks after it: the
    /// time left after it must cover each of them at `mu`, the expected cost
    /// of the lowest level at the long-run rate
    /// ([`PlanInput::mean_bytes_per_s`]; at most a recompute, which a probe
    /// falls back to), plus [`RESERVE_SIGMAS`] standard deviations of their
    /// sum (per chunk `spread * mu`, at most half a recompute). The equal
    /// share ([`Planner::plan`]) judges a level against the *expected* cost
    /// of the rest, with the running estimate, which on such a link follows
    /// the last one or two chunks: after a few fast chunks it took the
    /// target level whenever it fitted, and the time those upgrades spent
    /// was missing when slow chunks came (the 7,500 tokens/s trace rows of
    /// docs/BENCHMARKS.md). See [`Planner::probe_level`].
    pub fn leaves_reserve(&self, inp: &PlanInput, i: usize, spread: f64) -> bool {
        let rc = self.recompute_s();
        let Some(&low) = inp.sizes.first() else { return true };
        let decode = self.decode_s(inp);
        let left = self.slo_s - inp.elapsed_s - inp.recomputed as f64 * rc - decode;
        let mu = (inp.latency_s + low / inp.mean_bytes_per_s.max(1.0)).max(decode).min(rc);
        let sigma = (spread * mu).min(rc / 2.0);
        let rest = inp.chunks_left.saturating_sub(1) as f64;
        left - self.cost(inp, i) >= rest * mu + RESERVE_SIGMAS * sigma * rest.sqrt()
    }

    /// Whether a chunk planned for recompute is worth probing although the
    /// link looks steady (spread at most [`STEADY_SPREAD`]; see
    /// [`Planner::probe_level`]), when the load is behind: recomputing every
    /// chunk left, this one included, would miss the SLO, so only fetches
    /// faster than recompute can still meet it (ahead of that point not
    /// probing cannot cause a miss). A spread that dropped below
    /// [`STEADY_SPREAD`] after a few similar rates on a link whose rate jumps
    /// left such loads recomputing chunks unread that were fast.
    ///
    /// The test is an optimistic bound of a probe's expected gain against
    /// its cost. With the chunk's time per byte the estimate times `X`,
    /// `E|X - 1|` about `spread` ([`Estimator::spread`]), the lowest level
    /// beats recompute only if `X < x = (recompute - latency) / fetch`
    /// (`fetch`: its expected transfer time), which by Markov's inequality
    /// has a probability of at most `spread / (1 - x)`; it then saves at
    /// most `recompute - latency`. A probe of a slow chunk costs the latency
    /// and the first piece or [`PROBE_EARLY_MIN_S`], whichever is later. On
    /// a steady link (spread about 0) the bound is about 0: no probe.
    pub fn behind_and_probe_may_pay(&self, inp: &PlanInput, spread: f64) -> bool {
        let rc = self.recompute_s();
        let Some(&low) = inp.sizes.first() else { return false };
        if inp.elapsed_s < self.give_up_s(inp.recomputed, inp.chunks_left, self.decode_s(inp)) {
            return false;
        }
        let rate = inp.bytes_per_s.max(1.0);
        let gain = rc - inp.latency_s;
        let x = gain / (low / rate);
        let p = if x >= 1.0 { 1.0 } else { (spread / (1.0 - x)).min(1.0) };
        let cost = inp.latency_s + (PROBE_BYTES as f64 / rate).max(PROBE_EARLY_MIN_S);
        p * gain >= cost
    }

    /// Latest moment (s after the start) the probe of a chunk planned for
    /// recompute ([`Planner::probe_level`]), started at `elapsed_s`, may
    /// reach its decision point: a probe slower than recomputing the chunk
    /// (at least [`PROBE_STALL_MIN_S`]) is a stall (a probe takes the
    /// latency plus [`PROBE_MIN_S`], or [`PROBE_BYTES`] at the chunk's rate:
    /// 1.3 ms at 0.1 Gbps), and the load gives up as at its give-up point
    /// (every chunk left is recomputed: the read in flight cannot be
    /// interrupted). Such a probe may start past the give-up point, where
    /// [`Planner::fetch_deadline_s`] gives no deadline. Until the decision
    /// the earlier of the two holds; after it, the latter.
    pub fn probe_deadline_s(&self, elapsed_s: f64) -> f64 {
        elapsed_s + self.recompute_s().max(PROBE_STALL_MIN_S)
    }

    /// The decision at a piece of a progressive read of level index `probed`
    /// (`None`: read on, ask again at the next piece): `inp` is what the
    /// planner knows now (`elapsed_s` and `latency_s`, this request's time
    /// to first byte, are current; `bytes_per_s` is ignored), `read` of
    /// `total` bytes are in, `since_first_byte_s` after the first byte.
    /// At the probe's decision point ([`probe_done`]) this is
    /// [`Planner::after_probe`] with the measured rate; before it, from
    /// [`PROBE_EARLY_MIN_S`] on, an early abandon (see there). Both the
    /// loader and the benchmark's simulator call this at every piece.
    pub fn probe_decision(&self, inp: &PlanInput, probed: usize, read: f64, total: f64, since_first_byte_s: f64) -> Option<AfterProbe> {
        if read >= total || (read as usize) < PROBE_BYTES {
            return None;
        }
        let rate = read / since_first_byte_s.max(1e-9);
        let at = |r: f64| PlanInput { bytes_per_s: r, ..inp.clone() };
        if probe_done(read as usize, since_first_byte_s) {
            return Some(self.after_probe(&at(rate), probed, read, total));
        }
        if since_first_byte_s < PROBE_EARLY_MIN_S || self.after_probe(&at(rate * early_slow_margin(since_first_byte_s)), probed, read, total) == AfterProbe::Continue {
            return None;
        }
        let a = self.after_probe(&at(rate), probed, read, total);
        (a != AfterProbe::Continue).then_some(a)
    }

    /// The give-up point (s after the start) of a chunk's read once its
    /// probe decided `after` ([`AfterProbe::Continue`]: the rest of the
    /// probed level, or [`AfterProbe::Switch`]: a new request), with `inp`
    /// as at the decision (`bytes_per_s`: the probed rate). Like
    /// [`Planner::fetch_deadline_s`], but the probe measured this chunk's
    /// rate, so its expected time counts as known (as on a steady link): a
    /// read expected to end past the give-up point is given up at once
    /// (`Some(elapsed)`: recomputing every chunk left from now still meets
    /// the SLO; waiting for the give-up point would only throw the read away
    /// there), and a read chosen past the give-up point (the load is already
    /// committed to fetching) only when overdue (twice its expected time).
    pub fn after_probe_deadline_s(&self, inp: &PlanInput, after: AfterProbe, read: f64, total: f64) -> Option<f64> {
        let expected = match after {
            AfterProbe::Continue => ((total - read).max(0.0) / inp.bytes_per_s.max(1.0)).max(self.decode_s(inp)),
            AfterProbe::Switch(i) => self.cost(inp, i),
            AfterProbe::Recompute => return None,
        };
        let decode = self.decode_s(inp);
        let g = self.give_up_s(inp.recomputed, inp.chunks_left, decode);
        if inp.elapsed_s < g && inp.elapsed_s + expected > g {
            return Some(inp.elapsed_s);
        }
        self.fetch_deadline_s(inp.recomputed, inp.chunks_left, inp.elapsed_s, expected, 0.0, decode)
    }

    /// The decision after probing level index `probed` of a chunk: `inp` is
    /// what the planner knows now (`elapsed_s` includes the probe,
    /// `bytes_per_s` is this chunk's probed rate, `latency_s` the time to
    /// first byte of a new request, `sizes` the expected sizes), `read` of
    /// `total` bytes of the probed level are in. Continue when the rest fits
    /// this chunk's share of the time left; else the highest lower level
    /// that fits; else the fastest of continuing, the lowest level and
    /// recompute (as in [`Planner::plan`]).
    pub fn after_probe(&self, inp: &PlanInput, probed: usize, read: f64, total: f64) -> AfterProbe {
        let left = self.slo_s - inp.elapsed_s - inp.recomputed as f64 * self.recompute_s() - self.decode_s(inp);
        let budget = left / inp.chunks_left.max(1) as f64;
        let decode = self.decode_s(inp);
        let rate = inp.bytes_per_s.max(1.0);
        let cont = ((total - read).max(0.0) / rate).max(decode);
        if cont <= budget {
            return AfterProbe::Continue;
        }
        if let Some(i) = (0..probed).rev().find(|&i| self.cost(inp, i) <= budget) {
            return AfterProbe::Switch(i);
        }
        let mut best = (cont, AfterProbe::Continue);
        if probed > 0 && self.cost(inp, 0) < best.0 {
            best = (self.cost(inp, 0), AfterProbe::Switch(0));
        }
        if self.recompute_s() < best.0 {
            best = (self.recompute_s(), AfterProbe::Recompute);
        }
        best.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: f64 = 1e6;

    fn planner(slo_s: f64) -> Planner {
        // 256-token chunks, 25.6K tokens/s: recompute costs 10 ms a chunk.
        Planner { slo_s, prefill_tokens_per_s: 25_600.0, chunk_tokens: 256, levels: vec![Level::Compact, Level::Default, Level::High], recompute_suffix: false }
    }

    /// 10 chunks left, nothing spent; sizes 5 / 8 / 13 MB of a 32 MB chunk.
    fn input(bytes_per_s: f64, decode_bytes_per_s: Option<f64>) -> PlanInput {
        PlanInput {
            elapsed_s: 0.0,
            chunks_left: 10,
            recomputed: 0,
            bytes_per_s,
            mean_bytes_per_s: bytes_per_s,
            latency_s: 0.0,
            sizes: vec![5.0 * MB, 8.0 * MB, 13.0 * MB],
            raw_bytes: 32.0 * MB,
            decode_bytes_per_s,
            after_recompute: false,
        }
    }

    #[test]
    fn fast_fetch_bound_link_keeps_the_target_level() {
        // 10 GB/s: 0.5 / 0.8 / 1.3 ms a chunk, 100 ms of SLO: every level
        // fits, but the top level is 60% slower and costs 5% of the SLO.
        let p = planner(0.1).plan(&input(10e9, None));
        assert_eq!(p.choice, Choice::Level(Level::Default));
    }

    #[test]
    fn top_level_when_it_is_nearly_free() {
        // Decode-bound: 32 MB at 16 GB/s = 2 ms for every level.
        let p = planner(0.1).plan(&input(10e9, Some(16e9)));
        assert_eq!(p.choice, Choice::Level(Level::High));
        // Fetch-bound but negligible against a loose SLO (10 x 0.5 ms
        // extra in 1 s).
        let p = planner(1.0).plan(&input(10e9, None));
        assert_eq!(p.choice, Choice::Level(Level::High));
    }

    #[test]
    fn tighter_budget_lower_level_then_recompute() {
        // 1 GB/s: 5 / 8 / 13 ms a chunk; 7 ms a chunk of budget: compact.
        let p = planner(0.07).plan(&input(1e9, None));
        assert_eq!(p.choice, Choice::Level(Level::Compact));
        // 0.1 GB/s: compact 50 ms, recompute 10 ms, budget 3 ms: recompute.
        let p = planner(0.03).plan(&input(0.1e9, None));
        assert_eq!(p.choice, Choice::Recompute);
        // Nothing fits but compact (5 ms) beats recompute (10 ms).
        let p = planner(0.03).plan(&input(1e9, None));
        assert_eq!(p.choice, Choice::Level(Level::Compact));
    }

    #[test]
    fn without_the_default_level_the_target_is_the_highest_below_it() {
        let mut pl = planner(0.1);
        pl.levels = vec![Level::Compact, Level::High];
        assert_eq!(pl.target(), 0);
        let mut inp = input(10e9, None);
        inp.sizes = vec![5.0 * MB, 13.0 * MB];
        assert_eq!(pl.plan(&inp).choice, Choice::Level(Level::Compact));
        pl.levels = vec![Level::High, Level::Lossless];
        assert_eq!(pl.target(), 0);
    }

    #[test]
    fn recompute_suffix_after_a_recompute() {
        let mut pl = planner(1.0);
        pl.recompute_suffix = true;
        let mut inp = input(10e9, None);
        inp.after_recompute = true;
        inp.recomputed = 1;
        assert_eq!(pl.plan(&inp).choice, Choice::Recompute);
    }

    #[test]
    fn estimator_averages_time_per_byte() {
        let e = Estimator::new(1e9);
        assert_eq!(e.bandwidth(None), 1e9);
        // 1 MB in 1 s, then 1 MB in 10 ms: the next fetch is expected to
        // take about the mean time (0.5 s), not 1 MB at the mean rate (~20 ms).
        e.observe_fetch(0, 1_000_000, 1.0);
        e.observe_fetch(0, 1_000_000, 0.01);
        let expected_s = 1e6 / e.bandwidth(Some(0));
        assert!((expected_s - 0.505).abs() < 1e-3, "{expected_s}"); // (decays a little towards 1 GB/s meanwhile)
        // An unmeasured tier falls back to the overall estimate.
        let (t3, all) = (e.bandwidth(Some(3)), e.bandwidth(None));
        assert!((t3 / all - 1.0).abs() < 1e-6, "{t3} {all}");
        // The second sample strayed by |0.01 - 1| / 1 from the estimate.
        assert!((e.spread() - 0.99).abs() < 1e-9, "{}", e.spread());
        let steady = Estimator::new(1e9);
        assert!(steady.spread().is_infinite());
        for _ in 0..4 {
            steady.observe_fetch(0, 1_000_000, 0.001);
        }
        assert_eq!(steady.spread(), 0.0);
    }

    #[test]
    fn the_long_run_mean_moves_slowly() {
        let e = Estimator::new(1e9);
        assert_eq!(e.mean_bandwidth(), 1e9);
        // One read at 10 GB/s: the running estimate follows it, the mean
        // (the initial rate as a prior sample, weight 0.05 for the new one)
        // barely moves: 1 / (0.05 / 10e9 + 0.95 / 1e9) = 1.05 GB/s.
        e.observe_fetch(0, 1_000_000, 1e-4);
        assert!((e.bandwidth(None) / 10e9 - 1.0).abs() < 1e-3, "{}", e.bandwidth(None));
        assert!((e.mean_bandwidth() / 1.0471e9 - 1.0).abs() < 1e-3, "{}", e.mean_bandwidth());
        // Many reads at 10 GB/s: the mean gets there too.
        for _ in 0..200 {
            e.observe_fetch(0, 1_000_000, 1e-4);
        }
        assert!(e.mean_bandwidth() > 9.9e9, "{}", e.mean_bandwidth());
    }

    #[test]
    fn a_jumping_link_upgrades_only_with_a_reserve_for_the_chunks_left() {
        // 100 ms for 10 chunks (10 ms each), recompute 10 ms a chunk. The
        // running estimate says 2 GB/s (compact 2.5, default 4 ms): the plan
        // is the default level.
        let pl = planner(0.1);
        let mut inp = input(2e9, None);
        let plan = pl.plan(&inp);
        assert_eq!(plan.choice, Choice::Level(Level::Default));
        // The long-run mean agrees: the 9 chunks after this one at 2.5 ms
        // plus 2 x 2.5 ms x 3 leave room: the planned level is read.
        assert!(pl.leaves_reserve(&inp, 1, 1.0));
        assert_eq!(pl.probe_level(&inp, &plan, 1.0, 0), Some(1));
        // The long-run mean is 0.5 GB/s (compact 10 ms, as slow as a
        // recompute): 9 x 10 ms + 2 x 5 ms x 3 = 120 ms > 96 ms. On a link
        // whose rate jumps (spread 1) the chunk is read at the lowest level...
        inp.mean_bytes_per_s = 0.5e9;
        assert!(!pl.leaves_reserve(&inp, 1, 1.0));
        assert_eq!(pl.probe_level(&inp, &plan, 1.0, 0), Some(0));
        // ... on a steady link (or before two reads measured it) the plan stands.
        assert_eq!(pl.probe_level(&inp, &plan, 0.1, 0), Some(1));
        assert_eq!(pl.probe_level(&inp, &plan, f64::INFINITY, 0), Some(1));
        // 96 ms - 90 ms leaves 6 ms for the reserve (2 x sigma x 3): a link
        // with spread up to 0.1 (sigma 1 ms) gets the planned level.
        assert!(pl.leaves_reserve(&inp, 1, 0.099) && !pl.leaves_reserve(&inp, 1, 0.11));
        // The last chunk needs no reserve: it only has to fit.
        inp.chunks_left = 1;
        inp.elapsed_s = 0.09;
        assert!(pl.leaves_reserve(&inp, 1, 1.0));
        inp.elapsed_s = 0.097;
        assert!(!pl.leaves_reserve(&inp, 1, 1.0));
    }

    #[test]
    fn a_collapsed_estimate_returns_to_the_initial_one_without_fetches() {
        let mut e = Estimator::new(1e9);
        e.half_life = std::time::Duration::from_millis(20);
        e.observe_fetch(0, 1_000, 1.0); // a stall: 1 kB/s
        assert!(e.bandwidth(None) < 1e6);
        std::thread::sleep(std::time::Duration::from_millis(600)); // 30 half-lives
        assert!(e.bandwidth(None) > 0.5e9, "{}", e.bandwidth(None));
    }

    #[test]
    fn a_fetch_is_given_up_where_recomputing_the_rest_still_meets_the_slo() {
        let pl = planner(0.1); // recompute 10 ms a chunk
        // 5 chunks left: give up at 50 ms; past it, no deadline.
        assert_eq!(pl.give_up_s(0, 5, 0.0), pl.slo_s - 0.05);
        assert_eq!(pl.fetch_deadline_s(0, 5, 0.01, 0.001, 0.0, 0.0), Some(pl.slo_s - 0.05));
        assert_eq!(pl.fetch_deadline_s(0, 5, 0.06, 0.001, 0.0, 0.0), None);
        // A fetch expected to end past the give-up point: overdue at twice
        // its expected time on a steady link, the give-up point otherwise.
        let (e, x) = (0.0495, 0.001);
        assert_eq!(pl.fetch_deadline_s(0, 5, e, x, 0.0, 0.0), Some(e + 2.0 * x));
        assert_eq!(pl.fetch_deadline_s(0, 5, e, x, 1.0, 0.0), Some(pl.slo_s - 0.05));
    }
}

//! Stream-load: fetch → verify → decode (layer, chunk) → scatter, layer by layer.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::Mutex;

use super::{guarded, Deadline, DeviceTarget, Expire, Job, JobKind, Pipeline, Stats, TableSets, Task};
use crate::codec::{Container, DecodeLimits, Dtype, KvShape, Level};
use crate::gpu::PreparedChunk;
use crate::layout::KvLayout;
use crate::store::{key_hex, Bytes, Fetched, Key, Progressive, ReadOn, TierStack};
use crate::streaming::adaptive::{AfterProbe, PlanInput, Planner, PROBE_BYTES};
use crate::streaming::{register, ChunkDecision, Choice, Estimator, StreamStats};

/// One chunk to load.
#[derive(Clone, Debug)]
pub struct LoadChunk {
    pub key: Key,
    /// Leading tokens of the chunk that are not written (the engine already
    /// has them); a multiple of the layout's block size.
    pub skip_tokens: usize,
    /// Destination blocks of tokens `skip_tokens..chunk_tokens`, in order.
    pub blocks: Vec<u32>,
}

/// A load request, resolved to chunks and blocks by the caller.
pub struct LoadSpec {
    /// Destination memory; `layer_base` entries are host pointers.
    pub layout: Arc<KvLayout>,
    pub chunk_tokens: usize,
    pub chunks: Vec<LoadChunk>,
    /// Chunks not fetched this long after submission fail.
    pub timeout: Duration,
    pub tiers: TierStack,
    pub limits: DecodeLimits,
    /// Runs once, when every chunk has been fetched or has failed (the
    /// caller ends its lease here).
    pub on_fetched: Option<Box<dyn FnOnce() + Send>>,
    /// Set when `layout` is in GPU memory: decode there, not on the host.
    pub device: Option<DeviceTarget>,
    /// The model-level table sets chunks may reference.
    pub tables: Arc<TableSets>,
}

/// How a load chooses among the levels a chunk is stored at (see
/// [`crate::streaming`]).
pub struct StreamPlan {
    /// Per chunk (as in `LoadSpec::chunks`): its key at each stored level,
    /// lowest level first. `LoadChunk::key` is ignored.
    pub keys: Vec<Vec<(Level, Key)>>,
    /// The SLO policy: chunks are streamed in order and each gets the level
    /// the planner picks (or is left for recompute). `None`: every chunk is
    /// fetched at once at `prefer`, falling back to the other levels stored
    /// (lower first) when it is missing.
    pub planner: Option<Planner>,
    pub prefer: Level,
    pub estimator: Arc<Estimator>,
    pub stats: Arc<StreamStats>,
    /// Threads decoding in parallel (for the decode-rate estimate).
    pub decode_threads: usize,
}

/// How a progressive read of one chunk ended (`LoadRun::read_chunk`).
enum ChunkRead {
    /// Read whole and verified; `since_first_s`: the read's time after its
    /// first byte (the whole time where the tier reports no first byte).
    Done { parsed: Box<ParsedChunk>, bytes: usize, level: Option<Level>, tier: usize, since_first_s: f64, ttfb_s: Option<f64>, probed_bytes_per_s: f64 },
    /// Stopped at the probe's decision point.
    Stopped { after: AfterProbe, tier: usize, read: usize, since_first_s: f64, ttfb_s: f64, give_up: Option<Instant> },
}

struct StreamRun {
    plan: StreamPlan,
    decisions: Arc<Mutex<Vec<ChunkDecision>>>,
    deadlines: Option<Sender<Deadline>>,
    /// Raw bytes of one chunk.
    raw_bytes: u64,
}

/// A verified container that owns its bytes: parsed for the CPU decoder, or
/// checked and described for the GPU's (which builds its own tables, so the
/// host never parses them: a third of a chunk's CPU decode).
enum ParsedChunk {
    Host {
        // Declared first so it is dropped before the bytes it borrows.
        container: Container<'static>,
        _bytes: Bytes,
    },
    Device(PreparedChunk),
}

impl ParsedChunk {
    fn parse(bytes: Bytes, limits: DecodeLimits, device: Option<&DeviceTarget>, tables: &TableSets) -> Result<ParsedChunk, String> {
        // The set the chunk references, if this context holds it (else the
        // parsers report the missing set).
        let set = tables.for_container(&bytes).cloned();
        if let Some(dev) = device {
            let gpu_set = match &set {
                Some(s) => Some(dev.side.tables(s).map_err(|e| format!("uploading table set {:016x}: {e}", s.id()))?),
                None => None,
            };
            return PreparedChunk::with_tables(bytes, limits, gpu_set.as_ref()).map(ParsedChunk::Device).map_err(|e| e.to_string());
        }
        // SAFETY: the slice points into the shared allocation, which is
        // immutable and never moves or is freed while `_bytes` holds it, and `container` (the only
        // holder of the reference) is dropped first and never handed out
        // with the 'static lifetime (see `container()`).
        let view: &'static [u8] = unsafe { std::slice::from_raw_parts(bytes.as_ptr(), bytes.len()) };
        let container = Container::parse(view, set.as_deref(), limits).map_err(|e| e.to_string())?;
        Ok(ParsedChunk::Host { container, _bytes: bytes })
    }

    /// The host container (host loads only).
    fn container(&self) -> &Container<'_> {
        match self {
            ParsedChunk::Host { container, .. } => container,
            ParsedChunk::Device(_) => unreachable!("device chunks are decoded on the device"),
        }
    }

    fn shape(&self) -> (Dtype, KvShape) {
        match self {
            ParsedChunk::Host { container, .. } => (container.header().dtype, container.header().shape),
            ParsedChunk::Device(p) => (p.dtype(), p.shape()),
        }
    }
}

enum Slot {
    Fetching,
    Ready(Arc<ParsedChunk>, usize),
    Failed,
    /// GPU loads: decoded on the device (its bytes released).
    Decoded,
}

struct LoadState {
    slots: Vec<Slot>,
    /// Chunks still being fetched.
    unresolved: usize,
    /// (layer, chunk) pairs ready to decode; lowest layer first.
    ready: BTreeSet<(usize, usize)>,
    /// Per layer: chunks not yet written or failed.
    remaining: Vec<usize>,
    layers_done: usize,
    in_flight: usize,
    on_fetched: Option<Box<dyn FnOnce() + Send>>,
    finished: bool,
    /// Streamed loads: chunks left for recompute so far, whether one was,
    /// and the moment past which the chunk being fetched is given up.
    recomputed: usize,
    give_up: Option<Instant>,
    /// GPU loads: the device decode was started (or found nothing to do).
    device_launched: bool,
}

struct LoadRun {
    job: Arc<Job>,
    layout: Arc<KvLayout>,
    chunk_tokens: usize,
    chunks: Vec<LoadChunk>,
    timeout: Duration,
    tiers: TierStack,
    limits: DecodeLimits,
    cpu: Sender<Task>,
    stats: Arc<Stats>,
    st: Mutex<LoadState>,
    stream: Option<StreamRun>,
    device: Option<DeviceTarget>,
    tables: Arc<TableSets>,
    /// This run, for tasks started from `&self` contexts.
    me: Weak<LoadRun>,
}

thread_local! {
    static SCRATCH: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

impl Pipeline {
    /// Starts a load. The destination memory must stay valid, and must not be
    /// used by the engine, until the job is done (or each layer, once that
    /// layer is complete).
    pub fn load(&self, spec: LoadSpec) -> Arc<Job> {
        self.load_with(spec, None)
    }

    /// Starts a load whose chunks are stored at several levels: with a
    /// planner, chunks are streamed in order and each one's level (or
    /// recompute) is chosen to meet the SLO; without, each chunk is fetched
    /// at the preferred level, falling back to the others. Decisions are
    /// available from [`Job::chunk_decisions`].
    pub fn load_streamed(&self, spec: LoadSpec, plan: StreamPlan) -> Arc<Job> {
        self.load_with(spec, Some(plan))
    }

    fn load_with(&self, spec: LoadSpec, plan: Option<StreamPlan>) -> Arc<Job> {
        let layers = spec.layout.layers;
        let job = Arc::new(Job::new(self.job_id(), JobKind::Load, layers));
        Stats::add(&self.stats.loads, 1);
        let n = spec.chunks.len();
        let raw_bytes = spec.layout.chunk_shape(spec.chunk_tokens).elems() as u64 * spec.layout.dtype.size() as u64;
        let stream = plan.map(|plan| {
            assert_eq!(plan.keys.len(), n, "one key set per chunk");
            if plan.planner.is_some() {
                StreamStats::add(&plan.stats.adaptive_loads, 1);
            }
            StreamRun { plan, decisions: Arc::new(Mutex::new(Vec::new())), deadlines: self.deadlines.clone(), raw_bytes }
        });
        if let Some(s) = &stream {
            register(&job, Arc::clone(&s.decisions));
        }
        let run = Arc::new_cyclic(|me| LoadRun {
            me: me.clone(),
            device: spec.device,
            tables: spec.tables,
            job: Arc::clone(&job),
            layout: spec.layout,
            chunk_tokens: spec.chunk_tokens,
            chunks: spec.chunks,
            timeout: spec.timeout,
            tiers: spec.tiers,
            limits: spec.limits,
            cpu: self.cpu.tx.clone().expect("pool is running"),
            stats: Arc::clone(&self.stats),
            st: Mutex::new(LoadState {
                slots: (0..n).map(|_| Slot::Fetching).collect(),
                unresolved: n,
                ready: BTreeSet::new(),
                remaining: vec![n; layers],
                layers_done: 0,
                in_flight: 0,
                on_fetched: spec.on_fetched,
                finished: false,
                recomputed: 0,
                give_up: None,
                device_launched: false,
            }),
            stream,
        });
        tracing::debug!(job = job.id, chunks = n, layers, "load submitted");
        let weak: Weak<dyn Expire> = Arc::downgrade(&run) as Weak<dyn Expire>;
        *job.canceller.lock() = Some(weak.clone());
        if n == 0 {
            run.finish_if_idle(&mut run.st.lock());
            let hook = run.st.lock().on_fetched.take();
            if let Some(f) = hook {
                f();
            }
            return job;
        }
        self.watch(job.started + run.timeout, weak);
        if run.stream.as_ref().is_some_and(|s| s.plan.planner.is_some()) {
            let run = Arc::clone(&run);
            self.io.submit(Box::new(move || run.stream_chunks()));
        } else {
            for c in 0..n {
                let run = Arc::clone(&run);
                self.io.submit(Box::new(move || run.fetch(c)));
            }
        }
        job
    }
}

impl LoadRun {
    fn fetch(self: &Arc<Self>, c: usize) {
        if self.job.is_cancelled() || !matches!(self.st.lock().slots[c], Slot::Fetching) {
            return;
        }
        let t0 = Instant::now();
        let candidates: Vec<(Option<Level>, Key)> = match &self.stream {
            None => vec![(None, self.chunks[c].key)],
            Some(s) => {
                let keys = &s.plan.keys[c];
                let mut order: Vec<(Option<Level>, Key)> = Vec::new();
                let prefer = s.plan.prefer;
                order.extend(keys.iter().filter(|(l, _)| *l == prefer).map(|(l, k)| (Some(*l), *k)));
                order.extend(keys.iter().rev().filter(|(l, _)| l.number() < prefer.number()).map(|(l, k)| (Some(*l), *k)));
                order.extend(keys.iter().filter(|(l, _)| l.number() > prefer.number()).map(|(l, k)| (Some(*l), *k)));
                order
            }
        };
        let result = self.fetch_one(c, &candidates);
        Stats::add(&self.stats.fetch_ns, t0.elapsed().as_nanos() as u64);
        if let Some(s) = &self.stream {
            let outcome = match &result {
                Ok((_, _, Some(l), _)) => Choice::Level(*l),
                _ => Choice::Recompute,
            };
            let (bytes, secs) = match &result {
                Ok((_, b, _, _)) => (*b as u64, t0.elapsed().as_secs_f64()),
                _ => (0, 0.0),
            };
            s.decisions.lock().push(ChunkDecision {
                chunk: c,
                planned: Choice::Level(s.plan.prefer),
                outcome,
                est_bytes_per_s: 0.0,
                budget_s: 0.0,
                bytes,
                fetch_s: secs,
                probed_bytes_per_s: 0.0,
            });
        }
        self.resolve(c, result.map(|(p, b, l, _)| (p, b, l)));
    }

    /// Fetches chunk `c` from the first of `candidates` (level, key) that a
    /// tier holds, verifies it; returns it with its size, level and tier.
    #[allow(clippy::type_complexity)]
    fn fetch_one(&self, c: usize, candidates: &[(Option<Level>, Key)]) -> Result<(ParsedChunk, usize, Option<Level>, usize), String> {
        let mut missing = Vec::new();
        for &(level, key) in candidates {
            match self.fetch_key(c, key)? {
                Some((p, bytes, tier)) => return Ok((p, bytes, level, tier)),
                None => missing.push(key_hex(&key)),
            }
        }
        Err(format!("chunk {}: not in any tier", missing.join(", ")))
    }

    /// Fetches and verifies one key (`None`: no tier has it).
    fn fetch_key(&self, c: usize, key: Key) -> Result<Option<(ParsedChunk, usize, usize)>, String> {
        let fetched = guarded(|| self.tiers.fetch(&key).map_err(|e| format!("chunk {}: {e}", key_hex(&key))))?;
        let Some(f) = fetched else {
            return Ok(None);
        };
        self.verify(c, key, f).map(Some)
    }

    /// Parses and checks a fetched value (the container's checksum covers
    /// the whole assembled stream) against the layout.
    fn verify(&self, c: usize, key: Key, f: Fetched) -> Result<(ParsedChunk, usize, usize), String> {
        guarded(|| {
            let bytes = f.value.len();
            let parsed = ParsedChunk::parse(f.value, self.limits, self.device.as_ref(), &self.tables).map_err(|e| format!("chunk {}: {e}", key_hex(&key)))?;
            let (dtype, shape) = parsed.shape();
            let want = self.layout.chunk_shape(self.chunk_tokens);
            if dtype != self.layout.dtype || shape != want {
                return Err(format!(
                    "chunk {}: stored as {} {:?}, the layout needs {} {:?}",
                    key_hex(&key),
                    dtype.name(),
                    shape,
                    self.layout.dtype.name(),
                    want
                ));
            }
            tracing::trace!(job = self.job.id, chunk = c, tier = f.tier, bytes, "fetched");
            Ok((parsed, bytes, f.tier))
        })
    }

    /// Streams the chunks in order, each at the level the planner picks for
    /// the time left (or left for recompute), learning the bandwidth as it
    /// goes. Runs on one io thread; a fetch that is still running at its
    /// give-up point is abandoned by the watchdog (see `expire`).
    fn stream_chunks(self: &Arc<Self>) {
        let s = self.stream.as_ref().expect("streamed load");
        let planner = s.plan.planner.as_ref().expect("adaptive load");
        let est = &s.plan.estimator;
        let n = self.chunks.len();
        let mut tier: Option<usize> = None;
        // Chunks left for recompute in a row without a read.
        let mut unread = 0usize;
        let levels = &planner.levels;
        for c in 0..n {
            let (recomputed, after_recompute) = {
                let st = self.st.lock();
                if self.job.is_cancelled() || !matches!(st.slots[c], Slot::Fetching) {
                    // Abandoned at a give-up point or expired: every later
                    // chunk was failed with it.
                    return;
                }
                (st.recomputed, st.recomputed > 0)
            };
            let elapsed = self.job.started.elapsed().as_secs_f64();
            let inp = PlanInput {
                elapsed_s: elapsed,
                chunks_left: n - c,
                recomputed,
                bytes_per_s: est.bandwidth(tier),
                mean_bytes_per_s: est.mean_bandwidth(),
                latency_s: est.latency(),
                sizes: levels.iter().map(|&l| est.size(l, s.raw_bytes)).collect(),
                raw_bytes: s.raw_bytes as f64,
                decode_bytes_per_s: est.decode_rate(),
                after_recompute,
            };
            let plan = planner.plan(&inp);
            // Past the give-up point recomputing the rest misses the SLO
            // anyway. A fetch expected to end past it on a steady link is
            // given up only when overdue (Planner::fetch_deadline_s), so a
            // fast load is not thrown away because the point swept past a
            // 1 ms fetch.
            let give_up_s = planner.fetch_deadline_s(recomputed, n - c, elapsed, plan.expected_s, est.spread(), planner.decode_s(&inp)).filter(|&g| g > elapsed);
            tracing::debug!(
                job = self.job.id,
                chunk = c,
                choice = plan.choice.name(),
                est_gbps = inp.bytes_per_s * 8e-9,
                budget_ms = plan.budget_s * 1e3,
                expected_ms = plan.expected_s * 1e3,
                elapsed_ms = elapsed * 1e3,
                "stream decision"
            );
            let mut decision = ChunkDecision {
                chunk: c,
                planned: plan.choice,
                outcome: Choice::Recompute,
                est_bytes_per_s: inp.bytes_per_s,
                budget_s: plan.budget_s,
                bytes: 0,
                fetch_s: 0.0,
                probed_bytes_per_s: 0.0,
            };
            // Where to start reading: the planned level, or (a planned
            // recompute on a link whose rate jumps) a probe of the lowest.
            let Some(probe) = planner.probe_level(&inp, &plan, est.spread(), unread) else {
                unread += 1;
                s.decisions.lock().push(decision);
                self.recompute(c, "left for the engine to recompute: no level fits the time-to-first-token SLO".into(), false);
                continue;
            };
            // The give-up point (none: the load is committed to this
            // fetch); for a probe of a chunk planned for recompute, until
            // its decision, the earlier of that and the probe's stall limit.
            let at = |secs: f64| self.job.started + Duration::from_secs_f64(secs.max(0.0));
            let give_up = give_up_s.map(at);
            let probe_limit = match plan.choice {
                Choice::Recompute => Some(at(planner.probe_deadline_s(elapsed).min(give_up_s.unwrap_or(f64::INFINITY)))),
                Choice::Level(_) => give_up,
            };
            self.st.lock().give_up = probe_limit;
            if let Some(tx) = &s.deadlines {
                for t in probe_limit.into_iter().chain(give_up) {
                    let weak: Weak<dyn Expire> = Arc::downgrade(self) as Weak<dyn Expire>;
                    let _ = tx.send(Deadline(t, weak));
                }
            }
            unread = 0;
            let t0 = Instant::now();
            // The probed level, then cheaper ones if it is missing; probed
            // from its first pieces, then kept, traded for a lower level, or
            // left for recompute (Planner::after_probe).
            let mut result = self.read_chunk(c, probe, Some(&inp), give_up);
            let mut why_recompute = None;
            if let Ok(ChunkRead::Stopped { after, tier: t, read, since_first_s, ttfb_s, give_up }) = result {
                est.observe_fetch(t, read as u64, since_first_s);
                est.observe_latency(ttfb_s);
                tier = Some(t);
                decision.bytes = read as u64;
                decision.probed_bytes_per_s = read as f64 / since_first_s;
                match after {
                    AfterProbe::Switch(i) => result = self.read_chunk(c, i, None, give_up),
                    AfterProbe::Recompute | AfterProbe::Continue => {
                        why_recompute = Some(format!(
                            "chunk {c}: left for the engine to recompute: its probe measured {:.3} Gbps, too slow for the time-to-first-token SLO",
                            decision.probed_bytes_per_s * 8e-9
                        ));
                    }
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            Stats::add(&self.stats.fetch_ns, t0.elapsed().as_nanos() as u64);
            self.st.lock().give_up = None;
            decision.fetch_s = secs;
            if let Some(why) = why_recompute {
                s.decisions.lock().push(decision);
                self.recompute(c, why, false);
                continue;
            }
            match result {
                Ok(ChunkRead::Done { parsed, bytes, level: lvl, tier: t, since_first_s, ttfb_s, probed_bytes_per_s }) => {
                    est.observe_fetch(t, bytes as u64, since_first_s);
                    if let Some(x) = ttfb_s {
                        est.observe_latency(x);
                    }
                    if let Some(l) = lvl {
                        est.observe_size(l, bytes as u64, s.raw_bytes);
                        decision.outcome = Choice::Level(l);
                    }
                    if probed_bytes_per_s > 0.0 {
                        decision.probed_bytes_per_s = probed_bytes_per_s;
                    }
                    tier = Some(t);
                    decision.bytes += bytes as u64;
                    let late = !matches!(self.st.lock().slots[c], Slot::Fetching);
                    if late {
                        decision.outcome = Choice::Recompute;
                    }
                    s.decisions.lock().push(decision);
                    self.resolve(c, Ok((*parsed, bytes, lvl)));
                }
                Ok(ChunkRead::Stopped { .. }) => unreachable!("a read without a probe is never stopped"),
                Err(why) => {
                    s.decisions.lock().push(decision);
                    // A missing or corrupt chunk is recomputed like a planned one.
                    self.recompute(c, why, false);
                }
            }
        }
    }

    /// Reads chunk `c` of a streamed load progressively at level index `li`
    /// of the planner's levels (or a lower one where it is missing), and
    /// verifies it. With `probe` (what the planner knew before the chunk),
    /// decides once at the probe's decision point (`probe_done`) with
    /// `Planner::after_probe` whether to read on; a read it stops comes
    /// back as `ChunkRead::Stopped`. From the decision on (or from the start
    /// without a probe) the load's give-up point is `give_up`.
    fn read_chunk(self: &Arc<Self>, c: usize, li: usize, probe: Option<&PlanInput>, give_up: Option<Instant>) -> Result<ChunkRead, String> {
        if probe.is_none() {
            self.st.lock().give_up = give_up;
        }
        let s = self.stream.as_ref().expect("streamed load");
        let planner = s.plan.planner.as_ref().expect("adaptive load");
        let n = self.chunks.len();
        let Some(&want) = planner.levels.get(li) else { return Err(format!("chunk {c}: no level {li} stored")) };
        let candidates: Vec<(Level, Key)> = s.plan.keys[c].iter().rev().filter(|(l, _)| l.number() <= want.number()).copied().collect();
        let mut missing = Vec::new();
        for (level, key) in candidates {
            let t0 = Instant::now();
            let mut first: Option<Instant> = None;
            let mut decided: Option<(AfterProbe, f64, Option<Instant>)> = None;
            let level_index = planner.levels.iter().position(|&l| l == level);
            let mut on = |read: usize, total: usize| -> ReadOn {
                let now = Instant::now();
                if read == 0 {
                    first = Some(now);
                    return ReadOn::Piece;
                }
                let (Some(inp), Some(li), None) = (probe, level_index, decided) else { return ReadOn::Rest };
                if read >= total {
                    return ReadOn::Rest;
                }
                let since = now.duration_since(first.unwrap_or(t0)).as_secs_f64();
                let rate = read as f64 / since.max(1e-9);
                let now_inp = PlanInput {
                    elapsed_s: self.job.started.elapsed().as_secs_f64(),
                    chunks_left: n - c,
                    recomputed: self.st.lock().recomputed,
                    bytes_per_s: rate,
                    latency_s: first.map_or(0.0, |f| f.duration_since(t0).as_secs_f64()),
                    ..inp.clone()
                };
                let Some(after) = planner.probe_decision(&now_inp, li, read as f64, total as f64, since) else {
                    return ReadOn::Piece;
                };
                // From the decision on, the give-up point of what it chose
                // (this chunk's rate is now known).
                let deadline = planner.after_probe_deadline_s(&now_inp, after, read as f64, total as f64).map(|g| self.job.started + Duration::from_secs_f64(g.max(0.0)));
                self.st.lock().give_up = deadline;
                if let (Some(t), Some(tx)) = (deadline, &s.deadlines) {
                    let weak: Weak<dyn Expire> = Arc::downgrade(self) as Weak<dyn Expire>;
                    let _ = tx.send(Deadline(t, weak));
                }
                tracing::debug!(job = self.job.id, chunk = c, level = level.name(), read, total, probed_gbps = rate * 8e-9, ?after, "probe decision");
                decided = Some((after, rate, deadline));
                if after == AfterProbe::Continue {
                    ReadOn::Rest
                } else {
                    ReadOn::Stop
                }
            };
            let fetched = guarded(|| self.tiers.fetch_progressive(&key, PROBE_BYTES, &mut on).map_err(|e| format!("chunk {}: {e}", key_hex(&key))));
            let end = Instant::now();
            let ttfb_s = first.map(|f| f.duration_since(t0).as_secs_f64());
            let since_first_s = end.duration_since(first.unwrap_or(t0)).as_secs_f64();
            match fetched? {
                None => missing.push(key_hex(&key)),
                Some(Progressive::Stopped { tier, read, .. }) => {
                    let (after, _, give_up) = decided.expect("only the probe stops a read");
                    return Ok(ChunkRead::Stopped { after, tier, read, since_first_s, ttfb_s: ttfb_s.unwrap_or(0.0), give_up });
                }
                Some(Progressive::Done(f)) => {
                    let (parsed, bytes, tier) = self.verify(c, key, f)?;
                    let probed_bytes_per_s = decided.map_or(0.0, |d| d.1);
                    return Ok(ChunkRead::Done { parsed: Box::new(parsed), bytes, level: Some(level), tier, since_first_s, ttfb_s, probed_bytes_per_s });
                }
            }
        }
        Err(format!("chunk {}: not in any tier", missing.join(", ")))
    }

    /// Leaves chunk `c` (still being fetched or not started) for the engine.
    fn recompute(self: &Arc<Self>, c: usize, why: String, abandoned: bool) {
        let s = self.stream.as_ref().expect("streamed load");
        let mut st = self.st.lock();
        if !matches!(st.slots[c], Slot::Fetching) {
            return;
        }
        st.unresolved -= 1;
        st.recomputed += 1;
        StreamStats::add(&s.plan.stats.recomputed_chunks, 1);
        if abandoned {
            StreamStats::add(&s.plan.stats.abandoned_fetches, 1);
        }
        tracing::debug!(job = self.job.id, chunk = c, reason = %why, "chunk left for recompute");
        self.fail_chunk(&mut st, c, why);
        let hook = if st.unresolved == 0 { st.on_fetched.take() } else { None };
        self.finish_if_idle(&mut st);
        drop(st);
        if let Some(f) = hook {
            f();
        }
    }

    /// Records the outcome of chunk `c`'s fetch (ignored if it already
    /// failed, e.g. by timeout).
    fn resolve(self: &Arc<Self>, c: usize, result: Result<(ParsedChunk, usize, Option<Level>), String>) {
        let mut st = self.st.lock();
        if !matches!(st.slots[c], Slot::Fetching) {
            return;
        }
        st.unresolved -= 1;
        match result {
            Ok((parsed, bytes, level)) => {
                if let (Some(s), Some(l)) = (&self.stream, level) {
                    StreamStats::add(&s.plan.stats.loaded_chunks[l.number() as usize - 1], 1);
                }
                Stats::add(&self.stats.load_bytes_fetched, bytes as u64);
                let layers = self.layout.layers;
                st.slots[c] = Slot::Ready(Arc::new(parsed), layers);
                // GPU loads decode every chunk at once when all are fetched
                // (finish_if_idle starts it).
                let host_layers = if self.device.is_some() { 0 } else { layers };
                for l in 0..host_layers {
                    st.ready.insert((l, c));
                }
                for _ in 0..host_layers {
                    let run = Arc::clone(self);
                    let _ = self.cpu.send(Box::new(move || run.decode_step()));
                }
            }
            Err(why) => self.fail_chunk(&mut st, c, why),
        }
        let hook = if st.unresolved == 0 { st.on_fetched.take() } else { None };
        self.finish_if_idle(&mut st);
        drop(st);
        if let Some(f) = hook {
            f();
        }
    }

    /// Marks chunk `c` failed: its blocks are reported, its layers not yet
    /// written no longer wait for it.
    fn fail_chunk(&self, st: &mut LoadState, c: usize, why: String) {
        let pending: Vec<usize> = match &st.slots[c] {
            Slot::Failed | Slot::Decoded => return,
            Slot::Fetching => (0..self.layout.layers).collect(),
            Slot::Ready(..) => st.ready.iter().filter(|&&(_, cc)| cc == c).map(|&(l, _)| l).collect(),
        };
        for &l in &pending {
            st.ready.remove(&(l, c));
            st.remaining[l] -= 1;
        }
        st.slots[c] = Slot::Failed;
        tracing::warn!(job = self.job.id, chunk = c, reason = %why, "chunk load failed");
        Stats::add(&self.stats.load_chunks_failed, 1);
        Stats::add(&self.stats.load_blocks_failed, self.chunks[c].blocks.len() as u64);
        self.job.update(|p| Job::fail_blocks(p, &self.chunks[c].blocks, why));
        self.advance(st);
    }

    /// Publishes layers that no chunk waits for any more.
    fn advance(&self, st: &mut LoadState) {
        let mut l = st.layers_done;
        while l < st.remaining.len() && st.remaining[l] == 0 {
            l += 1;
        }
        if l != st.layers_done {
            st.layers_done = l;
            self.job.update(|p| p.layers_done = l);
        }
    }

    fn finish_if_idle(&self, st: &mut LoadState) {
        if st.finished || st.unresolved != 0 || st.in_flight != 0 || !st.ready.is_empty() {
            return;
        }
        if self.device.is_some() && !st.device_launched {
            st.device_launched = true;
            let any = st.slots.iter().any(|s| matches!(s, Slot::Ready(..)));
            if let (true, Some(me)) = (any && !self.job.is_cancelled(), self.me.upgrade()) {
                st.in_flight += 1;
                let _ = self.cpu.send(Box::new(move || me.device_decode()));
                return;
            }
            // Nothing fetched (or cancelled): chunks still ready fail below.
            let ready: Vec<usize> = (0..st.slots.len()).filter(|&c| matches!(st.slots[c], Slot::Ready(..))).collect();
            for c in ready {
                self.fail_chunk(st, c, "load cancelled".into());
            }
        }
        st.finished = true;
        let elapsed = self.job.started.elapsed();
        let p = self.job.update(|p| {
            p.layers_done = self.layout.layers;
            p.reusable = true;
            p.done = true;
            p.clone()
        });
        tracing::info!(
            job = self.job.id,
            chunks_ok = p.chunks_ok,
            chunks_failed = p.chunks_failed,
            ms = elapsed.as_secs_f64() * 1e3,
            "load done"
        );
    }

    /// GPU loads: stage every fetched chunk, enqueue the decode layer by
    /// layer (the job's layer events become waitable), then wait for the
    /// device and check each chunk's error bits. A chunk the device found
    /// corrupt has its blocks reported failed (they were written and must
    /// not be used).
    fn device_decode(self: Arc<Self>) {
        let dev = self.device.as_ref().expect("device loads only");
        let t0 = Instant::now();
        let bs = self.layout.block_size;
        let fetched: Vec<(usize, Arc<ParsedChunk>)> = {
            let st = self.st.lock();
            (0..st.slots.len())
                .filter_map(|c| match &st.slots[c] {
                    Slot::Ready(p, _) => Some((c, Arc::clone(p))),
                    _ => None,
                })
                .collect()
        };
        // Blocks per chunk from its first token: the ones the engine already
        // holds are "skip" blocks the kernel never writes.
        let ids: Vec<Vec<u32>> = fetched
            .iter()
            .map(|(c, _)| {
                let ch = &self.chunks[*c];
                let mut v = vec![crate::gpu::SKIP_BLOCK; ch.skip_tokens / bs];
                v.extend_from_slice(&ch.blocks);
                v
            })
            .collect();
        let result = guarded(|| {
            let prepared: Vec<&PreparedChunk> = fetched
                .iter()
                .map(|(_, p)| match &**p {
                    ParsedChunk::Device(d) => d,
                    ParsedChunk::Host { .. } => unreachable!("device loads fetch device chunks"),
                })
                .collect();
            let staged = dev.side.decoder.stage_prepared(&prepared).map_err(|e| format!("GPU staging: {e}"))?;
            let t_staged = t0.elapsed();
            let id_refs: Vec<&[u32]> = ids.iter().map(|v| v.as_slice()).collect();
            let after = dev.after.as_ref().map(|e| e.raw());
            // SAFETY: the context checked that the layout's memory is on this
            // device; the engine keeps the destination blocks valid and unused
            // until the job is done (docs/ABI.md).
            let events = unsafe { dev.side.decoder.decode_layered_owned(staged, &self.layout, &id_refs, after) }.map_err(|e| format!("GPU decode: {e}"))?;
            let events = Arc::new(events);
            *self.job.layer_events.lock() = Some(Arc::clone(&events));
            self.job.update(|p| p.device_enqueued = true);
            tracing::debug!(
                job = self.job.id,
                chunks = fetched.len(),
                since_submit_ms = self.job.started.elapsed().as_secs_f64() * 1e3,
                stage_ms = t_staged.as_secs_f64() * 1e3,
                enqueue_ms = (t0.elapsed() - t_staged).as_secs_f64() * 1e3,
                "device decode enqueued"
            );
            events.chunk_errors().map_err(|e| format!("GPU decode: {e}"))
        });
        Stats::add(&self.stats.decode_ns, t0.elapsed().as_nanos() as u64);
        let mut st = self.st.lock();
        st.in_flight -= 1;
        match result {
            Ok(bits) => {
                for ((c, _), b) in fetched.iter().zip(bits) {
                    if b != 0 {
                        self.fail_chunk(&mut st, *c, format!("chunk {c}: corrupt stream detected on the GPU (error bits {b:#x}); its blocks were written and must be recomputed"));
                    } else {
                        Stats::add(&self.stats.load_bytes_decoded, (self.layout.chunk_shape(self.chunk_tokens).elems() * self.layout.dtype.size()) as u64);
                        Stats::add(&self.stats.load_chunks_ok, 1);
                        self.job.update(|p| p.chunks_ok += 1);
                        st.slots[*c] = Slot::Decoded;
                    }
                }
            }
            Err(why) => {
                for (c, _) in &fetched {
                    self.fail_chunk(&mut st, *c, why.clone());
                }
            }
        }
        self.finish_if_idle(&mut st);
        drop(st);
        // The device work is over: waits need no events any more.
        *self.job.layer_events.lock() = None;
    }

    /// Decodes and scatters the lowest ready (layer, chunk).
    fn decode_step(self: &Arc<Self>) {
        let (l, c, parsed) = {
            let mut st = self.st.lock();
            let Some((l, c)) = st.ready.pop_first() else { return };
            let Slot::Ready(parsed, _) = &st.slots[c] else { unreachable!("ready entries belong to ready chunks") };
            let parsed = Arc::clone(parsed);
            st.in_flight += 1;
            (l, c, parsed)
        };
        let t0 = Instant::now();
        let result = if self.job.is_cancelled() {
            Err("load cancelled".to_string())
        } else {
            guarded(|| self.write_layer(&parsed, l, c))
        };
        Stats::add(&self.stats.decode_ns, t0.elapsed().as_nanos() as u64);
        if let (Some(s), Ok(bytes)) = (&self.stream, &result) {
            // One layer of one chunk: scale to the whole chunk's raw bytes.
            s.plan.estimator.observe_decode(*bytes as u64, t0.elapsed().as_secs_f64(), s.plan.decode_threads);
        }
        let mut st = self.st.lock();
        st.in_flight -= 1;
        match result {
            Ok(bytes) => {
                Stats::add(&self.stats.load_bytes_decoded, bytes as u64);
                st.remaining[l] -= 1;
                if let Slot::Ready(_, left) = &mut st.slots[c] {
                    *left -= 1;
                    if *left == 0 {
                        Stats::add(&self.stats.load_chunks_ok, 1);
                        self.job.update(|p| p.chunks_ok += 1);
                    }
                }
                self.advance(&mut st);
            }
            Err(why) => {
                // This layer was already taken off `ready`: count it here.
                st.remaining[l] -= 1;
                self.fail_chunk(&mut st, c, format!("chunk {c} layer {l}: {why}"));
            }
        }
        self.finish_if_idle(&mut st);
    }

    /// Decodes layer `l` of chunk `c` and writes it into the destination
    /// blocks; returns the bytes written.
    fn write_layer(&self, parsed: &ParsedChunk, l: usize, c: usize) -> Result<usize, String> {
        let streams = self.layout.streams();
        let container = parsed.container();
        let tensor_bytes = container.tensor_bytes();
        let target = &self.chunks[c];
        let token_bytes = tensor_bytes / self.chunk_tokens;
        let skip = target.skip_tokens * token_bytes;
        SCRATCH.with(|scratch| {
            let mut bufs = scratch.borrow_mut();
            bufs.resize_with(streams, Vec::new);
            for (s, buf) in bufs.iter_mut().enumerate() {
                buf.resize(tensor_bytes, 0);
                container.decode_tensor(l * streams + s, buf).map_err(|e| e.to_string())?;
            }
            let slices: Vec<&[u8]> = bufs.iter().map(|b| &b[skip..]).collect();
            let tokens = self.chunk_tokens - target.skip_tokens;
            // SAFETY: the caller of `Pipeline::load` (the context, on behalf of
            // the engine) guarantees the layout's memory stays valid and
            // untouched by others until the job is done.
            unsafe { self.layout.scatter_layer_raw(l, &target.blocks, tokens, &slices) }.map_err(|e| e.to_string())?;
            Ok(slices.iter().map(|s| s.len()).sum())
        })
    }
}

impl Expire for LoadRun {
    fn expire(&self) {
        let mut st = self.st.lock();
        let now = Instant::now();
        let timed_out = now >= self.job.started + self.timeout;
        if !self.job.is_cancelled() && !timed_out {
            // A streamed load's give-up point: the chunk being fetched and
            // every later one are left for recompute, so that recomputing
            // them still meets the SLO.
            let Some(at) = st.give_up.filter(|&t| now >= t) else { return };
            let s = self.stream.as_ref().expect("give-up points are set by streamed loads");
            st.give_up = None;
            let mut first = true;
            for c in 0..st.slots.len() {
                if matches!(st.slots[c], Slot::Fetching) {
                    st.unresolved -= 1;
                    st.recomputed += 1;
                    StreamStats::add(&s.plan.stats.recomputed_chunks, 1);
                    if first {
                        StreamStats::add(&s.plan.stats.abandoned_fetches, 1);
                        first = false;
                    }
                    let late = at.saturating_duration_since(self.job.started).as_millis();
                    self.fail_chunk(&mut st, c, format!("chunk {c}: left for the engine to recompute: not fetched by {late} ms (the last moment recompute still meets the SLO, or a probe's stall limit)"));
                }
            }
            let hook = if st.unresolved == 0 { st.on_fetched.take() } else { None };
            self.finish_if_idle(&mut st);
            drop(st);
            if let Some(f) = hook {
                f();
            }
            return;
        }
        let why = if self.job.is_cancelled() {
            "load cancelled".to_string()
        } else {
            format!("not fetched within the load timeout of {} ms", self.timeout.as_millis())
        };
        for c in 0..st.slots.len() {
            if matches!(st.slots[c], Slot::Fetching) {
                st.unresolved -= 1;
                self.fail_chunk(&mut st, c, format!("chunk {}: {why}", key_hex(&self.chunks[c].key)));
            }
        }
        // Queued decode work of a cancelled job is dropped, not run.
        if self.job.is_cancelled() {
            let ready_chunks: BTreeSet<usize> = st.ready.iter().map(|&(_, c)| c).collect();
            for c in ready_chunks {
                self.fail_chunk(&mut st, c, "load cancelled".into());
            }
        }
        let hook = if st.unresolved == 0 { st.on_fetched.take() } else { None };
        self.finish_if_idle(&mut st);
        drop(st);
        if let Some(f) = hook {
            f();
        }
    }
}

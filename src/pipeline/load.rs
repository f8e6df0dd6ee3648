//! Stream-load: fetch → verify → decode (layer, chunk) → scatter, layer by layer.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use parking_lot::Mutex;

use super::{guarded, Expire, Job, JobKind, Pipeline, Stats, Task};
use crate::codec::{Container, DecodeLimits};
use crate::layout::KvLayout;
use crate::store::{key_hex, Key, TierStack};

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
}

/// A verified container that owns its bytes.
struct ParsedChunk {
    // Declared first so it is dropped before the bytes it borrows.
    container: Container<'static>,
    _bytes: Box<[u8]>,
}

impl ParsedChunk {
    fn parse(bytes: Vec<u8>, limits: DecodeLimits) -> Result<ParsedChunk, String> {
        let bytes = bytes.into_boxed_slice();
        // SAFETY: the slice points into the boxed allocation, which never
        // moves or changes while `_bytes` owns it, and `container` (the only
        // holder of the reference) is dropped first and never handed out
        // with the 'static lifetime (see `container()`).
        let view: &'static [u8] = unsafe { std::slice::from_raw_parts(bytes.as_ptr(), bytes.len()) };
        let container = Container::parse(view, None, limits).map_err(|e| e.to_string())?;
        Ok(ParsedChunk { container, _bytes: bytes })
    }

    fn container(&self) -> &Container<'_> {
        &self.container
    }
}

enum Slot {
    Fetching,
    Ready(Arc<ParsedChunk>, usize),
    Failed,
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
}

thread_local! {
    static SCRATCH: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

impl Pipeline {
    /// Starts a load. The destination memory must stay valid, and must not be
    /// used by the engine, until the job is done (or each layer, once that
    /// layer is complete).
    pub fn load(&self, spec: LoadSpec) -> Arc<Job> {
        let layers = spec.layout.layers;
        let job = Arc::new(Job::new(self.job_id(), JobKind::Load, layers));
        Stats::add(&self.stats.loads, 1);
        let n = spec.chunks.len();
        let run = Arc::new(LoadRun {
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
            }),
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
        for c in 0..n {
            let run = Arc::clone(&run);
            self.io.submit(Box::new(move || run.fetch(c)));
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
        let key = self.chunks[c].key;
        let result = guarded(|| {
            let fetched = self.tiers.fetch(&key).map_err(|e| format!("chunk {}: {e}", key_hex(&key)))?;
            let Some(f) = fetched else {
                return Err(format!("chunk {}: not in any tier", key_hex(&key)));
            };
            let bytes = f.value.len();
            let parsed = ParsedChunk::parse(f.value, self.limits).map_err(|e| format!("chunk {}: {e}", key_hex(&key)))?;
            let h = parsed.container().header();
            let want = self.layout.chunk_shape(self.chunk_tokens);
            if h.dtype != self.layout.dtype || h.shape != want {
                return Err(format!(
                    "chunk {}: stored as {} {:?}, the layout needs {} {:?}",
                    key_hex(&key),
                    h.dtype.name(),
                    h.shape,
                    self.layout.dtype.name(),
                    want
                ));
            }
            tracing::trace!(job = self.job.id, chunk = c, tier = f.tier, bytes, "fetched");
            Ok((parsed, bytes))
        });
        Stats::add(&self.stats.fetch_ns, t0.elapsed().as_nanos() as u64);
        self.resolve(c, result);
    }

    /// Records the outcome of chunk `c`'s fetch (ignored if it already
    /// failed, e.g. by timeout).
    fn resolve(self: &Arc<Self>, c: usize, result: Result<(ParsedChunk, usize), String>) {
        let mut st = self.st.lock();
        if !matches!(st.slots[c], Slot::Fetching) {
            return;
        }
        st.unresolved -= 1;
        match result {
            Ok((parsed, bytes)) => {
                Stats::add(&self.stats.load_bytes_fetched, bytes as u64);
                let layers = self.layout.layers;
                st.slots[c] = Slot::Ready(Arc::new(parsed), layers);
                for l in 0..layers {
                    st.ready.insert((l, c));
                }
                for _ in 0..layers {
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
            Slot::Failed => return,
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

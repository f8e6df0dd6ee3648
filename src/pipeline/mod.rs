//! The background pipeline: worker threads and the jobs they run.
//!
//! Two pools share the work, so that a slow tier never stalls decoding:
//! - **io** threads fetch chunks from the tiers (and verify them: checksum and
//!   every header field, by parsing the container) and write encoded chunks;
//! - **cpu** threads gather blocks, encode, decode and scatter.
//!
//! A load runs fetch → verify (io) → decode one (layer, chunk) → scatter into
//! the destination blocks (cpu). Decode work is taken lowest layer first, so
//! layers complete in order and each completion is signalled as it happens
//! (what a per-layer wait needs). A chunk that cannot be loaded (missing,
//! corrupt, wrong shape, timed out, failed to decode) is never partially
//! trusted: all of its destination blocks are reported failed.
//!
//! A store runs gather (cpu; then the engine may reuse its blocks) → encode
//! (cpu) → write to every tier (io; then the job is durable).
//!
//! Destinations in GPU memory take another route after the fetch: once every
//! chunk is fetched, one cpu task stages the verified containers and
//! enqueues the fused GPU decode layer by layer (`crate::gpu`), records one
//! CUDA event per layer (engines wait on them from their own stream), then
//! waits for the device checks. Stores from GPU memory gather on the device
//! and encode on the host.
//!
//! A watchdog thread enforces load deadlines: at the deadline every chunk not
//! yet fetched is failed, so a stalled tier cannot hold a load beyond it.

mod device;
mod job;
mod load;
mod stats;
mod store;
mod tables;

use std::collections::BinaryHeap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{unbounded, Receiver, RecvTimeoutError, Sender};

pub use device::{DeviceSide, DeviceTarget};
pub use job::{Job, JobKind, Progress, Stage};
pub use load::{LoadChunk, LoadSpec, StreamPlan};
pub use stats::{Stats, StatsSnapshot};
pub use store::{StoreChunk, StoreSpec};
pub(crate) use store::gather_chunks;
pub use tables::TableSets;

pub(crate) type Task = Box<dyn FnOnce() + Send + 'static>;

/// A fixed set of named threads taking tasks from one channel.
struct Pool {
    tx: Option<Sender<Task>>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    fn new(name: &str, n: usize) -> std::io::Result<Pool> {
        let (tx, rx) = unbounded::<Task>();
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rx = rx.clone();
            threads.push(std::thread::Builder::new().name(format!("cachegen-{name}-{i}")).spawn(move || {
                for task in rx {
                    // Tasks catch their own panics to fail their job; this
                    // only keeps the thread alive if one slips through.
                    let _ = catch_unwind(AssertUnwindSafe(task));
                }
            })?);
        }
        Ok(Pool { tx: Some(tx), threads })
    }

    fn submit(&self, task: Task) {
        if let Some(tx) = &self.tx {
            // The receivers live as long as the threads, which outlive `tx`.
            let _ = tx.send(task);
        }
    }

    fn queued(&self) -> usize {
        self.tx.as_ref().map_or(0, |t| t.len())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.tx = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Something with a deadline the watchdog enforces.
pub(crate) trait Expire: Send + Sync {
    fn expire(&self);
}

struct Deadline(Instant, Weak<dyn Expire>);

impl PartialEq for Deadline {
    fn eq(&self, o: &Self) -> bool {
        self.0 == o.0
    }
}
impl Eq for Deadline {}
impl PartialOrd for Deadline {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Deadline {
    // Earliest first in a max-heap.
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.0.cmp(&self.0)
    }
}

fn watchdog(rx: Receiver<Deadline>) {
    let mut heap = BinaryHeap::<Deadline>::new();
    loop {
        let now = Instant::now();
        while heap.peek().is_some_and(|d| d.0 <= now) {
            if let Some(job) = heap.pop().and_then(|d| d.1.upgrade()) {
                job.expire();
            }
        }
        let next = match heap.peek() {
            Some(d) => rx.recv_timeout(d.0.saturating_duration_since(now)),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(d) => heap.push(d),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// The worker threads of one context.
pub struct Pipeline {
    io: Pool,
    cpu: Pool,
    deadlines: Option<Sender<Deadline>>,
    watchdog: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
    next_job: std::sync::atomic::AtomicU64,
}

impl Pipeline {
    pub fn new(io_threads: usize, cpu_threads: usize) -> std::io::Result<Pipeline> {
        let (tx, rx) = unbounded();
        let watchdog = std::thread::Builder::new().name("cachegen-watchdog".into()).spawn(move || watchdog(rx))?;
        Ok(Pipeline {
            io: Pool::new("io", io_threads.max(1))?,
            cpu: Pool::new("cpu", cpu_threads.max(1))?,
            deadlines: Some(tx),
            watchdog: Some(watchdog),
            stats: Arc::new(Stats::default()),
            next_job: std::sync::atomic::AtomicU64::new(1),
        })
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// Tasks waiting for an io and a cpu thread.
    pub fn queued(&self) -> (usize, usize) {
        (self.io.queued(), self.cpu.queued())
    }

    pub(crate) fn cpu_tx(&self) -> Sender<Task> {
        self.cpu.tx.clone().expect("pool is running")
    }

    pub(crate) fn io_tx(&self) -> Sender<Task> {
        self.io.tx.clone().expect("pool is running")
    }

    /// Threads of the cpu pool.
    pub fn cpu_threads(&self) -> usize {
        self.cpu.threads.len()
    }

    pub(crate) fn job_id(&self) -> u64 {
        self.next_job.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    fn watch(&self, at: Instant, what: Weak<dyn Expire>) {
        if let Some(tx) = &self.deadlines {
            let _ = tx.send(Deadline(at, what));
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.deadlines = None;
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
        // The pools' Drop joins their threads after the queued tasks ran.
    }
}

/// Runs `f`, turning a panic into an error message.
pub(crate) fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
            Err(format!("internal error: {}", msg.unwrap_or_else(|| "panic".into())))
        }
    }
}

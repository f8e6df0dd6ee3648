//! A job's observable progress: milestones, per-layer completion, failed
//! blocks. Waiters block on a condition variable; every change notifies.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::gpu::LayerEvents;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    Store,
    Load,
}

/// Milestones a caller can wait for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Store: the blocks were read; the engine may overwrite them.
    /// Load: same as `Done`.
    Reusable,
    /// Store: every chunk was written (or failed). Load: every layer of every
    /// chunk was written (or its chunk failed); nothing will touch the
    /// destination blocks any more.
    Done,
}

/// A snapshot of a job's progress.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub reusable: bool,
    pub done: bool,
    /// Layers `0..layers_done` are complete (loads).
    pub layers_done: usize,
    /// Chunks that succeeded (stored, or loaded) and that failed.
    pub chunks_ok: usize,
    pub chunks_failed: usize,
    /// Store: chunks already present, not written again.
    pub chunks_skipped: usize,
    /// Blocks of failed chunks, sorted, each once.
    pub failed_blocks: Vec<u32>,
    /// The first few failure reasons.
    pub errors: Vec<String>,
    /// Loads into GPU memory: the decode of every fetched chunk is enqueued
    /// and its per-layer events exist (until the job is done).
    pub device_enqueued: bool,
}

const MAX_ERRORS: usize = 8;

/// A running or finished store or load.
pub struct Job {
    pub id: u64,
    pub kind: JobKind,
    pub layers: usize,
    pub(crate) progress: Mutex<Progress>,
    cv: Condvar,
    pub(crate) cancelled: AtomicBool,
    /// What to expire when the job is cancelled (a load's fetches).
    pub(crate) canceller: Mutex<Option<Weak<dyn super::Expire>>>,
    /// Set when the job started, for its duration in stats and traces.
    pub started: Instant,
    /// Loads into GPU memory: one CUDA event per layer, from when the decode
    /// is enqueued until the job is done.
    pub(crate) layer_events: Mutex<Option<Arc<LayerEvents<'static>>>>,
    /// Per-chunk decisions of a streamed load, set once when it starts
    /// (owned and typed by `crate::streaming`, which reads them back in
    /// `Job::chunk_decisions`; type-erased so that the pipeline does not
    /// depend on streaming's types).
    pub(crate) decisions: OnceLock<Arc<dyn Any + Send + Sync>>,
}

impl Job {
    pub(crate) fn new(id: u64, kind: JobKind, layers: usize) -> Job {
        Job {
            id,
            kind,
            layers,
            progress: Mutex::new(Progress::default()),
            cv: Condvar::new(),
            cancelled: AtomicBool::new(false),
            canceller: Mutex::new(None),
            started: Instant::now(),
            layer_events: Mutex::new(None),
            decisions: OnceLock::new(),
        }
    }

    pub fn progress(&self) -> Progress {
        self.progress.lock().clone()
    }

    /// Applies `f` to the progress and wakes every waiter.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut Progress) -> R) -> R {
        let r = f(&mut self.progress.lock());
        self.cv.notify_all();
        r
    }

    /// Records a failed chunk's blocks and reason.
    pub(crate) fn fail_blocks(p: &mut Progress, blocks: &[u32], why: String) {
        p.chunks_failed += 1;
        p.failed_blocks.extend_from_slice(blocks);
        p.failed_blocks.sort_unstable();
        p.failed_blocks.dedup();
        if p.errors.len() < MAX_ERRORS {
            p.errors.push(why);
        }
    }

    fn wait_for(&self, timeout: Option<Duration>, reached: impl Fn(&Progress) -> bool) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut p = self.progress.lock();
        while !reached(&p) {
            match deadline {
                None => self.cv.wait(&mut p),
                Some(d) => {
                    if self.cv.wait_until(&mut p, d).timed_out() {
                        return reached(&p);
                    }
                }
            }
        }
        true
    }

    /// Waits until `stage` is reached or `timeout` passes (`None`: forever).
    /// Returns whether it was reached.
    pub fn wait(&self, stage: Stage, timeout: Option<Duration>) -> bool {
        match stage {
            Stage::Reusable => self.wait_for(timeout, |p| p.reusable || p.done),
            Stage::Done => self.wait_for(timeout, |p| p.done),
        }
    }

    /// Waits until layer `layer` is complete (loads; for a store, until it is
    /// done). Returns whether it was reached.
    pub fn wait_layer(&self, layer: usize, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        match self.kind {
            JobKind::Load => {
                if !self.wait_for(timeout, |p| p.done || p.layers_done > layer || p.device_enqueued) {
                    return false;
                }
                // A GPU load: the layer is done when its event is.
                let Some(ev) = self.layer_events.lock().clone() else { return true };
                loop {
                    match ev.query(layer) {
                        Ok(true) | Err(_) => return true,
                        Ok(false) => {}
                    }
                    if self.progress.lock().done {
                        return true;
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return false;
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
            JobKind::Store => self.wait(Stage::Done, timeout),
        }
    }

    /// For a load into GPU memory: waits on the host until layer `layer`'s
    /// decode is enqueued (every chunk fetched) or the job is done, then
    /// makes the engine's CUDA `stream` wait for the layer on the device,
    /// without blocking the host further. For a host load, the same as
    /// [`Job::wait_layer`]. `Ok(false)`: `timeout` passed first.
    pub fn wait_layer_on_stream(&self, layer: usize, stream: u64, timeout: Option<Duration>) -> Result<bool, String> {
        if self.kind != JobKind::Load {
            return Ok(self.wait(Stage::Done, timeout));
        }
        if !self.wait_for(timeout, |p| p.done || p.layers_done > layer || p.device_enqueued) {
            return Ok(false);
        }
        let ev = self.layer_events.lock().clone();
        match ev {
            // Done (the events are gone only once the device work is), or a host load.
            None => Ok(self.wait_layer(layer, timeout)),
            Some(ev) => ev.wait_on(layer, stream).map(|_| true).map_err(|e| e.to_string()),
        }
    }

    /// Asks the job to stop early: chunks not yet written are failed. Waiting
    /// for `Done` afterwards returns once nothing touches engine memory.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        let target = self.canceller.lock().as_ref().and_then(|w| w.upgrade());
        if let Some(t) = target {
            t.expire();
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

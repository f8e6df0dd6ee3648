//! A job's observable progress: milestones, per-layer completion, failed
//! blocks. Waiters block on a condition variable; every change notifies.

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

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
        match self.kind {
            JobKind::Load => self.wait_for(timeout, |p| p.done || p.layers_done > layer),
            JobKind::Store => self.wait(Stage::Done, timeout),
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

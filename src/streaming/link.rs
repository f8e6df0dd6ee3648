//! Network emulation on the storage path: a [`ShapedTier`] wraps any
//! [`Tier`] behind a [`Link`], one link shared by every concurrent fetch.
//!
//! - **Bandwidth** is a token bucket: bytes drain at the current rate, up to
//!   `burst` bytes may go at once after idle time; a value waits until the
//!   bucket has paid for it. Concurrent gets queue on the same bucket, so
//!   they share the link's bandwidth.
//! - **Latency** is added to every request (propagation: it does not occupy
//!   the link).
//! - **Traces**: the rate follows a [`Schedule`]: constant, one rate per
//!   request (e.g. per chunk, as in CacheGen's evaluation: uniform 0.1-10
//!   Gbps), or one rate per time slice. A rate of 0 stalls the link.
//!
//! Only values read (`get`, `get_progressive`) are shaped; `put`,
//! `contains` and `remove` pay the latency only (a load's path is what the
//! loader adapts to). A progressive read is one request: the latency, then
//! the value piece by piece at the request's rate, so the loader can probe a
//! chunk's rate from its first pieces and stop reading it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::store::{Key, Partial, ReadOn, StoreError, Tier, TierStats};

/// How the link's rate (bytes/s) changes.
#[derive(Clone, Debug)]
pub enum Schedule {
    Constant(f64),
    /// Request `i` (counted from the link's creation) is sent at
    /// `rates[i % len]`.
    PerRequest(Vec<f64>),
    /// From the link's creation (or [`Link::restart`]), slice `k` of length
    /// `slice` has rate `rates[k]`; after the last slice the last rate holds.
    TimeSlices { slice: Duration, rates: Vec<f64> },
}

/// Gbit/s to bytes/s.
pub fn gbps(g: f64) -> f64 {
    g * 1e9 / 8.0
}

struct LinkState {
    /// When the bucket is empty again (the queue's tail); may be in the past.
    free_at: Instant,
    requests: u64,
    epoch: Instant,
    closed: bool,
    bytes: u64,
}

/// One emulated link.
pub struct Link {
    schedule: Mutex<Schedule>,
    latency: Duration,
    /// Bucket depth: after idle time, this many bytes go without waiting.
    burst: f64,
    st: Mutex<LinkState>,
    cv: Condvar,
}

impl Link {
    pub fn new(schedule: Schedule, latency: Duration) -> Arc<Link> {
        let now = Instant::now();
        Arc::new(Link {
            schedule: Mutex::new(schedule),
            latency,
            burst: 0.0,
            st: Mutex::new(LinkState { free_at: now, requests: 0, epoch: now, closed: false, bytes: 0 }),
            cv: Condvar::new(),
        })
    }

    /// A constant link of `g` Gbit/s with `latency`.
    pub fn gbps(g: f64, latency: Duration) -> Arc<Link> {
        Link::new(Schedule::Constant(gbps(g)), latency)
    }

    pub fn with_burst(self: Arc<Link>, bytes: f64) -> Arc<Link> {
        let mut l = Arc::try_unwrap(self).unwrap_or_else(|_| panic!("with_burst on a shared link"));
        l.burst = bytes.max(0.0);
        Arc::new(l)
    }

    /// Replaces the schedule (and restarts time slices and request counts).
    pub fn set_schedule(&self, s: Schedule) {
        *self.schedule.lock() = s;
        self.restart();
    }

    pub fn restart(&self) {
        let mut st = self.st.lock();
        st.epoch = Instant::now();
        st.requests = 0;
    }

    /// Ends every wait now (stalled requests return at once): for shutting
    /// a test down without waiting out a stall.
    pub fn close(&self) {
        self.st.lock().closed = true;
        self.cv.notify_all();
    }

    pub fn latency(&self) -> Duration {
        self.latency
    }

    /// Bytes sent so far.
    pub fn bytes_sent(&self) -> u64 {
        self.st.lock().bytes
    }

    /// When `bytes` started at `start` (request number `req`) are through.
    /// `None`: never (a stall to the end of the trace).
    fn finish(&self, start: Instant, epoch: Instant, req: u64, bytes: f64) -> Option<Instant> {
        let sched = self.schedule.lock().clone();
        let secs = |s: f64| Duration::from_secs_f64(s.max(0.0));
        match sched {
            Schedule::Constant(r) => (r > 0.0).then(|| start + secs(bytes / r)),
            Schedule::PerRequest(rates) => {
                let r = if rates.is_empty() { 0.0 } else { rates[(req as usize) % rates.len()] };
                (r > 0.0).then(|| start + secs(bytes / r))
            }
            Schedule::TimeSlices { slice, rates } => {
                if rates.is_empty() || slice.is_zero() {
                    return None;
                }
                let sl = slice.as_secs_f64();
                let mut t = start.saturating_duration_since(epoch).as_secs_f64();
                let mut left = bytes;
                loop {
                    let k = (t / sl) as usize;
                    let r = rates[k.min(rates.len() - 1)];
                    if k >= rates.len() - 1 {
                        return (r > 0.0).then(|| epoch + secs(t + left / r));
                    }
                    let end = (k + 1) as f64 * sl;
                    let can = r * (end - t);
                    if can >= left {
                        return Some(epoch + secs(t + left / r));
                    }
                    left -= can;
                    t = end;
                }
            }
        }
    }

    /// Waits until `bytes` went through the link (after the latency).
    /// Returns false when the link was closed while waiting.
    pub fn transfer(&self, bytes: usize) -> bool {
        let req = self.begin();
        let done = self.queue(req, bytes);
        self.sleep_until(done.map(|t| t + self.latency))
    }

    /// Starts a request whose payload is sent piece by piece
    /// ([`Link::transfer_piece`]): returns its number (its rate in a
    /// [`Schedule::PerRequest`] trace). The caller pays the latency (time to
    /// first byte) with [`Link::round_trip`].
    pub fn begin(&self) -> u64 {
        let mut st = self.st.lock();
        let req = st.requests;
        st.requests += 1;
        req
    }

    /// Waits until the next `bytes` of request `req` went through the link
    /// (no latency: the request's first byte has already arrived). A piece
    /// after the `first` follows the previous one on the wire, even when
    /// the reader woke up late (the link kept sending meanwhile), so the
    /// rate a reader measures over many pieces is the link's. Returns false
    /// when the link was closed while waiting.
    pub fn transfer_piece(&self, req: u64, bytes: usize, first: bool) -> bool {
        let done = self.queue_at(req, bytes, !first);
        self.sleep_until(done)
    }

    fn queue(&self, req: u64, bytes: usize) -> Option<Instant> {
        self.queue_at(req, bytes, false)
    }

    /// Queues `bytes` of request `req` on the bucket (right after what is
    /// queued when `follow`, else not before now); returns when they are
    /// through (`None`: never).
    fn queue_at(&self, req: u64, bytes: usize, follow: bool) -> Option<Instant> {
        let now = Instant::now();
        let (done, ok) = {
            let mut st = self.st.lock();
            st.bytes += bytes as u64;
            // Tokens saved while idle: up to `burst` bytes' worth of time.
            let sched_rate = match &*self.schedule.lock() {
                Schedule::Constant(r) => *r,
                _ => 0.0,
            };
            let credit = if sched_rate > 0.0 { Duration::from_secs_f64(self.burst / sched_rate) } else { Duration::ZERO };
            let start = if follow { st.free_at } else { st.free_at.max(now.checked_sub(credit).unwrap_or(now)) };
            match self.finish(start, st.epoch, req, bytes as f64) {
                Some(t) => {
                    st.free_at = t;
                    (Some(t), true)
                }
                None => {
                    st.free_at = now + Duration::from_secs(3600 * 24);
                    (None, true)
                }
            }
        };
        let _ = ok;
        done
    }

    /// Just the latency (requests that carry no payload to shape).
    pub fn round_trip(&self) -> bool {
        self.sleep_until(Some(Instant::now() + self.latency))
    }

    fn sleep_until(&self, t: Option<Instant>) -> bool {
        let mut st = self.st.lock();
        loop {
            if st.closed {
                return false;
            }
            match t {
                Some(t) if Instant::now() >= t => return true,
                Some(t) => {
                    self.cv.wait_until(&mut st, t);
                }
                None => self.cv.wait(&mut st),
            }
        }
    }
}

/// A tier behind an emulated link.
pub struct ShapedTier {
    inner: Arc<dyn Tier>,
    link: Arc<Link>,
    name: String,
}

impl ShapedTier {
    pub fn new(inner: Arc<dyn Tier>, link: Arc<Link>) -> ShapedTier {
        let name = format!("{}+link", inner.name());
        ShapedTier { inner, link, name }
    }

    pub fn link(&self) -> &Arc<Link> {
        &self.link
    }
}

impl Tier for ShapedTier {
    fn name(&self) -> &str {
        &self.name
    }
    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.inner.get(key)?;
        let ok = match &v {
            Some(bytes) => self.link.transfer(bytes.len()),
            None => self.link.round_trip(),
        };
        if !ok {
            return Err(StoreError::Io("link closed".into()));
        }
        Ok(v)
    }
    /// One request: the latency (first byte), then the value piece by
    /// piece at the link's rate, so that a reader can measure this value's
    /// rate from its first pieces and stop (the rest is never sent).
    fn get_progressive(&self, key: &Key, piece: usize, on: &mut dyn FnMut(usize, usize) -> ReadOn) -> Result<Option<Partial>, StoreError> {
        let closed = || StoreError::Io("link closed".into());
        let Some(v) = self.inner.get(key)? else {
            return if self.link.round_trip() { Ok(None) } else { Err(closed()) };
        };
        let req = self.link.begin();
        if !self.link.round_trip() {
            return Err(closed());
        }
        let total = v.len();
        let mut pieces = on(0, total);
        let mut read = 0;
        while read < total {
            if pieces == ReadOn::Stop {
                return Ok(Some(Partial::Stopped { read, total }));
            }
            let n = if pieces == ReadOn::Piece { piece.max(1).min(total - read) } else { total - read };
            if !self.link.transfer_piece(req, n, read == 0) {
                return Err(closed());
            }
            read += n;
            pieces = on(read, total);
        }
        Ok(Some(Partial::Value(v.into())))
    }
    fn put(&self, key: &Key, value: &[u8]) -> Result<(), StoreError> {
        self.link.round_trip();
        self.inner.put(key, value)
    }
    fn contains(&self, key: &Key) -> Result<bool, StoreError> {
        self.link.round_trip();
        self.inner.contains(key)
    }
    fn remove(&self, key: &Key) -> Result<(), StoreError> {
        self.inner.remove(key)
    }
    fn stats(&self) -> TierStats {
        self.inner.stats()
    }
    fn pin(&self, key: &Key, until: Instant) -> bool {
        self.inner.pin(key, until)
    }
    fn unpin(&self, key: &Key) {
        self.inner.unpin(key)
    }
}

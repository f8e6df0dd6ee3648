//! Tiers in order, fastest first: fetch from the first that has a key
//! (promoting the hit into the faster ones), write through to all.

use std::sync::Arc;
use std::time::Instant;

use super::{Bytes, Key, Partial, ReadOn, StoreError, Tier, TierStats};

/// Where a fetched value came from, and what went wrong on the way.
#[derive(Debug)]
pub struct Fetched {
    pub value: Bytes,
    /// Index of the tier that had it.
    pub tier: usize,
    /// Errors from faster tiers that were skipped (corrupt entries removed, I/O).
    pub skipped: Vec<(usize, StoreError)>,
}

/// The result of [`TierStack::fetch_progressive`].
#[derive(Debug)]
pub enum Progressive {
    /// The whole value, as [`TierStack::fetch`] returns it.
    Done(Fetched),
    /// The reader stopped the read from tier `tier` after `read` of `total` bytes.
    Stopped { tier: usize, read: usize, total: usize },
}

/// An ordered set of tiers.
#[derive(Clone)]
pub struct TierStack {
    tiers: Vec<Arc<dyn Tier>>,
}

impl TierStack {
    pub fn new(tiers: Vec<Arc<dyn Tier>>) -> TierStack {
        TierStack { tiers }
    }

    pub fn tiers(&self) -> &[Arc<dyn Tier>] {
        &self.tiers
    }

    /// The value of `key` from the fastest tier that holds an intact copy.
    /// A tier that fails (I/O error, corrupt entry: removed by the tier) is
    /// skipped and the next one tried. A hit in a slower tier is written
    /// into every faster tier (errors there are ignored: promotion is an
    /// optimisation). `Ok(None)` when no tier has it and none failed;
    /// `Err` with the last error when no tier had it and some failed.
    pub fn fetch(&self, key: &Key) -> Result<Option<Fetched>, StoreError> {
        let mut skipped = Vec::new();
        for (i, tier) in self.tiers.iter().enumerate() {
            match tier.get_shared(key) {
                Ok(Some(value)) => {
                    for faster in &self.tiers[..i] {
                        let _ = faster.put(key, &value);
                    }
                    return Ok(Some(Fetched { value, tier: i, skipped }));
                }
                Ok(None) => {}
                Err(e) => skipped.push((i, e)),
            }
        }
        match skipped.pop() {
            Some((_, e)) => Err(e),
            None => Ok(None),
        }
    }

    /// Like [`TierStack::fetch`], reading progressively (see
    /// [`Tier::get_progressive`]): `on` sees the pieces of each tier tried
    /// in turn (a tier that fails mid-read is skipped, and the next one
    /// reports from 0 again). A read `on` stopped is not tried in other tiers.
    pub fn fetch_progressive(&self, key: &Key, piece: usize, on: &mut dyn FnMut(usize, usize) -> ReadOn) -> Result<Option<Progressive>, StoreError> {
        let mut skipped = Vec::new();
        for (i, tier) in self.tiers.iter().enumerate() {
            match tier.get_progressive(key, piece, on) {
                Ok(Some(Partial::Value(value))) => {
                    for faster in &self.tiers[..i] {
                        let _ = faster.put(key, &value);
                    }
                    return Ok(Some(Progressive::Done(Fetched { value, tier: i, skipped })));
                }
                Ok(Some(Partial::Stopped { read, total })) => return Ok(Some(Progressive::Stopped { tier: i, read, total })),
                Ok(None) => {}
                Err(e) => skipped.push((i, e)),
            }
        }
        match skipped.pop() {
            Some((_, e)) => Err(e),
            None => Ok(None),
        }
    }

    /// Whether any tier holds `key`. A tier that cannot answer counts as
    /// not holding it.
    pub fn contains(&self, key: &Key) -> bool {
        self.tiers.iter().any(|t| t.contains(key).unwrap_or(false))
    }

    /// Writes `value` to every tier. Returns how many tiers took it and the
    /// errors of those that did not.
    pub fn put_all(&self, key: &Key, value: &[u8]) -> (usize, Vec<(String, StoreError)>) {
        let mut ok = 0;
        let mut errors = Vec::new();
        for t in &self.tiers {
            match t.put(key, value) {
                Ok(()) => ok += 1,
                Err(e) => errors.push((t.name().to_string(), e)),
            }
        }
        (ok, errors)
    }

    /// Pins `key` in every tier that holds it and can pin; returns how many did.
    pub fn pin(&self, key: &Key, until: Instant) -> usize {
        self.tiers.iter().filter(|t| t.pin(key, until)).count()
    }

    pub fn unpin(&self, key: &Key) {
        for t in &self.tiers {
            t.unpin(key);
        }
    }

    /// `(name, stats)` of every tier, fastest first.
    pub fn stats(&self) -> Vec<(String, TierStats)> {
        self.tiers.iter().map(|t| (t.name().to_string(), t.stats())).collect()
    }
}

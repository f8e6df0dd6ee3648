//! The in-process tier: an LRU bounded by value bytes, with leases (pins).

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use super::{Bytes, Counters, Key, Lru, StoreError, Tier, TierStats};

/// In-memory LRU tier. The budget counts value bytes only (not the per-entry
/// bookkeeping). `get` copies the value outside the lock; `get_shared`
/// hands out the stored bytes themselves.
pub struct MemoryTier {
    budget: u64,
    state: Mutex<State>,
    counters: Counters,
}

struct State {
    lru: Lru<Bytes>,
    /// Lease expiry per pinned key. Only keys present in `lru` appear here;
    /// an expired lease is ignored and dropped the next time it is seen.
    pins: HashMap<Key, Instant>,
}

impl MemoryTier {
    pub fn new(byte_budget: u64) -> Self {
        MemoryTier {
            budget: byte_budget,
            state: Mutex::new(State { lru: Lru::new(), pins: HashMap::new() }),
            counters: Counters::default(),
        }
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Whether `key` holds an unexpired lease.
    pub fn is_pinned(&self, key: &Key) -> bool {
        let now = Instant::now();
        self.lock().pins.get(key).is_some_and(|t| *t > now)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the index half-updated in a way that
        // matters more than refusing service, so keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Tier for MemoryTier {
    fn name(&self) -> &str {
        "memory"
    }

    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get_shared(key)?.map(|v| v.to_vec()))
    }

    fn get_shared(&self, key: &Key) -> Result<Option<Bytes>, StoreError> {
        let value = self.lock().lru.touch(key).map(|s| s.value.clone());
        match value {
            Some(v) => {
                self.counters.hits.fetch_add(1, Relaxed);
                Ok(Some(v))
            }
            None => {
                self.counters.misses.fetch_add(1, Relaxed);
                Ok(None)
            }
        }
    }

    fn put(&self, key: &Key, value: &[u8]) -> Result<(), StoreError> {
        let size = value.len() as u64;
        if size > self.budget {
            return Err(StoreError::TooLarge { size, budget: self.budget });
        }
        let value = Bytes::copy_from_slice(value);
        let now = Instant::now();
        // Values leaving the tier are freed after the lock is released.
        let mut dropped = Vec::new();
        {
            let mut st = self.lock();
            let State { lru, pins } = &mut *st;
            let victims = lru
                .plan_eviction(key, size, self.budget, |k| pins.get(k).is_some_and(|t| *t > now))
                .ok_or(StoreError::Full { size, budget: self.budget })?;
            for k in &victims {
                dropped.extend(lru.remove(k));
                pins.remove(k);
            }
            dropped.extend(lru.insert(*key, size, value));
            self.counters.evictions.fetch_add(victims.len() as u64, Relaxed);
        }
        drop(dropped);
        self.counters.puts.fetch_add(1, Relaxed);
        Ok(())
    }

    fn contains(&self, key: &Key) -> Result<bool, StoreError> {
        Ok(self.lock().lru.peek(key).is_some())
    }

    fn remove(&self, key: &Key) -> Result<(), StoreError> {
        let removed = {
            let mut st = self.lock();
            st.pins.remove(key);
            st.lru.remove(key)
        };
        drop(removed);
        Ok(())
    }

    fn stats(&self) -> TierStats {
        let (bytes, entries) = {
            let st = self.lock();
            (st.lru.bytes(), st.lru.len() as u64)
        };
        self.counters.snapshot(bytes, entries)
    }

    /// Keeps `key` from being evicted until `until` (a lease). Extends an
    /// existing lease, never shortens it. Returns false, pinning nothing, when
    /// the key is absent. `remove` still removes a pinned entry.
    fn pin(&self, key: &Key, until: Instant) -> bool {
        let now = Instant::now();
        let mut st = self.lock();
        st.pins.retain(|_, t| *t > now);
        if st.lru.peek(key).is_none() {
            return false;
        }
        if until > now {
            let t = st.pins.entry(*key).or_insert(until);
            *t = (*t).max(until);
        }
        true
    }

    /// Ends the lease on `key` early (if any).
    fn unpin(&self, key: &Key) {
        self.lock().pins.remove(key);
    }
}

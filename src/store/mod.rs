//! Storage tiers: compressed streams (opaque bytes) under 128-bit keys.
//!
//! Every tier implements [`Tier`]. Two exist:
//! - [`MemoryTier`]: an in-process LRU bounded by value bytes, with optional
//!   time-limited pins (leases) that keep an entry from being evicted.
//! - [`DiskTier`]: one checksummed file per key, written atomically, bounded by
//!   file bytes, found again by a later instance on the same directory.
//! - [`RedisTier`]: checksummed values on a Redis server or Redis Cluster,
//!   shared between engines, connected lazily and reconnected after failures.
//!
//! Tiers never return corrupt data: a value that fails its check is removed
//! and reported as [`StoreError::Corrupt`]; the next `get` sees it absent.

mod disk;
mod memory;
mod redis;
mod stack;

use std::collections::{BTreeMap, HashMap};

pub use disk::{DiskTier, DISK_OVERHEAD};
pub use memory::MemoryTier;
pub use redis::{RedisOptions, RedisTier};
pub use stack::{Fetched, Progressive, TierStack};

/// Stored values as handed out by fetches: shared, cheap to clone.
pub use bytes::Bytes;

/// A 128-bit key (e.g. a hash of the model, the token prefix and the level).
pub type Key = [u8; 16];

/// Everything that can go wrong in a tier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The operating system refused a read, write, rename or delete (a full
    /// disk included). Nothing partial is left visible.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// A stored entry failed its length or checksum check. It has been
    /// removed; a later `get` returns `Ok(None)`.
    #[error("corrupt entry: {0}")]
    Corrupt(String),
    /// The value can never fit: it alone is larger than the tier's budget.
    #[error("value of {size} bytes does not fit the tier budget of {budget} bytes")]
    TooLarge { size: u64, budget: u64 },
    /// The value would fit the budget, but pinned entries hold too much of it
    /// right now. Nothing was evicted and nothing was stored.
    #[error("no room for {size} bytes: pinned entries hold the budget of {budget} bytes")]
    Full { size: u64, budget: u64 },
}

/// Counters of one tier. `bytes` is what counts against the budget: value
/// bytes for [`MemoryTier`], file bytes (value plus 24 bytes of framing) for
/// [`DiskTier`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct TierStats {
    pub hits: u64,
    pub misses: u64,
    pub puts: u64,
    pub evictions: u64,
    pub bytes: u64,
    pub entries: u64,
}

/// The event counters every tier keeps (shared by the tiers' `stats`).
#[derive(Default)]
pub(crate) struct Counters {
    pub hits: std::sync::atomic::AtomicU64,
    pub misses: std::sync::atomic::AtomicU64,
    pub puts: std::sync::atomic::AtomicU64,
    pub evictions: std::sync::atomic::AtomicU64,
}

impl Counters {
    pub fn snapshot(&self, bytes: u64, entries: u64) -> TierStats {
        use std::sync::atomic::Ordering::Relaxed;
        TierStats { hits: self.hits.load(Relaxed), misses: self.misses.load(Relaxed), puts: self.puts.load(Relaxed), evictions: self.evictions.load(Relaxed), bytes, entries }
    }
}

/// What a progressive read ([`Tier::get_progressive`]) does after a piece.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOn {
    /// Read the next piece and report again.
    Piece,
    /// Read everything left without reporting pieces.
    Rest,
    /// Abandon the read (what was read is dropped).
    Stop,
}

/// The result of a progressive read of a key that exists.
#[derive(Debug)]
pub enum Partial {
    /// The whole value (verified as [`Tier::get`] verifies it).
    Value(Bytes),
    /// The reader stopped after `read` of `total` bytes.
    Stopped { read: usize, total: usize },
}

/// One storage tier. All methods take `&self`; tiers are shared between threads.
pub trait Tier: Send + Sync {
    fn name(&self) -> &str;
    /// `Ok(None)` when absent; `Err` on I/O failure or corruption (corrupt
    /// entries are removed and reported, never returned).
    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError>;
    /// [`Tier::get`] as shared bytes. A tier that keeps values in memory
    /// hands out its own copy without copying (a load holds every chunk of
    /// a long context at once: copying them means faulting in gigabytes of
    /// fresh memory per load); the default wraps `get`'s vector.
    fn get_shared(&self, key: &Key) -> Result<Option<Bytes>, StoreError> {
        Ok(self.get(key)?.map(Bytes::from))
    }
    /// Stores `value` under `key`, replacing any earlier value and evicting
    /// least recently used entries as needed to stay within the budget.
    fn put(&self, key: &Key, value: &[u8]) -> Result<(), StoreError>;
    /// Whether the tier holds `key`, without reading the value.
    fn contains(&self, key: &Key) -> Result<bool, StoreError>;
    /// Removes `key`; removing an absent key is not an error.
    fn remove(&self, key: &Key) -> Result<(), StoreError>;
    fn stats(&self) -> TierStats;
    /// Keeps `key` from being evicted until `until` (a lease); extends an
    /// existing pin, never shortens it. Returns whether the tier pinned it
    /// (false when absent, or when the tier cannot pin: a remote tier evicts
    /// by its own policy).
    fn pin(&self, _key: &Key, _until: std::time::Instant) -> bool {
        false
    }
    /// Ends a pin early (if any).
    fn unpin(&self, _key: &Key) {}
    /// Reads `key` progressively: `on(read, total)` is called once the
    /// value's length is known (`read` = 0, the first byte), then after each
    /// piece of about `piece` bytes, and may stop the read. `Ok(None)` when
    /// absent. The default reads the whole value with [`Tier::get_shared`] and
    /// reports it once, whole (a local tier is fast enough that probing it
    /// gains nothing); a tier behind a link reads piece by piece.
    fn get_progressive(&self, key: &Key, piece: usize, on: &mut dyn FnMut(usize, usize) -> ReadOn) -> Result<Option<Partial>, StoreError> {
        let _ = piece;
        Ok(self.get_shared(key)?.map(|v| {
            let n = v.len();
            let _ = on(n, n);
            Partial::Value(v)
        }))
    }
}

/// The key as 32 lowercase hex digits (the disk tier's file name).
pub fn key_hex(key: &Key) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(32);
    for b in key {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses 32 hex digits back into a key.
pub fn key_from_hex(s: &str) -> Option<Key> {
    if s.len() != 32 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut key = [0u8; 16];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(key)
}

/// Least-recently-used index shared by the tiers: a hash map from key to its
/// slot and an ordered map from access tick to key. Every operation is
/// O(log n); eviction planning is O(victims + protected entries skipped).
pub(crate) struct Lru<V> {
    map: HashMap<Key, Slot<V>>,
    order: BTreeMap<u64, Key>,
    tick: u64,
    bytes: u64,
}

pub(crate) struct Slot<V> {
    tick: u64,
    pub(crate) size: u64,
    pub(crate) value: V,
}

impl<V> Lru<V> {
    pub(crate) fn new() -> Self {
        Lru { map: HashMap::new(), order: BTreeMap::new(), tick: 0, bytes: 0 }
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn peek(&self, key: &Key) -> Option<&Slot<V>> {
        self.map.get(key)
    }

    /// Marks `key` most recently used and returns its slot.
    pub(crate) fn touch(&mut self, key: &Key) -> Option<&Slot<V>> {
        let slot = self.map.get_mut(key)?;
        self.order.remove(&slot.tick);
        self.tick += 1;
        slot.tick = self.tick;
        self.order.insert(self.tick, *key);
        Some(slot)
    }

    /// Inserts or replaces `key` as the most recently used entry; returns the
    /// replaced slot.
    pub(crate) fn insert(&mut self, key: Key, size: u64, value: V) -> Option<Slot<V>> {
        let old = self.remove(&key);
        self.tick += 1;
        self.order.insert(self.tick, key);
        self.map.insert(key, Slot { tick: self.tick, size, value });
        self.bytes += size;
        old
    }

    pub(crate) fn remove(&mut self, key: &Key) -> Option<Slot<V>> {
        let slot = self.map.remove(key)?;
        self.order.remove(&slot.tick);
        self.bytes -= slot.size;
        Some(slot)
    }

    /// Keys to evict, oldest first, so that storing `size` bytes under `key`
    /// (replacing its current entry, which is never a victim) keeps the total
    /// within `budget`. Entries for which `protected` is true are skipped.
    /// `None` when even evicting every unprotected entry is not enough.
    pub(crate) fn plan_eviction(
        &self,
        key: &Key,
        size: u64,
        budget: u64,
        mut protected: impl FnMut(&Key) -> bool,
    ) -> Option<Vec<Key>> {
        let replaced = self.map.get(key).map_or(0, |s| s.size);
        let mut total = self.bytes - replaced + size;
        let mut victims = Vec::new();
        for k in self.order.values() {
            if total <= budget {
                break;
            }
            if k == key || protected(k) {
                continue;
            }
            total -= self.map[k].size;
            victims.push(*k);
        }
        (total <= budget).then_some(victims)
    }

    /// The least recently used key.
    pub(crate) fn oldest(&self) -> Option<Key> {
        self.order.values().next().copied()
    }
}

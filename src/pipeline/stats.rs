//! Counters of one context, kept with relaxed atomics (a statistic may lag
//! by one event; it is never torn).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! counters {
    ($($name:ident),* $(,)?) => {
        /// Live counters.
        #[derive(Default)]
        pub struct Stats { $(pub $name: AtomicU64,)* }

        /// A copy of [`Stats`] at one moment.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
        pub struct StatsSnapshot { $(pub $name: u64,)* }

        impl Stats {
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

counters!(
    lookups,
    lookup_chunks_hit,
    lookup_tokens_hit,
    leases_granted,
    stores,
    store_chunks_written,
    store_chunks_skipped,
    store_chunks_failed,
    store_bytes_raw,
    store_bytes_encoded,
    gather_ns,
    encode_ns,
    write_ns,
    loads,
    load_chunks_ok,
    load_chunks_failed,
    load_blocks_failed,
    load_bytes_fetched,
    load_bytes_decoded,
    fetch_ns,
    decode_ns,
);

impl Stats {
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Relaxed);
    }
}

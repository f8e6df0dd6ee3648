//! The model-level table sets of a context: which set each level's stores
//! encode with, and which sets loads accept (by id).
//!
//! A set is calibrated once per model and level (`cachegen calibrate`) and
//! read from a file named in the config; chunks stored with it carry no
//! tables, only the set's id. A chunk that references a set this context
//! does not hold fails to parse (`MissingTables`), so it is reported failed,
//! never decoded with other tables.

use std::collections::HashMap;
use std::sync::Arc;

use crate::codec::format::Header;
use crate::codec::{Level, TableSet};

#[derive(Default)]
pub struct TableSets {
    store: HashMap<Level, Arc<TableSet>>,
    by_id: HashMap<u64, Arc<TableSet>>,
}

impl TableSets {
    /// One set per level (a level without one embeds its tables).
    pub fn new(per_level: &[(Level, Arc<TableSet>)]) -> TableSets {
        let mut sets = TableSets::default();
        for (level, set) in per_level {
            sets.store.insert(*level, Arc::clone(set));
            sets.by_id.insert(set.id(), Arc::clone(set));
        }
        sets
    }

    /// The set stores at `level` encode with (none: embedded tables).
    pub fn for_store(&self, level: Level) -> Option<&Arc<TableSet>> {
        self.store.get(&level)
    }

    /// The set a container references, if it references one this context
    /// holds. `None` for embedded tables, an unknown id or an unreadable
    /// header (the parser then reports why).
    pub fn for_container(&self, bytes: &[u8]) -> Option<&Arc<TableSet>> {
        // Most contexts have no sets: skip the header parse per chunk.
        if self.is_empty() {
            return None;
        }
        let h = Header::parse(bytes).ok()?;
        if !h.external_tables() {
            return None;
        }
        self.by_id.get(&h.table_id)
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{calibrate_tables, encode, EncodeOptions, KvKind, KvShape, KvTensors, Dtype, Tables};

    fn kv(seed: u32) -> KvTensors {
        let shape = KvShape { kind: KvKind::KeyValue, layers: 2, heads: 2, head_dim: 16, tokens: 32 };
        let mut x = seed.wrapping_mul(2654435761).max(1);
        let tensors = (0..shape.tensors())
            .map(|_| {
                (0..shape.plane_elems())
                    .flat_map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        half::f16::from_f32((x % 2000) as f32 / 1000.0 - 1.0).to_le_bytes()
                    })
                    .collect()
            })
            .collect();
        KvTensors { dtype: Dtype::F16, shape, tensors }
    }

    #[test]
    fn finds_the_set_a_container_references() {
        let a = Arc::new(calibrate_tables(&[&kv(1)], &EncodeOptions::level(Level::Default)).unwrap());
        let c = Arc::new(calibrate_tables(&[&kv(2), &kv(3)], &EncodeOptions::level(Level::Compact)).unwrap());
        assert_ne!(a.id(), c.id());
        let sets = TableSets::new(&[(Level::Default, Arc::clone(&a)), (Level::Compact, Arc::clone(&c))]);
        assert_eq!(sets.for_store(Level::Default).unwrap().id(), a.id());
        assert_eq!(sets.for_store(Level::Compact).unwrap().id(), c.id());
        assert!(sets.for_store(Level::High).is_none());
        let with = |s: &TableSet, l: Level| encode(&kv(4), &EncodeOptions { tables: Tables::External(s), ..EncodeOptions::level(l) }).unwrap();
        assert_eq!(sets.for_container(&with(&a, Level::Default)).unwrap().id(), a.id());
        assert_eq!(sets.for_container(&with(&c, Level::Compact)).unwrap().id(), c.id());
        // Embedded tables, an unknown set and garbage reference nothing.
        assert!(sets.for_container(&encode(&kv(4), &EncodeOptions::level(Level::Default)).unwrap()).is_none());
        let other = calibrate_tables(&[&kv(9)], &EncodeOptions::level(Level::Default)).unwrap();
        assert!(sets.for_container(&with(&other, Level::Default)).is_none());
        assert!(sets.for_container(b"not a container").is_none());
    }
}

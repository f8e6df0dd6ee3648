//! Storage tiers: the memory LRU and the disk tier on real files.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cachegen::store::{key_hex, DiskTier, Key, MemoryTier, StoreError, Tier, TierStack, DISK_OVERHEAD};

fn key(i: u32) -> Key {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&i.to_le_bytes());
    k[15] = 0xa5;
    k
}

/// Bytes derived from the key, so any value read back can be checked.
fn value_for(k: &Key, len: usize) -> Vec<u8> {
    let seed = xxhash_rust::xxh3::xxh3_64(k);
    (0..len).map(|i| (seed.wrapping_mul(i as u64 + 1) >> 29) as u8).collect()
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!(
            "cachegen-store-{tag}-{}-{nanos}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Every file under `dir` (recursively): (path, size).
fn files(dir: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let t = e.file_type().unwrap();
        if t.is_dir() {
            out.extend(files(&e.path()));
        } else {
            out.push((e.path(), e.metadata().unwrap().len()));
        }
    }
    out
}

// ---------------------------------------------------------------- memory

#[test]
fn memory_basic_ops() {
    let t = MemoryTier::new(1000);
    assert_eq!(t.name(), "memory");
    let (a, b) = (key(1), key(2));
    assert_eq!(t.get(&a).unwrap(), None);
    assert!(!t.contains(&a).unwrap());
    t.put(&a, b"hello").unwrap();
    t.put(&b, b"").unwrap();
    assert!(t.contains(&a).unwrap());
    assert_eq!(t.get(&a).unwrap().as_deref(), Some(&b"hello"[..]));
    assert_eq!(t.get(&b).unwrap().as_deref(), Some(&b""[..]));
    t.put(&a, b"bye").unwrap(); // replace
    assert_eq!(t.get(&a).unwrap().as_deref(), Some(&b"bye"[..]));
    let s = t.stats();
    assert_eq!((s.hits, s.misses, s.puts, s.bytes, s.entries), (3, 1, 3, 3, 2));
    t.remove(&a).unwrap();
    t.remove(&a).unwrap(); // absent: fine
    assert!(!t.contains(&a).unwrap());
    assert_eq!(t.get(&a).unwrap(), None);
    assert_eq!(t.stats().bytes, 0);
    assert_eq!(t.stats().entries, 1);
}

#[test]
fn memory_shared_gets_hand_out_the_stored_bytes_without_copying() {
    let t = Arc::new(MemoryTier::new(1 << 20));
    let k = key(7);
    let v = value_for(&k, 100_000);
    t.put(&k, &v).unwrap();
    let (a, b) = (t.get_shared(&k).unwrap().unwrap(), t.get_shared(&k).unwrap().unwrap());
    assert_eq!(&a[..], &v[..]);
    assert_eq!(a.as_ptr(), b.as_ptr(), "both fetches share the tier's copy");
    // `get` still hands out an owned copy; replacing the value leaves an
    // earlier shared fetch intact.
    let owned = t.get(&k).unwrap().unwrap();
    assert_ne!(owned.as_ptr(), a.as_ptr());
    t.put(&k, b"new").unwrap();
    assert_eq!(&a[..], &v[..]);
    assert_eq!(t.get_shared(&k).unwrap().as_deref(), Some(&b"new"[..]));
    // The fetch path of a tier stack takes the shared copy too.
    let stack = TierStack::new(vec![t.clone() as Arc<dyn Tier>]);
    let f = stack.fetch(&k).unwrap().unwrap();
    assert_eq!(f.value.as_ptr(), t.get_shared(&k).unwrap().unwrap().as_ptr());
}

#[test]
fn memory_lru_eviction_order() {
    let t = MemoryTier::new(100);
    for i in 0..4 {
        t.put(&key(i), &[i as u8; 25]).unwrap(); // 4 x 25 = exactly the budget
    }
    assert_eq!(t.stats().bytes, 100);
    assert_eq!(t.stats().evictions, 0);
    // Use 0 and 2: the LRU order is now 1, 3, 0, 2.
    assert!(t.get(&key(0)).unwrap().is_some());
    assert!(t.get(&key(2)).unwrap().is_some());
    // contains does not count as a use.
    assert!(t.contains(&key(1)).unwrap());
    // 30 bytes need two victims: 1 then 3.
    t.put(&key(4), &[4; 30]).unwrap();
    let present: Vec<u32> = (0..5).filter(|&i| t.contains(&key(i)).unwrap()).collect();
    assert_eq!(present, vec![0, 2, 4]);
    assert_eq!(t.stats().bytes, 80);
    assert_eq!(t.stats().evictions, 2);
    // 21 more bytes: 0 goes (LRU), 2 and 4 stay.
    t.put(&key(5), &[5; 21]).unwrap();
    let present: Vec<u32> = (0..6).filter(|&i| t.contains(&key(i)).unwrap()).collect();
    assert_eq!(present, vec![2, 4, 5]);
    // Replacing a key with a bigger value only evicts others: 2 goes.
    t.put(&key(4), &[4; 70]).unwrap();
    let present: Vec<u32> = (0..6).filter(|&i| t.contains(&key(i)).unwrap()).collect();
    assert_eq!(present, vec![4, 5]);
    assert_eq!(t.stats().bytes, 91);
    // A value of exactly the budget evicts everything else.
    t.put(&key(6), &[6; 100]).unwrap();
    let present: Vec<u32> = (0..7).filter(|&i| t.contains(&key(i)).unwrap()).collect();
    assert_eq!(present, vec![6]);
}

#[test]
fn memory_budget_respected_after_many_puts() {
    let budget = 10_000;
    let t = MemoryTier::new(budget);
    for i in 0..2000u32 {
        let k = key(i % 300);
        let len = (i as usize * 37) % 900;
        t.put(&k, &value_for(&k, len)).unwrap();
        assert!(t.stats().bytes <= budget);
        if i % 7 == 0 {
            let probe = key(i % 250);
            if let Some(v) = t.get(&probe).unwrap() {
                assert_eq!(v, value_for(&probe, v.len()));
            }
        }
    }
    let s = t.stats();
    assert!(s.bytes <= budget && s.bytes > budget - 900, "{s:?}");
    assert_eq!(s.puts, 2000);
    assert!(s.evictions > 0);
}

#[test]
fn memory_pinned_entry_survives_until_lease_expires() {
    let t = MemoryTier::new(100);
    let pinned = key(1000);
    t.put(&pinned, &[7; 40]).unwrap();
    assert!(t.pin(&pinned, Instant::now() + Duration::from_secs(3600)));
    assert!(t.is_pinned(&pinned));
    assert!(!t.pin(&key(999), Instant::now() + Duration::from_secs(1))); // absent
                                                                         // Heavy pressure: the pinned (and least recently used) entry stays.
    for i in 0..50 {
        t.put(&key(i), &[i as u8; 30]).unwrap();
        assert!(t.contains(&pinned).unwrap());
        assert!(t.stats().bytes <= 100);
    }
    // Pinned entries hold 40, so 70 bytes cannot fit now: refused, nothing evicted.
    let before = t.stats();
    assert!(matches!(t.put(&key(77), &[0; 70]), Err(StoreError::Full { .. })));
    assert_eq!(t.stats().entries, before.entries);
    assert!(!t.contains(&key(77)).unwrap());

    // A short lease: protected now, ignored once expired.
    t.unpin(&pinned);
    assert!(t.pin(&pinned, Instant::now() + Duration::from_millis(300)));
    // LRU order: pinned, 49; these two puts need one eviction: 49, not pinned.
    t.put(&key(100), &[1; 30]).unwrap();
    t.put(&key(101), &[1; 30]).unwrap();
    assert!(t.contains(&pinned).unwrap());
    assert!(!t.contains(&key(49)).unwrap());
    std::thread::sleep(Duration::from_millis(350));
    assert!(!t.is_pinned(&pinned));
    t.put(&key(102), &[1; 30]).unwrap(); // oldest is the (expired) pinned entry
    assert!(!t.contains(&pinned).unwrap());
    assert!(t.contains(&key(100)).unwrap());
    // A lease that is already over protects nothing.
    t.put(&pinned, &[7; 40]).unwrap();
    assert!(t.pin(&pinned, Instant::now()));
    assert!(!t.is_pinned(&pinned));
    t.put(&key(103), &[1; 100]).unwrap(); // the whole budget: everything else goes
    assert!(!t.contains(&pinned).unwrap());
    assert_eq!(t.stats().entries, 1);
    // remove() drops a live lease with the entry; a re-put key is unpinned.
    t.put(&pinned, &[7; 40]).unwrap();
    assert!(t.pin(&pinned, Instant::now() + Duration::from_secs(3600)));
    t.remove(&pinned).unwrap();
    assert!(!t.is_pinned(&pinned));
    t.put(&pinned, &[7; 40]).unwrap();
    assert!(!t.is_pinned(&pinned));
}

#[test]
fn memory_too_large_value_refused() {
    let t = MemoryTier::new(64);
    t.put(&key(1), &[1; 10]).unwrap();
    match t.put(&key(2), &[0; 65]) {
        Err(StoreError::TooLarge { size: 65, budget: 64 }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert!(!t.contains(&key(2)).unwrap());
    assert!(t.contains(&key(1)).unwrap()); // nothing evicted for it
    t.put(&key(3), &[0; 64]).unwrap(); // exactly the budget fits
}

// ---------------------------------------------------------------- disk

#[test]
fn disk_round_trip() {
    let d = TempDir::new("roundtrip");
    let t = DiskTier::open(d.path(), 1 << 20).unwrap();
    assert_eq!(t.name(), "disk");
    let k = key(42);
    assert_eq!(t.get(&k).unwrap(), None);
    for len in [0usize, 1, 7, 4096, 100_000] {
        let v = value_for(&k, len);
        t.put(&k, &v).unwrap();
        assert!(t.contains(&k).unwrap());
        assert_eq!(t.get(&k).unwrap(), Some(v));
        assert_eq!(t.stats().bytes, len as u64 + DISK_OVERHEAD);
    }
    // File name is the hex key under a 2-level fan-out.
    let hex = key_hex(&k);
    let p = d.path().join(&hex[0..2]).join(&hex[2..4]).join(&hex);
    assert_eq!(t.path_of(&k), p);
    let bytes = fs::read(&p).unwrap();
    assert_eq!(&bytes[..8], b"CGDISK01");
    assert_eq!(bytes.len() as u64, 100_000 + DISK_OVERHEAD);
    assert_eq!(files(d.path()).len(), 1); // no temp files left
    t.remove(&k).unwrap();
    assert!(!p.exists());
    assert_eq!(t.get(&k).unwrap(), None);
    assert_eq!(t.stats().entries, 0);
}

#[test]
fn disk_restart_finds_earlier_entries() {
    let d = TempDir::new("restart");
    {
        let t = DiskTier::open(d.path(), 1 << 20).unwrap();
        for i in 0..20 {
            t.put(&key(i), &value_for(&key(i), 100 + i as usize)).unwrap();
        }
        t.remove(&key(3)).unwrap();
    }
    let t = DiskTier::open(d.path(), 1 << 20).unwrap();
    let s = t.stats();
    assert_eq!(s.entries, 19);
    let want: u64 = (0..20u64).filter(|&i| i != 3).map(|i| 100 + i + DISK_OVERHEAD).sum();
    assert_eq!(s.bytes, want);
    for i in 0..20 {
        let got = t.get(&key(i)).unwrap();
        if i == 3 {
            assert_eq!(got, None);
        } else {
            assert_eq!(got, Some(value_for(&key(i), 100 + i as usize)), "key {i}");
        }
    }
}

#[test]
fn disk_restart_evicts_oldest_when_budget_shrinks() {
    let d = TempDir::new("shrink");
    {
        let t = DiskTier::open(d.path(), 1 << 20).unwrap();
        for i in 0..10 {
            t.put(&key(i), &[i as u8; 100]).unwrap();
            // Distinct mtimes even on coarse-grained filesystems.
            std::thread::sleep(Duration::from_millis(15));
        }
    }
    let per = 100 + DISK_OVERHEAD;
    let t = DiskTier::open(d.path(), 4 * per).unwrap();
    assert_eq!(t.stats().entries, 4);
    assert_eq!(t.stats().evictions, 6);
    let present: Vec<u32> = (0..10).filter(|&i| t.contains(&key(i)).unwrap()).collect();
    assert_eq!(present, vec![6, 7, 8, 9]);
    assert_eq!(files(d.path()).len(), 4);
}

fn check_corruption(tag: &str, damage: impl Fn(&Path)) {
    let d = TempDir::new(tag);
    let t = DiskTier::open(d.path(), 1 << 20).unwrap();
    let (bad, good) = (key(1), key(2));
    t.put(&bad, &value_for(&bad, 5000)).unwrap();
    t.put(&good, &value_for(&good, 5000)).unwrap();
    let p = t.path_of(&bad);
    damage(&p);
    match t.get(&bad) {
        Err(StoreError::Corrupt(msg)) => assert!(msg.contains(&key_hex(&bad)), "{msg}"),
        other => panic!("{tag}: expected Corrupt, got {other:?}"),
    }
    assert!(!p.exists(), "{tag}: corrupt file must be deleted");
    assert_eq!(t.get(&bad).unwrap(), None);
    assert!(!t.contains(&bad).unwrap());
    assert_eq!(t.stats().entries, 1);
    assert_eq!(t.stats().bytes, 5000 + DISK_OVERHEAD);
    assert_eq!(t.get(&good).unwrap(), Some(value_for(&good, 5000)));
    // The key is usable again.
    t.put(&bad, b"fresh").unwrap();
    assert_eq!(t.get(&bad).unwrap().as_deref(), Some(&b"fresh"[..]));
}

fn flip_byte(p: &Path, at: usize) {
    let mut b = fs::read(p).unwrap();
    b[at] ^= 0x40;
    fs::write(p, b).unwrap();
}

#[test]
fn disk_flipped_byte_is_corrupt_then_absent() {
    check_corruption("flip-value", |p| flip_byte(p, 16 + 1234));
    check_corruption("flip-magic", |p| flip_byte(p, 3));
    check_corruption("flip-length", |p| flip_byte(p, 9));
    check_corruption("flip-checksum", |p| {
        let n = fs::metadata(p).unwrap().len() as usize;
        flip_byte(p, n - 2)
    });
}

#[test]
fn disk_truncated_file_is_corrupt_then_absent() {
    let truncate = |len: u64| {
        move |p: &Path| {
            let f = fs::OpenOptions::new().write(true).open(p).unwrap();
            f.set_len(len).unwrap();
        }
    };
    check_corruption("trunc-tail", truncate(16 + 5000 + 4));
    check_corruption("trunc-mid", truncate(1000));
    check_corruption("trunc-header", truncate(10));
    check_corruption("trunc-empty", truncate(0));
}

#[test]
fn disk_corruption_found_after_restart() {
    let d = TempDir::new("corrupt-restart");
    let k = key(9);
    {
        let t = DiskTier::open(d.path(), 1 << 20).unwrap();
        t.put(&k, &value_for(&k, 300)).unwrap();
        flip_byte(&t.path_of(&k), 100);
    }
    let t = DiskTier::open(d.path(), 1 << 20).unwrap();
    assert!(t.contains(&k).unwrap()); // open does not read values
    assert!(matches!(t.get(&k), Err(StoreError::Corrupt(_))));
    assert_eq!(t.get(&k).unwrap(), None);
    assert!(files(d.path()).is_empty());
}

#[test]
fn disk_budget_eviction() {
    let d = TempDir::new("budget");
    let per = 1000 + DISK_OVERHEAD;
    let t = DiskTier::open(d.path(), 3 * per).unwrap();
    for i in 0..3 {
        t.put(&key(i), &value_for(&key(i), 1000)).unwrap();
    }
    assert_eq!(t.stats().bytes, 3 * per);
    assert!(t.get(&key(0)).unwrap().is_some()); // LRU order: 1, 2, 0
    t.put(&key(3), &value_for(&key(3), 1000)).unwrap();
    let present: Vec<u32> = (0..4).filter(|&i| t.contains(&key(i)).unwrap()).collect();
    assert_eq!(present, vec![0, 2, 3]);
    assert!(!t.path_of(&key(1)).exists());
    assert_eq!(t.stats().evictions, 1);
    // Two slots' worth evicts two (2, then 0).
    t.put(&key(4), &value_for(&key(4), 2 * 1000 + DISK_OVERHEAD as usize)).unwrap();
    let present: Vec<u32> = (0..5).filter(|&i| t.contains(&key(i)).unwrap()).collect();
    assert_eq!(present, vec![3, 4]);
    let on_disk: u64 = files(d.path()).iter().map(|f| f.1).sum();
    assert_eq!(on_disk, t.stats().bytes);
    assert!(on_disk <= 3 * per);
    // Too large for the budget: refused, nothing evicted, nothing written.
    assert!(matches!(t.put(&key(5), &vec![0; 3 * per as usize]), Err(StoreError::TooLarge { .. })));
    assert_eq!(t.stats().entries, 2);
    assert_eq!(files(d.path()).len(), 2);
}

#[test]
fn disk_leftover_temp_files_removed_at_open() {
    let d = TempDir::new("tmpfiles");
    let k = key(5);
    let hex = key_hex(&k);
    {
        let t = DiskTier::open(d.path(), 1 << 20).unwrap();
        t.put(&k, b"kept").unwrap();
    }
    // What a crash mid-write leaves behind, plus an unrelated file.
    let fan = d.path().join(&hex[0..2]).join(&hex[2..4]);
    fs::write(fan.join(".tmp-12345-0"), b"CGDISK01 partial").unwrap();
    fs::create_dir_all(d.path().join("ff/ee")).unwrap();
    fs::write(d.path().join("ff/ee/.tmp-999-7"), b"").unwrap();
    fs::write(d.path().join("README"), b"not ours").unwrap();
    let t = DiskTier::open(d.path(), 1 << 20).unwrap();
    assert!(!fan.join(".tmp-12345-0").exists());
    assert!(!d.path().join("ff/ee/.tmp-999-7").exists());
    assert!(d.path().join("README").exists()); // unknown files are left alone
    assert_eq!(t.stats().entries, 1);
    assert_eq!(t.get(&k).unwrap().as_deref(), Some(&b"kept"[..]));
}

#[test]
fn disk_failed_write_leaves_nothing_visible() {
    let d = TempDir::new("writefail");
    let t = DiskTier::open(d.path(), 1 << 20).unwrap();
    let k = key(11);
    // A directory where the entry file should go makes the rename fail.
    fs::create_dir_all(t.path_of(&k)).unwrap();
    fs::write(t.path_of(&k).join("x"), b"").unwrap();
    assert!(matches!(t.put(&k, b"value"), Err(StoreError::Io(_))));
    assert!(!t.contains(&k).unwrap());
    assert_eq!(t.stats().bytes, 0);
    let fan = t.path_of(&k).parent().unwrap().to_path_buf();
    let names: Vec<String> = fs::read_dir(&fan)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![key_hex(&k)], "no temp file may remain");
}

#[test]
fn disk_open_on_a_file_is_an_io_error() {
    let d = TempDir::new("notadir");
    let file = d.path().join("file");
    fs::write(&file, b"").unwrap();
    assert!(matches!(DiskTier::open(&file, 1000), Err(StoreError::Io(_))));
}

#[test]
fn disk_concurrent_puts_and_gets_keep_budget() {
    let d = TempDir::new("concurrent");
    let budget = 40_000;
    let t = Arc::new(DiskTier::open(d.path(), budget).unwrap());
    let len_of = |i: u32| 200 + (i as usize * 131) % 3000;
    let threads: Vec<_> = (0..4u32)
        .map(|th| {
            let t = Arc::clone(&t);
            std::thread::spawn(move || {
                let mut state = 0x9e37_79b9u32.wrapping_mul(th + 1);
                let (mut hits, mut misses) = (0u32, 0u32);
                for _ in 0..400 {
                    state ^= state << 13;
                    state ^= state >> 17;
                    state ^= state << 5;
                    let i = state % 48;
                    let k = key(i);
                    match (state >> 16) % 4 {
                        0 => t.put(&k, &value_for(&k, len_of(i))).unwrap(),
                        3 if i % 5 == 0 => t.remove(&k).unwrap(),
                        _ => match t.get(&k).unwrap() {
                            Some(v) => {
                                assert_eq!(v, value_for(&k, len_of(i)), "key {i}");
                                hits += 1;
                            }
                            None => misses += 1,
                        },
                    }
                    assert!(t.stats().bytes <= budget);
                }
                (hits, misses)
            })
        })
        .collect();
    let mut hits = 0;
    for h in threads {
        hits += h.join().unwrap().0;
    }
    assert!(hits > 0);
    let s = t.stats();
    assert!(s.bytes <= budget, "{s:?}");
    assert!(s.evictions > 0, "{s:?}");
    // The directory agrees with the index: no temp files, same bytes.
    let on_disk = files(d.path());
    assert!(on_disk.iter().all(|(p, _)| !p
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(".tmp")));
    assert_eq!(on_disk.iter().map(|f| f.1).sum::<u64>(), s.bytes);
    assert_eq!(on_disk.len() as u64, s.entries);
    drop(t);
    // And a restart sees the same entries, all intact.
    let t = DiskTier::open(d.path(), budget).unwrap();
    assert_eq!(t.stats().entries, s.entries);
    for i in 0..48 {
        if let Some(v) = t.get(&key(i)).unwrap() {
            assert_eq!(v, value_for(&key(i), len_of(i)));
        }
    }
}

#[test]
fn disk_entries_written_by_another_instance_are_found() {
    // Two processes sharing a cache directory: B opened before A wrote.
    let d = TempDir::new("shared");
    let a = DiskTier::open(d.path(), 1 << 20).unwrap();
    let b = DiskTier::open(d.path(), 1 << 20).unwrap();
    a.put(&key(1), &value_for(&key(1), 300)).unwrap();
    assert!(!b.contains(&key(2)).unwrap());
    assert!(b.contains(&key(1)).unwrap());
    assert_eq!(b.get(&key(1)).unwrap(), Some(value_for(&key(1), 300)));
    a.put(&key(3), &value_for(&key(3), 50)).unwrap();
    assert_eq!(b.get(&key(3)).unwrap(), Some(value_for(&key(3), 50)));
    assert_eq!(b.stats().entries, 2);
    // Removed by A: B reads it as absent and forgets it.
    a.remove(&key(3)).unwrap();
    assert_eq!(b.get(&key(3)).unwrap(), None);
    assert!(!b.contains(&key(3)).unwrap());
}

#[test]
fn tier_stack_fetches_fastest_intact_copy_and_promotes() {
    use cachegen::store::TierStack;
    let d = TempDir::new("stack");
    let mem = Arc::new(MemoryTier::new(1 << 20));
    let disk = Arc::new(DiskTier::open(d.path(), 1 << 20).unwrap());
    let stack = TierStack::new(vec![mem.clone() as Arc<dyn Tier>, disk.clone() as Arc<dyn Tier>]);
    let (k, v) = (key(7), value_for(&key(7), 500));
    disk.put(&k, &v).unwrap();
    assert!(!mem.contains(&k).unwrap());
    assert!(stack.contains(&k));
    let f = stack.fetch(&k).unwrap().unwrap();
    assert_eq!((f.value.to_vec(), f.tier), (v.clone(), 1));
    // Promoted: the next fetch is served by memory.
    assert!(mem.contains(&k).unwrap());
    assert_eq!(stack.fetch(&k).unwrap().unwrap().tier, 0);
    // Write-through reaches every tier.
    let (k2, v2) = (key(8), value_for(&key(8), 300));
    assert_eq!(stack.put_all(&k2, &v2).0, 2);
    assert_eq!(disk.get(&k2).unwrap(), Some(v2.clone()));
    // A corrupt copy in a tier is skipped (and removed); an intact one elsewhere is returned.
    mem.remove(&k2).unwrap();
    let mut bytes = fs::read(disk.path_of(&k2)).unwrap();
    bytes[30] ^= 1;
    fs::write(disk.path_of(&k2), bytes).unwrap();
    mem.put(&k2, &v2).unwrap();
    assert_eq!(stack.fetch(&k2).unwrap().unwrap().tier, 0);
    mem.remove(&k2).unwrap();
    assert!(matches!(stack.fetch(&k2), Err(StoreError::Corrupt(_))));
    assert!(stack.fetch(&k2).unwrap().is_none(), "the corrupt entry was removed");
}

#[test]
fn tier_stack_progressive_fetch_promotes_and_stops() {
    use cachegen::store::{Progressive, ReadOn, TierStack};
    use cachegen::streaming::{Link, ShapedTier};
    let d = TempDir::new("stack-progressive");
    let mem = Arc::new(MemoryTier::new(1 << 20));
    let disk = Arc::new(DiskTier::open(d.path(), 1 << 20).unwrap());
    // The slower tier sits behind an (unthrottled in practice) 100 Gbps link: read in pieces.
    let far = Arc::new(ShapedTier::new(disk.clone() as Arc<dyn Tier>, Link::gbps(100.0, Duration::ZERO)));
    let stack = TierStack::new(vec![mem.clone() as Arc<dyn Tier>, far as Arc<dyn Tier>]);
    let (k, v) = (key(9), value_for(&key(9), 10_000));
    disk.put(&k, &v).unwrap();
    // Stopped after the first 1000-byte piece: nothing promoted.
    let mut seen = Vec::new();
    let r = stack.fetch_progressive(&k, 1000, &mut |read, total| {
        seen.push((read, total));
        if read == 0 {
            ReadOn::Piece
        } else {
            ReadOn::Stop
        }
    });
    assert!(matches!(r, Ok(Some(Progressive::Stopped { tier: 1, read: 1000, total: 10_000 }))), "{r:?}");
    assert_eq!(seen, vec![(0, 10_000), (1000, 10_000)]);
    assert!(!mem.contains(&k).unwrap());
    // Read whole: the same value as `fetch`, promoted into memory.
    let r = stack.fetch_progressive(&k, 1000, &mut |_, _| ReadOn::Piece).unwrap();
    let Some(Progressive::Done(f)) = r else { panic!("{r:?}") };
    assert_eq!((f.value.to_vec(), f.tier), (v.clone(), 1));
    assert!(mem.contains(&k).unwrap());
    let r = stack.fetch_progressive(&k, 1000, &mut |_, _| ReadOn::Rest).unwrap();
    assert!(matches!(r, Some(Progressive::Done(ref f)) if f.tier == 0), "{r:?}");
    // Absent everywhere.
    assert!(matches!(stack.fetch_progressive(&key(10), 1000, &mut |_, _| ReadOn::Piece), Ok(None)));
    // A corrupt copy behind the link is an error, never returned.
    mem.remove(&k).unwrap();
    let mut bytes = fs::read(disk.path_of(&k)).unwrap();
    bytes[40] ^= 1;
    fs::write(disk.path_of(&k), bytes).unwrap();
    assert!(matches!(stack.fetch_progressive(&k, 1000, &mut |_, _| ReadOn::Piece), Err(StoreError::Corrupt(_))));
}

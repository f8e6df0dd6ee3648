//! The disk tier: one checksummed file per key, written atomically.
//!
//! Layout: `DIR/ab/cd/abcd…` (32 hex digits of the key, fanned out by its
//! first two bytes). Each file is
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `CGDISK01` |
//! | 8 | value length `n`, u64 little-endian |
//! | n | value |
//! | 8 | xxh3-64 of the value, u64 little-endian |
//!
//! A file is written as `.tmp-*` in its final directory, fsynced, then renamed
//! into place (and the directory fsynced), so a reader or a later process sees
//! either the whole file or none. `open` deletes `.tmp-*` leftovers of a crash
//! and rebuilds the LRU index from the files, oldest modification time first.
//!
//! Several processes may share a directory: an entry another process wrote
//! after `open` is found (and indexed) on the first `get` or `contains` that
//! asks for it. Each process evicts by its own index, so their budgets are
//! not shared, and `open` deletes temp files, which fails (harmlessly: the
//! put reports an I/O error) a write in flight in another process.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::time::{Instant, SystemTime};

use xxhash_rust::xxh3::xxh3_64;

use super::{Counters, key_from_hex, key_hex, Key, Lru, StoreError, Tier, TierStats};

const MAGIC: &[u8; 8] = b"CGDISK01";
/// Bytes of framing around each value (magic, length, checksum).
pub const DISK_OVERHEAD: u64 = 24;
const TMP_PREFIX: &str = ".tmp-";

/// Disk tier bounded by file bytes (values plus [`DISK_OVERHEAD`] each).
///
/// File reads and writes run outside the index lock; renames and deletes run
/// under it, so the index and the directory agree whenever the lock is free.
/// Temp files being written are not counted against the budget.
pub struct DiskTier {
    dir: PathBuf,
    budget: u64,
    /// Index: key -> (file bytes, generation of the file written last).
    index: Mutex<Lru<u64>>,
    next_gen: AtomicU64,
    tmp_seq: AtomicU64,
    counters: Counters,
    /// Lease expiry per pinned key (locked after `index`, never before).
    pins: Mutex<HashMap<Key, Instant>>,
}

enum ReadError {
    NotFound,
    Corrupt(String),
    Io(io::Error),
}

fn io_err(what: &str, path: &Path, e: io::Error) -> StoreError {
    StoreError::Io(format!("{what} {}: {e}", path.display()))
}

fn is_hex_byte(name: &str) -> bool {
    name.len() == 2 && name.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
}

impl DiskTier {
    /// Opens (creating it if needed) the tier in `dir`: removes temp files
    /// left by a crash, indexes the entries already there and evicts the
    /// oldest if they exceed `byte_budget`. Entries are not verified here;
    /// `get` verifies each one it reads.
    pub fn open(dir: impl AsRef<Path>, byte_budget: u64) -> Result<Self, StoreError> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| io_err("creating", &dir, e))?;
        let tier = DiskTier {
            dir,
            budget: byte_budget,
            index: Mutex::new(Lru::new()),
            next_gen: AtomicU64::new(1),
            tmp_seq: AtomicU64::new(0),
            counters: Counters::default(),
            pins: Mutex::new(HashMap::new()),
        };
        let mut found = tier.scan()?;
        found.sort();
        {
            let mut index = tier.lock();
            for (_, key, size) in found {
                let gen = tier.next_gen.fetch_add(1, Relaxed);
                index.insert(key, size, gen);
            }
            let mut evicted = 0;
            while index.bytes() > byte_budget {
                let Some(k) = index.oldest() else { break };
                index.remove(&k);
                tier.unlink(&k);
                evicted += 1;
            }
            tier.counters.evictions.fetch_add(evicted, Relaxed);
        }
        Ok(tier)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// The file that holds `key` (whether or not it exists).
    pub fn path_of(&self, key: &Key) -> PathBuf {
        let hex = key_hex(key);
        self.dir.join(&hex[0..2]).join(&hex[2..4]).join(hex)
    }

    fn lock(&self) -> MutexGuard<'_, Lru<u64>> {
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Indexes `key`'s file if another process wrote it after `open` (a
    /// shared directory); returns whether the key is indexed now. Costs one
    /// `stat` per miss. The index may go over budget by adopted entries
    /// until the next put evicts.
    fn adopt(&self, key: &Key) -> bool {
        let mut index = self.lock();
        if index.peek(key).is_some() {
            return true;
        }
        match fs::metadata(self.path_of(key)) {
            Ok(m) if m.is_file() && m.len() >= DISK_OVERHEAD => {
                let gen = self.next_gen.fetch_add(1, Relaxed);
                index.insert(*key, m.len(), gen);
                true
            }
            _ => false,
        }
    }

    /// Deletes the file of an evicted entry. A failure leaves an untracked file
    /// that the next `open` indexes again; it is not worth failing a put for.
    fn unlink(&self, key: &Key) {
        let _ = fs::remove_file(self.path_of(key));
    }

    /// Walks `DIR/xx/yy/`, deleting temp files; returns (mtime, key, file bytes)
    /// of every entry file.
    fn scan(&self) -> Result<Vec<(SystemTime, Key, u64)>, StoreError> {
        let mut found = Vec::new();
        let read_dir = |p: &Path| fs::read_dir(p).map_err(|e| io_err("listing", p, e));
        for l1 in read_dir(&self.dir)? {
            let l1 = l1.map_err(|e| io_err("listing", &self.dir, e))?;
            let name1 = l1.file_name().to_string_lossy().into_owned();
            let kind = l1.file_type().map_err(|e| io_err("inspecting", &l1.path(), e))?;
            if kind.is_file() && name1.starts_with(TMP_PREFIX) {
                remove_tmp(&l1.path())?;
            }
            if !kind.is_dir() || !is_hex_byte(&name1) {
                continue;
            }
            for l2 in read_dir(&l1.path())? {
                let l2 = l2.map_err(|e| io_err("listing", &l1.path(), e))?;
                let name2 = l2.file_name().to_string_lossy().into_owned();
                let kind = l2.file_type().map_err(|e| io_err("inspecting", &l2.path(), e))?;
                if !kind.is_dir() || !is_hex_byte(&name2) {
                    continue;
                }
                for f in read_dir(&l2.path())? {
                    let f = f.map_err(|e| io_err("listing", &l2.path(), e))?;
                    let path = f.path();
                    let name = f.file_name().to_string_lossy().into_owned();
                    let meta = f.metadata().map_err(|e| io_err("inspecting", &path, e))?;
                    if !meta.is_file() {
                        continue;
                    }
                    if name.starts_with(TMP_PREFIX) {
                        remove_tmp(&path)?;
                        continue;
                    }
                    let Some(key) = key_from_hex(&name) else { continue };
                    if name[0..2] != name1 || name[2..4] != name2 || name != key_hex(&key) {
                        continue; // misplaced or upper-case: never looked up, leave alone
                    }
                    let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((mtime, key, meta.len()));
                }
            }
        }
        Ok(found)
    }
}

fn remove_tmp(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing temp file", path, e)),
        _ => Ok(()),
    }
}

fn write_entry(path: &Path, value: &[u8]) -> io::Result<()> {
    let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(MAGIC)?;
    f.write_all(&(value.len() as u64).to_le_bytes())?;
    f.write_all(value)?;
    f.write_all(&xxh3_64(value).to_le_bytes())?;
    f.sync_all()
}

fn read_entry(path: &Path) -> Result<Vec<u8>, ReadError> {
    let io = |e: io::Error| match e.kind() {
        io::ErrorKind::NotFound => ReadError::NotFound,
        io::ErrorKind::UnexpectedEof => ReadError::Corrupt("file ends early".into()),
        _ => ReadError::Io(e),
    };
    let mut f = File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    if file_len < DISK_OVERHEAD {
        return Err(ReadError::Corrupt(format!("{file_len} bytes, less than the framing")));
    }
    let mut head = [0u8; 16];
    f.read_exact(&mut head).map_err(io)?;
    if &head[..8] != MAGIC {
        return Err(ReadError::Corrupt("bad magic".into()));
    }
    let len = u64::from_le_bytes(head[8..16].try_into().unwrap());
    if len != file_len - DISK_OVERHEAD {
        return Err(ReadError::Corrupt(format!(
            "length field says {len} bytes, the file holds {}",
            file_len - DISK_OVERHEAD
        )));
    }
    let mut value = vec![0u8; len as usize];
    f.read_exact(&mut value).map_err(io)?;
    let mut tail = [0u8; 8];
    f.read_exact(&mut tail).map_err(io)?;
    if xxh3_64(&value) != u64::from_le_bytes(tail) {
        return Err(ReadError::Corrupt("checksum mismatch".into()));
    }
    Ok(value)
}

impl Tier for DiskTier {
    fn name(&self) -> &str {
        "disk"
    }

    fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, StoreError> {
        self.adopt(key);
        let Some(gen) = self.lock().touch(key).map(|s| s.value) else {
            self.counters.misses.fetch_add(1, Relaxed);
            return Ok(None);
        };
        let path = self.path_of(key);
        let result = read_entry(&path);
        // Only forget the entry if no put replaced it while we read.
        // Unlinking a corrupt file happens under the same lock, so it cannot
        // delete a good file renamed into place by a concurrent put.
        let forget = || {
            let mut index = self.lock();
            let same = index.peek(key).is_some_and(|s| s.value == gen);
            if same {
                index.remove(key);
            }
            (same, index)
        };
        match result {
            Ok(v) => {
                self.counters.hits.fetch_add(1, Relaxed);
                Ok(Some(v))
            }
            Err(ReadError::NotFound) => {
                // Deleted behind our back (or evicted/removed meanwhile).
                drop(forget());
                self.counters.misses.fetch_add(1, Relaxed);
                Ok(None)
            }
            Err(ReadError::Corrupt(why)) => {
                if let (true, _index) = forget() {
                    self.unlink(key);
                }
                self.counters.misses.fetch_add(1, Relaxed);
                Err(StoreError::Corrupt(format!("{}: {why} (entry removed)", path.display())))
            }
            Err(ReadError::Io(e)) => Err(io_err("reading", &path, e)),
        }
    }

    fn put(&self, key: &Key, value: &[u8]) -> Result<(), StoreError> {
        let size = value.len() as u64 + DISK_OVERHEAD;
        if size > self.budget {
            return Err(StoreError::TooLarge { size, budget: self.budget });
        }
        let path = self.path_of(key);
        let parent = path.parent().expect("entry paths have a parent");
        fs::create_dir_all(parent).map_err(|e| io_err("creating", parent, e))?;
        let seq = self.tmp_seq.fetch_add(1, Relaxed);
        let tmp = parent.join(format!("{TMP_PREFIX}{}-{seq}", std::process::id()));
        if let Err(e) = write_entry(&tmp, value) {
            let _ = fs::remove_file(&tmp);
            return Err(io_err("writing", &tmp, e));
        }
        let gen = self.next_gen.fetch_add(1, Relaxed);
        {
            let mut index = self.lock();
            let now = Instant::now();
            let victims = {
                let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
                pins.retain(|_, t| *t > now);
                match index.plan_eviction(key, size, self.budget, |k| pins.contains_key(k)) {
                    Some(v) => {
                        for k in &v {
                            pins.remove(k);
                        }
                        v
                    }
                    None => {
                        drop(pins);
                        drop(index);
                        let _ = fs::remove_file(&tmp);
                        return Err(StoreError::Full { size, budget: self.budget });
                    }
                }
            };
            if let Err(e) = fs::rename(&tmp, &path) {
                drop(index);
                let _ = fs::remove_file(&tmp);
                return Err(io_err("renaming into", &path, e));
            }
            for k in &victims {
                index.remove(k);
                self.unlink(k);
            }
            index.insert(*key, size, gen);
            self.counters.evictions.fetch_add(victims.len() as u64, Relaxed);
        }
        // Make the rename durable; the entry is already visible either way.
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
        self.counters.puts.fetch_add(1, Relaxed);
        Ok(())
    }

    fn contains(&self, key: &Key) -> Result<bool, StoreError> {
        Ok(self.adopt(key))
    }

    fn remove(&self, key: &Key) -> Result<(), StoreError> {
        let path = self.path_of(key);
        let mut index = self.lock();
        index.remove(key);
        self.pins.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("removing", &path, e)),
            _ => Ok(()),
        }
    }

    fn stats(&self) -> TierStats {
        let (bytes, entries) = {
            let index = self.lock();
            (index.bytes(), index.len() as u64)
        };
        self.counters.snapshot(bytes, entries)
    }

    fn pin(&self, key: &Key, until: Instant) -> bool {
        let now = Instant::now();
        let index = self.lock();
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        pins.retain(|_, t| *t > now);
        if index.peek(key).is_none() {
            return false;
        }
        if until > now {
            let t = pins.entry(*key).or_insert(until);
            *t = (*t).max(until);
        }
        true
    }

    fn unpin(&self, key: &Key) {
        self.pins.lock().unwrap_or_else(|e| e.into_inner()).remove(key);
    }
}

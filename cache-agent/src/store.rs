//! `CacheStore`: the node cache on disk, content-addressed and crash-safe, with an LRU byte
//! budget.
//!
//! Layout under the root:
//!
//! ```text
//! <root>/entries/<algorithm>-<hex>-<format>/disk.<format>   the disk
//! <root>/entries/<algorithm>-<hex>-<format>/meta.json       EntryMeta
//! <root>/staging/<random>/                                  work in progress
//! ```
//!
//! An entry becomes visible only by renaming a complete, fsynced directory from staging into
//! `entries/`. On open, staging is emptied and the index rebuilt from `entries/`; entries with
//! missing or unreadable metadata, or whose disk does not match it, are removed. Nothing
//! half-written is ever visible.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmdisk_crds::{parse_quantity, DiskFormat};

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cache budget {budget} bytes cannot hold {needed} more bytes: {evictable} bytes are evictable, the rest is pinned or in use")]
    NoRoom {
        needed: u64,
        budget: u64,
        evictable: u64,
    },
    #[error(
        "invalid budget {0:?}: use a quantity (200Gi) or a percentage of the filesystem (50%)"
    )]
    BadBudget(String),
    #[error("staging directory {0} is not inside this cache")]
    ForeignStaging(PathBuf),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// What an entry is: the image digest and the format it is stored in.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EntryKey {
    pub digest: String,
    pub format: DiskFormat,
}

impl fmt::Display for EntryKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.digest, self.format)
    }
}

impl EntryKey {
    /// The entry's directory name; `None` for digests that are not `<alg>:<hex>`, so a hostile
    /// digest can never name a path.
    pub fn dir_name(&self) -> Option<String> {
        let (alg, hex) = self.digest.split_once(':')?;
        let ok = !alg.is_empty()
            && alg.chars().all(|c| c.is_ascii_alphanumeric())
            && !hex.is_empty()
            && hex.chars().all(|c| c.is_ascii_hexdigit());
        ok.then(|| format!("{alg}-{hex}-{}", self.format))
    }

    fn from_dir_name(name: &str) -> Option<Self> {
        let (rest, format) = name.rsplit_once('-')?;
        let (alg, hex) = rest.split_once('-')?;
        let key = EntryKey {
            digest: format!("{alg}:{hex}"),
            format: format.parse().ok()?,
        };
        (key.dir_name()? == name).then_some(key)
    }
}

/// Metadata stored beside each disk (`meta.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryMeta {
    pub digest: String,
    pub format: DiskFormat,
    pub source_format: String,
    pub virtual_size: u64,
    pub allocated_size: u64,
    pub created: DateTime<Utc>,
    pub last_used: DateTime<Utc>,
    #[serde(default)]
    pub reference: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    pub key: EntryKey,
    pub meta: EntryMeta,
    pub disk_path: PathBuf,
}

/// How much the cache may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    Bytes(u64),
    PercentOfFilesystem(u8),
}

impl std::str::FromStr for Budget {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || StoreError::BadBudget(s.to_string());
        match s.trim().strip_suffix('%') {
            Some(p) => {
                let p: u8 = p.trim().parse().map_err(|_| bad())?;
                if p == 0 || p > 100 {
                    return Err(bad());
                }
                Ok(Budget::PercentOfFilesystem(p))
            }
            None => parse_quantity(s).map(Budget::Bytes).map_err(|_| bad()),
        }
    }
}

/// An entry as the eviction policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EvictionCandidate {
    pub key: EntryKey,
    pub size: u64,
    pub pinned: bool,
    pub leased: bool,
}

/// Which entries to evict so that `incoming` more bytes fit in `budget`. `candidates` are in
/// recency order, least recently used first. Pinned (cache policy) and leased (a populate is
/// copying from it) entries are never chosen.
pub fn plan_eviction(
    candidates: &[EvictionCandidate],
    used: u64,
    budget: u64,
    incoming: u64,
) -> Result<Vec<EntryKey>, StoreError> {
    let mut over = (used + incoming).saturating_sub(budget);
    if over == 0 {
        return Ok(Vec::new());
    }
    let evictable: u64 = candidates
        .iter()
        .filter(|c| !c.pinned && !c.leased)
        .map(|c| c.size)
        .sum();
    if evictable < over {
        return Err(StoreError::NoRoom {
            needed: incoming,
            budget,
            evictable,
        });
    }
    let mut out = Vec::new();
    for c in candidates.iter().filter(|c| !c.pinned && !c.leased) {
        if over == 0 {
            break;
        }
        out.push(c.key.clone());
        over = over.saturating_sub(c.size);
    }
    Ok(out)
}

struct Indexed {
    meta: EntryMeta,
    /// Bytes the entry directory occupies (allocated blocks).
    size: u64,
}

struct Inner {
    entries: HashMap<EntryKey, Indexed>,
    /// Recency: the most recently used entry is at the front.
    recency: LruCache<EntryKey, ()>,
    pinned: HashSet<EntryKey>,
    leases: HashMap<EntryKey, usize>,
}

/// The node cache. Cheap to share behind an `Arc`; all methods take `&self`.
pub struct CacheStore {
    root: PathBuf,
    budget: Budget,
    inner: Arc<Mutex<Inner>>,
    evictions: std::sync::atomic::AtomicU64,
}

/// What `open` cleaned up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenReport {
    pub removed_staging: usize,
    pub removed_corrupt: Vec<String>,
}

/// A directory in staging; deleted on drop unless committed.
pub struct StagingDir {
    path: PathBuf,
    committed: bool,
}

impl StagingDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Keeps an entry from eviction while held (a populate copying from it).
pub struct Lease {
    key: EntryKey,
    inner: Arc<Mutex<Inner>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut inner = self.inner.lock().expect("store lock poisoned");
        if let Some(n) = inner.leases.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                inner.leases.remove(&self.key);
            }
        }
    }
}

/// Bytes a path occupies on disk, recursively (holes not counted).
pub fn allocated_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)?;
    if meta.is_dir() {
        let mut total = meta.blocks() * 512;
        for e in std::fs::read_dir(path)? {
            total += allocated_bytes(&e?.path())?;
        }
        Ok(total)
    } else {
        Ok(meta.blocks() * 512)
    }
}

fn fsync_dir(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

fn random_name() -> String {
    format!("{:016x}", rand::random::<u64>())
}

const META_FILE: &str = "meta.json";

impl CacheStore {
    pub fn open(root: &Path, budget: Budget) -> Result<(Self, OpenReport), StoreError> {
        let entries_dir = root.join("entries");
        let staging_dir = root.join("staging");
        std::fs::create_dir_all(&entries_dir)
            .map_err(io(format!("creating {}", entries_dir.display())))?;
        std::fs::create_dir_all(&staging_dir)
            .map_err(io(format!("creating {}", staging_dir.display())))?;
        let mut report = OpenReport::default();
        for e in std::fs::read_dir(&staging_dir).map_err(io("listing staging"))? {
            let e = e.map_err(io("listing staging"))?;
            let _ = std::fs::remove_dir_all(e.path()).or_else(|_| std::fs::remove_file(e.path()));
            report.removed_staging += 1;
        }
        let mut loaded: Vec<(EntryKey, Indexed)> = Vec::new();
        for e in std::fs::read_dir(&entries_dir).map_err(io("listing entries"))? {
            let e = e.map_err(io("listing entries"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            match Self::load_entry(&e.path(), &name) {
                Some(entry) => loaded.push(entry),
                None => {
                    let _ = std::fs::remove_dir_all(e.path())
                        .or_else(|_| std::fs::remove_file(e.path()));
                    report.removed_corrupt.push(name);
                }
            }
        }
        // Rebuild recency from the recorded last use, oldest first so the newest ends in front.
        loaded.sort_by_key(|(_, i)| i.meta.last_used);
        let mut inner = Inner {
            entries: HashMap::new(),
            recency: LruCache::unbounded(),
            pinned: HashSet::new(),
            leases: HashMap::new(),
        };
        for (key, indexed) in loaded {
            inner.recency.put(key.clone(), ());
            inner.entries.insert(key, indexed);
        }
        Ok((
            Self {
                root: root.to_path_buf(),
                budget,
                inner: Arc::new(Mutex::new(inner)),
                evictions: std::sync::atomic::AtomicU64::new(0),
            },
            report,
        ))
    }

    /// Reads an entry directory; `None` when it is not a complete, consistent entry.
    fn load_entry(dir: &Path, name: &str) -> Option<(EntryKey, Indexed)> {
        let key = EntryKey::from_dir_name(name)?;
        let meta: EntryMeta =
            serde_json::from_slice(&std::fs::read(dir.join(META_FILE)).ok()?).ok()?;
        if meta.digest != key.digest || meta.format != key.format {
            return None;
        }
        let disk = dir.join(format!("disk.{}", key.format));
        let disk_meta = std::fs::metadata(&disk).ok()?;
        // A raw disk's length is its virtual size; a qcow2 file is never longer than that
        // plus metadata, and never empty.
        let consistent = match key.format {
            DiskFormat::Raw => disk_meta.len() == meta.virtual_size,
            DiskFormat::Qcow2 => disk_meta.len() > 0,
        };
        if !consistent {
            return None;
        }
        let size = allocated_bytes(dir).ok()?;
        Some((key, Indexed { meta, size }))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn entries_dir(&self) -> PathBuf {
        self.root.join("entries")
    }

    pub fn entry_dir(&self, key: &EntryKey) -> Option<PathBuf> {
        key.dir_name().map(|n| self.entries_dir().join(n))
    }

    fn disk_path(&self, key: &EntryKey) -> Option<PathBuf> {
        self.entry_dir(key)
            .map(|d| d.join(format!("disk.{}", key.format)))
    }

    /// A fresh directory in staging.
    pub fn staging(&self) -> Result<StagingDir, StoreError> {
        let path = self.root.join("staging").join(random_name());
        std::fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        Ok(StagingDir {
            path,
            committed: false,
        })
    }

    /// Makes `disk_file` (inside `staging`) the entry `key`: fsync, write metadata, rename into
    /// place. When the entry already exists (another warm won the race) the existing one is
    /// kept and the staging dropped.
    pub fn commit(
        &self,
        mut staging: StagingDir,
        key: EntryKey,
        disk_file: &Path,
        meta: EntryMeta,
    ) -> Result<CacheEntry, StoreError> {
        if !disk_file.starts_with(staging.path())
            || !staging.path().starts_with(self.root.join("staging"))
        {
            return Err(StoreError::ForeignStaging(disk_file.to_path_buf()));
        }
        if let Some(existing) = self.get(&key) {
            return Ok(existing);
        }
        let target_dir = self
            .entry_dir(&key)
            .ok_or_else(|| StoreError::BadBudget(format!("invalid digest {}", key.digest)))?;
        let build = staging.path().join("entry");
        std::fs::create_dir_all(&build).map_err(io("creating the entry in staging"))?;
        let disk_name = format!("disk.{}", key.format);
        std::fs::rename(disk_file, build.join(&disk_name))
            .map_err(io("moving the disk into the entry"))?;
        std::fs::File::open(build.join(&disk_name))
            .and_then(|f| f.sync_all())
            .map_err(io("fsyncing the disk"))?;
        let meta_path = build.join(META_FILE);
        std::fs::write(
            &meta_path,
            serde_json::to_vec_pretty(&meta).expect("meta serializes"),
        )
        .map_err(io("writing meta.json"))?;
        std::fs::File::open(&meta_path)
            .and_then(|f| f.sync_all())
            .map_err(io("fsyncing meta.json"))?;
        fsync_dir(&build).map_err(io("fsyncing the entry directory"))?;
        match std::fs::rename(&build, &target_dir) {
            Ok(()) => {}
            Err(e) if target_dir.exists() => {
                tracing::debug!(error = %e, "entry appeared concurrently; keeping the existing one");
            }
            Err(e) => return Err(io(format!("renaming into {}", target_dir.display()))(e)),
        }
        fsync_dir(&self.entries_dir()).map_err(io("fsyncing entries/"))?;
        staging.committed = false; // the rest of staging (layers, scratch) goes on drop
        let size = allocated_bytes(&target_dir).map_err(io("measuring the entry"))?;
        let entry = CacheEntry {
            key: key.clone(),
            meta: meta.clone(),
            disk_path: target_dir.join(disk_name),
        };
        let mut inner = self.inner.lock().expect("store lock poisoned");
        inner.recency.put(key.clone(), ());
        inner.entries.insert(key, Indexed { meta, size });
        Ok(entry)
    }

    pub fn get(&self, key: &EntryKey) -> Option<CacheEntry> {
        let inner = self.inner.lock().expect("store lock poisoned");
        let indexed = inner.entries.get(key)?;
        Some(CacheEntry {
            key: key.clone(),
            meta: indexed.meta.clone(),
            disk_path: self.disk_path(key)?,
        })
    }

    /// Marks the entry used now: front of the LRU, `lastUsed` persisted (best effort).
    pub fn touch(&self, key: &EntryKey) {
        let meta = {
            let mut inner = self.inner.lock().expect("store lock poisoned");
            let Some(indexed) = inner.entries.get_mut(key) else {
                return;
            };
            indexed.meta.last_used = Utc::now();
            let meta = indexed.meta.clone();
            inner.recency.promote(key);
            meta
        };
        if let Some(dir) = self.entry_dir(key) {
            let tmp = dir.join(format!(".{META_FILE}.{}", random_name()));
            let ok = std::fs::write(
                &tmp,
                serde_json::to_vec_pretty(&meta).expect("meta serializes"),
            )
            .and_then(|()| std::fs::rename(&tmp, dir.join(META_FILE)));
            if let Err(e) = ok {
                let _ = std::fs::remove_file(&tmp);
                tracing::debug!(error = %e, entry = %key, "could not persist last use");
            }
        }
    }

    pub fn lease(&self, key: &EntryKey) -> Option<Lease> {
        let mut inner = self.inner.lock().expect("store lock poisoned");
        if !inner.entries.contains_key(key) {
            return None;
        }
        *inner.leases.entry(key.clone()).or_insert(0) += 1;
        Some(Lease {
            key: key.clone(),
            inner: Arc::clone(&self.inner),
        })
    }

    pub fn is_leased(&self, key: &EntryKey) -> bool {
        self.inner
            .lock()
            .expect("store lock poisoned")
            .leases
            .contains_key(key)
    }

    /// Replaces the set of pinned entries (from the images' cache policies).
    pub fn set_pinned(&self, pinned: &HashSet<EntryKey>) {
        self.inner.lock().expect("store lock poisoned").pinned = pinned.clone();
    }

    pub fn is_pinned(&self, key: &EntryKey) -> bool {
        self.inner
            .lock()
            .expect("store lock poisoned")
            .pinned
            .contains(key)
    }

    /// Deletes an entry. Refused (false) while it is leased.
    pub fn remove(&self, key: &EntryKey) -> Result<bool, StoreError> {
        {
            let mut inner = self.inner.lock().expect("store lock poisoned");
            if inner.leases.contains_key(key) || inner.entries.remove(key).is_none() {
                return Ok(false);
            }
            inner.recency.pop(key);
        }
        if let Some(dir) = self.entry_dir(key) {
            // Rename first so a crash mid-delete leaves nothing that looks like an entry.
            let doomed = self
                .root
                .join("staging")
                .join(format!("evict-{}", random_name()));
            match std::fs::rename(&dir, &doomed) {
                Ok(()) => {
                    std::fs::remove_dir_all(&doomed).map_err(io("deleting an evicted entry"))?
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(format!("evicting {}", dir.display()))(e)),
            }
        }
        Ok(true)
    }

    /// Drops an entry from the index without touching the disk (it is already gone).
    pub fn forget(&self, key: &EntryKey) -> bool {
        let mut inner = self.inner.lock().expect("store lock poisoned");
        inner.recency.pop(key);
        inner.entries.remove(key).is_some()
    }

    pub fn entries(&self) -> Vec<CacheEntry> {
        let inner = self.inner.lock().expect("store lock poisoned");
        inner
            .entries
            .iter()
            .filter_map(|(k, i)| {
                Some(CacheEntry {
                    key: k.clone(),
                    meta: i.meta.clone(),
                    disk_path: self.disk_path(k)?,
                })
            })
            .collect()
    }

    pub fn used_bytes(&self) -> u64 {
        let inner = self.inner.lock().expect("store lock poisoned");
        inner.entries.values().map(|i| i.size).sum()
    }

    /// Size of the filesystem holding the cache.
    pub fn capacity_bytes(&self) -> u64 {
        statvfs(&self.root).map(|(total, _)| total).unwrap_or(0)
    }

    pub fn budget_bytes(&self) -> u64 {
        match self.budget {
            Budget::Bytes(b) => b,
            Budget::PercentOfFilesystem(p) => self.capacity_bytes() / 100 * p as u64,
        }
    }

    /// Entries evicted by the budget since open.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Evicts least recently used entries (never pinned or leased ones) until `incoming` more
    /// bytes fit in the budget. Returns what was evicted.
    pub fn make_room(&self, incoming: u64) -> Result<Vec<EntryKey>, StoreError> {
        let budget = self.budget_bytes();
        let plan = {
            let inner = self.inner.lock().expect("store lock poisoned");
            let used: u64 = inner.entries.values().map(|i| i.size).sum();
            // LruCache iterates most recent first.
            let candidates: Vec<EvictionCandidate> = inner
                .recency
                .iter()
                .rev()
                .filter_map(|(k, ())| {
                    let i = inner.entries.get(k)?;
                    Some(EvictionCandidate {
                        key: k.clone(),
                        size: i.size,
                        pinned: inner.pinned.contains(k),
                        leased: inner.leases.contains_key(k),
                    })
                })
                .collect();
            plan_eviction(&candidates, used, budget, incoming)?
        };
        let mut evicted = Vec::new();
        for key in plan {
            if self.remove(&key)? {
                self.evictions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(entry = %key, "evicted from the cache (LRU)");
                evicted.push(key);
            }
        }
        Ok(evicted)
    }
}

/// (total, available) bytes of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `s` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut s) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let frsize = s.f_frsize as u64;
    Ok((s.f_blocks as u64 * frsize, s.f_bavail as u64 * frsize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8, format: DiskFormat) -> EntryKey {
        EntryKey {
            digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            format,
        }
    }

    fn cand(n: u8, size: u64, pinned: bool, leased: bool) -> EvictionCandidate {
        EvictionCandidate {
            key: key(n, DiskFormat::Raw),
            size,
            pinned,
            leased,
        }
    }

    #[test]
    fn eviction_takes_least_recent_first_and_stops_when_it_fits() {
        let c = [
            cand(1, 10, false, false),
            cand(2, 10, false, false),
            cand(3, 10, false, false),
        ];
        assert_eq!(
            plan_eviction(&c, 30, 100, 50).unwrap(),
            Vec::<EntryKey>::new()
        );
        assert_eq!(
            plan_eviction(&c, 30, 30, 5).unwrap(),
            vec![key(1, DiskFormat::Raw)]
        );
        assert_eq!(
            plan_eviction(&c, 30, 30, 15).unwrap(),
            vec![key(1, DiskFormat::Raw), key(2, DiskFormat::Raw)]
        );
    }

    #[test]
    fn eviction_skips_pinned_and_leased_and_reports_no_room() {
        let c = [
            cand(1, 10, true, false),
            cand(2, 10, false, true),
            cand(3, 10, false, false),
        ];
        assert_eq!(
            plan_eviction(&c, 30, 30, 5).unwrap(),
            vec![key(3, DiskFormat::Raw)]
        );
        match plan_eviction(&c, 30, 30, 15) {
            Err(StoreError::NoRoom { evictable, .. }) => assert_eq!(evictable, 10),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            plan_eviction(&[], 0, 10, 11),
            Err(StoreError::NoRoom { .. })
        ));
    }

    #[test]
    fn budget_parses() {
        assert_eq!(
            "50%".parse::<Budget>().unwrap(),
            Budget::PercentOfFilesystem(50)
        );
        assert_eq!("1Gi".parse::<Budget>().unwrap(), Budget::Bytes(1 << 30));
        assert!("0%".parse::<Budget>().is_err());
        assert!("150%".parse::<Budget>().is_err());
        assert!("lots".parse::<Budget>().is_err());
    }

    #[test]
    fn keys_round_trip_dir_names_and_refuse_hostile_digests() {
        let k = key(7, DiskFormat::Qcow2);
        assert_eq!(EntryKey::from_dir_name(&k.dir_name().unwrap()), Some(k));
        let hostile = EntryKey {
            digest: "sha256:../../etc".into(),
            format: DiskFormat::Raw,
        };
        assert_eq!(hostile.dir_name(), None);
        assert_eq!(EntryKey::from_dir_name("sha256-zz-raw"), None);
    }

    fn meta(k: &EntryKey, virtual_size: u64) -> EntryMeta {
        EntryMeta {
            digest: k.digest.clone(),
            format: k.format,
            source_format: "raw".into(),
            virtual_size,
            allocated_size: virtual_size,
            created: Utc::now(),
            last_used: Utc::now(),
            reference: None,
        }
    }

    /// Commits a raw entry of `len` bytes of data.
    fn commit_raw(store: &CacheStore, n: u8, len: usize) -> EntryKey {
        let k = key(n, DiskFormat::Raw);
        let staging = store.staging().unwrap();
        let disk = staging.path().join("d.raw");
        std::fs::write(&disk, vec![n.max(1); len]).unwrap();
        store
            .commit(staging, k.clone(), &disk, meta(&k, len as u64))
            .unwrap();
        k
    }

    #[test]
    fn commit_get_reopen_and_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        let (store, report) = CacheStore::open(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        assert_eq!(report, OpenReport::default());
        let k = commit_raw(&store, 1, 8192);
        let e = store.get(&k).unwrap();
        assert_eq!(std::fs::read(&e.disk_path).unwrap().len(), 8192);
        assert!(
            std::fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .next()
                .is_none(),
            "staging must be empty after commit"
        );

        // Leftovers of a crash: a staging dir, an entry dir without meta, a truncated disk.
        std::fs::create_dir_all(dir.path().join("staging/abandoned/layers")).unwrap();
        let half = key(2, DiskFormat::Raw).dir_name().unwrap();
        std::fs::create_dir_all(dir.path().join("entries").join(&half)).unwrap();
        let k3 = commit_raw(&store, 3, 4096);
        let d3 = store.get(&k3).unwrap().disk_path;
        std::fs::write(&d3, b"short").unwrap();
        drop(store);

        let (store, report) = CacheStore::open(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        assert_eq!(report.removed_staging, 1);
        assert_eq!(report.removed_corrupt.len(), 2, "{report:?}");
        assert!(store.get(&k).is_some());
        assert!(store.get(&k3).is_none());
        assert_eq!(store.entries().len(), 1);
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CacheStore::open(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        let s = store.staging().unwrap();
        std::fs::write(s.path().join("x"), b"data").unwrap();
        drop(s);
        assert!(std::fs::read_dir(dir.path().join("staging"))
            .unwrap()
            .next()
            .is_none());
        assert!(std::fs::read_dir(dir.path().join("entries"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn budget_evicts_lru_and_keeps_pinned_and_leased() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CacheStore::open(dir.path(), Budget::Bytes(1 << 20)).unwrap();
        let k1 = commit_raw(&store, 1, 256 << 10);
        let k2 = commit_raw(&store, 2, 256 << 10);
        let k3 = commit_raw(&store, 3, 256 << 10);
        store.touch(&k1); // k2 is now the least recent
        store.set_pinned(&[k2.clone()].into());
        let lease = store.lease(&k3).unwrap();
        let k4 = commit_raw(&store, 4, 256 << 10);
        let evicted = store.make_room(200 << 10).unwrap();
        assert_eq!(
            evicted,
            vec![k1.clone()],
            "only unpinned, unleased entries go, LRU first"
        );
        assert!(store.get(&k2).is_some() && store.get(&k3).is_some() && store.get(&k4).is_some());
        assert!(store.entry_dir(&k1).map(|d| !d.exists()).unwrap());
        assert!(matches!(
            store.make_room(2 << 20),
            Err(StoreError::NoRoom { .. })
        ));
        assert!(!store.remove(&k3).unwrap(), "a leased entry is not removed");
        drop(lease);
        assert!(store.remove(&k3).unwrap());
    }

    #[test]
    fn recency_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CacheStore::open(dir.path(), Budget::Bytes(1 << 20)).unwrap();
        let k1 = commit_raw(&store, 1, 300 << 10);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let k2 = commit_raw(&store, 2, 300 << 10);
        std::thread::sleep(std::time::Duration::from_millis(5));
        store.touch(&k1);
        drop(store);
        let (store, _) = CacheStore::open(dir.path(), Budget::Bytes(700 << 10)).unwrap();
        assert_eq!(store.make_room(200 << 10).unwrap(), vec![k2]);
        assert!(store.get(&k1).is_some());
    }
}

//! `CacheStore`: the node cache on disk, content-addressed and crash-safe, with an LRU byte
//! budget.
//!
//! Layout under the root (default `/var/lib/vmdisk/cache`):
//!
//! ```text
//! <root>/entries/<algorithm>-<hex>-<format>/disk.<format>   the disk (raw or qcow2)
//! <root>/entries/<algorithm>-<hex>-<format>/meta.json       EntryMeta + the disk's length
//! <root>/staging/<random>/                                  work in progress
//! <root>/staging/<random>.lock                              held by whoever works there
//! <root>/leases/<algorithm>-<hex>-<format>.lock             shared by processes copying out
//! <root>/locks/<algorithm>-<hex>-<format>.lock              held while the entry is warmed
//! <root>/owner.lock                                         held by the owning agent
//! ```
//!
//! Several processes share a node's cache: the agent that **owns** it (the only one that
//! cleans staging and evicts) and **guests** (populator pods) that copy entries out and, when
//! an entry is cold, warm it themselves. They coordinate with `flock` locks, which die with
//! their process: a staging directory is removed only when its lock is free (its writer is
//! gone); a guest copying an entry holds a shared lease lock, which eviction must take
//! exclusively; one process at a time warms an entry, and the others find it committed.
//!
//! One flat directory per entry (rather than `<algo>/<hex>/<format>/`) so that creating and
//! deleting an entry is a single rename of a single directory.
//!
//! An entry becomes visible only by renaming a complete directory from staging into
//! `entries/`, after the disk, `meta.json` and the directory itself were fsynced; `entries/`
//! is fsynced after the rename. Deleting goes the other way: the entry directory is renamed
//! into staging first, then removed. On open, staging is emptied and the index rebuilt from
//! `entries/`; directories with a foreign name, missing or unreadable metadata, or a disk whose
//! length disagrees with the metadata are removed and reported. Nothing half-written is ever
//! visible.
//!
//! Sizes are allocated bytes (`st_blocks * 512`), since disks are sparse.

pub mod lock;
pub mod watch;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use chrono::{DateTime, Utc};
use lru::LruCache;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use vmdisk_crds::{parse_quantity, DiskFormat};

use self::lock::FileLock;

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cache budget of {budget} bytes cannot take {needed} more bytes ({used} used): only {evictable} bytes are evictable, the rest is pinned or in use")]
    NoRoom {
        needed: u64,
        used: u64,
        budget: u64,
        evictable: u64,
    },
    #[error("invalid cache budget {0:?}: use a quantity (200Gi) or a percentage of the filesystem (1% to 100%)")]
    BadBudget(String),
    #[error("invalid digest {0:?}: expected <algorithm>:<hex>")]
    BadDigest(String),
    #[error("cannot commit {key}: {problem}")]
    Inconsistent { key: String, problem: String },
    #[error("{0} is not inside this cache's staging area")]
    ForeignStaging(PathBuf),
    #[error("cache {0} is owned by another running vmdisk-cache-agent (only one agent per cache directory)")]
    Owned(PathBuf),
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

    /// The key an entry directory name stands for; `None` for anything `dir_name` would not
    /// produce.
    pub fn from_dir_name(name: &str) -> Option<Self> {
        let (rest, format) = name.rsplit_once('-')?;
        let (alg, hex) = rest.split_once('-')?;
        let key = EntryKey {
            digest: format!("{alg}:{hex}"),
            format: format.parse().ok()?,
        };
        (key.dir_name()? == name).then_some(key)
    }

    fn disk_file_name(&self) -> String {
        format!("disk.{}", self.format)
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

/// `meta.json` as written: the metadata plus the disk file's length at commit, which is what
/// open checks a qcow2 disk against (its virtual size says nothing about its file length).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaFile {
    #[serde(flatten)]
    meta: EntryMeta,
    disk_length: u64,
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
    /// Allocated bytes the entry occupies.
    pub size: u64,
    /// Carried for logs; the order of the candidates is what decides.
    pub last_used: DateTime<Utc>,
    pub pinned: bool,
    pub leased: bool,
}

/// The budget cannot take the incoming bytes even after evicting everything evictable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoRoom {
    pub needed: u64,
    pub used: u64,
    pub budget: u64,
    pub evictable: u64,
}

impl From<NoRoom> for StoreError {
    fn from(n: NoRoom) -> Self {
        StoreError::NoRoom {
            needed: n.needed,
            used: n.used,
            budget: n.budget,
            evictable: n.evictable,
        }
    }
}

/// Which entries to evict so that `incoming` more bytes fit in `budget` given `used`.
/// `candidates` are in recency order, least recently used first. Pinned (cache policy) and
/// leased (a populate is copying from it) entries are never chosen. Nothing is chosen when the
/// bytes cannot fit anyway, so an impossible request evicts nothing.
pub fn plan_eviction(
    candidates: &[EvictionCandidate],
    used: u64,
    budget: u64,
    incoming: u64,
) -> Result<Vec<EntryKey>, NoRoom> {
    let mut over = used.saturating_add(incoming).saturating_sub(budget);
    if over == 0 {
        return Ok(Vec::new());
    }
    let evictable = || candidates.iter().filter(|c| !c.pinned && !c.leased);
    let evictable_bytes: u64 = evictable().map(|c| c.size).sum();
    if evictable_bytes < over {
        return Err(NoRoom {
            needed: incoming,
            used,
            budget,
            evictable: evictable_bytes,
        });
    }
    let mut out = Vec::new();
    for c in evictable() {
        if over == 0 {
            break;
        }
        out.push(c.key.clone());
        over = over.saturating_sub(c.size);
    }
    Ok(out)
}

/// What identifies the disk file as it was committed: an external write changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStamp {
    pub len: u64,
    pub modified: Option<SystemTime>,
}

impl DiskStamp {
    fn of(metadata: &std::fs::Metadata) -> Self {
        DiskStamp {
            len: metadata.len(),
            modified: metadata.modified().ok(),
        }
    }
}

/// The state of an entry's `meta.json` as found on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaState {
    /// Readable and describing this entry.
    Valid,
    Missing,
    Unreadable(String),
}

/// An entry directory as found on disk, for `judge_entry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryObservation {
    pub dir_exists: bool,
    pub meta: MetaState,
    /// `None` when the disk file is gone.
    pub disk: Option<DiskStamp>,
    /// Something wrote into the disk file (a data-modify event on it). The store itself never
    /// writes a disk once it is in `entries/`.
    pub disk_written: bool,
}

/// Why an entry was dropped from the cache behind the agent's back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LossReason {
    EntryDeleted,
    DiskDeleted,
    MetaDeleted,
    MetaUnreadable(String),
    DiskResized { recorded: u64, found: u64 },
    DiskModified,
}

impl fmt::Display for LossReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LossReason::EntryDeleted => f.write_str("the entry directory was deleted"),
            LossReason::DiskDeleted => f.write_str("the disk file was deleted"),
            LossReason::MetaDeleted => f.write_str("meta.json was deleted"),
            LossReason::MetaUnreadable(why) => write!(f, "meta.json is unreadable: {why}"),
            LossReason::DiskResized { recorded, found } => {
                write!(
                    f,
                    "the disk file changed length from {recorded} to {found} bytes"
                )
            }
            LossReason::DiskModified => f.write_str("the disk file was modified"),
        }
    }
}

/// Whether an entry recorded with `recorded` is still intact given what is on disk.
pub fn judge_entry(recorded: &DiskStamp, observed: &EntryObservation) -> Option<LossReason> {
    if !observed.dir_exists {
        return Some(LossReason::EntryDeleted);
    }
    let Some(disk) = observed.disk else {
        return Some(LossReason::DiskDeleted);
    };
    match &observed.meta {
        MetaState::Valid => {}
        MetaState::Missing => return Some(LossReason::MetaDeleted),
        MetaState::Unreadable(why) => return Some(LossReason::MetaUnreadable(why.clone())),
    }
    if disk.len != recorded.len {
        return Some(LossReason::DiskResized {
            recorded: recorded.len,
            found: disk.len,
        });
    }
    if observed.disk_written || disk.modified != recorded.modified {
        return Some(LossReason::DiskModified);
    }
    None
}

struct Indexed {
    meta: EntryMeta,
    /// Bytes the entry directory occupies (allocated blocks).
    size: u64,
    disk: DiskStamp,
}

struct Inner {
    entries: HashMap<EntryKey, Indexed>,
    /// Recency: the most recently used entry is at the front.
    recency: LruCache<EntryKey, ()>,
    pinned: HashSet<EntryKey>,
}

fn lock_inner(inner: &Mutex<Inner>) -> MutexGuard<'_, Inner> {
    // The index stays consistent across a panic elsewhere (every update is a single insert or
    // remove), so a poisoned lock is still usable.
    inner.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a process uses a shared cache directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreRole {
    /// Cleans staging and evicts (the node's agent; `warm` and `ls` when no agent runs).
    Owner,
    /// Reads, leases and commits, never cleans or evicts (populator pods).
    Guest,
}

/// The node cache. `Send + Sync`; share it behind an `Arc`. All methods take `&self`.
pub struct CacheStore {
    root: PathBuf,
    budget: Budget,
    role: StoreRole,
    inner: Arc<Mutex<Inner>>,
    evictions: AtomicU64,
    _owner: Option<FileLock>,
}

/// What `open` cleaned up.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Abandoned staging directories (their writer is gone) removed.
    pub removed_staging: usize,
    /// Staging directories left alone because another process is still working in them.
    pub busy_staging: usize,
    /// `<entry directory>: <what was wrong>` for each removed entry.
    pub removed_corrupt: Vec<String>,
}

/// A directory in staging, deleted on drop. `commit` moves the finished entry out of it
/// first, so whatever else was left in it (layers, scratch files) goes with it. Its lock tells
/// the owner's cleanup that somebody still works here.
pub struct StagingDir {
    path: PathBuf,
    lock: FileLock,
}

impl StagingDir {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.path.display(), error = %e, "could not delete a staging directory; the owner's next start removes it");
            }
        }
        self.lock.remove_file();
    }
}

/// Keeps an entry from eviction while held (a populate copying from it), in this process or
/// any other: a shared lock on the entry's lease file, which eviction must take exclusively.
pub struct Lease {
    key: EntryKey,
    _lock: FileLock,
}

impl Lease {
    pub fn key(&self) -> &EntryKey {
        &self.key
    }
}

/// Bytes a path occupies on disk, recursively (holes not counted).
pub fn allocated_bytes(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path)?;
    let mut total = meta.blocks() * 512;
    if meta.is_dir() {
        for e in std::fs::read_dir(path)? {
            total += allocated_bytes(&e?.path())?;
        }
    }
    Ok(total)
}

fn fsync_path(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

fn random_name() -> String {
    format!("{:016x}", rand::random::<u64>())
}

fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

const META_FILE: &str = "meta.json";
const META_TMP_PREFIX: &str = ".meta.json.";

/// Reads and checks `meta.json` of the entry `key` in `dir`.
fn read_meta(dir: &Path, key: &EntryKey) -> Result<MetaFile, MetaState> {
    let bytes = match std::fs::read(dir.join(META_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(MetaState::Missing),
        Err(e) => return Err(MetaState::Unreadable(e.to_string())),
    };
    let file: MetaFile =
        serde_json::from_slice(&bytes).map_err(|e| MetaState::Unreadable(e.to_string()))?;
    if file.meta.digest != key.digest || file.meta.format != key.format {
        return Err(MetaState::Unreadable(format!(
            "it describes {}/{}, not {key}",
            file.meta.digest, file.meta.format
        )));
    }
    Ok(file)
}

/// The problem that makes a raw disk of `len` bytes disagree with `meta`, if any.
fn raw_length_problem(meta: &EntryMeta, len: u64) -> Option<String> {
    (meta.format == DiskFormat::Raw && len != meta.virtual_size).then(|| {
        format!(
            "raw disk is {len} bytes but its virtual size is {} bytes",
            meta.virtual_size
        )
    })
}

#[cfg(test)]
fn crash_point(name: &str) {
    tests::crash_point(name);
}

#[cfg(not(test))]
fn crash_point(_name: &str) {}

impl CacheStore {
    /// Opens the cache as its owner: cleans abandoned staging, removes broken entries, evicts.
    /// Fails when another process owns it.
    pub fn open(root: &Path, budget: Budget) -> Result<(Self, OpenReport), StoreError> {
        Self::open_as(root, budget, StoreRole::Owner)
    }

    /// Opens the cache as a guest: reads, leases and commits; leaves cleaning and eviction to
    /// the owner.
    pub fn open_guest(root: &Path) -> Result<Self, StoreError> {
        Self::open_as(root, Budget::PercentOfFilesystem(100), StoreRole::Guest).map(|(s, _)| s)
    }

    /// Opens as the owner when nobody owns the cache, as a guest otherwise (command-line use
    /// on a node where an agent may be running).
    pub fn open_shared(root: &Path, budget: Budget) -> Result<(Self, OpenReport), StoreError> {
        match Self::open_as(root, budget, StoreRole::Owner) {
            Err(StoreError::Owned(_)) => Self::open_as(root, budget, StoreRole::Guest),
            other => other,
        }
    }

    pub fn role(&self) -> StoreRole {
        self.role
    }

    fn open_as(
        root: &Path,
        budget: Budget,
        role: StoreRole,
    ) -> Result<(Self, OpenReport), StoreError> {
        let entries_dir = root.join("entries");
        let staging_dir = root.join("staging");
        for dir in [
            entries_dir.clone(),
            staging_dir.clone(),
            root.join("leases"),
            root.join("locks"),
        ] {
            std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let owner = match role {
            StoreRole::Owner => Some(
                lock::try_lock(&root.join("owner.lock"), true)
                    .map_err(io(format!("locking {}", root.display())))?
                    .ok_or_else(|| StoreError::Owned(root.to_path_buf()))?,
            ),
            StoreRole::Guest => None,
        };
        let mut report = OpenReport::default();
        let listing = |dir: &Path| {
            std::fs::read_dir(dir)
                .and_then(|d| d.collect::<Result<Vec<_>, _>>())
                .map_err(io(format!("listing {}", dir.display())))
        };
        if role == StoreRole::Owner {
            report = Self::clean_staging(&staging_dir)?;
        }
        let mut loaded: Vec<(EntryKey, Indexed)> = Vec::new();
        for e in listing(&entries_dir)? {
            let name = e.file_name().to_string_lossy().into_owned();
            match Self::load_entry(&e.path(), &name) {
                Ok(entry) => loaded.push(entry),
                Err(problem) if role == StoreRole::Guest => {
                    tracing::debug!(entry = %name, %problem, "skipping a broken cache entry (the owner removes it)");
                }
                Err(problem) => {
                    tracing::warn!(entry = %name, %problem, "removing a broken cache entry");
                    remove_any(&e.path())
                        .map_err(io(format!("removing {}", e.path().display())))?;
                    report.removed_corrupt.push(format!("{name}: {problem}"));
                }
            }
        }
        if !report.removed_corrupt.is_empty() {
            fsync_path(&entries_dir).map_err(io(format!("fsyncing {}", entries_dir.display())))?;
        }
        // Rebuild recency from the recorded last use, oldest first so the newest ends in front.
        loaded.sort_by(|(ka, a), (kb, b)| a.meta.last_used.cmp(&b.meta.last_used).then(ka.cmp(kb)));
        let mut inner = Inner {
            entries: HashMap::new(),
            recency: LruCache::unbounded(),
            pinned: HashSet::new(),
        };
        for (key, indexed) in loaded {
            inner.recency.put(key.clone(), ());
            inner.entries.insert(key, indexed);
        }
        Ok((
            Self {
                root: root.to_path_buf(),
                budget,
                role,
                inner: Arc::new(Mutex::new(inner)),
                evictions: AtomicU64::new(0),
                _owner: owner,
            },
            report,
        ))
    }

    /// Removes what writers that died since left in staging (a populator pod killed with its
    /// PVC). Owners only; guests never clean.
    pub fn clean_abandoned_staging(&self) -> Result<OpenReport, StoreError> {
        match self.role {
            StoreRole::Owner => Self::clean_staging(&self.staging_root()),
            StoreRole::Guest => Ok(OpenReport::default()),
        }
    }

    /// Removes what crashed writers left in staging: directories whose lock is free. A
    /// directory whose writer still runs (a populator pod warming) keeps its lock and stays.
    fn clean_staging(staging: &Path) -> Result<OpenReport, StoreError> {
        let mut report = OpenReport::default();
        let children: Vec<PathBuf> = std::fs::read_dir(staging)
            .and_then(|d| d.map(|e| e.map(|e| e.path())).collect())
            .map_err(io(format!("listing {}", staging.display())))?;
        let is_lock = |p: &Path| p.extension().is_some_and(|e| e == "lock");
        for path in children.iter().filter(|p| !is_lock(p)) {
            let lock_path = path.with_extension("lock");
            match lock::try_lock(&lock_path, true)
                .map_err(io(format!("locking {}", lock_path.display())))?
            {
                Some(held) => {
                    remove_any(path).map_err(io(format!("removing {}", path.display())))?;
                    held.remove_file();
                    report.removed_staging += 1;
                }
                None => report.busy_staging += 1,
            }
        }
        // Locks of writers that finished without removing them.
        for path in children.iter().filter(|p| is_lock(p)) {
            if !path.with_extension("").exists() {
                if let Some(held) =
                    lock::try_lock(path, true).map_err(io(format!("locking {}", path.display())))?
                {
                    held.remove_file();
                }
            }
        }
        Ok(report)
    }

    /// Reads an entry directory; the problem when it is not a complete, consistent entry.
    fn load_entry(dir: &Path, name: &str) -> Result<(EntryKey, Indexed), String> {
        let key = EntryKey::from_dir_name(name).ok_or_else(|| {
            "not an entry directory name (<algorithm>-<hex>-<format>)".to_string()
        })?;
        if !dir.is_dir() {
            return Err("not a directory".into());
        }
        let file = read_meta(dir, &key).map_err(|state| match state {
            MetaState::Missing => "meta.json is missing".to_string(),
            MetaState::Unreadable(why) => format!("meta.json is unreadable: {why}"),
            MetaState::Valid => unreachable!("read_meta never fails with Valid"),
        })?;
        let disk_path = dir.join(key.disk_file_name());
        let disk_meta = std::fs::metadata(&disk_path)
            .map_err(|e| format!("disk file {}: {e}", key.disk_file_name()))?;
        if disk_meta.len() != file.disk_length {
            return Err(format!(
                "disk is {} bytes but meta.json records {} bytes",
                disk_meta.len(),
                file.disk_length
            ));
        }
        if let Some(problem) = raw_length_problem(&file.meta, disk_meta.len()) {
            return Err(problem);
        }
        // A crashed `touch` may leave its temporary file behind.
        if let Ok(list) = std::fs::read_dir(dir) {
            for e in list.flatten() {
                if e.file_name().to_string_lossy().starts_with(META_TMP_PREFIX) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let size = allocated_bytes(dir).map_err(|e| format!("measuring: {e}"))?;
        Ok((
            key,
            Indexed {
                meta: file.meta,
                size,
                disk: DiskStamp::of(&disk_meta),
            },
        ))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn entries_dir(&self) -> PathBuf {
        self.root.join("entries")
    }

    fn staging_root(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// The entry's directory; `None` for a digest that is not `<algorithm>:<hex>`.
    pub fn entry_dir(&self, key: &EntryKey) -> Option<PathBuf> {
        key.dir_name().map(|n| self.entries_dir().join(n))
    }

    fn disk_path(&self, key: &EntryKey) -> Option<PathBuf> {
        self.entry_dir(key).map(|d| d.join(key.disk_file_name()))
    }

    /// A fresh directory in staging, locked before it exists so the owner's cleanup never
    /// takes it for abandoned.
    pub fn staging(&self) -> Result<StagingDir, StoreError> {
        let name = random_name();
        let lock_path = self.staging_root().join(format!("{name}.lock"));
        let lock = lock::try_lock(&lock_path, true)
            .map_err(io(format!("locking {}", lock_path.display())))?
            .ok_or_else(|| StoreError::Io {
                context: format!("locking {}", lock_path.display()),
                source: std::io::Error::from(std::io::ErrorKind::WouldBlock),
            })?;
        let path = self.staging_root().join(name);
        std::fs::create_dir_all(&path).map_err(io(format!("creating {}", path.display())))?;
        Ok(StagingDir { path, lock })
    }

    fn lease_path(&self, key: &EntryKey) -> Option<PathBuf> {
        key.dir_name()
            .map(|n| self.root.join("leases").join(format!("{n}.lock")))
    }

    /// Waits until no other process warms `key` and holds that right until the guard drops:
    /// warms of one entry are single-flight across processes sharing the cache.
    pub async fn warm_lock(&self, key: &EntryKey) -> Result<FileLock, StoreError> {
        let name = key
            .dir_name()
            .ok_or_else(|| StoreError::BadDigest(key.digest.clone()))?;
        let path = self.root.join("locks").join(format!("{name}.lock"));
        lock::lock_async(&path, true)
            .await
            .map_err(io(format!("locking {}", path.display())))
    }

    /// The entry, from the index or, when another process committed it meanwhile, from disk.
    pub fn get_or_adopt(&self, key: &EntryKey) -> Option<CacheEntry> {
        if let Some(e) = self.get(key) {
            return Some(e);
        }
        let dir = self.entry_dir(key)?;
        if !dir.is_dir() {
            return None;
        }
        self.adopt(key, &dir).ok()
    }

    /// Makes `disk_file` (inside `staging`) the entry `key`: fsync, write metadata, rename into
    /// place. When the entry already exists (another warm won the race) the existing one is
    /// kept and the staging dropped.
    pub fn commit(
        &self,
        staging: StagingDir,
        key: EntryKey,
        disk_file: &Path,
        meta: EntryMeta,
    ) -> Result<CacheEntry, StoreError> {
        if !staging.path().starts_with(self.staging_root()) {
            return Err(StoreError::ForeignStaging(staging.path().to_path_buf()));
        }
        if !disk_file.starts_with(staging.path()) {
            return Err(StoreError::ForeignStaging(disk_file.to_path_buf()));
        }
        let target_dir = self
            .entry_dir(&key)
            .ok_or_else(|| StoreError::BadDigest(key.digest.clone()))?;
        let inconsistent = |problem: String| StoreError::Inconsistent {
            key: key.to_string(),
            problem,
        };
        if meta.digest != key.digest || meta.format != key.format {
            return Err(inconsistent(format!(
                "the metadata describes {}/{}",
                meta.digest, meta.format
            )));
        }
        if let Some(existing) = self.get(&key) {
            return Ok(existing);
        }
        let disk_len = std::fs::metadata(disk_file)
            .map_err(io(format!("reading {}", disk_file.display())))?
            .len();
        if let Some(problem) = raw_length_problem(&meta, disk_len) {
            return Err(inconsistent(problem));
        }

        let build = staging.path().join(format!("entry-{}", random_name()));
        std::fs::create_dir(&build).map_err(io(format!("creating {}", build.display())))?;
        let disk_name = key.disk_file_name();
        let built_disk = build.join(&disk_name);
        std::fs::rename(disk_file, &built_disk)
            .map_err(io(format!("moving {} into the entry", disk_file.display())))?;
        fsync_path(&built_disk).map_err(io("fsyncing the disk"))?;
        let meta_path = build.join(META_FILE);
        let file = MetaFile {
            meta,
            disk_length: disk_len,
        };
        std::fs::write(
            &meta_path,
            serde_json::to_vec_pretty(&file).expect("meta serializes"),
        )
        .map_err(io("writing meta.json"))?;
        fsync_path(&meta_path).map_err(io("fsyncing meta.json"))?;
        fsync_path(&build).map_err(io("fsyncing the entry directory"))?;
        crash_point("before-rename");
        // Renamed and indexed under the lock: the cache watcher, which adopts entries other
        // processes commit, must never take this one for a stranger's.
        let mut inner = lock_inner(&self.inner);
        match std::fs::rename(&build, &target_dir) {
            Ok(()) => {}
            // Another process or thread committed the same entry first: keep theirs.
            Err(e) if target_dir.is_dir() => {
                drop(inner);
                tracing::debug!(entry = %key, error = %e, "entry appeared concurrently; keeping the existing one");
                return self.adopt(&key, &target_dir);
            }
            Err(e) => return Err(io(format!("renaming into {}", target_dir.display()))(e)),
        }
        fsync_path(&self.entries_dir()).map_err(io("fsyncing entries/"))?;
        let size = allocated_bytes(&target_dir).map_err(io("measuring the entry"))?;
        let disk = std::fs::metadata(target_dir.join(&disk_name))
            .map(|m| DiskStamp::of(&m))
            .map_err(io("reading the committed disk"))?;
        let entry = CacheEntry {
            key: key.clone(),
            meta: file.meta.clone(),
            disk_path: target_dir.join(disk_name),
        };
        inner.recency.put(key.clone(), ());
        inner.entries.insert(
            key,
            Indexed {
                meta: file.meta,
                size,
                disk,
            },
        );
        drop(inner);
        drop(staging);
        Ok(entry)
    }

    /// Indexes an entry someone else committed into `dir`.
    fn adopt(&self, key: &EntryKey, dir: &Path) -> Result<CacheEntry, StoreError> {
        if let Some(existing) = self.get(key) {
            return Ok(existing);
        }
        let name = key
            .dir_name()
            .ok_or_else(|| StoreError::BadDigest(key.digest.clone()))?;
        let (key, indexed) =
            Self::load_entry(dir, &name).map_err(|problem| StoreError::Inconsistent {
                key: key.to_string(),
                problem: format!("the concurrently committed entry is broken: {problem}"),
            })?;
        let entry = CacheEntry {
            key: key.clone(),
            meta: indexed.meta.clone(),
            disk_path: dir.join(key.disk_file_name()),
        };
        let mut inner = lock_inner(&self.inner);
        inner.recency.put(key.clone(), ());
        inner.entries.entry(key).or_insert(indexed);
        Ok(entry)
    }

    /// The entry, without counting this as a use.
    pub fn get(&self, key: &EntryKey) -> Option<CacheEntry> {
        let inner = lock_inner(&self.inner);
        let indexed = inner.entries.get(key)?;
        Some(CacheEntry {
            key: key.clone(),
            meta: indexed.meta.clone(),
            disk_path: self.disk_path(key)?,
        })
    }

    /// Marks the entry used now: front of the LRU, `lastUsed` persisted (best effort).
    pub fn touch(&self, key: &EntryKey) {
        let file = {
            let mut inner = lock_inner(&self.inner);
            let Some(indexed) = inner.entries.get_mut(key) else {
                return;
            };
            indexed.meta.last_used = Utc::now();
            let file = MetaFile {
                meta: indexed.meta.clone(),
                disk_length: indexed.disk.len,
            };
            inner.recency.promote(key);
            file
        };
        let Some(dir) = self.entry_dir(key) else {
            return;
        };
        // Write-then-rename so meta.json is never seen half-written.
        let tmp = dir.join(format!("{META_TMP_PREFIX}{}", random_name()));
        let written = std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(&file).expect("meta serializes"),
        )
        .and_then(|()| std::fs::rename(&tmp, dir.join(META_FILE)));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(error = %e, entry = %key, "could not persist the last use");
        }
    }

    /// Keeps the entry from eviction (by any process) until the lease is dropped; `None` when
    /// it is not cached. Waits while the owner is evicting the entry.
    pub fn lease(&self, key: &EntryKey) -> Option<Lease> {
        let path = self.lease_path(key)?;
        let held = match lock::lock(&path, false) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(entry = %key, error = %e, "cannot take a lease");
                return None;
            }
        };
        // The owner may have evicted it just before we got the lock.
        self.get_or_adopt(key)
            .filter(|e| e.disk_path.exists())
            .map(|_| Lease {
                key: key.clone(),
                _lock: held,
            })
    }

    /// True while some process (this one included) holds a lease on the entry.
    pub fn is_leased(&self, key: &EntryKey) -> bool {
        let Some(path) = self.lease_path(key) else {
            return false;
        };
        !matches!(lock::try_lock(&path, true), Ok(Some(_)))
    }

    /// Replaces the set of pinned entries (from the images' cache policies).
    pub fn set_pinned(&self, pinned: &HashSet<EntryKey>) {
        lock_inner(&self.inner).pinned = pinned.clone();
    }

    pub fn is_pinned(&self, key: &EntryKey) -> bool {
        lock_inner(&self.inner).pinned.contains(key)
    }

    /// Deletes an entry. Refused (`Ok(false)`) while it is leased by any process; `Ok(false)`
    /// too when it is not cached.
    pub fn remove(&self, key: &EntryKey) -> Result<bool, StoreError> {
        let Some(lease_path) = self.lease_path(key) else {
            return Ok(false);
        };
        // Exclusive while deleting: a lease taken now waits, then finds the entry gone.
        let Some(held) = lock::try_lock(&lease_path, true)
            .map_err(io(format!("locking {}", lease_path.display())))?
        else {
            return Ok(false);
        };
        {
            let mut inner = lock_inner(&self.inner);
            if inner.entries.remove(key).is_none() {
                return Ok(false);
            }
            inner.recency.pop(key);
        }
        self.delete_dir(key)?;
        held.remove_file();
        Ok(true)
    }

    /// Deletes the entry directory: renamed into staging first, so a crash mid-delete leaves
    /// nothing that looks like an entry.
    fn delete_dir(&self, key: &EntryKey) -> Result<(), StoreError> {
        let Some(dir) = self.entry_dir(key) else {
            return Ok(());
        };
        let doomed = self
            .staging_root()
            .join(format!("deleted-{}", random_name()));
        match std::fs::rename(&dir, &doomed) {
            Ok(()) => remove_any(&doomed).map_err(io(format!("deleting {}", doomed.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(format!("deleting {}", dir.display()))(e)),
        }
    }

    /// Drops an entry from the index without touching the disk (it is already gone). True
    /// when it was indexed.
    pub fn forget(&self, key: &EntryKey) -> bool {
        let mut inner = lock_inner(&self.inner);
        inner.recency.pop(key);
        inner.entries.remove(key).is_some()
    }

    /// Checks an indexed entry against the disk; when it was deleted or altered behind the
    /// store's back it is dropped from the index, what is left of it deleted (even if leased:
    /// its content cannot be trusted any more), and the reason returned. `None` for an intact
    /// entry or one that is not indexed (being committed or removed by the store itself).
    pub fn revalidate(&self, key: &EntryKey, disk_written: bool) -> Option<LossReason> {
        let recorded = lock_inner(&self.inner).entries.get(key)?.disk;
        let dir = self.entry_dir(key)?;
        let observed = EntryObservation {
            dir_exists: dir.is_dir(),
            meta: match read_meta(&dir, key) {
                Ok(_) => MetaState::Valid,
                Err(state) => state,
            },
            disk: std::fs::metadata(dir.join(key.disk_file_name()))
                .ok()
                .map(|m| DiskStamp::of(&m)),
            disk_written,
        };
        let reason = judge_entry(&recorded, &observed)?;
        {
            let mut inner = lock_inner(&self.inner);
            // Removed (or removed and committed again) by the store while we looked.
            if inner.entries.get(key).map(|i| i.disk) != Some(recorded) {
                return None;
            }
            inner.entries.remove(key);
            inner.recency.pop(key);
        }
        if reason != LossReason::EntryDeleted {
            if let Err(e) = self.delete_dir(key) {
                tracing::warn!(entry = %key, error = %e, "could not delete what is left of a lost entry; the next start removes it");
            }
        }
        tracing::warn!(entry = %key, %reason, "cache entry lost");
        Some(reason)
    }

    /// `revalidate` for every indexed entry.
    pub fn revalidate_all(&self) -> Vec<(EntryKey, LossReason)> {
        let keys: Vec<EntryKey> = lock_inner(&self.inner).entries.keys().cloned().collect();
        keys.into_iter()
            .filter_map(|k| self.revalidate(&k, false).map(|r| (k, r)))
            .collect()
    }

    pub fn entries(&self) -> Vec<CacheEntry> {
        let inner = lock_inner(&self.inner);
        let mut out: Vec<CacheEntry> = inner
            .entries
            .iter()
            .filter_map(|(k, i)| {
                Some(CacheEntry {
                    key: k.clone(),
                    meta: i.meta.clone(),
                    disk_path: self.disk_path(k)?,
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }

    /// Allocated bytes of all entries.
    pub fn used_bytes(&self) -> u64 {
        lock_inner(&self.inner)
            .entries
            .values()
            .map(|i| i.size)
            .sum()
    }

    /// Entries evicted by `make_room` since open.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Allocated bytes of one entry.
    pub fn entry_bytes(&self, key: &EntryKey) -> Option<u64> {
        lock_inner(&self.inner).entries.get(key).map(|i| i.size)
    }

    /// Size of the filesystem holding the cache (0 when it cannot be read).
    pub fn capacity_bytes(&self) -> u64 {
        statvfs(&self.root).map(|(total, _)| total).unwrap_or(0)
    }

    pub fn budget_bytes(&self) -> u64 {
        match self.budget {
            Budget::Bytes(b) => b,
            Budget::PercentOfFilesystem(p) => {
                (u128::from(self.capacity_bytes()) * u128::from(p) / 100) as u64
            }
        }
    }

    /// Evicts least recently used entries (never pinned or leased ones) until `incoming` more
    /// bytes fit in the budget. Returns what was evicted; evicts nothing when it cannot fit.
    pub fn make_room(&self, incoming: u64) -> Result<Vec<EntryKey>, StoreError> {
        if self.role == StoreRole::Guest {
            // Eviction is the owner's job; it will make room when it sees the new entry.
            return Ok(Vec::new());
        }
        let budget = self.budget_bytes();
        let mut evicted = Vec::new();
        // A lease taken between planning and removing makes `remove` refuse; plan again then.
        loop {
            let plan = {
                let inner = lock_inner(&self.inner);
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
                            last_used: i.meta.last_used,
                            pinned: inner.pinned.contains(k),
                            leased: self.is_leased(k),
                        })
                    })
                    .collect();
                let plan = plan_eviction(&candidates, used, budget, incoming)?;
                candidates
                    .into_iter()
                    .filter(|c| plan.contains(&c.key))
                    .collect::<Vec<_>>()
            };
            if plan.is_empty() {
                return Ok(evicted);
            }
            let mut refused = false;
            for c in plan {
                if self.remove(&c.key)? {
                    tracing::info!(entry = %c.key, bytes = c.size, last_used = %c.last_used, "evicted from the cache (least recently used)");
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                    evicted.push(c.key);
                } else {
                    refused = true;
                }
            }
            if !refused {
                return Ok(evicted);
            }
        }
    }
}

/// (total, available) bytes of the filesystem holding `path`.
pub fn statvfs(path: &Path) -> std::io::Result<(u64, u64)> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is plain old data; zero is a valid bit pattern for it.
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
    use std::time::{Duration, Instant};

    const CRASH_MODE_ENV: &str = "VMDISK_STORE_CRASH_MODE";
    const CRASH_ROOT_ENV: &str = "VMDISK_STORE_CRASH_ROOT";
    const CRASH_MARKER_ENV: &str = "VMDISK_STORE_CRASH_MARKER";

    /// In a crash-test child, announces reaching `name` and waits to be killed there.
    pub(super) fn crash_point(name: &str) {
        if std::env::var(CRASH_MODE_ENV).ok().as_deref() != Some(name) {
            return;
        }
        let marker = std::env::var(CRASH_MARKER_ENV).expect("crash marker path");
        std::fs::write(marker, name).unwrap();
        loop {
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    fn key(n: u8, format: DiskFormat) -> EntryKey {
        EntryKey {
            digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            format,
        }
    }

    fn at(seconds: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + seconds, 0).unwrap()
    }

    fn cand(n: u8, size: u64, pinned: bool, leased: bool) -> EvictionCandidate {
        EvictionCandidate {
            key: key(n, DiskFormat::Raw),
            size,
            last_used: at(n.into()),
            pinned,
            leased,
        }
    }

    fn raw(n: u8) -> EntryKey {
        key(n, DiskFormat::Raw)
    }

    #[test]
    fn eviction_takes_least_recent_first_and_stops_as_soon_as_it_fits() {
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
            plan_eviction(&c, 30, 30, 0).unwrap(),
            Vec::<EntryKey>::new()
        );
        assert_eq!(plan_eviction(&c, 30, 30, 5).unwrap(), vec![raw(1)]);
        assert_eq!(plan_eviction(&c, 30, 30, 10).unwrap(), vec![raw(1)]);
        assert_eq!(plan_eviction(&c, 30, 30, 15).unwrap(), vec![raw(1), raw(2)]);
        assert_eq!(
            plan_eviction(&c, 30, 30, 30).unwrap(),
            vec![raw(1), raw(2), raw(3)]
        );
    }

    #[test]
    fn eviction_follows_the_given_order_not_names() {
        let c = [cand(3, 10, false, false), cand(1, 10, false, false)];
        assert_eq!(plan_eviction(&c, 20, 20, 1).unwrap(), vec![raw(3)]);
    }

    #[test]
    fn eviction_skips_pinned_and_leased() {
        let c = [
            cand(1, 10, true, false),
            cand(2, 10, false, true),
            cand(3, 10, false, false),
        ];
        assert_eq!(plan_eviction(&c, 30, 30, 5).unwrap(), vec![raw(3)]);
    }

    #[test]
    fn eviction_reports_no_room_when_pinned_and_leased_block_it() {
        let c = [
            cand(1, 10, true, false),
            cand(2, 10, false, true),
            cand(3, 10, false, false),
        ];
        assert_eq!(
            plan_eviction(&c, 30, 30, 15),
            Err(NoRoom {
                needed: 15,
                used: 30,
                budget: 30,
                evictable: 10
            })
        );
        let err = StoreError::from(plan_eviction(&c, 30, 30, 15).unwrap_err());
        assert!(
            err.to_string().contains("only 10 bytes are evictable"),
            "{err}"
        );
    }

    #[test]
    fn eviction_refuses_an_incoming_disk_larger_than_the_budget() {
        let c = [cand(1, 10, false, false), cand(2, 10, false, false)];
        assert!(matches!(
            plan_eviction(&c, 20, 100, 101),
            Err(NoRoom { needed: 101, .. })
        ));
        assert!(matches!(
            plan_eviction(&[], 0, 10, 11),
            Err(NoRoom { evictable: 0, .. })
        ));
        assert!(matches!(
            plan_eviction(&c, 20, 100, u64::MAX),
            Err(NoRoom { .. })
        ));
    }

    #[test]
    fn budget_parses() {
        assert_eq!(
            "50%".parse::<Budget>().unwrap(),
            Budget::PercentOfFilesystem(50)
        );
        assert_eq!(
            "100%".parse::<Budget>().unwrap(),
            Budget::PercentOfFilesystem(100)
        );
        assert_eq!("20Gi".parse::<Budget>().unwrap(), Budget::Bytes(20 << 30));
        assert_eq!(
            "500M".parse::<Budget>().unwrap(),
            Budget::Bytes(500_000_000)
        );
        for bad in ["0%", "150%", "-5%", "lots", "", "%"] {
            let err = bad.parse::<Budget>().unwrap_err();
            assert!(
                matches!(&err, StoreError::BadBudget(s) if s == bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn keys_round_trip_dir_names_and_refuse_hostile_digests() {
        let k = key(7, DiskFormat::Qcow2);
        assert_eq!(k.to_string(), format!("sha256:{}/qcow2", "07".repeat(32)));
        assert_eq!(EntryKey::from_dir_name(&k.dir_name().unwrap()), Some(k));
        for digest in [
            "sha256:../../etc",
            "sha256:",
            ":abcd",
            "nocolon",
            "sha-256:ab",
        ] {
            let hostile = EntryKey {
                digest: digest.into(),
                format: DiskFormat::Raw,
            };
            assert_eq!(hostile.dir_name(), None, "{digest}");
        }
        for name in ["sha256-zz-raw", "sha256-ab-vmdk", "sha256-ab", "x"] {
            assert_eq!(EntryKey::from_dir_name(name), None, "{name}");
        }
    }

    #[test]
    fn judge_keeps_intact_entries_and_names_each_loss() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let recorded = DiskStamp {
            len: 100,
            modified: Some(t),
        };
        let intact = EntryObservation {
            dir_exists: true,
            meta: MetaState::Valid,
            disk: Some(recorded),
            disk_written: false,
        };
        assert_eq!(judge_entry(&recorded, &intact), None);
        let with = |f: &dyn Fn(&mut EntryObservation)| {
            let mut o = intact.clone();
            f(&mut o);
            judge_entry(&recorded, &o)
        };
        assert_eq!(
            with(&|o| o.dir_exists = false),
            Some(LossReason::EntryDeleted)
        );
        assert_eq!(with(&|o| o.disk = None), Some(LossReason::DiskDeleted));
        assert_eq!(
            with(&|o| o.meta = MetaState::Missing),
            Some(LossReason::MetaDeleted)
        );
        assert_eq!(
            with(&|o| o.meta = MetaState::Unreadable("eof".into())),
            Some(LossReason::MetaUnreadable("eof".into()))
        );
        assert_eq!(
            with(&|o| o.disk = Some(DiskStamp {
                len: 5,
                modified: Some(t)
            })),
            Some(LossReason::DiskResized {
                recorded: 100,
                found: 5
            })
        );
        assert_eq!(
            with(&|o| o.disk = Some(DiskStamp {
                len: 100,
                modified: Some(t + Duration::from_nanos(1))
            })),
            Some(LossReason::DiskModified)
        );
        assert_eq!(
            with(&|o| o.disk_written = true),
            Some(LossReason::DiskModified)
        );
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
    pub(crate) fn commit_raw(store: &CacheStore, n: u8, len: usize) -> EntryKey {
        let k = raw(n);
        let staging = store.staging().unwrap();
        let disk = staging.path().join("d.raw");
        std::fs::write(&disk, vec![n.max(1); len]).unwrap();
        store
            .commit(staging, k.clone(), &disk, meta(&k, len as u64))
            .unwrap();
        k
    }

    fn is_empty_dir(path: &Path) -> bool {
        std::fs::read_dir(path).unwrap().next().is_none()
    }

    fn open(root: &Path, budget: u64) -> (CacheStore, OpenReport) {
        CacheStore::open(root, Budget::Bytes(budget)).unwrap()
    }

    #[test]
    fn commit_get_and_reopen_rebuild_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (store, report) = open(dir.path(), 1 << 30);
        assert_eq!(report, OpenReport::default());
        let k1 = commit_raw(&store, 1, 8192);
        let qcow = key(2, DiskFormat::Qcow2);
        let staging = store.staging().unwrap();
        let disk = staging.path().join("whatever.qcow2");
        std::fs::write(&disk, vec![7u8; 3000]).unwrap();
        let mut m = meta(&qcow, 1 << 30);
        m.source_format = "vmdk".into();
        m.reference = Some("registry.example/disks/fedora@sha256:02".into());
        store
            .commit(staging, qcow.clone(), &disk, m.clone())
            .unwrap();

        let e = store.get(&k1).unwrap();
        assert_eq!(e.disk_path, store.entry_dir(&k1).unwrap().join("disk.raw"));
        assert_eq!(std::fs::read(&e.disk_path).unwrap(), vec![1u8; 8192]);
        assert!(
            is_empty_dir(&dir.path().join("staging")),
            "staging must be empty after commit"
        );
        assert!(store.used_bytes() >= 8192 + 3000);
        drop(store);

        let (store, report) = open(dir.path(), 1 << 30);
        assert_eq!(report, OpenReport::default());
        assert_eq!(
            store
                .entries()
                .iter()
                .map(|e| e.key.clone())
                .collect::<Vec<_>>(),
            vec![k1.clone(), qcow.clone()]
        );
        assert_eq!(store.get(&qcow).unwrap().meta, m);
        assert_eq!(
            std::fs::read(store.get(&k1).unwrap().disk_path).unwrap(),
            vec![1u8; 8192]
        );
    }

    #[test]
    fn committing_an_existing_entry_keeps_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path(), 1 << 30);
        let k = commit_raw(&store, 1, 4096);
        let staging = store.staging().unwrap();
        let disk = staging.path().join("d.raw");
        std::fs::write(&disk, vec![9u8; 4096]).unwrap();
        let e = store
            .commit(staging, k.clone(), &disk, meta(&k, 4096))
            .unwrap();
        assert_eq!(std::fs::read(e.disk_path).unwrap(), vec![1u8; 4096]);
        assert!(is_empty_dir(&dir.path().join("staging")));

        // The same race across two processes on one root (the rename itself finds the entry).
        let other = CacheStore::open_guest(dir.path()).unwrap();
        let k2 = commit_raw(&store, 2, 4096);
        let staging = other.staging().unwrap();
        let disk = staging.path().join("d.raw");
        std::fs::write(&disk, vec![9u8; 4096]).unwrap();
        let e = other
            .commit(staging, k2.clone(), &disk, meta(&k2, 4096))
            .unwrap();
        assert_eq!(std::fs::read(e.disk_path).unwrap(), vec![2u8; 4096]);
        assert!(other.get(&k2).is_some());
    }

    #[test]
    fn commit_refuses_bad_input_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path(), 1 << 30);
        let k = raw(1);

        let staging = store.staging().unwrap();
        let disk = staging.path().join("d.raw");
        std::fs::write(&disk, vec![1u8; 4096]).unwrap();
        let err = store
            .commit(staging, k.clone(), &disk, meta(&k, 8192))
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Inconsistent { problem, .. } if problem.contains("4096 bytes")),
            "{err}"
        );

        let staging = store.staging().unwrap();
        let disk = staging.path().join("d.raw");
        std::fs::write(&disk, vec![1u8; 4096]).unwrap();
        let err = store
            .commit(staging, k.clone(), &disk, meta(&raw(2), 4096))
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::Inconsistent { problem, .. } if problem.contains("metadata describes")),
            "{err}"
        );

        let hostile = EntryKey {
            digest: "sha256:../../x".into(),
            format: DiskFormat::Raw,
        };
        let staging = store.staging().unwrap();
        let disk = staging.path().join("d.raw");
        std::fs::write(&disk, vec![1u8; 4096]).unwrap();
        let err = store
            .commit(staging, hostile.clone(), &disk, meta(&hostile, 4096))
            .unwrap_err();
        assert!(
            matches!(&err, StoreError::BadDigest(d) if d == "sha256:../../x"),
            "{err}"
        );

        let outside = dir.path().join("outside.raw");
        std::fs::write(&outside, vec![1u8; 4096]).unwrap();
        let err = store
            .commit(
                store.staging().unwrap(),
                k.clone(),
                &outside,
                meta(&k, 4096),
            )
            .unwrap_err();
        assert!(matches!(err, StoreError::ForeignStaging(_)), "{err}");

        let staging = store.staging().unwrap();
        let missing = staging.path().join("never-written.raw");
        let err = store
            .commit(staging, k.clone(), &missing, meta(&k, 4096))
            .unwrap_err();
        assert!(err.to_string().contains("never-written.raw"), "{err}");

        assert!(store.entries().is_empty());
        assert!(is_empty_dir(&dir.path().join("entries")));
        assert!(is_empty_dir(&dir.path().join("staging")));
    }

    #[test]
    fn open_removes_staging_leftovers_and_broken_entries() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path(), 1 << 30);
        let good = commit_raw(&store, 1, 8192);
        let truncated = commit_raw(&store, 3, 4096);
        std::fs::write(store.get(&truncated).unwrap().disk_path, b"short").unwrap();
        let no_disk = commit_raw(&store, 4, 4096);
        std::fs::remove_file(store.get(&no_disk).unwrap().disk_path).unwrap();
        let bad_meta = commit_raw(&store, 5, 4096);
        std::fs::write(
            store.entry_dir(&bad_meta).unwrap().join(META_FILE),
            b"{\"digest\":",
        )
        .unwrap();
        let wrong_meta = commit_raw(&store, 6, 4096);
        let seven = commit_raw(&store, 7, 4096);
        std::fs::copy(
            store.entry_dir(&seven).unwrap().join(META_FILE),
            store.entry_dir(&wrong_meta).unwrap().join(META_FILE),
        )
        .unwrap();
        // A qcow2 has no fixed length: only meta.json's record of it catches truncation.
        let qcow = key(8, DiskFormat::Qcow2);
        let staging = store.staging().unwrap();
        let disk = staging.path().join("d");
        std::fs::write(&disk, vec![8u8; 5000]).unwrap();
        let qcow_path = store
            .commit(staging, qcow.clone(), &disk, meta(&qcow, 1 << 20))
            .unwrap()
            .disk_path;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&qcow_path)
            .unwrap()
            .set_len(4096)
            .unwrap();
        // A crashed touch's temporary file is tidied, not fatal.
        std::fs::write(
            store.entry_dir(&seven).unwrap().join(".meta.json.1234"),
            b"{",
        )
        .unwrap();
        drop(store);

        std::fs::create_dir_all(dir.path().join("staging/abandoned/layers")).unwrap();
        std::fs::write(dir.path().join("staging/abandoned/layers/l"), b"x").unwrap();
        std::fs::write(dir.path().join("staging/stray-file"), b"x").unwrap();
        let half = raw(2).dir_name().unwrap();
        std::fs::create_dir_all(dir.path().join("entries").join(&half)).unwrap();
        std::fs::write(
            dir.path().join("entries").join(&half).join("disk.raw"),
            b"x",
        )
        .unwrap();
        std::fs::create_dir_all(dir.path().join("entries/not-an-entry")).unwrap();

        let (store, report) = open(dir.path(), 1 << 30);
        assert_eq!(report.removed_staging, 2);
        let mut removed = report.removed_corrupt.clone();
        removed.sort();
        let expect = |k: &EntryKey, what: &str| (k.dir_name().unwrap(), what.to_string());
        let mut expected = vec![
            expect(&raw(2), "meta.json is missing"),
            expect(
                &truncated,
                "disk is 5 bytes but meta.json records 4096 bytes",
            ),
            expect(&no_disk, "disk file disk.raw"),
            expect(&bad_meta, "meta.json is unreadable"),
            expect(&wrong_meta, "it describes"),
            expect(&qcow, "disk is 4096 bytes but meta.json records 5000 bytes"),
            (
                "not-an-entry".to_string(),
                "not an entry directory name".to_string(),
            ),
        ];
        expected.sort();
        assert_eq!(removed.len(), expected.len(), "{removed:#?}");
        for (line, (name, what)) in removed.iter().zip(&expected) {
            assert!(
                line.starts_with(name.as_str()) && line.contains(what.as_str()),
                "{line:?} should name {name} and say {what:?}"
            );
        }
        assert_eq!(
            store
                .entries()
                .iter()
                .map(|e| e.key.clone())
                .collect::<Vec<_>>(),
            vec![good, seven.clone()]
        );
        assert!(is_empty_dir(&dir.path().join("staging")));
        let mut left: Vec<String> = std::fs::read_dir(dir.path().join("entries"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            vec![raw(1).dir_name().unwrap(), seven.dir_name().unwrap()]
        );
        assert!(!store
            .entry_dir(&seven)
            .unwrap()
            .join(".meta.json.1234")
            .exists());
    }

    #[test]
    fn dropped_staging_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path(), 1 << 30);
        let s = store.staging().unwrap();
        std::fs::create_dir_all(s.path().join("layers")).unwrap();
        std::fs::write(s.path().join("layers/x"), b"data").unwrap();
        drop(s);
        assert!(is_empty_dir(&dir.path().join("staging")));
        assert!(is_empty_dir(&dir.path().join("entries")));
    }

    #[test]
    fn budget_evicts_lru_and_keeps_pinned_and_leased() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path(), 1 << 20);
        let k1 = commit_raw(&store, 1, 256 << 10);
        let k2 = commit_raw(&store, 2, 256 << 10);
        let k3 = commit_raw(&store, 3, 256 << 10);
        store.touch(&k1); // least recent first: k2, k3, k1
        store.set_pinned(&[k2.clone()].into());
        let lease = store.lease(&k3).unwrap();
        let k4 = commit_raw(&store, 4, 256 << 10); // k2, k3, k1, k4
        assert!(
            store.used_bytes() > 1 << 20,
            "four entries exceed the budget"
        );
        let evicted = store.make_room(0).unwrap();
        assert_eq!(
            evicted,
            vec![k1.clone()],
            "only unpinned, unleased entries go, LRU first"
        );
        assert!(store.entry_dir(&k1).map(|d| !d.exists()).unwrap());
        assert!(is_empty_dir(&dir.path().join("staging")));
        assert_eq!(store.evictions(), 1);
        let evicted = store.make_room(300 << 10).unwrap();
        assert_eq!(evicted, vec![k4.clone()]);
        assert!(store.get(&k2).is_some() && store.get(&k3).is_some());
        let before = store.used_bytes();
        let err = store.make_room(900 << 10).unwrap_err();
        assert!(
            matches!(err, StoreError::NoRoom { evictable: 0, .. }),
            "{err}"
        );
        assert_eq!(
            store.used_bytes(),
            before,
            "a refused make_room evicts nothing"
        );
        assert!(!store.remove(&k3).unwrap(), "a leased entry is not removed");
        drop(lease);
        assert_eq!(store.make_room(700 << 10).unwrap(), vec![k3.clone()]);
        assert!(store.get(&k2).is_some(), "pinned survives");
        assert!(
            store.lease(&k3).is_none(),
            "an absent entry cannot be leased"
        );
        assert!(!store.remove(&k3).unwrap());
    }

    #[test]
    fn one_owner_per_cache_and_any_number_of_guests() {
        let dir = tempfile::tempdir().unwrap();
        let (owner, _) = open(dir.path(), 1 << 30);
        assert!(matches!(
            CacheStore::open(dir.path(), Budget::Bytes(1)),
            Err(StoreError::Owned(_))
        ));
        let guest = CacheStore::open_guest(dir.path()).unwrap();
        assert_eq!(guest.role(), StoreRole::Guest);
        let (shared, _) = CacheStore::open_shared(dir.path(), Budget::Bytes(1)).unwrap();
        assert_eq!(shared.role(), StoreRole::Guest, "an agent owns it");
        // A guest commits; the owner finds the entry without reopening.
        let k = commit_raw(&guest, 5, 4096);
        assert!(owner.get(&k).is_none());
        assert_eq!(owner.get_or_adopt(&k).unwrap().key, k);
        assert!(
            guest.make_room(1 << 40).unwrap().is_empty(),
            "guests never evict"
        );
        drop(owner);
        let (next, _) = CacheStore::open_shared(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        assert_eq!(next.role(), StoreRole::Owner, "nobody owns it any more");
    }

    #[test]
    fn owner_cleanup_spares_staging_still_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let (owner, _) = open(dir.path(), 1 << 30);
        let guest = CacheStore::open_guest(dir.path()).unwrap();
        let busy = guest.staging().unwrap();
        std::fs::write(busy.path().join("layer"), b"half a download").unwrap();
        // What a killed writer leaves: a directory and a lock file nobody holds.
        let abandoned = dir.path().join("staging/0123456789abcdef");
        std::fs::create_dir_all(&abandoned).unwrap();
        std::fs::write(abandoned.join("layer"), b"x").unwrap();
        std::fs::write(abandoned.with_extension("lock"), b"").unwrap();
        drop(owner);
        let (_owner, report) = open(dir.path(), 1 << 30);
        assert_eq!((report.removed_staging, report.busy_staging), (1, 1));
        assert!(!abandoned.exists() && !abandoned.with_extension("lock").exists());
        assert!(
            busy.path().join("layer").exists(),
            "a guest's warm in progress survives"
        );
        let path = busy.path().to_path_buf();
        // Its own warms in progress survive the owner's periodic cleanup too.
        let own = _owner.staging().unwrap();
        assert_eq!(_owner.clean_abandoned_staging().unwrap().busy_staging, 2);
        assert!(own.path().exists() && path.exists());
        drop(busy);
        assert!(!path.exists() && !path.with_extension("lock").exists());
    }

    #[test]
    fn a_lease_held_by_another_process_stops_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path(), 3 << 19);
        let k1 = commit_raw(&store, 1, 512 << 10);
        let k2 = commit_raw(&store, 2, 512 << 10);
        let lease_file = store.lease_path(&k1).unwrap();
        // Another process (a populator pod) holds a shared lease on k1.
        let mut child = std::process::Command::new("flock")
            .args(["--shared", "--close"])
            .arg(&lease_file)
            .args(["sleep", "30"])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !store.is_leased(&k1) {
            assert!(Instant::now() < deadline, "the child never took the lease");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(store.make_room(512 << 10).unwrap(), vec![k2.clone()]);
        assert!(
            store.make_room(3 << 19).is_err(),
            "only the leased entry is left"
        );
        assert!(store.get(&k1).is_some());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!store.is_leased(&k1), "a dead holder leaves no lease");
        assert_eq!(store.make_room(3 << 19).unwrap(), vec![k1]);
    }

    #[tokio::test]
    async fn warms_of_one_entry_are_single_flight_across_stores() {
        let dir = tempfile::tempdir().unwrap();
        let (owner, _) = open(dir.path(), 1 << 30);
        let guest = CacheStore::open_guest(dir.path()).unwrap();
        let k = raw(9);
        let first = owner.warm_lock(&k).await.unwrap();
        let waiting = tokio::spawn(async move {
            let _held = guest.warm_lock(&raw(9)).await.unwrap();
            guest.get_or_adopt(&raw(9)).is_some()
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            !waiting.is_finished(),
            "the second warm waits for the first"
        );
        commit_raw(&owner, 9, 4096);
        drop(first);
        assert!(waiting.await.unwrap(), "and then finds the entry committed");
    }

    #[test]
    fn percent_budget_follows_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CacheStore::open(dir.path(), Budget::PercentOfFilesystem(50)).unwrap();
        let capacity = store.capacity_bytes();
        assert!(capacity > 0);
        assert_eq!(store.budget_bytes(), capacity / 2);
    }

    #[test]
    fn recency_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path(), 1 << 20);
        let k1 = commit_raw(&store, 1, 300 << 10);
        let k2 = commit_raw(&store, 2, 300 << 10);
        // Touch stamps "now"; make sure it is later than the commits' stamps.
        let committed = store.get(&k2).unwrap().meta.last_used;
        while Utc::now() <= committed {
            std::thread::yield_now();
        }
        store.touch(&k1);
        drop(store);
        let (store, _) = open(dir.path(), 700 << 10);
        assert_eq!(store.make_room(200 << 10).unwrap(), vec![k2]);
        assert!(store.get(&k1).is_some());
    }

    #[test]
    fn revalidate_drops_entries_altered_behind_the_stores_back() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = open(dir.path(), 1 << 30);
        let k1 = commit_raw(&store, 1, 4096);
        let k2 = commit_raw(&store, 2, 4096);
        let k3 = commit_raw(&store, 3, 4096);
        store.touch(&k1);
        assert_eq!(
            store.revalidate_all(),
            vec![],
            "touch is the store's own write"
        );
        std::fs::remove_file(store.get(&k1).unwrap().disk_path).unwrap();
        std::fs::OpenOptions::new()
            .append(true)
            .open(store.get(&k2).unwrap().disk_path)
            .unwrap()
            .write_all_at(b"x", 4096)
            .unwrap();
        let mut lost = store.revalidate_all();
        lost.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            lost,
            vec![
                (k1.clone(), LossReason::DiskDeleted),
                (
                    k2.clone(),
                    LossReason::DiskResized {
                        recorded: 4096,
                        found: 4097
                    }
                )
            ]
        );
        assert!(!store.entry_dir(&k1).unwrap().exists() && !store.entry_dir(&k2).unwrap().exists());
        let _lease = store.lease(&k3).unwrap();
        assert_eq!(
            store.revalidate(&k3, true),
            Some(LossReason::DiskModified),
            "even a leased entry goes"
        );
        assert!(store.entries().is_empty());
        assert_eq!(store.revalidate(&k3, true), None, "not indexed any more");
    }

    use std::os::unix::fs::FileExt;

    /// Not a test of its own: the child process of `crash_*` tests, selected by environment.
    #[test]
    #[ignore = "child process of the crash tests"]
    fn crash_child() {
        let Ok(mode) = std::env::var(CRASH_MODE_ENV) else {
            return;
        };
        let root = PathBuf::from(std::env::var(CRASH_ROOT_ENV).unwrap());
        let (store, _) = open(&root, 1 << 30);
        let staging = store.staging().unwrap();
        let disk = staging.path().join("disk.raw");
        let file = std::fs::File::create(&disk).unwrap();
        let chunk = vec![0x5au8; 1 << 20];
        let len: u64 = 16 << 20;
        for i in 0..16u64 {
            file.write_all_at(&chunk, i << 20).unwrap();
        }
        if mode == "mid-write" {
            crash_point_after_first_write(&file, &chunk, len);
        }
        let k = raw(1);
        store
            .commit(staging, k.clone(), &disk, meta(&k, len))
            .unwrap();
        panic!("the crash point {mode:?} was never reached");
    }

    /// Keeps rewriting the staging file, announcing once the first rewrite is done.
    fn crash_point_after_first_write(file: &std::fs::File, chunk: &[u8], len: u64) {
        let marker = std::env::var(CRASH_MARKER_ENV).unwrap();
        let mut announced = false;
        loop {
            for i in 0..len >> 20 {
                file.write_all_at(chunk, i << 20).unwrap();
            }
            if !announced {
                std::fs::write(&marker, "mid-write").unwrap();
                announced = true;
            }
        }
    }

    /// Runs `crash_child` in a child process until it reaches `mode`, SIGKILLs it, reopens.
    fn crash_and_reopen(mode: &str) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("cache");
        let marker = dir.path().join("reached");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::tests::crash_child",
                "--ignored",
                "--nocapture",
            ])
            .env(CRASH_MODE_ENV, mode)
            .env(CRASH_ROOT_ENV, &root)
            .env(CRASH_MARKER_ENV, &marker)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // A failure bound, not a timing assertion: the child normally gets there in well under
        // a second.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !marker.exists() {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("crash child exited ({status}) before reaching {mode:?}");
            }
            assert!(
                Instant::now() < deadline,
                "crash child never reached {mode:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill().unwrap(); // SIGKILL: no destructors, no cleanup
        child.wait().unwrap();
        assert!(
            !is_empty_dir(&root.join("staging")),
            "the child left its work in staging"
        );

        let (store, report) = open(&root, 1 << 30);
        assert!(store.entries().is_empty(), "a partial entry became visible");
        assert!(is_empty_dir(&root.join("entries")));
        assert!(is_empty_dir(&root.join("staging")));
        assert_eq!(report.removed_staging, 1);
        assert!(report.removed_corrupt.is_empty(), "{report:?}");
    }

    #[test]
    fn crash_mid_write_leaves_no_entry() {
        crash_and_reopen("mid-write");
    }

    #[test]
    fn crash_between_fsync_and_rename_leaves_no_entry() {
        crash_and_reopen("before-rename");
    }
}

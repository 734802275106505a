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
//! <root>/verified/<algorithm>-<hex>/<record>.json           who the registry let pull it
//! <root>/attempts/<algorithm>-<hex>-<format>.json           warms that died with their process
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
//!
//! Where each part lives: `keys` (entry names and paths), `meta` (`meta.json`),
//! `commit` (staging, commit, adoption, deletion), `leases` and `lock` (who may evict,
//! copy or warm an entry), `eviction` (budget, recency, pins, `make_room`), `integrity`
//! (is an entry still what was committed), `watch` (noticing changes made from outside) and
//! `verified` (records of requesters the registry confirmed may pull a digest) and `attempts`
//! (warms that died with their process, so a poison image is not retried forever).
//! This file is the facade: opening the cache and reading its index.

mod attempts;
mod commit;
mod eviction;
mod integrity;
mod keys;
mod leases;
mod lock;
mod meta;
#[cfg(test)]
mod tests;
mod verified;
mod watch;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;
use thiserror::Error;

pub use self::attempts::{Attempt, Poisoned, MAX_UNFINISHED};
pub use self::commit::StagingDir;
pub use self::eviction::Budget;
pub use self::integrity::LossReason;
pub use self::keys::EntryKey;
pub use self::leases::Lease;
pub use self::lock::FileLock;
pub use self::meta::{CacheEntry, EntryMeta, PullRecord};
pub use self::verified::Requester;
pub(crate) use self::watch::{watch_entries, EntryChange};

use self::commit::{fsync_path, remove_any};
use self::integrity::DiskStamp;

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

/// Bytes a path occupies on disk, recursively (holes not counted).
pub(crate) fn allocated_bytes(path: &Path) -> std::io::Result<u64> {
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
            root.join("slots"),
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

    /// Allocated bytes of one entry.
    pub fn entry_bytes(&self, key: &EntryKey) -> Option<u64> {
        lock_inner(&self.inner).entries.get(key).map(|i| i.size)
    }
}

//! Leases and the warm lock, how processes sharing the cache stay out of each other's way
//! around one entry: a populate copying an entry holds a [`Lease`] (a shared lock on
//! `leases/<entry>.lock`, which eviction must take exclusively), and a warm holds
//! `locks/<entry>.lock`, so one process at a time pulls an entry and the others find it
//! committed. A populate also holds one of the node's copy slots (`slots/copy-<i>.lock`) while
//! it copies, so that a burst of claims copies at the disk's pace. The locks are `lock`'s
//! `flock`s, which die with their process.

use super::lock::{self, FileLock};
use super::{io, CacheStore, EntryKey, StoreError};

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

impl CacheStore {
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

    /// Waits for one of `slots` copy slots of this cache and holds it until the guard drops: at
    /// most `slots` populates (of any entry, in any process) copy out of the cache at once.
    pub async fn copy_slot(&self, slots: usize) -> Result<FileLock, StoreError> {
        let dir = self.root.join("slots");
        let paths: Vec<_> = (0..slots.max(1))
            .map(|i| dir.join(format!("copy-{i}.lock")))
            .collect();
        lock::lock_any(&paths, true)
            .await
            .map_err(io(format!("taking a copy slot in {}", dir.display())))
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
}

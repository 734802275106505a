//! Eviction: the byte budget ([`Budget`]: bytes, or a share of the filesystem), recency
//! (`touch` moves an entry to the front of the LRU and records its last use), pins from the
//! images' cache policies, and [`plan_eviction`] (pure), which picks the least recently used
//! entries that are neither pinned nor leased. `make_room` carries a plan out, and plans again
//! when a lease appears in the meantime. Only the owner evicts.

use std::collections::HashSet;
use std::path::Path;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use vmdisk_crds::parse_quantity;

use super::commit::random_name;
use super::lock;
use super::meta::{MetaFile, META_FILE, META_TMP_PREFIX};
use super::{io, lock_inner, CacheStore, EntryKey, StoreError, StoreRole};

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

impl CacheStore {
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

    /// Entries evicted by `make_room` since open.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
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
    use crate::store::tests::{key, raw};
    use vmdisk_crds::DiskFormat;

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
}

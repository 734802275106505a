//! Is an entry still what was committed? On open every entry directory is checked
//! (`CacheStore::load_entry`: its name, `meta.json`, the disk's length against the record);
//! while the agent runs, an entry the watcher saw change is checked again
//! (`CacheStore::revalidate`, which asks the pure [`judge_entry`]). An entry that fails is
//! dropped from the index and what is left of it deleted: the cache never serves a disk it
//! cannot vouch for.

use std::fmt;
use std::path::Path;
use std::time::SystemTime;

use super::meta::{raw_length_problem, read_meta, META_TMP_PREFIX};
use super::{allocated_bytes, lock_inner, CacheStore, EntryKey, Indexed};

/// What identifies the disk file as it was committed: an external write changes one of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskStamp {
    pub len: u64,
    pub modified: Option<SystemTime>,
}

impl DiskStamp {
    pub(super) fn of(metadata: &std::fs::Metadata) -> Self {
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

impl CacheStore {
    /// Reads an entry directory; the problem when it is not a complete, consistent entry.
    pub(super) fn load_entry(dir: &Path, name: &str) -> Result<(EntryKey, Indexed), String> {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

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
}

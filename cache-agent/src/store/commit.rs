//! Staging and commit: an entry enters the cache whole or not at all, and leaves it the same
//! way. Work happens in a locked directory under `staging/` ([`StagingDir`]); `commit` fsyncs
//! the disk, `meta.json` and the directory, renames it into `entries/` and fsyncs that; an
//! entry another process committed is adopted into the index. Deleting renames the entry back
//! into staging first. The owner removes staging whose writer died (its lock is free).

use std::path::{Path, PathBuf};

use super::integrity::DiskStamp;
use super::lock::{self, FileLock};
use super::meta::{raw_length_problem, MetaFile, META_FILE};
use super::{
    allocated_bytes, io, lock_inner, CacheEntry, CacheStore, EntryKey, EntryMeta, Indexed,
    OpenReport, StoreError, StoreRole,
};

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

pub(super) fn fsync_path(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

pub(super) fn random_name() -> String {
    format!("{:016x}", rand::random::<u64>())
}

pub(super) fn remove_any(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
fn crash_point(name: &str) {
    super::tests::crash_point(name);
}

#[cfg(not(test))]
fn crash_point(_name: &str) {}

impl CacheStore {
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
    pub(super) fn clean_staging(staging: &Path) -> Result<OpenReport, StoreError> {
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

    /// Deletes the entry directory: renamed into staging first, so a crash mid-delete leaves
    /// nothing that looks like an entry.
    pub(super) fn delete_dir(&self, key: &EntryKey) -> Result<(), StoreError> {
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
}

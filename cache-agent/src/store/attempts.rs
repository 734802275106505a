//! Warms that never finished: an image that kills the process warming it (memory, a crash in
//! qemu-img's wake, a kernel OOM kill) would otherwise be warmed again after every restart,
//! on every node that prefetches it: a crash loop. A warm writes an attempt record when it
//! starts and removes it when it ends in any way the process survives (success, a clean
//! failure, or being cancelled at shutdown). A record found at the start of a warm is a warm
//! that died with its process; after [`MAX_UNFINISHED`] of them in a row the image is
//! refused until someone forgets it (`vmdisk-cache-agent ls --forget <digest>`).
//!
//! ```text
//! <root>/attempts/<algorithm>-<hex>-<format>.json   {"unfinished": n, "reference": ...}
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::commit::random_name;
use super::{CacheStore, EntryKey};

/// Warms of one image that may die with their process before it is refused.
pub const MAX_UNFINISHED: u32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AttemptRecord {
    unfinished: u32,
    reference: String,
}

/// Removes the attempt record when the warm ends, also when its future is dropped.
#[derive(Debug)]
pub struct Attempt {
    path: Option<PathBuf>,
}

impl Drop for Attempt {
    fn drop(&mut self) {
        if let Some(path) = &self.path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An image refused for having killed its warms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poisoned {
    pub key: EntryKey,
    pub unfinished: u32,
    pub reference: String,
}

impl CacheStore {
    fn attempt_path(&self, key: &EntryKey) -> Option<PathBuf> {
        key.dir_name()
            .map(|n| self.root.join("attempts").join(format!("{n}.json")))
    }

    fn read_attempt(&self, key: &EntryKey) -> Option<AttemptRecord> {
        let bytes = std::fs::read(self.attempt_path(key)?).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Starts a warm of `key`: refused when [`MAX_UNFINISHED`] warms before it died with their
    /// process; otherwise counted until the returned [`Attempt`] is dropped. Recording is best
    /// effort: a cache that cannot be written fails the warm elsewhere.
    pub fn begin_attempt(&self, key: &EntryKey, reference: &str) -> Result<Attempt, Poisoned> {
        let Some(path) = self.attempt_path(key) else {
            return Ok(Attempt { path: None });
        };
        let unfinished = self.read_attempt(key).map_or(0, |r| r.unfinished);
        if unfinished >= MAX_UNFINISHED {
            return Err(Poisoned {
                key: key.clone(),
                unfinished,
                reference: reference.to_string(),
            });
        }
        let record = AttemptRecord {
            unfinished: unfinished + 1,
            reference: reference.to_string(),
        };
        let dir = path.parent().expect("attempts/ holds the record");
        let tmp = dir.join(format!(".{}", random_name()));
        let written = std::fs::create_dir_all(dir)
            .and_then(|()| {
                std::fs::write(
                    &tmp,
                    serde_json::to_vec(&record).expect("a record serializes"),
                )
            })
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!(entry = %key, error = %e, "could not record a warm attempt");
        }
        Ok(Attempt { path: Some(path) })
    }

    /// Images refused for having killed their warms.
    pub fn poisoned(&self) -> Vec<Poisoned> {
        let Ok(dir) = std::fs::read_dir(self.root.join("attempts")) else {
            return Vec::new();
        };
        let mut out: Vec<Poisoned> = dir
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let key = EntryKey::from_dir_name(name.strip_suffix(".json")?)?;
                let record = self.read_attempt(&key)?;
                (record.unfinished >= MAX_UNFINISHED).then_some(Poisoned {
                    key,
                    unfinished: record.unfinished,
                    reference: record.reference,
                })
            })
            .collect();
        out.sort_by_key(|p| p.key.dir_name());
        out
    }

    /// Forgets the unfinished warms of every format of `digest`; how many records went.
    pub fn forget_attempts(&self, digest: &str) -> usize {
        self.poisoned()
            .into_iter()
            .filter(|p| p.key.digest == digest)
            .filter(|p| {
                self.attempt_path(&p.key)
                    .is_some_and(|path| std::fs::remove_file(path).is_ok())
            })
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Budget;
    use vmdisk_crds::DiskFormat;

    fn key() -> EntryKey {
        EntryKey {
            digest: format!("sha256:{}", "c".repeat(64)),
            format: DiskFormat::Raw,
        }
    }

    #[test]
    fn warms_that_die_with_their_process_poison_the_image_after_three() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CacheStore::open(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        // Warms that end (or are cancelled) leave nothing behind.
        for _ in 0..10 {
            drop(store.begin_attempt(&key(), "r").unwrap());
        }
        assert!(store.poisoned().is_empty());
        // Warms that die with the process leave their record (forget stands in for the kill).
        for _ in 0..MAX_UNFINISHED {
            std::mem::forget(
                store
                    .begin_attempt(&key(), "registry.example.com/bad:1")
                    .unwrap(),
            );
        }
        let refused = store
            .begin_attempt(&key(), "registry.example.com/bad:1")
            .unwrap_err();
        assert_eq!(refused.unfinished, MAX_UNFINISHED);
        assert_eq!(store.poisoned(), vec![refused.clone()]);
        assert_eq!(refused.reference, "registry.example.com/bad:1");
        // Remembered across a restart of the agent.
        drop(store);
        let (store, _) = super::super::tests::open(dir.path(), 1 << 30);
        assert!(store.begin_attempt(&key(), "r").is_err());
        assert_eq!(store.forget_attempts(&key().digest), 1);
        assert!(store.poisoned().is_empty());
        drop(store.begin_attempt(&key(), "r").unwrap());
    }
}

//! Noticing cache entries removed or altered behind the agent's back (notify).
//!
//! Any event under `entries/` re-validates the entries it touches: an entry whose disk or
//! metadata is gone, or whose disk no longer matches its metadata, leaves the index (its
//! remains are deleted) and is reported as [`EntryChange::Lost`] so the agent can tell the
//! cluster and warm it again if still wanted. The store's own commits (a rename of a complete
//! directory into `entries/`) validate fine and are not reported.

use std::path::Path;
use std::sync::Arc;

use notify::{RecursiveMode, Watcher};
use thiserror::Error;

use crate::store::{CacheStore, EntryKey};

#[derive(Debug, Error)]
pub enum WatchError {
    #[error("cannot watch {path}: {source}")]
    Notify {
        path: String,
        #[source]
        source: notify::Error,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryChange {
    Lost { key: EntryKey, reason: String },
}

/// Keeps the watch alive.
pub struct WatchHandle {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why an indexed entry is no longer valid on disk, if it is not.
fn invalid_reason(store: &CacheStore, key: &EntryKey) -> Option<String> {
    let entry = store.get(key)?;
    let meta_path = entry.disk_path.parent()?.join("meta.json");
    if !meta_path.exists() {
        return Some("meta.json was removed".into());
    }
    match std::fs::metadata(&entry.disk_path) {
        Err(_) => Some(format!("{} was removed", entry.disk_path.display())),
        Ok(m)
            if entry.key.format == vmdisk_crds::DiskFormat::Raw
                && m.len() != entry.meta.virtual_size =>
        {
            Some(format!(
                "{} changed size ({} bytes, expected {})",
                entry.disk_path.display(),
                m.len(),
                entry.meta.virtual_size
            ))
        }
        Ok(m)
            if m.modified()
                .ok()
                .zip(entry_mtime_limit(&entry.meta))
                .is_some_and(|(t, limit)| t > limit) =>
        {
            Some(format!("{} was modified", entry.disk_path.display()))
        }
        Ok(_) => None,
    }
}

/// An entry's disk is never written after commit; a modification time later than the
/// commit (plus slack for filesystems with coarse timestamps) means someone wrote to it.
fn entry_mtime_limit(meta: &crate::store::EntryMeta) -> Option<std::time::SystemTime> {
    let created: std::time::SystemTime = meta.created.into();
    Some(created + std::time::Duration::from_secs(2))
}

pub fn watch_entries(
    store: Arc<CacheStore>,
) -> Result<(WatchHandle, tokio::sync::mpsc::Receiver<EntryChange>), WatchError> {
    let root = store.entries_dir();
    let (raw_tx, mut raw_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // The callback runs on notify's thread; a full channel already means "check".
            let _ = raw_tx.try_send(());
        }
    })
    .map_err(|source| WatchError::Notify {
        path: root.display().to_string(),
        source,
    })?;
    watcher
        .watch(Path::new(&root), RecursiveMode::Recursive)
        .map_err(|source| WatchError::Notify {
            path: root.display().to_string(),
            source,
        })?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(async move {
        while raw_rx.recv().await.is_some() {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            while raw_rx.try_recv().is_ok() {}
            for entry in store.entries() {
                if let Some(reason) = invalid_reason(&store, &entry.key) {
                    if store.is_leased(&entry.key) {
                        store.forget(&entry.key);
                    } else {
                        let _ = store.remove(&entry.key);
                    }
                    tracing::warn!(entry = %entry.key, %reason, "cache entry changed behind the agent's back");
                    if tx
                        .send(EntryChange::Lost {
                            key: entry.key.clone(),
                            reason,
                        })
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    Ok((
        WatchHandle {
            _watcher: watcher,
            task,
        },
        rx,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Budget, EntryMeta};
    use std::time::Duration;
    use vmdisk_crds::DiskFormat;

    fn commit(store: &CacheStore, n: u8) -> EntryKey {
        let key = EntryKey {
            digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            format: DiskFormat::Raw,
        };
        let staging = store.staging().unwrap();
        let disk = staging.path().join("d");
        std::fs::write(&disk, vec![n; 4096]).unwrap();
        let now = chrono::Utc::now();
        let meta = EntryMeta {
            digest: key.digest.clone(),
            format: key.format,
            source_format: "raw".into(),
            virtual_size: 4096,
            allocated_size: 4096,
            created: now,
            last_used: now,
            reference: None,
        };
        store.commit(staging, key.clone(), &disk, meta).unwrap();
        key
    }

    async fn next(rx: &mut tokio::sync::mpsc::Receiver<EntryChange>) -> Option<EntryChange> {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .ok()
            .flatten()
    }

    #[tokio::test]
    async fn external_removal_and_alteration_are_noticed_commits_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CacheStore::open(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        let store = Arc::new(store);
        let k1 = commit(&store, 1);
        let k2 = commit(&store, 2);
        let (_handle, mut rx) = watch_entries(Arc::clone(&store)).unwrap();

        std::fs::remove_file(store.get(&k1).unwrap().disk_path).unwrap();
        match next(&mut rx).await {
            Some(EntryChange::Lost { key, reason }) => {
                assert_eq!(key, k1);
                assert!(reason.contains("removed"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        assert!(store.get(&k1).is_none());

        let k3 = commit(&store, 3);
        std::fs::OpenOptions::new()
            .append(true)
            .open(store.get(&k2).unwrap().disk_path)
            .unwrap()
            .set_len(100)
            .unwrap();
        match next(&mut rx).await {
            Some(EntryChange::Lost { key, .. }) => {
                assert_eq!(key, k2, "the commit of k3 must not be reported")
            }
            other => panic!("{other:?}"),
        }
        assert!(store.get(&k3).is_some());
        assert_eq!(store.entries().len(), 1);
    }
}

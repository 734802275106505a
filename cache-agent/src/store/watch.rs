//! Notices cache entries deleted or altered behind the agent's back (an operator's `rm`, a
//! disk filling up and truncating, a stray writer) so they leave the index and the agent can
//! report the loss and warm the image again; and entries committed by other processes sharing
//! the cache (populator pods warming a cold image), so the agent indexes and reports them.
//!
//! A recursive inotify watch (notify) on `<root>/entries`. Every event names an entry
//! directory; the entry is then checked against what the store recorded at commit
//! (`CacheStore::revalidate`), so the store's own writes (commit renames a whole directory in,
//! eviction renames it out, `touch` replaces `meta.json` by rename) never count as losses. A
//! data write into a disk file is a loss even when length and mtime happen to match, since the
//! store never writes a disk once it is in `entries/`. When the kernel queue overflows every
//! entry is checked.
//!
//! An entry committed moments before an external change can be missed: notify adds the watch
//! on a new entry directory only after it has seen the rename that created it.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use notify::event::{EventKind, ModifyKind};
use notify::{Event, RecommendedWatcher, RecursiveMode, Watcher};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::store::{CacheStore, EntryKey, LossReason};

/// Lost entries wait here while the agent is busy; a full queue holds the watcher back rather
/// than dropping a loss.
const QUEUE: usize = 64;

#[derive(Debug, Error)]
pub enum WatchError {
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

/// A change to the cache that the agent did not make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryChange {
    /// The entry was dropped from the index (and what was left of it deleted).
    Lost { key: EntryKey, reason: LossReason },
    /// Another process sharing the cache (a populator pod) committed the entry; it is indexed
    /// now, counted against the budget and reported.
    Adopted { key: EntryKey },
}

/// Keeps the watch alive; dropping it stops watching.
pub struct WatchHandle {
    _watcher: RecommendedWatcher,
}

/// What one notify event asks the watcher to check.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Check {
    Nothing,
    Entry { key: EntryKey, disk_written: bool },
    Everything,
}

/// Maps a notify event to the entries it may concern. Pure: paths and kinds only.
fn check_for(entries_dir: &Path, event: &Event) -> Vec<Check> {
    if event.need_rescan() {
        return vec![Check::Everything];
    }
    if matches!(event.kind, EventKind::Access(_)) {
        // Opens and closes: populate reading a disk.
        return vec![Check::Nothing];
    }
    let disk_written = matches!(
        event.kind,
        EventKind::Modify(ModifyKind::Data(_)) | EventKind::Modify(ModifyKind::Any)
    );
    event
        .paths
        .iter()
        .map(|path| {
            let Ok(relative) = path.strip_prefix(entries_dir) else {
                return Check::Nothing;
            };
            let mut parts = relative.components().filter_map(|c| match c {
                Component::Normal(s) => Some(s.to_string_lossy()),
                _ => None,
            });
            let Some(dir_name) = parts.next() else {
                // entries/ itself went away or was replaced.
                return Check::Everything;
            };
            let Some(key) = EntryKey::from_dir_name(&dir_name) else {
                return Check::Nothing;
            };
            let is_disk = parts.next().is_some_and(|f| f.starts_with("disk."));
            Check::Entry {
                key,
                disk_written: disk_written && is_disk,
            }
        })
        .collect()
}

/// Watches `<root>/entries` of `store`; losses arrive on the receiver.
pub fn watch_entries(
    store: Arc<CacheStore>,
) -> Result<(WatchHandle, mpsc::Receiver<EntryChange>), WatchError> {
    let entries_dir = store.entries_dir();
    let (tx, rx) = mpsc::channel(QUEUE);
    let watched = entries_dir.clone();
    // notify calls this on its own thread, outside any runtime, so blocking_send is allowed.
    let handler = move |result: notify::Result<Event>| {
        let checks = match result {
            Ok(event) => check_for(&watched, &event),
            Err(e) => {
                tracing::warn!(error = %e, "cache watch error; checking every entry");
                vec![Check::Everything]
            }
        };
        let mut changes = Vec::new();
        for check in checks {
            match check {
                Check::Nothing => {}
                Check::Entry { key, disk_written } => {
                    if let Some(reason) = store.revalidate(&key, disk_written) {
                        changes.push(EntryChange::Lost { key, reason });
                    } else if store.get(&key).is_none() && store.get_or_adopt(&key).is_some() {
                        changes.push(EntryChange::Adopted { key });
                    }
                }
                Check::Everything => changes.extend(
                    store
                        .revalidate_all()
                        .into_iter()
                        .map(|(key, reason)| EntryChange::Lost { key, reason }),
                ),
            }
        }
        for change in changes {
            // A closed receiver means the agent is shutting down.
            let _ = tx.blocking_send(change);
        }
    };
    let watch_error = |source| WatchError::Watch {
        path: entries_dir.clone(),
        source,
    };
    let mut watcher = notify::recommended_watcher(handler).map_err(watch_error)?;
    watcher
        .watch(&entries_dir, RecursiveMode::Recursive)
        .map_err(watch_error)?;
    Ok((WatchHandle { _watcher: watcher }, rx))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Budget, EntryMeta};
    use notify::event::{AccessKind, AccessMode, CreateKind, DataChange, MetadataKind, RemoveKind};
    use std::os::unix::fs::FileExt;
    use std::time::Duration;
    use vmdisk_crds::DiskFormat;

    fn key(n: u8) -> EntryKey {
        EntryKey {
            digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
            format: DiskFormat::Raw,
        }
    }

    fn event(kind: EventKind, path: PathBuf) -> Event {
        Event::new(kind).add_path(path)
    }

    #[test]
    fn events_map_to_the_entry_they_touch() {
        let root = Path::new("/cache/entries");
        let dir = root.join(key(1).dir_name().unwrap());
        let data = EventKind::Modify(ModifyKind::Data(DataChange::Any));
        let entry = |disk_written| Check::Entry {
            key: key(1),
            disk_written,
        };
        assert_eq!(
            check_for(root, &event(data, dir.join("disk.raw"))),
            vec![entry(true)]
        );
        assert_eq!(
            check_for(root, &event(data, dir.join(".meta.json.12"))),
            vec![entry(false)]
        );
        assert_eq!(
            check_for(
                root,
                &event(EventKind::Remove(RemoveKind::File), dir.join("disk.raw"))
            ),
            vec![entry(false)]
        );
        assert_eq!(
            check_for(
                root,
                &event(
                    EventKind::Modify(ModifyKind::Metadata(MetadataKind::Any)),
                    dir.join("disk.raw")
                )
            ),
            vec![entry(false)]
        );
        assert_eq!(
            check_for(
                root,
                &event(EventKind::Create(CreateKind::Folder), dir.clone())
            ),
            vec![entry(false)]
        );
        assert_eq!(
            check_for(
                root,
                &event(
                    EventKind::Access(AccessKind::Close(AccessMode::Write)),
                    dir.join("disk.raw")
                )
            ),
            vec![Check::Nothing]
        );
        assert_eq!(
            check_for(root, &event(data, root.join("junk/disk.raw"))),
            vec![Check::Nothing]
        );
        assert_eq!(
            check_for(root, &event(data, PathBuf::from("/elsewhere/x"))),
            vec![Check::Nothing]
        );
        assert_eq!(
            check_for(
                root,
                &event(EventKind::Remove(RemoveKind::Folder), root.to_path_buf())
            ),
            vec![Check::Everything]
        );
        let overflow = Event::new(EventKind::Other).set_flag(notify::event::Flag::Rescan);
        assert_eq!(check_for(root, &overflow), vec![Check::Everything]);
    }

    fn commit(store: &CacheStore, n: u8, len: usize) -> EntryKey {
        let k = key(n);
        let staging = store.staging().unwrap();
        let disk = staging.path().join("d.raw");
        std::fs::write(&disk, vec![n; len]).unwrap();
        let now = chrono::Utc::now();
        let meta = EntryMeta {
            digest: k.digest.clone(),
            format: k.format,
            source_format: "raw".into(),
            virtual_size: len as u64,
            allocated_size: len as u64,
            created: now,
            last_used: now,
            reference: None,
        };
        store.commit(staging, k.clone(), &disk, meta).unwrap();
        k
    }

    /// The next change. The timeout only bounds a failing test; events normally arrive in
    /// milliseconds.
    async fn next(rx: &mut mpsc::Receiver<EntryChange>) -> EntryChange {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no cache change reported within 10 s")
            .expect("watcher gone")
    }

    #[tokio::test]
    async fn entries_committed_by_other_processes_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let (owner, _) = CacheStore::open(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        let owner = Arc::new(owner);
        let (_handle, mut rx) = watch_entries(Arc::clone(&owner)).unwrap();
        let guest = CacheStore::open_guest(dir.path()).unwrap();
        let k = commit(&guest, 7, 8192);
        assert_eq!(next(&mut rx).await, EntryChange::Adopted { key: k.clone() });
        assert!(owner.get(&k).is_some(), "indexed without reopening");
        assert!(owner.used_bytes() >= 8192, "and counted against the budget");
    }

    #[tokio::test]
    async fn external_changes_are_lost_entries_and_the_stores_own_writes_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CacheStore::open(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        let store = Arc::new(store);
        let deleted = commit(&store, 1, 8192);
        let rewritten = commit(&store, 2, 8192);
        let evicted = commit(&store, 3, 8192);
        let (_handle, mut rx) = watch_entries(Arc::clone(&store)).unwrap();

        // The store's own writes: a commit, a touch, a removal. None of them may be reported;
        // the external deletion after them is, and events arrive in order, so the first
        // change must be that deletion.
        let fresh = commit(&store, 4, 8192);
        store.touch(&deleted);
        store.touch(&fresh);
        assert!(store.remove(&evicted).unwrap());
        std::fs::remove_file(store.get(&deleted).unwrap().disk_path).unwrap();
        assert_eq!(
            next(&mut rx).await,
            EntryChange::Lost {
                key: deleted.clone(),
                reason: LossReason::DiskDeleted
            }
        );
        assert!(store.get(&deleted).is_none());
        assert!(
            !store.entry_dir(&deleted).unwrap().exists(),
            "the leftover meta.json goes too"
        );

        // Same length, and possibly the same mtime tick: the data write itself gives it away.
        let path = store.get(&rewritten).unwrap().disk_path;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"evil", 0)
            .unwrap();
        assert_eq!(
            next(&mut rx).await,
            EntryChange::Lost {
                key: rewritten.clone(),
                reason: LossReason::DiskModified
            }
        );
        assert!(store.get(&rewritten).is_none());
        assert!(
            !store.entry_dir(&rewritten).unwrap().exists(),
            "an altered entry is deleted"
        );

        // The entry committed under the watch is watched too.
        std::fs::remove_file(store.entry_dir(&fresh).unwrap().join("meta.json")).unwrap();
        assert_eq!(
            next(&mut rx).await,
            EntryChange::Lost {
                key: fresh.clone(),
                reason: LossReason::MetaDeleted
            }
        );
        assert!(store.entries().is_empty());
        assert!(rx.try_recv().is_err(), "nothing else was reported");
    }

    #[test]
    fn a_missing_cache_root_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) =
            CacheStore::open(&dir.path().join("cache"), Budget::Bytes(1 << 30)).unwrap();
        std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
        let err = watch_entries(Arc::new(store)).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("entries"), "{err}");
    }
}

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
//! notify's thread only maps events to checks; a worker thread of the watch does the checking,
//! so notify drains its queue and watches a new entry directory at once. notify can only watch
//! a new directory after it has seen the rename that created it, so a change made in that gap
//! would go unseen: every entry that appears is checked once more `RECHECK_NEW_ENTRY` later.

use std::collections::VecDeque;
use std::path::{Component, Path, PathBuf};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::{Duration, Instant};

use notify::event::{EventKind, ModifyKind};
use notify::{Event, RecommendedWatcher, RecursiveMode, Watcher};
use thiserror::Error;
use tokio::sync::mpsc;

use crate::store::{CacheStore, EntryKey, LossReason};

/// Lost entries wait here while the agent is busy; a full queue holds the watcher back rather
/// than dropping a loss.
const QUEUE: usize = 64;

/// How long after an entry directory appears it is checked again (see the module comment).
const RECHECK_NEW_ENTRY: Duration = Duration::from_millis(500);

#[derive(Debug, Error)]
pub enum WatchError {
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
    #[error("cannot start the cache watch's worker thread: {0}")]
    Worker(#[source] std::io::Error),
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
    Entry {
        key: EntryKey,
        disk_written: bool,
        /// The entry directory itself was created or renamed in.
        appeared: bool,
    },
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
    let appeared = matches!(
        event.kind,
        EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(_))
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
            let file = parts.next();
            let is_disk = file.as_ref().is_some_and(|f| f.starts_with("disk."));
            Check::Entry {
                key,
                disk_written: disk_written && is_disk,
                appeared: file.is_none() && appeared,
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
    let (checks_tx, checks_rx) = std_mpsc::channel::<Check>();
    let watched = entries_dir.clone();
    // On notify's thread: map only, so its queue drains and new directories are watched at once.
    let handler = move |result: notify::Result<Event>| {
        let checks = match result {
            Ok(event) => check_for(&watched, &event),
            Err(e) => {
                tracing::warn!(error = %e, "cache watch error; checking every entry");
                vec![Check::Everything]
            }
        };
        for check in checks {
            // A closed worker means the watch is being dropped.
            let _ = checks_tx.send(check);
        }
    };
    std::thread::Builder::new()
        .name("cache-watch".into())
        .spawn(move || run_checks(&store, &checks_rx, &tx))
        .map_err(WatchError::Worker)?;
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

/// The worker: carries out checks as they come and rechecks new entries once their gap has
/// passed. Ends when the watcher (and with it the sending half) is dropped or the agent stops
/// listening.
fn run_checks(
    store: &CacheStore,
    checks: &std_mpsc::Receiver<Check>,
    tx: &mpsc::Sender<EntryChange>,
) {
    let mut rechecks: VecDeque<(Instant, EntryKey)> = VecDeque::new();
    loop {
        let received = match rechecks.front() {
            Some((due, _)) => checks.recv_timeout(due.saturating_duration_since(Instant::now())),
            None => checks
                .recv()
                .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected),
        };
        let mut changes = Vec::new();
        match received {
            Ok(Check::Nothing) => {}
            Ok(Check::Entry {
                key,
                disk_written,
                appeared,
            }) => {
                if appeared {
                    rechecks.push_back((Instant::now() + RECHECK_NEW_ENTRY, key.clone()));
                }
                changes.extend(check_entry(store, key, disk_written));
            }
            Ok(Check::Everything) => changes.extend(
                store
                    .revalidate_all()
                    .into_iter()
                    .map(|(key, reason)| EntryChange::Lost { key, reason }),
            ),
            Err(std_mpsc::RecvTimeoutError::Timeout) => {
                while rechecks
                    .front()
                    .is_some_and(|(due, _)| *due <= Instant::now())
                {
                    if let Some((_, key)) = rechecks.pop_front() {
                        changes.extend(check_entry(store, key, false));
                    }
                }
            }
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        }
        for change in changes {
            // Outside any runtime, so blocking_send is allowed; a closed receiver means the
            // agent is shutting down.
            if tx.blocking_send(change).is_err() {
                return;
            }
        }
    }
}

/// One entry against what the store recorded: lost, adopted from another process, or nothing.
fn check_entry(store: &CacheStore, key: EntryKey, disk_written: bool) -> Option<EntryChange> {
    if let Some(reason) = store.revalidate(&key, disk_written) {
        Some(EntryChange::Lost { key, reason })
    } else if store.get(&key).is_none() && store.get_or_adopt(&key).is_some() {
        Some(EntryChange::Adopted { key })
    } else {
        None
    }
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
            appeared: false,
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
            vec![Check::Entry {
                key: key(1),
                disk_written: false,
                appeared: true
            }]
        );
        assert_eq!(
            check_for(
                root,
                &event(
                    EventKind::Modify(ModifyKind::Name(notify::event::RenameMode::To)),
                    dir.join("meta.json")
                )
            ),
            vec![entry(false)],
            "a file renamed into an entry is no new entry"
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
            pull: None,
        };
        store.commit(staging, k.clone(), &disk, meta).unwrap();
        k
    }

    /// The next change. The timeout only bounds a failing test; events normally arrive in
    /// milliseconds.
    async fn next(rx: &mut mpsc::Receiver<EntryChange>, what: &str) -> EntryChange {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap_or_else(|_| panic!("{what} not reported within 10 s"))
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
        assert_eq!(
            next(&mut rx, "the adoption").await,
            EntryChange::Adopted { key: k.clone() }
        );
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
            next(&mut rx, "the deleted disk").await,
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
            next(&mut rx, "the rewritten disk").await,
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
            next(&mut rx, "the deleted meta.json").await,
            EntryChange::Lost {
                key: fresh.clone(),
                reason: LossReason::MetaDeleted
            }
        );
        assert!(store.entries().is_empty());
        assert!(rx.try_recv().is_err(), "nothing else was reported");
    }

    #[tokio::test]
    async fn a_new_entry_changed_before_notify_watches_it_is_caught_by_the_recheck() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = CacheStore::open(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        let store = Arc::new(store);
        let (checks_tx, checks_rx) = std_mpsc::channel();
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let worker = Arc::clone(&store);
        std::thread::spawn(move || run_checks(&worker, &checks_rx, &tx));
        // The directory appeared (and is intact when first checked); its change afterwards
        // comes with no event at all, as when notify had not watched it yet.
        let fresh = commit(&store, 5, 4096);
        checks_tx
            .send(Check::Entry {
                key: fresh.clone(),
                disk_written: false,
                appeared: true,
            })
            .unwrap();
        // Let the first check see the entry intact (it reports nothing then).
        tokio::time::sleep(RECHECK_NEW_ENTRY / 5).await;
        std::fs::remove_file(store.entry_dir(&fresh).unwrap().join("meta.json")).unwrap();
        assert_eq!(
            next(&mut rx, "the recheck's finding").await,
            EntryChange::Lost {
                key: fresh,
                reason: LossReason::MetaDeleted
            }
        );
        drop(checks_tx);
        assert!(rx.recv().await.is_none(), "the worker ends with the watch");
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

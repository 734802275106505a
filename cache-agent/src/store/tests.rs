//! The store as a whole, on real directories: commit and reopen, broken entries, staging
//! cleanup, owners and guests, leases against eviction, single-flight warms, and crashes (a
//! child process killed at chosen points, then the cache reopened).

use super::lock::soon;
use super::meta::META_FILE;
use super::*;
use chrono::Utc;
use std::time::{Duration, Instant};
use vmdisk_crds::DiskFormat;

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

pub(super) fn key(n: u8, format: DiskFormat) -> EntryKey {
    EntryKey {
        digest: format!("sha256:{}", format!("{n:02x}").repeat(32)),
        format,
    }
}

pub(super) fn raw(n: u8) -> EntryKey {
    key(n, DiskFormat::Raw)
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
        pull: None,
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

/// Opens the cache as its owner; a store this test just dropped may still own it for a moment
/// (see [`soon`]).
pub(super) fn open(root: &Path, budget: u64) -> (CacheStore, OpenReport) {
    soon("the previous owner let go", || {
        match CacheStore::open(root, Budget::Bytes(budget)) {
            Err(StoreError::Owned(_)) => None,
            other => Some(other.unwrap()),
        }
    })
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
    assert_eq!(
        soon("the lease let go", || store.make_room(700 << 10).ok()),
        vec![k3.clone()]
    );
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
    // Nobody owns it any more.
    soon("the owner let go", || {
        let (next, _) = CacheStore::open_shared(dir.path(), Budget::Bytes(1 << 30)).unwrap();
        (next.role() == StoreRole::Owner).then_some(next)
    });
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

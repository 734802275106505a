//! `vmdisk-cache-agent populate` for real: the shipped binary into files and loop block
//! devices, sharing a cache directory with an agent that owns it, with the exit status and
//! termination message a populator pod reports.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use vmdisk_cache_agent::store::{Budget, CacheStore, EntryKey};
use vmdisk_cache_agent::warm::extract::ExtractLimits;
use vmdisk_cache_agent::warm::{WarmRequest, Warmer};
use vmdisk_crds::DiskFormat;
use vmdisk_registry::pull::{Puller, PullerConfig};
use vmdisk_tests::disks::{allocated, make_ext4_raw, same_content, to_format};
use vmdisk_tests::loopfs::{is_root, LoopDevice, LoopMount};
use vmdisk_tests::push::{options_for, push_container_disk};
use vmdisk_tests::registry::TestRegistry;
use vmdisk_tests::throttle::ThrottledProxy;

fn agent_binary() -> PathBuf {
    let path = std::env::current_exe()
        .unwrap()
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("vmdisk-cache-agent");
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins`, part of the README's test command)",
        path.display()
    );
    path
}

struct Run {
    code: i32,
    stderr: String,
    termination: String,
}

/// Runs `populate` as a pod does, with a termination log.
fn populate(cache: &Path, reference: &str, target: &Path, extra: &[&str]) -> Run {
    let log = target.with_extension("termination-log");
    let out = Command::new(agent_binary())
        .arg("populate")
        .arg(reference)
        .arg("--cache-dir")
        .arg(cache)
        .arg("--target")
        .arg(target)
        .arg("--termination-log")
        .arg(&log)
        .args(["--insecure"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        termination: std::fs::read_to_string(&log).unwrap_or_default(),
    }
}

fn owner_of(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.uid(), m.gid())
}

#[tokio::test]
async fn into_a_file_sparse_sized_to_the_volume_and_owned_by_qemu() {
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "file", 32, 4, 11);
    let qcow2 = to_format(&raw, "qcow2", true);
    let (reference, digest) = push_container_disk(&registry, "disks/file", "1", &qcow2).await;
    let pinned = format!("{reference}@{digest}");
    let cache = work.path().join("cache");
    let target = work.path().join("disk.img");
    let mut extra = vec!["--size", "40Mi"];
    if is_root() {
        extra.extend(["--owner", "107:107"]);
    }
    let run = populate(&cache, &pinned, &target, &extra);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.termination.contains("cold: pulled"),
        "{}",
        run.termination
    );
    assert_eq!(std::fs::metadata(&target).unwrap().len(), 40 << 20);
    assert!(
        allocated(&target) < 12 << 20,
        "not sparse: {}",
        allocated(&target)
    );
    let head = work.path().join("head.raw");
    std::fs::write(&head, &std::fs::read(&target).unwrap()[..32 << 20]).unwrap();
    assert!(
        same_content(&raw, &head),
        "the volume holds the source disk, raw"
    );
    if is_root() {
        assert_eq!(owner_of(&target), (107, 107));
    } else {
        println!("owner 107:107 not checked: chown needs root");
    }

    // Again, warm: a cache hit.
    let again = work.path().join("again.img");
    let run = populate(&cache, &pinned, &again, &["--size", "32Mi"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.termination.contains("warm: cache hit"),
        "{}",
        run.termination
    );

    // A volume smaller than the disk: permanent, and said so.
    let small = work.path().join("small.img");
    let run = populate(&cache, &pinned, &small, &["--size", "16Mi"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.termination
            .contains("the disk needs 33554432 bytes but the volume offers 16777216 bytes"),
        "{}",
        run.termination
    );
    // An image that does not exist: permanent too.
    let missing = format!("{}/disks/missing@sha256:{}", registry.addr, "ab".repeat(32));
    let run = populate(&cache, &missing, &work.path().join("m.img"), &[]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(run.termination.contains("not found"), "{}", run.termination);
    // A registry that is down is worth retrying: not permanent.
    let down = format!("127.0.0.1:9/disks/x@sha256:{}", "cd".repeat(32));
    let run = populate(&cache, &down, &work.path().join("d.img"), &[]);
    assert_eq!(run.code, 1, "{}", run.stderr);
}

#[tokio::test]
async fn into_a_loop_block_device_with_stale_data_overwritten() {
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "block", 24, 3, 12);
    let (reference, digest) = push_container_disk(&registry, "disks/block", "1", &raw).await;
    let pinned = format!("{reference}@{digest}");
    // The device starts full of garbage: holes of the disk must read back as zeros.
    let backing = work.path().join("device.img");
    std::fs::write(&backing, vec![0xa5u8; 32 << 20]).unwrap();
    let device = match LoopDevice::attach(&backing) {
        Ok(device) => device,
        Err(why) => return println!("skipped: {why}"),
    };
    let run = populate(&work.path().join("cache"), &pinned, &device.device, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let head = work.path().join("head.raw");
    std::fs::write(&head, &std::fs::read(&device.device).unwrap()[..24 << 20]).unwrap();
    assert!(
        same_content(&raw, &head),
        "the device holds the disk, holes zeroed"
    );

    // A device smaller than the disk is refused for good.
    let small = work.path().join("small.img");
    std::fs::write(&small, vec![0u8; 8 << 20]).unwrap();
    let small = LoopDevice::attach(&small).unwrap();
    let run = populate(&work.path().join("cache"), &pinned, &small.device, &[]);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.termination.contains("the disk needs"),
        "{}",
        run.termination
    );
}

/// The node's agent owns the cache and warms an image while a populator pod (another process)
/// needs the same image cold: one pull, both succeed, nothing half-written is ever visible,
/// and the owner's cleanup and eviction leave the populate alone.
#[tokio::test]
async fn racing_the_agent_on_one_cache_loses_nothing() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "race", 48, 16, 13);
    let (_, digest) = push_container_disk(&registry, "disks/race", "1", &raw).await;
    // Slow enough (~2 s) that the two overlap for sure.
    let proxy = ThrottledProxy::start("127.0.0.1", &registry.addr, 5 << 20).await;
    let pinned = format!("{}/disks/race:1@{digest}", proxy.addr);
    let cache = work.path().join("cache");
    let (owner, _) = CacheStore::open(&cache, Budget::Bytes(1 << 30)).unwrap();
    let owner = Arc::new(owner);
    let warmer = Warmer::new(
        Arc::clone(&owner),
        Puller::new(PullerConfig::default()),
        ExtractLimits::default(),
    );
    let mut options = options_for(&registry);
    options.insecure = true;
    let target = work.path().join("vm.img");
    let populate_task = {
        let (cache, pinned, target) = (cache.clone(), pinned.clone(), target.clone());
        tokio::task::spawn_blocking(move || populate(&cache, &pinned, &target, &[]))
    };
    // Let the populate process start its cold warm first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let agent_warm = warmer.warm(
        WarmRequest {
            reference: pinned.clone(),
            format: DiskFormat::Raw,
            registry: options,
        },
        Arc::new(|_| {}),
    );
    let (run, outcome) = tokio::join!(populate_task, agent_warm);
    let run = run.unwrap();
    let outcome = outcome.unwrap();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(same_content(&raw, &target));
    assert!(same_content(&raw, &outcome.entry.disk_path));
    assert_eq!(
        registry.blob_gets(&layer_digest(&registry, &digest)),
        1,
        "one pull between the two processes"
    );
    // The owner indexes what the populate committed, and staging is empty again.
    let key = EntryKey {
        digest: digest.clone(),
        format: DiskFormat::Raw,
    };
    assert!(owner.get_or_adopt(&key).is_some());
    let staging: Vec<_> = std::fs::read_dir(cache.join("staging")).unwrap().collect();
    assert!(staging.is_empty(), "{staging:?}");
}

/// The digest of the one layer of the image `manifest_digest`, from the registry's storage.
fn layer_digest(registry: &TestRegistry, manifest_digest: &str) -> String {
    let manifest = std::fs::read(registry.blob_path(manifest_digest)).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn the_owner_cleanup_and_eviction_spare_a_populate_in_progress() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "spare", 48, 16, 14);
    let (_, digest) = push_container_disk(&registry, "disks/spare", "1", &raw).await;
    let proxy = ThrottledProxy::start("127.0.0.1", &registry.addr, 5 << 20).await;
    let pinned = format!("{}/disks/spare:1@{digest}", proxy.addr);
    let cache = work.path().join("cache");
    std::fs::create_dir_all(&cache).unwrap();
    let target = work.path().join("vm.img");
    let populate_task = {
        let (cache, pinned, target) = (cache.clone(), pinned.clone(), target.clone());
        tokio::task::spawn_blocking(move || populate(&cache, &pinned, &target, &[]))
    };
    // An agent (re)starts while the populate downloads into staging.
    let staging = cache.join("staging");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&staging).map(|d| d.count()).unwrap_or(0) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "populate never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (owner, report) = CacheStore::open(&cache, Budget::Bytes(1 << 30)).unwrap();
    assert_eq!(report.removed_staging, 0);
    assert_eq!(
        report.busy_staging, 1,
        "the populate's download is left alone"
    );
    let run = populate_task.await.unwrap();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(same_content(&raw, &target));
    let key = EntryKey {
        digest,
        format: DiskFormat::Raw,
    };
    assert!(owner.get_or_adopt(&key).is_some());
}

#[tokio::test]
async fn on_xfs_a_warm_populate_is_a_reflink_the_target_can_write_over() {
    let work = tempfile::tempdir().unwrap();
    let xfs = match LoopMount::xfs(work.path(), 512) {
        Ok(xfs) => xfs,
        Err(why) => return println!("skipped: {why}"),
    };
    let registry = TestRegistry::start_plain();
    let raw = make_ext4_raw(work.path(), "reflink", 64, 8, 21);
    let (reference, digest) = push_container_disk(&registry, "disks/reflink", "1", &raw).await;
    let pinned = format!("{reference}@{digest}");
    let cache = xfs.path.join("cache");
    let first = xfs.path.join("first.img");
    let run = populate(&cache, &pinned, &first, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    let second = xfs.path.join("second.img");
    let run = populate(&cache, &pinned, &second, &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.termination.contains("(Reflink, 0 bytes written") && run.termination.contains("warm"),
        "{}",
        run.termination
    );
    assert!(same_content(&raw, &second));
    // The VM writes to its disk: the shared blocks are copied, the cache entry is untouched.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&second)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 1 << 20], 0))
        .unwrap();
    assert!(!same_content(&raw, &second));
    let store = CacheStore::open_guest(&cache).unwrap();
    let key = EntryKey {
        digest,
        format: DiskFormat::Raw,
    };
    let entry = store.get(&key).expect("the entry is cached");
    assert!(same_content(&raw, &entry.disk_path), "the entry changed");
}

/// `--parallel-copies 1`: while another process holds the node's one copy slot, a warm populate
/// waits (its target stays empty) and copies the moment the slot is let go.
#[tokio::test]
async fn a_populate_waits_for_a_free_copy_slot() {
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "slot", 16, 2, 21);
    let (reference, digest) = push_container_disk(&registry, "disks/slot", "1", &raw).await;
    let pinned = format!("{reference}@{digest}");
    let cache = work.path().join("cache");
    let first = populate(&cache, &pinned, &work.path().join("first.img"), &[]);
    assert_eq!(first.code, 0, "{}", first.stderr);

    // Another populate's copy, as `flock` holding the slot file.
    let slot = cache.join("slots/copy-0.lock");
    let mut holder = Command::new("flock")
        .args(["--exclusive", "--close"])
        .arg(&slot)
        .args(["sleep", "60"])
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let free = |slot: &Path| {
        Command::new("flock")
            .args(["--nonblock", "--exclusive"])
            .arg(slot)
            .arg("true")
            .status()
            .unwrap()
            .success()
    };
    while free(&slot) {
        assert!(
            std::time::Instant::now() < deadline,
            "flock never took the slot"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let target = work.path().join("second.img");
    let waiting = {
        let (cache, pinned, target) = (cache.clone(), pinned.clone(), target.clone());
        std::thread::spawn(move || populate(&cache, &pinned, &target, &["--parallel-copies", "1"]))
    };
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !waiting.is_finished(),
        "it copied while the only slot was held"
    );
    assert!(
        std::fs::metadata(&target).map_or(0, |m| m.len()) == 0,
        "the target was written before a slot was free"
    );
    holder.kill().unwrap();
    holder.wait().unwrap();
    let second = waiting.join().unwrap();
    assert_eq!(second.code, 0, "{}", second.stderr);
    assert!(
        second.termination.contains("warm: cache hit"),
        "{}",
        second.termination
    );
    assert!(same_content(&raw, &target));
}

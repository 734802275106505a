//! The cache agent's warm pipeline against a real registry, real qemu-img and real files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use oci_client::secrets::RegistryAuth;
use vmdisk_cache_agent::store::{Budget, CacheStore};
use vmdisk_cache_agent::warm::convert::ConvertError;
use vmdisk_cache_agent::warm::extract::{ExtractError, ExtractLimits};
use vmdisk_cache_agent::warm::{Conversion, WarmError, WarmOutcome, WarmRequest, Warmer};
use vmdisk_crds::DiskFormat;
use vmdisk_registry::pull::{PlatformSpec, PullError, Puller, PullerConfig, RetryPolicy};
use vmdisk_tests::disks::{allocated, make_ext4_raw, same_content, to_format};
use vmdisk_tests::push::{
    options_for, push_container_disk, push_index, push_layers, LayerSpec, TAR, TAR_GZIP, TAR_ZSTD,
};
use vmdisk_tests::registry::TestRegistry;
use vmdisk_tests::throttle::ThrottledProxy;

fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn warmer(root: &Path, budget: Budget) -> Warmer {
    warmer_with(
        root,
        budget,
        ExtractLimits {
            max_disk_bytes: 1 << 30,
            ..ExtractLimits::default()
        },
    )
}

fn warmer_with(root: &Path, budget: Budget, limits: ExtractLimits) -> Warmer {
    let (store, _) = CacheStore::open(root, budget).unwrap();
    Warmer::new(
        Arc::new(store),
        Puller::new(PullerConfig {
            max_parallel_pulls: 2,
            retry: RetryPolicy {
                max_attempts: 8,
                backoff: vmdisk_support::Backoff::new(
                    Duration::from_millis(100),
                    Duration::from_secs(2),
                ),
            },
        }),
        limits,
    )
}

async fn warm(
    w: &Warmer,
    registry: &TestRegistry,
    reference: &str,
    format: DiskFormat,
) -> Result<WarmOutcome, Arc<WarmError>> {
    w.warm(
        WarmRequest {
            reference: reference.to_string(),
            format,
            registry: options_for(registry),
        },
        Arc::new(|_| {}),
    )
    .await
}

/// Nothing but complete entries (and records of verified pulls, lock and copy-slot files) in the
/// cache root, and an empty staging area.
fn assert_clean(root: &Path) {
    let staging: Vec<_> = std::fs::read_dir(root.join("staging")).unwrap().collect();
    assert!(staging.is_empty(), "staging not empty: {staging:?}");
    let mut top: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    top.sort();
    top.retain(|name| name != "owner.lock" && name != "verified" && name != "attempts");
    assert_eq!(top, ["entries", "leases", "locks", "slots", "staging"]);
}

#[tokio::test]
async fn every_source_format_warms_equal_and_sparse() {
    init();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "disk", 48, 10, 1);
    let qcow2 = to_format(&raw, "qcow2", false);
    let compressed = to_format(&raw, "qcow2", true);
    let vmdk = to_format(&raw, "vmdk", false);
    let cache = tempfile::tempdir().unwrap();
    let w = warmer(cache.path(), Budget::Bytes(10 << 30));
    let stream_optimized = to_format(&raw, "vmdk", true);
    use Conversion::{QemuImg, Streamed, Unneeded};
    let cases = [
        (&raw, "raw", DiskFormat::Raw, Unneeded),
        (&qcow2, "qcow2", DiskFormat::Raw, Streamed),
        (&compressed, "cqcow2", DiskFormat::Qcow2, Unneeded),
        (&compressed, "cqcow2", DiskFormat::Raw, Streamed),
        (&vmdk, "vmdk", DiskFormat::Raw, Streamed),
        (&vmdk, "vmdk", DiskFormat::Qcow2, QemuImg),
        (&stream_optimized, "so-vmdk", DiskFormat::Raw, Streamed),
        (&raw, "raw", DiskFormat::Qcow2, QemuImg),
    ];
    for (disk, tag, format, conversion) in cases {
        let (reference, digest) = push_container_disk(&registry, "disks/fedora", tag, disk).await;
        let outcome = warm(&w, &registry, &reference, format)
            .await
            .unwrap_or_else(|e| panic!("{tag}->{format}: {e}"));
        assert!(outcome.pulled);
        assert_eq!(outcome.conversion, conversion, "{tag}->{format}");
        let entry = &outcome.entry;
        assert_eq!(entry.key.digest, digest);
        assert_eq!(entry.key.format, format);
        assert_eq!(entry.meta.virtual_size, 48 << 20);
        assert!(
            same_content(&raw, &entry.disk_path),
            "{tag}->{format}: cached disk differs from the source"
        );
        assert!(
            allocated(&entry.disk_path) < 24 << 20,
            "{tag}->{format}: not sparse ({} bytes)",
            allocated(&entry.disk_path)
        );
        let again = warm(&w, &registry, &reference, format).await.unwrap();
        assert!(!again.pulled, "second warm must be a cache hit");
    }
    assert_eq!(w.store().entries().len(), cases.len());
    assert_clean(cache.path());
}

/// A streaming decode that may not run far enough ahead of its tables gives up half-way; the
/// warm streams the layer again, keeps the disk as it is and converts it with qemu-img.
#[tokio::test]
async fn a_decode_that_gives_up_half_way_is_done_by_qemu_img() {
    init();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "ahead", 32, 8, 4);
    let qcow2 = to_format(&raw, "qcow2", false);
    let (reference, _) = push_container_disk(&registry, "disks/ahead", "1", &qcow2).await;
    let cache = tempfile::tempdir().unwrap();
    // The header's tables fit; the data clusters the L2 table names do not.
    let w = warmer_with(
        cache.path(),
        Budget::Bytes(1 << 30),
        ExtractLimits {
            max_disk_bytes: 1 << 30,
            max_pending_reads: 4,
            ..ExtractLimits::default()
        },
    );
    let outcome = warm(&w, &registry, &reference, DiskFormat::Raw)
        .await
        .unwrap();
    assert_eq!(outcome.conversion, Conversion::QemuImg);
    assert_eq!(
        w.puller().downloads_started(),
        2,
        "the layer is streamed again after the decode gave up"
    );
    assert!(same_content(&raw, &outcome.entry.disk_path));
    assert_clean(cache.path());
}

#[tokio::test]
async fn tls_with_htpasswd_and_wrong_credentials() {
    init();
    let registry = TestRegistry::start_tls_htpasswd("vmdisk", "correct horse");
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "tls", 16, 2, 2);
    let (reference, _) = push_container_disk(&registry, "disks/tls", "1", &raw).await;
    let cache = tempfile::tempdir().unwrap();
    let w = warmer(cache.path(), Budget::Bytes(1 << 30));
    let ok = warm(&w, &registry, &reference, DiskFormat::Raw)
        .await
        .unwrap();
    assert!(same_content(&raw, &ok.entry.disk_path));

    let cache2 = tempfile::tempdir().unwrap();
    let w2 = warmer(cache2.path(), Budget::Bytes(1 << 30));
    let mut wrong = options_for(&registry);
    wrong.auth = RegistryAuth::Basic("vmdisk".into(), "wrong".into());
    let err = w2
        .warm(
            WarmRequest {
                reference: reference.clone(),
                format: DiskFormat::Raw,
                registry: wrong,
            },
            Arc::new(|_| {}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            &*err,
            WarmError::Pull {
                source: PullError::Unauthorized { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("pull secret"), "{err}");

    let mut no_ca = options_for(&registry);
    no_ca.ca_bundle_pem = None;
    let err = w2
        .warm(
            WarmRequest {
                reference: reference.clone(),
                format: DiskFormat::Raw,
                registry: no_ca,
            },
            Arc::new(|_| {}),
        )
        .await
        .unwrap_err();
    let text = vmdisk_cache_agent::error_chain(&*err);
    assert!(text.to_lowercase().contains("certificate"), "{text}");
    assert!(w2.store().entries().is_empty());
    assert_clean(cache2.path());
}

#[tokio::test]
async fn multi_layer_images_honour_whiteouts_and_compressions() {
    init();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let old = make_ext4_raw(work.path(), "old", 16, 2, 3);
    let new = make_ext4_raw(work.path(), "new", 16, 2, 4);
    let layers = [
        LayerSpec::disk(&old, "old.img", TAR_ZSTD),
        LayerSpec {
            entries: vec![
                ("disk/.wh.old.img".into(), vec![]),
                ("disk/new.img".into(), std::fs::read(&new).unwrap()),
            ],
            media_type: TAR,
        },
        LayerSpec {
            entries: vec![("etc/motd".into(), b"hello".to_vec())],
            media_type: TAR_GZIP,
        },
    ];
    let (reference, _) = push_layers(&registry, "disks/layered", "1", &layers).await;
    let cache = tempfile::tempdir().unwrap();
    let w = warmer(cache.path(), Budget::Bytes(1 << 30));
    let outcome = warm(&w, &registry, &reference, DiskFormat::Raw)
        .await
        .unwrap();
    assert!(same_content(&new, &outcome.entry.disk_path));
    assert!(!same_content(&old, &outcome.entry.disk_path));
}

#[tokio::test]
async fn index_resolves_to_the_nodes_platform() {
    init();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let amd = make_ext4_raw(work.path(), "amd", 16, 2, 5);
    let arm = make_ext4_raw(work.path(), "arm", 16, 2, 6);
    let (_, amd_digest) = push_container_disk(&registry, "disks/multi", "amd64", &amd).await;
    let (_, arm_digest) = push_container_disk(&registry, "disks/multi", "arm64", &arm).await;
    let (reference, index_digest) = push_index(
        &registry,
        "disks/multi",
        "latest",
        &[
            ("linux", "amd64", &amd_digest),
            ("linux", "arm64", &arm_digest),
        ],
    )
    .await;
    for (arch, expected) in [("amd64", &amd), ("arm64", &arm)] {
        let cache = tempfile::tempdir().unwrap();
        let w = warmer(cache.path(), Budget::Bytes(1 << 30));
        let mut options = options_for(&registry);
        options.platform = PlatformSpec {
            os: "linux".into(),
            architecture: arch.into(),
        };
        let outcome = w
            .warm(
                WarmRequest {
                    reference: reference.clone(),
                    format: DiskFormat::Raw,
                    registry: options,
                },
                Arc::new(|_| {}),
            )
            .await
            .unwrap();
        assert_eq!(
            outcome.entry.key.digest, index_digest,
            "the cache key is the index digest every node shares"
        );
        assert!(same_content(expected, &outcome.entry.disk_path), "{arch}");
    }
    let cache = tempfile::tempdir().unwrap();
    let w = warmer(cache.path(), Budget::Bytes(1 << 30));
    let mut options = options_for(&registry);
    options.platform = PlatformSpec {
        os: "linux".into(),
        architecture: "riscv64".into(),
    };
    let err = w
        .warm(
            WarmRequest {
                reference,
                format: DiskFormat::Raw,
                registry: options,
            },
            Arc::new(|_| {}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            &*err,
            WarmError::Pull {
                source: PullError::NoMatchingPlatform { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("linux/arm64"), "{err}");
}

#[tokio::test]
async fn corrupted_blob_is_refused_and_nothing_is_kept() {
    init();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "c", 16, 2, 7);
    let layer = LayerSpec::disk(&raw, "c.raw", TAR_GZIP).encode();
    let layer_digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&layer))
    );
    let (reference, _) = vmdisk_tests::push::push_blobs(
        &registry,
        "disks/corrupt",
        "1",
        vec![(layer.clone(), TAR_GZIP)],
    )
    .await;
    let blob = registry.blob_path(&layer_digest);
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let cache = tempfile::tempdir().unwrap();
    let w = warmer(cache.path(), Budget::Bytes(1 << 30));
    let err = warm(&w, &registry, &reference, DiskFormat::Raw)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &*err,
            WarmError::Pull {
                source: PullError::DigestMismatch { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(w.store().entries().is_empty());
    assert_clean(cache.path());
}

#[tokio::test]
async fn hostile_images_are_refused_with_nothing_outside_staging() {
    init();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "h", 16, 1, 8);
    let child = work.path().join("child.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args([
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "/etc/hostname",
            "-F",
            "raw",
        ])
        .arg(&child)
        .arg("16M")
        .output()
        .unwrap();
    assert!(out.status.success());
    let disk = std::fs::read(&raw).unwrap();
    type Case = (&'static str, Vec<LayerSpec>, fn(&WarmError) -> bool);
    let cases: Vec<Case> = vec![
        (
            "two-disks",
            vec![LayerSpec {
                entries: vec![
                    ("disk/a.img".into(), disk.clone()),
                    ("disk/b.img".into(), disk.clone()),
                ],
                media_type: TAR,
            }],
            |e| {
                matches!(
                    e,
                    WarmError::Extract {
                        source: ExtractError::MultipleDisks { .. },
                        ..
                    }
                )
            },
        ),
        (
            "no-disk",
            vec![LayerSpec {
                entries: vec![("etc/x".into(), b"x".to_vec())],
                media_type: TAR,
            }],
            |e| {
                matches!(
                    e,
                    WarmError::Extract {
                        source: ExtractError::NoDisk,
                        ..
                    }
                )
            },
        ),
        (
            "backing-file",
            vec![LayerSpec::disk(&child, "disk.qcow2", TAR_GZIP)],
            |e| {
                // Refused by the streaming qcow2 decoder (raw wanted) or by qemu-img info.
                matches!(
                    e,
                    WarmError::Convert {
                        source: ConvertError::BackingFile { .. },
                        ..
                    } | WarmError::Extract {
                        source: vmdisk_cache_agent::warm::extract::ExtractError::Disk {
                            source: vmdisk_cache_agent::warm::decode::DecodeError::BackingFile(_),
                            ..
                        },
                        ..
                    }
                ) && e.is_permanent()
            },
        ),
    ];
    for (tag, layers, expected) in cases {
        let (reference, _) = push_layers(&registry, "disks/hostile", tag, &layers).await;
        let cache = tempfile::tempdir().unwrap();
        let w = warmer(cache.path(), Budget::Bytes(1 << 30));
        let err = warm(&w, &registry, &reference, DiskFormat::Raw)
            .await
            .unwrap_err();
        assert!(expected(&err), "{tag}: {err}");
        assert!(w.store().entries().is_empty());
        assert_clean(cache.path());
    }
    // Path traversal in a pushed layer (the tar builder refuses such names, so write the
    // header by hand).
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_old();
    let name = b"disk/../../../escaped";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_size(4);
    h.set_mode(0o644);
    h.set_cksum();
    b.append(&h, &b"evil"[..]).unwrap();
    let (reference, _) = vmdisk_tests::push::push_blobs(
        &registry,
        "disks/hostile",
        "traversal",
        vec![(b.into_inner().unwrap(), TAR)],
    )
    .await;
    let cache = tempfile::tempdir().unwrap();
    let w = warmer(cache.path(), Budget::Bytes(1 << 30));
    let err = warm(&w, &registry, &reference, DiskFormat::Raw)
        .await
        .unwrap_err();
    assert!(
        matches!(
            &*err,
            WarmError::Extract {
                source: ExtractError::PathTraversal { .. },
                ..
            }
        ),
        "{err}"
    );
    assert_clean(cache.path());
    assert!(!cache.path().parent().unwrap().join("escaped").exists());
}

#[tokio::test]
async fn registry_killed_mid_pull_then_restarted_resumes() {
    init();
    let mut registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    // Incompressible and uncompressed: the pull takes long enough to be interrupted.
    let raw = work.path().join("big.raw");
    let mut data = vec![0u8; 48 << 20];
    vmdisk_tests::disks::pseudo_random(9, &mut data);
    std::fs::write(&raw, &data).unwrap();
    drop(data);
    let (reference, _) = push_layers(
        &registry,
        "disks/big",
        "1",
        &[LayerSpec::disk(&raw, "big.raw", TAR)],
    )
    .await;
    let cache = tempfile::tempdir().unwrap();
    let w = warmer(cache.path(), Budget::Bytes(1 << 30));
    let pulled = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = Arc::clone(&pulled);
    let request = WarmRequest {
        reference: reference.clone(),
        format: DiskFormat::Raw,
        registry: options_for(&registry),
    };
    let task = {
        let w = w.clone();
        tokio::spawn(async move {
            w.warm(
                request,
                Arc::new(move |p| {
                    if let vmdisk_cache_agent::warm::WarmProgress::Pulling { done, .. } = p {
                        seen.store(done, std::sync::atomic::Ordering::Relaxed);
                    }
                }),
            )
            .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while pulled.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "pull never started");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    registry.stop();
    let at_kill = pulled.load(std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    registry.restart();
    let outcome = task
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("warm after restart: {e}"));
    assert!(same_content(&raw, &outcome.entry.disk_path));
    // The registry logs a request when it completes, so the interrupted GET never shows; the
    // one after the restart must have asked for the rest only (a Range from where it stopped).
    let layer_digest = {
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(registry.blob_path(&outcome.entry.key.digest)).unwrap(),
        )
        .unwrap();
        manifest["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let layer_size = std::fs::metadata(registry.blob_path(&layer_digest))
        .unwrap()
        .len();
    let responses = registry.blob_responses(&layer_digest);
    assert!(
        at_kill >= layer_size || responses.iter().any(|(status, bytes)| *status == 206 && *bytes < layer_size),
        "killed at {at_kill} of {layer_size} bytes but no resumed (partial) blob GET: {responses:?}"
    );
    assert_clean(cache.path());
}

#[tokio::test]
async fn concurrent_warms_of_one_image_share_one_pull() {
    init();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "shared", 32, 4, 10);
    let layer = LayerSpec::disk(&raw, "shared.raw", TAR_GZIP).encode();
    let layer_digest = format!(
        "sha256:{}",
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&layer))
    );
    let (reference, _) =
        vmdisk_tests::push::push_blobs(&registry, "disks/shared", "1", vec![(layer, TAR_GZIP)])
            .await;
    let cache = tempfile::tempdir().unwrap();
    let w = warmer(cache.path(), Budget::Bytes(1 << 30));
    let (a, b) = tokio::join!(
        warm(&w, &registry, &reference, DiskFormat::Raw),
        warm(&w, &registry, &reference, DiskFormat::Raw)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.entry.disk_path, b.entry.disk_path);
    assert_eq!(
        registry.blob_gets(&layer_digest),
        1,
        "the layer must be fetched once:\n{}",
        registry.log()
    );
    assert_eq!(w.puller().downloads_started(), 1);
}

#[tokio::test]
async fn budget_evicts_lru_but_keeps_pinned_and_leased() {
    init();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let mut refs = Vec::new();
    for i in 0..4u64 {
        let raw = make_ext4_raw(work.path(), &format!("d{i}"), 16, 3, 20 + i);
        refs.push(push_container_disk(&registry, "disks/lru", &format!("{i}"), &raw).await);
    }
    let cache = tempfile::tempdir().unwrap();
    // Room for about three entries (each holds ~3.5 MiB of data).
    let w = warmer(cache.path(), Budget::Bytes(12 << 20));
    let mut entries = Vec::new();
    for (r, _) in refs.iter().take(3) {
        entries.push(warm(&w, &registry, r, DiskFormat::Raw).await.unwrap().entry);
    }
    let store = w.store();
    store.set_pinned(&[entries[0].key.clone()].into()); // oldest, but pinned
    let lease = store.lease(&entries[1].key).unwrap(); // second oldest, but leased
    for (r, _) in refs.iter().skip(3) {
        warm(&w, &registry, r, DiskFormat::Raw).await.unwrap();
    }
    let keys: Vec<_> = store.entries().into_iter().map(|e| e.key).collect();
    assert!(keys.contains(&entries[0].key), "pinned entry evicted");
    assert!(keys.contains(&entries[1].key), "leased entry evicted");
    assert!(
        !keys.contains(&entries[2].key),
        "the least recently used unpinned entry should go"
    );
    assert!(
        store.used_bytes() <= store.budget_bytes(),
        "{} > {}",
        store.used_bytes(),
        store.budget_bytes()
    );
    drop(lease);
}

/// Child mode of the crash test: warm, and let the parent SIGKILL us at some point.
const CRASH_CHILD: &str = "VMDISK_TEST_CRASH_CHILD";

#[tokio::test]
async fn crash_child() {
    let Ok(spec) = std::env::var(CRASH_CHILD) else {
        return;
    };
    init();
    let v: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let w = warmer(
        Path::new(v["cache"].as_str().unwrap()),
        Budget::Bytes(1 << 30),
    );
    let options = vmdisk_registry::pull::RegistryOptions {
        insecure: true,
        ..Default::default()
    };
    w.warm(
        WarmRequest {
            reference: v["reference"].as_str().unwrap().to_string(),
            format: DiskFormat::Qcow2,
            registry: options,
        },
        Arc::new(|_| {}),
    )
    .await
    .unwrap();
    std::process::exit(0);
}

/// Where a warm in `cache` stands, from what its staging directory holds: `stream` (the layers
/// downloading, extracting and decoding in one pass), `convert` (qemu-img writing the cached
/// format) or `commit`.
fn staging_phase(cache: &Path) -> Option<&'static str> {
    let staging = cache.join("staging");
    for e in std::fs::read_dir(&staging).ok()?.flatten() {
        let p: PathBuf = e.path();
        if p.join("entry").exists() {
            return Some("commit");
        }
        if p.join("disk.qcow2").exists() {
            return Some("convert");
        }
        if p.join("extract").exists() {
            return Some("stream");
        }
    }
    None
}

/// Starts a warm of `reference` into `cache` in a child process and SIGKILLs it once its
/// staging shows `phase`; where the kill landed (or that the child finished first).
async fn kill_a_warm_in(cache: &Path, reference: &str, phase: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let spec = serde_json::json!({"cache": cache, "reference": reference}).to_string();
    let mut child = std::process::Command::new(&exe)
        .args(["--exact", "crash_child", "--nocapture"])
        .env(CRASH_CHILD, spec)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut killed_in = None;
    while killed_in.is_none() && Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            killed_in = Some(format!("finished first ({status})"));
        } else if staging_phase(cache) == Some(phase) {
            child.kill().unwrap(); // SIGKILL
            killed_in = Some(phase.to_string());
        } else {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }
    let _ = child.kill();
    child.wait().unwrap();
    killed_in.expect("child neither reached the phase nor finished")
}

/// An image whose warms keep dying with their process (here: SIGKILL, as an OOM kill would)
/// is refused after three, with the way out in the message, across restarts; `forget`
/// lets it be warmed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_that_keeps_killing_its_warms_is_refused_until_forgotten() {
    init();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "poison", 64, 16, 31);
    let (reference, digest) = push_container_disk(&registry, "disks/poison", "1", &raw).await;
    let proxy = ThrottledProxy::start("127.0.0.1", &registry.addr, 8 << 20).await;
    let slow_reference = reference.replace(&registry.addr, &proxy.addr);
    let cache = tempfile::tempdir().unwrap();
    for _ in 0..vmdisk_cache_agent::store::MAX_UNFINISHED {
        // As after an agent's restart: the killed warm's staging is cleared.
        drop(CacheStore::open(cache.path(), Budget::Bytes(1 << 30)).unwrap());
        let killed_in = kill_a_warm_in(cache.path(), &slow_reference, "stream").await;
        assert_eq!(killed_in, "stream");
    }
    let attempts: Vec<_> = std::fs::read_dir(cache.path().join("attempts"))
        .map(|d| {
            d.flatten()
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert!(attempts[0].contains("\"unfinished\":3"), "{attempts:?}");
    let w = warmer(cache.path(), Budget::Bytes(1 << 30));
    let err = warm(&w, &registry, &reference, DiskFormat::Qcow2)
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(
        err.to_string().contains(&format!("ls --forget {digest}")),
        "{err}"
    );
    assert_clean(cache.path());
    assert_eq!(w.store().forget_attempts(&digest), 1);
    let outcome = warm(&w, &registry, &reference, DiskFormat::Qcow2)
        .await
        .unwrap();
    assert!(same_content(&raw, &outcome.entry.disk_path));
    assert!(w.store().poisoned().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_any_point_leaves_no_partial_entry() {
    init();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "crash", 64, 16, 30);
    let (reference, digest) = push_container_disk(&registry, "disks/crash", "1", &raw).await;
    // The child pulls through a slow link, so a kill lands mid-stream whatever the machine.
    let proxy = ThrottledProxy::start("127.0.0.1", &registry.addr, 8 << 20).await;
    let slow_reference = reference.replace(&registry.addr, &proxy.addr);
    let mut phases_killed = Vec::new();
    for target_phase in ["stream", "convert"] {
        let cache = tempfile::tempdir().unwrap();
        let killed_in = kill_a_warm_in(cache.path(), &slow_reference, target_phase).await;
        phases_killed.push(killed_in.clone());
        // Nothing partial is visible: either no entry, or a complete verified one.
        let (store, report) = CacheStore::open(cache.path(), Budget::Bytes(1 << 30)).unwrap();
        for e in store.entries() {
            assert!(
                same_content(&raw, &e.disk_path),
                "after a kill in {killed_in}: a visible entry is not complete"
            );
        }
        assert!(
            report.removed_corrupt.is_empty(),
            "corrupt entry visible after kill in {killed_in}: {report:?}"
        );
        assert_clean(cache.path());
        drop(store);
        // The next warm succeeds.
        let w = warmer(cache.path(), Budget::Bytes(1 << 30));
        let outcome = warm(&w, &registry, &reference, DiskFormat::Qcow2)
            .await
            .unwrap();
        assert_eq!(outcome.entry.key.digest, digest);
        assert!(same_content(&raw, &outcome.entry.disk_path));
    }
    println!("SIGKILL landed in phases: {phases_killed:?}");
    assert!(
        phases_killed
            .iter()
            .filter(|p| !p.starts_with("finished"))
            .count()
            == 2,
        "kills must land mid-warm: {phases_killed:?}"
    );
}

/// The pull itself verified the requester (anonymous here), so within the records' TTL its
/// pinned requests need no registry.
#[tokio::test]
async fn a_pinned_reference_already_cached_needs_no_registry() {
    init();
    let mut registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "pinned", 16, 2, 5);
    let (reference, digest) = push_container_disk(&registry, "disks/pinned", "1", &raw).await;
    let pinned = format!("{reference}@{digest}");
    let cache = tempfile::tempdir().unwrap();
    let w = warmer(cache.path(), Budget::Bytes(1 << 30));
    let cold = warm(&w, &registry, &pinned, DiskFormat::Raw).await.unwrap();
    assert!(cold.pulled);
    registry.stop();
    let warm_again = warm(&w, &registry, &pinned, DiskFormat::Raw)
        .await
        .expect("a cached pinned entry is served to a verified requester with the registry down");
    assert!(!warm_again.pulled);
    assert_eq!(warm_again.entry.key, cold.entry.key);
    // A tag still has to be resolved: with the registry down that is an error, not a guess.
    let err = warm(&w, &registry, &reference, DiskFormat::Raw)
        .await
        .expect_err("a tag cannot be resolved without the registry");
    assert!(!err.is_permanent(), "{err}");
    // Another format of the same image is not cached: it needs the registry.
    assert!(warm(&w, &registry, &pinned, DiskFormat::Qcow2)
        .await
        .is_err());
}

/// What the image controller does to size a disk nobody has warmed: the first MiB of the layer
/// (one Range request to a real registry), inflated as far as it goes, gives the qcow2 header
/// and a raw disk's entry size.
#[tokio::test]
async fn a_disks_size_is_read_from_the_first_mib_of_its_layer() {
    use vmdisk_cache_agent::warm::extract::peek::peek_disk;
    use vmdisk_cache_agent::warm::extract::LayerCompression;
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "peek", 96, 8, 41);
    let qcow2 = to_format(&raw, "qcow2", false);
    let puller = Puller::new(PullerConfig::default());
    for (disk, format) in [(&raw, "raw"), (&qcow2, "qcow2")] {
        let (reference, _) = push_container_disk(&registry, "peek/disk", format, disk).await;
        let options = options_for(&registry);
        let image = puller.resolve(&reference, &options).await.unwrap();
        let layer = image.layers.last().unwrap();
        let start = puller
            .layer_start(&image, layer, &options, 1 << 20)
            .await
            .unwrap();
        assert_eq!(start.len() as u64, layer.size.min(1 << 20), "{format}");
        let compression = LayerCompression::from_media_type(&layer.media_type).unwrap();
        let peek = peek_disk(&start, compression).unwrap_or_else(|e| panic!("{format}: {e}"));
        assert_eq!(peek.source_format, format);
        assert_eq!(peek.virtual_size, 96 << 20, "{format}");
    }
}

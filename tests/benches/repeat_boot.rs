//! `cargo bench --bench repeat_boot`: what a populator pod costs for the first VM from an
//! image and for every VM after it. A >= 1 GiB qcow2 containerDisk on a local TLS + htpasswd
//! registry is populated (`vmdisk_cache_agent::populate`, in a fresh process each time, as a
//! pod runs it) into a fresh raw target twice per round: cold (empty node cache: pull, decode,
//! commit, copy) then warm (the entry is cached: lease and copy).
//!
//! Two placements of cache and volumes: on the benchmark directory's filesystem (ext4 here: a
//! sparse copy of the data), then, as root with xfsprogs, on a loop-mounted XFS where the copy
//! is a reflink (the cache and a hostPath or local-PV provisioner sharing one XFS filesystem).
//! Prints `RESULT repeat-boot-copy ...` for the first and, last, `RESULT repeat-boot secs=<warm>
//! cold_secs=<cold> speedup=<cold/warm>` for the best placement available (XFS when it
//! could be mounted; the reason is printed otherwise).
//!
//! Env: VMDISK_BENCH_DISK_MIB (default 2048), VMDISK_BENCH_DATA_MIB (default 800),
//! VMDISK_BENCH_ROUNDS (default 3; medians), VMDISK_BENCH_DIR.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use vmdisk_cache_agent::populate::{populate, PopulateRequest};
use vmdisk_cache_agent::store::{Budget, CacheStore};
use vmdisk_crds::DiskFormat;
use vmdisk_registry::pull::RegistryOptions;
use vmdisk_tests::bench::{child_runtime, child_warmer, env_or, median};
use vmdisk_tests::disks::{make_ext4_raw, same_content, to_format};
use vmdisk_tests::loopfs::LoopMount;
use vmdisk_tests::push::push_container_disk;
use vmdisk_tests::registry::TestRegistry;

const CHILD: &str = "VMDISK_BENCH_POPULATE_CHILD";

/// The child: one populate, as a populator pod runs it; prints how it went.
fn child(spec: &str) {
    let v: serde_json::Value = serde_json::from_str(spec).unwrap();
    child_runtime().block_on(async {
        let (store, _) = CacheStore::open_shared(
            Path::new(v["cache"].as_str().unwrap()),
            Budget::Bytes(1 << 40),
        )
        .unwrap();
        let warmer = child_warmer(store);
        let report = populate(
            &warmer,
            PopulateRequest {
                reference: v["reference"].as_str().unwrap().to_string(),
                format: DiskFormat::Raw,
                registry: RegistryOptions {
                    ca_bundle_pem: Some(v["ca"].as_str().unwrap().as_bytes().to_vec()),
                    auth: oci_client::secrets::RegistryAuth::Basic("bench".into(), "bench".into()),
                    ..RegistryOptions::default()
                },
                target: PathBuf::from(v["target"].as_str().unwrap()),
                size: v["size"].as_u64(),
                owner: None,
                parallel_copies: None,
            },
            Arc::new(|_| {}),
        )
        .await
        .unwrap_or_else(|e| panic!("populate: {e}"));
        println!("{:?} cache_hit={}", report.method, report.cache_hit);
    });
}

/// Runs one populate in a child process: wall seconds and what it printed.
fn timed_populate(exe: &Path, spec: serde_json::Value) -> (f64, String) {
    let start = Instant::now();
    let out = Command::new(exe)
        .env(CHILD, spec.to_string())
        .output()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "populate child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (
        secs,
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

struct Placement<'a> {
    name: &'a str,
    dir: &'a Path,
}

/// Median cold and warm seconds of `rounds` cold-then-warm pairs under `placement.dir`.
fn measure(
    placement: &Placement,
    exe: &Path,
    base: &serde_json::Value,
    raw: &Path,
    rounds: u64,
) -> (f64, f64) {
    let (mut colds, mut warms) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let cache = placement.dir.join(format!("cache-{round}"));
        let mut times = [0.0; 2];
        for (i, phase) in ["cold", "warm"].iter().enumerate() {
            let target = placement.dir.join(format!("{phase}-{round}.img"));
            let mut spec = base.clone();
            spec["cache"] = serde_json::json!(cache);
            spec["target"] = serde_json::json!(target);
            Command::new("sync").status().unwrap();
            let (secs, how) = timed_populate(exe, spec);
            assert_eq!(
                how.ends_with("cache_hit=true"),
                i == 1,
                "{phase} populate: {how}"
            );
            if round == 1 {
                assert!(same_content(raw, &target), "{phase} target differs");
            }
            eprintln!(
                "{} round {round} {phase}: {secs:.3}s ({how})",
                placement.name
            );
            times[i] = secs;
            std::fs::remove_file(&target).unwrap();
        }
        colds.push(times[0]);
        warms.push(times[1]);
        std::fs::remove_dir_all(&cache).unwrap();
    }
    (median(&mut colds), median(&mut warms))
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
        return;
    }
    let disk_mib = env_or("VMDISK_BENCH_DISK_MIB", 2048);
    let data_mib = env_or("VMDISK_BENCH_DATA_MIB", 800);
    let rounds = env_or("VMDISK_BENCH_ROUNDS", 3).max(1);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let registry = TestRegistry::start_tls_htpasswd("bench", "bench");
    let work = tempfile::tempdir_in(
        std::env::var("VMDISK_BENCH_DIR")
            .unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
    )
    .unwrap();
    eprintln!("building a {disk_mib} MiB ext4 disk with {data_mib} MiB of data, as qcow2");
    let raw = make_ext4_raw(work.path(), "boot", disk_mib, data_mib, 64);
    let qcow2 = to_format(&raw, "qcow2", false);
    let (reference, digest) =
        runtime.block_on(push_container_disk(&registry, "bench/boot", "1", &qcow2));
    // As the webhook admits a PVC: pinned to the digest.
    let base = serde_json::json!({
        "reference": format!("{reference}@{digest}"),
        "ca": registry.ca_pem().unwrap(),
        "size": disk_mib << 20,
    });
    let exe = std::env::current_exe().unwrap();

    let local = work.path().join("local");
    std::fs::create_dir_all(&local).unwrap();
    let copy = Placement {
        name: "local filesystem",
        dir: &local,
    };
    let (cold, warm) = measure(&copy, &exe, &base, &raw, rounds);
    let copy_line = format!(
        "secs={warm:.3} cold_secs={cold:.3} speedup={:.1}",
        cold / warm
    );
    println!("RESULT repeat-boot-copy {copy_line}");

    let xfs_dir = tempfile::tempdir_in(work.path()).unwrap();
    match LoopMount::xfs(xfs_dir.path(), disk_mib * 3 + 1024) {
        Ok(xfs) => {
            let placement = Placement {
                name: "xfs (reflink)",
                dir: &xfs.path,
            };
            let (cold, warm) = measure(&placement, &exe, &base, &raw, rounds);
            eprintln!("repeat-boot: cache and volumes on one XFS filesystem (reflink)");
            println!(
                "RESULT repeat-boot secs={warm:.3} cold_secs={cold:.3} speedup={:.1}",
                cold / warm
            );
        }
        Err(why) => {
            eprintln!("repeat-boot: no XFS ({why}); the sparse copy's figures stand");
            println!("RESULT repeat-boot {copy_line}");
        }
    }
}

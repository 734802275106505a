//! `cargo bench --bench warm`: a cold warm of a >= 1 GiB containerDisk from a local registry,
//! against the usual pipeline in the same run: `skopeo copy` + `tar -x` + `qemu-img convert`
//! into the same format.
//!
//! Variants: `qcow2` (a qcow2 disk in the image, cached as qcow2) and `raw` (a raw disk in the
//! image, cached as raw). Our warm runs in a child process (this binary re-executed) so its
//! peak RSS is its own. Env: VMDISK_BENCH_VARIANT (qcow2|raw|both, default both),
//! VMDISK_BENCH_DISK_MIB (default 2048), VMDISK_BENCH_DATA_MIB (default 560),
//! VMDISK_BENCH_ROUNDS (default 3; medians are reported, and the ratio is the median of the
//! per-round ratios, each round running vmdisk and the baseline back to back).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use vmdisk_cache_agent::extract::ExtractLimits;
use vmdisk_cache_agent::store::{Budget, CacheStore};
use vmdisk_cache_agent::warm::{WarmRequest, Warmer};
use vmdisk_crds::DiskFormat;
use vmdisk_registry::pull::{Puller, PullerConfig, RegistryOptions};
use vmdisk_tests::disks::{make_ext4_raw, run, same_content, to_format};
use vmdisk_tests::push::{push_blobs, TAR_GZIP};
use vmdisk_tests::registry::TestRegistry;

const CHILD: &str = "VMDISK_BENCH_WARM_CHILD";

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The child: one cold warm, then exit.
fn child(spec: &str) {
    let v: serde_json::Value = serde_json::from_str(spec).unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (store, _) = CacheStore::open(
            Path::new(v["cache"].as_str().unwrap()),
            Budget::Bytes(1 << 40),
        )
        .unwrap();
        let warmer = Warmer::new(
            Arc::new(store),
            Puller::new(PullerConfig::default()),
            ExtractLimits::default(),
        );
        let format: DiskFormat = v["format"].as_str().unwrap().parse().unwrap();
        let outcome = warmer
            .warm(
                WarmRequest {
                    reference: v["reference"].as_str().unwrap().to_string(),
                    format,
                    registry: RegistryOptions {
                        insecure: true,
                        ..RegistryOptions::default()
                    },
                },
                Arc::new(|_| {}),
            )
            .await
            .unwrap_or_else(|e| panic!("warm: {e}"));
        // Our own high-water mark: wait4's ru_maxrss would report the parent's, because a
        // vforked child inherits the parent's peak until exec.
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let hwm_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0);
        println!("{} {hwm_kib}", outcome.entry.disk_path.display());
    });
}

/// Runs the warm child, returning wall seconds, its peak RSS (MiB) and the cached disk.
fn timed_child(cmd: &mut Command) -> (f64, f64, String) {
    let start = Instant::now();
    let out = cmd.output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "warm child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let (path, hwm) = text
        .rsplit_once(' ')
        .expect("child prints `<path> <VmHWM kB>`");
    (secs, hwm.parse::<f64>().unwrap() / 1024.0, path.to_string())
}

fn baseline(
    registry: &TestRegistry,
    reference: &str,
    disk_name: &str,
    format: &str,
    work: &Path,
) -> (f64, PathBuf) {
    let dir = work.join(format!("baseline-{}", rand::random::<u32>()));
    std::fs::create_dir_all(dir.join("out")).unwrap();
    let start = Instant::now();
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        &format!("docker://{reference}"),
        &format!("dir:{}", dir.join("image").display()),
    ]));
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("image/manifest.json")).unwrap()).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let hex = layer["digest"]
            .as_str()
            .unwrap()
            .trim_start_matches("sha256:");
        run(Command::new("tar")
            .arg("-xzf")
            .arg(dir.join("image").join(hex))
            .arg("-C")
            .arg(dir.join("out")));
    }
    let out = dir.join(format!("final.{format}"));
    run(Command::new("qemu-img")
        .args(["convert", "-O", format])
        .arg(dir.join("out/disk").join(disk_name))
        .arg(&out));
    let secs = start.elapsed().as_secs_f64();
    let _ = registry;
    (secs, out)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
        return;
    }
    // `cargo bench` passes --bench; nothing else to parse.
    let variant = std::env::var("VMDISK_BENCH_VARIANT").unwrap_or_else(|_| "both".into());
    let disk_mib = env_or("VMDISK_BENCH_DISK_MIB", 2048);
    let data_mib = env_or("VMDISK_BENCH_DATA_MIB", 560);
    let rounds = env_or("VMDISK_BENCH_ROUNDS", 3).max(1);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir_in(
        std::env::var("VMDISK_BENCH_DIR")
            .unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
    )
    .unwrap();
    eprintln!("building a {disk_mib} MiB ext4 disk with {data_mib} MiB of data");
    let raw = make_ext4_raw(work.path(), "bench", disk_mib, data_mib, 42);
    let variants: Vec<&str> = match variant.as_str() {
        "both" => vec!["qcow2", "raw"],
        "qcow2" => vec!["qcow2"],
        "raw" => vec!["raw"],
        other => panic!("VMDISK_BENCH_VARIANT={other}: use qcow2, raw or both"),
    };
    let exe = std::env::current_exe().unwrap();
    let mut results = Vec::new();
    for v in variants {
        let disk = if v == "qcow2" {
            to_format(&raw, "qcow2", false)
        } else {
            raw.clone()
        };
        let disk_name = disk.file_name().unwrap().to_string_lossy().into_owned();
        // The layer, gzip at the default level like image build tools produce.
        let layer_path = work.path().join(format!("{v}.layer"));
        {
            let file = std::fs::File::create(&layer_path).unwrap();
            let gz = flate2::write::GzEncoder::new(
                std::io::BufWriter::new(file),
                flate2::Compression::default(),
            );
            let mut tar = tar::Builder::new(gz);
            let mut h = tar::Header::new_gnu();
            h.set_size(std::fs::metadata(&disk).unwrap().len());
            h.set_mode(0o444);
            tar.append_data(
                &mut h,
                format!("disk/{disk_name}"),
                std::fs::File::open(&disk).unwrap(),
            )
            .unwrap();
            tar.into_inner().unwrap().finish().unwrap();
        }
        let layer = std::fs::read(&layer_path).unwrap();
        eprintln!("variant {v}: layer {} MiB", layer.len() >> 20);
        let (reference, _) = runtime.block_on(push_blobs(
            &registry,
            "bench/disk",
            v,
            vec![(layer, TAR_GZIP)],
        ));
        drop(std::fs::remove_file(&layer_path));

        let (mut ours, mut theirs, mut rss) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let cache = work.path().join(format!("cache-{v}-{round}"));
            let spec = serde_json::json!({"cache": cache, "reference": reference, "format": v})
                .to_string();
            let (secs, peak, path) = timed_child(Command::new(&exe).env(CHILD, spec));
            assert!(
                same_content(&raw, Path::new(&path)),
                "warmed disk differs from the source"
            );
            ours.push(secs);
            rss.push(peak);
            let (base_secs, base_out) = baseline(&registry, &reference, &disk_name, v, work.path());
            assert!(same_content(&raw, &base_out), "baseline disk differs");
            theirs.push(base_secs);
            eprintln!(
                "round {}: vmdisk {secs:.2}s (peak RSS {peak:.1} MiB), baseline {base_secs:.2}s",
                round + 1
            );
            let _ = std::fs::remove_dir_all(&cache);
            let _ = std::fs::remove_dir_all(base_out.parent().unwrap());
        }
        let mut ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| a / b).collect();
        let ratio = median(&mut ratios);
        let (secs, base) = (median(&mut ours), median(&mut theirs));
        let peak = rss.iter().cloned().fold(0.0, f64::max);
        results.push(format!(
            "RESULT warm variant={v} secs={secs:.2} baseline_secs={base:.2} ratio={ratio:.3} peak_rss_mib={peak:.1}"
        ));
    }
    for r in results {
        println!("{r}");
    }
}

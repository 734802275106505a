//! `cargo bench --bench warm`: a cold warm of a >= 1 GiB containerDisk from a local TLS +
//! htpasswd registry, for every format pair, against the CDI-style pipeline in the same run
//! (`skopeo copy` + `tar -x` + `qemu-img convert`) and against the physical floor (downloading
//! the layer alone, in parallel with inflating it alone).
//!
//! Variants: `qcow2-to-raw` (a qcow2 disk in the image, cached as raw: the common case),
//! `raw-to-raw`, `qcow2-to-qcow2`, `vmdk-to-raw`. Each runs in a child process (this binary
//! re-executed) so its peak RSS is its own. Env: VMDISK_BENCH_VARIANT (a comma list, default
//! all four), VMDISK_BENCH_DISK_MIB (default 2048), VMDISK_BENCH_DATA_MIB (default 800),
//! VMDISK_BENCH_ROUNDS (default 3, after one warm-up round that is not counted; medians are
//! reported, the ratio is the median of per-round ratios, each round running floor, vmdisk and
//! baseline back to back), VMDISK_BENCH_DIR. A `STAGES` line per variant gives the median
//! seconds of each stage of vmdisk's warm, its CPU seconds, and the median per-round ratio of
//! vmdisk's time to the floor's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use vmdisk_cache_agent::store::{Budget, CacheStore};
use vmdisk_cache_agent::warm::WarmRequest;
use vmdisk_crds::DiskFormat;
use vmdisk_registry::pull::{Puller, PullerConfig, RegistryOptions};
use vmdisk_tests::bench::{child_runtime, child_warmer, env_or, median};
use vmdisk_tests::disks::{make_ext4_raw, run, same_content, to_format};
use vmdisk_tests::push::{push_blobs, TAR_GZIP};
use vmdisk_tests::registry::TestRegistry;

const CHILD: &str = "VMDISK_BENCH_WARM_CHILD";
const FLOOR: &str = "VMDISK_BENCH_WARM_FLOOR";

/// The child: one cold warm, then exit.
fn child(spec: &str) {
    let v: serde_json::Value = serde_json::from_str(spec).unwrap();
    child_runtime().block_on(async {
        let (store, _) = CacheStore::open(
            Path::new(v["cache"].as_str().unwrap()),
            Budget::Bytes(1 << 40),
        )
        .unwrap();
        let warmer = child_warmer(store);
        let format: DiskFormat = v["format"].as_str().unwrap().parse().unwrap();
        let outcome = warmer
            .warm(
                WarmRequest {
                    reference: v["reference"].as_str().unwrap().to_string(),
                    format,
                    registry: RegistryOptions {
                        ca_bundle_pem: Some(v["ca"].as_str().unwrap().as_bytes().to_vec()),
                        auth: oci_client::secrets::RegistryAuth::Basic(
                            "bench".into(),
                            "bench".into(),
                        ),
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
        let mut stages: Vec<String> = outcome
            .stages
            .iter()
            .map(|(name, secs)| format!("{name}={secs:.2}"))
            .collect();
        stages.push(format!("cpu={:.2}", cpu_seconds()));
        println!(
            "{} {hwm_kib} {}",
            outcome.entry.disk_path.display(),
            stages.join(",")
        );
    });
}

/// User and system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// The floor: the layer downloaded (and its digest checked) alone, in parallel with the same
/// layer inflated alone from a local copy; nothing written.
fn floor(spec: &str) {
    let v: serde_json::Value = serde_json::from_str(spec).unwrap();
    let runtime = child_runtime();
    let layer_file = v["layer"].as_str().unwrap().to_string();
    let inflate = std::thread::spawn(move || {
        let file =
            std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(layer_file).unwrap());
        let mut gz = flate2::read::MultiGzDecoder::new(file);
        std::io::copy(&mut gz, &mut std::io::sink()).unwrap()
    });
    runtime.block_on(async {
        let puller = Puller::new(PullerConfig::default());
        let options = RegistryOptions {
            ca_bundle_pem: Some(v["ca"].as_str().unwrap().as_bytes().to_vec()),
            auth: oci_client::secrets::RegistryAuth::Basic("bench".into(), "bench".into()),
            ..RegistryOptions::default()
        };
        let image = puller
            .resolve(v["reference"].as_str().unwrap(), &options)
            .await
            .unwrap();
        let (mut reader, task) = puller.stream_layer(
            &image,
            &image.layers[0],
            &options,
            vmdisk_registry::pull::LayerSources::registry_only(),
            Arc::new(|_| {}),
        );
        tokio::task::spawn_blocking(move || reader.drain().unwrap())
            .await
            .unwrap();
        task.await.unwrap().unwrap();
    });
    inflate.join().unwrap();
    println!("cpu={:.2}", cpu_seconds());
}

/// Runs the warm child, returning wall seconds, its peak RSS (MiB) and the cached disk.
fn timed_child(cmd: &mut Command) -> (f64, f64, String, String) {
    let start = Instant::now();
    let out = cmd.output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "warm child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let mut fields = text.split(' ');
    let (path, hwm, stages) = (
        fields
            .next()
            .expect("child prints `<path> <VmHWM kB> <stages>`"),
        fields.next().unwrap(),
        fields.next().unwrap_or_default(),
    );
    (
        secs,
        hwm.parse::<f64>().unwrap() / 1024.0,
        path.to_string(),
        stages.to_string(),
    )
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
    let certs = work.join("skopeo-certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::write(certs.join("ca.crt"), registry.ca_pem().unwrap()).unwrap();
    run(Command::new("skopeo").args([
        "copy",
        "--quiet",
        "--src-creds=bench:bench",
        &format!("--src-cert-dir={}", certs.display()),
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

struct Variant {
    name: &'static str,
    /// Format of the disk inside the image.
    source: &'static str,
    /// Format the cache keeps.
    target: &'static str,
}

const VARIANTS: [Variant; 4] = [
    Variant {
        name: "qcow2-to-raw",
        source: "qcow2",
        target: "raw",
    },
    Variant {
        name: "raw-to-raw",
        source: "raw",
        target: "raw",
    },
    Variant {
        name: "qcow2-to-qcow2",
        source: "qcow2",
        target: "qcow2",
    },
    Variant {
        name: "vmdk-to-raw",
        source: "vmdk",
        target: "raw",
    },
];

fn main() {
    if let Ok(spec) = std::env::var(CHILD) {
        child(&spec);
        return;
    }
    if let Ok(spec) = std::env::var(FLOOR) {
        floor(&spec);
        return;
    }
    // `cargo bench` passes --bench; nothing else to parse.
    let wanted = std::env::var("VMDISK_BENCH_VARIANT").unwrap_or_default();
    let variants: Vec<&Variant> = VARIANTS
        .iter()
        .filter(|v| wanted.is_empty() || wanted == "all" || wanted.split(',').any(|w| w == v.name))
        .collect();
    assert!(!variants.is_empty(), "VMDISK_BENCH_VARIANT={wanted}: use all or some of qcow2-to-raw,raw-to-raw,qcow2-to-qcow2,vmdk-to-raw");
    let disk_mib = env_or("VMDISK_BENCH_DISK_MIB", 2048);
    let data_mib = env_or("VMDISK_BENCH_DATA_MIB", 800);
    let rounds = env_or("VMDISK_BENCH_ROUNDS", 3).max(1);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let registry = TestRegistry::start_tls_htpasswd("bench", "bench");
    let ca = registry.ca_pem().unwrap();
    let work = tempfile::tempdir_in(
        std::env::var("VMDISK_BENCH_DIR")
            .unwrap_or_else(|_| std::env::temp_dir().display().to_string()),
    )
    .unwrap();
    eprintln!("building a {disk_mib} MiB ext4 disk with {data_mib} MiB of data");
    let raw = make_ext4_raw(work.path(), "bench", disk_mib, data_mib, 42);
    let exe = std::env::current_exe().unwrap();
    let mut results = Vec::new();
    for v in variants {
        let disk = match v.source {
            "raw" => raw.clone(),
            other => to_format(&raw, other, false),
        };
        let disk_name = disk.file_name().unwrap().to_string_lossy().into_owned();
        // The layer, gzip at the default level like image build tools produce.
        let layer_path = work.path().join(format!("{}.layer", v.name));
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
        eprintln!("variant {}: layer {} MiB", v.name, layer.len() >> 20);
        let (reference, _) = runtime.block_on(push_blobs(
            &registry,
            "bench/disk",
            v.name,
            vec![(layer, TAR_GZIP)],
        ));

        let (mut ours, mut theirs, mut floors, mut rss) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut stages: Vec<(String, Vec<f64>)> = Vec::new();
        // Round 0 warms up and is not counted: in a VM, the first process to dirty fresh
        // memory pays the hypervisor's first touch (twice the CPU here), whoever it is.
        for round in 0..=rounds {
            // Each contender starts with the previous one's writeback done.
            run(&mut Command::new("sync"));
            let spec = serde_json::json!({"reference": reference, "ca": ca, "layer": layer_path})
                .to_string();
            let floor_started = Instant::now();
            let floor_out = Command::new(&exe).env(FLOOR, &spec).output().unwrap();
            let floor_secs = floor_started.elapsed().as_secs_f64();
            assert!(
                floor_out.status.success(),
                "floor: {}",
                String::from_utf8_lossy(&floor_out.stderr)
            );
            let floor_cpu = String::from_utf8_lossy(&floor_out.stdout)
                .trim()
                .to_string();

            let cache = work.path().join(format!("cache-{}-{round}", v.name));
            let spec = serde_json::json!({"cache": cache, "reference": reference, "format": v.target, "ca": ca})
                .to_string();
            run(&mut Command::new("sync"));
            let (secs, peak, path, round_stages) = timed_child(Command::new(&exe).env(CHILD, spec));
            assert!(
                same_content(&raw, Path::new(&path)),
                "warmed disk differs from the source"
            );
            rss.push(peak);
            run(&mut Command::new("sync"));
            let (base_secs, base_out) =
                baseline(&registry, &reference, &disk_name, v.target, work.path());
            assert!(same_content(&raw, &base_out), "baseline disk differs");
            run(&mut Command::new("sync"));
            eprintln!(
                "{} {}: floor {floor_secs:.2}s ({floor_cpu}), vmdisk {secs:.2}s ({round_stages}; peak RSS {peak:.1} MiB), baseline {base_secs:.2}s",
                v.name,
                if round == 0 { "warm-up".to_string() } else { format!("round {round}") }
            );
            if round > 0 {
                floors.push(floor_secs);
                ours.push(secs);
                theirs.push(base_secs);
                for (i, field) in round_stages.split(',').enumerate() {
                    let (name, value) = field.split_once('=').expect("name=secs");
                    if stages.len() <= i {
                        stages.push((name.to_string(), Vec::new()));
                    }
                    stages[i].1.push(value.parse().expect("seconds"));
                }
            }
            let _ = std::fs::remove_dir_all(&cache);
            let _ = std::fs::remove_dir_all(base_out.parent().unwrap());
        }
        let _ = std::fs::remove_file(&layer_path);
        let mut ratios: Vec<f64> = ours.iter().zip(&theirs).map(|(a, b)| a / b).collect();
        let ratio = median(&mut ratios);
        let mut over_floor: Vec<f64> = ours.iter().zip(&floors).map(|(a, b)| a / b).collect();
        let over_floor = median(&mut over_floor);
        let (secs, base, floor_secs) =
            (median(&mut ours), median(&mut theirs), median(&mut floors));
        let peak = rss.iter().cloned().fold(0.0, f64::max);
        results.push(format!(
            "RESULT warm variant={} secs={secs:.2} baseline_secs={base:.2} ratio={ratio:.3} floor_secs={floor_secs:.2} peak_rss_mib={peak:.1}",
            v.name
        ));
        let stages: Vec<String> = stages
            .iter_mut()
            .map(|(name, values)| format!("{name}={:.2}", median(values)))
            .collect();
        results.push(format!(
            "STAGES warm variant={} {} secs_over_floor={over_floor:.2}",
            v.name,
            stages.join(" ")
        ));
    }
    for r in results {
        println!("{r}");
    }
}

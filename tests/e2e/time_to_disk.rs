//! Phase `time_to_disk`, a benchmark (run by `cargo bench --bench time_to_disk`, listed as
//! ignored otherwise): what a user waits for from `kubectl apply` of a PVC to a Bound claim
//! holding the disk, on the real node with vmdisk installed as in the `installed` phase.
//!
//! One raw disk (`VMDISK_BENCH_DISK_MIB`, default 2048, of which `VMDISK_BENCH_DATA_MIB`,
//! default 230, is data) warmed on the node; then 20 claims one after the other (warm), one
//! claim of a second image no node holds (cold), bursts of 20 and 100 claims created at once,
//! and, as the floor, the copy alone: the cached disk copied sparsely on the same filesystem
//! and flushed.
//! Prints `RESULT time-to-disk warm_p50_s=… warm_p99_s=… cold_s=… burst20_s=… burst100_s=…
//! copy_s=… unclean=…`: `unclean` counts the claims whose timeline shows a refused step, a
//! second pod or a missed change (each printed), which the tests fail on.

use std::sync::Arc;
use std::time::Instant;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{DeleteParams, ListParams};
use kube::Api;
use serde_json::json;
use vmdisk_tests::bench::env_or;

use crate::installed::claims::{create_at_once, disk_image, wait_resolved, wait_warm};
use crate::installed::Installed;
use crate::support::{create_image, wait_for};
use crate::{cases, Case, Phase};

pub fn phase() -> Phase<Installed> {
    Phase {
        name: "time_to_disk",
        cases: cases![time_to_disk],
        exclusive: vec![],
        benchmark: true,
    }
}

/// Deletes the namespace's claims and waits until their volumes are gone too: the disk is
/// free again, the next measurement does not share the cluster with their deletion, and a
/// benchmark that ends leaves no volume behind on the node.
async fn delete_claims(admin: &kube::Client, ns: &str) {
    Api::<PersistentVolumeClaim>::namespaced(admin.clone(), ns)
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await
        .unwrap();
    let volumes = Api::<PersistentVolume>::all(admin.clone());
    wait_for(
        &format!("the volumes of {ns}'s claims deleted"),
        std::time::Duration::from_secs(300),
        || {
            let volumes = volumes.clone();
            async move {
                let left = volumes
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?
                    .items
                    .into_iter()
                    .filter(|pv| {
                        pv.spec
                            .as_ref()
                            .and_then(|s| s.claim_ref.as_ref())
                            .and_then(|c| c.namespace.as_deref())
                            == Some(ns)
                    })
                    .count();
                (left == 0).then_some(()).ok_or(format!("{left} left"))
            }
        },
    )
    .await;
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

async fn time_to_disk(fx: Arc<Installed>, case: Case) {
    let disk_mib = env_or("VMDISK_BENCH_DISK_MIB", 2048);
    let data_mib = env_or("VMDISK_BENCH_DATA_MIB", 230);
    let admin = case.admin();
    let ns = case.namespace("time-to-disk").await;
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let (url, raw) = disk_image(&fx, work.path(), "warm", disk_mib, data_mib, 501, false).await;
    create_image(
        &admin,
        &ns,
        "warm",
        json!({"source": {"registry": {"url": url, "insecure": true}}}),
    )
    .await;
    wait_warm(&admin, &ns, "warm", std::time::Duration::from_secs(600)).await;

    let mut warm = Vec::new();
    // A benchmark reports what a test would fail on.
    let mut unclean = Vec::new();
    for i in 0..20 {
        let name = format!("warm-{i:02}");
        let filled = create_at_once(&admin, &ns, "warm", &[name]).await;
        warm.push(filled.seconds);
        unclean.extend(filled.unclean());
    }
    warm.sort_by(f64::total_cmp);
    delete_claims(&admin, &ns).await;

    let (cold_url, _) = disk_image(&fx, work.path(), "cold", disk_mib, data_mib, 502, false).await;
    create_image(&admin, &ns, "cold", json!({"source": {"registry": {"url": cold_url, "insecure": true}}, "cache": {"prefetch": false}})).await;
    wait_resolved(&admin, &ns, "cold").await;
    let filled = create_at_once(&admin, &ns, "cold", &["cold".to_string()]).await;
    let cold = filled.seconds;
    unclean.extend(filled.unclean());
    delete_claims(&admin, &ns).await;

    let mut bursts = Vec::new();
    let mut burst_steps = Vec::new();
    for n in [20usize, 100] {
        let names: Vec<String> = (0..n).map(|i| format!("burst{n}-{i:03}")).collect();
        let filled = create_at_once(&admin, &ns, "warm", &names).await;
        bursts.push(filled.seconds);
        unclean.extend(filled.unclean());
        burst_steps.push(format!("burst{n}: {}", filled.steps()));
        delete_claims(&admin, &ns).await;
    }

    // The floor: the same bytes copied sparsely, one file to another on this filesystem, and
    // flushed to the disk as a populate flushes its target.
    let copy = work.path().join("copy.raw");
    let started = Instant::now();
    for (program, args) in [("cp", vec!["--sparse=always"]), ("sync", vec![])] {
        let mut command = std::process::Command::new(program);
        command.args(args);
        if program == "cp" {
            command.arg(&raw);
        }
        assert!(command.arg(&copy).status().unwrap().success(), "{program}");
    }
    let copy_s = started.elapsed().as_secs_f64();

    println!(
        "time-to-disk: a {disk_mib} MiB disk holding {data_mib} MiB; warm claims one after the other: {warm:.2?} s"
    );
    // Where each burst's time went (the README reads these).
    for steps in &burst_steps {
        println!("time-to-disk: steps, median/last claim, s after it was seen: {steps}");
    }
    for timeline in &unclean {
        println!("time-to-disk: not clean: {timeline}");
    }
    println!(
        "RESULT time-to-disk warm_p50_s={:.2} warm_p99_s={:.2} cold_s={cold:.2} burst20_s={:.2} burst100_s={:.2} copy_s={copy_s:.2} unclean={}",
        percentile(&warm, 50.0),
        percentile(&warm, 99.0),
        bursts[0],
        bursts[1],
        unclean.len(),
    );
}

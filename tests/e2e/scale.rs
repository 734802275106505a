//! Phase `scale`, a benchmark (run by `cargo bench --bench scale`, listed as ignored
//! otherwise): what vmdisk's components hold in memory, and what a PVC create costs, as the
//! cluster's VMDiskImages grow. vmdisk installed and run as in the `local` phase (the shipped
//! binaries on this machine with their production credentials, one agent per node).
//!
//! For each size (`VMDISK_BENCH_SCALE_SMALL`, default 100, then `VMDISK_BENCH_SCALE_IMAGES`,
//! default 10,000): that many VMDiskImages spread over 10 namespaces, each naming an image a
//! local registry does not have (it answers 404 at once: the image controller writes each
//! one's failure once and backs off), and as many PVCs labelled with their image (`storageClassName: ""`: nothing is
//! provisioned). Once the controller has written every image's status: the resident memory of
//! the webhook, the controller and one agent (`VmRSS`), and 100 server-side dry-run creates of
//! a PVC naming an image, which pass the webhook (p50/p99 from the client, as `kubectl` sees
//! it). Prints, per size,
//! `RESULT scale-memory images=<n> pvcs=<n> nodes=<n> webhook_rss_mib=… controller_rss_mib=…
//! agent_rss_mib=… status_all_s=… pvc_create_p50_ms=… pvc_create_p99_ms=…`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use vmdisk_crds::VMDiskImage;
use vmdisk_tests::bench::env_or;
use vmdisk_tests::registry::TestRegistry;

use crate::local::LocalInstall;
use crate::support::wait_for;
use crate::{cases, Case, Phase};

pub fn phase() -> Phase<LocalInstall> {
    Phase {
        name: "scale",
        cases: cases![scale_memory],
        exclusive: vec![],
        benchmark: true,
    }
}

const NAMESPACES: usize = 10;
/// Requests in flight while the objects are made.
const IN_FLIGHT: usize = 32;

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/<pid>/status");
    kib / 1024.0
}

async fn create_all(admin: &Client, registry: &str, namespaces: &[String], from: usize, to: usize) {
    stream::iter(from..to)
        .map(|i| {
            let ns = namespaces[i % NAMESPACES].clone();
            let admin = admin.clone();
            async move {
                let name = format!("img-{i}");
                let image: VMDiskImage = serde_json::from_value(json!({
                    "apiVersion": "vmdisk.io/v1alpha1", "kind": "VMDiskImage",
                    "metadata": {"name": name, "namespace": ns},
                    "spec": {"source": {"registry": {"url": format!("{registry}/scale/{name}:1"),
                                                     "insecure": true}}},
                }))
                .unwrap();
                Api::<VMDiskImage>::namespaced(admin.clone(), &ns)
                    .create(&PostParams::default(), &image)
                    .await?;
                let claim: PersistentVolumeClaim = serde_json::from_value(json!({
                    "metadata": {"name": format!("claim-{i}"), "labels": {"vmdisk.io/image": name}},
                    "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                             "resources": {"requests": {"storage": "1Gi"}}},
                }))
                .unwrap();
                Api::<PersistentVolumeClaim>::namespaced(admin, &ns)
                    .create(&PostParams::default(), &claim)
                    .await
                    .map(|_| ())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
}

/// Images whose status the controller has written, over all namespaces (pages of 500).
async fn with_status(admin: &Client) -> usize {
    let api = Api::<VMDiskImage>::all(admin.clone());
    let mut params = ListParams::default().limit(500);
    let mut n = 0;
    loop {
        let page = api.list(&params).await.unwrap();
        n += page
            .items
            .iter()
            .filter(|i| i.status.as_ref().is_some_and(|s| s.phase.is_some()))
            .count();
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return n,
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

pub async fn scale_memory(fx: Arc<LocalInstall>, case: Case) {
    let admin = case.admin();
    let mut namespaces = Vec::new();
    for _ in 0..NAMESPACES {
        namespaces.push(case.namespace("e2e-scale").await);
    }
    let small = env_or("VMDISK_BENCH_SCALE_SMALL", 100) as usize;
    let large = env_or("VMDISK_BENCH_SCALE_IMAGES", 10_000) as usize;
    let registry = TestRegistry::start_plain();
    let mut made = 0;
    for size in [small, large] {
        let started = Instant::now();
        create_all(&admin, &registry.addr, &namespaces, made, size).await;
        made = size;
        let created_s = started.elapsed().as_secs_f64();
        wait_for(
            &format!("the controller to write the status of {size} images"),
            Duration::from_secs(900),
            || {
                let admin = admin.clone();
                async move {
                    let n = with_status(&admin).await;
                    (n >= size).then_some(()).ok_or(format!("{n} of {size}"))
                }
            },
        )
        .await;
        let status_all_s = started.elapsed().as_secs_f64();
        // The watches deliver the last writes to the webhook and the agents.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let webhook = rss_mib(fx.webhook.lock().unwrap().child.id());
        let controller = rss_mib(fx.controller.lock().unwrap().child.id());
        let agent = {
            let agents = fx.agents.lock().unwrap();
            let first = agents.values().next().unwrap();
            rss_mib(first.process.as_ref().unwrap().child.id())
        };
        // What a user feels: PVC creates that pass the webhook (dry run: nothing is kept).
        let claims = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), &namespaces[0]);
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let mut ms = Vec::new();
        for i in 0..100 {
            let claim: PersistentVolumeClaim = serde_json::from_value(json!({
                "metadata": {"name": format!("probe-{i}"), "annotations": {"vmdisk.io/image": "img-0"}},
                "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                         "resources": {"requests": {"storage": "1Gi"}}},
            }))
            .unwrap();
            let t = Instant::now();
            // Admitted or refused by the webhook (the image never resolves): both are the
            // webhook's answer, which is what is timed.
            let _ = claims.create(&dry, &claim).await;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        ms.sort_by(f64::total_cmp);
        println!(
            "scale: {size} images and PVCs created in {created_s:.1}s, every status written after {status_all_s:.1}s"
        );
        println!(
            "RESULT scale-memory images={size} pvcs={size} nodes={} webhook_rss_mib={webhook:.1} controller_rss_mib={controller:.1} agent_rss_mib={agent:.1} status_all_s={status_all_s:.1} pvc_create_p50_ms={:.1} pvc_create_p99_ms={:.1}",
            fx.nodes.len(),
            percentile(&ms, 0.5),
            percentile(&ms, 0.99),
        );
    }
    // Bulk deletes, waited for here: the API server deletes about 80 objects a second here,
    // so 20,000 take minutes, longer than the teardown waits for namespaces.
    for ns in &namespaces {
        let all = ListParams::default();
        let gone = DeleteParams::background();
        Api::<PersistentVolumeClaim>::namespaced(admin.clone(), ns)
            .delete_collection(&gone, &all)
            .await
            .unwrap();
        Api::<VMDiskImage>::namespaced(admin.clone(), ns)
            .delete_collection(&gone, &all)
            .await
            .unwrap();
    }
    wait_for(
        "the benchmark's images and PVCs to go",
        Duration::from_secs(900),
        || {
            let admin = admin.clone();
            let namespaces = namespaces.clone();
            async move {
                let mut left = 0;
                for ns in &namespaces {
                    let one = ListParams::default().limit(1);
                    let images = Api::<VMDiskImage>::namespaced(admin.clone(), ns)
                        .list_metadata(&one)
                        .await
                        .map_err(|e| e.to_string())?;
                    let claims = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), ns)
                        .list_metadata(&one)
                        .await
                        .map_err(|e| e.to_string())?;
                    left += images.items.len() + claims.items.len();
                }
                (left == 0)
                    .then_some(())
                    .ok_or(format!("objects left in {left} lists"))
            }
        },
    )
    .await;
}

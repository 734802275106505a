//! Phase `scale`, a benchmark (run by `cargo bench --bench scale`, listed as ignored
//! otherwise): vmdisk on a cluster of 300 nodes as its VMDiskImages grow from 100 to 10,000.
//! vmdisk installed and run as in the `local` phase (the shipped binaries on this machine with
//! their production credentials, a real agent per node of the cluster); the other nodes, up to
//! `VMDISK_BENCH_SCALE_NODES` (default 300), are played by simulated agents with their own
//! node-bound tokens (`fleet`), which report each image of their list warm at once.
//!
//! Nodes are in pools (label `e2e.vmdisk.io/pool`, node `i` in pool `p<i>`), and image `j`
//! selects pool `p<j mod 1000>`: at 10,000 images, every node holds 10 of them. Each image is
//! a tiny containerDisk of its own (4 KiB, its own digest) in a local registry, so it
//! resolves, and the cluster's real agents warm theirs. For each size
//! (`VMDISK_BENCH_SCALE_SMALL`, default 100, then `VMDISK_BENCH_SCALE_IMAGES`, default 10,000):
//! the images and as many PVCs labelled with their image (`storageClassName: ""`: nothing is
//! provisioned) are created as fast as the API server takes them; once every image is cached
//! where it should be, 40 more are created 250 ms apart, each for one node, and the time from
//! each create to a status that counts its node is the convergence; then 5 for every node, 5 s
//! apart (timed the same way, printed beside it). Then: the resident memory of the webhook, the controller and the agent of
//! a node with 10 of the images (`VmRSS`), the controller's CPU for those 40 images, the
//! largest NodeDiskCache (its JSON), and 100 server-side dry-run creates of a PVC naming an
//! image, which pass the webhook (p50/p99 from the client, as `kubectl` sees it). Prints, per
//! size, `RESULT scale images=<n> nodes=<n> webhook_rss_mib=… agent_rss_mib=…
//! controller_rss_mib=… converge_p50_s=… converge_p99_s=… admission_p99_ms=… ndc_bytes_max=…`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;
use vmdisk_crds::{NodeDiskCache, VMDiskImage};
use vmdisk_tests::bench::env_or;
use vmdisk_tests::registry::TestRegistry;

use crate::fleet::{push_tiny_disks, Fleet, POOL_LABEL};
use crate::local::LocalInstall;
use crate::placement::{create_and_converge, percentile, Planned};
use crate::support::wait_for;
use crate::{cases, Case, Phase};

pub fn phase() -> Phase<LocalInstall> {
    Phase {
        name: "scale",
        cases: cases![scale],
        exclusive: vec![],
        benchmark: true,
    }
}

const NAMESPACES: usize = 10;
/// Pools of nodes the images select: at 10,000 images, 10 per pool.
const POOLS: usize = 1000;
/// Images for one node created one by one to time convergence, and how far apart.
const PROBES: usize = 40;
const PROBE_PACE: Duration = Duration::from_millis(250);
/// Then images for every node.
const EVERY_NODE_PROBES: usize = 5;
const EVERY_NODE_PACE: Duration = Duration::from_secs(5);
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

/// CPU time (user + system) process `pid` has used, in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // After the command name (in parentheses): state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

async fn create_claims(admin: &Client, namespaces: &[String], from: usize, to: usize) {
    stream::iter(from..to)
        .map(|i| {
            let ns = namespaces[i % NAMESPACES].clone();
            let admin = admin.clone();
            async move {
                let claim: PersistentVolumeClaim = serde_json::from_value(json!({
                    "metadata": {"name": format!("claim-{i}"), "labels": {"vmdisk.io/image": format!("img-{i}")}},
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

/// 100 dry-run creates of a PVC naming an image, through the webhook: p50 and p99 in ms.
async fn admission_ms(admin: &Client, namespace: &str) -> (f64, f64) {
    let claims = Api::<PersistentVolumeClaim>::namespaced(admin.clone(), namespace);
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
        claims.create(&dry, &claim).await.unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    (percentile(&ms, 0.5), percentile(&ms, 0.99))
}

/// The largest NodeDiskCache, as the API server sends it (JSON bytes).
async fn ndc_bytes_max(admin: &Client) -> usize {
    Api::<NodeDiskCache>::all(admin.clone())
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|c| serde_json::to_vec(c).unwrap().len())
        .max()
        .unwrap_or(0)
}

pub async fn scale(fx: Arc<LocalInstall>, case: Case) {
    let admin = case.admin();
    let mut namespaces = Vec::new();
    for _ in 0..NAMESPACES {
        namespaces.push(case.namespace("e2e-scale").await);
    }
    let small = env_or("VMDISK_BENCH_SCALE_SMALL", 100) as usize;
    let large = env_or("VMDISK_BENCH_SCALE_IMAGES", 10_000) as usize;
    let node_count = env_or("VMDISK_BENCH_SCALE_NODES", 300) as usize;
    let registry = TestRegistry::start_plain();
    // The agent measured below, before it has any image: what watching costs alone.
    let agent_pid = {
        let agents = fx.agents.lock().unwrap();
        agents[&fx.nodes[0]].process.as_ref().unwrap().child.id()
    };
    let agent_idle = rss_mib(agent_pid);
    println!(
        "scale: the agent of {} holds {agent_idle:.1} MiB before any image",
        fx.nodes[0]
    );
    // The cluster's own nodes (real agents) are pools p0…; simulated ones follow.
    let nodes_api: Api<Node> = Api::all(admin.clone());
    for (i, node) in fx.nodes.iter().enumerate() {
        nodes_api
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {POOL_LABEL: format!("p{i}")}}})),
            )
            .await
            .unwrap();
    }
    let own = fx.nodes.len();
    let simulated = node_count.saturating_sub(own);
    let started = Instant::now();
    let fleet = Fleet::start(
        &fx.env,
        fx.work.path(),
        &admin,
        &format!("sim-{}", &namespaces[0]),
        simulated,
        |i| format!("p{}", own + i),
        &namespaces,
    )
    .await;
    let nodes = own + fleet.nodes.len();
    println!(
        "scale: {} simulated nodes joined in {:.1}s",
        fleet.nodes.len(),
        started.elapsed().as_secs_f64()
    );
    // Nodes in pool p<k>: one when k < nodes, else none.
    let holders = move |p: &Planned| -> u32 {
        match &p.pool {
            None => nodes as u32,
            Some(pool) => (pool[1..].parse::<usize>().unwrap() < nodes) as u32,
        }
    };
    let mut made = 0;
    let mut probes_made = 0;
    for size in [small, large] {
        let started = Instant::now();
        let references = push_tiny_disks(&registry, "scale/disk", made..size).await;
        let pushed_s = started.elapsed().as_secs_f64();
        let planned: Vec<Planned> = (made..size)
            .map(|i| Planned {
                namespace: namespaces[i % NAMESPACES].clone(),
                name: format!("img-{i}"),
                reference: references[i - made].clone(),
                pool: Some(format!("p{}", i % POOLS)),
            })
            .collect();
        create_claims(&admin, &namespaces, made, size).await;
        let started = Instant::now();
        let mut bulk: Vec<f64> = create_and_converge(
            &admin,
            &format!("bulk-{size}"),
            &planned,
            holders,
            None,
            Duration::from_secs(1800),
        )
        .await
        .into_iter()
        .map(|(_, s)| s)
        .collect();
        bulk.sort_by(f64::total_cmp);
        let bulk_s = started.elapsed().as_secs_f64();
        made = size;
        // Convergence, one image at a time on the loaded cluster: images for one node (each
        // a node of its own), then a few for every node, further apart (each is one status
        // write by each of the nodes' agents).
        let references = push_tiny_disks(
            &registry,
            "scale/probe",
            probes_made..probes_made + PROBES + EVERY_NODE_PROBES,
        )
        .await;
        let probe = |k: usize, pool: Option<String>| Planned {
            namespace: namespaces[k % NAMESPACES].clone(),
            name: format!("probe-{}", probes_made + k),
            reference: references[k].clone(),
            pool,
        };
        let one_node: Vec<Planned> = (0..PROBES)
            .map(|k| probe(k, Some(format!("p{}", (7 * k) % nodes))))
            .collect();
        let every_node: Vec<Planned> = (PROBES..PROBES + EVERY_NODE_PROBES)
            .map(|k| probe(k, None))
            .collect();
        probes_made += PROBES + EVERY_NODE_PROBES;
        let controller_pid = fx.controller.lock().unwrap().child.id();
        println!("scale: probing convergence at {size} images (controller pid {controller_pid})");
        let cpu_before = cpu_s(controller_pid);
        let seconds = |v: Vec<(Planned, f64)>| {
            let mut s: Vec<f64> = v.into_iter().map(|(_, s)| s).collect();
            s.sort_by(f64::total_cmp);
            s
        };
        let converge = seconds(
            create_and_converge(
                &admin,
                &format!("probes-{size}"),
                &one_node,
                holders,
                Some(PROBE_PACE),
                Duration::from_secs(600),
            )
            .await,
        );
        let cpu_ms_per_image = (cpu_s(controller_pid) - cpu_before) * 1000.0 / PROBES as f64;
        let every = seconds(
            create_and_converge(
                &admin,
                &format!("every-{size}"),
                &every_node,
                holders,
                Some(EVERY_NODE_PACE),
                Duration::from_secs(600),
            )
            .await,
        );
        // The watches deliver the last writes to the webhook and the agents.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let webhook = rss_mib(fx.webhook.lock().unwrap().child.id());
        let controller = rss_mib(controller_pid);
        let agent = rss_mib(agent_pid);
        let (admission_p50, admission_p99) = admission_ms(&admin, &namespaces[0]).await;
        let ndc_max = ndc_bytes_max(&admin).await;
        println!(
            "scale: {size} images pushed in {pushed_s:.1}s, created and cached on their nodes in {bulk_s:.1}s (bulk p50 {:.1}s p99 {:.1}s); {PROBES} more for one node each, {PROBE_PACE:?} apart: p50 {:.2}s p99 {:.2}s, controller CPU {cpu_ms_per_image:.1} ms per image; {EVERY_NODE_PROBES} for all {nodes} nodes, {EVERY_NODE_PACE:?} apart: p50 {:.2}s max {:.2}s; admission p50 {admission_p50:.1} ms",
            percentile(&bulk, 0.5),
            percentile(&bulk, 0.99),
            percentile(&converge, 0.5),
            percentile(&converge, 0.99),
            percentile(&every, 0.5),
            percentile(&every, 1.0),
        );
        println!(
            "RESULT scale images={size} nodes={nodes} webhook_rss_mib={webhook:.1} agent_rss_mib={agent:.1} controller_rss_mib={controller:.1} converge_p50_s={:.2} converge_p99_s={:.2} admission_p99_ms={admission_p99:.1} ndc_bytes_max={ndc_max}",
            percentile(&converge, 0.5),
            percentile(&converge, 0.99),
        );
    }
    fleet.stop().await;
    for node in &fx.nodes {
        let _ = nodes_api
            .patch(
                node,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {POOL_LABEL: null}}})),
            )
            .await;
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

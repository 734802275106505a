//! Phase `herd`, a benchmark (run by `cargo bench --bench herd`, listed as ignored otherwise):
//! every agent of the cluster warms a new image at once, the `local` phase's way (one agent
//! process per node, node-bound tokens, peers on loopback addresses of their own), once with
//! peers off and once with peers on, each through a proxy in front of the registry that counts
//! the bytes it sends and holds each connection to `VMDISK_BENCH_HERD_REGISTRY_MIBPS` (default
//! 100 MiB/s, a cloud registry's share per node).
//!
//! Prints `RESULT herd agents=… registry_bytes_ratio=… all_warm_secs=… all_warm_secs_no_peers=…`
//! (the ratio: bytes the registry sent with peers on, over the layer's size; above 1.25 the
//! run fails) and, before it, the bytes of the run without peers, what the image's
//! `status.pull` says, and a third herd whose registry puller is killed mid-pull: the others
//! finish, every entry byte-identical. The image is a raw disk of `VMDISK_BENCH_HERD_MIB`
//! (default 1024) MiB of incompressible data in one gzip layer.

use std::sync::Arc;
use std::time::Instant;

use serde_json::json;
use vmdisk_tests::bench::env_or;
use vmdisk_tests::disks::{make_ext4_raw, same_content};
use vmdisk_tests::push::push_container_disk;
use vmdisk_tests::registry::TestRegistry;
use vmdisk_tests::throttle::ThrottledProxy;

use crate::local::LocalInstall;
use crate::peers::{cached_disk, image_pull, kill_the_puller, layer_of, wait_all_ready};
use crate::support::create_image;
use crate::{cases, Case, Phase};

pub fn phase() -> Phase<LocalInstall> {
    Phase {
        name: "herd",
        cases: cases![herd],
        exclusive: vec![],
        benchmark: true,
    }
}

/// What happens to the herd's puller.
#[derive(Clone, Copy, PartialEq)]
enum Puller {
    Lives,
    /// Killed mid-pull once the others fetch from it ([`kill_the_puller`]).
    Killed,
}

/// One herd: every agent warms `name` at once; (seconds until all hold it, registry bytes,
/// layer bytes).
async fn one_herd(
    fx: &Arc<LocalInstall>,
    case: &Case,
    ns: &str,
    registry: &TestRegistry,
    name: &str,
    seed: u64,
    puller: Puller,
) -> (f64, u64, u64) {
    let mib = env_or("VMDISK_BENCH_HERD_MIB", 1024);
    let rate = env_or("VMDISK_BENCH_HERD_REGISTRY_MIBPS", 100);
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let raw = make_ext4_raw(work.path(), name, mib + 64, mib, seed);
    let repo = format!("disks/{name}");
    let (reference, digest) = push_container_disk(registry, &repo, "v1", &raw).await;
    let (_, layer) = layer_of(registry, &reference).await;
    let proxy = ThrottledProxy::start("127.0.0.1", &registry.addr, rate << 20).await;
    let started = Instant::now();
    create_image(
        &case.admin(),
        ns,
        name,
        json!({"source": {"registry": {"url": format!("{}/{repo}:v1", proxy.addr), "insecure": true}}}),
    )
    .await;
    if puller == Puller::Killed {
        let (killed, secs) = kill_the_puller(fx, &digest, &raw, || ()).await;
        println!(
            "herd: {killed} killed mid-pull; the other {} agents finished {secs:.1}s later, every entry the published disk",
            fx.nodes.len() - 1
        );
    }
    let secs = wait_all_ready(fx, &digest, &fx.nodes, started).await;
    let sent = proxy.bytes_sent();
    for node in &fx.nodes {
        assert!(
            same_content(&raw, &cached_disk(fx, node, &digest)),
            "{node}'s entry is the published disk"
        );
    }
    (secs, sent, layer)
}

async fn herd(fx: Arc<LocalInstall>, case: Case) {
    let ns = case.namespace("herd").await;
    let registry = TestRegistry::start_plain();
    let agents = fx.nodes.len();

    fx.restart_agents(false);
    let (no_peers_secs, no_peers_sent, layer) =
        one_herd(&fx, &case, &ns, &registry, "alone", 5001, Puller::Lives).await;
    println!(
        "herd: peers off: {agents} agents warm in {no_peers_secs:.1}s, the registry sent {no_peers_sent} bytes ({:.2}x the {layer}-byte layer)",
        no_peers_sent as f64 / layer as f64
    );

    fx.restart_agents(true);
    let (secs, sent, layer) =
        one_herd(&fx, &case, &ns, &registry, "together", 5002, Puller::Lives).await;
    println!("herd: peers on: {agents} agents warm in {secs:.1}s, the registry sent {sent} bytes");
    let pull = image_pull(&fx, &case.admin(), &ns, "together").await;
    println!(
        "herd: the image's status.pull (and the controller's vmdisk_controller_image_* series): {} nodes asked, {} bytes from the registry, {} from peers, all nodes warm {:.1}s after the first pull began",
        pull.nodes_asked,
        pull.bytes_from_registry,
        pull.bytes_from_peers,
        pull.all_nodes_warm_seconds.unwrap_or_default()
    );
    let (orphaned_secs, orphaned_sent, _) =
        one_herd(&fx, &case, &ns, &registry, "orphaned", 5003, Puller::Killed).await;
    println!(
        "herd: with the puller killed: all {agents} warm in {orphaned_secs:.1}s, the registry sent {orphaned_sent} bytes ({:.2}x the layer)",
        orphaned_sent as f64 / layer as f64
    );
    let ratio = sent as f64 / layer as f64;
    println!(
        "RESULT herd agents={agents} registry_bytes_ratio={ratio:.2} all_warm_secs={secs:.1} all_warm_secs_no_peers={no_peers_secs:.1}"
    );
    // Bytes, not time: what peers are for, whatever this machine's speed.
    assert!(
        ratio <= 1.25,
        "with peers the registry sent {ratio:.2}x the layer to {agents} agents"
    );
}

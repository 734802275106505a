//! Peers on a real control plane: the `local` phase's agents (one per node, each with its own
//! loopback address, the shipped certificate layout and node-bound tokens for the audience
//! `vmdisk-peer`) warm a new image together through one registry pull, finish when the node
//! that pulls it dies mid-way, and serve a layer only to agents of nodes asked to hold it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::{Api, ResourceExt};
use serde_json::json;
use sha2::Digest as _;
use vmdisk_crds::{CacheEntryState, NodeDiskCache, PEER_AUDIENCE};
use vmdisk_registry::pull::{Puller, PullerConfig};
use vmdisk_tests::disks::{make_ext4_raw, same_content};
use vmdisk_tests::push::{options_for, push_container_disk};
use vmdisk_tests::registry::TestRegistry;
use vmdisk_tests::throttle::ThrottledProxy;

use crate::local::{LocalInstall, PEER_SERVER_NAME};
use crate::support::{create_image, service_account_token_for, wait_for};
use crate::Case;

const WAIT: Duration = Duration::from_secs(180);

/// The nodes whose NodeDiskCache shows `digest` Ready.
async fn ready_on(fx: &LocalInstall, digest: &str) -> Vec<String> {
    let caches: Api<NodeDiskCache> = Api::all(fx.admin.clone());
    let mut nodes = Vec::new();
    for cache in caches.list(&Default::default()).await.unwrap().items {
        let ready = cache
            .status
            .iter()
            .flat_map(|s| s.entries.iter())
            .any(|e| e.digest == digest && e.state == CacheEntryState::Ready);
        if ready {
            nodes.push(cache.name_any());
        }
    }
    nodes.sort();
    nodes
}

/// Waits until every node of `nodes` holds `digest` Ready; the seconds it took from `since`.
pub(crate) async fn wait_all_ready(
    fx: &LocalInstall,
    digest: &str,
    nodes: &[String],
    since: Instant,
) -> f64 {
    let mut wanted = nodes.to_vec();
    wanted.sort();
    let logs = || {
        wanted
            .iter()
            .map(|n| format!("agent {n}:\n{}", fx.agent_log(n)))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let deadline = Instant::now() + WAIT;
    loop {
        let ready = ready_on(fx, digest).await;
        if wanted.iter().all(|n| ready.contains(n)) {
            return since.elapsed().as_secs_f64();
        }
        assert!(
            Instant::now() < deadline,
            "{digest} Ready on {ready:?}, not on all of {wanted:?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The committed disk of `digest` in `node`'s cache.
pub(crate) fn cached_disk(fx: &LocalInstall, node: &str, digest: &str) -> std::path::PathBuf {
    let entries = fx.cache_dir(node).join("entries");
    std::fs::read_dir(&entries)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().contains(&digest[7..20]))
        .unwrap_or_else(|| panic!("no entry of {digest} in {}", entries.display()))
        .path()
        .join("disk.raw")
}

/// The agents' log lines about peers, for a failure's message.
fn peer_lines(fx: &LocalInstall, nodes: &[String]) -> String {
    nodes
        .iter()
        .flat_map(|n| {
            fx.agent_log(n)
                .lines()
                .filter(|l| {
                    l.contains("peer")
                        || l.contains("elected")
                        || l.contains("WARN")
                        || l.contains("ERROR")
                })
                .map(|l| format!("{n}: {l}"))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The image's one layer: (digest, size).
pub(crate) async fn layer_of(registry: &TestRegistry, reference: &str) -> (String, u64) {
    let image = Puller::new(PullerConfig::default())
        .resolve(reference, &options_for(registry))
        .await
        .unwrap();
    (image.layers[0].digest.clone(), image.layers[0].size)
}

/// The image's `status.pull` once it tells the time to all nodes warm, and the controller's
/// per-image metrics agree with it.
pub(crate) async fn image_pull(
    fx: &LocalInstall,
    admin: &kube::Client,
    ns: &str,
    name: &str,
) -> vmdisk_crds::ImagePull {
    let images: Api<vmdisk_crds::VMDiskImage> = Api::namespaced(admin.clone(), ns);
    let pull = wait_for("the image to tell how its nodes pulled it", WAIT, || {
        let images = images.clone();
        async move {
            let image = images.get(name).await.map_err(|e| e.to_string())?;
            let pull = image.status.and_then(|s| s.pull);
            pull.clone()
                .filter(|p| p.all_nodes_warm_seconds.is_some())
                .ok_or(format!("status.pull {pull:?}"))
        }
    })
    .await;
    let metrics = fx.controller_metrics().await;
    let labels = format!(r#"{{namespace="{ns}",image="{name}"}}"#);
    for (series, value) in [
        ("registry_bytes", pull.bytes_from_registry.to_string()),
        ("peer_bytes", pull.bytes_from_peers.to_string()),
        ("nodes_asked", pull.nodes_asked.to_string()),
    ] {
        let line = format!("vmdisk_controller_image_{series}{labels} {value}");
        assert!(metrics.contains(&line), "{line} missing from\n{metrics}");
    }
    pull
}

/// Every agent warms a new image at once: the registry sends its layer about once, every
/// entry is the published disk; then the same with the node pulling from the registry killed
/// mid-way: the others finish, nothing corrupt.
pub async fn peers_warm_a_new_image_with_one_registry_pull_and_survive_its_puller(
    fx: Arc<LocalInstall>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-peers").await;
    let nodes = fx.nodes.clone();
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();

    // 1. All at once, each node fetching from the others what they already have.
    let raw = make_ext4_raw(work.path(), "herd", 96, 64, 4004);
    let (reference, digest) = push_container_disk(&registry, "disks/herd", "v1", &raw).await;
    let (_, layer_size) = layer_of(&registry, &reference).await;
    // About 4 s from the registry: long enough for every node to start while it is pulled.
    let proxy = ThrottledProxy::start("127.0.0.1", &registry.addr, 16 << 20).await;
    let started = Instant::now();
    create_image(
        &admin,
        &ns,
        "herd",
        json!({"source": {"registry": {"url": format!("{}/disks/herd:v1", proxy.addr), "insecure": true}}}),
    )
    .await;
    let secs = wait_all_ready(&fx, &digest, &nodes, started).await;
    let sent = proxy.bytes_sent();
    let ratio = sent as f64 / layer_size as f64;
    println!(
        "peers: {} agents warmed a {layer_size}-byte layer in {secs:.1}s; the registry sent {sent} bytes ({ratio:.2}x the layer)",
        nodes.len()
    );
    for node in &nodes {
        assert!(
            same_content(&raw, &cached_disk(&fx, node, &digest)),
            "{node}'s entry is the published disk"
        );
    }
    assert!(
        ratio <= 1.25,
        "the registry sent {ratio:.2}x the layer to {} agents; what they said of peers:\n{}",
        nodes.len(),
        peer_lines(&fx, &nodes)
    );
    // What the image's status and the controller's metrics say of it: every node's layer
    // counted once, from one source or the other, and the registry's share what the proxy saw
    // (less the manifest and config).
    let pull = image_pull(&fx, &admin, &ns, "herd").await;
    println!("peers: the image's status.pull: {pull:?}");
    assert_eq!(pull.nodes_asked as usize, nodes.len());
    assert_eq!(
        pull.bytes_from_registry + pull.bytes_from_peers,
        layer_size * nodes.len() as u64
    );
    assert!(pull.bytes_from_registry >= layer_size && pull.bytes_from_registry <= sent);
    assert!(pull.all_nodes_warm_seconds.unwrap() <= secs + 1.0);

    // 2. The node pulling from the registry dies mid-way.
    let raw = make_ext4_raw(work.path(), "orphan", 96, 64, 4005);
    let (_, digest) = push_container_disk(&registry, "disks/orphan", "v1", &raw).await;
    proxy.set_rate(8 << 20);
    create_image(
        &admin,
        &ns,
        "orphan",
        json!({"source": {"registry": {"url": format!("{}/disks/orphan:v1", proxy.addr), "insecure": true}}}),
    )
    .await;
    let (seeder, secs) = kill_the_puller(&fx, &digest, &raw, || proxy.set_rate(1 << 30)).await;
    println!(
        "peers: with {seeder} killed mid-pull, the other {} finished {secs:.1}s later; what they said of peers:\n{}",
        nodes.len() - 1,
        peer_lines(&fx, &nodes)
    );
}

/// Kills the agent of the node elected to pull `digest` from the registry once every other
/// node fetches from it (then calls `after_kill`); the others finish with the published disk
/// `raw`, and so does the killed node's agent once started again. The node killed, and the
/// seconds the others took to finish after the kill.
pub(crate) async fn kill_the_puller(
    fx: &Arc<LocalInstall>,
    digest: &str,
    raw: &std::path::Path,
    after_kill: impl FnOnce(),
) -> (String, f64) {
    let nodes = fx.nodes.clone();
    let seeder = wait_for("the node elected to pull", WAIT, || {
        let fx = Arc::clone(fx);
        let nodes = nodes.clone();
        let digest = digest.to_string();
        async move {
            nodes
                .iter()
                .find(|n| {
                    fx.agent_log(n).lines().any(|l| {
                        l.contains("elected to pull from the registry") && l.contains(&digest)
                    })
                })
                .cloned()
                .ok_or_else(|| "nobody elected yet".to_string())
        }
    })
    .await;
    let others: Vec<String> = nodes.iter().filter(|n| **n != seeder).cloned().collect();
    wait_for("the other nodes to fetch from it", WAIT, || {
        let fx = Arc::clone(fx);
        let others = others.clone();
        let digest = digest.to_string();
        async move {
            let waiting = others
                .iter()
                .filter(|n| {
                    !fx.agent_log(n)
                        .lines()
                        .any(|l| l.contains("fetching from peers first") && l.contains(&digest))
                })
                .count();
            (waiting == 0)
                .then_some(())
                .ok_or(format!("{waiting} not fetching yet"))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !ready_on(fx, digest).await.contains(&seeder),
        "{seeder} finished its pull before it could be killed mid-way"
    );
    fx.kill_agent(&seeder);
    after_kill();
    let since = Instant::now();
    let secs = wait_all_ready(fx, digest, &others, since).await;
    for node in &others {
        assert!(
            same_content(raw, &cached_disk(fx, node, digest)),
            "{node}'s entry is the published disk"
        );
    }
    fx.start_agent(&seeder);
    wait_all_ready(fx, digest, std::slice::from_ref(&seeder), since).await;
    assert!(same_content(raw, &cached_disk(fx, &seeder, digest)));
    (seeder, secs)
}

/// Asks `node`'s agent for `layer` with `token` (none: no Authorization header); the status
/// and the body.
async fn ask_peer(
    fx: &LocalInstall,
    node: &str,
    layer: &str,
    token: Option<&str>,
) -> (u16, Vec<u8>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let addr: SocketAddr = fx.peer_addrs[node];
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut fx.peer_ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .resolve(PEER_SERVER_NAME, addr)
        .build()
        .unwrap();
    let mut request = client.get(format!(
        "https://{PEER_SERVER_NAME}:{}/v1/blobs/{layer}",
        addr.port()
    ));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.bytes().await.unwrap().to_vec())
}

/// A layer is served only to an agent of a node asked to hold its image, proved by its
/// node-bound token for the peers' audience; everyone else is refused, on the real API
/// server's TokenReview.
pub async fn peers_serve_only_agents_of_nodes_asked_to_hold_the_image(
    fx: Arc<LocalInstall>,
    case: Case,
) {
    let admin = case.admin();
    let ns = case.namespace("e2e-peer-auth").await;
    let fakes = fx.fake_nodes();
    let (holder, outsider) = (fakes[0].clone(), fakes[1].clone());
    let registry = TestRegistry::start_plain();
    let work = tempfile::tempdir().unwrap();
    let raw = make_ext4_raw(work.path(), "guarded", 16, 4, 4006);
    let (reference, digest) = push_container_disk(&registry, "disks/guarded", "v1", &raw).await;
    let (layer, _) = layer_of(&registry, &reference).await;
    create_image(
        &admin,
        &ns,
        "guarded",
        json!({"source": {"registry": {"url": reference, "insecure": true}},
               "cache": {"nodeSelector": {"kubernetes.io/hostname": holder}}}),
    )
    .await;
    wait_all_ready(&fx, &digest, std::slice::from_ref(&holder), Instant::now()).await;

    let outsider_token = fx.agent_token(&outsider, Some(PEER_AUDIENCE)).await;
    let api_server_token = fx.agent_token(&outsider, None).await;
    let agent_api_token = fx
        .agent_token(&holder, Some(vmdisk_crds::AGENT_API_AUDIENCE))
        .await;
    let not_an_agent = service_account_token_for(
        &admin,
        vmdisk_crds::INSTALL_NAMESPACE,
        "vmdisk-controller",
        None,
        Some(PEER_AUDIENCE),
    )
    .await;
    for (who, token, status) in [
        ("no token", None, 401),
        ("garbage", Some("not-a-token"), 401),
        (
            "the API server's audience",
            Some(api_server_token.as_str()),
            401,
        ),
        (
            "the agent API's audience",
            Some(agent_api_token.as_str()),
            401,
        ),
        ("another account", Some(not_an_agent.as_str()), 403),
        (
            "a node not asked to hold it",
            Some(outsider_token.as_str()),
            403,
        ),
    ] {
        let (got, body) = ask_peer(&fx, &holder, &layer, token).await;
        assert_eq!(got, status, "{who}: {}", String::from_utf8_lossy(&body));
    }
    // The holder's own agent may (the refusals above are the rules, not a broken server),
    // and gets exactly the layer.
    let own = fx.agent_token(&holder, Some(PEER_AUDIENCE)).await;
    let (got, body) = ask_peer(&fx, &holder, &layer, Some(&own)).await;
    assert_eq!(got, 206, "{}", String::from_utf8_lossy(&body));
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(&body))),
        layer
    );
}

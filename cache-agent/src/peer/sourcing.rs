//! Where a warm on this node gets an image's layers: from nodes that hold the image or are
//! pulling it (their NodeDiskCache status says so, and where their agent serves), else from
//! the registry, by one node only when several start at once.
//!
//! [`plan`] is the decision, over the cluster's NodeDiskCaches as plain values:
//! - nodes whose entry of the image is `Ready` or `Converting` (their download is whole), then
//!   those `Pulling` that reported progress (they serve what they have, as it arrives), are asked
//!   in that order, each group spread by a hash of this node and theirs so that not every
//!   node asks the same one first;
//! - when none holds or pulls it, the nodes asked to hold the image (their NodeDiskCache
//!   lists it, or the every-node list does) that serve peers elect one (the lowest hash of
//!   node and image): that node pulls from the registry, the others fetch from it once it
//!   shows `Pulling` (up to `--peer-seed-wait-seconds`, then from the registry themselves).
//!
//! Nodes whose bytes failed a digest check in this warm are left out.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt};
use kube::api::ListParams;
use kube::{Api, Client};
use vmdisk_crds::{AccessScope, ApiAccess, CacheEntryState, NodeDiskCache};
use vmdisk_registry::pull::peers::RefreshFn;
use vmdisk_registry::pull::{LayerDescriptor, LayerSources, Peer, PeerClient, ResolvedImage};

use super::blobs::Blobs;
use crate::warm::LayerSourcing;

/// What finding peers asks of the API server: every node's NodeDiskCache.
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess::new(
        "vmdisk.io",
        "nodediskcaches",
        &["list"],
        AccessScope::Cluster,
    ),
    ApiAccess::new("", "configmaps", &["list"], AccessScope::InstallNamespace),
];

/// How often a node waiting for the elected one looks again.
const LOOK_AGAIN: Duration = Duration::from_secs(1);

/// What to do for one image's layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerPlan {
    /// Ask these, in order, then the registry.
    Fetch(Vec<Peer>),
    /// This node was elected: the registry.
    Seed,
    /// Another node was elected and has not started: look again shortly.
    WaitFor(String),
}

fn spread(a: &str, b: &str) -> u64 {
    let mut h = DefaultHasher::new();
    (a, b).hash(&mut h);
    h.finish()
}

/// The decision, for image `digest` on node `me` (see the module's text); `every_node`: the
/// image is on the every-node list.
pub fn plan(
    caches: &[NodeDiskCache],
    me: &str,
    digest: &str,
    every_node: bool,
    excluded: &[String],
    max_peers: usize,
) -> PeerPlan {
    let others = caches.iter().filter(|c| {
        let node = c.spec.node_name.as_str();
        node != me && !excluded.iter().any(|e| e == node)
    });
    let endpoint = |c: &NodeDiskCache| c.status.as_ref()?.peer_endpoint.clone();
    let mut whole = Vec::new();
    let mut partial = Vec::new();
    for cache in others.clone() {
        let Some(url) = endpoint(cache) else { continue };
        let Some(entry) = cache
            .status
            .as_ref()
            .and_then(|s| s.entries.iter().find(|e| e.digest == digest))
        else {
            continue;
        };
        let peer = Peer {
            node: cache.spec.node_name.clone(),
            url,
        };
        match entry.state {
            CacheEntryState::Ready | CacheEntryState::Converting => whole.push(peer),
            // Only a node with bytes already: two nodes that have none would wait for each
            // other until both gave up.
            CacheEntryState::Pulling if entry.progress.is_some_and(|p| p > 0.0) => {
                partial.push(peer)
            }
            _ => {}
        }
    }
    if !whole.is_empty() || !partial.is_empty() {
        whole.sort_by_key(|p| spread(me, &p.node));
        partial.sort_by_key(|p| spread(me, &p.node));
        whole.extend(partial);
        whole.truncate(max_peers.max(1));
        return PeerPlan::Fetch(whole);
    }
    let asked = |c: &&NodeDiskCache| every_node || c.spec.images.iter().any(|i| i.digest == digest);
    let elected = others
        .filter(asked)
        .filter(|c| endpoint(c).is_some())
        .chain(caches.iter().filter(|c| c.spec.node_name == me).take(1))
        .min_by_key(|c| spread(&c.spec.node_name, digest));
    match elected {
        None => PeerPlan::Seed,
        Some(c) if c.spec.node_name == me => PeerPlan::Seed,
        Some(c) => {
            // The elected node serves from its first byte on (a request just before its
            // download begins waits for it).
            let started = c
                .status
                .as_ref()
                .and_then(|s| s.entries.iter().find(|e| e.digest == digest))
                .is_some_and(|e| e.state == CacheEntryState::Pulling);
            match endpoint(c) {
                Some(url) if started => PeerPlan::Fetch(vec![Peer {
                    node: c.spec.node_name.clone(),
                    url,
                }]),
                _ => PeerPlan::WaitFor(c.spec.node_name.clone()),
            }
        }
    }
}

/// What looking for peers needs; cheap to clone into a download's refresh.
#[derive(Clone)]
struct Finder {
    node: String,
    kube: Client,
    caches: Api<NodeDiskCache>,
    max_peers: usize,
}

impl Finder {
    /// One look at the cluster: the plan for image `digest`, or why there is none.
    async fn look(&self, digest: &str, excluded: &[String]) -> Result<PeerPlan, kube::Error> {
        let caches = self.caches.list(&ListParams::default()).await?.items;
        let every_node = super::every_node_digests(&self.kube)
            .await?
            .contains(digest);
        Ok(plan(
            &caches,
            &self.node,
            digest,
            every_node,
            excluded,
            self.max_peers,
        ))
    }

    /// The peers to ask now; none when this node should pull from the registry, waiting up
    /// to `seed_wait` for an elected node to start.
    async fn peers(&self, digest: &str, excluded: &[String], seed_wait: Duration) -> Vec<Peer> {
        let give_up = Instant::now() + seed_wait;
        loop {
            match self.look(digest, excluded).await {
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "cannot read the NodeDiskCaches or the every-node list to find peers; pulling from the registry");
                    return Vec::new();
                }
                Ok(PeerPlan::Fetch(peers)) => {
                    tracing::info!(%digest, peers = ?peers.iter().map(|p| &p.node).collect::<Vec<_>>(), "fetching from peers first");
                    return peers;
                }
                Ok(PeerPlan::Seed) => {
                    tracing::info!(%digest, "elected to pull from the registry for the other nodes");
                    return Vec::new();
                }
                Ok(PeerPlan::WaitFor(node)) if Instant::now() >= give_up => {
                    tracing::info!(%digest, %node, waited = ?seed_wait, "the elected node has not started; pulling from the registry");
                    return Vec::new();
                }
                Ok(PeerPlan::WaitFor(_)) => tokio::time::sleep(LOOK_AGAIN).await,
            }
        }
    }
}

/// The agent's [`LayerSourcing`]: peers found through the NodeDiskCaches, and a copy of
/// every layer kept for this node's own peers.
pub struct PeerSourcing {
    finder: Finder,
    blobs: Arc<Blobs>,
    client: PeerClient,
    seed_wait: Duration,
}

impl PeerSourcing {
    pub fn new(
        client: Client,
        node: String,
        blobs: Arc<Blobs>,
        peer_client: PeerClient,
        seed_wait: Duration,
    ) -> Self {
        Self {
            finder: Finder {
                node,
                caches: Api::all(client.clone()),
                kube: client,
                max_peers: 3,
            },
            blobs,
            client: peer_client,
            seed_wait,
        }
    }
}

impl LayerSourcing for PeerSourcing {
    fn sources<'a>(
        &'a self,
        image: &'a ResolvedImage,
        layer: &'a LayerDescriptor,
        excluded: &'a [String],
    ) -> BoxFuture<'a, LayerSources> {
        async move {
            let peers = self
                .finder
                .peers(&image.digest, excluded, self.seed_wait)
                .await;
            // When every peer is busy, a fresh look finds the nodes that got bytes since.
            let finder = self.finder.clone();
            let (digest, excluded) = (image.digest.clone(), excluded.to_vec());
            let refresh: RefreshFn = Arc::new(move || {
                let (finder, digest, excluded) = (finder.clone(), digest.clone(), excluded.clone());
                async move {
                    match finder.look(&digest, &excluded).await {
                        Ok(PeerPlan::Fetch(peers)) => peers,
                        _ => Vec::new(),
                    }
                }
                .boxed()
            });
            LayerSources {
                peers,
                client: Some(self.client.clone()),
                sink: self.blobs.sink(&layer.digest, layer.size, &image.digest),
                refresh: Some(refresh),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmdisk_crds::{CacheEntryStatus, DesiredImage, NodeDiskCacheSpec, NodeDiskCacheStatus};

    const IMAGE: &str = "sha256:aaaa";

    fn cache(
        node: &str,
        asked: bool,
        serves: bool,
        state: Option<(CacheEntryState, f64)>,
    ) -> NodeDiskCache {
        let mut c = NodeDiskCache::new(
            node,
            NodeDiskCacheSpec {
                node_name: node.into(),
                images: if asked {
                    vec![DesiredImage {
                        namespace: "team".into(),
                        name: "disk".into(),
                        digest: IMAGE.into(),
                        format: Default::default(),
                        pinned: false,
                        url: "registry.example/disk:v1".into(),
                        pull_secret: false,
                        ca_bundle: None,
                        insecure: None,
                    }]
                } else {
                    vec![]
                },
                ..Default::default()
            },
        );
        c.status = Some(NodeDiskCacheStatus {
            peer_endpoint: serves.then(|| format!("https://{node}:9443")),
            entries: state
                .map(|(state, progress)| {
                    vec![CacheEntryStatus {
                        digest: IMAGE.into(),
                        state,
                        progress: Some(progress),
                        ..Default::default()
                    }]
                })
                .unwrap_or_default(),
            ..Default::default()
        });
        c
    }

    fn nodes(plan: PeerPlan) -> Vec<String> {
        match plan {
            PeerPlan::Fetch(peers) => peers.into_iter().map(|p| p.node).collect(),
            other => panic!("expected peers, got {other:?}"),
        }
    }

    #[test]
    fn holders_first_then_nodes_still_pulling_never_this_node_or_the_excluded() {
        let caches = vec![
            cache("me", true, true, Some((CacheEntryState::Ready, 1.0))),
            cache("pulling", true, true, Some((CacheEntryState::Pulling, 0.4))),
            cache("ready", true, true, Some((CacheEntryState::Ready, 1.0))),
            cache(
                "converting",
                true,
                true,
                Some((CacheEntryState::Converting, 1.0)),
            ),
            cache("pending", true, true, Some((CacheEntryState::Pending, 0.0))),
            cache("failed", true, true, Some((CacheEntryState::Failed, 0.0))),
            cache(
                "no-endpoint",
                true,
                false,
                Some((CacheEntryState::Ready, 1.0)),
            ),
            cache("bad", true, true, Some((CacheEntryState::Ready, 1.0))),
        ];
        let got = nodes(plan(&caches, "me", IMAGE, false, &["bad".into()], 10));
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(
            got[..2].contains(&"ready".to_string()) && got[..2].contains(&"converting".to_string())
        );
        assert_eq!(got[2], "pulling");
        assert_eq!(
            nodes(plan(&caches, "me", IMAGE, false, &["bad".into()], 1)).len(),
            1
        );
    }

    #[test]
    fn when_nobody_has_it_one_node_of_those_asked_is_elected_and_the_others_wait_for_it() {
        let names: Vec<String> = (0..8).map(|i| format!("node-{i}")).collect();
        let caches: Vec<_> = names.iter().map(|n| cache(n, true, true, None)).collect();
        let plans: Vec<PeerPlan> = names
            .iter()
            .map(|n| plan(&caches, n, IMAGE, false, &[], 3))
            .collect();
        let seeds: Vec<&String> = names
            .iter()
            .zip(&plans)
            .filter(|(_, p)| **p == PeerPlan::Seed)
            .map(|(n, _)| n)
            .collect();
        assert_eq!(seeds.len(), 1, "exactly one node pulls: {plans:?}");
        for p in &plans {
            assert!(
                *p == PeerPlan::Seed || *p == PeerPlan::WaitFor(seeds[0].clone()),
                "{p:?}"
            );
        }
        // The elected node's bytes failed the digest: the others do not wait for it.
        let without = plan(
            &caches,
            "node-x",
            IMAGE,
            false,
            std::slice::from_ref(seeds[0]),
            3,
        );
        assert_ne!(without, PeerPlan::WaitFor(seeds[0].clone()));
    }

    #[test]
    fn nodes_that_started_without_bytes_are_not_asked_but_the_elected_one_is() {
        let names: Vec<String> = (0..5).map(|i| format!("node-{i}")).collect();
        let elected = names
            .iter()
            .min_by_key(|n| spread(n, IMAGE))
            .unwrap()
            .clone();
        // Everyone shows Pulling with no progress yet: only the elected node is a source,
        // never two that would wait for each other.
        let caches: Vec<_> = names
            .iter()
            .map(|n| cache(n, true, true, Some((CacheEntryState::Pulling, 0.0))))
            .collect();
        for node in names.iter().filter(|n| **n != elected) {
            assert_eq!(
                nodes(plan(&caches, node, IMAGE, false, &[], 3)),
                vec![elected.clone()]
            );
        }
        assert_eq!(
            plan(&caches, &elected, IMAGE, false, &[], 3),
            PeerPlan::Seed
        );
    }

    #[test]
    fn nodes_not_asked_or_not_serving_peers_are_not_elected() {
        let caches = vec![
            cache("other", false, true, None),
            cache("quiet", true, false, None),
        ];
        assert_eq!(plan(&caches, "me", IMAGE, false, &[], 3), PeerPlan::Seed);
        assert_eq!(plan(&[], "me", IMAGE, false, &[], 3), PeerPlan::Seed);
    }

    #[test]
    fn an_image_every_node_holds_elects_among_all_nodes_serving_peers() {
        // Every-node images are not in the NodeDiskCaches' lists.
        let names: Vec<String> = (0..6).map(|i| format!("node-{i}")).collect();
        let caches: Vec<_> = names.iter().map(|n| cache(n, false, true, None)).collect();
        let seeds = names
            .iter()
            .filter(|n| plan(&caches, n, IMAGE, true, &[], 3) == PeerPlan::Seed)
            .count();
        assert_eq!(seeds, 1);
        // Without the every-node list each would elect itself.
        let alone = names
            .iter()
            .filter(|n| plan(&caches, n, IMAGE, false, &[], 3) == PeerPlan::Seed)
            .count();
        assert_eq!(alone, names.len());
    }
}

//! A fleet of simulated cache agents, for placement at scale: the `local` phase's
//! `placement_at_scale` case and the `scale` benchmark.
//!
//! Each simulated agent plays one node's agent with that agent's own credentials: a token of
//! `vmdisk-cache-agent` bound to a pod on its node, so the API server names the node and the
//! validating policy holds it to that node, as for the DaemonSet's agents. Like a real agent it
//! creates its node's NodeDiskCache and watches it and the every-node list by name; it reports
//! every image of its lists that lives in the case's namespaces Ready at once (a warm that takes no time), so what is
//! timed is vmdisk's placement and aggregation. Its nodes are Node objects the fleet makes
//! (tainted so that nothing else is scheduled there) and deletes again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use vmdisk_crds::{
    CacheEntryState, CacheEntryStatus, DesiredImage, NodeDiskCache, NodeDiskCacheStatus,
    EVERY_NODE_LIST, EVERY_NODE_LIST_KEY, INSTALL_NAMESPACE,
};

use crate::support::{client_from, service_account_token, Env};

/// The label the cases' images select their nodes by.
pub const POOL_LABEL: &str = "e2e.vmdisk.io/pool";
/// Keeps every other pod off the fleet's nodes.
const TAINT: &str = "e2e.vmdisk.io/simulated";
/// Nodes set up at once.
const IN_FLIGHT: usize = 16;

pub struct Fleet {
    pub nodes: Vec<String>,
    /// Each node's agent client (its own credentials).
    pub clients: BTreeMap<String, Client>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    admin: Client,
}

impl Fleet {
    /// `count` nodes named `<prefix>-<i>`, node `i` labelled `POOL_LABEL=pool(i)`, each with its
    /// simulated agent, which reports the images of `namespaces` only.
    pub async fn start(
        env: &Env,
        work: &Path,
        admin: &Client,
        prefix: &str,
        count: usize,
        pool: impl Fn(usize) -> String,
        namespaces: &[String],
    ) -> Fleet {
        let namespaces: Arc<BTreeSet<String>> = Arc::new(namespaces.iter().cloned().collect());
        let nodes: Vec<(String, String)> = (0..count)
            .map(|i| (format!("{prefix}-{i}"), pool(i)))
            .collect();
        let mut started = Vec::new();
        for chunk in nodes.chunks(IN_FLIGHT) {
            let joined = futures::future::join_all(
                chunk
                    .iter()
                    .map(|(node, pool)| join(env, work, admin, node, pool)),
            )
            .await;
            for ((node, _), client) in chunk.iter().zip(joined) {
                let task = tokio::spawn(simulate(
                    client.clone(),
                    node.clone(),
                    Arc::clone(&namespaces),
                ));
                started.push((node.clone(), client, task));
            }
        }
        let mut fleet = Fleet {
            nodes: Vec::new(),
            clients: BTreeMap::new(),
            tasks: Vec::new(),
            admin: admin.clone(),
        };
        for (node, client, task) in started {
            fleet.nodes.push(node.clone());
            fleet.clients.insert(node, client);
            fleet.tasks.push(task);
        }
        fleet.nodes.sort();
        fleet
    }

    /// Stops the agents and deletes their pods and nodes (the NodeDiskCaches go with their
    /// nodes, their owner).
    pub async fn stop(self) {
        for task in &self.tasks {
            task.abort();
        }
        let pods: Api<Pod> = Api::namespaced(self.admin.clone(), INSTALL_NAMESPACE);
        let nodes: Api<Node> = Api::all(self.admin.clone());
        stream::iter(self.nodes)
            .for_each_concurrent(IN_FLIGHT, |node| {
                let (pods, nodes) = (pods.clone(), nodes.clone());
                async move {
                    let _ = pods
                        .delete(&agent_pod(&node), &DeleteParams::default().grace_period(0))
                        .await;
                    let _ = nodes.delete(&node, &DeleteParams::default()).await;
                }
            })
            .await;
    }
}

fn agent_pod(node: &str) -> String {
    format!("{node}-agent")
}

/// Makes `node` and its agent's pod; returns a client with the agent's credentials, once the
/// agent's NodeDiskCache exists (created as the agent creates it: server-side apply, owned by
/// the Node).
async fn join(env: &Env, work: &Path, admin: &Client, node: &str, pool: &str) -> Client {
    let nodes: Api<Node> = Api::all(admin.clone());
    let made: Node = serde_json::from_value(json!({
        "metadata": {"name": node, "labels": {"kubernetes.io/hostname": node, POOL_LABEL: pool}},
        "spec": {"taints": [{"key": TAINT, "effect": "NoSchedule"}]},
    }))
    .unwrap();
    let made = nodes
        .create(&PostParams::default(), &made)
        .await
        .unwrap_or_else(|e| panic!("node {node}: {e}"));
    let pods: Api<Pod> = Api::namespaced(admin.clone(), INSTALL_NAMESPACE);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": agent_pod(node), "labels": {"app.kubernetes.io/name": "e2e-simulated-agent"}},
        "spec": {"nodeName": node, "serviceAccountName": "vmdisk-cache-agent",
                 "automountServiceAccountToken": false,
                 "tolerations": [{"operator": "Exists"}],
                 "containers": [{"name": "agent", "image": "registry.k8s.io/pause:3.10"}]},
    }))
    .unwrap();
    let pod = pods
        .create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("pod {}: {e}", agent_pod(node)));
    let token = service_account_token(
        admin,
        INSTALL_NAMESPACE,
        "vmdisk-cache-agent",
        Some((&pod.name_any(), &pod.uid().unwrap())),
    )
    .await;
    let client =
        client_from(&env.kubeconfig_with_token(work, &format!("sim-{node}"), &token)).await;
    let cache = json!({
        "apiVersion": "vmdisk.io/v1alpha1", "kind": "NodeDiskCache",
        "metadata": {"name": node, "ownerReferences": [{"apiVersion": "v1", "kind": "Node",
            "name": node, "uid": made.uid().unwrap()}]},
        "spec": {"nodeName": node},
    });
    Api::<NodeDiskCache>::all(client.clone())
        .patch(
            node,
            &PatchParams::apply("vmdisk-cache-agent").force(),
            &Patch::Apply(&cache),
        )
        .await
        .unwrap_or_else(|e| panic!("{node}'s NodeDiskCache, as its agent: {e}"));
    client
}

/// One agent: watches its NodeDiskCache by name and reports each listed image of
/// `namespaces` Ready, writing its status only when it changes.
async fn simulate(client: Client, node: String, namespaces: Arc<BTreeSet<String>>) {
    /// What changed: this node's list, or the list of every node.
    enum Listed {
        Own(Vec<DesiredImage>),
        Every(Vec<DesiredImage>),
    }
    let api: Api<NodeDiskCache> = Api::all(client.clone());
    let own = watcher(
        api.clone(),
        watcher::Config::default().fields(&format!("metadata.name={node}")),
    )
    .default_backoff()
    .applied_objects()
    .filter_map(|c| futures::future::ready(c.ok().map(|c| Listed::Own(c.spec.images))));
    let every = watcher(
        Api::<ConfigMap>::namespaced(client, INSTALL_NAMESPACE),
        watcher::Config::default().fields(&format!("metadata.name={EVERY_NODE_LIST}")),
    )
    .default_backoff()
    .applied_objects()
    .filter_map(|m| {
        futures::future::ready(m.ok().map(|m| {
            let json = m.data.unwrap_or_default().remove(EVERY_NODE_LIST_KEY);
            Listed::Every(
                json.and_then(|j| serde_json::from_str(&j).ok())
                    .unwrap_or_default(),
            )
        }))
    });
    let mut changes = futures::stream::select(own.boxed(), every.boxed());
    let (mut own_list, mut every_list) = (Vec::new(), Vec::new());
    let mut reported: Option<Vec<CacheEntryStatus>> = None;
    while let Some(change) = changes.next().await {
        match change {
            Listed::Own(l) => own_list = l,
            Listed::Every(l) => every_list = l,
        }
        let mut entries: Vec<CacheEntryStatus> = own_list
            .iter()
            .chain(&every_list)
            .filter(|i| namespaces.contains(&i.namespace))
            .map(|i| CacheEntryStatus {
                digest: i.digest.clone(),
                format: i.format,
                state: CacheEntryState::Ready,
                source_format: Some("raw".into()),
                virtual_size: Some(1 << 20),
                allocated_size: Some(1 << 20),
                ..Default::default()
            })
            .collect();
        entries.sort_by(|a, b| (&a.digest, a.format.as_str()).cmp(&(&b.digest, b.format.as_str())));
        entries.dedup_by(|a, b| a.digest == b.digest && a.format == b.format);
        if reported.as_ref() == Some(&entries) {
            continue;
        }
        let status = NodeDiskCacheStatus {
            entry_count: entries.len() as u32,
            entries: entries.clone(),
            ..Default::default()
        };
        match api
            .patch_status(
                &node,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
        {
            Ok(_) => reported = Some(entries),
            Err(e) => eprintln!("simulated agent of {node}: status refused: {e}"),
        }
    }
}

/// Tiny containerDisks (4 KiB raw disks, each different: each its own digest), pushed as
/// `<repo>:d<i>` for each `i` of `indices`; returns their references in that order.
pub async fn push_tiny_disks(
    registry: &vmdisk_tests::registry::TestRegistry,
    repo: &str,
    indices: std::ops::Range<usize>,
) -> Vec<String> {
    use vmdisk_tests::push::{push_blobs, LayerSpec, TAR_GZIP};
    let indices: Vec<usize> = indices.collect();
    let mut references = Vec::new();
    for chunk in indices.chunks(4 * IN_FLIGHT) {
        let pushed = futures::future::join_all(chunk.iter().map(|&i| async move {
            // Its own bytes, so its own digest: no other image (of this or another
            // repository) is already cached on some node under it.
            let mut disk = vec![0u8; 4096];
            disk[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let name = &repo.as_bytes()[..repo.len().min(4088)];
            disk[8..8 + name.len()].copy_from_slice(name);
            let layer = LayerSpec {
                entries: vec![("disk/disk.img".into(), disk)],
                media_type: TAR_GZIP,
            };
            push_blobs(
                registry,
                repo,
                &format!("d{i}"),
                vec![(layer.encode(), TAR_GZIP)],
            )
            .await
        }))
        .await;
        references.extend(pushed.into_iter().map(|(reference, _)| reference));
    }
    references
}

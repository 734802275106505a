//! Placement: which images each node's agent should hold, decided once by the controller and
//! written to the spec of that node's NodeDiskCache. An agent watches only its own
//! NodeDiskCache, so what it keeps in memory and what the API server sends it grow with what
//! its node holds, not with the cluster's images. [`plan`] holds the pure decisions; [`run`]
//! recomputes the lists when an image, a node's labels or a NodeDiskCache change, and writes
//! only the lists that differ.
//!
//! Only nodes running an agent get a list: the agent creates its node's NodeDiskCache when it
//! starts (owned by the Node), and the controller fills in the spec. Images for every node (no
//! `cache.nodeSelector`) are on one list instead, the ConfigMap `vmdisk-every-node-images` in
//! vmdisk's namespace, which every agent watches besides its own: an image for all of 300
//! nodes is one write, not 300 (measured: 300 list writes took 4-8 s on the test cluster's API
//! server, busy with the agents' reports).

pub mod plan;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::events::Recorder;
use futures::{stream, StreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, ObjectReference};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use tokio::sync::Notify;
use vmdisk_crds::{
    reasons, AccessScope, ApiAccess, NodeDiskCache, VMDiskImage, EVERY_NODE_LIST,
    EVERY_NODE_LIST_KEY, INSTALL_NAMESPACE, MANAGED_BY, MANAGED_BY_LABEL,
};

/// Field manager of the every-node list.
const FIELD_MANAGER: &str = "vmdisk-controller";

use plan::NodeList;

/// What placement asks of the API server (it reads NodeDiskCaches through the image
/// controller's watch). Agents may not write their own list: `deploy/validating-policy.yaml`.
pub const API_ACCESS: &[ApiAccess] = &[
    ApiAccess::new(
        "vmdisk.io",
        "nodediskcaches",
        &["patch"],
        AccessScope::Cluster,
    ),
    // The every-node list (server-side apply creates it the first time).
    ApiAccess::new(
        "",
        "configmaps",
        &["create", "patch"],
        AccessScope::InstallNamespace,
    ),
];

/// Changes arriving together (an image's status write, many images created at once) make one
/// round.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A round without any change, in case a write was lost.
const RESYNC: Duration = Duration::from_secs(60);
/// A list written is not written again for this long while the watch has yet to show it.
const TRUST_WRITE: Duration = Duration::from_secs(30);
/// Lists written at once.
const WRITES_IN_FLIGHT: usize = 32;

/// The stores placement decides from, and what wakes it.
pub struct Placement {
    pub client: Client,
    pub images: Store<VMDiskImage>,
    /// Nodes with their labels (vmdisk's own `cache.vmdisk.io/` labels dropped).
    pub nodes: Store<Node>,
    pub caches: Store<NodeDiskCache>,
    pub recorder: Recorder,
    /// Notified on every change that may move a list.
    pub wake: Arc<Notify>,
    pub metrics: crate::metrics::PlacementMetrics,
}

impl Placement {
    /// Keeps every agent's list current; never returns (dropped with the image controller).
    pub async fn run(self) {
        // Deciding from a store still being listed would empty every node's list.
        let (images, nodes, caches) = tokio::join!(
            crate::tasks::ready(&self.images),
            crate::tasks::ready(&self.nodes),
            crate::tasks::ready(&self.caches)
        );
        if images.is_err() || nodes.is_err() || caches.is_err() {
            tracing::error!("a watch stopped before its first list; placement is not started");
            return;
        }
        tracing::info!(
            images = self.images.state().len(),
            nodes = self.nodes.state().len(),
            caches = self.caches.state().len(),
            "placement started"
        );
        let mut written: HashMap<String, (NodeList, Instant)> = HashMap::new();
        let mut every_node: Option<NodeList> = None;
        let mut candidates = plan::Candidates::default();
        loop {
            self.round(&mut candidates, &mut written, &mut every_node)
                .await;
            tokio::select! {
                () = self.wake.notified() => {}
                // Applied again: unchanged, the API server writes nothing; changed by
                // someone else, it is put back.
                () = tokio::time::sleep(RESYNC) => every_node = None,
            }
            tokio::time::sleep(DEBOUNCE).await;
        }
    }

    /// Decides every node's list and writes those that changed.
    async fn round(
        &self,
        candidates: &mut plan::Candidates,
        written: &mut HashMap<String, (NodeList, Instant)>,
        every_node: &mut Option<NodeList>,
    ) {
        let started = Instant::now();
        candidates.update(&self.images.state());
        let every = candidates.every_node_list();
        if every_node.as_ref() != Some(&every) {
            let result = self.write_every_node(&every).await;
            self.metrics
                .wrote(if result.is_ok() { "written" } else { "failed" });
            match result {
                Ok(()) => {
                    if every.omitted > 0 && every_node.as_ref().is_none_or(|l| l.omitted == 0) {
                        self.list_full(None, &every).await;
                    }
                    *every_node = Some(every.clone());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot write the every-node image list; retried at the next change or resync")
                }
            }
        }
        let caches = self.caches.state();
        let mut writes = Vec::new();
        let mut omitted = i64::from(every.omitted);
        for cache in &caches {
            let name = cache.name_any();
            // A NodeDiskCache whose Node is gone is collected with it (its owner).
            let Some(node) = self.nodes.get(&ObjectRef::new(&name)) else {
                continue;
            };
            let list =
                candidates.node_list(node.metadata.labels.as_ref().unwrap_or(&Default::default()));
            omitted += i64::from(list.omitted);
            let current = NodeList {
                images: cache.spec.images.clone(),
                omitted: cache.spec.omitted_images.unwrap_or(0),
            };
            if current == list {
                continue;
            }
            if written
                .get(&name)
                .is_some_and(|(w, at)| *w == list && at.elapsed() < TRUST_WRITE)
            {
                continue;
            }
            writes.push((name, current.omitted, list));
        }
        let decided = started.elapsed();
        let count = writes.len();
        let results: Vec<_> = stream::iter(writes)
            .map(|(name, omitted_before, list)| async move {
                let result = self.write(&name, &list).await;
                (name, omitted_before, list, result)
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        for (name, omitted_before, list, result) in results {
            self.metrics
                .wrote(if result.is_ok() { "written" } else { "failed" });
            match result {
                Ok(()) => {
                    if list.omitted > 0 && omitted_before == 0 {
                        self.list_full(Some(&name), &list).await;
                    }
                    written.insert(name, (list, Instant::now()));
                }
                Err(e) => {
                    tracing::warn!(node = %name, error = %e, "cannot write the node's image list; retried at the next change or resync")
                }
            }
        }
        let present: std::collections::HashSet<&str> = caches
            .iter()
            .filter_map(|c| c.metadata.name.as_deref())
            .collect();
        written.retain(|name, _| present.contains(name.as_str()));
        self.metrics
            .observe_round(started.elapsed().as_secs_f64(), omitted);
        if count > 0 {
            tracing::info!(
                nodes = caches.len(),
                images = candidates.len(),
                written = count,
                decided_ms = decided.as_millis() as u64,
                took_ms = started.elapsed().as_millis() as u64,
                "node image lists updated"
            );
        }
    }

    async fn write(&self, node: &str, list: &NodeList) -> Result<(), kube::Error> {
        let patch = serde_json::json!({"spec": {
            "images": list.images,
            "omittedImages": (list.omitted > 0).then_some(list.omitted),
        }});
        Api::<NodeDiskCache>::all(self.client.clone())
            .patch(node, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(|_| ())
    }

    /// Writes the every-node list (server-side apply: unchanged content writes nothing).
    async fn write_every_node(&self, list: &NodeList) -> Result<(), kube::Error> {
        let images = serde_json::to_string(&list.images).map_err(kube::Error::SerdeError)?;
        let map = serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": EVERY_NODE_LIST, "namespace": INSTALL_NAMESPACE,
                         "labels": {MANAGED_BY_LABEL: MANAGED_BY}},
            "data": {EVERY_NODE_LIST_KEY: images},
        });
        Api::<ConfigMap>::namespaced(self.client.clone(), INSTALL_NAMESPACE)
            .patch(
                EVERY_NODE_LIST,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&map),
            )
            .await
            .map(|_| ())
    }

    /// A Warning Event on the node's NodeDiskCache (`None`: the every-node list's ConfigMap).
    async fn list_full(&self, node: Option<&str>, list: &NodeList) {
        let reference = match node {
            Some(node) => ObjectReference {
                api_version: Some("vmdisk.io/v1alpha1".into()),
                kind: Some("NodeDiskCache".into()),
                name: Some(node.to_string()),
                ..Default::default()
            },
            None => ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("ConfigMap".into()),
                name: Some(EVERY_NODE_LIST.into()),
                namespace: Some(INSTALL_NAMESPACE.into()),
                ..Default::default()
            },
        };
        let note = format!(
            "{} image(s) select {} but the list is full at {} entries ({} KiB); pinned and older images keep their place",
            list.omitted,
            node.map_or("every node".to_string(), |n| format!("node {n}")),
            list.images.len(),
            plan::MAX_LIST_BYTES / 1024
        );
        let event = Event {
            type_: EventType::Warning,
            reason: reasons::NODE_LIST_FULL.into(),
            note: Some(note),
            action: "Place".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            tracing::warn!(?node, error = %e, "cannot record an Event");
        }
    }
}

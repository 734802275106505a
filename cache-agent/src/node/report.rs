//! What an agent tells the cluster about its own node, and only its own node: the
//! `NodeDiskCache/<node>` status and the node's `cache.vmdisk.io/*` labels (both computed by
//! pure functions), and Events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource};
use vmdisk_crds::{
    format_bytes_quantity, node_cache_label_key, AccessScope, ApiAccess, CacheEntryState,
    CacheEntryStatus, DiskFormat, EntryPull, NodeDiskCache, NodeDiskCacheSpec, NodeDiskCacheStatus,
    NODE_CACHE_LABEL_PREFIX, NODE_CACHE_LABEL_VALUE,
};

/// What the reporter asks of the API server. Writes to other nodes' objects are refused by
/// `deploy/validating-policy.yaml`, which RBAC cannot express.
pub const API_ACCESS: &[ApiAccess] = &[
    // The node (owner of its NodeDiskCache) and its `cache.vmdisk.io/*` labels.
    ApiAccess::new("", "nodes", &["get", "patch"], AccessScope::Cluster),
    // Server-side apply creates the NodeDiskCache the first time.
    ApiAccess::new(
        "vmdisk.io",
        "nodediskcaches",
        &["create", "patch"],
        AccessScope::Cluster,
    ),
    ApiAccess::new(
        "vmdisk.io",
        "nodediskcaches/status",
        &["patch"],
        AccessScope::Cluster,
    ),
    // Events about the (cluster-scoped) NodeDiskCache are recorded in `default`.
    ApiAccess::record_events(AccessScope::DefaultNamespace),
];

/// Field manager of everything the agent writes.
pub const FIELD_MANAGER: &str = "vmdisk-cache-agent";

/// One row of the report, built from the store and the running warms.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheEntryView {
    pub digest: String,
    pub format: DiskFormat,
    pub state: CacheEntryState,
    pub progress: Option<f64>,
    pub source_format: Option<String>,
    pub virtual_size: Option<u64>,
    pub allocated_size: Option<u64>,
    pub last_used: Option<DateTime<Utc>>,
    pub pinned: bool,
    pub message: Option<String>,
    /// How the entry was pulled, and when it was committed.
    pub pull: Option<(crate::store::PullRecord, DateTime<Utc>)>,
}

/// Times of a pull, to the millisecond (a warm from peers takes seconds).
fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The NodeDiskCache status for these entries, rows sorted by digest and format.
pub fn node_cache_status(
    entries: &[CacheEntryView],
    capacity: u64,
    budget: u64,
    used: u64,
) -> NodeDiskCacheStatus {
    let mut rows: Vec<CacheEntryStatus> = entries
        .iter()
        .map(|e| CacheEntryStatus {
            digest: e.digest.clone(),
            format: e.format,
            state: e.state,
            progress: e.progress.map(|p| (p * 1000.0).round() / 1000.0),
            source_format: e.source_format.clone(),
            virtual_size: e.virtual_size,
            allocated_size: e.allocated_size,
            last_used: e
                .last_used
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            pinned: e.pinned,
            message: e.message.clone(),
            pull: e.pull.map(|(record, finished)| EntryPull {
                started: rfc3339(record.started),
                finished: rfc3339(finished),
                bytes_from_registry: record.bytes_from_registry,
                bytes_from_peers: record.bytes_from_peers,
            }),
        })
        .collect();
    rows.sort_by(|a, b| (&a.digest, a.format).cmp(&(&b.digest, b.format)));
    NodeDiskCacheStatus {
        capacity_bytes: capacity,
        budget_bytes: budget,
        used_bytes: used,
        used_quantity: Some(format_bytes_quantity(used)),
        budget_quantity: Some(format_bytes_quantity(budget)),
        entry_count: rows.len() as u32,
        peer_endpoint: None,
        entries: rows,
        conditions: Vec::new(),
    }
}

/// A merge patch for the node's labels: adds the label of every ready digest, removes stale
/// `cache.vmdisk.io/*` labels, never touches other labels. `None` when nothing changes.
pub fn node_label_patch(
    current: &BTreeMap<String, String>,
    ready_digests: &BTreeSet<String>,
) -> Option<serde_json::Value> {
    let wanted: BTreeSet<String> = ready_digests
        .iter()
        .filter_map(|d| node_cache_label_key(d))
        .collect();
    let mut changes = serde_json::Map::new();
    for key in &wanted {
        if current.get(key).map(String::as_str) != Some(NODE_CACHE_LABEL_VALUE) {
            changes.insert(key.clone(), NODE_CACHE_LABEL_VALUE.into());
        }
    }
    for key in current.keys() {
        if key.starts_with(NODE_CACHE_LABEL_PREFIX) && !wanted.contains(key) {
            changes.insert(key.clone(), serde_json::Value::Null);
        }
    }
    (!changes.is_empty()).then(|| serde_json::json!({"metadata": {"labels": changes}}))
}

/// Writes this node's NodeDiskCache, labels and Events.
#[derive(Clone)]
pub struct NodeReporter {
    client: Client,
    node_name: String,
    last_status: Arc<Mutex<Option<NodeDiskCacheStatus>>>,
    recorder: Recorder,
}

impl NodeReporter {
    pub fn new(client: Client, node_name: String) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(node_name.clone()),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            node_name,
            last_status: Arc::default(),
        }
    }

    fn caches(&self) -> Api<NodeDiskCache> {
        Api::all(self.client.clone())
    }

    /// Creates (or adopts) `NodeDiskCache/<node>`, owned by the Node so it goes with it.
    pub async fn ensure_cache_object(&self) -> Result<(), kube::Error> {
        let node: Node = Api::all(self.client.clone()).get(&self.node_name).await?;
        let mut cache = NodeDiskCache::new(
            &self.node_name,
            NodeDiskCacheSpec {
                node_name: self.node_name.clone(),
                ..Default::default()
            },
        );
        if let Some(owner) = node.controller_owner_ref(&()).or_else(|| {
            Some(
                k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                    api_version: "v1".into(),
                    kind: "Node".into(),
                    name: self.node_name.clone(),
                    uid: node.metadata.uid.clone()?,
                    ..Default::default()
                },
            )
        }) {
            cache.metadata.owner_references = Some(vec![owner]);
        }
        self.caches()
            .patch(
                &self.node_name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&cache),
            )
            .await?;
        Ok(())
    }

    /// Brings the node's labels, then its NodeDiskCache status, in line with the cache. Labels
    /// first: the image controller counts a node warm from the status, so by the time an image
    /// is Ready on a node, pods created from then on are steered to it. Failures are logged and
    /// retried by the next report.
    pub async fn report(&self, status: &NodeDiskCacheStatus, ready: &BTreeSet<String>) {
        if let Err(e) = self.sync_labels(ready).await {
            tracing::warn!(error = %e, "cannot update this node's cache labels");
        }
        if let Err(e) = self.publish(status).await {
            tracing::warn!(error = %e, "cannot publish NodeDiskCache status");
        }
    }

    /// Publishes the status; skipped when it equals the last one published.
    pub async fn publish(&self, status: &NodeDiskCacheStatus) -> Result<bool, kube::Error> {
        if self.last_status.lock().expect("status lock").as_ref() == Some(status) {
            return Ok(false);
        }
        let patch = serde_json::json!({"status": status});
        self.caches()
            .patch_status(
                &self.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        *self.last_status.lock().expect("status lock") = Some(status.clone());
        Ok(true)
    }

    /// Brings the node's cache labels in line with the ready digests.
    pub async fn sync_labels(&self, ready: &BTreeSet<String>) -> Result<bool, kube::Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let node = nodes.get(&self.node_name).await?;
        let labels = node.metadata.labels.unwrap_or_default();
        match node_label_patch(&labels, ready) {
            None => Ok(false),
            Some(patch) => {
                nodes
                    .patch(
                        &self.node_name,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await?;
                Ok(true)
            }
        }
    }

    /// An Event on this node's NodeDiskCache.
    pub async fn event(&self, reason: &str, note: &str, warning: bool) -> Result<(), kube::Error> {
        let reference = ObjectReference {
            api_version: Some("vmdisk.io/v1alpha1".into()),
            kind: Some("NodeDiskCache".into()),
            name: Some(self.node_name.clone()),
            ..Default::default()
        };
        self.recorder
            .publish(
                &Event {
                    type_: if warning {
                        EventType::Warning
                    } else {
                        EventType::Normal
                    },
                    reason: reason.into(),
                    note: Some(note.chars().take(1000).collect()),
                    action: "Cache".into(),
                    secondary: None,
                },
                &reference,
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use kube::client::Body;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    #[test]
    fn status_rows_are_sorted_and_quantities_filled() {
        let views = vec![
            CacheEntryView {
                digest: D2.into(),
                state: CacheEntryState::Pulling,
                progress: Some(0.33333),
                ..Default::default()
            },
            CacheEntryView {
                digest: D1.into(),
                format: DiskFormat::Qcow2,
                state: CacheEntryState::Ready,
                virtual_size: Some(1 << 30),
                pinned: true,
                pull: Some((
                    crate::store::PullRecord {
                        started: "2026-12-04T10:00:00.125Z".parse().unwrap(),
                        bytes_from_registry: 10,
                        bytes_from_peers: 90,
                    },
                    "2026-12-04T10:00:05.5Z".parse().unwrap(),
                )),
                ..Default::default()
            },
        ];
        let s = node_cache_status(&views, 100 << 30, 50 << 30, 3 << 30);
        assert_eq!(
            s.entries[0].pull,
            Some(EntryPull {
                started: "2026-12-04T10:00:00.125Z".into(),
                finished: "2026-12-04T10:00:05.500Z".into(),
                bytes_from_registry: 10,
                bytes_from_peers: 90,
            })
        );
        assert_eq!(s.entries[1].pull, None);
        assert_eq!(s.entry_count, 2);
        assert_eq!(s.entries[0].digest, D1);
        assert_eq!(s.entries[1].progress, Some(0.333));
        assert_eq!(s.used_quantity.as_deref(), Some("3Gi"));
        assert_eq!(s.budget_quantity.as_deref(), Some("50Gi"));
    }

    #[test]
    fn label_patch_adds_ready_removes_stale_and_leaves_others() {
        let k1 = node_cache_label_key(D1).unwrap();
        let k2 = node_cache_label_key(D2).unwrap();
        let current: BTreeMap<String, String> = [
            ("kubernetes.io/hostname".to_string(), "n1".to_string()),
            (k2.clone(), "ready".to_string()),
        ]
        .into();
        let patch = node_label_patch(&current, &[D1.to_string()].into()).unwrap();
        let labels = &patch["metadata"]["labels"];
        assert_eq!(labels[&k1], "ready");
        assert!(labels[&k2].is_null());
        assert!(labels.get("kubernetes.io/hostname").is_none());
        let settled: BTreeMap<String, String> = [(k1, "ready".to_string())].into();
        assert_eq!(node_label_patch(&settled, &[D1.to_string()].into()), None);
    }

    type Handle = tower_test::mock::Handle<http::Request<Body>, http::Response<Body>>;

    async fn expect(
        handle: &mut Handle,
        method: &str,
        path: &str,
        reply: serde_json::Value,
    ) -> serde_json::Value {
        let (request, send) = handle.next_request().await.expect("a request");
        assert_eq!(request.method().as_str(), method);
        assert_eq!(request.uri().path(), path);
        let body = request.into_body().collect().await.unwrap().to_bytes();
        send.send_response(
            http::Response::builder()
                .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                .unwrap(),
        );
        if body.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&body).unwrap()
        }
    }

    #[tokio::test]
    async fn reporter_labels_the_node_before_publishing_and_skips_unchanged_status() {
        let (service, mut handle) =
            tower_test::mock::pair::<http::Request<Body>, http::Response<Body>>();
        let reporter = NodeReporter::new(Client::new(service, "default"), "node-a".into());
        let status = node_cache_status(
            &[CacheEntryView {
                digest: D1.into(),
                state: CacheEntryState::Ready,
                ..Default::default()
            }],
            10,
            5,
            1,
        );
        let cache_json = serde_json::json!({"apiVersion": "vmdisk.io/v1alpha1", "kind": "NodeDiskCache", "metadata": {"name": "node-a"}, "spec": {"nodeName": "node-a"}});
        let server = tokio::spawn(async move {
            // Labels before status: Ready in the status implies the label.
            let node = serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-a", "labels": {"zone": "a"}}});
            expect(&mut handle, "GET", "/api/v1/nodes/node-a", node.clone()).await;
            let body = expect(&mut handle, "PATCH", "/api/v1/nodes/node-a", node).await;
            assert_eq!(
                body["metadata"]["labels"][node_cache_label_key(D1).unwrap()],
                "ready"
            );
            assert!(body["metadata"]["labels"].get("zone").is_none());
            let body = expect(
                &mut handle,
                "PATCH",
                "/apis/vmdisk.io/v1alpha1/nodediskcaches/node-a/status",
                cache_json.clone(),
            )
            .await;
            assert_eq!(body["status"]["entries"][0]["digest"], D1);
            assert_eq!(body["status"]["entries"][0]["state"], "Ready");
            handle
        });
        reporter.report(&status, &[D1.to_string()].into()).await;
        assert!(
            !reporter.publish(&status).await.unwrap(),
            "unchanged status must not be re-sent"
        );
        let mut handle = server.await.unwrap();
        // No further request (e.g. to a VMDiskImage) was made.
        drop(reporter);
        assert!(handle.next_request().await.is_none());
    }
}

//! Which nodes can mount a containerDisk as an image volume (`pullMethod: node`), decided from
//! what the cluster reports rather than guessed: the API server's version (image volumes are on
//! by default from Kubernetes 1.35, GA in 1.36), each node's kubelet version and container
//! runtime (`status.nodeInfo`: containerd >= 2.1 or CRI-O >= 1.31; containerd 1.x fails such a
//! pod at container creation). The populator places node-pull pods only on such nodes; the
//! image controller reports them in the image's `NodePull` condition.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use vmdisk_crds::{AccessScope, ApiAccess};

use crate::tasks::Reflected;

/// The first Kubernetes minor version (1.x) with image volumes on by default.
pub const IMAGE_VOLUMES_SINCE: (u64, u64) = (1, 35);
/// Container runtimes that mount image volumes, from these versions.
pub const RUNTIMES: &[(&str, (u64, u64))] = &[("containerd", (2, 1)), ("cri-o", (1, 31))];

/// `major.minor` of a version such as `v1.36.2`, `2.3.4`, `1.6.20~ds1` or minor `36+`.
pub fn major_minor(version: &str) -> Option<(u64, u64)> {
    let mut parts = version.trim_start_matches('v').split('.');
    let number = |part: Option<&str>| -> Option<u64> {
        let digits: String = part?.chars().take_while(char::is_ascii_digit).collect();
        digits.parse().ok()
    };
    Some((number(parts.next())?, number(parts.next())?))
}

fn version_text((major, minor): (u64, u64)) -> String {
    format!("{major}.{minor}")
}

/// Whether the API server's version (`major`, `minor` as `/version` gives them) has image
/// volumes on by default.
pub fn server_supports(major: &str, minor: &str) -> Result<(), String> {
    let found = major_minor(&format!("{major}.{minor}"));
    match found {
        Some(v) if v >= IMAGE_VOLUMES_SINCE => Ok(()),
        _ => Err(format!(
            "the API server is Kubernetes {major}.{minor}; image volumes are on by default from {}",
            version_text(IMAGE_VOLUMES_SINCE)
        )),
    }
}

/// Whether one node's kubelet and runtime mount image volumes, and if not, why.
pub fn node_supports(node: &Node) -> Result<(), String> {
    let name = node.name_any();
    let info = node.status.as_ref().and_then(|s| s.node_info.as_ref());
    let kubelet = info.map(|i| i.kubelet_version.as_str()).unwrap_or("");
    let runtime = info
        .map(|i| i.container_runtime_version.as_str())
        .unwrap_or("");
    if major_minor(kubelet).is_none_or(|v| v < IMAGE_VOLUMES_SINCE) {
        return Err(format!(
            "node {name} runs kubelet {:?}; image volumes need {} or later",
            kubelet,
            version_text(IMAGE_VOLUMES_SINCE)
        ));
    }
    let (kind, version) = runtime.split_once("://").unwrap_or((runtime, ""));
    let wanted = RUNTIMES.iter().find(|(name, _)| *name == kind);
    match (wanted, major_minor(version)) {
        (Some((_, since)), Some(v)) if v >= *since => Ok(()),
        _ => Err(format!(
            "node {name} runs {:?}; image volumes need {}",
            runtime,
            RUNTIMES
                .iter()
                .map(|(n, v)| format!("{n} >= {}", version_text(*v)))
                .collect::<Vec<_>>()
                .join(" or ")
        )),
    }
}

/// Where a node-pull populator pod may run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodePull {
    /// These nodes mount image volumes (sorted).
    Nodes(Vec<String>),
    /// None does; why.
    Unavailable(String),
}

/// The nodes among `nodes` (only `only` when a node is chosen already, as for
/// WaitForFirstConsumer) that mount image volumes, on an API server that has them (`server`:
/// the result of [`server_supports`]).
pub fn node_pull<'a>(
    server: &Result<(), String>,
    nodes: impl IntoIterator<Item = &'a Node>,
    only: Option<&str>,
) -> NodePull {
    if let Err(why) = server {
        return NodePull::Unavailable(why.clone());
    }
    let mut able = Vec::new();
    let mut first_refusal = None;
    let mut seen = false;
    // By name: the same nodes give the same answer, word for word (it is written to status).
    let mut nodes: Vec<&Node> = nodes.into_iter().collect();
    nodes.sort_by_key(|n| n.name_any());
    for node in nodes {
        if only.is_some_and(|n| n != node.name_any()) {
            continue;
        }
        // A cordoned node takes no pod (unless it is the one chosen already).
        let cordoned = node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true);
        if cordoned && only.is_none() {
            continue;
        }
        seen = true;
        match node_supports(node) {
            Ok(()) => able.push(node.name_any()),
            Err(why) => {
                first_refusal.get_or_insert(why);
            }
        }
    }
    match (able.is_empty(), first_refusal, only) {
        // Sorted by name already.
        (false, _, _) => NodePull::Nodes(able),
        (true, Some(why), _) => NodePull::Unavailable(why),
        (true, None, Some(node)) if !seen => {
            NodePull::Unavailable(format!("node {node} is not known to the API server"))
        }
        (true, None, _) => NodePull::Unavailable("no schedulable node".into()),
    }
}

/// The fields of a Node the node-pull decision (versions, cordon) and placement (labels) read;
/// the rest (images, conditions, annotations, managed fields, vmdisk's own `cache.vmdisk.io/`
/// labels, one per cached image) is dropped before a Node is stored.
pub fn strip_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    if let Some(labels) = node.metadata.labels.as_mut() {
        labels.retain(|k, _| !k.starts_with(vmdisk_crds::NODE_CACHE_LABEL_PREFIX));
    }
    let unschedulable = node.spec.as_ref().and_then(|s| s.unschedulable);
    node.spec = unschedulable.map(|u| k8s_openapi::api::core::v1::NodeSpec {
        unschedulable: Some(u),
        ..Default::default()
    });
    if let Some(status) = node.status.as_mut() {
        let info = status.node_info.take();
        *status = Default::default();
        status.node_info = info;
    }
}

/// What node-pull decisions read: the API server's verdict, read once, and the Nodes (their
/// versions only), watched while any clone is kept. Shared by the image controller and the
/// populator.
#[derive(Clone)]
pub struct NodeRuntimes {
    pub server: Result<(), String>,
    nodes: Store<Node>,
    /// The watch behind `nodes` (`None`: a fixed set, in tests).
    watch: Option<Arc<Reflected<Node>>>,
}

/// What reading Nodes asks of the API server.
pub const API_ACCESS: &[ApiAccess] = &[ApiAccess::new(
    "",
    "nodes",
    &["list", "watch"],
    AccessScope::Cluster,
)];

impl NodeRuntimes {
    /// Reads the server's version and starts the Node watch.
    pub async fn watch(client: &Client) -> Self {
        let server = match client.apiserver_version().await {
            Ok(info) => server_supports(&info.major, &info.minor),
            Err(e) => Err(format!("the API server's version could not be read: {e}")),
        };
        let nodes = Reflected::spawn_lean(
            Api::<Node>::all(client.clone()),
            watcher::Config::default(),
            strip_node,
        );
        Self {
            server,
            nodes: nodes.store(),
            watch: Some(Arc::new(nodes)),
        }
    }

    /// A fixed set of Nodes, not watched.
    pub fn fixed(server: Result<(), String>, nodes: Vec<Node>) -> Self {
        let (store, mut writer) = kube::runtime::reflector::store::<Node>();
        writer.apply_watcher_event(&watcher::Event::Init);
        for node in nodes {
            writer.apply_watcher_event(&watcher::Event::InitApply(node));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        Self {
            server,
            nodes: store,
            watch: None,
        }
    }

    pub fn store(&self) -> Store<Node> {
        self.nodes.clone()
    }

    /// [`node_pull`] over the Nodes as stored now.
    pub fn node_pull(&self, only: Option<&str>) -> NodePull {
        let nodes = self.nodes.state();
        node_pull(&self.server, nodes.iter().map(|n| &**n), only)
    }

    /// Notifies `wake` whenever a node appears, goes or changes its labels (placement), not on
    /// every heartbeat.
    pub fn on_labels_change(&self, wake: Arc<tokio::sync::Notify>) {
        let Some(watch) = &self.watch else {
            return;
        };
        type Labels = Option<std::collections::BTreeMap<String, String>>;
        let known: Mutex<HashMap<String, Labels>> = Mutex::default();
        let store = self.nodes.clone();
        watch.on_change(move |node: &Node| {
            let mut known = known.lock().expect("node labels lock");
            let name = node.name_any();
            let changed = match store.get(&ObjectRef::from_obj(node)) {
                Some(now) => {
                    known.insert(name, now.metadata.labels.clone()).as_ref()
                        != Some(&now.metadata.labels)
                }
                None => known.remove(&name).is_some(),
            };
            if changed {
                wake.notify_one();
            }
        });
    }

    /// Fires `wake()`'s requests whenever a node starts or stops mounting image volumes (a
    /// node added, removed or upgraded), not on every heartbeat.
    pub fn on_change<P, I>(
        &self,
        wake: impl Fn() -> I + Send + Sync + 'static,
    ) -> futures::stream::BoxStream<'static, ObjectRef<P>>
    where
        P: kube::Resource + 'static,
        P::DynamicType: Send,
        I: IntoIterator<Item = ObjectRef<P>>,
    {
        use futures::StreamExt;
        let Some(watch) = &self.watch else {
            return futures::stream::pending().boxed();
        };
        let known: Mutex<HashMap<String, bool>> = Mutex::default();
        let store = self.nodes.clone();
        watch
            .trigger(move |node: &Node| {
                let mut known = known.lock().expect("node support lock");
                let name = node.name_any();
                let present = store.get(&ObjectRef::from_obj(node)).is_some();
                let now = present.then(|| node_supports(node).is_ok());
                let changed = match now {
                    Some(able) => known.insert(name, able) != Some(able),
                    None => known.remove(&name).is_some(),
                };
                if changed {
                    wake().into_iter().collect()
                } else {
                    Vec::new()
                }
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, kubelet: &str, runtime: &str) -> Node {
        serde_json::from_value(json!({"metadata": {"name": name}, "status": {"nodeInfo": {
            "kubeletVersion": kubelet, "containerRuntimeVersion": runtime,
            "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": "", "osImage": "",
            "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"}}}))
        .unwrap()
    }

    #[test]
    fn versions_read_as_major_and_minor() {
        assert_eq!(major_minor("v1.36.2"), Some((1, 36)));
        assert_eq!(major_minor("2.3.4"), Some((2, 3)));
        assert_eq!(major_minor("1.6.20~ds1"), Some((1, 6)));
        assert_eq!(major_minor("1.35+"), Some((1, 35)));
        assert_eq!(major_minor(""), None);
        assert_eq!(major_minor("latest"), None);
    }

    #[test]
    fn runtimes_that_mount_image_volumes_are_told_from_those_that_do_not() {
        for (runtime, ok) in [
            ("containerd://2.3.4", true),
            ("containerd://2.1.0", true),
            ("containerd://2.0.5", false),
            ("containerd://1.6.20~ds1", false),
            ("cri-o://1.31.0", true),
            ("cri-o://1.30.4", false),
            ("docker://28.0.1", false),
            ("", false),
        ] {
            let n = node("n", "v1.36.2", runtime);
            assert_eq!(node_supports(&n).is_ok(), ok, "{runtime}");
        }
        let old_kubelet = node("n", "v1.34.1", "containerd://2.3.4");
        assert!(node_supports(&old_kubelet)
            .unwrap_err()
            .contains("kubelet \"v1.34.1\""));
        assert!(node_supports(&node("n", "v1.36.2", "containerd://1.6.20"))
            .unwrap_err()
            .contains("containerd >= 2.1 or cri-o >= 1.31"));
        assert!(server_supports("1", "36").is_ok());
        assert!(server_supports("1", "35+").is_ok());
        assert!(server_supports("1", "34").unwrap_err().contains("1.34"));
    }

    #[test]
    fn pods_go_only_where_the_runtime_can_mount_the_image() {
        let nodes = [
            node("old", "v1.36.2", "containerd://1.6.20"),
            node("new", "v1.36.2", "containerd://2.3.4"),
            node("fake", "", ""),
        ];
        let ok = Ok(());
        assert_eq!(
            node_pull(&ok, &nodes, None),
            NodePull::Nodes(vec!["new".into()])
        );
        assert_eq!(
            node_pull(&ok, &nodes, Some("new")),
            NodePull::Nodes(vec!["new".into()])
        );
        let NodePull::Unavailable(why) = node_pull(&ok, &nodes, Some("old")) else {
            panic!()
        };
        assert!(
            why.starts_with("node old runs \"containerd://1.6.20\""),
            "{why}"
        );
        let NodePull::Unavailable(why) = node_pull(&ok, &nodes, Some("gone")) else {
            panic!()
        };
        assert!(why.contains("not known"), "{why}");
        // Cordoned nodes take no pod.
        let mut cordoned = node("new", "v1.36.2", "containerd://2.3.4");
        cordoned.spec = Some(k8s_openapi::api::core::v1::NodeSpec {
            unschedulable: Some(true),
            ..Default::default()
        });
        let NodePull::Unavailable(why) = node_pull(&ok, [&cordoned, &nodes[0]], None) else {
            panic!()
        };
        assert!(why.starts_with("node old runs"), "{why}");
        let old_server = server_supports("1", "33");
        assert!(matches!(
            node_pull(&old_server, &nodes, None),
            NodePull::Unavailable(why) if why.contains("1.33")
        ));
    }

    #[test]
    fn a_stored_node_keeps_only_its_versions_and_labels() {
        let mut n = node("n", "v1.36.2", "containerd://2.3.4");
        n.metadata.labels = Some(
            [
                ("a".to_string(), "b".to_string()),
                (
                    vmdisk_crds::node_cache_label_key(&format!("sha256:{}", "ab".repeat(32)))
                        .unwrap(),
                    "ready".to_string(),
                ),
            ]
            .into(),
        );
        n.status.as_mut().unwrap().images = Some(vec![Default::default(); 50]);
        strip_node(&mut n);
        assert_eq!(
            n.metadata.labels,
            Some([("a".to_string(), "b".to_string())].into())
        );
        assert!(n.status.as_ref().unwrap().images.is_none());
        assert!(node_supports(&n).is_ok());
    }
}

//! `VMDiskImage`: a VM disk kept as an OCI image (KubeVirt containerDisk layout) in a registry.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::quantity::{parse_quantity, QuantityError};

/// Disk format the cache holds (and PVCs receive).
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DiskFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "raw" => Ok(DiskFormat::Raw),
            "qcow2" => Ok(DiskFormat::Qcow2),
            other => Err(format!(
                "unsupported disk format {other:?} (use raw or qcow2)"
            )),
        }
    }
}

/// A VM disk image published as an OCI image, cached on nodes and used to fill PVCs.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "vmdisk.io",
    version = "v1alpha1",
    kind = "VMDiskImage",
    namespaced,
    shortname = "vmdi",
    category = "vmdisk",
    status = "VMDiskImageStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Digest","type":"string","jsonPath":".status.digest","priority":1}"#,
    printcolumn = r#"{"name":"Format","type":"string","jsonPath":".status.sourceFormat"}"#,
    printcolumn = r#"{"name":"Virtual Size","type":"string","jsonPath":".status.virtualSizeQuantity"}"#,
    printcolumn = r#"{"name":"Warm Nodes","type":"integer","jsonPath":".status.warmNodes"}"#,
    printcolumn = r#"{"name":"Asked","type":"integer","jsonPath":".status.pull.nodesAsked","priority":1}"#,
    printcolumn = r#"{"name":"From Registry","type":"integer","jsonPath":".status.pull.bytesFromRegistry","priority":1}"#,
    printcolumn = r#"{"name":"From Peers","type":"integer","jsonPath":".status.pull.bytesFromPeers","priority":1}"#,
    printcolumn = r#"{"name":"All Warm (s)","type":"number","jsonPath":".status.pull.allNodesWarmSeconds","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct VMDiskImageSpec {
    /// Where the disk image comes from.
    pub source: ImageSource,
    /// Format the node cache stores and PVCs receive.
    #[serde(default)]
    pub format: DiskFormat,
    /// Minimum size of PVCs filled from this image (a quantity such as `10Gi`). The disk's
    /// virtual size is used when it is larger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(\\\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$') && !self.matches('^0+(\\\\.0+)?[A-Za-z]*$')").message("size must be a positive quantity such as 10Gi"))]
    pub size: Option<String>,
    /// Storage class given to PVCs that name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub storage_class_name: Option<String>,
    /// Access modes given to PVCs that name none (default `ReadWriteOnce`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 4), inner(length(max = 32)))]
    pub access_modes: Option<Vec<String>>,
    /// Which nodes keep the image warm in their cache.
    #[serde(default)]
    pub cache: CachePolicy,
    /// How often a moving tag is re-resolved (e.g. `10m`, `1h`). Unset: resolved once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(s|m|h))+$')").message("pollInterval must look like 30s, 10m or 1h30m"))]
    pub poll_interval: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSource {
    pub registry: RegistrySource,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.insecure) && self.insecure && has(self.caBundle))").message("insecure and caBundle are mutually exclusive"))]
pub struct RegistrySource {
    /// Image reference, `[docker://]registry/repository[:tag][@sha256:digest]`.
    #[schemars(length(max = 512))]
    #[x_kube(validation = Rule::new("self.matches('^(docker://)?[a-zA-Z0-9.-]+(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+(:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(@sha256:[a-f0-9]{64})?$')").message("url must be an image reference such as quay.io/containerdisks/fedora:40"))]
    pub url: String,
    /// A `kubernetes.io/dockerconfigjson` Secret in the image's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_secret_ref: Option<SecretRef>,
    /// PEM bundle of CAs to trust for this registry, in addition to the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262144))]
    pub ca_bundle: Option<String>,
    /// Talk plain HTTP to the registry. Only for registries on trusted networks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure: Option<bool>,
    /// Who pulls the image to fill a PVC: `pod` (vmdisk, through the node cache), `node`
    /// (the node's container runtime, as an image volume of the populator pod, where the
    /// runtime supports image volumes, otherwise `pod`) or `nodeOnly` (the runtime or
    /// nothing). Unset: the cluster's default (the controller's `--default-pull-method`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull_method: Option<PullMethod>,
}

/// Who pulls a VMDiskImage to fill a PVC (CDI's `pullMethod`, with a fallback).
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub enum PullMethod {
    /// vmdisk's populator pod pulls from the registry into the node cache and copies from it.
    #[default]
    Pod,
    /// The node's container runtime pulls and mounts the image (with the pod's pull secrets,
    /// the node's credential providers and mirrors); where it cannot, `pod`.
    Node,
    /// The node's container runtime, and only it: a PVC fails where no node can.
    NodeOnly,
}

impl PullMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            PullMethod::Pod => "pod",
            PullMethod::Node => "node",
            PullMethod::NodeOnly => "nodeOnly",
        }
    }
}

impl std::str::FromStr for PullMethod {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "pod" => Ok(PullMethod::Pod),
            "node" => Ok(PullMethod::Node),
            "nodeOnly" => Ok(PullMethod::NodeOnly),
            other => Err(format!(
                "unsupported pull method {other:?} (use pod, node or nodeOnly)"
            )),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// Which nodes warm the image, and whether their caches may evict it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CachePolicy {
    /// Nodes whose labels match warm the image ahead of use. Unset: every node running an agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    /// `false` disables pre-pulling; PVCs are then filled by a direct pull.
    #[serde(default = "default_true")]
    pub prefetch: bool,
    /// Pinned images are never evicted by the LRU budget.
    #[serde(default)]
    pub pinned: bool,
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            node_selector: None,
            prefetch: true,
            pinned: false,
        }
    }
}

impl CachePolicy {
    /// True when a node with these labels should keep the image warm.
    pub fn selects(&self, node_labels: &BTreeMap<String, String>) -> bool {
        self.prefetch
            && self.node_selector.as_ref().is_none_or(|selector| {
                selector
                    .iter()
                    .all(|(k, v)| node_labels.get(k).is_some_and(|have| have == v))
            })
    }
}

fn default_true() -> bool {
    true
}

/// Lifecycle of a VMDiskImage as the image controller sees it.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum ImagePhase {
    /// Not resolved yet.
    #[default]
    Pending,
    /// Tag resolved to a digest; no node holds it ready yet.
    Resolved,
    /// At least one node holds the image ready.
    Ready,
    /// Resolution failed (see conditions); retried with backoff.
    Failed,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VMDiskImageStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<ImagePhase>,
    /// Digest the reference resolved to; every agent pulls exactly this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Format of the disk inside the image (qcow2, raw, vmdk, ...), as reported by the agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_format: Option<String>,
    /// Virtual size of the disk in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size: Option<u64>,
    /// The virtual size as a quantity, for humans and printer columns.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_size_quantity: Option<String>,
    /// Number of nodes whose cache holds the image ready.
    #[serde(default)]
    pub warm_nodes: u32,
    /// How the nodes pulled the image, summed over those holding it ready; absent while no
    /// node is asked to hold it and none has reported a pull.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pull: Option<ImagePull>,
    /// When the reference was last resolved (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_resolved: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// How the nodes that hold an image's resolved digest pulled it: bytes the registry sent and
/// bytes other nodes' agents sent (peers), summed over the nodes, and how long it took until
/// every node asked to hold the image held it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImagePull {
    /// Nodes whose image list holds the image (the nodes asked to prefetch it).
    pub nodes_asked: u32,
    pub bytes_from_registry: u64,
    pub bytes_from_peers: u64,
    /// Seconds from the first of these nodes beginning its pull to the last one committing
    /// it, once every node asked holds it ready; absent before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_nodes_warm_seconds: Option<f64>,
}

impl VMDiskImage {
    /// The resolved digest, if the controller has resolved one.
    pub fn digest(&self) -> Option<&str> {
        self.status.as_ref()?.digest.as_deref()
    }

    /// Whether the cache agent of a node with `node_labels` prefetches this image: its cache
    /// policy selects the node and the image is pulled by pods (`pullMethod` `node` and
    /// `nodeOnly` are left to the node's runtime). The agents' plan and the controller's
    /// credentials endpoint (which gives a node only the credentials of what it prefetches)
    /// both ask this.
    pub fn prefetched_on(&self, node_labels: &BTreeMap<String, String>) -> bool {
        self.spec.cache.selects(node_labels)
            && self
                .spec
                .source
                .registry
                .pull_method
                .is_none_or(|m| m == PullMethod::Pod)
    }

    /// Whether every node running an agent prefetches this image: it is prefetched, pulled by
    /// pods and selects no particular nodes (placement puts it on the every-node list).
    pub fn prefetched_everywhere(&self) -> bool {
        self.prefetched_on(&BTreeMap::new())
            && self
                .spec
                .cache
                .node_selector
                .as_ref()
                .is_none_or(|s| s.is_empty())
    }

    /// Bytes a PVC must at least hold for the disk itself: the larger of the disk's virtual size
    /// (once known) and `spec.size`. `None` when neither is known.
    pub fn required_disk_bytes(&self) -> Result<Option<u64>, QuantityError> {
        let minimum = self.spec.size.as_deref().map(parse_quantity).transpose()?;
        let virtual_size = self.status.as_ref().and_then(|s| s.virtual_size);
        Ok(match (minimum, virtual_size) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: Option<&str>, virtual_size: Option<u64>) -> VMDiskImage {
        let mut img = VMDiskImage::new(
            "fedora",
            VMDiskImageSpec {
                source: ImageSource {
                    registry: RegistrySource {
                        url: "quay.io/containerdisks/fedora:40".into(),
                        pull_secret_ref: None,
                        ca_bundle: None,
                        insecure: None,
                        pull_method: None,
                    },
                },
                format: DiskFormat::Raw,
                size: size.map(str::to_string),
                storage_class_name: None,
                access_modes: None,
                cache: CachePolicy::default(),
                poll_interval: None,
            },
        );
        img.status = Some(VMDiskImageStatus {
            virtual_size,
            ..Default::default()
        });
        img
    }

    #[test]
    fn required_bytes_is_the_larger_of_size_and_virtual_size() {
        assert_eq!(image(None, None).required_disk_bytes(), Ok(None));
        assert_eq!(
            image(Some("1Gi"), None).required_disk_bytes(),
            Ok(Some(1 << 30))
        );
        assert_eq!(image(None, Some(5)).required_disk_bytes(), Ok(Some(5)));
        assert_eq!(
            image(Some("1Gi"), Some(2 << 30)).required_disk_bytes(),
            Ok(Some(2 << 30))
        );
        assert!(image(Some("lots"), None).required_disk_bytes().is_err());
    }

    #[test]
    fn spec_defaults_apply_on_deserialize() {
        let img: VMDiskImage = serde_json::from_value(serde_json::json!({
            "apiVersion": "vmdisk.io/v1alpha1",
            "kind": "VMDiskImage",
            "metadata": {"name": "x", "namespace": "vms"},
            "spec": {"source": {"registry": {"url": "quay.io/a/b:1"}}}
        }))
        .unwrap();
        assert_eq!(img.spec.format, DiskFormat::Raw);
        assert!(img.spec.cache.prefetch);
        assert!(!img.spec.cache.pinned);
    }
}
